"""Checks for the tp_torch_attention notebook: head_ranges, the head-parallel projections,
ParallelAttention, ParallelTransformerLayer (on 2 CPU gloo ranks), measure_overhead's result
(2 ranks) and overhead_model (numbers only).

Each public function is one graded test cell (`from assignments.tp_torch_attention import
checks as check; check.attention_forward(ParallelAttention)`), as in tp_torch's checks: the
ranks (module-level functions here, forked by run_on_ranks) build the student's layer from
numpy data, run it and return numpy arrays, checked whole (tpgrade.replies) before the verdict
is decided in the caller with tpgrade.verdict against the float64 references of this
assignment's dense.py. Every rank gets its own master weights: the true rows (columns for Wo) of its heads, noise elsewhere, so a rank
that computes more than its heads gets a wrong answer. Sizes: hidden 6, 3 query heads of size
2 and 1 KV head on 2 ranks (heads 2 + 1, the KV head replicated on both).

The timing itself is judged by the gpu_runner (gpu_timing), next to its own measurement; here
only the shape of what measure_overhead returns.
"""
from __future__ import annotations

import math

from assignments.tp_torch_attention import dense as attention_dense
from tpgrade import _trusted as trusted
from tpgrade import replies, tensors, verdict
from tpgrade._harness import check, make_checks_read_only
from tpgrade._layers import expect_bad_args
from tpgrade._torch_trusted import as_numpy, backprop, get_rank, no_grad, run_on_ranks, tensor
from tpgrade._torch_trusted import torch_check as _torch_check
from tpgrade.cases import balanced, kv_heads
from tpgrade.verdict import expect_number, fail

TIMEOUT = 30           # seconds per run_on_ranks call
HIDDEN, HEADS, KV, FFN = 6, 3, 1, 5
SHAPE = (2, 4, HIDDEN)                       # batch, seq, hidden
RANKS = 2


# -- head_ranges ------------------------------------------------------------------------------------
def _as_pairs(got):
    """[(a, z), (ka, kz)] as exact ints, or None."""
    try:
        return [(trusted.index(a), trusted.index(b)) for a, b in got]
    except (TypeError, ValueError):
        return None


def _want_ranges(H, G, p, rank):
    return balanced(H, p)[rank], kv_heads(H, G, p)[rank]


@check
def head_ranges(head_ranges):
    """((a, z), (ka, kz)) for every rank: the balanced split of the query heads, and the KV heads
    they read (replicated when fewer than ranks); a rank without heads: any empty KV range."""
    for H, G, p in ((4, 4, 2), (8, 2, 4), (6, 3, 4), (6, 2, 4), (3, 1, 4), (6, 6, 4), (5, 5, 2)):
        for rank in range(p):
            got = head_ranges(H, G, rank, p)
            pairs = _as_pairs(got) if isinstance(got, (tuple, list)) and len(got) == 2 else None
            (a, z), (ka, kz) = _want_ranges(H, G, p, rank)
            call = f"head_ranges({H}, {G}, rank={rank}, world_size={p})"
            if pairs is None:
                fail(f"{call} returned {got!r}: expected ((a, z), (ka, kz)), two pairs of ints")
            if pairs[0] != (a, z):
                fail(f"{call}: query heads {pairs[0]}, expected {(a, z)} (the balanced split of "
                     f"the heads, shard_range: the first H % p ranks get one more)")
            empty_ok = a == z and pairs[1][0] == pairs[1][1]
            if pairs[1] != (ka, kz) and not empty_ok:
                why = (": with fewer KV heads than ranks a KV head is replicated on every rank "
                       "whose query heads read it" if G < p else
                       ": query head j reads KV head j // (H // G); hold exactly the KV heads "
                       "your query heads read")
                fail(f"{call}: KV heads {pairs[1]}, expected {(ka, kz)}{why}")


# -- test data --------------------------------------------------------------------------------------
def _weights(seed, ffn=None):
    return attention_dense.weights(seed, SHAPE, HEADS, KV, ffn)


def _masters(P, seed):
    return [attention_dense.master_weights(P, rank, RANKS, HEADS, KV, seed)
            for rank in range(RANKS)]


def _set(param, value):
    with no_grad():
        param.copy_(tensor(value))


