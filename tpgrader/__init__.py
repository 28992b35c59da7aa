"""The grader: nbgrader plug-ins (tpgrader.preprocessors, tpgrader.pages) and class grading
(tpgrader.classgrade).

nbgrader_config.py plugs the course in with one call, so that a plain `nbgrader autograde` runs
student code sandboxed (tpsandbox) and takes every test cell's verdict from the judge (tpjudge),
`nbgrader generate_assignment` fills in the self-check cells, and `nbgrader generate_feedback`
writes the course's feedback page:

    from tpgrader import configure
    configure(c)
"""
from __future__ import annotations

import sys

__all__ = ["configure"]

_PP = "tpgrader.preprocessors."
JUDGED_EXECUTE = _PP + "judged_execute.JudgedExecute"
FLAGS = _PP + "flags.Flags"
CHECK_TESTS = _PP + "check_tests.CheckTestCells"
SELF_CHECK = _PP + "self_check.SelfCheck"
FEEDBACK_SUMMARY = _PP + "feedback_summary.FeedbackSummary"
REFERENCE_HOOK = "tpgrader.reference.autograde_hook"
# The filter every markdown render of nbgrader's and nbconvert's HTML templates goes through.
MARKDOWN_HTML = {"strip_files_prefix": "tpgrader.pages.student_html.markdown_html"}


def configure(c) -> None:
    """Plug the course into nbgrader config `c`. Every value is an import string (nbgrader
    imports them itself), so the config serialises: the formgrader shows it as JSON.

    - autograde: JudgedExecute instead of nbgrader's Execute (the kernel sandboxed, the test
      cells judged outside it), Flags after SaveAutoGrades, CheckTestCells before
      OverwriteCells (test cells deleted or changed: put back, flagged); the source's own
      solutions judged before the first student (tpgrader.reference, nbgrader's pre-convert
      hook);
    - generate_assignment: SelfCheck before ClearHiddenTests (it reads the hidden tests);
    - generate_feedback: FeedbackSummary after GetGrades, rendered by FeedbackExporter with
      the `tp_feedback` template (tpgrader/pages);
    - every HTML page nbgrader renders (the formgrader's too): the course's CSS (PageStyle,
      added through a template conf.json in tpgrader/pages/style), only the outputs a page may
      show (StudentContent, added the same way) and markdown cleaned as it renders
      (tpgrader.pages.student_html: no script, style or page class from a student).
    """
    from nbgrader.converters import Autograde, GenerateAssignment, GenerateFeedback
    from .pages import PAGES, nbgrader_templates
    _pipeline(c.Autograde, "autograde_preprocessors", Autograde.autograde_preprocessors,
              replace={"nbgrader.preprocessors.execute.Execute": JUDGED_EXECUTE},
              after={"nbgrader.preprocessors.saveautogrades.SaveAutoGrades": FLAGS})
    _pipeline(c.Autograde, "sanitize_preprocessors", Autograde.sanitize_preprocessors,
              before={"nbgrader.preprocessors.overwritecells.OverwriteCells": CHECK_TESTS})
    if not c.Autograde.get("pre_convert_hook"):
        c.Autograde.pre_convert_hook = REFERENCE_HOOK
    _pipeline(c.GenerateAssignment, "preprocessors", GenerateAssignment.preprocessors,
              before={"nbgrader.preprocessors.clearhiddentests.ClearHiddenTests": SELF_CHECK})
    _pipeline(c.GenerateFeedback, "preprocessors", GenerateFeedback.preprocessors,
              after={"nbgrader.preprocessors.getgrades.GetGrades": FEEDBACK_SUMMARY})
    c.GenerateFeedback.exporter_class = "tpgrader.pages.FeedbackExporter"
    c.FeedbackExporter.template_name = "tp_feedback"
    c.FeedbackExporter.template_file = "tp_feedback.html.j2"
    c.FeedbackExporter.extra_template_basedirs = [str(PAGES), nbgrader_templates()]
    # nbconvert merges the conf.json of every template path, so this folder's adds PageStyle
    # to the template's own preprocessors, after the one that resets the inlined CSS.
    paths = [str(p) for p in c.HTMLExporter.get("extra_template_paths") or []]
    c.HTMLExporter.extra_template_paths = paths + [p for p in [str(PAGES / "style")]
                                                   if p not in paths]
    c.HTMLExporter.filters = {**(c.HTMLExporter.get("filters") or {}), **MARKDOWN_HTML}
    # nbconvert's own switch too, where its templates honour it (outputs, a notebook's widget
    # state); it does not reach nbgrader's markdown, hence the filter above
    c.HTMLExporter.sanitize_html = True
    # A kernel can send an execution count of any type (nbclient stores it unchecked): nbconvert
    # would refuse the notebook after its first preprocessor, before StudentContent, which
    # makes it valid, has run; validated once, after all of them, the page renders.
    c.HTMLExporter.optimistic_validation = True
    _server_extensions_as_data(c)


def _server_extensions_as_data(c) -> None:
    """In a Jupyter server (the formgrader loads this config there), state the server's
    extensions as a plain dict. jupyter_server keeps them in its config as a traitlets
    LazyConfigValue, which json cannot write, so the formgrader's configuration panel fell back
    to a repr and logged "Formgrader config is not serializable" on every page load. The
    formgrader merges this into its own copy of the config; the server's stays as it was."""
    serverapp = sys.modules.get("jupyter_server.serverapp")
    if serverapp is not None and serverapp.ServerApp.initialized():
        c.ServerApp.jpserver_extensions = dict(serverapp.ServerApp.instance().jpserver_extensions)


def import_string(item) -> str:
    """`item` (a class or an import string) as the import string of the class it names."""
    if isinstance(item, str):
        from traitlets.utils.importstring import import_item
        item = import_item(item)
    return f"{item.__module__}.{item.__qualname__}"


def _pipeline(section, name, trait, replace=None, before=None, after=None) -> None:
    """section[name] (the config's list, else the trait's default) as import strings, with
    entries replaced, and ours inserted before / after the named ones; ours only once."""
    current = [import_string(p) for p in (section.get(name) or trait.default())]
    inserted = set((before or {}).values()) | set((after or {}).values())
    pipeline = []
    for p in current:
        if p in inserted:       # configured twice: put back where it belongs, once
            continue
        if p in (before or {}):
            pipeline.append(before[p])
        pipeline.append((replace or {}).get(p, p))
        if p in (after or {}):
            pipeline.append(after[p])
    section[name] = pipeline
