"""Checks for the tp_attention notebook: attention_heads, kv_head_ranges, qkv_shard,
attention_tp and transformer_layer_tp.

Each public function is one graded test cell: it raises (CheckFailed, an AssertionError)
with a message that names the mistake, and prints nothing when the solution is right.
Layouts (stated in the notebook): Wq (H*d, hidden), Wk and Wv (G*d, hidden), Wo (out, H*d);
rank r holds query heads balanced(H, p)[r] and the KV heads those read (cases.kv_heads);
the fused W_qkv is [Wq; Wk; Wv] and a rank's shard is [its q rows; its k rows; its v rows].
"""
from __future__ import annotations

from tpgrade import _attention_dense as dense
from tpgrade import _trusted as trusted
from tpgrade._harness import check, make_read_only
from tpgrade.dense import causal_mask, scores, softmax
from tpgrade._layers import (call, expect_bad_args, expect_counts, expect_inputs_unchanged,
                             expect_output, expect_pieces, last_call, record, reduced, with_dtype)
from tpgrade.cases import arrays, balanced, f64, kv_heads, relu
from tpgrade.verdict import CheckFailed, close, expect_unchanged, fail, snapshot

# --------------------------------------------------------------------------- test data


def _problem(seed, x_shape, H, G, d, out=None, bias=False, dtype=None):
    """x and the attention weights, scaled like a real init so that scores are O(1)."""
    hidden = x_shape[-1]
    out = hidden if out is None else out
    x, Wq, Wk, Wv, Wo, bo = arrays(seed, x_shape, (H * d, hidden), (G * d, hidden),
                                   (G * d, hidden), (out, H * d), (out,) if bias else None,
                                   dtype=dtype)
    return {"x": x, "Wq": Wq * hidden ** -0.5, "Wk": Wk * hidden ** -0.5,
            "Wv": Wv * hidden ** -0.5, "Wo": Wo * (H * d) ** -0.5, "bo": bo}


def _softmax_along(s, axis):
    return softmax(s.swapaxes(axis, -1)).swapaxes(axis, -1)


# --------------------------------------------------------------------------- attention_heads


def _heads_mistakes(q, k, v, causal):
    """(output, explanation) for the classic mistakes in scaled dot-product attention."""
    q, k, v = f64(q), f64(k), f64(v)
    d = q.shape[-1]
    masked = scores(q, k, causal)          # / sqrt(d), -inf above the diagonal if causal
    found = [(softmax(masked * d ** -0.5) @ v,
              "scores divided by head_dim instead of sqrt(head_dim)"),
             (softmax(masked * d ** 0.5) @ v,
              "scores not scaled: divide q @ k.T by sqrt(head_dim)"),
             (_softmax_along(masked, -2) @ v, "softmax over the queries axis: each query's "
              "weights are normalized over the keys (the last axis)")]
    if q.ndim >= 3 and q.shape[-3] > 1 and not causal:   # (masked: -inf in every head, NaN)
        found.append((_softmax_along(masked, -3) @ v, "softmax over the heads axis (the axis "
                      "tensor parallelism splits): each head normalizes over its own keys"))
    if causal:
        plain = scores(q, k, False)
        allowed = causal_mask(q.shape[-2])
        found += [
            (softmax(plain) @ v, "the causal mask is missing"),
            ((softmax(plain) * allowed) @ v, "the mask was applied after the softmax: "
             "mask the scores with -inf before it, so each row's weights sum to 1"),
            (softmax(plain * allowed) @ v, "masked scores were set to 0, not -inf: "
             "exp(0) = 1 still gives the future keys weight"),
            (softmax(plain + _penalty(allowed.T)) @ v, "the mask hides the past "
             "instead of the future: query i attends to keys j <= i"),
        ]
    return found


def _penalty(allowed):
    return trusted.asarray([float("-inf"), 0.0])[allowed.astype(int)]


def _heads_case(attention_heads, q, k, v, causal=False):
    name = f"attention_heads(q {q.shape}, k {k.shape}, v {v.shape}" + \
        (", causal=True)" if causal else ")")
    got = call(attention_heads, name, (q, k, v), {"causal": True} if causal else {})
    want, scale = dense.heads(q, k, v, causal)
    hints = [(q.shape[:-1] + (q.shape[-2],), "these are the attention weights (..., seq, seq): "
              "multiply them with v")]
    expect_output(got, want, scale, trusted.float64, name, hints, _heads_mistakes(q, k, v, causal))


def _qkv(seed, shape, magnitude=1.0):
    q, k, v = arrays(seed, shape, shape, shape)
    return q * magnitude, k * magnitude, v


@check
def heads_small(attention_heads):
    """2 heads, seq 3, head_dim 4: q, k, v of shape (2, 3, 4), no mask."""
    _heads_case(attention_heads, *_qkv(501, (2, 3, 4)))