# -- the projections' shards ----------------------------------------------------------------------
def _projection_shards(QKVParallelLinear, OutputParallelLinear, wq, wk, wv, wo):
    qkv = QKVParallelLinear(HIDDEN, HEADS, KV, tensor(wq), tensor(wk), tensor(wv))
    proj = OutputParallelLinear(HIDDEN, HEADS, True, tensor(wo))
    return (as_numpy(qkv.weight), as_numpy(getattr(qkv, "bias", None)), as_numpy(proj.weight),
            as_numpy(proj.bias))


def _recognisable(rows, cols, start):
    grid = trusted.arange(rows * cols, dtype=trusted.float32).reshape(rows, cols)
    return (grid + start).astype(trusted.float32)


_SHARDS_REPLY = replies.ranks(RANKS, replies.tensors("qkv.weight", "qkv.bias", "proj.weight",
                                                     "proj.bias"))


@_torch_check
def projection_shards(QKVParallelLinear, OutputParallelLinear):
    """2 ranks, 3 heads of size 2, 1 KV head: qkv.weight = [its q rows; the KV head's k rows;
    its v rows] (rank 0: 4 + 2 + 2 rows, rank 1: 2 + 2 + 2), proj.weight = its heads' columns of
    wo, proj.bias the full bias, zero."""
    d = HIDDEN // HEADS
    wq, wk, wv = (_recognisable(n * d, HIDDEN, s) for n, s in ((HEADS, 0), (KV, 100), (KV, 200)))
    wo = _recognisable(HIDDEN, HEADS * d, 300)
    per_rank = run_on_ranks(_projection_shards, RANKS, QKVParallelLinear, OutputParallelLinear,
                            wq, wk, wv, wo, timeout=TIMEOUT, reply=_SHARDS_REPLY)
    for rank, (w_qkv, b_qkv, w_out, b_out) in enumerate(per_rank):
        (a, z), (ka, kz) = attention_dense.head_ranges(HEADS, KV, rank, RANKS)
        kv_rows = list(wk[ka * d:kz * d]) + list(wv[ka * d:kz * d])
        want = trusted.asarray(list(wq[a * d:z * d]) + kv_rows)
        lo, hi = balanced(HEADS * d, RANKS)[rank]
        cut = trusted.asarray(list(wq[lo:hi]) + kv_rows)
        text = verdict.mismatch(w_qkv, want.astype(trusted.float64),
                                "qkv.weight (this rank's q rows, then its KV heads' k rows, "
                                "then v rows)",
                                shapes=[(cut.shape, "the q rows split by features, not by heads: "
                                                    "a head is cut between ranks"),
                                        (((HEADS + 2 * KV) * d, HIDDEN), "the whole fused weight: "
                                                                         "keep this rank's heads "
                                                                         "only")])
        if text:
            fail(f"{verdict.where(rank, RANKS)}: {text}")
        if b_qkv is not None:
            fail(f"{verdict.where(rank, RANKS)}: qkv has a bias: the QKV projection has none here "
                 f"(register_parameter('bias', None), or no .bias at all)")
        text = verdict.mismatch(w_out, wo[:, a * d:z * d].astype(trusted.float64),
                                "proj.weight (this rank's heads' columns of wo)",
                                shapes=[(wo.shape, "the whole wo: keep this rank's heads' "
                                                   "columns")])
        if text:
            fail(f"{verdict.where(rank, RANKS)}: {text}")
        if verdict.shape(b_out) != (HIDDEN,):
            fail(f"{verdict.where(rank, RANKS)}: proj.bias should be the FULL bias, shape "
                 f"({HIDDEN},); got {verdict.shape(b_out)}")
        text = tensors.zero_init(b_out, "proj.bias")
        if text:
            fail(f"{verdict.where(rank, RANKS)}: {text}")


# -- ParallelAttention ------------------------------------------------------------------------------
def _attention(ParallelAttention, masters, bo, x, g, causal, backward):
    m = masters[get_rank()]
    attn = ParallelAttention(HIDDEN, HEADS, KV, True, tensor(m["wq"]), tensor(m["wk"]),
                             tensor(m["wv"]), tensor(m["wo"]), causal=causal)
    _set(attn.proj.bias, bo)
    xs = tensor(x, requires_grad=backward)
    y = attn(xs)
    if not backward:
        return as_numpy(y)
    backprop(y, g, "ParallelAttention")
    return (as_numpy(y), as_numpy(xs.grad), as_numpy(attn.qkv.weight.grad),
            as_numpy(attn.proj.weight.grad), as_numpy(attn.proj.bias.grad))


