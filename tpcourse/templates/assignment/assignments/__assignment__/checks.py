"""Checks for the __assignment__ notebook's numpy exercise: row_matmul on simulated ranks.

Each public function is one graded test cell (`from assignments.__assignment__ import checks
as check; check.row_matmul_small(row_matmul)`), decided by the judge: it raises CheckFailed (an
AssertionError) whose message names the mistake, and prints nothing when the solution is right.
The notebook's torch layer is graded by the gpu_runner (gpu/), not here.
"""
from __future__ import annotations

from tpgrade import _trusted as trusted
from tpgrade._harness import check, make_checks_read_only, record
from tpgrade._layers import RANKS, call, describe, expect_counts, expect_output
from tpgrade.cases import arrays, balanced, linear


def _case(row_matmul, x, W, p):
    """row_matmul(x, W, p) must equal the dense x @ W.T (float64, to ~1e-12)."""
    name = describe("row_matmul", p, x=x, W=W)
    got = call(row_matmul, name, (x, W, p))
    want, scale = linear(x, W)
    lo, hi = balanced(W.shape[1], p)[0]
    partial, _ = linear(x[..., lo:hi], W[:, lo:hi])
    hints = [(x.shape[:-1] + (W.shape[1],), "the output has in_features columns; W has shape "
              "(out_features, in_features), so y = x @ W.T")]
    expect_output(got, want, scale, trusted.float64, name, hints,
                  [(partial, "only rank 0's partial sum: all_reduce every rank's partial")])


@check
def row_matmul_small(row_matmul):
    """2 ranks, x (3, 4), W (5, 4): rank 0 holds columns 0-1 of W, rank 1 columns 2-3."""
    x, W = arrays(1, (3, 4), (5, 4))
    _case(row_matmul, x, W, 2)


@check
def row_matmul_uneven(row_matmul):
    """in_features not divisible by num_ranks (and empty shards), then exactly one all_reduce."""
    for i, p in enumerate(RANKS):
        x, W = arrays(10 + i, (3, 7), (5, 7))
        _case(row_matmul, x, W, p)
    advice = {("all_reduce", 0): "without an all_reduce each rank has only its partial sum",
              ("all_reduce", "more"): "sum the partials once, at the end"}
    for p in (1, 2, 3):
        x, W = arrays(20 + p, (2, 6), (4, 6))
        name = describe("row_matmul", p, x=x, W=W)
        with record() as calls:
            call(row_matmul, name, (x, W, p))
        expect_counts(calls, p, {"all_reduce": 1, "all_gather": 0}, name, advice)


make_checks_read_only(__name__)