@check
def heads_matches_dense(attention_heads):
    for i, shape in enumerate([(1, 1, 4), (3, 5, 8), (2, 3, 4, 2), (2, 1, 2, 6, 3), (4, 7, 1)]):
        _heads_case(attention_heads, *_qkv(510 + i, shape))


@check
def heads_scaling(attention_heads):
    """Scores are q @ k.T / sqrt(head_dim): head dims 1, 2, 9 and 16."""
    for i, d in enumerate((1, 2, 9, 16)):
        _heads_case(attention_heads, *_qkv(520 + i, (2, 4, d)))


@check
def heads_causal(attention_heads):
    for i, shape in enumerate([(2, 5, 4), (2, 3, 6, 3), (1, 1, 2), (3, 4, 8)]):
        _heads_case(attention_heads, *_qkv(530 + i, shape), causal=True)


@check
def heads_stable(attention_heads):
    """Scores in the thousands: exp overflows unless each row's maximum is subtracted first."""
    for i, shape in enumerate([(2, 5, 8), (3, 4, 16)]):
        q, k, v = _qkv(540 + i, shape, magnitude=40.0)
        name = f"attention_heads(q {q.shape}, k {k.shape}, v {v.shape}) with scores up to ~1e3"
        got = call(attention_heads, name, (q, k, v))
        if not bool((abs(got) < float("inf")).all()):
            fail(f"{name}: the output holds inf or NaN: exp of a large score overflows; "
                 f"subtract each row's maximum score before exp (softmax is unchanged by it)")
        _heads_case(attention_heads, q, k, v)


@check
def heads_inputs_unmodified(attention_heads):
    q, k, v = _qkv(550, (2, 4, 3))
    expect_inputs_unchanged(attention_heads, "attention_heads", (q, k, v), {"causal": True},
                            ("q", "k", "v", "causal"))


@check
def heads_bad_args(attention_heads):
    q, k, v = _qkv(560, (2, 4, 3))
    k5, v2d = arrays(561, (2, 5, 3), (4, 3))
    expect_bad_args(attention_heads, "attention_heads", [
        (" with q (2, 4, 3) and k (2, 5, 3)", (q, k5, v), {}),
        (" with v (4, 3) (not the shape of q)", (q, k, v2d), {}),
        (" with 2-D q, k, v (4, 3) (no heads axis)", (v2d, v2d, v2d), {}),
    ])


# --------------------------------------------------------------------------- kv_head_ranges


def _as_pairs(got, name, p):
    if not isinstance(got, (list, tuple)):
        fail(f"{name} returned {type(got).__name__}, expected a list of (start, stop) pairs")
    pairs = []
    for r, pair in enumerate(got):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
                isinstance(v, (int, trusted.integer)) and not isinstance(v, bool) for v in pair):
            fail(f"{name}: entry {r} is {pair!r}, expected a pair of ints (start, stop)")
        pairs.append((int(pair[0]), int(pair[1])))
    if len(pairs) != p:
        fail(f"{name} returned {len(pairs)} pairs for {p} ranks: one (start, stop) per rank")
    return pairs


def _expect_ranges(kv_head_ranges, H, G, p):
    name = f"kv_head_ranges({H}, {G}, {p})"
    got = _as_pairs(kv_head_ranges(H, G, p), name, p)
    want = kv_heads(H, G, p)
    for r, ((a, z), (wa, wz), (qa, qz)) in enumerate(zip(got, want, balanced(H, p))):
        if (a, z) == (wa, wz) or (wa == wz and a == z):   # no query heads: any empty range
            continue
        if got == balanced(G, p):
            hint = ("that is a balanced split of the KV heads on their own; a rank needs the KV "
                    "heads its query heads read, so with fewer KV heads than ranks several "
                    "ranks hold the same one")
        elif qa == qz:
            hint = "this rank has no query heads, so it holds no KV head: an empty range"
        else:
            hint = (f"rank {r} holds query heads {qa}..{qz - 1}, and query head j reads KV "
                    f"head j // {H // G} (num_heads // num_kv_heads)")
        fail(f"{name}: expected {want}, got {got}: rank {r} should hold KV heads "
             f"[{wa}, {wz}), not [{a}, {z}): {hint}")


@check
def kv_ranges_small(kv_head_ranges):
    """(4, 4, 2) -> [(0, 2), (2, 4)]; (8, 2, 4) -> [(0, 1), (0, 1), (1, 2), (1, 2)]."""
    for H, G, p in [(4, 4, 2), (8, 2, 4)]:
        _expect_ranges(kv_head_ranges, H, G, p)


@check
def kv_ranges_divisible(kv_head_ranges):
    for H, G, p in [(8, 8, 4), (8, 4, 2), (8, 2, 2), (16, 4, 4), (6, 3, 3), (5, 5, 1),
                    (32, 8, 8), (4, 1, 1)]:
        _expect_ranges(kv_head_ranges, H, G, p)


