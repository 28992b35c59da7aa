"""Checks for the tp_sequence notebook's layer_sp: a transformer layer's MLP block with
Megatron-LM's sequence parallelism (SP).

The block (stated in the notebook): y = x + MLP(layer_norm(x)), where
MLP(u) = activation(u @ W1.T + b1) @ W2.T + b2 and layer_norm normalizes over the last axis,
(x - mean) / sqrt(var + eps) * ln_weight + ln_bias (biased variance, as torch.nn.LayerNorm).
Activations are sequence-first, x (s, ..., h), as Megatron's [s, b, h]; rank r holds the
tokens balanced(s, p)[r] of x and of y (the residual stream stays sharded). The block makes
one all_gather along the sequence (of the normalized shards) and one reduce_scatter along the
sequence (of the row-parallel partial sums) and nothing else. A ring moves (p - 1) * N
elements in total for each of the two, N = s * ... * h, so together exactly the 2 (p - 1) * N
of the one all-reduce that the block needs without SP.
"""
from __future__ import annotations

import contextlib

from tpgrade import _trusted as trusted
from tpgrade import dense
from tpgrade._harness import check, make_read_only
from tpgrade._layers import (RANKS, call_raw, expect_bad_args, expect_counts,
                             expect_inputs_unchanged, expect_output, expect_pieces, last_call,
                             pieces_match, record, with_dtype)
from tpgrade.cases import arrays, balanced, f64, mlp, relu
from tpgrade.verdict import close, expect_array, fail

EPS = 1e-5


# --------------------------------------------------------------------------- the dense block


def _layer_norm(x, w, b, eps=EPS):
    """layer_norm(x) in float64 over the last axis, and its error scale."""
    y, _, inv_std = dense.layer_norm(x, w, b, eps)
    x = f64(x)
    return y, (abs(x) + abs(x.mean(axis=-1, keepdims=True))) * inv_std * abs(f64(w)) + abs(f64(b))


def _dense(x, ln_weight, ln_bias, W1, W2, b1=None, b2=None, activation=relu, eps=EPS):
    """y = x + MLP(layer_norm(x)) in float64, its error scale, and the normalized x."""
    u, u_scale = _layer_norm(x, ln_weight, ln_bias, eps)
    z, z_scale, _ = mlp(u, W1, W2, b1, b2, activation, x_scale=u_scale)
    return f64(x) + z, abs(f64(x)) + z_scale, u


def _shards(a, p):
    """Rank r's tokens of a sequence-first array: the balanced split along axis 0."""
    return [a[start:stop].copy() for start, stop in balanced(a.shape[0], p)]


def _block(seed, s, p, rest=(2,), hidden=4, ffn=8, biases=False, dtype=None):
    """Test data: x (s, *rest, hidden) split over p ranks, LayerNorm weights, W1, W2 (b1, b2)."""
    x, ln_w, ln_b, W1, W2, b1, b2 = arrays(
        seed, (s,) + tuple(rest) + (hidden,), (hidden,), (hidden,), (ffn, hidden),
        (hidden, ffn), (ffn,) if biases else None, (hidden,) if biases else None, dtype=dtype)
    ln_w = 1 + ln_w / 2     # around 1, as trained LayerNorm weights are
    return x, dict(ln_weight=ln_w, ln_bias=ln_b, W1=W1, W2=W2, b1=b1, b2=b2)


def _args(x, p, weights):
    args = (_shards(x, p), weights["ln_weight"], weights["ln_bias"], weights["W1"], weights["W2"])
    kwargs = {k: weights[k] for k in ("b1", "b2") if weights.get(k) is not None}
    return args, kwargs


def _describe(x, p, weights, activation=None):
    sizes = [z - a for a, z in balanced(x.shape[0], p)]
    parts = [f"x_shards: {p} rank(s) of x {x.shape}, tokens {sizes}"]
    parts += [f"{k} {v.shape}" for k, v in weights.items() if v is not None]
    if activation is not None:
        parts.append(f"activation={getattr(activation, '__name__', 'custom')}")
    return f"layer_sp({', '.join(parts)})"


# --------------------------------------------------------------------------- running it


def _expect_sequence_axis(calls, x, name):
    """Each collective of the block works along the sequence: axis 0 of (s, ..., h)."""
    for c in calls:
        if c.op in ("all_gather", "reduce_scatter") and c.axis is not None \
                and c.axis % x.ndim != 0:
            fail(f"{name}: {c.op} along axis {c.axis} of {x.ndim}-D activations: sequence "
                 f"parallelism splits the sequence, axis 0 of (s, ..., h) (Megatron's "
                 f"[s, b, h] layout); tpsim's default axis=-1 is the hidden axis, so pass axis=0")