def _attention_suspects(P, x, causal, dense):
    """(output, why) of the classic mistakes, from the dense reference."""
    found = [tensors.bias_every_rank(dense, P["bo"], RANKS)]
    if causal:
        found.append((attention_dense.attention(x, P["wq"], P["wk"], P["wv"], P["wo"], HEADS, KV,
                                                False, P["bo"]).y,
                      "no causal mask: query i must not see keys j > i (mask the scores with "
                      "-inf before the softmax)"))
    return found


@_torch_check
def attention_forward(ParallelAttention):
    """2 ranks (heads 2 + 1, the KV head on both): the dense output on every rank, with and
    without the causal mask."""
    P, x, g = _weights(601)
    masters = _masters(P, 611)
    for causal in (False, True):
        dense = attention_dense.attention(x, P["wq"], P["wk"], P["wv"], P["wo"], HEADS, KV, causal,
                                          P["bo"]).y
        per_rank = run_on_ranks(_attention, RANKS, ParallelAttention, masters, P["bo"], x, g,
                                causal, False, timeout=TIMEOUT,
                                reply=replies.ranks(RANKS, replies.Tensor("the output")))
        for rank, y in enumerate(per_rank):
            text = verdict.mismatch(y, dense,
                                    f"ParallelAttention's output (causal={causal})",
                                    suspects=_attention_suspects(P, x, causal, dense))
            if text:
                fail(f"{verdict.where(rank, RANKS)}: {text}")


_ATTENTION_GRADS = replies.ranks(RANKS, replies.tensors(
    "the output", "x.grad", "qkv.weight.grad", "proj.weight.grad", "proj.bias.grad"))


@_torch_check
def attention_backward(ParallelAttention):
    """2 ranks, causal: dL/dx on every rank; qkv.weight.grad (this rank's heads' rows, its share
    of the replicated KV head), proj.weight.grad (its columns), proj.bias.grad."""
    P, x, g = _weights(621)
    masters = _masters(P, 631)
    ref = attention_dense.attention(x, P["wq"], P["wk"], P["wv"], P["wo"], HEADS, KV, True,
                                    P["bo"], g)
    per_rank = run_on_ranks(_attention, RANKS, ParallelAttention, masters, P["bo"], x, g, True,
                            True, timeout=TIMEOUT, reply=_ATTENTION_GRADS)
    for rank, (_, gx, gqkv, gw, gb) in enumerate(per_rank):
        own = attention_dense.own_heads(x, P, HEADS, KV, rank, RANKS, True, g).dx
        for got, want, what, suspects in (
                (gx, ref.dx, "dL/dx", [tensors.own_term_only(own)]),
                (gqkv, ref.qkv_rows(rank, RANKS), "qkv.weight.grad (this rank's heads' rows of "
                 "the dense gradient; for a replicated KV head, the share of this rank's query "
                 "heads)", []),
                (gw, ref.proj_columns(rank, RANKS), "proj.weight.grad (this rank's columns of "
                 "the dense gradient)", []),
                (gb, ref.dbo, "proj.bias.grad", [tensors.bias_grad_rank0_only(ref.dbo)])):
            text = verdict.mismatch(got, want, what, missing="the output is not connected to it in "
                                                             "autograd", suspects=suspects)
            if text:
                fail(f"{verdict.where(rank, RANKS)}: {text}")


# -- ParallelTransformerLayer -----------------------------------------------------------------------
def _layer(ParallelTransformerLayer, masters, P, x, g):
    m = masters[get_rank()]
    layer = ParallelTransformerLayer(HIDDEN, HEADS, FFN, KV, True, *(tensor(m[k]) for k in (
        "wq", "wk", "wv", "wo", "w1", "w2")), causal=True)
    lo_hi = balanced(FFN, RANKS)[get_rank()]
    for param, value in ((layer.ln1.weight, P["ln1_w"]), (layer.ln1.bias, P["ln1_b"]),
                         (layer.ln2.weight, P["ln2_w"]), (layer.ln2.bias, P["ln2_b"]),
                         (layer.attn.proj.bias, P["bo"]),
                         (layer.mlp.fc1.bias, P["b1"][lo_hi[0]:lo_hi[1]]),
                         (layer.mlp.fc2.bias, P["b2"])):
        _set(param, value)
    xs = tensor(x, requires_grad=True)
    y = layer(xs)
    backprop(y, g, "ParallelTransformerLayer")
    return (as_numpy(y), as_numpy(xs.grad), as_numpy(layer.ln1.weight.grad),
            as_numpy(layer.attn.qkv.weight.grad), as_numpy(layer.mlp.fc1.weight.grad))