@check
def kv_ranges_replicated(kv_head_ranges):
    """Fewer KV heads than ranks, KV heads that do not divide the ranks, uneven query splits,
    and ranks without query heads."""
    for H, G, p in [(8, 1, 8), (8, 2, 4), (6, 2, 4), (6, 3, 4), (12, 4, 8), (4, 2, 8),
                    (3, 1, 8), (10, 5, 4)]:
        _expect_ranges(kv_head_ranges, H, G, p)


@check
def kv_ranges_bad_args(kv_head_ranges):
    expect_bad_args(kv_head_ranges, "kv_head_ranges", [
        (f"{args}", args, {}) for args in
        [(0, 1, 2), (4, 0, 2), (6, 4, 2), (2, 4, 1), (4, 2, 0), (4, 2, 2.5), ("4", 2, 2),
         (4, 2, -1)]])


# --------------------------------------------------------------------------- qkv_shard


def _qkv_rows(W, H, G, d, p, r):
    """Rank r's shard of the fused [Wq; Wk; Wv]: its q rows, then its k rows, then its v rows."""
    (qa, qz), (ka, kz) = balanced(H, p)[r], kv_heads(H, G, p)[r]
    k0, v0 = H * d, (H + G) * d
    return W[qa * d:qz * d], W[k0 + ka * d:k0 + kz * d], W[v0 + ka * d:v0 + kz * d]


def _stack(blocks):
    rows = [row for block in blocks for row in block]
    return trusted.asarray(rows).reshape(-1, blocks[0].shape[1])


def _same(got, want):
    return got.shape == want.shape and bool((got == want).all())


def _qkv_mistakes(W, H, G, d, p, r):
    a, z = balanced(W.shape[0], p)[r]
    q, k, v = _qkv_rows(W, H, G, d, p, r)
    (ka, kz), k0, v0 = balanced(G, p)[r], H * d, (H + G) * d
    return [
        (W[a:z], f"this is rank {r}'s contiguous block of W_qkv's rows, ColumnParallelLinear's "
         "plain split: right for Megatron-LM's per-group layout [q_g; k_g; v_g], but W_qkv here "
         "is vLLM's [q; k; v] blocks, so a rank takes its heads' rows from each block"),
        (_stack([q, W[k0 + ka * d:k0 + kz * d], W[v0 + ka * d:v0 + kz * d]]),
         "the KV heads were split evenly on their own; a rank holds the KV heads its query "
         "heads read (kv_head_ranges), replicated when there are fewer KV heads than ranks"),
        (_stack([q, v, k]), "v's rows came before k's: the local order is [q; k; v]"),
        (q, "only the query rows: the shard also holds its k and v rows"),
    ]


def _qkv_case(qkv_shard, seed, H, G, d, hidden, p):
    W, = arrays(seed, ((H + 2 * G) * d, hidden))
    for r in range(p):
        name = (f"qkv_shard(W_qkv {W.shape}, num_heads={H}, num_kv_heads={G}, num_ranks={p}, "
                f"rank={r})")
        got = call(qkv_shard, name, (W, H, G, p, r))
        want = _stack(list(_qkv_rows(W, H, G, d, p, r)))
        if _same(got, want):
            continue
        why = next((text for wrong, text in _qkv_mistakes(W, H, G, d, p, r) if _same(got, wrong)),
                   "rows [q heads of the rank; their KV heads' k rows; the same heads' v rows]")
        found = "other rows of that shape" if got.shape == want.shape else f"shape {got.shape}"
        fail(f"{name}: expected rows of shape {want.shape}, got {found}: {why}")


@check
def qkv_shard_small(qkv_shard):
    """2 heads, head_dim 2, hidden 3, 2 ranks: W_qkv (12, 3); rank 0 takes rows 0-1, 4-5, 8-9."""
    _qkv_case(qkv_shard, 601, 2, 2, 2, 3, 2)


@check
def qkv_shard_blocks(qkv_shard):
    """Multi-head attention (num_kv_heads == num_heads), heads divisible by the ranks."""
    for i, (H, d, p) in enumerate([(4, 2, 1), (4, 2, 2), (4, 3, 4), (6, 3, 3), (8, 1, 2)]):
        _qkv_case(qkv_shard, 610 + i, H, H, d, 5, p)


@check
def qkv_shard_uneven_heads(qkv_shard):
    for i, (H, d, p) in enumerate([(5, 2, 2), (6, 2, 4), (3, 2, 4), (1, 3, 2)]):
        _qkv_case(qkv_shard, 620 + i, H, H, d, 4, p)


@check
def qkv_shard_gqa(qkv_shard):
    """Grouped-query attention with at least as many KV heads as ranks."""
    for i, (H, G, p) in enumerate([(8, 4, 2), (8, 2, 2), (12, 4, 4), (8, 8, 4), (6, 3, 3)]):
        _qkv_case(qkv_shard, 630 + i, H, G, 2, 4, p)