@contextlib.contextmanager
def _recorded(x, name):
    """The collectives made in the block; one along the wrong axis is named even when the
    student's code then failed on the shapes it produced."""
    with record() as calls:
        try:
            yield calls
        finally:
            _expect_sequence_axis(calls, x, name)


def _run(layer_sp, x, p, weights, activation=None):
    """The student's shards of y, the collectives they made, and the call's description."""
    name = _describe(x, p, weights, activation)
    args, kwargs = _args(x, p, weights)
    if activation is not None:
        kwargs["activation"] = activation
    with _recorded(x, name) as calls:
        got = call_raw(layer_sp, args, kwargs)
    return _expect_shard_list(got, x, p, name), calls, name


def _expect_shard_list(got, x, p, name):
    if not isinstance(got, (list, tuple)):
        hint = ""
        if isinstance(got, trusted.ndarray) and got.shape == x.shape:
            hint = (": the whole of y on one rank? With SP the output stays sharded: return the "
                    "reduce_scatter's pieces, each plus its residual")
        fail(f"{name} returned {type(got).__name__}, expected a list with one array per rank "
             f"(item r: rank r's tokens of y){hint}")
    if len(got) != p:
        fail(f"{name} returned {len(got)} shard(s) for {p} ranks: one per rank, in rank order")
    for r, piece in enumerate(got):
        expect_array(piece, f"{name}: rank {r}'s shard")
    return list(got)


def _sp_case(layer_sp, x, p, weights, activation=None, dtype=trusted.float64):
    got, calls, name = _run(layer_sp, x, p, weights, activation)
    act = activation or relu
    want, scale, _ = _dense(x, activation=act, **weights)
    b2 = weights.get("b2")
    plain = want - (0 if b2 is None else f64(b2))
    no_ln, _, _ = mlp(x, weights["W1"], weights["W2"], weights.get("b1"), b2, act)
    explanations = [(want - f64(x), "the residual is missing: y = x + MLP(layer_norm(x)), "
                     "each rank adds its own tokens of x to its reduce_scatter piece"),
                    (f64(x) + no_ln, "layer_norm was not applied: the MLP reads layer_norm(x)")]
    if b2 is not None:
        explanations += [(plain, "b2 is missing: each rank adds it to its own tokens, once, "
                          "after the reduce_scatter")]
        explanations += [(plain + k * f64(b2), f"b2 was added {k} times: inside every rank's "
                          f"partial sum? Add it after the reduce_scatter")
                         for k in range(2, p + 1)]
    for r, (start, stop) in enumerate(balanced(x.shape[0], p)):
        tokens = x.shape[1:-1]
        hints = [((x.shape[0],) + x.shape[1:], f"rank {r} holds all {x.shape[0]} tokens: the "
                  f"output stays sharded along the sequence (reduce_scatter, not all_reduce)")]
        hints += [((stop - start,) + tokens + (z - a,), "split along the hidden axis: "
                   "reduce_scatter along the sequence, axis=0")
                  for a, z in balanced(x.shape[-1], p) if z - a != x.shape[-1]]
        expect_output(got[r], want[start:stop], scale[start:stop], dtype,
                      f"{name}: rank {r}'s tokens {start}:{stop} of y", hints,
                      [(wrong[start:stop], text) for wrong, text in explanations])
    return got, calls, name


# --------------------------------------------------------------------------- checks


@check
def sp_small(layer_sp):
    """2 ranks, x (4, 2, 4): rank 0 holds tokens 0-1, rank 1 tokens 2-3; W1 (8, 4), W2 (4, 8)."""
    x, weights = _block(501, 4, 2)
    _sp_case(layer_sp, x, 2, weights)


@check
def sp_matches_dense(layer_sp):
    for i, p in enumerate(RANKS):
        x, weights = _block(510 + i, 16, p, rest=(3,), hidden=6, ffn=24)
        _sp_case(layer_sp, x, p, weights)


@check
def sp_uneven_sequence(layer_sp):
    """s not divisible by p (the first s % p ranks get one more token), and empty shards."""
    for i, (s, p) in enumerate([(7, 2), (7, 4), (10, 3), (3, 8), (1, 4), (5, 8)]):
        x, weights = _block(520 + i, s, p, ffn=7)
        _sp_case(layer_sp, x, p, weights)


