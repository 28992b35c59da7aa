"""Checks for the tp_linear notebook: shard_sizes, column_parallel, row_parallel.

Each public function is one graded test cell: it raises (CheckFailed, an AssertionError)
with a message that names the mistake, and prints nothing when the solution is right.
"""
from __future__ import annotations

from tpgrade import _trusted as trusted
from tpgrade._harness import check, make_checks_read_only
from tpgrade._layers import (RANKS, call, describe, expect_bad_args, expect_counts,
                             expect_inputs_unchanged, expect_output, expect_pieces, last_call,
                             record, reduced, with_dtype)
from tpgrade.cases import arrays, balanced, f64, linear
from tpgrade.verdict import close, fail

# --------------------------------------------------------------------------- shard_sizes


def _expect_sizes(shard_sizes, n, p, want):
    name = f"shard_sizes({n}, {p})"
    got = shard_sizes(n, p)
    if not isinstance(got, (list, tuple)):
        fail(f"{name} returned {type(got).__name__}, expected a list of ints")
    values = list(got)
    if not all(isinstance(v, (int, trusted.integer)) and not isinstance(v, bool) for v in values):
        fail(f"{name} returned {values}: every size should be an int")
    if values == want:
        return
    if len(values) != p:
        hint = f"one size per rank: {p} ranks, {len(values)} sizes"
    elif sum(values) != n:
        hint = f"the sizes add up to {sum(values)}, not n = {n}"
    elif max(values) - min(values) > 1:
        hint = "not balanced: sizes may differ by at most one"
    else:
        hint = "the first n % num_ranks ranks get the extra feature (numpy's array_split order)"
    fail(f"{name}: expected {want}, got {values}: {hint}")


@check
def shard_sizes_divisible(shard_sizes):
    for n, p, want in [(8, 4, [2, 2, 2, 2]), (6, 3, [2, 2, 2]), (5, 1, [5]), (12, 2, [6, 6])]:
        _expect_sizes(shard_sizes, n, p, want)


@check
def shard_sizes_balanced(shard_sizes):
    for n, p, want in [(10, 4, [3, 3, 2, 2]), (7, 3, [3, 2, 2]), (5, 2, [3, 2]),
                       (3, 8, [1, 1, 1, 0, 0, 0, 0, 0]), (0, 2, [0, 0]), (1, 1, [1])]:
        _expect_sizes(shard_sizes, n, p, want)


@check
def shard_sizes_bad_args(shard_sizes):
    expect_bad_args(shard_sizes, "shard_sizes", [
        ("(8, 0)", (8, 0), {}), ("(8, -1)", (8, -1), {}), ("(8, 2.5)", (8, 2.5), {}),
        ("(8, '2')", (8, "2"), {}), ("(-1, 2)", (-1, 2), {}), ("(2.5, 2)", (2.5, 2), {}),
    ])


# --------------------------------------------------------------------------- column_parallel


def _column_case(column_parallel, x, W, p, b=None, dtype=trusted.float64):
    name = describe("column_parallel", p, x=x, W=W, b=b)
    got = call(column_parallel, name, (x, W, p), {} if b is None else {"b": b})
    want, scale = linear(x, W, b)
    lead = x.shape[:-1]
    out = W.shape[0]
    hints = [(lead + (stop - start,), f"only the local shard was returned: each rank holds "
              f"{stop - start} of the {out} outputs; all_gather every rank's slice")
             for start, stop in balanced(out, p) if stop - start != out]
    hints.append((lead + (x.shape[-1],), "the output has in_features columns; W has shape "
                  "(out_features, in_features), so y = x @ W.T"))
    explanations = []
    if b is not None:
        plain, _ = linear(x, W)
        explanations.append((plain, "the bias is missing: each rank adds its slice of b"))
    expect_output(got, want, scale, dtype, name, hints, explanations)
    return got


@check
def column_small(column_parallel):
    """2 ranks, x (3, 4), W (6, 4): rank 0 holds rows 0-2 of W, rank 1 rows 3-5."""
    x, W = arrays(1, (3, 4), (6, 4))
    _column_case(column_parallel, x, W, 2)


@check
def column_matches_dense(column_parallel):
    for i, p in enumerate(RANKS):
        x, W = arrays(10 + i, (5, 16), (24, 16))
        _column_case(column_parallel, x, W, p)


@check
def column_uneven_shards(column_parallel):
    for i, (out, p) in enumerate([(7, 2), (7, 4), (10, 3), (3, 8), (1, 4), (5, 8)]):
        x, W = arrays(20 + i, (4, 6), (out, 6))
        _column_case(column_parallel, x, W, p)
    x, W, b = arrays(29, (4, 6), (7, 6), (7,))
    _column_case(column_parallel, x, W, 3, b)


@check
def column_input_dims(column_parallel):
    for i, shape in enumerate([(6,), (2, 3, 6), (2, 1, 3, 6)]):
        for p in (2, 4):
            x, W = arrays(30 + i, shape, (8, 6))
            _column_case(column_parallel, x, W, p)


