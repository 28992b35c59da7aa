"""Grade a whole assignment: parallel sandboxed autograde, one gradebook writer, then the
gpu_runner (when the assignment has gpu_* grade cells), feedback and export. Resumable."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tpjudge import reach

from . import gpu_feedback
from . import gradebook as gbk
from .. import load_config


class GraderError(RuntimeError):
    """The grader itself failed (as opposed to a student's code failing)."""


@dataclass
class Outcome:
    student: str
    status: str                     # graded | unchanged | error
    error: str = ""
    scores: dict = field(default_factory=dict)   # {notebook: {grade_id: (score, max)}}
    flagged: list = field(default_factory=list)  # solution cells flagged for review (FlagReach)


@dataclass
class ClassGrader:
    root: Path
    assignment: str
    workers: int = 0
    students: tuple = ()
    force: bool = False
    gpu: str = "auto"               # auto | skip
    feedback: bool = True
    export: bool = True
    progress: bool = True
    log: callable = print

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.workers = self.workers or len(os.sched_getaffinity(0))
        self.config = load_config(str(self.root))
        from nbgrader.coursedir import CourseDirectory
        cd = CourseDirectory(config=self.config)
        self.db_url, self.course_id = cd.db_url, cd.course_id
        self.stage = self.root / ".grade_class" / self.assignment
        os.environ["PATH"] = _env()["PATH"]  # nbgrader runs `alembic` when it creates a gradebook

    # -- what to grade -----------------------------------------------------------------------
    def submissions(self) -> list[str]:
        found = sorted(p.parent.name for p in (self.root / "submitted").glob(f"*/{self.assignment}")
                       if p.is_dir())
        if self.students:
            missing = set(self.students) - set(found)
            if missing:
                raise GraderError(f"no submission of {self.assignment} for {sorted(missing)}")
            found = [s for s in found if s in self.students]
        return found

    def digest(self, student: str) -> str:
        """What a grade depends on: the submitted files and the assignment's source."""
        h = hashlib.sha256()
        for base in (self.root / "submitted" / student / self.assignment,
                     self.root / "source" / self.assignment):
            for path in sorted(p for p in base.rglob("*") if p.is_file()):
                h.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> list[Outcome]:
        from tpsandbox import Sandbox, problem
        why = problem(Sandbox(config=self.config))
        if why:
            raise GraderError(why)
        _check_assignment(self.db_url, self.course_id, self.assignment)
        gbk.ensure_tables(self.db_url, self.course_id)
        students = self.submissions()
        done = {} if self.force else gbk.recorded(self.db_url, self.course_id, self.assignment)
        digests = {s: self.digest(s) for s in students}
        todo = [s for s in students if done.get(s) != digests[s]]
        outcomes = {s: Outcome(s, "unchanged") for s in students if s not in todo}
        if todo:
            outcomes.update(self._autograde(todo, digests, len(students)))
        graded = [s for s in todo if outcomes[s].status == "graded"]
        if self.gpu != "skip" and gbk.has_gpu_cells(self.db_url, self.course_id, self.assignment):
            self._gpu_stage(students, digests, outcomes)
        if self.feedback:
            self._feedback(graded)
        if self.export:
            self._nbgrader("export", f"--to={self.root / 'grades.csv'}")
        self._read_scores(outcomes)
        return [outcomes[s] for s in students]

    def _autograde(self, todo, digests, total) -> dict[str, Outcome]:
        shutil.rmtree(self.stage, ignore_errors=True)  # leftovers of a killed run count for nothing
        self.stage.mkdir(parents=True)
        gbk.make_seed(self.db_url, self.course_id, str(self.stage / "seed.db"))
        ctx = mp.get_context("spawn")
        tasks, results = ctx.Queue(), ctx.Queue()
        uid_base = _uid_base(self.config)
        n = min(self.workers, len(todo))
        procs = {}

        def start(i):
            procs[i] = ctx.Process(target=_serve, daemon=True,
                                   args=(i, str(self.root), os.getpid(), tasks, results, uid_base))
            procs[i].start()

        for s in todo:
            tasks.put((self.assignment, s, str(self.stage / s)))
        for i in range(n):
            start(i)
        outcomes, busy = {}, {}
        bar = _bar(total, total - len(todo), self.progress)
        try:
            with gbk.gradebook(self.db_url, self.course_id) as gb:
                while len(outcomes) < len(todo):
                    try:
                        kind, i, student, res = results.get(timeout=1)
                    except queue.Empty:
                        self._reap(procs, busy, outcomes, start, tasks, bar, todo)
                        continue
                    if kind == "start":
                        busy[i] = student
                        continue
                    busy.pop(i, None)
                    outcomes[student] = self._write(gb, student, res, digests[student])
                    bar.update(1)
                    bar.set_postfix_str(student[-20:])
        finally:
            for _ in procs:
                tasks.put(None)
            for p in procs.values():
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
            bar.close()
        shutil.rmtree(self.stage, ignore_errors=True)
        return outcomes

    def _reap(self, procs, busy, outcomes, start, tasks, bar, todo):
        """A worker that died (OOM killer, a bug) costs its current student, not the run."""
        for i, p in list(procs.items()):
            if not p.is_alive():
                student = busy.pop(i, None)
                if student is not None and student not in outcomes:
                    outcomes[student] = Outcome(student, "error",
                                                f"grading worker died (exit {p.exitcode})")
                    bar.update(1)
                if not tasks.empty():
                    start(i)
        if not any(p.is_alive() for p in procs.values()) and tasks.empty():
            for s in todo:  # taken by a worker that died before it could say so
                if s not in outcomes:
                    outcomes[s] = Outcome(s, "error", "grading worker died")
                    bar.update(1)

    def _write(self, gb, student, res, digest) -> Outcome:
        """The single writer: move the autograded notebooks in, then commit grades + digest."""
        if not res["ok"]:
            return Outcome(student, "error", res["error"])
        result = res["result"]
        src = self.stage / student / "autograded" / student / self.assignment
        dest = self.root / "autograded" / student / self.assignment
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(src, dest)
        gbk.write_result(gb, self.assignment, student, result, digest)
        shutil.rmtree(self.stage / student, ignore_errors=True)
        return Outcome(student, "graded")

    # -- after autograde ---------------------------------------------------------------------
    def _gpu_stage(self, students, digests, outcomes):
        """Hand the gpu_* cells to the gpu_runner, one student at a time, resumably."""
        import importlib.util
        if importlib.util.find_spec("gpu_runner.grade") is None:
            self.log(f"{self.assignment} has gpu_* grade cells but gpu_runner is not importable: "
                     "those cells stay ungraded")
            return
        done = {} if self.force else gbk.recorded(self.db_url, self.course_id, self.assignment, "gpu")
        for s in students:
            if outcomes[s].status == "error" or done.get(s) == digests[s]:
                continue
            proc = subprocess.run([sys.executable, "-m", "gpu_runner.grade", self.assignment,
                                   f"--student={s}", f"--course-root={self.root}",
                                   f"--db-url={self.db_url}"], cwd=self.root, env=_env(),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                outcomes[s] = Outcome(s, "error", "gpu_runner failed: " + proc.stderr[-1500:])
                continue
            with gbk.gradebook(self.db_url, self.course_id) as gb:
                gbk.record_only(gb, self.assignment, s, digests[s], "gpu")
            if outcomes[s].status == "unchanged":
                outcomes[s].status = "graded"

    def _feedback(self, regraded):
        for s in regraded:  # stale feedback goes; generate_feedback (no --force) fills the gaps
            shutil.rmtree(self.root / "feedback" / s / self.assignment, ignore_errors=True)
        self._nbgrader("generate_feedback", self.assignment)
        # the gpu_runner's per-student report and plot, into the feedback it belongs to
        gpu_feedback.attach(self.root, self.assignment)

    def _nbgrader(self, *args):
        proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=self.root,
                              env=_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise GraderError(f"nbgrader {' '.join(args)} failed:\n{proc.stdout[-2000:]}"
                              f"\n{proc.stderr[-3000:]}")

    def _read_scores(self, outcomes):
        from nbgrader.api import MissingEntry
        with gbk.gradebook(self.db_url, self.course_id) as gb:
            for o in outcomes.values():
                try:
                    sub = gb.find_submission(self.assignment, o.student)
                except MissingEntry:
                    continue
                o.scores = {nb.name: {g.name: (g.score, g.max_score) for g in nb.grades}
                            for nb in sub.notebooks}
                o.flagged = sorted(c.name for nb in sub.notebooks for c in nb.comments
                                   if (c.auto_comment or "").startswith(reach.PREFIX))


def _serve(*args):
    from .worker import serve
    serve(*args)


def _uid_base(config):
    if os.geteuid() != 0:
        return None
    from tpsandbox import Sandbox
    # effective_uid: an outer orchestrator (e.g. parallel test workers) may pick the uid range.
    return Sandbox(config=config).effective_uid()


def _check_assignment(db_url, course_id, assignment):
    from nbgrader.api import MissingEntry
    with gbk.gradebook(db_url, course_id) as gb:
        try:
            gb.find_assignment(assignment)
        except MissingEntry:
            raise GraderError(f"assignment {assignment!r} is not in the gradebook: run "
                              f"`nbgrader generate_assignment {assignment}` first") from None


def _env():
    """The grader's environment with this interpreter's bin first (nbgrader calls `alembic`)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


class _NoBar:
    def update(self, n=1): pass
    def set_postfix_str(self, s): pass
    def close(self): pass


def _bar(total, initial, enabled):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="student", desc="autograde",
                file=sys.stderr, dynamic_ncols=True)
