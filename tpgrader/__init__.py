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
    """Swap nbgrader's Execute for JudgedExecute (the kernel sandboxed, the test cells judged
    outside it) in the autograde pipeline of config `c`."""
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import Execute
    from .preprocessors.judged_execute import JudgedExecute
    current = c.Autograde.get("autograde_preprocessors") or Autograde.autograde_preprocessors.default()
    c.Autograde.autograde_preprocessors = [JudgedExecute if p is Execute else p for p in current]


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
