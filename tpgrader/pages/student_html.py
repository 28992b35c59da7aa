"""HTML that a student's notebook puts on a page, made safe to show: markdown as it renders
(the course's own and whatever a student writes or edits), raw HTML cells, and the outputs a
student's code may produce (tpgrader.preprocessors.student_content keeps the rest off).

The feedback page is opened by the student and the instructor; the formgrader's page of a
submission is served by the instructor's Jupyter server, where a script could act as the
instructor. So nothing a student wrote may run script, carry CSS (a `<style>` or a style
attribute can hide or overlay the grades) or borrow the page's own classes (bootstrap's
`navbar-fixed-top` overlays the top of the page): `clean` keeps only the elements markdown
makes, with the attributes markdown and nbconvert give them, and escapes every other tag, so
what was written stays visible as text. Cleaning costs time that grows with the square of the
nested elements (html5lib under bleach: about a minute for 1 MB of "<p><b>x</b></p>"), so HTML
longer than LIMIT (seven times the course's longest markdown cell) is shown escaped, as text.

nbconvert's own option, HTMLExporter.sanitize_html, does not cover this: nbgrader's feedback
and formgrade templates render markdown cells and comments without it, its allow-list escapes
headings, paragraphs and images (the course's text would show as tags), and it allows any
class. Both templates render markdown (cells and gradebook comments) as
`markdown2html | strip_files_prefix`, as does nbconvert's classic template under them; so
tpgrader.configure replaces the `strip_files_prefix` filter (c.HTMLExporter.filters, which
the formgrader's exporter reads too) with `markdown_html`: nbconvert's, then `clean`.
"""
from __future__ import annotations

import html as html_text
import re
from functools import lru_cache

import bleach
from nbconvert.filters.strings import strip_files_prefix

_BLOCKS = ("p", "div", "pre", "blockquote", "hr", "br", "ul", "ol", "li", "dl", "dt", "dd",
           "table", "thead", "tbody", "tfoot", "tr", "th", "td", "caption",
           "h1", "h2", "h3", "h4", "h5", "h6")
_INLINE = ("a", "abbr", "b", "code", "del", "em", "i", "img", "kbd", "s", "samp", "small",
           "span", "strong", "sub", "sup", "var")
TAGS = frozenset(_BLOCKS + _INLINE)
LIMIT = 50_000          # characters of HTML cleaned as HTML; longer is shown as text
# Image data in markdown (a cell's attachments, rendered as data: URIs): raster and SVG, the
# latter shown through <img>, where it cannot run script.
_IMAGE_DATA = re.compile(r"\s*data:image/(png|jpeg|gif|webp|svg\+xml)[;,]", re.I)
_ANCHOR = re.compile(r"\S{1,300}")
_PLAIN_ATTRIBUTES = {"a": {"href", "title"}, "img": {"src", "alt", "title", "width", "height"},
                     "abbr": {"title"}, "ol": {"start"}, "td": {"colspan", "rowspan"},
                     "th": {"colspan", "rowspan"}}


@lru_cache(maxsize=1)
def _classes() -> frozenset:
    """The classes markdown's rendering gives: pygments' token classes on a highlighted code
    block's spans, the block's own, and nbconvert's heading anchor."""
    from pygments.token import STANDARD_TYPES
    return frozenset(STANDARD_TYPES.values()) - {""} | {"highlight", "anchor-link"}


def _allowed_class(value: str) -> bool:
    names = value.split()
    return bool(names) and all(n in _classes() or re.fullmatch(r"hl-[\w-]{1,40}", n)
                               for n in names)


def _attribute(tag: str, name: str, value: str) -> bool:
    if name in _PLAIN_ATTRIBUTES.get(tag, ()):
        if tag == "img" and name == "src" and value.strip().lower().startswith("data:"):
            return bool(_IMAGE_DATA.match(value))
        if tag == "a" and name == "href" and value.strip().lower().startswith("data:"):
            return False
        return True
    if name == "class":
        return tag in ("span", "div", "a", "code", "pre") and _allowed_class(value)
    # the anchor nbconvert gives each heading (its text, spaces made dashes)
    return name == "id" and tag[0] == "h" and tag[1:].isdigit() and bool(_ANCHOR.fullmatch(value))


@lru_cache(maxsize=1)
def _cleaner() -> bleach.Cleaner:
    return bleach.Cleaner(tags=TAGS, attributes=_attribute,
                          protocols={"http", "https", "mailto", "data"}, strip=False,
                          strip_comments=True)


def clean(html) -> str:
    """`html` with only markdown's elements and attributes (no script, style, event handler,
    form or frame, no class of the page's); any other tag is escaped, so it shows as text.
    Beyond LIMIT characters, all of it is escaped."""
    html = "" if html is None else str(html)
    if len(html) > LIMIT:
        return f'<pre class="tp-as-text">{html_text.escape(html)}</pre>'
    return _cleaner().clean(html)


def markdown_html(html) -> str:
    """The `strip_files_prefix` filter of the course's pages: nbconvert's, then `clean` (see
    the module's docstring for why this filter)."""
    return clean(strip_files_prefix(html))