@check
def qkv_shard_kv_replicated(qkv_shard):
    """Fewer KV heads than ranks (replicated), and KV heads that do not divide the ranks."""
    for i, (H, G, p) in enumerate([(8, 2, 4), (8, 1, 8), (6, 2, 4), (12, 4, 8), (4, 2, 8)]):
        _qkv_case(qkv_shard, 640 + i, H, G, 2, 4, p)


@check
def qkv_shard_bad_args(qkv_shard):
    W, W28, W1d = arrays(650, (24, 4), (28, 4), (24,))   # 24 rows: H=4, G=4, head_dim 2
    expect_bad_args(qkv_shard, "qkv_shard", [
        (" with rank=2 for num_ranks=2", (W, 4, 4, 2, 2), {}),
        (" with rank=-1", (W, 4, 4, 2, -1), {}),
        (" with num_ranks=0", (W, 4, 4, 0, 0), {}),
        (" with 24 rows for num_heads=5, num_kv_heads=5 (head_dim 24 / 15 is not an integer)",
         (W, 5, 5, 1, 0), {}),
        (" with num_kv_heads=4 not dividing num_heads=6 (28 rows, head_dim 2)",
         (W28, 6, 4, 2, 0), {}),
        (" with a 1-D W_qkv", (W1d, 4, 4, 2, 0), {}),
    ])


# --------------------------------------------------------------------------- attention_tp


def _attention_name(x, H, G, p, causal, bo):
    extra = ([f"num_kv_heads={G}"] if G != H else []) + (["bo"] if bo is not None else []) + \
        (["causal=True"] if causal else [])
    split = [z - a for a, z in balanced(H, p)]
    return (f"attention_tp(x {x.shape}, num_heads={H}, num_ranks={p}"
            + "".join(f", {e}" for e in extra) + f"; heads per rank {split})")


def _attention_kwargs(H, G, causal, bo):
    kwargs = {}
    if G != H:
        kwargs["num_kv_heads"] = G
    if bo is not None:
        kwargs["bo"] = bo
    if causal:
        kwargs["causal"] = True
    return kwargs


def _attention_mistakes(prob, H, G, p, causal, parts, shape):
    x, Wq, Wk, Wv, Wo, bo = (prob[k] for k in ("x", "Wq", "Wk", "Wv", "Wo", "bo"))
    found = []
    if p > 1:
        a, z = balanced(H, p)[0]
        found.append((dense.add_up(parts[a:z], shape, bo)[0], "this is rank 0's heads only: "
                      "all_reduce the partial outputs of all ranks"))
    if bo is not None:
        plain = dense.add_up(parts, shape)[0]
        found.append((plain, "bo is missing: add it once, after the all-reduce"))
        found += [(plain + k * f64(bo), f"bo was added {k} times: on every rank before the "
                   f"all-reduce? Add it once, after it") for k in range(2, p + 1)]
    if 1 < G < H:
        tiled = dense.head_contributions(x, Wq, Wk, Wv, Wo, H, G, causal, kv_of=lambda h: h % G)
        found.append((dense.add_up(tiled, shape, bo)[0], "query head j read KV head j % "
                      "num_kv_heads (np.tile); it reads KV head j // (num_heads // num_kv_heads) "
                      "(np.repeat: neighbouring query heads share a KV head)"))
    d = Wq.shape[0] // H
    if p > 1 and d > 1:   # every rank holding some features of every head
        pieces = [dense.head_contributions(x, Wq, Wk, Wv, Wo, H, G, causal, dims=dims)
                  for dims in balanced(d, p) if dims[1] > dims[0]]
        found.append((dense.add_up([c for piece in pieces for c in piece], shape, bo)[0],
                      "every rank held a slice of every head's features: the scores of part "
                      "of a head are not part of its softmax; a rank holds whole heads"))
    if causal:
        unmasked = dense.head_contributions(x, Wq, Wk, Wv, Wo, H, G, False)
        found.append((dense.add_up(unmasked, shape, bo)[0], "no causal mask: with causal=True "
                      "query i attends only to keys j <= i"))
    return found


def _attention_case(attention_tp, prob, H, G, p, causal=False, dtype=trusted.float64):
    x, Wq, Wk, Wv, Wo, bo = (prob[k] for k in ("x", "Wq", "Wk", "Wv", "Wo", "bo"))
    name = _attention_name(x, H, G, p, causal, bo)
    got = call(attention_tp, name, (x, Wq, Wk, Wv, Wo, H, p), _attention_kwargs(H, G, causal, bo))
    parts = dense.head_contributions(x, Wq, Wk, Wv, Wo, H, G, causal)
    shape = x.shape[:-1] + (Wo.shape[0],)
    want, scale = dense.add_up(parts, shape, bo)
    hints = [(x.shape[:-1] + (Wq.shape[0],), "this is the heads' output before the output "
              "projection: each rank multiplies its heads' output by its columns of Wo")]
    expect_output(got, want, scale, dtype, name, hints,
                  _attention_mistakes(prob, H, G, p, causal, parts, shape))
    return got