@check
def sp_input_dims(layer_sp):
    """(s, h) without a batch, and (s, b1, b2, h): the sequence is axis 0, features the last."""
    for i, rest in enumerate([(), (2, 3)]):
        for p in (2, 3):
            x, weights = _block(530 + i, 5, p, rest=rest)
            _sp_case(layer_sp, x, p, weights)


@check
def sp_biases_and_activation(layer_sp):
    """b1 sliced with W1's rows, b2 once on each rank's tokens after the reduce_scatter, the
    activation passed in applied to each rank's hidden units."""
    for i, p in enumerate(RANKS):
        x, weights = _block(540 + i, 9, p, ffn=12, biases=True)
        _sp_case(layer_sp, x, p, weights, activation=trusted.tanh if i % 2 else None)
    for i, p in enumerate((2, 3)):
        x, weights = _block(548 + i, 6, p, ffn=12, biases=True)
        _, calls, name = _run(layer_sp, x, p, weights)
        combining = [c for c in calls if c.op in ("reduce_scatter", "all_reduce")]
        if not combining:        # never combined: sp_one_gather_one_reduce_scatter says so
            continue
        total = combining[-1].inputs[0].astype(trusted.float64)
        for piece in combining[-1].inputs[1:]:
            total = total + piece
        u, u_scale = _layer_norm(x, weights["ln_weight"], weights["ln_bias"])
        want, scale, _ = mlp(u, weights["W1"], weights["W2"], weights["b1"], x_scale=u_scale)
        if total.shape != want.shape or not close(total, want, trusted.float64, scale):
            fail(f"{name}: the partial sums given to {combining[-1].op} do not add up to the MLP "
                 f"output without b2: add b2 after the reduce_scatter (each rank to its own "
                 f"tokens), never inside a partial, where it is counted once per rank")


@check
def sp_layernorm_on_shard(layer_sp):
    """The all_gather carries each rank's normalized tokens, layer_norm(x_r) (s_r, ..., h)."""
    for i, (s, p) in enumerate([(8, 2), (7, 3), (6, 4)]):
        x, weights = _block(550 + i, s, p)
        _, calls, name = _run(layer_sp, x, p, weights)
        gather = last_call(calls, "all_gather", name)
        shards = _shards(x, p)
        normed = [_layer_norm(x_r, weights["ln_weight"], weights["ln_bias"]) for x_r in shards]
        if pieces_match(gather, shards, [abs(x_r) for x_r in shards], trusted.float64):
            fail(f"{name}: the all_gather carries the raw tokens x_r: apply layer_norm on the "
                 f"rank's own shard, before the gather (it normalizes each token on its own, so "
                 f"each rank does s_r tokens' work; normalizing the gathered (s, ..., h) "
                 f"tensor repeats it on every rank and keeps the replicated activation that "
                 f"SP is there to remove)")
        expect_pieces(gather, [u for u, _ in normed], [sc for _, sc in normed], trusted.float64,
                      name,
                      "normalized tokens layer_norm(x_r) (s_r, ..., h)")


@check
def sp_one_gather_one_reduce_scatter(layer_sp):
    advice = {("all_reduce", "more"): "the row-parallel partial sums are combined by a "
              "reduce_scatter along the sequence: each rank needs only its own tokens of the "
              "sum (an all_reduce followed by a slice gives the same numbers for 1.5x the "
              "traffic)",
              ("reduce_scatter", 0): "without a reduce_scatter the partial sums are never "
              "combined into each rank's tokens",
              ("all_gather", 0): "the column-parallel W1 needs every token: all_gather the "
              "normalized shards along the sequence",
              ("all_gather", "more"): "gather once, the normalized tokens before W1; the "
              "hidden units stay sharded between W1 and W2",
              ("reduce_scatter", "more"): "one reduce_scatter, after W2"}
    for i, p in enumerate((1, 2, 3, 4)):
        x, weights = _block(560 + i, 7, p, biases=True)
        _, calls, name = _run(layer_sp, x, p, weights)
        expect_counts(calls, p, {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 0}, name,
                      advice)


@check
def sp_reduce_scatter_inputs(layer_sp):
    """Rank r passes its partial sum over all s tokens, activation(u @ W1_r.T) @ W2_r.T."""
    for i, (s, p, ffn) in enumerate([(6, 2, 12), (7, 3, 12), (5, 4, 7)]):
        x, weights = _block(570 + i, s, p, ffn=ffn)
        _, calls, name = _run(layer_sp, x, p, weights)
        scatter = last_call(calls, "reduce_scatter", name)
        u, u_scale = _layer_norm(x, weights["ln_weight"], weights["ln_bias"])
        partials = [mlp(u, weights["W1"][a:z], weights["W2"][:, a:z], x_scale=u_scale)
                    for a, z in balanced(ffn, p)]
        expect_pieces(scatter, [y for y, _, _ in partials], [sc for _, sc, _ in partials],
                      trusted.float64, name, "partial sum activation(u @ W1_r.T) @ W2_r.T over all "
                      "s tokens (s, ..., h)")


