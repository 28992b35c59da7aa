"""Limits on student code count the CPU time it uses, not how busy the machine is (issue 15):
tpsim.cputime, and each place that limits student code with it: the judge's cells (and
their rerun), the kernel's cells, the notebook's grading budget, run_on_ranks, and the
gpu_runner's per-unit watchdog. The busy machine is 3 processes per core that compute forever
at the tests' own nice level (conftest.busy_machine). Fast: a few seconds each, no nbgrader
command (the whole pipeline under load: test_load.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nbformat.v4 import new_code_cell, new_notebook

from conftest import busy_machine
from tpcourse import REPO
from tpjudge import local, session
from tpjudge.errors import CellTimeout, StudentGone
from tpjudge.settings import Judge
from tpsandbox import TimeLimits, problem
from tpsim import cputime

pytestmark = pytest.mark.slow     # busy machines and real limits

# One CPU-second of work, however long it takes on the clock.
WORK = ("import time\n_t = time.process_time()\n"
        "while time.process_time() - _t < {seconds}:\n    pass\n")
SLEEP = "import time\ntime.sleep(10**6)\n"
# Waiting that Python code can be interrupted in (a judge's interrupt reaches Python code; a
# process blocked in C, as in one long sleep, is killed after the grace instead).
POLL = "import time\nwhile True:\n    time.sleep(0.05)\n"
LOOP = "while True:\n    pass\n"


def _child(code):
    return subprocess.Popen([sys.executable, "-c", code])


def _first_expiry(limit, proc, give_up=60):
    """What `limit` says first about `proc` (None: the process finished first)."""
    limit.waiting()
    end = time.monotonic() + give_up
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(limit.interval())
        why = limit.check()
        if why is not None:
            return why
    return None


# -- the clock --------------------------------------------------------------------------------
def test_a_process_tree_counts_its_children_and_what_they_reaped():
    parent = _child("import subprocess, sys, time\n"
                    f"subprocess.run([sys.executable, '-c', {WORK.format(seconds=0.5)!r}])\n"
                    "time.sleep(30)\n")
    try:
        deadline = time.monotonic() + 30
        while (cputime.tree_seconds(parent.pid) or 0) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cputime.tree_seconds(parent.pid) >= 0.5     # the child's, reaped by the parent
    finally:
        parent.kill()
        parent.wait()
    assert cputime.tree_seconds(parent.pid) is None


def test_a_loop_runs_out_of_cpu_time_a_wait_stalls_and_the_wall_is_the_backstop():
    cases = {"cpu": (LOOP, {}), "stall": (SLEEP, {"stall": 1.0}),
             "wall": ("import time\nwhile True:\n    time.sleep(0.001)\n",
                      {"stall": 0, "wall_factor": 2.0})}
    for kind, (code, options) in cases.items():
        proc = _child(code)
        try:
            why = _first_expiry(cputime.Limit(cputime.Meter(proc.pid), 1.0, **options), proc)
        finally:
            proc.kill()
            proc.wait()
        assert why is not None and why.kind == kind, (kind, why)


def test_on_a_busy_machine_work_within_its_cpu_time_is_never_cut_short():
    with busy_machine() as hogs:
        proc = _child(WORK.format(seconds=0.5))      # a correct cell: a fraction of its limit
        start = time.monotonic()
        why = _first_expiry(cputime.Limit(cputime.Meter(proc.pid), 2.5), proc)
        took = time.monotonic() - start
        proc.wait()
        assert why is None, why
        assert sum(cputime.tree_seconds(p.pid) for p in hogs) > took   # they did compete


def test_a_budget_adds_up_its_process_trees():
    procs = [_child(WORK.format(seconds=0.7) + SLEEP) for _ in range(2)]
    budget = cputime.Budget(1.0)
    for proc in procs:
        budget.add(cputime.Meter(proc.pid))
    try:
        deadline = time.monotonic() + 60
        while budget.check() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert budget.check() is not None and budget.check().kind == "budget"
        assert all(meter.used < 1.0 for meter in budget.meters)      # neither alone
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# -- the judge --------------------------------------------------------------------------------
def _run(student, code, name="cell"):
    with student.cell_limit(name):
        return student.run_cell(name, code)


def test_a_judged_cell_on_a_busy_machine_keeps_its_limit(tmp_path):
    student = session.start(str(tmp_path), Judge(timeout=3))
    try:
        with busy_machine():
            assert _run(student, WORK.format(seconds=1.0), "work") is None
    finally:
        student.close()


def test_a_judged_cell_that_waits_forever_is_stopped_long_before_the_backstop(tmp_path):
    student = session.start(str(tmp_path), Judge(timeout=5, interrupt_grace=2),
                            time_limits=TimeLimits(stall_seconds=1.0))
    try:
        start = time.monotonic()
        with pytest.raises(CellTimeout, match="computed nothing") as caught:
            _run(student, POLL, "waiter")
        assert caught.value.expired.kind == "stall" and time.monotonic() - start < 20
        assert _run(student, "x = 1") is None          # interrupted, not killed
    finally:
        student.close()


def test_the_notebook_budget_ends_the_students_process_with_the_reason(tmp_path):
    budget = cputime.Budget(1.0)
    student = session.start(str(tmp_path), Judge(timeout=30), budget=budget)
    try:
        with pytest.raises(StudentGone, match="grading budget of 1 s of CPU time"):
            _run(student, LOOP, "loop")
        assert student.gone_kind == "budget"
        with pytest.raises(StudentGone, match="grading budget"):
            _run(student, "x = 1")
    finally:
        student.close()


def _notebook(program, tests):
    """A notebook: one solution cell, then test cells (grade_id test_0, test_1, ...)."""
    cells = [new_code_cell(program, metadata={"nbgrader": {"solution": True,
                                                           "grade_id": "sol"}})]
    cells += [new_code_cell(code, metadata={"nbgrader": {
        "grade": True, "solution": False, "locked": True, "points": 1, "grade_id": f"test_{i}"}})
        for i, code in enumerate(tests)]
    return new_notebook(cells=cells)


def test_a_test_that_timed_out_on_the_clock_alone_is_judged_again():
    # the first process to call f() computes a little, slowly, for ever (what a busy moment of
    # the grader looks like to the clock); the second one answers at once
    program = ("import os, time\ndef f():\n    if not os.path.exists('seen'):\n"
               "        open('seen', 'w').close()\n        while True:\n"
               "            time.sleep(0.01)\n    return 1\n")
    result = local.judge(_notebook(program, ["assert f() == 1"]), timeout=1,
                         interrupt_grace=2,
                         time_limits=TimeLimits(stall_seconds=0, wall_factor=3))
    assert result.failed == {}
    assert "judged this test again" in result.outputs["test_0"][0].text


def test_tests_lost_when_loops_killed_the_process_are_judged_again_and_loops_are_not():
    program = "def loop():\n    while True:\n        pass\ndef ok():\n    return 1\n"
    result = local.judge(_notebook(program, ["loop()", "loop()", "assert ok() == 1"]),
                         timeout=1, interrupt_grace=2,
                         time_limits=TimeLimits(wall_factor=30))
    assert set(result.failed) == {"test_0", "test_1"}
    assert all("CPU time" in result.failed[t] for t in ("test_0", "test_1"))
    assert "judged this test again" in result.outputs["test_2"][0].text


# -- the kernel -------------------------------------------------------------------------------
def _kernel_run(cells, tmp_path, **limits):
    from traitlets.config import Config
    from tpgrader.preprocessors.sandboxed_execute import SandboxedExecute
    config = Config()
    config.Execute.timeout = 2
    for name, value in limits.items():
        setattr(config.TimeLimits, name, value)
    nb = new_notebook(cells=[new_code_cell(code) for code in cells])
    nb, _ = SandboxedExecute(config=config).preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    return [[(o.ename, o.evalue) for o in c.outputs if o.output_type == "error"]
            for c in nb.cells], nb


@pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")
def test_the_kernel_counts_cpu_time_stops_waiting_cells_and_keeps_its_budget(tmp_path):
    errors, _ = _kernel_run([LOOP, "x = 1", POLL, "y = 2", LOOP], tmp_path,
                            stall_seconds=1.0, notebook_cpu_seconds=3, wall_factor=30)
    assert "used more than 2 s of CPU time" in errors[0][0][1]
    assert "computed nothing" in errors[2][0][1]
    assert errors[1] == errors[3] == []
    # the second loop ran into the notebook's budget (3 s): the kernel was ended
    assert errors[4][-1][0] == "KernelDied" and "grading budget" in errors[4][-1][1]


@pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")
def test_a_kernel_cell_on_a_busy_machine_keeps_its_limit(tmp_path):
    with busy_machine():
        errors, nb = _kernel_run([WORK.format(seconds=0.5) + "print('done')"], tmp_path)
    assert errors == [[]] and "done" in nb.cells[0].outputs[0].text


# -- run_on_ranks and the gpu_runner ------------------------------------------------------------
def _work_on_rank(seconds):
    import time as clock
    start = clock.process_time()
    while clock.process_time() - start < seconds:
        pass
    return seconds


def _loop_on_rank():
    while True:
        pass


def test_ranks_on_a_busy_machine_keep_their_limit_and_a_loop_does_not():
    import torch  # noqa: F401 - imported before the ranks fork, as in a notebook
    from tpsim.ranks import run_on_ranks
    with busy_machine():
        assert run_on_ranks(_work_on_rank, 2, 0.5, timeout=3) == [0.5, 0.5]
    with pytest.raises(TimeoutError, match=r"used more than 2 s of CPU time \(each may use 1 s"):
        run_on_ranks(_loop_on_rank, 2, timeout=1)


WATCHDOG = """
import json, sys, time
from gpu_runner.worker import Recorder, Watchdog
rec = Recorder(sys.argv[1], 0)
dog = Watchdog({seconds}, rec, wall_factor={factor})
dog.start()
dog.arm("work")
{body}
dog.disarm()
rec.write(event="bye")
"""


def _watched(tmp_path, body, seconds, factor) -> dict:
    """The last record of a rank whose unit runs `body` under the watchdog (`seconds` of CPU
    time, `factor` times as long on the clock)."""
    records = tmp_path / "rank0.jsonl"
    code = WATCHDOG.format(body=body, seconds=seconds, factor=factor)
    subprocess.run([sys.executable, "-c", code, str(records)], cwd=REPO, timeout=120)
    return json.loads(records.read_text().splitlines()[-1])


def test_the_gpu_runner_watchdog_counts_cpu_time(tmp_path):
    with busy_machine():
        assert _watched(tmp_path, WORK.format(seconds=0.4), 2.0, 5.0)["event"] == "bye"
    assert "used more than 1 s of CPU time" in _watched(tmp_path, LOOP, 1.0, 30.0)["why"]
    assert "on the clock" in _watched(tmp_path, "time.sleep(10**6)", 1.0, 2.0)["why"]