def _recorded(attention_tp, prob, H, G, p, causal=False):
    """Run attention_tp under the genuine recorder: (calls, per-rank expected partials)."""
    x, Wq, Wk, Wv, Wo, bo = (prob[k] for k in ("x", "Wq", "Wk", "Wv", "Wo", "bo"))
    name = _attention_name(x, H, G, p, causal, bo)
    with record() as calls:
        call(attention_tp, name, (x, Wq, Wk, Wv, Wo, H, p), _attention_kwargs(H, G, causal, bo))
    parts = dense.head_contributions(x, Wq, Wk, Wv, Wo, H, G, causal)
    shape = x.shape[:-1] + (Wo.shape[0],)
    partials = [dense.add_up(parts[a:z], shape) for a, z in balanced(H, p)]
    return name, calls, partials


@check
def attention_small(attention_tp):
    """x (3, 8), 4 heads of dim 2, 2 ranks: rank 0 holds heads 0-1, rank 1 heads 2-3."""
    _attention_case(attention_tp, _problem(701, (3, 8), 4, 4, 2), 4, 4, 2)


@check
def attention_matches_dense(attention_tp):
    for i, p in enumerate((1, 2, 3, 4, 6)):
        _attention_case(attention_tp, _problem(710 + i, (2, 5, 24), 12, 12, 2), 12, 12, p)


@check
def attention_uneven_heads(attention_tp):
    """Heads not divisible by the ranks, and ranks without heads (a head is never split)."""
    for i, (H, p) in enumerate([(6, 4), (5, 3), (3, 8), (1, 2), (7, 2)]):
        _attention_case(attention_tp, _problem(720 + i, (4, 6), H, H, 2), H, H, p)


@check
def attention_shapes(attention_tp):
    """x (seq, hidden) or (..., seq, hidden), seq 1, num_heads * head_dim != hidden, and an
    output size other than hidden."""
    cases = [((5, 8), 4, 2, None), ((2, 3, 8), 4, 2, None), ((2, 1, 3, 8), 2, 4, None),
             ((1, 8), 4, 2, None), ((4, 6), 4, 3, None), ((3, 6), 2, 2, 5)]
    for i, (shape, H, d, out) in enumerate(cases):
        for p in (2, 3):
            _attention_case(attention_tp, _problem(730 + i, shape, H, H, d, out), H, H, p)


@check
def attention_causal(attention_tp):
    for i, p in enumerate((1, 2, 3)):
        _attention_case(attention_tp, _problem(740 + i, (2, 6, 12), 6, 6, 2), 6, 6, p, True)
    _attention_case(attention_tp, _problem(744, (6, 8), 4, 2, 2), 4, 2, 2, True)


@check
def attention_gqa(attention_tp):
    """Grouped-query attention with at least as many KV heads as ranks."""
    for i, (H, G, p) in enumerate([(8, 4, 1), (8, 4, 2), (8, 2, 2), (12, 4, 4), (8, 8, 4)]):
        _attention_case(attention_tp, _problem(750 + i, (5, 16), H, G, 2), H, G, p)


@check
def attention_kv_replicated(attention_tp):
    """Fewer KV heads than ranks (each KV head replicated on the ranks whose query heads read
    it), KV heads that do not divide the ranks, and ranks without heads."""
    for i, (H, G, p) in enumerate([(8, 2, 4), (8, 1, 8), (6, 2, 4), (12, 4, 8), (4, 2, 8),
                                   (6, 3, 4)]):
        _attention_case(attention_tp, _problem(760 + i, (5, 12), H, G, 2), H, G, p)


@check
def attention_bias_once(attention_tp):
    for i, (H, p) in enumerate([(8, 1), (8, 2), (8, 3), (8, 4), (8, 8), (3, 8)]):
        _attention_case(attention_tp, _problem(770 + i, (4, 16), H, H, 2, bias=True), H, H, p)


@check
def attention_bias_after_reduce(attention_tp):
    """The partial outputs that go into the all-reduce must not contain bo."""
    for i, p in enumerate((2, 3, 4)):
        prob = _problem(780 + i, (3, 12), 6, 6, 2, bias=True)
        name, calls, partials = _recorded(attention_tp, prob, 6, 6, p)
        reduce = last_call(calls, "all_reduce", name)
        want, scale = dense.add_up(partials, partials[0][0].shape)
        if not close(reduced(reduce), want, trusted.float64, scale):
            fail(f"{name}: the partials given to all_reduce do not add up to the attention "
                 f"output without bo: add bo once, after the all-reduce, never inside a "
                 f"partial (RowParallelLinear's bias)")
        _attention_case(attention_tp, prob, 6, 6, p)


