"""Student-controlled text on the course's pages (issue 15), in-process: a submission that puts
`<script>`, `<style>`, `<img onerror>`, `</div>`, a page class, ANSI escapes, bidi controls
and a 1 MB string into every place a student reaches (exception names and messages, what cells
print and display, markdown and raw cells, cell sources, tags and execution counts, gradebook
comments, the gpu_runner's report, the class table) is rendered as nbgrader renders it: the
feedback page (generate_feedback's exporter, configured by tpgrader.configure) and the
formgrader's view of the submission (its exporter and template, the same config). Nothing of
it becomes markup, nothing runs, and the summary still names every lost point.

What a browser makes of such a page: test_browser.py."""
from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest
from nbformat import NotebookNode
from nbformat.v4 import (new_code_cell, new_markdown_cell, new_notebook, new_output,
                         new_raw_cell)
from traitlets.config import Config

import tpgrader
from tpgrader.pages import FeedbackExporter, nbgrader_templates

MARK = "PWNED"
SCRIPT = f"<script>window.{MARK}_script = 1; document.title = '{MARK}'</script>"
STYLE = f"<style>/*{MARK}*/ .tp-summary, .tp-lost {{ display: none }}</style>"
IMG = f'<img src="x" onerror="window.{MARK}_img = 1">'
CLOSE = "</code></pre></div></div></li></ol>"
OVERLAY = (f'<div class="navbar-fixed-top" style="background: white; height: 100%">'
           f"All checks passed: 99/99 {MARK}</div>")
LINK = f"<a href=\"javascript:window.{MARK}_link = 1\">{MARK} link</a>"
ANSI = f"\x1b[37;47m\x1b]0;{MARK} title\x07\x1b[2J\x1b[8m"
BIDI = "\u202e\u2066\u200f"
HOSTILE = SCRIPT + STYLE + IMG + CLOSE + OVERLAY + LINK + ANSI + BIDI
LONG = "many words " * 95_000 + "END-OF-THE-LONG-MESSAGE"           # a little over 1 MB
SVG = (f'<svg xmlns="http://www.w3.org/2000/svg" onload="window.{MARK}_svg = 1">'
       f"<script>window.{MARK}_svg = 1</script></svg>")
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJ"
       "RU5ErkJggg==")
# (grade_id, points, score) of the graded cells below; those below full marks must be listed.
GRADED = {"test_bias_once": (3, 0), "test_shapes": (1, 1), "answer_code": (2, 0),
          "answer_text": (1, 0), "gpu_row_forward": (4, 1)}
LOST = {g for g, (points, score) in GRADED.items() if score < points}
BAD_CHARACTERS = re.compile("[\x1b\u202a-\u202e\u2066-\u2069\u200e\u200f]")


def _graded(cell, gid, **kind):
    points, score = GRADED[gid]
    cell.metadata["nbgrader"] = {"grade_id": gid, "points": points, "score": score, **kind}
    return cell


