"""The guards around a class's grading (issue 15), on one tp_linear course (the example) graded once by
`grade_class` (about a minute):
- reference first: the source's own solutions are judged before any student, and short of
  full marks `nbgrader autograde` and `grade_class` refuse (exit 2, naming the cells) with
  nobody graded;
- a notebook's grading budget: a student whose code uses it up is recorded as timed out (the
  tests it did not reach score 0 saying so, a gradebook comment, the class table), and the
  rest of the class is graded; grade_class's watchdog stops a worker stuck past a student's
  budget and goes on;
- test cells deleted or changed in a submission are put back, judged, and flagged (gradebook
  comment, the table's column), so the table's failed count and the feedback's agree.
"""
from __future__ import annotations

import multiprocessing as mp
import re
import subprocess
import sys
import time

import nbformat
import pytest

from tpcourse import REPO
from assignments.tp_linear.examples import students
from tpcourse.submissions import Submission, build
from tpgrader.classgrade import ClassGrader
from tpgrader.classgrade.summary import table
from tpgrader.preprocessors import flags
from tpjudge.cells import grade_id, is_test, meta, read
from tpsandbox import problem

pytestmark = [pytest.mark.nbgrader,
              pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")]

A = "tp_linear"
# 3 s of CPU time per cell and 10 per notebook: a loop is cheap to stop, the reference (under
# 2 s of CPU time in all) is far from either.
CONFIG = ("from tpgrader import configure\nconfigure(c)\nc.Execute.timeout = 3\n"
          "c.TimeLimits.notebook_cpu_seconds = 10\n")
DELETED, CHANGED = "test_column_small", "test_shard_sizes_balanced"   # the tampered student's
# column_parallel and row_parallel loop forever when called: every test of them times out
OVERBUDGET = Submission("overbudget", A, {A: {
    "sol_column_parallel": "def column_parallel(x, W, num_ranks, b=None):\n    while True:\n"
                           "        pass\n",
    "sol_row_parallel": "def row_parallel(x, W, num_ranks, b=None):\n    while True:\n"
                        "        pass\n"}})


def _tampered():
    """local_shard's wrong answer, one of the tests it fails deleted, another test changed."""
    [(name, nb)] = build(students.LOCAL_SHARD).items()
    nb.cells = [c for c in nb.cells if grade_id(c) != DELETED]
    changed = next(c for c in nb.cells if grade_id(c) == CHANGED)
    changed.source, meta(changed)["points"] = "pass  # my own test", 5
    return {name: nb}


@pytest.fixture(scope="module")
def graded(make_course):
    course = make_course("guards", [A], extra_config=CONFIG)
    course.generate(A)
    course.place_submission("reference", A, build(Submission("reference", A)))
    course.place_submission("tampered", A, _tampered())
    course.place_submission(OVERBUDGET.student, A, build(OVERBUDGET))
    outcomes = {o.student: o for o in ClassGrader(course.root, A, progress=False).run()}
    return course, outcomes


def _lost(course, student):
    [(_, grades)] = course.scores(A, student).items()
    return {g for g, (score, top) in grades.items() if score < top}


def _comments(course, student):
    from nbgrader.api import Gradebook
    with Gradebook(course.db_url) as gb:
        sub = gb.find_submission(A, student)
        return {c.name: c.auto_comment or "" for nb in sub.notebooks for c in nb.comments}


# -- test cells deleted or changed -------------------------------------------------------------
def test_a_deleted_test_is_judged_and_a_changed_one_restored_and_both_flagged(graded):
    course, outcomes = graded
    assert _lost(course, "tampered") == set(students.LOCAL_SHARD.loses)      # DELETED among them
    said = "\n".join(_comments(course, "tampered").values())
    assert f"{DELETED} was missing" in said and f"{CHANGED} was changed" in said
    assert outcomes["tampered"].changed_tests == sorted([DELETED, CHANGED])
    assert not outcomes["reference"].changed_tests


def test_the_tables_failed_count_is_the_feedbacks(graded):
    course, outcomes = graded
    html = "".join(course.feedback_html(A, "tampered").values())
    lost, checks = map(int, re.search(r"What to fix: (\d+) of (\d+) checks", html).groups())
    row = next(line for line in table(list(outcomes.values())).splitlines()
               if line.startswith("tampered "))
    [(_, grades)] = course.scores(A, "tampered").items()
    score, top = (sum(g[i] for g in grades.values()) for i in (0, 1))
    assert row.split()[1:6] == ["graded", f"{score:g}", "/", f"{top:g}", str(lost)], row
    source = read(course.root / "source" / A / f"{A}.ipynb")
    assert lost == len(students.LOCAL_SHARD.loses) and checks == sum(map(is_test, source.cells))
    assert "2 cells" in row and f"{DELETED}" in html      # put back: in the feedback too


# -- the notebook's grading budget -------------------------------------------------------------
def test_a_student_past_the_notebook_budget_is_recorded_as_timed_out(graded):
    course, outcomes = graded
    o = outcomes[OVERBUDGET.student]
    assert o.status == "graded" and o.timed_out == [A]
    [(_, grades)] = course.scores(A, OVERBUDGET.student).items()
    assert {g for g in grades if g.startswith(("test_column", "test_row"))} <= \
        _lost(course, OVERBUDGET.student)
    nb = read(course.root / "autograded" / OVERBUDGET.student / A / f"{A}.ipynb")
    assert "grading budget of 10 s of CPU time" in nb.metadata["tpgrader"]["timed_out"]
    said = [o.evalue for c in nb.cells if is_test(c) for o in c.outputs
            if o.output_type == "error"]
    assert any("grading budget" in text for text in said)     # the tests it did not reach
    assert flags.TIMED_OUT in "\n".join(_comments(course, OVERBUDGET.student).values())
    row = next(line for line in table(list(outcomes.values())).splitlines()
               if line.startswith(f"{OVERBUDGET.student} "))
    assert row.split()[1:3] == ["timed", "out"] and "grading budget used up" in row
    # the rest of the class: graded as usual
    assert _lost(course, "reference") == set() and outcomes["reference"].status == "graded"


def _stuck():
    time.sleep(600)


def test_the_class_watchdog_stops_a_worker_stuck_past_a_students_budget(graded, monkeypatch):
    course, _ = graded
    grader = ClassGrader(course.root, A, progress=False)
    monkeypatch.setattr(grader, "student_budget", lambda: 0.5)
    worker = mp.get_context("spawn").Process(target=_stuck, daemon=True)
    worker.start()
    restarted, outcomes = [], {}
    tasks = mp.get_context("spawn").Queue()
    tasks.put("someone else")
    grader._reap({0: worker}, {0: ("stuck", time.monotonic() - 1)}, outcomes, restarted.append,
                 tasks, _NoBar(), ["stuck"])
    assert not worker.is_alive() and restarted == [0]
    assert outcomes["stuck"].status == "error" and "timed out" in outcomes["stuck"].error
    assert "timed out" in table(list(outcomes.values()))


class _NoBar:
    def update(self, n=1):
        pass


# -- the reference first -----------------------------------------------------------------------
def test_a_reference_short_of_full_marks_refuses_before_any_student(graded):
    course, _ = graded
    path = course.root / "source" / A / f"{A}.ipynb"
    original = path.read_text()
    nb = nbformat.reads(original, as_version=4)
    cell = next(c for c in nb.cells if grade_id(c) == "test_row_small")
    cell.source += "\nassert False, 'out of step with the notebook'\n"
    before = {s: course.scores(A, s) for s in ("reference", "tampered")}
    stamp = (course.root / "autograded" / "reference" / A / f"{A}.ipynb").stat().st_mtime_ns
    try:
        path.write_text(nbformat.writes(nb))
        stock = course.nbgrader("autograde", A, "--force", check=False)
        assert stock.returncode == 2, stock.stderr[-2000:]
        assert "tp_linear:test_row_small" in stock.stderr and "nothing graded" in stock.stderr
        ours = subprocess.run([sys.executable, "-m", "tpcourse.grade_class", A, "--force",
                               "--no-progress", f"--root={course.root}"], cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert ours.returncode == 2 and "tp_linear:test_row_small" in ours.stderr
    finally:
        path.write_text(original)
    assert {s: course.scores(A, s) for s in before} == before
    assert (course.root / "autograded" / "reference" / A / f"{A}.ipynb").stat().st_mtime_ns \
        == stamp
