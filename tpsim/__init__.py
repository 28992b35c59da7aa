"""Simulated collectives for tensor parallelism, in one process.

Each "rank" is just a position in a Python list. A collective takes the list of what every
rank contributes and returns what every rank ends up holding:

    all_gather([y_0, y_1, ...], axis=-1)      -> np.concatenate([y_0, y_1, ...], axis)
    all_reduce([p_0, p_1, ...])               -> p_0 + p_1 + ...
    all_reduce([m_0, m_1, ...], op="max")     -> np.maximum(m_0, m_1, ...), elementwise
    reduce_scatter([p_0, p_1, ...], axis=-1)  -> [s_0, s_1, ...]: the sum p_0 + p_1 + ...
                                                 split along axis; rank r keeps s_r

all_gather and all_reduce give every rank the same array; reduce_scatter gives each rank a
different piece, so it returns the list of pieces (item r is rank r's). Its split is the
course's balanced split (numpy's array_split: the first n % p ranks get one more).

all_reduce's `op` is "sum" (the default) or "max", as torch.distributed's ReduceOp.SUM and
ReduceOp.MAX: Megatron-LM's vocab_parallel_cross_entropy takes the MAX of every rank's
largest logit before it sums the exponentials.

Every call is recorded (with copies of the per-rank inputs, the axis, and the reduction), so
a test can count the collectives a function used and check what each rank contributed:

    with tpsim.recording() as calls:
        y = column_parallel(x, W, num_ranks=2)
    [c.op for c in calls]   # ['all_gather']
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass

import numpy as np

# Bound once, at import: a notebook that rebinds np.concatenate cannot change the collectives.
_concatenate = np.concatenate
_array_split = np.array_split
_maximum = np.maximum
_asarray = np.asarray
_ndarray = np.ndarray

__all__ = ["all_gather", "all_reduce", "reduce_scatter", "recording", "log", "Call",
           "COLLECTIVES"]

# The collectives a notebook calls. Under `nbgrader autograde` the judge carries these out on
# its own side (tpjudge): the student's process gets stand-ins that ask the judge.
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter")
# all_reduce's reductions, by the name passed as `op`.
_REDUCTIONS = ("sum", "max")


@dataclass(frozen=True)
class Call:
    """One collective call: its name, what each rank passed in (copies), the axis, and the
    reduction ("sum" or "max" for all_reduce and reduce_scatter, None for all_gather)."""
    op: str
    inputs: tuple
    axis: int | None = None
    reduce_op: str | None = None


# Every call, most recent last (bounded, so a long notebook session does not grow forever).
log: collections.deque = collections.deque(maxlen=1000)
# The lists of the `recording()` blocks that are open right now (nested blocks all record).
_open_recordings: list[list[Call]] = []


def _per_rank_arrays(per_rank, op):
    """Check `per_rank` is a non-empty list of arrays; return them as arrays."""
    if not isinstance(per_rank, (list, tuple)):
        raise ValueError(f"{op} expects a list with one array per rank, "
                         f"got {type(per_rank).__name__}")
    if len(per_rank) == 0:
        raise ValueError(f"{op} needs at least one rank, got an empty list")
    arrays = []
    for rank, part in enumerate(per_rank):
        if not isinstance(part, (_ndarray, np.generic, int, float)):
            raise ValueError(f"{op}: rank {rank} passed {type(part).__name__}, expected an array")
        arrays.append(_asarray(part))
    return arrays


def _same_shapes(arrays, op):
    for rank, a in enumerate(arrays):
        if a.shape != arrays[0].shape:
            raise ValueError(f"{op}: rank {rank} has shape {a.shape}, rank 0 has "
                             f"{arrays[0].shape}; every rank must contribute the same shape")


def _check_axis(axis, ndim, op):
    if ndim == 0:
        raise ValueError(f"{op}: the pieces are 0-d; it needs arrays with at least one dim")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"{op}: axis {axis!r} is out of range for {ndim}-D pieces")


def _record(op, arrays, axis=None, reduce_op=None):
    # Copies: a rank that later modifies its array in place does not rewrite history.
    call = Call(op, tuple(a.copy() for a in arrays), axis, reduce_op)
    log.append(call)
    for calls in _open_recordings:
        calls.append(call)


def _reduce(arrays, reduce_op):
    total = arrays[0].copy()
    for a in arrays[1:]:
        total = _maximum(total, a) if reduce_op == "max" else total + a
    return total


def all_gather(per_rank, axis=-1):
    """Concatenate every rank's piece along `axis`: the full array, as every rank holds it."""
    arrays = _per_rank_arrays(per_rank, "all_gather")
    ndim = arrays[0].ndim
    for rank, a in enumerate(arrays):
        if a.ndim != ndim or a.ndim == 0:
            raise ValueError(f"all_gather: rank {rank} has shape {a.shape}, rank 0 has "
                             f"{arrays[0].shape}; pieces need the same number (>= 1) of dims")
    _check_axis(axis, ndim, "all_gather")
    for rank, a in enumerate(arrays):
        if _drop(a.shape, axis) != _drop(arrays[0].shape, axis):
            raise ValueError(f"all_gather: rank {rank} has shape {a.shape}, rank 0 has "
                             f"{arrays[0].shape}; they may differ only along axis {axis}")
    _record("all_gather", arrays, axis)
    return _concatenate(arrays, axis=axis)


def all_reduce(per_rank, op="sum"):
    """Combine every rank's array elementwise: op="sum" (the default) adds them, op="max"
    takes the largest; every rank holds the result afterwards."""
    if not isinstance(op, str) or op not in _REDUCTIONS:
        raise ValueError(f"all_reduce: op must be one of {_REDUCTIONS}, got {op!r}")
    arrays = _per_rank_arrays(per_rank, "all_reduce")
    _same_shapes(arrays, "all_reduce")
    _record("all_reduce", arrays, reduce_op=op)
    return _reduce(arrays, op)


def reduce_scatter(per_rank, axis=-1):
    """Sum every rank's array, then split the sum along `axis` over the ranks (the balanced
    split: the first n % p ranks get one more); returns the list of pieces, item r for rank r."""
    arrays = _per_rank_arrays(per_rank, "reduce_scatter")
    _same_shapes(arrays, "reduce_scatter")
    _check_axis(axis, arrays[0].ndim, "reduce_scatter")
    _record("reduce_scatter", arrays, axis, "sum")
    return list(_array_split(_reduce(arrays, "sum"), len(arrays), axis=axis))


@contextlib.contextmanager
def recording():
    """Collect the collective calls made inside the `with` block into a list."""
    calls: list[Call] = []
    _open_recordings.append(calls)
    try:
        yield calls
    finally:
        # by identity: two recordings with equal contents are still different blocks
        for i, open_calls in enumerate(_open_recordings):
            if open_calls is calls:
                del _open_recordings[i]
                break


def _drop(shape, axis):
    axis = axis % len(shape)
    return shape[:axis] + shape[axis + 1:]
