"""The gpu_runner's rank side and judge, without torchrun or the sandbox: for fast tests.

`grade(submission, sizes)` extracts the submission's module as the grader does, forks one
process per rank from this (torch-importing) process, runs gpu_runner.worker.main in each
(env:// rendezvous on a free loopback port), then reads the records and judges them with the
grader's own code (gpu_runner.launch._interpret, gpu_runner.report.build). A launch costs
about the units' own time, not 4 interpreters importing torch: the real path (torchrun in the
sandbox) is tests/test_gpu_runner_slow.py's.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import socket
from pathlib import Path

from gpu_runner import extract, report, worker
from gpu_runner.launch import Config, _interpret, _read_records, job_dir
from gpu_runner.plan import make_plan
from tpcourse import REPO
from tpcourse.submissions import build


def source(assignment: str) -> Path:
    return REPO / "source" / assignment / f"{assignment}.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, argv):
    faulthandler.disable()      # a rank a student's code crashes need not dump pytest's stack
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker.main(argv)           # ends in os._exit


def grade(sub, sizes, tmp: Path, pg_timeout=10.0, steps=None, max_launches=1) -> dict:
    """The report of `sub` (a tpcourse Submission) graded at `sizes` on forked gloo ranks, the
    units of its assignment's gpu_* cells; `steps`: only the units of these (kind, step)s;
    `max_launches`: relaunches after a fault, as gpu_runner.launch makes them."""
    assignment = sub.assignment
    source_nb = extract.read(source(assignment))
    cells = extract.gpu_cells(source_nb)
    module = tmp / "solution.py"
    extract.write_module(source_nb, build(sub)[f"{assignment}.ipynb"], module)
    cfg = Config(sizes=tuple(sizes), backend="gloo", pg_timeout=pg_timeout)
    plan = [u for u in make_plan(sizes, timing=False, cells=cells)
            if steps is None or (u.kind, u.step) in steps]
    results = {}
    for index in range(max_launches):   # a fault ends a launch: the rest runs in the next one
        todo = [u for u in plan if u.id not in results]
        if not todo or not _launch(module, tmp / f"launch{index}", todo, sizes, cfg, results):
            break
    for u in plan:     # units a fault left behind: not what these tests look at
        results.setdefault(u.id, report_failed(u))
    return report.build(sub.student, assignment, assignment, cells, plan, results, [], cfg, 0.0)


def _launch(module, out, todo, sizes, cfg, results) -> int:
    """One forked launch of the units `todo`; fills `results`, returns how many got one."""
    job_dir(out).mkdir(parents=True)
    argv = ["--module", str(module), "--out", str(job_dir(out)),
            "--units", ",".join(u.id for u in todo), "--sizes", ",".join(map(str, sizes)),
            "--pg-timeout", str(cfg.pg_timeout), "--step-timeout", str(cfg.unit_timeout)]
    port, ctx = _free_port(), mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, cfg.world, port, argv)) for r in range(cfg.world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    sup = {"rc": 0, "timed_out": False}
    return _interpret(_read_records(out), todo, cfg, sup, out / "torchrun.log", results)


def report_failed(u):
    from gpu_runner.launch import _failed
    return _failed(u, "not_run", "not run in the forked test launch")


def lost(rep) -> set[str]:
    return {gid for gid, c in rep["cells"].items() if c["score"] < c["points"]}