def _ring_elements(c):
    """Elements a ring moves in total over the p ranks: an all_gather passes each piece on to
    the p - 1 others; a reduce_scatter of N-element inputs, (p - 1) * N; an all_reduce is a
    reduce_scatter followed by an all_gather, 2 (p - 1) * N."""
    p = len(c.inputs)
    if c.op == "all_gather":
        return (p - 1) * sum(a.size for a in c.inputs)
    per_rank = c.inputs[0].size
    return (2 if c.op == "all_reduce" else 1) * (p - 1) * per_rank


@check
def sp_comm_bytes(layer_sp):
    """The all_gather and the reduce_scatter together move what one all_reduce of y moves."""
    for i, (s, p) in enumerate([(8, 2), (7, 3), (9, 4)]):
        x, weights = _block(580 + i, s, p, rest=(3,))
        _, calls, name = _run(layer_sp, x, p, weights)
        moved = sum(_ring_elements(c) for c in calls)
        budget = 2 * (p - 1) * x.size
        if moved != budget:
            fail(f"{name}: its collectives move {moved} elements in a ring ({moved / budget:.2g}x "
                 f"the {budget} of the one all-reduce of plain TP): an all_gather of the "
                 f"normalized shards ((p - 1) * N) and a reduce_scatter of the partial sums "
                 f"((p - 1) * N) together cost exactly one all-reduce (2 (p - 1) * N), "
                 f"N = {x.size} elements of (s, ..., h); anything more is extra traffic")


@check
def sp_inputs_unmodified(layer_sp):
    for i, p in enumerate((1, 3)):
        x, weights = _block(590 + i, 7, p, biases=True)
        args, kwargs = _args(x, p, weights)
        name = _describe(x, p, weights)
        with _recorded(x, name):
            expect_inputs_unchanged(layer_sp, name, args, kwargs,
                                    ("x_shards", "ln_weight", "ln_bias", "W1", "W2", "b1", "b2"))


@check
def sp_dtype(layer_sp):
    for i, p in enumerate((1, 2, 4)):
        x, weights = _block(595 + i, 9, p, dtype=trusted.float32)
        got, _, name = _sp_case(layer_sp, x, p, weights, dtype=trusted.float32)
        x, weights = _block(598 + i, 9, p, biases=True, dtype=trusted.float32)
        got_biased, _, biased_name = _run(layer_sp, x, p, weights)
        for r, (piece, biased) in enumerate(zip(got, got_biased)):
            with_dtype(piece, trusted.float32, f"{name}: rank {r}'s shard")
            with_dtype(biased, trusted.float32, f"{biased_name}: rank {r}'s shard")


@check
def sp_bad_args(layer_sp):
    x, w = _block(600, 5, 2, biases=True)
    shards = _shards(x, 2)
    good = (shards, w["ln_weight"], w["ln_bias"], w["W1"], w["W2"])
    (W1_in5, W2_out5, ln_5, b1_7, b2_3) = arrays(601, (8, 5), (5, 8), (5,), (7,), (3,))

    def replace(i, value):
        return good[:i] + (value,) + good[i + 1:]

    expect_bad_args(layer_sp, "layer_sp", [
        (" with an empty list of shards", replace(0, []), {}),
        (" with x as one array instead of a list of shards", replace(0, x), {}),
        (" with x_shards tokens [2, 3] (not the balanced split [3, 2])",
         replace(0, [x[:2], x[2:]]), {}),
        (" with shards of different batch sizes", replace(0, [shards[0], shards[1][:, :1]]), {}),
        (" with 1-D shards (no hidden axis to normalize over)",
         replace(0, [x[:3, 0, 0], x[3:, 0, 0]]), {}),
        (" with ln_weight (5,) for hidden size 4", replace(1, ln_5), {}),
        (" with W1 (8, 5) for hidden size 4", replace(3, W1_in5), {}),
        (" with W2 (5, 8): the output must have the hidden size 4 for the residual",
         replace(4, W2_out5), {}),
        (" with b1 (7,) for W1 (8, 4)", good, {"b1": b1_7}),
        (" with b2 (3,) for W2 (4, 8)", good, {"b2": b2_3}),
    ])


make_read_only(__name__)
