"""The grader: nbgrader plug-ins (tpgrader.preprocessors) and class grading (tpgrader.classgrade).

nbgrader_config.py plugs the course in with one call, so that a plain `nbgrader autograde` runs
student code sandboxed (tpsandbox) and takes every test cell's verdict from the judge (tpjudge):

    from tpgrader import configure
    configure(c)
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["configure", "load_config"]


def configure(c) -> None:
    """In the autograde pipeline of config `c`: JudgedExecute instead of nbgrader's Execute (the
    kernel sandboxed, the test cells judged outside it), and FlagReach after SaveAutoGrades."""
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import Execute, SaveAutoGrades
    from .preprocessors.flag_reach import FlagReach
    from .preprocessors.judged_execute import JudgedExecute
    current = c.Autograde.get("autograde_preprocessors") or Autograde.autograde_preprocessors.default()
    pipeline = []
    for p in current:
        pipeline.append(JudgedExecute if p is Execute else p)
        if p is SaveAutoGrades:
            pipeline.append(FlagReach)
    c.Autograde.autograde_preprocessors = pipeline


def load_config(root: str):
    """The course's nbgrader configuration, as `nbgrader` run in `root` would load it."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader
    config = Config()
    path = Path(root) / "nbgrader_config.py"
    if path.exists():
        config.merge(PyFileConfigLoader(path.name, path=str(path.parent)).load_config())
    config.CourseDirectory.root = str(root)
    return config
