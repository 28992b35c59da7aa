"""A busy grader never costs a correct student a point (issue 15) -- SLOW, and run only when
asked: `make test-load` (TPCOURSE_LOAD_TEST=1). About 9 minutes on 2 cores, most of it with
the cores loaded 3 busy processes deep: inside `make test` it would slow every other test of
the run as much (the cheap checks of the same limits under load: test_time_limits.py).

The source's own solutions of all seven assignments are graded by `python -m
tpcourse.grade_class` (the judged notebook cells, and the gpu_* cells on gloo ranks) while
3 busy processes per core compete with the grader at its own nice level: every cell keeps full
marks. In the same run a student whose solution cell loops forever is stopped by its cell's
limit, inside its notebook's grading budget, and loses only that cell's tests.

To keep it short: one loaded stretch for everything. The seven courses (grade_class grades
one assignment per run, and runs side by side need gradebooks of their own) are set up before
the load starts; then the seven runs go side by side (workers=1, no feedback or export, each
with sandbox uids of its own, as shards on one machine have), which also makes the grader
itself busy. The gpu_runner grades world sizes 1 and 2 without the
ungraded timing units. Small limits in the courses' config (8 s of CPU time per cell, 60 per
notebook) bound the looping student.

Out of scope here (later work): a gpu_timing cell, whose agreement check
compares timings, is reported but not asserted.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from conftest import busy_machine
from gpu_runner.grade import FLAGS_ENV
from tpcourse import REPO
import assignments
from tpcourse.catalogue import is_looping, students
from tpcourse.submissions import Submission, build
from tpjudge.cells import read
from tpsandbox import UID_ENV, Sandbox, problem

LOAD_ENV = "TPCOURSE_LOAD_TEST"
pytestmark = [pytest.mark.nbgrader,
              pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available"),
              pytest.mark.skipif(os.environ.get(LOAD_ENV) != "1",
                                 reason=f"the load test runs when asked: {LOAD_ENV}=1 "
                                        "(make test-load)")]

ASSIGNMENTS = tuple(assignments.names())
BUSY_PER_CORE = 3
CELL_CPU, NOTEBOOK_CPU = 8, 60
CONFIG = (f"c.Execute.timeout = {CELL_CPU}\n"
          f"c.TimeLimits.notebook_cpu_seconds = {NOTEBOOK_CPU}\n"
          "c.GpuRunner.world_sizes = [1, 2]\n")
# a catalogued student whose solution cell loops forever (`while True: pass`)
LOOPING = next(s for a in ASSIGNMENTS for s in students(a) if is_looping(s))
# gpu_* cells whose agreement compares timings: under load, later work
NOT_ASSERTED = {(a, "gpu_timing") for a in ASSIGNMENTS}


def _grade(course, assignment):
    uids = Sandbox().effective_uid() + 500 + 10 * ASSIGNMENTS.index(assignment)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tpcourse.grade_class", assignment,
                           f"--root={course.root}", "--workers=1", "--no-progress",
                           "--no-feedback", "--no-export"], cwd=REPO, capture_output=True,
                          text=True, timeout=1800,
                          env={**course.env(), FLAGS_ENV: "--no-timing", UID_ENV: str(uids)})
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def graded(make_course):
    courses = {}
    for a in ASSIGNMENTS:
        course = make_course(f"load_{a}", [a], extra_config=CONFIG)
        course.generate(a)
        course.place_submission("reference", a, build(Submission("reference", a)))
        courses[a] = course
    courses[LOOPING.assignment].place_submission(LOOPING.student, LOOPING.assignment,
                                                 build(LOOPING))
    with busy_machine(BUSY_PER_CORE) as busy:
        start = time.monotonic()
        with ThreadPoolExecutor(len(ASSIGNMENTS)) as pool:
            runs = dict(zip(ASSIGNMENTS, pool.map(lambda a: _grade(courses[a], a), ASSIGNMENTS)))
        wall = time.monotonic() - start
        hogs = sum(psutil.Process(p.pid).cpu_times().user for p in busy)
    cores = len(os.sched_getaffinity(0))
    print(f"\nload test: {wall:.0f} s for the seven runs side by side, "
          f"{len(busy)} busy processes on {cores} cores had {hogs / (wall * cores):.0%} of "
          f"the CPU; per run: " + ", ".join(f"{a} {s:.0f} s" for a, (_, s) in runs.items()))
    return courses, runs, wall, hogs / (wall * cores)


def test_the_machine_was_really_busy(graded):
    _, _, _, share = graded
    assert share > 0.4, f"the busy processes had only {share:.0%} of the CPU"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_the_reference_keeps_every_point_on_a_busy_grader(graded, assignment):
    courses, runs, _, _ = graded
    proc, _ = runs[assignment]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [(_, grades)] = courses[assignment].scores(assignment, "reference").items()
    lost = {g: s for g, s in grades.items() if s[0] < s[1]}
    if (assignment, "gpu_timing") in NOT_ASSERTED and "gpu_timing" in lost:
        print(f"\n{assignment}: gpu_timing lost under load (not asserted here): "
              f"{lost.pop('gpu_timing')}")
    assert not lost, lost
    assert any(g.startswith("gpu_") for g in grades) == assignments.get(assignment).has_gpu


def test_a_student_that_loops_forever_is_stopped_within_its_budget(graded):
    courses, runs, _, _ = graded
    a = LOOPING.assignment
    course = courses[a]
    [(name, grades)] = course.scores(a, LOOPING.student).items()
    assert {g for g, (score, top) in grades.items() if score < top} == set(LOOPING.loses)
    nb = read(course.root / "autograded" / LOOPING.student / a / f"{name}.ipynb")
    loop = next(c for c in nb.cells if "while True" in c.source)
    [timeout] = [o for o in loop.outputs if o.get("ename") == "CellTimeoutError"]
    assert "interrupted" in timeout.evalue
    used = nb.metadata["tpgrader"]["cpu_seconds"]
    assert used <= NOTEBOOK_CPU and "timed_out" not in nb.metadata["tpgrader"]
    assert f"{LOOPING.student} " in runs[a][0].stdout   # in the run's table