def _hostile_notebook():
    solution = new_code_cell(f"# {HOSTILE}\ndef row_parallel(x):\n    raise Weird('{HOSTILE}')")
    solution.execution_count = f"<b>{MARK}</b>"     # what a kernel sends is not validated
    solution.metadata["tags"] = [f'x" onmouseover="window.{MARK}_tag = 1', "x navbar-fixed-top",
                                 "ok-tag"]
    solution.id = f'"><script>{MARK}'
    solution.outputs = [
        new_output("stream", name="stdout", text=HOSTILE + "\n" + LONG),
        new_output("display_data", data={
            "text/html": HOSTILE, "text/markdown": HOSTILE, "image/svg+xml": SVG,
            "application/javascript": f"window.{MARK}_js = 1",
            "text/latex": f"$\\href{{javascript:window.{MARK}_tex = 1}}{{x}}$",
            "text/plain": f"<IPython.core.display.HTML object> {MARK}"}),
        new_output("display_data", data={"text/html": OVERLAY}),
        NotebookNode({"output_type": "execute_result", "execution_count": f"{MARK}<script>",
                      "data": {"image/png": PNG, "text/plain": "<Figure>"},
                      "metadata": {"image/png": {"width": f"1 onerror=window.{MARK}_width=1",
                                                 "alt": f'" onerror="window.{MARK}_alt = 1'}}}),
        NotebookNode({"output_type": f"<script>{MARK}</script>", "text": HOSTILE}),
        NotebookNode({"output_type": "stream", "name": f'"><script>{MARK}', "text": [HOSTILE]}),
        new_output("error", ename=f"{STYLE}Weird{IMG}", evalue=HOSTILE,
                   traceback=[f"\x1b[31m{HOSTILE}\x1b[0m", f"Weird: {HOSTILE}"]),
    ]
    failing = new_code_cell("# Hidden test: the bias is counted exactly once\n"
                            "check.row_bias_once(row_parallel)")
    failing.outputs = [
        new_output("stream", name="stderr", text=HOSTILE),
        new_output("error", ename=f"{STYLE}{SCRIPT}Weird", evalue=f"{HOSTILE} {LONG}",
                   traceback=[f"Weird: {HOSTILE}"])]
    raw_html = new_raw_cell(HOSTILE, metadata={"raw_mimetype": "text/html"})
    comment = f"{HOSTILE}\n\n# All checks passed: 99/99\n\n[link](javascript:window.{MARK}_c=1)"
    nb = new_notebook()
    nb.cells = [
        new_markdown_cell(f"# A heading\n\n{HOSTILE}\n\n[click](javascript:window.{MARK}_md=1)"),
        new_markdown_cell(HOSTILE + "<p><b>nested</b> <i>markup</i></p>\n" * 6_000),  # 200 kB
        raw_html, new_raw_cell(HOSTILE),
        solution,
        _graded(new_code_cell(f"# {HOSTILE}\nanswer = 1"), "answer_code", grade=True,
                solution=True, comment=comment),
        _graded(new_markdown_cell(f"{HOSTILE}\n\n<p style='position:fixed'>{MARK}</p>"),
                "answer_text", grade=True, solution=True, comment=comment),
        _graded(failing, "test_bias_once", grade=True),
        _graded(new_code_cell("# the shapes\ncheck.shapes(row_parallel)"), "test_shapes",
                grade=True),
        _graded(new_markdown_cell("### Row forward (`gpu_row_forward`, 4 points)"),
                "gpu_row_forward", task=True, comment=comment),
    ]
    return nb


def _config(**sections) -> Config:
    c = Config()
    tpgrader.configure(c)
    for section, values in sections.items():
        for name, value in values.items():
            c[section][name] = value
    return c


def feedback_page(nb) -> str:
    """The feedback page as `nbgrader generate_feedback` renders it: its converter's config
    (which replaces c.HTMLExporter.extra_template_paths) and preprocessors, but GetGrades (the
    scores are in the cells' metadata already)."""
    from nbgrader.converters import GenerateFeedback
    from nbgrader.coursedir import CourseDirectory
    c = _config()
    converter = GenerateFeedback(coursedir=CourseDirectory(config=c), config=c)
    exporter = converter.exporter_class(parent=converter, config=converter.config)
    assert isinstance(exporter, FeedbackExporter)
    for preprocessor in converter.preprocessors:
        if not str(preprocessor).endswith("GetGrades"):
            exporter.register_preprocessor(preprocessor, enabled=True)
    total = sum(points for points, _ in GRADED.values())
    got = sum(score for _, score in GRADED.values())
    page, _ = exporter.from_notebook_node(nb, resources={"nbgrader": {
        "notebook": "hw1", "score": got, "max_score": total, "late_penalty": 0}})
    return page


def formgrader_page(nb) -> str:
    """The formgrader's page of the submission, as its SubmissionHandler renders it."""
    from nbconvert.exporters import HTMLExporter
    c = _config(HTMLExporter={"template_name": "formgrade",
                              "extra_template_basedirs": [nbgrader_templates()]})
    exporter = HTMLExporter(config=c)
    page, _ = exporter.from_notebook_node(nb, resources={
        "assignment_id": "hw1", "notebook_id": "hw1", "submission_id": "abc",
        "index": 0, "total": 1, "base_url": "", "student": "ada", "last_name": "L",
        "first_name": "A", "notebook_path": "autograded/ada/hw1/hw1.ipynb"})
    return page


