"""Check machinery shared by the column, row and MLP checks."""
from __future__ import annotations

from . import _trusted as trusted
from ._harness import record
from .verdict import (close, expect_array, expect_dtype, expect_output, expect_unchanged,
                      expect_value_error, fail, snapshot)

RANKS = (1, 2, 3, 4, 8)


def describe(fname, p, **arrays):
    """'column_parallel(x (3, 4), W (6, 4), num_ranks=2, b (6,))' for messages."""
    parts = [f"{k} {v.shape}" if v is not None and hasattr(v, "shape") else f"{k}={v!r}"
             for k, v in arrays.items() if v is not None]
    return f"{fname}({', '.join(parts)}, num_ranks={p})"


def call_raw(f, args, kwargs=None):
    """Run the student's function on copies of the arrays (so the expected values, computed
    from the originals, cannot be disturbed); return what it returned, unchecked."""
    return f(*[snapshot(a) for a in args], **{k: snapshot(v) for k, v in (kwargs or {}).items()})


def call(f, name, args, kwargs=None):
    """call_raw, and the output must be an ndarray."""
    return expect_array(call_raw(f, args, kwargs), name)


def count(calls, op):
    return sum(1 for c in calls if c.op == op)


def expect_counts(calls, p, wanted, name, advice):
    """`wanted`: {op: n}. With one rank a collective is a no-op, so 0 is accepted for it too.

    `advice`: {(op, got): text} for the counts that a known mistake produces.
    """
    for op, n in wanted.items():
        got = count(calls, op)
        ok = got == n or (p == 1 and n == 1 and got == 0)
        if not ok:
            hint = advice.get((op, got)) or advice.get((op, "more" if got > n else "fewer"), "")
            fail(f"{name} made {got} {op} call(s), expected exactly {n}" + (f": {hint}" if hint else ""))


def last_call(calls, op, name):
    found = [c for c in calls if c.op == op]
    if not found:
        fail(f"{name} made no {op} call: the ranks' results are never combined through "
             f"tpsim's {op} (a collective of your own, or a rebound name, is not recorded)")
    return found[-1]


def expect_pieces(call_, expected, scales, dtype, name, what, alternatives=None):
    """The per-rank inputs of a recorded collective must be the true per-rank values.

    expected[r]: what rank r should contribute; alternatives[r]: another acceptable value
    (e.g. a column shard with or without its bias slice). A piece may differ in layout
    (e.g. flattened leading dims) but must hold the same numbers.
    """
    p = len(expected)
    if len(call_.inputs) != p:
        fail(f"{name}: {call_.op} received {len(call_.inputs)} piece(s) for {p} ranks: every rank "
             f"contributes its own {what} (a result computed densely and passed as one piece, "
             f"or padded with zeros, is not tensor parallelism)")
    for r, (piece, want) in enumerate(zip(call_.inputs, expected)):
        if not _piece_matches(piece, r, expected, scales, dtype, alternatives):
            fail(f"{name}: rank {r}'s input to {call_.op} (shape {piece.shape}) is not its "
                 f"{what} (expected shape {want.shape}): each rank must pass exactly what it "
                 f"computed from its own shard (a dense result, or zeros, passed through the "
                 f"collective is not tensor parallelism)")


def pieces_match(call_, expected, scales, dtype, alternatives=None):
    """Whether a recorded collective's per-rank inputs are `expected` (as expect_pieces)."""
    return len(call_.inputs) == len(expected) and all(
        _piece_matches(piece, r, expected, scales, dtype, alternatives)
        for r, piece in enumerate(call_.inputs))


def _piece_matches(piece, r, expected, scales, dtype, alternatives):
    options = [expected[r]] + ([alternatives[r]] if alternatives else [])
    return any(_same_numbers(piece, w, scales[r], dtype) for w in options)


def reduced(call_):
    """What a recorded all-reduce left on every rank: the sum of its per-rank inputs (float64)."""
    total = call_.inputs[0].astype(trusted.float64)
    for piece in call_.inputs[1:]:
        total = total + piece
    return total


def _same_numbers(piece, want, scale, dtype):
    if piece.size != want.size:
        return False
    if piece.shape != want.shape:
        piece = piece.reshape(want.shape)
    return close(piece, want, dtype, scale.reshape(want.shape))


def expect_inputs_unchanged(f, name, args, kwargs, labels):
    """Call f and compare every argument, whole (the arrays in it at any depth of lists, tuples
    and dicts, whatever their new shape or dtype), with a copy taken before the call."""
    arguments = list(args) + list(kwargs.values())
    before = [snapshot(a) for a in arguments]
    f(*args, **kwargs)
    for label, old, new in zip(labels, before, arguments):
        expect_unchanged(old, new, label, name)


def expect_bad_args(f, fname, cases):
    """cases: (description, args, kwargs) that must each raise ValueError."""
    for description, args, kwargs in cases:
        expect_value_error(lambda: f(*args, **kwargs), description, fname)


def with_dtype(got, want_dtype, name):
    expect_dtype(got, want_dtype, name)


__all__ = ["RANKS", "call", "call_raw", "count", "describe", "expect_bad_args",
           "expect_counts", "expect_inputs_unchanged", "expect_output", "expect_pieces",
           "last_call", "pieces_match", "record", "reduced", "with_dtype"]
