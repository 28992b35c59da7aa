"""__assignment__'s units, the grader side: the verdicts on what the ranks reported of the
student's RowParallelMatmul (gpu/observe.py), against the dense float64 reference of the unit's
data (gpu/data.py), through tpgrade.verdict, as gpu_runner.judge says. numpy only.
"""
from __future__ import annotations

from gpu_runner.data import shard
from gpu_runner.judge import counts
from tpgrade import tensors
from tpgrade.verdict import mismatch

from . import data


def matmul_forward(view):
    case = data.case(view.seed)
    dense = tensors.linear(case.x, case.w)

    def forward(rank):
        lo, hi = shard(data.IN, rank, view.size)
        partial = tensors.linear(case.x[:, lo:hi], case.w[:, lo:hi])
        return mismatch(view.tensor(rank, "y"), dense, "the output", suspects=[
            (partial, "only this rank's partial sum: all-reduce the partials over `group`")])
    view.each("matmul.forward", forward)
    counts(view, "counts.matmul_forward", "counts", {"allreduce": 1})


JUDGES = {("matmul", "forward"): matmul_forward}
