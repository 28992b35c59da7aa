"""Check machinery shared by the column, row and MLP checks."""
from __future__ import annotations

from . import _trusted as T
from ._harness import record
from .compare import (expect_array, expect_close, expect_dtype, expect_shape, expect_unchanged,
                      expect_value_error, fail, is_close)

RANKS = (1, 2, 3, 4, 8)


def describe(fname, p, **arrays):
    """'column_parallel(x (3, 4), W (6, 4), num_ranks=2, b (6,))' for messages."""
    parts = [f"{k} {v.shape}" if v is not None and hasattr(v, "shape") else f"{k}={v!r}"
             for k, v in arrays.items() if v is not None]
    return f"{fname}({', '.join(parts)}, num_ranks={p})"


def copied(value):
    """`value` with its arrays copied, also those in a list or tuple (one array per rank)."""
    if isinstance(value, T.ndarray):
        return value.copy()
    if isinstance(value, (list, tuple)):
        return type(value)(copied(v) for v in value)
    return value


def call_raw(f, args, kwargs=None):
    """Run the student's function on copies of the arrays (so the expected values, computed
    from the originals, cannot be disturbed); return what it returned, unchecked."""
    return f(*[copied(a) for a in args], **{k: copied(v) for k, v in (kwargs or {}).items()})


def call(f, name, args, kwargs=None):
    """call_raw, and the output must be an ndarray."""
    return expect_array(call_raw(f, args, kwargs), name)


def expect_output(got, want, scale, dtype, name, shape_hints=(), explanations=()):
    expect_shape(got, want.shape, name, shape_hints)
    expect_close(got, want, scale, dtype, name, explanations)


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
    total = call_.inputs[0].astype(T.float64)
    for piece in call_.inputs[1:]:
        total = total + piece
    return total


def _same_numbers(piece, want, scale, dtype):
    if piece.size != want.size:
        return False
    if piece.shape != want.shape:
        piece = piece.reshape(want.shape)
    return is_close(piece, want, scale.reshape(want.shape), dtype)


def expect_inputs_unchanged(f, name, args, kwargs, labels):
    """Call f and compare every array argument (also the arrays in a list argument) with a
    copy taken before the call."""
    arrays = list(args) + list(kwargs.values())
    before = [copied(a) for a in arrays]
    f(*args, **kwargs)
    for label, old, new in zip(labels, before, arrays):
        _expect_same(old, new, label, name)


def _expect_same(old, new, label, name):
    if isinstance(old, T.ndarray):
        if not isinstance(new, T.ndarray):
            fail(f"{name} replaced its input {label} by a {type(new).__name__}; inputs must be "
                 f"left as they were")
        expect_unchanged(old, new, label, name)
    elif isinstance(old, (list, tuple)):
        if len(new) != len(old):
            fail(f"{name} changed the length of its input list {label} ({len(old)} -> "
                 f"{len(new)}); inputs must be left as they were")
        for i, (a, b) in enumerate(zip(old, new)):
            _expect_same(a, b, f"{label}[{i}]", name)


def expect_bad_args(f, fname, cases):
    """cases: (description, args, kwargs) that must each raise ValueError."""
    for description, args, kwargs in cases:
        expect_value_error(lambda: f(*args, **kwargs), description, fname)


def with_dtype(got, want_dtype, name):
    expect_dtype(got, want_dtype, name)


__all__ = ["RANKS", "call", "call_raw", "copied", "count", "describe", "expect_bad_args",
           "expect_counts", "expect_inputs_unchanged", "expect_output", "expect_pieces",
           "last_call", "pieces_match", "record", "reduced", "with_dtype"]
