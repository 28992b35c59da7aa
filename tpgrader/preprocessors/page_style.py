"""Add the course's page CSS (tpgrader/pages/page.css) to every HTML page nbconvert renders for
nbgrader: the formgrader's submission view (markdown tables, wrapped outputs) and the feedback.

The formgrader builds its HTMLExporter from the course config but imposes its own template, whose
base (nbconvert's classic) resets the inlined CSS in a preprocessor of its conf.json, after any
configured preprocessor. So this one comes in the same way: tpgrader.configure adds
tpgrader/pages/style to `c.HTMLExporter.extra_template_paths`, and the conf.json there (nbconvert
merges every template path's) lists it after the classic template's.
"""
from __future__ import annotations

from nbconvert.preprocessors import Preprocessor
from traitlets import Bool

from ..pages import with_page_css


class PageStyle(Preprocessor):

    enabled = Bool(True).tag(config=True)

    def preprocess(self, nb, resources):
        return nb, with_page_css(resources)