@check
def column_bias(column_parallel):
    for i, p in enumerate(RANKS):
        x, W, b = arrays(40 + i, (5, 16), (24, 16), (24,))
        _column_case(column_parallel, x, W, p, b)


@check
def column_one_all_gather(column_parallel):
    advice = {("all_reduce", "more"): "column shards are disjoint slices of y: concatenate them "
              "with all_gather; an all_reduce (a sum) is the row-parallel collective",
              ("all_gather", 0): "without an all_gather each rank has only its own slice",
              ("all_gather", "more"): "gather once, at the end"}
    for i, p in enumerate((1, 2, 3, 4)):
        x, W, b = arrays(50 + i, (3, 8), (12, 8), (12,))
        name = describe("column_parallel", p, x=x, W=W, b=b)
        with record() as calls:
            call(column_parallel, name, (x, W, p), {"b": b})
        expect_counts(calls, p, {"all_gather": 1, "all_reduce": 0}, name, advice)


@check
def column_gather_inputs(column_parallel):
    for i, (p, with_bias) in enumerate([(2, False), (3, False), (4, False), (3, True)]):
        x, W, b = arrays(60 + i, (3, 8), (12, 8), (12,) if with_bias else None)
        name = describe("column_parallel", p, x=x, W=W, b=b)
        with record() as calls:
            call(column_parallel, name, (x, W, p), {"b": b})
        gather = last_call(calls, "all_gather", name)
        shards = [(linear(x, W[a:z], None if b is None else b[a:z]), linear(x, W[a:z]))
                  for a, z in balanced(12, p)]
        # A rank may add its bias slice before the gather, or the full bias may follow it.
        expect_pieces(gather, [s[0][0] for s in shards], [s[0][1] for s in shards],
                      trusted.float64, name, "output slice x @ W_r.T",
                      alternatives=[s[1][0] for s in shards])


@check
def column_inputs_unmodified(column_parallel):
    for i, p in enumerate((1, 3)):
        x, W, b = arrays(70 + i, (2, 3, 8), (12, 8), (12,))
        name = describe("column_parallel", p, x=x, W=W, b=b)
        expect_inputs_unchanged(column_parallel, name, (x, W, p), {"b": b}, ("x", "W", "num_ranks", "b"))


@check
def column_dtype(column_parallel):
    for i, p in enumerate((1, 2, 4)):
        x, W = arrays(80 + i, (5, 16), (24, 16), dtype=trusted.float32)
        got = _column_case(column_parallel, x, W, p, dtype=trusted.float32)
        with_dtype(got, trusted.float32, describe("column_parallel", p, x=x, W=W))
        x, W, b = arrays(85 + i, (5, 16), (24, 16), (24,), dtype=trusted.float32)
        got = call(column_parallel, "column_parallel", (x, W, p), {"b": b})
        with_dtype(got, trusted.float32, describe("column_parallel", p, x=x, W=W, b=b))
    x, W = arrays(89, (5, 16), (24, 16))
    with_dtype(call(column_parallel, "column_parallel", (x, W, 2), {}), trusted.float64,
               describe("column_parallel", 2, x=x, W=W))


def _bad_linear_args(seed):
    x, W, b = arrays(seed, (3, 4), (6, 4), (6,))
    W_in5, W_1d, b5 = arrays(seed + 1, (6, 5), (6,), (5,))
    return [
        (" with num_ranks=0", (x, W, 0), {}), (" with num_ranks=-1", (x, W, -1), {}),
        (" with num_ranks=2.5", (x, W, 2.5), {}), (" with num_ranks='2'", (x, W, "2"), {}),
        (" with x (3, 4) and W (6, 5) (in_features differ)", (x, W_in5, 2), {}),
        (" with a 1-D W", (x, W_1d, 2), {}),
        (" with W (6, 4) and b (5,)", (x, W, 2), {"b": b5}),
    ]


@check
def column_bad_args(column_parallel):
    expect_bad_args(column_parallel, "column_parallel", _bad_linear_args(90))


# --------------------------------------------------------------------------- row_parallel


def _row_case(row_parallel, x, W, p, b=None, dtype=trusted.float64):
    name = describe("row_parallel", p, x=x, W=W, b=b)
    got = call(row_parallel, name, (x, W, p), {} if b is None else {"b": b})
    want, scale = linear(x, W, b)
    lead = x.shape[:-1]
    hints = [(lead + (x.shape[-1],), "the output has in_features columns; W has shape "
              "(out_features, in_features), so y = x @ W.T")]
    explanations = []
    first = balanced(x.shape[-1], p)[0]
    if p > 1:
        partial, _ = linear(x[..., first[0]:first[1]], W[:, first[0]:first[1]])
        explanations.append((partial, "this is rank 0's partial sum only: all_reduce the "
                             "partials of all ranks"))
    if b is not None:
        plain, _ = linear(x, W)
        explanations.append((plain, "the bias is missing: add b once, after the all-reduce"))
        for k in range(2, p + 1):
            explanations.append((plain + k * f64(b), f"the bias was added {k} times: added on "
                                 f"every rank before the all-reduce? Add b once, after it"))
    expect_output(got, want, scale, dtype, name, hints, explanations)
    return got


