"""What the feedback page says about each graded cell (for the `tp_feedback` template).

Runs in `nbgrader generate_feedback` after GetGrades (which puts each cell's score and comment
into its metadata). For every graded cell, in notebook order: its grade_id, a short title (the
test cell's first comment line, the task cell's heading), its score, and for one that lost
points the explanation: the verdict of a test cell (the error's type and whole message, or what
it wrote to stderr), the comment of a task cell (the gpu_runner's list of failed sub-checks).
The list goes to resources["tp_feedback"]["checks"].

It also drops grader-internal frames from error tracebacks (code in the grading packages), so
a student sees only the frames of their own code. The judge sends none (tpjudge.notebook); this
covers test cells run in the kernel (`c.Judge.enabled = False`).
"""
from __future__ import annotations

import re

from nbconvert.preprocessors import Preprocessor
from traitlets import Bool

from tpjudge.cells import grade_id, meta

from ..pages import with_page_css
from tpjudge.student_text import plain

# A frame in a traceback, as IPython (`File /path/x.py:12, in f()`) or Python
# (`File "/path/x.py", line 12, in f`) writes it.
_FRAME_FILE = re.compile(r'^\s*File\s+"?([^",:\n]+)')
GRADER_PACKAGES = ("tpgrade", "assignments", "tpjudge", "tpsim", "tpgrader", "tpsandbox",
                   "gpu_runner")
_INTERNAL = re.compile(r"[/\\](%s)[/\\]" % "|".join(GRADER_PACKAGES))
_HIDDEN_PREFIX = re.compile(r"^(hidden test|test)\s*:\s*", re.I)


def is_internal_frame(entry: str) -> bool:
    found = _FRAME_FILE.match(plain(entry))
    return bool(found and _INTERNAL.search(found.group(1)))


def title(cell) -> str:
    """A short title: a code cell's first comment line, a markdown cell's first heading, with
    markdown marks and a trailing "(grade_id, N points, ...)" removed."""
    gid = grade_id(cell) or ""
    for line in cell.source.splitlines():
        text = line.strip()
        if cell.cell_type == "code" and text.startswith("#") and not text.startswith("###"):
            return plain(_HIDDEN_PREFIX.sub("", text.lstrip("#").strip()))
        if cell.cell_type == "markdown" and text.startswith("#"):
            text = text.lstrip("#").replace("`", "").replace("**", "").strip()
            return plain(re.sub(r"\s*\(\s*%s\b[^)]*\)\s*$" % re.escape(gid), "", text))
    return ""


def verdict(cell) -> str:
    """A test cell's explanation: its error (type and whole message), or its stderr."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "error":
            parts.append(f"{plain(out.ename)}: {plain(out.evalue)}")
        elif out.output_type == "stream" and out.name == "stderr":
            parts.append("wrote to stderr (a test that writes to stderr fails):\n"
                         + plain(out.text).strip())
    return "\n".join(parts)


def _number(value) -> str:
    return f"{float(value or 0):g}"


class FeedbackSummary(Preprocessor):

    enabled = Bool(True).tag(config=True)

    def preprocess(self, nb, resources):
        checks = []
        for cell in nb.cells:
            m = meta(cell)
            if cell.cell_type == "code":
                for out in cell.get("outputs", []):
                    if out.output_type == "error" and out.get("traceback"):
                        out.traceback = [t for t in out.traceback if not is_internal_frame(t)]
            graded = m.get("grade") or m.get("task")
            if not graded or "points" not in m:
                continue
            score, points = float(m.get("score") or 0), float(m.get("points") or 0)
            failed = score < points
            is_task = bool(m.get("task"))
            explanation = ""
            if failed:
                explanation = plain(m.get("comment")) if is_task or m.get("solution") \
                    else verdict(cell)
            checks.append({
                "grade_id": grade_id(cell), "title": title(cell),
                "anchor": f"comment-{grade_id(cell)}" if is_task else grade_id(cell),
                "score": score, "points": points, "failed": failed,
                "score_text": _number(score), "points_text": _number(points),
                "explanation": explanation.strip(),
            })
        resources["tp_feedback"] = {"checks": checks}
        return nb, with_page_css(resources)