@check
def attention_one_all_reduce(attention_tp):
    advice = {("all_gather", "more"): "the heads' outputs stay on their ranks: the row-parallel "
              "output projection turns them into partial sums, combined by one all_reduce",
              ("all_reduce", "more"): "Q, K and V are column-parallel (each rank computes its "
              "own heads from the full x): no communication until after the output projection",
              ("all_reduce", 0): "without an all_reduce each rank holds only a partial output"}
    for i, (p, G, causal) in enumerate([(1, 4, False), (2, 2, True), (3, 4, False),
                                        (4, 4, True)]):
        prob = _problem(790 + i, (2, 4, 8), 4, G, 2, bias=True)
        name, calls, _ = _recorded(attention_tp, prob, 4, G, p, causal)
        expect_counts(calls, p, {"all_reduce": 1, "all_gather": 0}, name, advice)


@check
def attention_reduce_inputs(attention_tp):
    """Rank r passes the sum over its own heads of o_h @ Wo[:, h's columns].T; a rank
    without heads passes zeros."""
    for i, (H, G, p) in enumerate([(4, 4, 2), (6, 6, 4), (3, 3, 4), (8, 4, 4)]):
        prob = _problem(800 + i, (2, 3, 8), H, G, 2)
        name, calls, partials = _recorded(attention_tp, prob, H, G, p)
        reduce = last_call(calls, "all_reduce", name)
        expect_pieces(reduce, [y for y, _ in partials], [s for _, s in partials], trusted.float64,
                      name, "partial output (its heads' outputs times their columns of Wo)")


@check
def attention_inputs_unmodified(attention_tp):
    for i, p in enumerate((1, 2)):
        prob = _problem(810 + i, (2, 3, 8), 4, 2, 2, bias=True)
        x, Wq, Wk, Wv, Wo, bo = (prob[k] for k in ("x", "Wq", "Wk", "Wv", "Wo", "bo"))
        expect_inputs_unchanged(attention_tp, _attention_name(x, 4, 2, p, True, bo),
                                (x, Wq, Wk, Wv, Wo, 4, p),
                                {"num_kv_heads": 2, "bo": bo, "causal": True},
                                ("x", "Wq", "Wk", "Wv", "Wo", "num_heads", "num_ranks",
                                 "num_kv_heads", "bo", "causal"))


@check
def attention_dtype(attention_tp):
    for i, (G, p) in enumerate([(4, 1), (2, 2), (4, 4)]):
        prob = _problem(820 + i, (2, 4, 8), 4, G, 2, dtype=trusted.float32)
        got = _attention_case(attention_tp, prob, 4, G, p, dtype=trusted.float32)
        with_dtype(got, trusted.float32, _attention_name(prob["x"], 4, G, p, False, None))
        prob = _problem(825 + i, (2, 4, 8), 4, G, 2, bias=True, dtype=trusted.float32)
        x, Wq, Wk, Wv, Wo, bo = (prob[k] for k in ("x", "Wq", "Wk", "Wv", "Wo", "bo"))
        name = _attention_name(x, 4, G, p, True, bo)       # the mask and bo keep float32 too
        got = call(attention_tp, name, (x, Wq, Wk, Wv, Wo, 4, p), _attention_kwargs(4, G, True, bo))
        with_dtype(got, trusted.float32, name)
    prob = _problem(829, (3, 8), 4, 4, 2)
    with_dtype(_attention_case(attention_tp, prob, 4, 4, 2), trusted.float64,
               _attention_name(prob["x"], 4, 4, 2, False, None))


@check
def attention_bad_args(attention_tp):
    P = _problem(830, (3, 8), 4, 2, 2, bias=True)
    x, Wq, Wk, Wv, Wo = (P[k] for k in ("x", "Wq", "Wk", "Wv", "Wo"))
    x1, x7, Wk3, Wo7, bo5 = arrays(831, (8,), (3, 7), (3, 8), (7, 8), (5,))
    expect_bad_args(attention_tp, "attention_tp", [
        (" with num_ranks=0", (x, Wq, Wk, Wv, Wo, 4, 0), {"num_kv_heads": 2}),
        (" with num_ranks=2.5", (x, Wq, Wk, Wv, Wo, 4, 2.5), {"num_kv_heads": 2}),
        (" with num_heads=0", (x, Wq, Wk, Wv, Wo, 0, 2), {"num_kv_heads": 2}),
        (" with num_heads=3 and Wq (8, 8) (head_dim 8 / 3 is not an integer)",
         (x, Wq, Wk, Wv, Wo, 3, 2), {"num_kv_heads": 1}),
        (" with num_kv_heads=3 not dividing num_heads=4", (x, Wq, Wk3, Wk3, Wo, 4, 2),
         {"num_kv_heads": 3}),
        (" with Wk (4, 8) and num_kv_heads=4 (Wk needs 4 * head_dim = 8 rows)",
         (x, Wq, Wk, Wv, Wo, 4, 2), {"num_kv_heads": 4}),
        (" with Wo (7, 8) and bo (5,)", (x, Wq, Wk, Wv, Wo7, 4, 2),
         {"num_kv_heads": 2, "bo": bo5}),
        (" with Wo (8, 8) and Wq (8, 8) but x (3, 7) (hidden sizes differ)",
         (x7, Wq, Wk, Wv, Wo, 4, 2), {"num_kv_heads": 2}),
        (" with a 1-D x (no seq axis)", (x1, Wq, Wk, Wv, Wo, 4, 2), {"num_kv_heads": 2}),
    ])


