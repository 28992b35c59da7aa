"""Kill the class grader with SIGKILL in the middle of a run, start it again: it grades only
what is missing, never double-counts, never loses a grade, and leaves no process behind
(issue 4)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tpgrader.classgrade import ClassGrader
from tpsandbox import problem
from tpcourse.submissions import build

pytestmark = [pytest.mark.nbgrader,
              pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")]

import assignments
from tpcourse.catalogue import examples, students

# Exercised on the assignment whose examples hold the hostile students (their HOSTILE).
A = next(a for a in assignments.names() if getattr(examples(a), "HOSTILE", ()))
CONFIG = "from tpgrader import configure\nconfigure(c)\nc.Execute.timeout = 15\n"
CLASS = [s for s in students(A) if s.student in
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



def _resume_after_kill(course) -> str:
    """Once the killed grader's workers and kernels are gone, run it again; its output."""
    deadline = time.time() + 15
    while _leftovers(course.root) and time.time() < deadline:
        time.sleep(0.2)
    assert _leftovers(course.root) == []
    proc = _start(course)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out

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

    out = _resume_after_kill(course)
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


# -- SIGKILL inside the single writer's commit ---------------------------------------------

COMMIT_CLASS = [s for s in students(A) if s.student in
                ("reference", "local_shard", "np_split", "alt_einsum")]
STAMP = "2026-11-20 10:00:00.000000 UTC"


def _fill(course, subs):
    course.generate(A)
    for sub in subs:
        course.place_submission(sub.student, A, build(sub), timestamp=STAMP)


def _rows(course) -> dict:
    engine = create_engine(course.db_url)
    try:
        with engine.connect() as con:
            q = lambda sql: con.execute(text(sql)).all()  # noqa: E731
            return {"graded": q("SELECT student, count(*) FROM tpcourse_graded "
                                "WHERE stage = 'autograde' GROUP BY student"),
                    "submissions": q("SELECT student_id, count(*) FROM submitted_assignment "
                                     "GROUP BY student_id"),
                    "grades": q("SELECT count(*) FROM grade")[0][0]}
    finally:
        engine.dispose()


def _csv_rows(course):
    return sorted((course.root / "grades.csv").read_text().splitlines())


def test_sigkill_inside_the_writers_commit_then_resume(make_course, tmp_path):
    """The writer dies after flushing one student's grades and digest, before committing
    them (fault injected by TPCOURSE_TEST_KILL_IN_COMMIT): sqlite rolls the transaction back,
    the next run grades that student again, and the end state is a clean run's."""
    from tpgrader.classgrade.gradebook import KILL_IN_COMMIT_ENV
    course = make_course("commit_kill", assignments=[A], extra_config=CONFIG)
    _fill(course, COMMIT_CLASS)
    clean = course.copy(tmp_path / "clean")   # graded in one go, at the end

    env = dict(os.environ, **{KILL_IN_COMMIT_ENV: "3"})
    proc = subprocess.run([sys.executable, "-m", "tpcourse.grade_class", A, "--no-progress",
                           f"--root={course.root}", "--workers=2"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    # died inside a write transaction: sqlite's rollback journal is still there
    assert list(course.root.glob("gradebook.db-journal")), "the kill came outside a transaction"
    moved = {p.name for p in (course.root / "autograded").iterdir()}
    before = _recorded(course)  # opening the gradebook rolls the dead transaction back
    assert len(before) == 2, before
    [killed] = moved - set(before)  # its notebook was moved in, its grades never committed
    rows = _rows(course)
    assert sorted(s for s, _ in rows["submissions"]) == sorted(before)
    out = _resume_after_kill(course)
    assert "2 graded, 2 unchanged" in out, out[-2000:]
    assert any(ln.startswith(killed + " ") and " graded " in ln for ln in out.splitlines())
    after = _recorded(course)
    assert set(after) == {s.student for s in COMMIT_CLASS}
    assert all(after[s] == before[s] for s in before)  # not graded a second time

    outcomes = ClassGrader(clean.root, A, workers=2, progress=False).run()
    assert [o.status for o in outcomes] == ["graded"] * len(COMMIT_CLASS)
    students = [s.student for s in COMMIT_CLASS]
    assert {s: course.scores(A, s) for s in students} == {s: clean.scores(A, s) for s in students}
    assert _csv_rows(course) == _csv_rows(clean)
    rows, clean_rows = _rows(course), _rows(clean)
    assert rows == clean_rows
    assert sorted(rows["graded"]) == sorted((s, 1) for s in students)       # recorded once each
    assert sorted(rows["submissions"]) == sorted((s, 1) for s in students)  # one submission each


# -- sandbox folders left by a SIGKILLed grader ---------------------------------------------

SANDBOX_CONFIG = "from tpgrader import configure\nconfigure(c)\nc.Execute.timeout = 120\n"

# A grader of its own: one sandboxed kernel, held until a line arrives on stdin, then used
# (proving its folder, with the kernel's sockets, is intact) and shut down.
_HOLD = r'''
import asyncio, sys
from tpsandbox.kernel import SandboxKernelManager

async def main():
    km = SandboxKernelManager(kernel_name="python3", sandbox_dir=sys.argv[1])
    await km.start_kernel(cwd=sys.argv[2])
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=120)
    print(km._base, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    def show(msg):
        if msg["msg_type"] == "stream":
            print(msg["content"]["text"].strip(), flush=True)
    await kc.execute_interactive("print(6 * 7)", timeout=60, output_hook=show)
    kc.stop_channels()
    await km.shutdown_kernel(now=True)

asyncio.run(main())
'''


def _toy(code: str):
    import nbformat.v4 as v4
    sol = {"nbgrader": {"grade": False, "solution": True, "locked": False,
                        "grade_id": "sol_double", "schema_version": 3}}
    test = {"nbgrader": {"grade": True, "solution": False, "locked": True, "points": 1,
                         "grade_id": "test_double", "schema_version": 3}}
    nb = v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                  "display_name": "Python 3"}})
    nb.cells = [v4.new_code_cell(code, metadata=sol),
                v4.new_code_cell("assert double(2) == 4", metadata=test)]
    return nb


