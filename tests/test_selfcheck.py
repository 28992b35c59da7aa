"""The self-check cells: what the release lists, what they report, that they agree with the
grade, and that a course can keep its hidden tests hidden. In-process and fast; the browser
test (test_browser.py) runs one in JupyterLab, test_course_cycle shows grading never runs them.
"""
from __future__ import annotations

import copy
import io
import types
from contextlib import redirect_stdout

import pytest

import assignments
from tpcourse import REPO
from tpcourse.catalogue import is_looping, students
from tpcourse.release import source_assignments
from tpcourse.submissions import build
from tpgrade import offline, selfcheck
from tpgrader.preprocessors.self_check import SelfCheck, SelfCheckError, _code
from tpjudge import local
from tpjudge.cells import grade_id, is_self_check, is_test, read

ASSIGNMENTS = source_assignments()
NUMPY_NAMES = [a.name for a in assignments.discover() if a.kind == "numpy"]
NUMPY = [s for a in NUMPY_NAMES for s in students(a) if not is_looping(s)]


def _notebook(folder, assignment):
    return read(REPO / folder / assignment / f"{assignment}.ipynb")


def _calls(nb) -> list[dict]:
    """The arguments of every self-check cell's tpgrade.selfcheck.run(...) call."""
    found = []

    def run(exercise, checks=None, hidden=(), hidden_not_run=0):
        found.append({"exercise": exercise, "checks": checks, "hidden": list(hidden),
                      "hidden_not_run": hidden_not_run})
    fake = types.SimpleNamespace(selfcheck=types.SimpleNamespace(run=run))
    for cell in nb.cells:
        if is_self_check(cell):
            exec(cell.source, {"tpgrade": fake})  # noqa: S102 - the release's own cell
    return found


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_the_release_lets_a_student_run_every_check_the_grader_runs(assignment):
    source, release = _notebook("source", assignment), _notebook("release", assignment)
    tests = {grade_id(c): c for c in source.cells if is_test(c)}
    calls = _calls(release)
    assert calls, f"{assignment}: no self-check cell in the release"
    listed = {gid: code for call in calls for gid, code in call["checks"].items()}
    assert set(listed) == set(tests), "a graded test no self-check runs, or one that is no test"
    for gid, code in listed.items():           # the code the grader runs, hidden parts included
        assert code == _code(tests[gid].source), gid
    hidden = {gid for gid, c in tests.items() if "BEGIN HIDDEN TESTS" in c.source}
    assert {g for call in calls for g in call["hidden"]} == hidden
    assert all(call["hidden_not_run"] == 0 for call in calls)


def test_a_course_can_keep_its_hidden_tests_hidden():
    source = _notebook("source", NUMPY_NAMES[0])
    hidden = [c for c in source.cells if is_test(c) and "BEGIN HIDDEN TESTS" in c.source]
    assert hidden
    nb, _ = SelfCheck(hidden_tests=False).preprocess(copy.deepcopy(source), {})
    cells = [c for c in nb.cells if is_self_check(c)]
    text = "\n".join(c.source for c in cells)
    for cell in hidden:                        # no hidden check is named, let alone run
        assert _code(cell.source).split("; ")[-1] not in text, grade_id(cell)
    assert all("NOT run here" in c.source.replace("\n# ", " ") for c in cells
               if "hidden_not_run" in c.source)
    calls = _calls(nb)
    assert sum(call["hidden_not_run"] for call in calls) == len(hidden)
    assert not any(call["hidden"] for call in calls)
    assert set().union(*(call["checks"] for call in calls)) == {
        grade_id(c) for c in source.cells if is_test(c)} - {grade_id(c) for c in hidden}


def test_an_unknown_exercise_is_refused_at_release_time():
    nb = copy.deepcopy(_notebook("source", NUMPY_NAMES[0]))
    cell = next(c for c in nb.cells if is_self_check(c))
    cell.source = 'tpgrade.selfcheck.run("sol_no_such_cell")'
    with pytest.raises(SelfCheckError, match="sol_no_such_cell"):
        SelfCheck().preprocess(nb, {})


@pytest.mark.parametrize("sub", NUMPY, ids=lambda s: f"{s.assignment}-{s.student}")
def test_the_self_check_says_what_the_grader_says(sub):
    """Each catalogue student's self-checks fail exactly the tests the grader fails (the
    verdicts of the test cells run in one process, which test_judge_catalogue shows are the
    judge's), with the same messages."""
    source = _notebook("source", sub.assignment)
    graded = offline.run(local.with_answers(source, sub.answers.get(sub.assignment, {}),
                                            release=sub.assignment in sub.unanswered)).failed
    [(_, notebook)] = build(sub).items()          # the release, as this student filled it in
    student = offline.run(notebook).namespace
    said = {}
    for call in _calls(notebook):
        for gid, code in call["checks"].items():
            said[gid] = selfcheck.run_check(gid, code, student)
    failed = {gid: why for gid, why in said.items() if why is not None}
    assert set(failed) == set(graded), sub.why
    for gid, why in failed.items():
        if not why.startswith("wrote to stderr"):
            assert why == graded[gid]


def test_the_report_names_each_failed_check_with_its_whole_message():
    out = io.StringIO()
    scope = {}
    checks = {"test_ok": "x = 1", "test_bad": "raise ValueError('the bias was added ' * 12)",
              "test_noisy": "import sys; sys.stderr.write('a warning')"}
    with redirect_stdout(out):
        selfcheck.run("f", checks, hidden=["test_bad"], namespace=scope)
    text = out.getvalue()
    assert text.splitlines()[0].startswith("Self-check of f: 2 of 3 checks FAIL")
    assert "FAILED test_bad (hidden test):" in text and "FAILED test_noisy (visible test):" in text
    assert " ".join(text.split()).count("the bias was added") == 12      # whole, wrapped
    assert max(len(line) for line in text.splitlines()) <= selfcheck.WIDTH
    assert scope["x"] == 1                      # ran in the notebook's namespace


def test_the_report_says_plainly_that_hidden_tests_were_not_run():
    text = selfcheck.report("f", {"test_ok": None}, set(), hidden_not_run=4)
    assert "its only check passes" in text
    assert "NOT RUN: 4 hidden tests" in " ".join(text.split())
