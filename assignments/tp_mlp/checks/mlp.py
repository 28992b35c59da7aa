"""Checks for the tp_mlp notebook's mlp_tp: column-parallel W1, activation per shard,
row-parallel W2, exactly one all-reduce."""
from __future__ import annotations

from tpgrade import _trusted as trusted
from tpgrade._harness import check, make_read_only
from tpgrade._layers import (RANKS, call, describe, expect_bad_args, expect_counts,
                             expect_inputs_unchanged, expect_output, expect_pieces, last_call,
                             record, reduced, with_dtype)
from tpgrade.cases import arrays, balanced, f64, relu
from tpgrade.cases import mlp as _dense
from tpgrade.verdict import close, fail


def _abs(h):
    return abs(h)


def _kwargs(b1, b2, activation):
    kwargs = {}
    if b1 is not None:
        kwargs["b1"] = b1
    if b2 is not None:
        kwargs["b2"] = b2
    if activation is not None:
        kwargs["activation"] = activation
    return kwargs


def _mlp_case(mlp_tp, x, W1, W2, p, b1=None, b2=None, activation=None, dtype=trusted.float64):
    name = describe("mlp_tp", p, x=x, W1=W1, W2=W2, b1=b1, b2=b2)
    if activation is not None:
        name = name[:-1] + f", activation={getattr(activation, '__name__', 'custom')})"
    act = activation or relu
    got = call(mlp_tp, name, (x, W1, W2, p), _kwargs(b1, b2, activation))
    want, scale, h = _dense(x, W1, W2, b1, b2, act)
    b2_ = 0.0 if b2 is None else f64(b2)
    explanations = [
        (act(h @ f64(W2).T) + b2_, "the activation was applied after the all-reduce: apply it "
         "to each rank's shard of the hidden layer, before W2"),
        (act(h @ f64(W2).T + b2_), "the activation was applied after the all-reduce: apply it "
         "to each rank's shard of the hidden layer, before W2"),
        (h @ f64(W2).T + b2_, "the activation was not applied (or not the one passed in)"),
    ]
    if activation is not None:
        explanations.append((_dense(x, W1, W2, b1, b2, relu)[0],
                             "relu was used instead of the activation passed in"))
    if b2 is not None:
        plain = want - f64(b2)
        explanations.append((plain, "b2 is missing: add it once, after the all-reduce"))
        for k in range(2, p + 1):
            explanations.append((plain + k * f64(b2), f"b2 was added {k} times: on every rank? "
                                 f"Add it once, after the all-reduce"))
    hints = [(x.shape[:-1] + (W1.shape[0],), "this is the hidden layer's shape: W2 is still "
              "to be applied"),
             (x.shape[:-1] + (W2.shape[1],), "the output has the hidden size; y = h @ W2.T has "
              "W2.shape[0] features")]
    expect_output(got, want, scale, dtype, name, hints, explanations)
    return got


@check
def mlp_small(mlp_tp):
    """2 ranks, x (2, 4), W1 (8, 4), W2 (4, 8), relu: each rank holds 4 hidden units."""
    x, W1, W2 = arrays(301, (2, 4), (8, 4), (4, 8))
    _mlp_case(mlp_tp, x, W1, W2, 2)


@check
def mlp_matches_dense(mlp_tp):
    for i, p in enumerate(RANKS):
        x, W1, W2 = arrays(310 + i, (5, 6), (24, 6), (6, 24))
        _mlp_case(mlp_tp, x, W1, W2, p)


@check
def mlp_uneven_shards(mlp_tp):
    for i, (hidden, p) in enumerate([(7, 2), (7, 4), (10, 3), (3, 8), (1, 4)]):
        x, W1, W2 = arrays(320 + i, (4, 5), (hidden, 5), (5, hidden))
        _mlp_case(mlp_tp, x, W1, W2, p)


@check
def mlp_input_dims(mlp_tp):
    for i, shape in enumerate([(6,), (2, 3, 6), (2, 1, 3, 6)]):
        for p in (2, 4):
            x, W1, W2 = arrays(330 + i, shape, (8, 6), (6, 8))
            _mlp_case(mlp_tp, x, W1, W2, p)


@check
def mlp_biases(mlp_tp):
    """b1 is sliced with W1's rows (before the activation); b2 is added once, after the reduce."""
    for i, p in enumerate(RANKS):
        x, W1, W2, b1, b2 = arrays(340 + i, (5, 6), (24, 6), (6, 24), (24,), (6,))
        _mlp_case(mlp_tp, x, W1, W2, p, b1, b2)
    for i, p in enumerate((2, 3)):
        x, W1, W2, b1, b2 = arrays(348 + i, (5, 6), (24, 6), (6, 24), (24,), (6,))
        name = describe("mlp_tp", p, x=x, W1=W1, W2=W2, b1=b1, b2=b2)
        with record() as calls:
            call(mlp_tp, name, (x, W1, W2, p), {"b1": b1, "b2": b2})
        reduce = last_call(calls, "all_reduce", name)
        want, scale, _ = _dense(x, W1, W2, b1, None)
        if not close(reduced(reduce), want, trusted.float64, scale):
            fail(f"{name}: the partial sums given to all_reduce do not add up to the MLP output "
                 f"without b2: add b2 once, after the all-reduce, never inside a partial")


