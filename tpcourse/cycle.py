"""Drive a real nbgrader course through its cycle, in a directory of its own.

The demo, the tests and the benchmarks all grade through this: a temporary course root with
the repository's nbgrader_config.py and source/ copied in, a private exchange directory, and
the stock `nbgrader` commands run as subprocesses, exactly as an instructor runs them.
Everything a cycle writes stays in the course root: the exchange, the students' working
folders and their nbgrader caches (nbgrader's default cache is the user's Jupyter data dir,
where example students would pile up in a real user's Assignments tab), and what Jupyter,
IPython and matplotlib keep per user (Course.env).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

import assignments as registry

from . import REPO

COURSE_ID = "tp101"


class NbgraderError(RuntimeError):
    """An nbgrader command failed; the message carries its output."""


@dataclass
class Course:
    root: Path
    exchange: Path

    # -- set-up ---------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, assignments=None, extra_config: str = "") -> "Course":
        """A fresh course in `root`: config, source notebooks and an exchange of its own."""
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        exchange = root / "exchange"
        exchange.mkdir(exist_ok=True)
        config = (REPO / "nbgrader_config.py").read_text()
        config += (f"\nc.Exchange.root = {str(exchange)!r}\n"
                   f"c.Exchange.cache = {str(root / 'nbgrader_cache')!r}\n" + extra_config)
        (root / "nbgrader_config.py").write_text(config)
        for name in assignments or _assignments():
            shutil.copytree(REPO / "source" / name, root / "source" / name, dirs_exist_ok=True)
        return cls(root, exchange)

    def copy(self, dest: Path) -> "Course":
        """An identical course at `dest` (generated assignments, submissions, gradebook),
        cheaper than generating again."""
        dest = Path(dest).resolve()
        shutil.copytree(self.root, dest)
        cfg = dest / "nbgrader_config.py"
        cfg.write_text(cfg.read_text().replace(str(self.root), str(dest)))
        return Course(dest, dest / "exchange")

    def env(self) -> dict:
        """The environment of this course's commands: the grader's (_clean_env), with the
        per-user folders that Jupyter, IPython and matplotlib write to inside the course root
        (nothing lands in the caller's home: no example student in their Assignments tab)."""
        home = self.root / ".home"
        return {**_clean_env(), "JUPYTER_CONFIG_DIR": str(home / "jupyter-config"),
                "JUPYTER_DATA_DIR": str(home / "jupyter-data"),
                "JUPYTER_RUNTIME_DIR": str(home / "jupyter-runtime"),
                "IPYTHONDIR": str(home / "ipython"), "MPLCONFIGDIR": str(home / "matplotlib")}

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.root / 'gradebook.db'}"

    # -- the stock commands ---------------------------------------------------------------
    def nbgrader(self, *args, cwd: Path | None = None, timeout: float = 1800, check=True):
        """Run `nbgrader ARGS` (from this interpreter's environment) in the course root."""
        cmd = [sys.executable, "-m", "nbgrader", *map(str, args)]
        proc = subprocess.run(cmd, cwd=cwd or self.root, capture_output=True, text=True,
                              timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise NbgraderError(f"{' '.join(cmd[2:])} exited {proc.returncode}:\n"
                                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def generate(self, assignment: str):
        return self.nbgrader("generate_assignment", assignment, "--force")

    def release(self, assignment: str):
        return self.nbgrader("release_assignment", assignment, "--force")

    def student_home(self, student: str) -> Path:
        """A student's working folder (where they run nbgrader), with their nbgrader cache."""
        home = self.root / "students" / student
        home.mkdir(parents=True, exist_ok=True)
        return home

    def as_student(self, student: str, *args):
        """`nbgrader ARGS` as a student runs it: in their folder, this course's exchange, their
        own cache inside the course root."""
        home = self.student_home(student)
        return self.nbgrader(*args, f"--course={COURSE_ID}", f"--Exchange.root={self.exchange}",
                             f"--Exchange.cache={home / '.nbgrader_cache'}", cwd=home)

    def fetch_as(self, student: str, assignment: str) -> Path:
        """Fetch the released assignment into a student's own working directory."""
        self.as_student(student, "fetch_assignment", assignment)
        return self.student_home(student) / assignment

    def submit_as(self, student: str, assignment: str, notebooks: dict | None = None):
        """Fetch, overwrite the notebooks with the student's work, and `nbgrader submit`."""
        work = self.fetch_as(student, assignment)
        for name, nb in (notebooks or {}).items():
            nbformat.write(nb, str(work / name))
        return self.as_student(student, "submit", assignment, f"--student={student}")

    def collect(self, assignment: str):
        return self.nbgrader("collect", assignment, "--update")

    def place_submission(self, student: str, assignment: str, notebooks: dict, timestamp=None):
        """Put a submission where `nbgrader collect` would (a shortcut for large test batches)."""
        dest = self.root / "submitted" / student / assignment
        dest.mkdir(parents=True, exist_ok=True)
        for name, nb in notebooks.items():
            nbformat.write(nb, str(dest / name))
        stamp = timestamp or time.strftime("%Y-%m-%d %H:%M:%S.000000 UTC", time.gmtime())
        (dest / "timestamp.txt").write_text(stamp)
        return dest

    def autograde(self, assignment: str, student: str | None = None, *extra, timeout=1800):
        args = ["autograde", assignment, "--force", *extra]
        if student:
            args.append(f"--student={student}")
        return self.nbgrader(*args, timeout=timeout)

    def generate_feedback(self, assignment: str):
        return self.nbgrader("generate_feedback", assignment, "--force")

    def name_students(self, names: dict[str, tuple[str, str]]):
        """Give students {id: (first name, last name)} in the gradebook (the formgrader lists
        "last, first"; without names it shows "None, None")."""
        from nbgrader.api import Gradebook
        ensure_tools_on_path()
        with Gradebook(self.db_url) as gb:
            for student, (first, last) in names.items():
                gb.update_or_create_student(student, first_name=first, last_name=last)

    def export(self, to: Path | None = None) -> Path:
        to = Path(to or self.root / "grades.csv")
        self.nbgrader("export", f"--to={to}")
        return to

    # -- reading the gradebook ------------------------------------------------------------
    def scores(self, assignment: str, student: str) -> dict[str, dict[str, tuple[float, float]]]:
        """{notebook: {grade_id: (score, max_score)}} for one student's submission."""
        from nbgrader.api import Gradebook
        ensure_tools_on_path()
        with Gradebook(self.db_url) as gb:
            sub = gb.find_submission(assignment, student)
            return {nb.name: {g.name: (float(g.score), float(g.max_score)) for g in nb.grades}
                    for nb in sub.notebooks}

    def feedback_html(self, assignment: str, student: str) -> dict[str, str]:
        folder = self.root / "feedback" / student / assignment
        return {p.name: p.read_text() for p in sorted(folder.glob("*.html"))}


def _assignments():
    return registry.names()


def ensure_tools_on_path():
    """nbgrader's Gradebook runs the `alembic` script by name; `make` calls .venv/bin/python
    without activating the venv, so put this interpreter's bin/ first on PATH (in-process)."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])


def _clean_env():
    """The grader's environment: this venv first on PATH, no caller's Jupyter config dirs."""
    env = dict(os.environ)
    for key in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_PATH"):
        env.pop(key, None)
    env.setdefault("PYTHONHASHSEED", "0")
    # nbgrader runs `alembic` (gradebook migrations) by name: find the one beside this Python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