# --------------------------------------------------------------------------- transformer layer


def _layer_params(seed, hidden, H, G, d, ffn):
    prob = _problem(seed, (1, hidden), H, G, d, bias=True)
    ln1_w, ln1_b, ln2_w, ln2_b, W1, b1, W2, b2 = arrays(
        seed + 1, (hidden,), (hidden,), (hidden,), (hidden,), (ffn, hidden), (ffn,),
        (hidden, ffn), (hidden,))
    return {"ln1_w": 1 + 0.1 * ln1_w, "ln1_b": 0.1 * ln1_b, "Wq": prob["Wq"],
            "Wk": prob["Wk"], "Wv": prob["Wv"], "Wo": prob["Wo"], "bo": 0.1 * prob["bo"],
            "ln2_w": 1 + 0.1 * ln2_w, "ln2_b": 0.1 * ln2_b, "W1": W1 * hidden ** -0.5,
            "b1": 0.1 * b1, "W2": W2 * ffn ** -0.5, "b2": 0.1 * b2}


def _layer_kwargs(H, G, causal, activation):
    kwargs = {"num_kv_heads": G} if G != H else {}
    if causal:
        kwargs["causal"] = True
    if activation is not None:
        kwargs["activation"] = activation
    return kwargs


def _layer_name(x, params, H, G, p, causal, activation):
    extra = ([f"num_kv_heads={G}"] if G != H else []) + (["causal=True"] if causal else []) + \
        ([f"activation={getattr(activation, '__name__', 'custom')}"] if activation else [])
    return (f"transformer_layer_tp(x {x.shape}, params (ffn {params['W1'].shape[0]}), "
            f"num_heads={H}, num_ranks={p}" + "".join(f", {e}" for e in extra) + ")")


def _layer_case(layer_tp, seed, x_shape, H, G, d, ffn, p, causal=False, activation=None):
    params = _layer_params(seed, x_shape[-1], H, G, d, ffn)
    x, = arrays(seed + 2, x_shape)
    name = _layer_name(x, params, H, G, p, causal, activation)
    got = call(layer_tp, name, (x, snapshot(params), H, p), _layer_kwargs(H, G, causal, activation))
    ref = dense.Layer.of(x, params, H, G, causal, 1e-5, activation or relu)
    expect_output(got, ref.y, ref.scale, trusted.float64, name, (),
                  _layer_mistakes(x, params, H, G, p, causal, activation, ref))


def _layer_mistakes(x, params, H, G, p, causal, activation, ref):
    found = [(ref.h, "this is h = x + attention(LN1(x)) + bo: the MLP block and its residual "
              "are missing"),
             (ref.y - f64(x), "the first residual (x) is missing")]
    for k in range(2, p + 1):
        many_bo = dense.Layer.of(x, {**params, "bo": k * params["bo"]}, H, G, causal, 1e-5,
                                 activation or relu)
        found += [(ref.y + (k - 1) * ref.h, f"the residual h was counted {k} times: added "
                   f"inside every rank's MLP partial? Add it once, after the all-reduce"),
                  (ref.y + (k - 1) * f64(params["b2"]), f"b2 was added {k} times: on every "
                   f"rank? Add it once, after the all-reduce"),
                  (many_bo.y, f"bo was added {k} times: on every rank? Add it once, after "
                   f"attention's all-reduce")]
    return found


@check
def layer_small(transformer_layer_tp):
    """x (4, 8), 2 heads of dim 4, ffn 16, 2 ranks."""
    _layer_case(transformer_layer_tp, 901, (4, 8), 2, 2, 4, 16, 2)


@check
def layer_matches_dense(transformer_layer_tp):
    for i, (H, G, p, act) in enumerate([(4, 4, 1, None), (4, 4, 2, None), (8, 4, 4, None),
                                        (4, 2, 2, trusted.tanh), (6, 3, 3, None)]):
        _layer_case(transformer_layer_tp, 910 + 3 * i, (2, 5, 12), H, G, 12 // H, 24, p,
                    activation=act)


@check
def layer_causal(transformer_layer_tp):
    for i, (H, G, p) in enumerate([(4, 2, 2), (6, 3, 3), (4, 4, 1)]):
        _layer_case(transformer_layer_tp, 925 + 3 * i, (2, 5, 12), H, G, 12 // H, 24, p,
                    causal=True)