_LAYER_REPLY = replies.ranks(RANKS, replies.tensors(
    "the output", "x.grad", "ln1.weight.grad", "attn.qkv.weight.grad", "mlp.fc1.weight.grad"))


def _layer_run(ParallelTransformerLayer, seed):
    P, x, g = _weights(seed, ffn=FFN)
    masters = _masters(P, seed + 5)
    ref = attention_dense.layer(x, P, HEADS, KV, True, 1e-5, g)
    return P, ref, run_on_ranks(_layer, RANKS, ParallelTransformerLayer, masters, P, x, g,
                                timeout=TIMEOUT, reply=_LAYER_REPLY)


@_torch_check
def layer_forward(ParallelTransformerLayer):
    """2 ranks, causal: the dense pre-LN layer's output on every rank."""
    P, ref, per_rank = _layer_run(ParallelTransformerLayer, 641)
    for rank, (y, *_) in enumerate(per_rank):
        text = verdict.mismatch(y, ref.y,
                                "ParallelTransformerLayer's output (x + attention(LN1(x)), "
                                "then h + MLP(LN2(h)))",
                                suspects=[tensors.bias_every_rank(ref.y, P["b2"], RANKS)])   # fc2's
        if text:
            fail(f"{verdict.where(rank, RANKS)}: {text}")


@_torch_check
def layer_backward(ParallelTransformerLayer):
    """2 ranks, causal: dL/dx, ln1.weight.grad, attn.qkv.weight.grad, mlp.fc1.weight.grad."""
    P, ref, per_rank = _layer_run(ParallelTransformerLayer, 651)
    for rank, (_, gx, g_ln, g_qkv, g_fc1) in enumerate(per_rank):
        lo, hi = balanced(FFN, RANKS)[rank]
        for got, want, what in (
                (gx, ref.dx, "dL/dx"),
                (g_ln, ref.params["ln1_w"], "ln1.weight.grad (LayerNorm is replicated: the same "
                 "full gradient on every rank)"),
                (g_qkv, ref.attention.qkv_rows(rank, RANKS), "attn.qkv.weight.grad"),
                (g_fc1, ref.params["w1"][lo:hi], "mlp.fc1.weight.grad")):
            text = verdict.mismatch(got, want, what, missing="the output is not connected to it in "
                                                             "autograd")
            if text:
                fail(f"{verdict.where(rank, RANKS)}: {text}")


# -- measure_overhead: what it returns ------------------------------------------------------------
_SIZES = (64, 96)


def _measured(measure_overhead):
    got = measure_overhead(list(_SIZES), tokens=8, repeats=3, warmup=1)
    if not isinstance(got, dict):
        return f"a {type(got).__name__}"
    out = {}
    for key, value in got.items():
        try:
            out[trusted.index(key)] = [float(v) for v in value]
        except (TypeError, ValueError):
            return f"{{{key!r}: {value!r}, ...}}"
    return out


# what _measured sends: a description of what came instead of a dict, or the dict, each entry
# a list of floats (their number is part of the verdict)
_MEASURED_REPLY = replies.ranks(RANKS, replies.Either(
    replies.Text("what measure_overhead returned"),
    replies.Mapping("measure_overhead's result", keys=replies.Number("a size", integer=True),
                    values=replies.Sequence(replies.Number("a time"), "the times", limit=100),
                    limit=100)))


@_torch_check
def overhead_result(measure_overhead):
    """2 ranks, sizes (64, 96): {n: (compute_ms, comm_ms)} on every rank, two positive numbers
    per size (milliseconds)."""
    per_rank = run_on_ranks(_measured, RANKS, measure_overhead, timeout=TIMEOUT,
                            reply=_MEASURED_REPLY)
    for rank, got in enumerate(per_rank):
        where = verdict.where(rank, RANKS)
        if isinstance(got, str):
            fail(f"{where}: measure_overhead returned {got}, expected a dict "
                 f"{{n: (compute_ms, comm_ms)}}")
        if sorted(got) != list(_SIZES):
            fail(f"{where}: measure_overhead returned the keys {sorted(got)}, expected the sizes "
                 f"{list(_SIZES)}")
        for n, pair in got.items():
            if len(pair) != 2 or not all(0 < v < math.inf for v in pair):
                fail(f"{where}: measure_overhead(...)[{n}] = {pair}: expected two positive "
                     f"numbers, the median compute and communication times in milliseconds")


