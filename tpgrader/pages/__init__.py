"""How graded notebooks look: the course's feedback template and the CSS that makes the
feedback and formgrader pages readable at 1366 px (wrapped explanations, markdown tables).

nbgrader renders both pages with nbconvert's HTMLExporter; tpgrader.configure points
`nbgrader generate_feedback` at FeedbackExporter (template `tp_feedback`, in this folder) and
adds the CSS through preprocessors (tpgrader.preprocessors.page_style, feedback_summary).
"""
from __future__ import annotations

import os
from pathlib import Path

from nbconvert.exporters import HTMLExporter

PAGES = Path(__file__).resolve().parent
CSS = (PAGES / "page.css").read_text()


def nbgrader_templates() -> str:
    """nbgrader's own template folder (its `feedback` template, which ours extends)."""
    import nbgrader
    return os.path.join(os.path.dirname(nbgrader.__file__), "server_extensions", "formgrader",
                        "templates")


def with_page_css(resources: dict) -> dict:
    """Add the course's CSS to nbconvert's inlined CSS (once)."""
    inlining = resources.setdefault("inlining", {})
    css = inlining.setdefault("css", [])
    if CSS not in css:
        css.append(CSS)
    return resources


class FeedbackExporter(HTMLExporter):
    """nbgrader's HTML exporter for feedback, under a name of its own: configured through
    `c.FeedbackExporter.*`, which nbgrader's `c.HTMLExporter.template_name = "feedback"` (set
    by generate_feedback and by the formgrader's Generate Feedback button) does not override.
    Its template has one filter more: `plain` (tpjudge.student_text.plain), for a student's
    text shown as it is (an exception's name), before `escape_html`."""

    def default_filters(self):
        from tpjudge.student_text import plain
        yield from super().default_filters()
        yield "plain", plain
