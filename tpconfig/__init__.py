"""The course's nbgrader configuration (nbgrader_config.py), as nbgrader loads it: for the
graders (tpgrader's class grading, the gpu_runner), which read the course's settings
(c.Sandbox.*, c.Judge.*, c.GpuRunner.*) from the same file. Below both: it imports no course
package (the file it loads plugs the course into nbgrader itself)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["load_config"]


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
