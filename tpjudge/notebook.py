"""Judge a notebook: its test cells run HERE, in the grader's process, and call the student's
functions in the student's process (tpjudge.session), whose given and solution cells run there
in notebook order, as in a kernel.

A test cell is executed as written (its source comes from the gradebook, not from the
student): `from assignments.<name> import checks as check` imports the genuine checks, and a
name the cell does not define itself (`column_parallel`) is looked up in the student's program
and stands for it.
Nested scopes in a test cell (a lambda, a comprehension) do not see the student's names.
"""
from __future__ import annotations

import builtins
import contextlib
import re

from nbformat.v4 import new_output

import assignments

from .cells import grade_id, is_given, is_solution, is_test, without_magics
from .errors import CellTimeout, StudentGone
from .session import StudentObject


class _StudentNames(dict):
    """The test cell's local names; a missing one is the student's (or a built-in)."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def __missing__(self, name):
        kind, value = self.student.lookup(name)
        if kind == "callable":
            return StudentObject(self.student, name)
        if kind == "value":
            return value
        raise KeyError(name)


# `from assignments.<name> import checks as check`, `from assignments.<name>.checks import
# vocab as check`, `import assignments.<name>.checks as check`
_CHECK_IMPORT = re.compile(r"^\s*(?:from\s+(assignments(?:\.\w+)+)\s+import\s+(\w+)"
                           r"|import\s+(assignments(?:\.\w+)+))", re.M)


def check_modules(nb) -> set[str]:
    """The check modules the notebook's test cells import."""
    return {f"{package}.{name}" if package else module for c in nb.cells if is_test(c)
            for package, name, module in _CHECK_IMPORT.findall(c.source)}


def harness_modules(nb) -> list[str]:
    """What to import in the student's process before its code runs: for a torch assignment's
    checks, whose rank functions run there, the check modules the test cells import and the rank
    runner."""
    names = check_modules(nb)
    if not any(getattr(assignments.owner(n), "kind", None) == "torch" for n in names):
        return []       # numpy checks run nothing in the student's process but its functions
    return sorted(names | {"tpsim.ranks", "tpgrade._torch_trusted"})


def judge(nb, start_student, rerun: bool = True) -> dict[int, list]:
    """{index of each test cell: its outputs}. `start_student()` -> a started Student.

    A test cell that timed out on the clock alone (the wall-clock backstop: a busy moment of
    the grader may explain it), or that was never judged because test cells before it timed
    out and the student's process was killed, is judged once more (`rerun`), after the
    others, in a fresh process that runs the program cells again. Not rerun: a cell past its
    CPU-time limit or that computed nothing (neither depends on how busy the machine is: it
    would do the same again), cells lost to a program cell that ended the process (the replay
    would end it again), anything once the notebook's grading budget is used up."""
    tests = {i for i, c in enumerate(nb.cells) if is_test(c)}
    if not tests:
        return {}
    verdicts, again, ended = _walk(nb, start_student, tests)
    if rerun and again and ended != "budget":
        second, _, _ = _walk(nb, start_student, set(again))
        for index, outputs in second.items():
            note = (f"[the grader judged this test again, in a fresh process: the first time, "
                    f"{again[index]}]\n")
            verdicts[index] = [new_output("stream", name="stdout", text=note), *outputs]
    return verdicts


def _walk(nb, start_student, tests):
    """One pass over the notebook: the program cells in order and the test cells in `tests`.
    -> ({index: outputs}, {index: why to judge it again}, how the student's process ended:
    "timeouts", "budget" or None)."""
    student = start_student()
    verdicts, again = {}, {}
    ended_by_program = False       # a program cell ended the process: a replay would too
    try:
        modules = harness_modules(nb)
        if modules:
            with student.cell_limit("start-up"):
                student.preload(modules)
        for index, cell in enumerate(nb.cells):
            if index in tests:
                lost = (student.gone if student.gone_kind == "timeouts"
                        and not ended_by_program else None)
                verdicts[index], error = _judged(student, cell.source,
                                                 grade_id(cell) or f"cell-{index}")
                why = _rerun_reason(error, lost, student)
                if why:
                    again[index] = why
            elif cell.cell_type == "code" and (is_given(cell) or is_solution(cell)):
                running = student.gone is None
                _run_program_cell(student, grade_id(cell) or f"cell-{index}", cell.source)
                ended_by_program = ended_by_program or (running and student.gone is not None)
    finally:
        student.close()
    return verdicts, again, student.gone_kind


def _rerun_reason(error, lost, student) -> str:
    """Why a test cell's verdict may say more about the grader's moment than about the
    student's code ("" when it does not)."""
    if lost:
        return f"it was not judged: {lost}"
    expired = error.expired if isinstance(error, CellTimeout) else (
        student.expired if isinstance(error, StudentGone) and student.gone_kind == "timeouts"
        else None)
    if expired is not None and expired.kind == "wall":
        return f"the student's code {expired.text}"
    return ""


def _run_program_cell(student, name, source) -> None:
    """The kernel shows what a given or solution cell printed or raised; here it only runs."""
    with contextlib.suppress(CellTimeout, StudentGone), student.cell_limit(name):
        student.run_cell(name, without_magics(source))
    student.take_output()


def run_test(student, source, name) -> list:
    """One test cell's outputs: the student's output during it, and the verdict's error."""
    return _judged(student, source, name)[0]


def _judged(student, source, name):
    """(one test cell's outputs, the exception that decided it or None)."""
    names = _StudentNames(student)
    scope = {"__builtins__": builtins, "__name__": "__main__"}
    error = None
    try:
        # What the checks themselves print or warn (nothing, normally) goes to the grader's
        # log, never into the cell: only the student's own stderr fails a test.
        with student.cell_limit(name):
            exec(compile(source, f"<{name}>", "exec"), scope, names)  # noqa: S102 - course code
    except BaseException as exc:  # noqa: BLE001 - every failure is the cell's verdict
        error = exc
    out, err = student.take_output()
    outputs = []
    if out:
        outputs.append(new_output("stream", name="stdout", text=out))
    if err:
        outputs.append(new_output("stream", name="stderr", text=err))
    if error is not None:
        outputs.append(error_output(error))
    return outputs, error


def error_output(exc: BaseException):
    """The verdict first and whole; frames only where the student's own code raised."""
    ename = {StudentGone: "StudentProcessDied", CellTimeout: "CellTimeoutError"}.get(
        type(exc), type(exc).__name__)
    text = str(exc)
    frames = list(getattr(exc, "student_traceback", []) or [])
    lines = ["Traceback (the student's code, most recent call last):\n", *frames] if frames else []
    return new_output("error", ename=ename, evalue=text, traceback=[*lines, f"{ename}: {text}"])
