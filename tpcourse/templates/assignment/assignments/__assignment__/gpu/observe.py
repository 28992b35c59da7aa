"""__assignment__'s units, the rank side: build the student's RowParallelMatmul from the unit's
data (gpu/data.py, the numbers the judge recomputes), run it on this rank's input slice, and
REPORT its output and collective counts as data. Nothing here decides a grade: gpu/judge.py
does, in the grader process. The phases and helpers are gpu_runner.observe's.
"""
from __future__ import annotations

from gpu_runner.observe import Ctx, counted, cpu

from . import data


def matmul_forward(ctx: Ctx):
    case = data.case(ctx.seed)
    master = cpu(case.master(ctx.rank, ctx.size))
    layer = ctx.phase(lambda: ctx.build(ctx.m.RowParallelMatmul, data.IN, data.OUT,
                                        master_weight=master))
    x = ctx.tensor(case.x[:, slice(*ctx.shard(data.IN))])
    ctx.observe("y", lambda: counted(ctx, "counts", lambda: layer(x)))


UNITS = {("matmul", "forward"): matmul_forward}
