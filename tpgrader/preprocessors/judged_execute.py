"""nbgrader's Execute, with every test cell's verdict decided by the judge.

The notebook runs in its sandboxed kernel as before (SandboxedExecute), so the feedback shows
what the student's cells printed or raised, but with the test cells and the self-check cells
(tpgrade.selfcheck: the student's own preview of the tests, never part of a grade) left out.
Meanwhile (on a thread of its own: it needs nothing from the kernel) the judge (tpjudge) runs
the test cells in THIS process, where no student code runs, against the student's functions in
a fresh sandboxed process of their own, and writes each test cell's outputs: what the
student's code printed during it and the verdict. nbgrader's SaveAutoGrades
scores those outputs as usual (an error or stderr output: no points).

The kernel and the judge share the notebook's grading budget (c.TimeLimits.notebook_cpu_seconds,
tpsim.cputime.Budget): once their student code has used it, nothing more of the notebook
runs, the tests not yet judged fail saying so, and the notebook is marked timed out
(nb.metadata["tpgrader"]["timed_out"]: the gradebook comment, tpgrader.preprocessors.flags);
nb.metadata["tpgrader"]["cpu_seconds"] says how much of the budget the notebook used.

`c.Judge.enabled = False` runs the test cells in the kernel instead (for comparisons only: code
in a solution cell can then reach the checks).
"""
from __future__ import annotations

import copy
import functools
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from tpjudge import notebook, session
from tpjudge.cells import is_self_check, is_test
from tpjudge.errors import StudentGone
from tpjudge.settings import Judge
from tpsandbox import wrap
from tpsim import cputime
from tpsandbox.kernel import course_paths
from tpsandbox.lifetime import tied_child
from tpsandbox.scratch import new_scratch, remove_tree, working_copy

from .sandboxed_execute import SandboxedExecute

PLACEHOLDER = "# (judged by the grader, outside this kernel)"
SELF_CHECK_PLACEHOLDER = "# (a self-check: not run when grading)"


class JudgeUnavailable(RuntimeError):
    """The judge cannot start a student's process here: grade nobody, say why."""


