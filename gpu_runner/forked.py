"""Grade a submission's gpu_* cells on forked gloo ranks: no torchrun, no sandbox.

For the repository's fast tests and the example catalogue's grade tables: the ranks
are forked from this (torch-importing) process and run gpu_runner.worker.main (env://
rendezvous on a free loopback port), then the records are read and judged by the grader's own
code (gpu_runner.launch._interpret, gpu_runner.report.build), relaunching after a fault as
gpu_runner.launch does. A launch costs about the units' own time, not W interpreters importing
torch. Real grading always goes through `python -m gpu_runner.grade` (torchrun, sandboxed).
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import socket
from pathlib import Path

from . import extract, report, worker
from .launch import Config, _failed, _interpret, _read_records, job_dir
from .plan import make_plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, argv):
    faulthandler.disable()      # a rank a student's code crashes need not dump the caller's stack
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker.main(argv)           # ends in os._exit


def grade(student, assignment, source_nb, submitted_nb, sizes, tmp: Path, pg_timeout=10.0,
          steps=None, max_launches=1, step_timeout=0.0) -> dict:
    """The report (gpu_runner.report.build) of `submitted_nb` graded at `sizes` on forked gloo
    ranks: the units of the source's gpu_* cells; `steps`: only the units of these
    (kind, step)s; `max_launches`: launches in all, a fault ending one (gpu_runner.launch);
    `step_timeout`: CPU seconds per unit (0: launch.Config's default)."""
    cells = extract.gpu_cells(source_nb)
    module = Path(tmp) / "solution.py"
    extract.write_module(source_nb, submitted_nb, module)
    cfg = Config(sizes=tuple(sizes), backend="gloo", pg_timeout=pg_timeout,
                 step_timeout=step_timeout)
    plan = [u for u in make_plan(assignment, sizes, timing=False, cells=cells)
            if steps is None or (u.kind, u.step) in steps]
    results = {}
    for index in range(max_launches):
        todo = [u for u in plan if u.id not in results]
        if not todo or not _launch(module, Path(tmp) / f"launch{index}", todo, sizes, cfg,
                                   results):
            break
    for u in plan:     # units the last launch left behind
        results.setdefault(u.id, _failed(u, "not_run", "not run in the forked launches"))
    return report.build(student, assignment, assignment, cells, plan, results, [], cfg, 0.0)


def _launch(module, out, todo, sizes, cfg, results) -> int:
    """One forked launch of the units `todo`; fills `results`, returns how many got one."""
    job_dir(out).mkdir(parents=True)
    argv = ["--assignment", todo[0].assignment, "--module", str(module),
            "--out", str(job_dir(out)), "--units", ",".join(u.id for u in todo),
            "--sizes", ",".join(map(str, sizes)),
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


def lost(rep) -> set[str]:
    """The gpu_* cells of a report that scored below their points."""
    return {gid for gid, c in rep["cells"].items() if c["score"] < c["points"]}