# -- overhead_model ---------------------------------------------------------------------------------
MODEL_KEYS = ("bytes_per_rank", "flops_per_rank", "comm_seconds", "compute_seconds", "comm_share")


def model(tokens, hidden, tp, dtype_bytes, link_bytes_per_s, flops_per_s):
    """The reference: one rank's row-parallel matmul (tokens, hidden/tp) @ (hidden/tp, hidden)
    and the ring all-reduce of its (tokens, hidden) partial output (tp_cost's conventions)."""
    nbytes = 2 * (tp - 1) / tp * tokens * hidden * dtype_bytes
    flops = 2 * tokens * (hidden // tp) * hidden
    comm, compute = nbytes / link_bytes_per_s, flops / flops_per_s
    return {"bytes_per_rank": nbytes, "flops_per_rank": flops, "comm_seconds": comm,
            "compute_seconds": compute, "comm_share": comm / (comm + compute)}


EXAMPLE = dict(tokens=4096, hidden=8192, tp=8, dtype_bytes=2, link_bytes_per_s=450e9,
               flops_per_s=989e12)
_HINTS = {
    "bytes_per_rank": "a ring all-reduce of N elements makes every rank send "
                      "2 (tp - 1) / tp * N * dtype_bytes bytes; N = tokens * hidden",
    "flops_per_rank": "2 m k n for (m, k) @ (k, n): 2 * tokens * (hidden / tp) * hidden",
    "comm_seconds": "bytes_per_rank / link_bytes_per_s",
    "compute_seconds": "flops_per_rank / flops_per_s",
    "comm_share": "comm_seconds / (comm_seconds + compute_seconds): no overlap",
}


def _model_case(overhead_model, config):
    name = "overhead_model(" + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")"
    got = overhead_model(**config)
    if not isinstance(got, dict):
        fail(f"{name} returned {type(got).__name__}, expected a dict with keys "
             f"{list(MODEL_KEYS)}")
    want = model(**config)
    for key in MODEL_KEYS:
        if key not in got:
            fail(f"{name} has no key {key!r}: the dict holds {list(MODEL_KEYS)}")
        expect_number(got[key], want[key], f"{name}[{key!r}]", _HINTS[key])


@check
def model_example(overhead_model):
    """The notebook's worked example (8192 features on 8 ranks, NVLink-class numbers)."""
    _model_case(overhead_model, dict(EXAMPLE))


@check
def model_values(overhead_model):
    """Other sizes, ranks, dtypes and rates; tp = 1 (no communication, share 0)."""
    for config in (dict(EXAMPLE, tp=2), dict(EXAMPLE, tokens=64, hidden=512, dtype_bytes=4,
                                              link_bytes_per_s=2e9, flops_per_s=50e9),
                   dict(EXAMPLE, tp=1), dict(EXAMPLE, hidden=12288, tp=4, link_bytes_per_s=50e9),
                   dict(EXAMPLE, tokens=1, hidden=6, tp=3, dtype_bytes=1)):
        _model_case(overhead_model, config)


@check
def model_bad_args(overhead_model):
    """ValueError for sizes that are not ints >= 1, hidden not divisible by tp, rates <= 0."""
    cases = [("hidden=1000 with tp=3 (not divisible)", dict(EXAMPLE, hidden=1000, tp=3)),
             ("tp=0", dict(EXAMPLE, tp=0)), ("tokens=0", dict(EXAMPLE, tokens=0)),
             ("tp=2.5", dict(EXAMPLE, tp=2.5)), ("hidden=True", dict(EXAMPLE, hidden=True)),
             ("link_bytes_per_s=0", dict(EXAMPLE, link_bytes_per_s=0)),
             ("flops_per_s=-1", dict(EXAMPLE, flops_per_s=-1.0))]
    expect_bad_args(overhead_model, "overhead_model", [(f" with {what}", (), c)
                                                       for what, c in cases])


make_checks_read_only(__name__)