@check
def mlp_activation(mlp_tp):
    """The activation passed in is applied to every rank's hidden shard."""
    for i, (act, p) in enumerate([(trusted.tanh, 2), (_abs, 3), (trusted.tanh, 4)]):
        x, W1, W2, b1 = arrays(350 + i, (5, 6), (12, 6), (6, 12), (12,))
        _mlp_case(mlp_tp, x, W1, W2, p, b1=b1, activation=act)


@check
def mlp_one_all_reduce(mlp_tp):
    advice = {("all_gather", "more"): "the hidden layer stays sharded between W1 and W2: no "
              "gather (the activation is elementwise, each rank applies it to its own shard)",
              ("all_reduce", "more"): "only the row-parallel W2 needs an all-reduce; the "
              "column-parallel W1 needs no communication (reducing after it is a pitfall)",
              ("all_reduce", 0): "without an all_reduce each rank holds only a partial sum"}
    for i, p in enumerate((1, 2, 3, 4)):
        x, W1, W2, b1, b2 = arrays(360 + i, (3, 6), (12, 6), (6, 12), (12,), (6,))
        name = describe("mlp_tp", p, x=x, W1=W1, W2=W2, b1=b1, b2=b2)
        with record() as calls:
            call(mlp_tp, name, (x, W1, W2, p), {"b1": b1, "b2": b2})
        expect_counts(calls, p, {"all_reduce": 1, "all_gather": 0}, name, advice)


@check
def mlp_reduce_inputs(mlp_tp):
    for i, (hidden, p) in enumerate([(12, 2), (12, 3), (12, 4), (7, 4)]):
        x, W1, W2, b1 = arrays(370 + i, (3, 6), (hidden, 6), (6, hidden), (hidden,))
        name = describe("mlp_tp", p, x=x, W1=W1, W2=W2, b1=b1)
        with record() as calls:
            call(mlp_tp, name, (x, W1, W2, p), {"b1": b1})
        reduce = last_call(calls, "all_reduce", name)
        partials = [_dense(x, W1[a:z], W2[:, a:z], b1[a:z]) for a, z in balanced(hidden, p)]
        expect_pieces(reduce, [y for y, _, _ in partials], [s for _, s, _ in partials],
                      trusted.float64, name, "partial output relu(x @ W1_r.T + b1_r) @ W2_r.T")


@check
def mlp_inputs_unmodified(mlp_tp):
    for i, p in enumerate((1, 3)):
        x, W1, W2, b1, b2 = arrays(380 + i, (2, 3, 6), (12, 6), (6, 12), (12,), (6,))
        name = describe("mlp_tp", p, x=x, W1=W1, W2=W2, b1=b1, b2=b2)
        expect_inputs_unchanged(mlp_tp, name, (x, W1, W2, p), {"b1": b1, "b2": b2},
                                ("x", "W1", "W2", "num_ranks", "b1", "b2"))


@check
def mlp_dtype(mlp_tp):
    for i, p in enumerate((1, 2, 4)):
        x, W1, W2 = arrays(390 + i, (5, 6), (24, 6), (6, 24), dtype=trusted.float32)
        got = _mlp_case(mlp_tp, x, W1, W2, p, dtype=trusted.float32)
        with_dtype(got, trusted.float32, describe("mlp_tp", p, x=x, W1=W1, W2=W2))
        x, W1, W2, b1, b2 = arrays(395 + i, (5, 6), (24, 6), (6, 24), (24,), (6,),
                                   dtype=trusted.float32)
        got = call(mlp_tp, "mlp_tp", (x, W1, W2, p), {"b1": b1, "b2": b2})
        with_dtype(got, trusted.float32, describe("mlp_tp", p, x=x, W1=W1, W2=W2, b1=b1, b2=b2))


@check
def mlp_bad_args(mlp_tp):
    x, W1, W2, b1, b2 = arrays(400, (3, 4), (8, 4), (4, 8), (8,), (4,))
    W1_in5, W2_h7, b1_7, b2_3 = arrays(401, (8, 5), (4, 7), (7,), (3,))
    expect_bad_args(mlp_tp, "mlp_tp", [
        (" with num_ranks=0", (x, W1, W2, 0), {}), (" with num_ranks=-1", (x, W1, W2, -1), {}),
        (" with num_ranks=2.5", (x, W1, W2, 2.5), {}), (" with num_ranks='2'", (x, W1, W2, "2"), {}),
        (" with x (3, 4) and W1 (8, 5)", (x, W1_in5, W2, 2), {}),
        (" with W1 (8, 4) and W2 (4, 7) (hidden sizes differ)", (x, W1, W2_h7, 2), {}),
        (" with W1 (8, 4) and b1 (7,)", (x, W1, W2, 2), {"b1": b1_7}),
        (" with W2 (4, 8) and b2 (3,)", (x, W1, W2, 2), {"b2": b2_3}),
    ])


make_read_only(__name__)