@check
def row_small(row_parallel):
    """2 ranks, x (3, 4), W (6, 4): rank 0 holds columns 0-1 of W and of x, rank 1 columns 2-3."""
    x, W = arrays(101, (3, 4), (6, 4))
    _row_case(row_parallel, x, W, 2)


@check
def row_matches_dense(row_parallel):
    for i, p in enumerate(RANKS):
        x, W = arrays(110 + i, (5, 24), (16, 24))
        _row_case(row_parallel, x, W, p)


@check
def row_uneven_shards(row_parallel):
    for i, (inp, p) in enumerate([(7, 2), (7, 4), (10, 3), (3, 8), (1, 4), (5, 8)]):
        x, W = arrays(120 + i, (4, inp), (6, inp))
        _row_case(row_parallel, x, W, p)


@check
def row_input_dims(row_parallel):
    for i, shape in enumerate([(8,), (2, 3, 8), (2, 1, 3, 8)]):
        for p in (2, 4):
            x, W = arrays(130 + i, shape, (6, 8))
            _row_case(row_parallel, x, W, p)


@check
def row_bias_once(row_parallel):
    for i, p in enumerate(RANKS):
        x, W, b = arrays(140 + i, (5, 24), (16, 24), (16,))
        _row_case(row_parallel, x, W, p, b)


@check
def row_bias_after_reduce(row_parallel):
    """The partial sums that go into the all-reduce must not contain the bias."""
    for i, p in enumerate((2, 3, 4)):
        x, W, b = arrays(150 + i, (3, 12), (8, 12), (8,))
        name = describe("row_parallel", p, x=x, W=W, b=b)
        with record() as calls:
            call(row_parallel, name, (x, W, p), {"b": b})
        reduce = last_call(calls, "all_reduce", name)
        plain, scale = linear(x, W)
        if not close(reduced(reduce), plain, trusted.float64, scale):
            fail(f"{name}: the partial sums given to all_reduce do not add up to x @ W.T "
                 f"without the bias: add b once, after the all-reduce, never inside a partial "
                 f"(on every rank it is counted num_ranks times; even on rank 0 alone it is "
                 f"not what RowParallelLinear does)")
        _row_case(row_parallel, x, W, p, b)


@check
def row_one_all_reduce(row_parallel):
    advice = {("all_gather", "more"): "row-parallel partials each cover all outputs: they are "
              "summed (all_reduce), not concatenated",
              ("all_reduce", 0): "without an all_reduce each rank holds only a partial sum",
              ("all_reduce", "more"): "reduce once, after every rank computed its partial"}
    for i, p in enumerate((1, 2, 3, 4)):
        x, W, b = arrays(160 + i, (3, 12), (8, 12), (8,))
        name = describe("row_parallel", p, x=x, W=W, b=b)
        with record() as calls:
            call(row_parallel, name, (x, W, p), {"b": b})
        expect_counts(calls, p, {"all_reduce": 1, "all_gather": 0}, name, advice)


@check
def row_reduce_inputs(row_parallel):
    for i, (p, inp) in enumerate([(2, 12), (3, 12), (4, 12), (4, 7)]):
        x, W = arrays(170 + i, (3, inp), (8, inp))
        name = describe("row_parallel", p, x=x, W=W)
        with record() as calls:
            call(row_parallel, name, (x, W, p))
        reduce = last_call(calls, "all_reduce", name)
        partials = [linear(x[..., a:z], W[:, a:z]) for a, z in balanced(inp, p)]
        expect_pieces(reduce, [y for y, _ in partials], [s for _, s in partials], trusted.float64,
                      name, "partial sum x_r @ W_r.T (its columns of x and W)")


@check
def row_inputs_unmodified(row_parallel):
    for i, p in enumerate((1, 3)):
        x, W, b = arrays(180 + i, (2, 3, 12), (8, 12), (8,))
        name = describe("row_parallel", p, x=x, W=W, b=b)
        expect_inputs_unchanged(row_parallel, name, (x, W, p), {"b": b}, ("x", "W", "num_ranks", "b"))


@check
def row_dtype(row_parallel):
    for i, p in enumerate((1, 2, 4)):
        x, W = arrays(190 + i, (5, 24), (16, 24), dtype=trusted.float32)
        got = _row_case(row_parallel, x, W, p, dtype=trusted.float32)
        with_dtype(got, trusted.float32, describe("row_parallel", p, x=x, W=W))
        x, W, b = arrays(195 + i, (5, 24), (16, 24), (16,), dtype=trusted.float32)
        got = call(row_parallel, "row_parallel", (x, W, p), {"b": b})
        with_dtype(got, trusted.float32, describe("row_parallel", p, x=x, W=W, b=b))
    x, W = arrays(199, (5, 24), (16, 24))
    with_dtype(call(row_parallel, "row_parallel", (x, W, 2), {}), trusted.float64,
               describe("row_parallel", 2, x=x, W=W))


@check
def row_bad_args(row_parallel):
    expect_bad_args(row_parallel, "row_parallel", _bad_linear_args(200))


make_checks_read_only(__name__)