@check
def layer_uneven(transformer_layer_tp):
    """Heads and MLP units not divisible by the ranks, and ranks without any."""
    for i, (H, ffn, p) in enumerate([(3, 5, 2), (3, 7, 4), (2, 3, 4), (5, 10, 3)]):
        _layer_case(transformer_layer_tp, 935 + 3 * i, (4, 10), H, H, 2, ffn, p)


def _layer_recorded(layer_tp, seed, H, G, p, causal=False):
    params = _layer_params(seed, 8, H, G, 8 // H, 12)
    x, = arrays(seed + 2, (2, 3, 8))
    name = _layer_name(x, params, H, G, p, causal, None)
    with record() as calls:
        call(layer_tp, name, (x, snapshot(params), H, p), _layer_kwargs(H, G, causal, None))
    return name, calls, dense.Layer.of(x, params, H, G, causal, 1e-5, relu)


@check
def layer_two_all_reduces(transformer_layer_tp):
    advice = {("all_reduce", "more"): "one all-reduce after attention's output projection and "
              "one after the MLP's W2; LayerNorm, residuals and biases need none (every rank "
              "holds the full, reduced activation)",
              ("all_reduce", "fewer"): "both blocks end with a row-parallel layer, and the "
              "LayerNorm between them needs the reduced attention output, not partial sums",
              ("all_gather", "more"): "nothing is gathered: both blocks are column -> row"}
    for i, (H, G, p) in enumerate([(4, 4, 2), (4, 2, 2), (4, 4, 3)]):
        name, calls, _ = _layer_recorded(transformer_layer_tp, 950 + 3 * i, H, G, p, i == 1)
        expect_counts(calls, p, {"all_reduce": 2, "all_gather": 0}, name, advice)


@check
def layer_reduce_inputs(transformer_layer_tp):
    """One all-reduce gets rank r's attention partial of LN1(x) (no bo, no residual); the last
    one gets rank r's MLP partial of LN2(h) (no b2, no residual). (How many there are is
    test_layer_two_all_reduces' business.)"""
    for i, (H, G, p) in enumerate([(4, 4, 2), (4, 2, 2), (4, 4, 4)]):
        name, calls, ref = _layer_recorded(transformer_layer_tp, 960 + 3 * i, H, G, p)
        reduces = [c for c in calls if c.op == "all_reduce"]
        last_call(calls, "all_reduce", name)
        attn = [ref.attention_partial(a, z) for a, z in balanced(H, p)]
        mlp = [ref.mlp_partial(slice(a, z)) for a, z in balanced(12, p)]
        _expect_one_of(reduces[:-1] or reduces, [y for y, _ in attn], [s for _, s in attn],
                       name + " (attention's all_reduce)",
                       "attention partial of LN1(x), without bo or the residual x")
        expect_pieces(reduces[-1], [y for y, _ in mlp], [s for _, s in mlp], trusted.float64,
                      name + " (last all_reduce)", "MLP partial of LN2(h), without b2 or the "
                      "residual h")


def _expect_one_of(calls, expected, scales, name, what):
    """Some call among `calls` got exactly the expected per-rank pieces (else: the first
    call's mismatch is reported)."""
    first = None
    for candidate in calls:
        try:
            expect_pieces(candidate, expected, scales, trusted.float64, name, what)
            return
        except CheckFailed as error:
            first = first or error
    raise first


@check
def layer_inputs_unmodified(transformer_layer_tp):
    for i, p in enumerate((1, 2)):
        params = _layer_params(970 + i, 8, 4, 2, 2, 12)
        x, = arrays(975 + i, (2, 3, 8))
        before, x_before = snapshot(params), x.copy()
        transformer_layer_tp(x, params, 4, p, num_kv_heads=2, causal=True)
        name = _layer_name(x, params, 4, 2, p, True, None)
        expect_unchanged(x_before, x, "x", name)
        expect_unchanged(before, params, "params", name)


@check
def layer_bad_args(transformer_layer_tp):
    params = _layer_params(980, 8, 4, 4, 2, 12)
    x, = arrays(981, (3, 8))
    Wo6, ln5, W2_11 = arrays(982, (6, 8), (5,), (8, 11))
    bad = [("num_ranks=0", {}, 0), ("Wo (6, 8): the attention output is not of size hidden = 8, "
                                    "so the residual x + attention cannot be formed",
                                    {"Wo": Wo6, "bo": params["bo"][:6]}, 2),
           ("ln1_w (5,) for hidden 8", {"ln1_w": ln5}, 2),
           ("W1 (12, 8) and W2 (8, 11) (MLP sizes differ)", {"W2": W2_11}, 2)]
    expect_bad_args(transformer_layer_tp, "transformer_layer_tp", [
        (f" with {what}", (x, {**params, **change}, 4, p), {}) for what, change, p in bad])


make_read_only(__name__)