class Page(HTMLParser):
    """A page's elements as a browser's tokenizer sees them."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.elements, self.scripts, self.text, self.depth = [], [], [], {}
        self._in = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in = tag if tag in ("script", "style") else None
        self.depth[tag] = self.depth.get(tag, 0) + 1

    def handle_endtag(self, tag):
        self._in = None
        self.depth[tag] = self.depth.get(tag, 0) - 1

    def handle_data(self, data):
        (self.scripts if self._in else self.text).append(data)


def assert_nothing_injected(page: str):
    parsed = Page(page)
    assert not [s for s in parsed.scripts if MARK in s], "an injected <script> or <style>"
    for tag, attrs in parsed.elements:
        for name, value in attrs.items():
            value = value or ""
            assert not (name.startswith("on") and MARK in value), f"<{tag} {name}={value[:80]}>"
            assert "javascript:" not in value.lower().replace(" ", ""), (tag, name, value[:80])
            if name in ("style", "class", "id", "href", "src"):
                assert MARK not in value, (tag, name, value[:80])
            if name == "class" and tag != "nav":      # the formgrader's own navigation bar
                assert "navbar-fixed-top" not in value, (tag, value)
        assert tag not in ("iframe", "object", "embed", "svg", "math", "form", "base"), tag
    # every <div> the page opens it closes: no </div> of a student's ends one of the page's
    assert parsed.depth.get("div") == 0, parsed.depth
    # the summary and every verdict are plain text (a cell's source and output may hold an
    # ESC, inert in HTML; ansi2html turns what it can read into classes)
    assert not BAD_CHARACTERS.search(page.split('id="notebook"')[0]), "escapes in the summary"
    for verdict in re.findall(r'<pre class="tp-verdict">(.*?)</pre>', page, re.S):
        assert not BAD_CHARACTERS.search(verdict), verdict[:200]
    text = "".join(parsed.text)
    # what the student wrote is still there, as text
    assert f"window.{MARK}_script = 1" in text and "All checks passed: 99/99" in text
    return parsed


def summary(page: str) -> str:
    return page.split('class="panel-heading tp-summary')[1].split('class="panel-body"')[0]


@pytest.fixture(scope="module")
def hostile():
    return _hostile_notebook()


def test_the_feedback_page_shows_hostile_values_as_text_and_every_lost_point(hostile):
    page = feedback_page(hostile)
    assert_nothing_injected(page)
    top = summary(page)
    failed = re.findall(r'<li class="tp-check" data-grade-id="([^"]*)">', top)
    assert set(failed) == LOST and len(failed) == len(LOST)
    assert f"What to fix: {len(LOST)} of {len(GRADED)} checks lost points" in top
    for gid in LOST:
        points, score = GRADED[gid]
        item = top.split(f'data-grade-id="{gid}"')[1].split("</li>")[0]
        assert f'<span class="tp-lost">(Score: {score:g} / {points:g})</span>' in item, gid
    # the verdict whole, escaped, at the top and in the cell
    explanation = top.split('data-grade-id="test_bias_once"')[1].split("</li>")[0]
    assert "END-OF-THE-LONG-MESSAGE" in explanation and SCRIPT in html.unescape(explanation)
    verdicts = [html.unescape(v) for v in
                re.findall(r'<pre class="tp-verdict">(.*?)</pre>', page, re.S)]
    assert any(v.startswith(f"{STYLE}{SCRIPT}Weird: {SCRIPT}") and
               v.endswith("END-OF-THE-LONG-MESSAGE") for v in verdicts)
    # what the solution cell printed: whole, as text (in its own colours: ansi2html's spans)
    printed = [html.unescape(re.sub(r"</?span[^>]*>", "", p)) for p in
               re.findall(r'output_stdout[^>]*>\s*<pre>(.*?)</pre>', page, re.S)]
    assert printed[0].startswith(f"{SCRIPT}{STYLE}") and \
        printed[0].rstrip().endswith("END-OF-THE-LONG-MESSAGE")


def test_the_formgrader_page_shows_hostile_values_as_text(hostile):
    page = formgrader_page(hostile)
    assert_nothing_injected(page)
    assert 'id="test_bias_once"' in page and "END-OF-THE-LONG-MESSAGE" in page


def test_only_plain_text_and_images_of_a_students_outputs_reach_a_page(hostile):
    from tpgrader.preprocessors.student_content import safe_output
    [solution] = [c for c in hostile.cells if c.cell_type == "code" and "Weird(" in c.source]
    shown = [safe_output(o) for o in solution.outputs]
    assert [o.output_type for o in shown] == ["stream", "display_data", "display_data",
                                              "execute_result", "stream", "stream", "error"]
    assert sorted(shown[1].data) == ["image/svg+xml", "text/plain"]
    assert shown[2].data == {"text/plain": "[an output of type text/html: not shown here]"}
    assert shown[3].execution_count is None
    assert shown[3].metadata == {"image/png": {"alt": f'" onerror="window.{MARK}_alt = 1'}}
    assert shown[5].name == "stdout" and shown[5].text == HOSTILE
    # an SVG is shown only where the template embeds it as an image
    assert "image/svg+xml" not in safe_output(solution.outputs[1], ("image/png",)).data


def test_the_gpu_report_section_shows_its_values_as_text(tmp_path):
    from tpgrader.classgrade import gpu_feedback
    report = {"backend": HOSTILE, "world_sizes": [1, HOSTILE], "score": HOSTILE,
              "max_score": 4, "faults": [{"unit": HOSTILE, "reason": f"{HOSTILE} {LONG}"}]}
    section = gpu_feedback.section(report, tmp_path / "no-plot.png")
    page = gpu_feedback.with_section(
        f'<html><body><div class="panel-heading tp-summary">{gpu_feedback.BEGIN}'
        f'{gpu_feedback.END}</div><div class="panel-body"></div></body></html>', section)
    assert_nothing_injected(page)
    assert "END-OF-THE-LONG-MESSAGE" in page


def test_a_gpu_runner_comment_keeps_a_ranks_message_on_its_own_line():
    from gpu_runner import launch, report
    checks = {"row.forward@2": {"ok": False, "cell": "gpu_row_forward",
                                "detail": f"rank 0 of 2: raised {HOSTILE}\n# All checks passed"
                                          f"\n- row.full@2: fine"},
              "row.full@2": {"ok": True, "cell": "gpu_row_forward", "detail": ""}}
    comment = report._comment("gpu_row_forward", list(checks), checks, launch.Config())
    head, *items = comment.split("\n")
    assert head.endswith("1/2 checks passed. Failed:") and len(items) == 1
    assert items[0].startswith("- row.forward (world size 2): rank 0 of 2: raised <script>")
    assert not BAD_CHARACTERS.search(comment)


def test_the_class_table_carries_no_terminal_escapes():
    from tpgrader.classgrade.run import Outcome
    from tpgrader.classgrade.summary import table
    shown = table([Outcome(f"ada{ANSI}{BIDI}", "error", f"{ANSI}boom{BIDI}\r{MARK} graded 10/10"),
                   Outcome("bob", "graded", scores={"nb": {"t": (1.0, 2.0)}})])
    assert not BAD_CHARACTERS.search(shown) and "\r" not in shown
    ada, bob = shown.splitlines()[1:3]
    assert ada.startswith("ada") and "boom" in ada and bob.split()[:4] == ["bob", "graded", "1",
                                                                         "/"]


def test_the_courses_own_markdown_renders_as_before():
    """The allow-list keeps every element and attribute the course's notebooks render to."""
    from nbconvert.exporters import HTMLExporter
    from tpcourse import REPO
    from tpgrader.pages.student_html import clean
    from tpjudge.cells import read
    render = HTMLExporter(template_name="classic").environment.from_string(
        "{{ cell.source | markdown2html }}")
    cells = [c for p in sorted((REPO / "source").glob("*/*.ipynb")) for c in read(p).cells
             if c.cell_type == "markdown"]
    assert len(cells) > 50
    for cell in cells:
        rendered = render.render(cell=cell)
        assert clean(rendered) == rendered, cell.source[:200]
