"""What of a student's notebook an HTML page shows: every page nbgrader renders for the course
(the feedback, the formgrader's view of a submission), before its template runs.

A submission's outputs are what the student's kernel sent: any MIME type, any shape. A page
shows what a cell printed, raised and plotted, and nothing that runs or styles:
- outputs keep only text/plain and images (PNG, JPEG; SVG only as the templates embed it, in an
  <img>, where it cannot run script); HTML, markdown, LaTeX, JavaScript and widget views are
  dropped, and a note names what was left off when nothing else remains;
- every field has the type the templates expect (a stream's text a string, a traceback a list of
  strings, an execution count an int), else it is shown as text or dropped;
- raw cells (which the templates insert as HTML) keep only what markdown could write
  (tpgrader.pages.student_html.clean). Markdown cells and comments are cleaned as they render
  (student_html.markdown_html, the template's `strip_files_prefix` filter);
- a cell's tags become classes of its element ("celltag_<tag>"): a tag with a space in it
  would add a class of the page's own (`x navbar-fixed-top`), so only word-like tags stay; a
  cell id that nbformat would refuse gets a fresh one.
The templates escape the rest (exception names, grade ids, the summary). ANSI colours in what a
cell printed stay (nbconvert's ansi2html makes them colour spans of its own, and escapes the
text): a student colours only their own output; the verdicts and the summary are plain text.

Plugged in by the templates' conf.json: tp_feedback's (generate_feedback replaces
c.HTMLExporter.extra_template_paths) and tpgrader/pages/style's (every other page, the
formgrader's included), under one key, so it runs once, before every other preprocessor.
"""
from __future__ import annotations

import re
import uuid

from nbconvert.preprocessors import Preprocessor
from nbformat.v4 import new_output
from traitlets import Bool

from ..pages.student_html import clean

IMAGES = ("image/png", "image/jpeg")
SVG = "image/svg+xml"
_STREAMS = ("stdout", "stderr")
_TAG = re.compile(r"[\w.:-]{1,100}")
_CELL_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")     # nbformat 4.5's pattern


def _text(value) -> str:
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return "" if value is None else str(value)


def _count(value):
    return value if type(value) is int else None


def _tags(tags) -> list:
    return [t for t in tags if isinstance(t, str) and _TAG.fullmatch(t)] \
        if isinstance(tags, list) else []


def _image_metadata(meta: dict) -> dict:
    """An image's size (numbers: the templates write them unquoted, so a string could add an
    attribute), whether it is unconfined, its alt text (quoted and escaped there)."""
    kept = {k: meta[k] for k in ("width", "height")
            if type(meta.get(k)) in (int, float) and meta[k] >= 0}
    if meta.get("unconfined") is True:
        kept["unconfined"] = True
    if "alt" in meta:
        kept["alt"] = _text(meta["alt"])
    return kept


class StudentContent(Preprocessor):

    enabled = Bool(True).tag(config=True)

    def preprocess(self, nb, resources):
        shown = IMAGES if resources.get("should_not_encode_svg") else IMAGES + (SVG,)
        for cell in nb.cells:
            if "tags" in cell.get("metadata", {}):
                cell.metadata["tags"] = _tags(cell.metadata["tags"])
            if "id" in cell and not (isinstance(cell.id, str) and _CELL_ID.fullmatch(cell.id)):
                cell.id = uuid.uuid4().hex[:8]
            if cell.cell_type == "code":
                cell.execution_count = _count(cell.get("execution_count"))
                cell.outputs = [safe_output(o, shown) for o in cell.get("outputs") or []]
            elif cell.cell_type == "raw":
                cell.source = clean(_text(cell.get("source")))
        return nb, resources


def safe_output(out, shown=IMAGES + (SVG,)):
    """One output as a page may show it (a new node; `out` may be anything)."""
    kind = out.get("output_type") if isinstance(out, dict) else None
    if kind == "stream":
        name = out.get("name") if out.get("name") in _STREAMS else "stdout"
        return new_output("stream", name=name, text=_text(out.get("text")))
    if kind == "error":
        lines = out.get("traceback")
        return new_output("error", ename=_text(out.get("ename")), evalue=_text(out.get("evalue")),
                          traceback=[_text(t) for t in lines] if isinstance(lines, list) else [])
    if kind in ("display_data", "execute_result"):
        data = out.get("data") if isinstance(out.get("data"), dict) else {}
        kept = {mime: _text(data[mime]) for mime in ("text/plain", *shown) if mime in data}
        left_off = sorted(str(m) for m in data if m not in kept)
        if left_off and not kept:
            kept["text/plain"] = f"[an output of type {', '.join(left_off)}: not shown here]"
        metadata = out.get("metadata") if isinstance(out.get("metadata"), dict) else {}
        meta = {mime: _image_metadata(metadata[mime]) for mime in kept
                if mime != "text/plain" and isinstance(metadata.get(mime), dict)}
        if kind == "execute_result":
            return new_output(kind, data=kept, metadata=meta,
                              execution_count=_count(out.get("execution_count")))
        return new_output(kind, data=kept, metadata=meta)
    return new_output("stream", name="stdout",
                      text=f"[an output of type {str(kind)[:80]!r}: not shown here]")