_tried: set = set()   # (sandboxed, uid) combinations whose trial process started
_POOL = [ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")]
# How long the kernel's end waits for the judge beyond the budget's own backstop, seconds.
JUDGE_MARGIN = 60


class JudgedExecute(SandboxedExecute):

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.judge = Judge(parent=self)
        if self.judge.enabled:
            self._trial()

    def preprocess(self, nb, resources=None, km=None):
        held = {i: (cell.source, SELF_CHECK_PLACEHOLDER) for i, cell in enumerate(nb.cells)
                if is_self_check(cell)}
        judging = None
        budget = self.new_budget()
        if self.judge.enabled:
            held.update({i: (cell.source, PLACEHOLDER) for i, cell in enumerate(nb.cells)
                         if is_test(cell)})
            workdir = (resources or {}).get("metadata", {}).get("path") or os.getcwd()
            # The judge needs nothing from the kernel: it runs alongside it, on its own copy.
            judging = _POOL[0].submit(self._judge, copy.deepcopy(nb), workdir, budget)
        for i, (_, placeholder) in held.items():
            nb.cells[i].source = placeholder
        start = time.perf_counter()
        try:
            nb, resources = super().preprocess(nb, resources, km, budget=budget)
        finally:
            for i, (source, _) in held.items():
                nb.cells[i].source = source
            kernel = time.perf_counter() - start
            verdicts, judged = self._verdicts(nb, judging, budget) if judging else ({}, 0.0)
        marks = nb.metadata.setdefault("tpgrader", {})
        marks["cpu_seconds"] = round(budget.cpu_used(), 1)   # of the notebook's budget
        if budget.spent is not None:
            marks["timed_out"] = budget.spent.text
            self.log.warning("%s: the notebook's student code %s", _who(resources),
                             budget.spent.text)
        if judging is None:
            return nb, resources
        for i, outputs in verdicts.items():
            nb.cells[i].outputs = outputs
        self.log.info("kernel %.2f s, judge %.2f s alongside it (%d test cells); the student's "
                      "code used %.1f s of CPU time", kernel, judged, len(verdicts),
                      budget.cpu_used())
        return nb, resources

    def _judge(self, nb, workdir, budget):
        start = time.perf_counter()
        self._students = []
        verdicts = notebook.judge(nb, lambda: self._start(workdir, budget),
                                  rerun=self.judge.rerun_timeouts)
        return verdicts, time.perf_counter() - start

    def verdicts_of(self, nb, workdir: str) -> dict[int, list]:
        """{index of each test cell: its outputs} when `nb` is graded in `workdir` (the
        reference check, tpgrader.reference): the judge's verdicts; with the judge off, what
        the test cells output in the kernel."""
        if self.judge.enabled:
            return self._judge(copy.deepcopy(nb), workdir, self.new_budget())[0]
        nb, _ = self.preprocess(copy.deepcopy(nb), {"metadata": {"path": workdir}})
        return {i: cell.outputs for i, cell in enumerate(nb.cells) if is_test(cell)}

    def _verdicts(self, nb, judging, budget):
        """The judge's verdicts, waiting no longer than the budget's backstop allows. A judge
        that overruns it (stuck in the grader's own process) costs this notebook's tests,
        never the next notebook: its students are killed, a fresh thread judges the next."""
        wait = max(budget.wall_left(), 0) + JUDGE_MARGIN if budget.cpu_seconds else None
        try:
            return judging.result(timeout=wait)
        except FutureTimeout:
            for student in list(getattr(self, "_students", [])):
                student.kill("the judge overran the notebook's grading budget")
            _POOL[0] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
            budget.spent = budget.spent or cputime.Expired(
                "budget", f"was not judged within the notebook's grading budget of "
                f"{budget.wall_seconds:g} s on the clock")
            why = f"not judged: the grading of this notebook {budget.spent.text}"
            return ({i: [notebook.error_output(StudentGone(why))]
                     for i, cell in enumerate(nb.cells) if is_test(cell)}, float(wait))

    def _settings(self) -> Judge:
        settings = Judge(parent=self)
        settings.timeout = self.judge.timeout or int(self.timeout or 30)
        return settings

    def _start(self, workdir: str, budget=None) -> session.Student:
        """The student's process, in the sandbox (when it is on), working in a scratch copy
        of the notebook's folder bound at the folder's own path; its CPU time counts against
        the notebook's `budget`."""
        base, lock = new_scratch(None, self.log)
        held = [lock]

        def cleanup():          # once, whoever gets there first (the student's close, or here)
            while held:
                remove_tree(base)
                os.close(held.pop())
        scratch = working_copy(workdir, base / "w", self.sandbox)
        confine = functools.partial(wrap, workdir=workdir, scratch=str(scratch),
                                    hidden=course_paths(self.config), config=self.config) \
            if self.sandbox.enabled else None
        try:
            student = session.start(workdir, self._settings(), wrap=confine, scratch=scratch,
                                    cleanup=cleanup, preexec=tied_child() if confine else None,
                                    time_limits=self.limits, budget=budget)
            if budget is not None:
                self._students.append(student)
            return student
        except BaseException:
            cleanup()
            raise

    def _trial(self) -> None:
        """Start one student's process before any notebook: if the judge cannot run here,
        refuse now, naming the cause, rather than fail every student."""
        key = (self.sandbox.enabled, self.sandbox.effective_uid())
        if key in _tried:
            return
        with tempfile.TemporaryDirectory(prefix="tpjudge-trial-") as folder:
            try:
                student = self._start(folder)
                student.close()
            except StudentGone as exc:
                raise JudgeUnavailable(f"the judge cannot grade here: {exc}") from None
        _tried.add(key)


def _who(resources) -> str:
    info = (resources or {}).get("nbgrader", {})
    return f"{info.get('student', '?')}/{info.get('assignment', '?')}/{info.get('notebook', '?')}"
