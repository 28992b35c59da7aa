"""Self-check: run, in your own notebook, the checks the grader runs on an exercise.

A self-check cell follows each exercise's tests. In the notebook you receive it reads

    tpgrade.selfcheck.run("row_parallel", {
        "test_row_small": "from assignments.<name> import checks as check; "
                          "check.row_small(row_parallel)",
        ...
    }, hidden=["test_row_matches_dense", ...])

`nbgrader generate_assignment` wrote that list from the instructor's notebook: every test
cell that calls the exercise's functions, the hidden tests included, with the code the grader
runs for it. `run` executes each one in your notebook, as the test cell would, and prints a
short report: how many pass, and each failed check's name with its whole message (the message
your feedback would show). Nothing is graded here and nothing is sent anywhere.

Why it agrees with the grade: the grader runs the same code with the same checks (outside
your notebook, on your functions). A check passes here when it raises nothing and writes
nothing to stderr, exactly the grader's rule.

A course can keep its hidden tests hidden (`c.SelfCheck.hidden_tests = False` in its
nbgrader_config.py); the cell then lists the visible tests only and says how many hidden tests
it did not run.

For authors: the instructor's notebook holds the short form, one code cell (no nbgrader
metadata) after the exercise's test cells, naming the exercise's solution cell:

    tpgrade.selfcheck.run("sol_row_parallel")
"""
from __future__ import annotations

import contextlib
import io
import sys
import textwrap

from ._harness import make_read_only

WIDTH = 79
MAX_MESSAGE = 2000


def run(exercise, checks=None, hidden=(), hidden_not_run=0, namespace=None):
    """Run `checks` ({grade_id: test code}, in the notebook's order) in `namespace` (default:
    the calling notebook's globals) and print a report. `hidden`: the grade_ids among them
    that are hidden tests; `hidden_not_run`: how many hidden tests the course left out."""
    if checks is None:
        print(f"Self-check of {exercise}: `nbgrader generate_assignment` writes its checks "
              f"into the student's notebook; in this (the instructor's) notebook, run the "
              f"test cells above.")
        return
    scope = namespace if namespace is not None else sys._getframe(1).f_globals
    results = {gid: run_check(gid, code, scope) for gid, code in checks.items()}
    print(report(exercise, results, set(hidden), hidden_not_run))


def run_check(name, code, scope) -> str | None:
    """None when the check passes; else what the grader would say about it."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            exec(compile(code, f"<{name}>", "exec"), scope)  # noqa: S102 - the course's test code
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure is the check's verdict
        return f"{type(exc).__name__}: {_text(exc)}"
    if err.getvalue().strip():
        return "wrote to stderr, which fails a test when grading:\n" + err.getvalue().strip()
    return None


def report(exercise, results, hidden, hidden_not_run=0) -> str:
    """The printed report: a head line, each failed check with its message, the passed ones."""
    failed = {gid: why for gid, why in results.items() if why is not None}
    visible = len([g for g in results if g not in hidden])
    ran = f"{_count(visible, 'visible test')}, {_count(len(results) - visible, 'hidden test')}"
    if failed:
        head = f"Self-check of {exercise}: {len(failed)} of {len(results)} checks FAIL ({ran})."
    else:
        passing = "its only check passes" if len(results) == 1 else f"all {len(results)} checks pass"
        head = f"Self-check of {exercise}: {passing} ({ran})."
    lines = _wrap(head, "", "")
    for gid, why in failed.items():
        kind = "hidden test" if gid in hidden else "visible test"
        lines.append(f"  FAILED {gid} ({kind}):")
        for paragraph in why[:MAX_MESSAGE].splitlines() or [""]:
            lines += _wrap(paragraph, "      ", "      ")
    passed = [gid for gid in results if gid not in failed]
    if failed and passed:
        lines += _wrap("passed: " + ", ".join(passed), "  ", "          ")
    if hidden_not_run:
        lines += _wrap(f"NOT RUN: {_count(hidden_not_run, 'hidden test')} of this exercise. "
                       f"This course keeps its hidden tests hidden, so passing here does not "
                       f"mean full marks.", "", "")
    return "\n".join(lines)


def _text(exc) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a __str__ that raises
        return f"<{type(exc).__name__} whose message cannot be read>"


def _count(n, what) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _wrap(text, first, rest) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_long_words=True, break_on_hyphens=False) or [first.rstrip()]


make_read_only(__name__)
