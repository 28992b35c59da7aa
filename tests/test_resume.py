"""Kill the class grader with SIGKILL in the middle of a run, start it again: it grades only
what is missing, never double-counts, never loses a grade, and leaves no process behind
(issue 4)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from tpcourse.examples import numpy_students as N
from tpcourse.sandbox import problem
from tpcourse.submissions import build

pytestmark = [pytest.mark.nbgrader,
              pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")]

A = "tp_linear"
CONFIG = "from tpcourse.sandbox import configure\nconfigure(c)\nc.Execute.timeout = 15\n"
CLASS = [s for s in N.ALL if s.assignment == A and s.student in
         ("reference", "local_shard", "np_split", "bias_every_rank", "alt_einsum", "dense_as_all_gather")]


def _recorded(course) -> dict:
    engine = create_engine(course.db_url)
    try:
        with engine.connect() as con:
            if "tpcourse_graded" not in [r[0] for r in con.execute(
                    text("SELECT name FROM sqlite_master WHERE type='table'"))]:
                return {}
            return dict(con.execute(text("SELECT student, graded_at FROM tpcourse_graded "
                                         "WHERE stage = 'autograde'")).all())
    finally:
        engine.dispose()


def _leftovers(root) -> list[str]:
    """Processes still working for this course: workers (cwd in it) or sandboxed kernels."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            uid = os.stat(f"/proc/{pid}").st_uid
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # workers run in the course root; bwrap (outside and as the namespace's init) names
        # the course root among the paths it hides, and the kernel dies with that init
        if int(pid) != os.getpid() and (cwd.startswith(str(root)) or str(root) in cmd):
            left.append(f"{pid} uid={uid} {cmd[:100]}")
    return left


def _start(course):
    return subprocess.Popen([sys.executable, "-m", "tpcourse.grade_class", A, "--no-progress",
                             f"--root={course.root}", "--workers=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_run_then_resume(make_course):
    course = make_course("resume", assignments=[A], extra_config=CONFIG)
    course.generate(A)
    for sub in CLASS:
        course.place_submission(sub.student, A, build(sub))

    proc = _start(course)
    deadline = time.time() + 600
    while len(_recorded(course)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)   # the grader only: its workers and kernels must follow
    proc.wait()
    before = _recorded(course)
    assert 2 <= len(before) < len(CLASS), "kill the grader while it still has work to do"
    scores_before = {s: course.scores(A, s) for s in before}

    deadline = time.time() + 15
    while _leftovers(course.root) and time.time() < deadline:
        time.sleep(0.2)
    assert _leftovers(course.root) == []

    proc = _start(course)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    after = _recorded(course)
    assert set(after) == {s.student for s in CLASS}
    for student in before:  # graded before the kill: kept as they were, not graded again
        assert after[student] == before[student]
        assert course.scores(A, student) == scores_before[student]
        assert any(ln.startswith(student + " ") and " unchanged " in ln for ln in out.splitlines())
    for sub in CLASS:      # and every grade is right
        [(_, grades)] = course.scores(A, sub.student).items()
        assert {g for g, (score, top) in grades.items() if score < top} == set(sub.loses)

    from nbgrader.api import Gradebook
    with Gradebook(course.db_url) as gb:   # one submission each, one grade row per test cell
        assignment = gb.find_assignment(A)
        cells = sum(len(nb.grade_cells) for nb in assignment.notebooks)
        assert len(assignment.submissions) == len(CLASS)
        rows = gb.db.execute(text("SELECT count(*) FROM grade")).scalar()
        assert rows == cells * len(CLASS)
    assert (course.root / "grades.csv").read_text().count("\n") == len(CLASS) + 1