def _marked(sbx) -> set:
    from tpsandbox.kernel import LOCK_MARK
    return {p for p in sbx.glob("tpsb-*") if (p / LOCK_MARK).exists()}


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkilled_graders_sandbox_folders_are_swept_live_ones_kept(make_course, tmp_path):
    """Each kernel's socket/scratch folder (tpsb-*) is locked by its live grader. After a
    stock `nbgrader autograde` is SIGKILLed mid-notebook, the next grader's first kernel
    removes its folder, and keeps the folder of a grader still running beside it, unmarked
    folders (older graders') and other users' folders."""
    import nbformat
    from tpsandbox.kernel import LOCK_MARK
    sbx = tmp_path / "sbx"
    sbx.mkdir()
    course = make_course("stale_dirs", assignments=[], extra_config=SANDBOX_CONFIG +
                         f"c.SandboxKernelManager.sandbox_dir = {str(sbx)!r}\n")
    (course.root / "source" / "toy").mkdir(parents=True)
    nbformat.write(_toy("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n"
                        "    ### END SOLUTION"), str(course.root / "source" / "toy" / "toy.ipynb"))
    course.generate("toy")
    course.place_submission("sleeper", "toy", {"toy.ipynb": _toy(
        "import time\ntime.sleep(100)\ndef double(x):\n    return 2 * x")})
    course.place_submission("good", "toy", {"toy.ipynb": _toy("def double(x):\n    return x + x")})
    legacy = sbx / "tpsb-legacy"                 # no lock mark: never judged
    legacy.mkdir()
    foreign = sbx / "tpsb-foreign"               # another user's: not ours to remove
    foreign.mkdir()
    (foreign / LOCK_MARK).touch()
    os.chown(foreign, 65533, 65533)
    work = tmp_path / "work"
    work.mkdir()

    live = subprocess.Popen([sys.executable, "-c", _HOLD, str(sbx), str(work)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live_dir = Path(live.stdout.readline().strip())
        assert live_dir.parent == sbx and (live_dir / "c" / "kernel.json").exists()

        from tpcourse.cycle import _clean_env
        killed = subprocess.Popen([sys.executable, "-m", "nbgrader", "autograde", "toy",
                                   "--force", "--student=sleeper"], cwd=course.root,
                                  env=_clean_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        stale = _wait_for(lambda: {p for p in _marked(sbx) - {live_dir, foreign}
                                   if (p / "c" / "kernel.json").exists()}, 300,
                          "the killed grader's kernel")
        [stale_dir] = stale
        time.sleep(1)   # the sleeper's cell is running
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        _wait_for(lambda: not any(str(stale_dir) in cmd for cmd in _cmdlines()), 15,
                  "the killed grader's kernel to die with it")
        assert stale_dir.exists() and (stale_dir / LOCK_MARK).exists()

        course.autograde("toy", "good")     # a later run: its first kernel sweeps
        assert course.scores("toy", "good") == {"toy": {"test_double": (1.0, 1.0)}}
        assert set(sbx.iterdir()) == {live_dir, legacy, foreign}
        assert (live_dir / "c" / "kernel.json").exists()

        out, _ = live.communicate("go\n", timeout=120)   # the live grader still works
        assert live.returncode == 0 and out.split() == ["42"], out
    finally:
        if live.poll() is None:
            live.kill()
    assert set(sbx.iterdir()) == {legacy, foreign}


def _cmdlines() -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return out
