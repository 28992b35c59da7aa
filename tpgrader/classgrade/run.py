"""Grade a whole assignment: parallel sandboxed autograde, one gradebook writer, then the
gpu_runner (when the assignment has gpu_* grade cells), feedback and export. Resumable.
Scale-out (tpgrader/classgrade/shards.py): shards grade into folders of their own, one merge
writes them into the course gradebook."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpconfig import load_config
from tpjudge import reach

from . import gpu_feedback
from . import gradebook as gbk
from . import shards as shd
from .. import reference
from ..preprocessors import flags
from ..preprocessors.judged_execute import JUDGE_MARGIN


class GraderError(RuntimeError):
    """The grader itself failed (as opposed to a student's code failing)."""


@dataclass
class Outcome:
    student: str
    status: str                     # graded | unchanged | error
    error: str = ""
    scores: dict = field(default_factory=dict)   # {notebook: {grade_id: (score, max)}}
    flagged: list = field(default_factory=list)  # solution cells flagged for review (reach)
    changed_tests: list = field(default_factory=list)  # test cells missing or changed (flags)
    timed_out: list = field(default_factory=list)  # notebooks whose grading budget ran out


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
    shard: tuple | None = None      # (I, N): grade students I, I+N, ... into shard_dir only
    shard_dir: Path | None = None

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.workers = self.workers or len(os.sched_getaffinity(0))
        self.config = load_config(str(self.root))
        from nbgrader.coursedir import CourseDirectory
        cd = CourseDirectory(config=self.config)
        self.db_url, self.course_id = cd.db_url, cd.course_id
        # Where grades and notebooks go: the course, or a shard's own folder.
        self.out_url, self.autograded = self.db_url, self.root / "autograded"
        self.stage = self.root / ".grade_class" / self.assignment
        self.logs, self.hide = self.root / ".grade_class", ()
        if self.shard is not None:
            if self.shard_dir is None:
                raise GraderError("a shard needs a folder of its own (--shard-dir DIR)")
            out = shd.ShardDir(Path(self.shard_dir).resolve())
            if out.path == Path("/") or out.path == self.root:
                raise GraderError(f"--shard-dir {out.path}: give a folder of its own")
            self.shard_out = out
            self.out_url, self.autograded, self.stage = out.url, out.autograded, out.stage
            self.logs, self.hide = out.path, (str(out.path),)   # other students' grades
            self.gpu, self.feedback, self.export = "skip", False, False
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
            gbk.hash_tree(h, base)
        return h.hexdigest()

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> list[Outcome]:
        from tpsandbox import Sandbox, problem
        why = problem(Sandbox(config=self.config))
        if why:
            raise GraderError(why)
        _check_assignment(self.db_url, self.course_id, self.assignment)
        students = self.submissions()
        if self.shard is not None:
            students = shd.pick(students, *self.shard)
            shd.prepare(self.shard_out, self.db_url, self.course_id, self.assignment,
                        shd.source_digest(self.root, self.assignment))
        else:
            gbk.ensure_tables(self.db_url, self.course_id)
        digests = {s: self.digest(s) for s in students}
        done = set() if self.force else self._done(digests)
        todo = [s for s in students if s not in done]
        outcomes = {s: Outcome(s, "unchanged") for s in students if s not in todo}
        if todo:
            self._reference_first()
            outcomes.update(self._autograde(todo, digests, len(students)))
        graded = [s for s in todo if outcomes[s].status == "graded"]
        if self.shard is not None and gbk.has_gpu_cells(self.db_url, self.course_id,
                                                        self.assignment):
            self.log(f"{self.assignment}: gpu_* cells are left to gpu_runner (--shard "
                     f"{self.shard[0]}/{self.shard[1]} --no-gradebook, then --load-reports "
                     "after the merge)")
        if self.gpu != "skip" and gbk.has_gpu_cells(self.db_url, self.course_id, self.assignment):
            self._gpu_stage(students, digests, outcomes)
        if self.feedback:
            self._feedback(graded)
        if self.export:
            self._nbgrader("export", f"--to={self.root / 'grades.csv'}")
        self._read_scores(outcomes)
        return [outcomes[s] for s in students]

    def student_budget(self) -> float:
        """Seconds on the clock one student's autograde may take in a worker: the grading
        budget's backstop (c.TimeLimits) for each of its notebooks, and a minute more for
        nbgrader's own work. Past it the worker is stopped: the grader's own process is stuck
        (the notebooks' budgets bound the student's code)."""
        from tpsandbox import TimeLimits
        limits = TimeLimits(config=self.config)
        notebooks = len(list((self.root / "source" / self.assignment).glob("*.ipynb"))) or 1
        budget = limits.notebook_cpu_seconds * limits.wall_factor or 24 * 3600
        return notebooks * (budget + JUDGE_MARGIN) + 60

    def _reference_first(self) -> None:
        """The source's own solutions at full marks here, or nobody is graded (exit 2)."""
        try:
            reference.check(self.config, self.assignment, log=self.log)
        except reference.ReferenceFails as exc:
            raise GraderError(str(exc)) from None

    def _done(self, digests) -> set[str]:
        """The students whose submission, as it is now, is graded already: in the course
        gradebook (a shard only reads it) or in the shard's own."""
        return {s for url in dict.fromkeys([self.db_url, self.out_url])
                for s, digest in gbk.recorded(url, self.course_id, self.assignment).items()
                if digests.get(s) == digest}

    def merge(self, folders) -> list[Outcome]:
        """Write the shards in `folders` into the course gradebook (its one writer): each
        student's newest grade over the shards, unless the course holds one at least as new;
        grade, digest and grading time in one transaction. Then feedback and export."""
        found = [shd.ShardDir(Path(f).resolve()) for f in folders]
        _check_assignment(self.db_url, self.course_id, self.assignment)
        try:
            shd.check(found, self.course_id, self.assignment,
                      shd.source_digest(self.root, self.assignment))
        except ValueError as err:
            raise GraderError(f"nothing merged: {err}") from None
        gbk.ensure_tables(self.db_url, self.course_id)
        current = gbk.records(self.db_url, self.course_id, self.assignment)
        outcomes = {}
        with gbk.gradebook(self.db_url, self.course_id) as gb:
            for student, (shard, digest, at) in sorted(shd.newest(found, self.course_id,
                                                                   self.assignment).items()):
                if student in current and current[student][1] >= at:
                    outcomes[student] = Outcome(student, "unchanged")
                    continue
                dest = self.autograded / student / self.assignment
                try:
                    result = gbk.read_result(shard.url, self.course_id, self.assignment, student)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shd.copy_notebooks(shard.autograded / student / self.assignment, dest)
                except (OSError, ValueError) as err:   # a damaged shard costs its students
                    outcomes[student] = Outcome(student, "error", f"{shard.path}: {err}")
                    continue
                gbk.write_result(gb, self.assignment, student, result, digest, graded_at=at)
                outcomes[student] = Outcome(student, "graded")
        if self.feedback:
            self._feedback([s for s, o in outcomes.items() if o.status == "graded"])
        if self.export:
            self._nbgrader("export", f"--to={self.root / 'grades.csv'}")
        self._read_scores(outcomes)
        return list(outcomes.values())

    def _autograde(self, todo, digests, total) -> dict[str, Outcome]:
        shutil.rmtree(self.stage, ignore_errors=True)  # leftovers of a killed run count for nothing
        self.stage.mkdir(parents=True)
        gbk.make_seed(self.db_url, self.course_id, str(self.stage / "seed.db"))
        ctx = mp.get_context("spawn")
        tasks, results = ctx.Queue(), ctx.Queue()
        uid_base = _uid_base(self.config)
        if uid_base is not None and self.shard is not None:
            # shards sharing a machine: sandbox uids of their own (independent process limits)
            uid_base += 200 + self.shard[0] * self.workers
        n = min(self.workers, len(todo))
        procs = {}

        def start(i):
            procs[i] = ctx.Process(target=_serve, daemon=True,
                                   args=(i, str(self.root), os.getpid(), tasks, results, uid_base,
                                         str(self.logs), self.hide))
            procs[i].start()

        for s in todo:
            tasks.put((self.assignment, s, str(self.stage / s)))
        for i in range(n):
            start(i)
        outcomes, busy = {}, {}
        bar = _bar(total, total - len(todo), self.progress)
        try:
            with gbk.gradebook(self.out_url, self.course_id) as gb:
                while len(outcomes) < len(todo):
                    try:
                        kind, i, student, res = results.get(timeout=1)
                    except queue.Empty:
                        self._reap(procs, busy, outcomes, start, tasks, bar, todo)
                        continue
                    if kind == "start":
                        busy[i] = (student, time.monotonic())
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
        """A worker that died (OOM killer, a bug) costs its current student, not the run; so
        does one still grading a student past the student's budget (the watchdog)."""
        for i, p in list(procs.items()):
            student, since = busy.get(i, (None, 0.0))
            overdue = student is not None and time.monotonic() - since > self.student_budget()
            if overdue and p.is_alive():
                p.kill()             # its kernels and student processes die with it
                p.join(timeout=10)
            if not p.is_alive():
                busy.pop(i, None)
                if student is not None and student not in outcomes:
                    outcomes[student] = Outcome(student, "error", (
                        f"timed out: its grading ran past {self.student_budget():.0f} s on the "
                        "clock (its notebooks' grading budget) and was stopped; not graded")
                        if overdue else f"grading worker died (exit {p.exitcode})",
                        timed_out=["(the whole submission)"] if overdue else [])
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
        dest = self.autograded / student / self.assignment
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
            if proc.returncode == 2:     # the runner cannot grade here (it graded nobody)
                raise GraderError("gpu_runner refused: " + proc.stderr[-1500:])
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
        with gbk.gradebook(self.out_url, self.course_id) as gb:
            for o in outcomes.values():
                try:
                    sub = gb.find_submission(self.assignment, o.student)
                except MissingEntry:
                    continue
                o.scores = {nb.name: {g.name: (g.score, g.max_score) for g in nb.grades}
                            for nb in sub.notebooks}
                comments = [(nb.name, c.name, c.auto_comment or "") for nb in sub.notebooks
                            for c in nb.comments]
                o.flagged = sorted(cell for _, cell, text in comments if reach.PREFIX in text)
                o.changed_tests = sorted(test for _, _, text in comments
                                         for test in flags.CHANGED_TEST.findall(text))
                o.timed_out = sorted({name for name, _, text in comments
                                      if flags.TIMED_OUT in text})


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
