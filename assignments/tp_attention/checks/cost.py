"""Checks for the tp_attention notebook's cost model, tp_cost(config).

The conventions (every one stated in the notebook, with a worked example):

* A transformer layer = attention + MLP (ffn units, one activation, no gate). TP degree t.
  head_dim d = hidden / heads; each rank holds heads / t query heads and
  G_r = kv_heads / t KV heads, or 1 (replicated) when kv_heads < t; ffn / t MLP units.
* All-reduces: 2 per layer forward, 4 with backward, 0 when t == 1.
* Bytes per rank: each all-reduce is on a (batch, seq, hidden) activation; a ring all-reduce
  of N elements makes every rank send 2 (t - 1) / t * N * dtype_bytes bytes.
* FLOPs per rank: a matmul (m, k) @ (k, n) costs 2 m k n. Per layer, with T = batch * seq:
  QKV 2 T hidden (H_r + 2 G_r) d, scores and probabilities @ V 4 batch H_r seq^2 d (all of
  them: no causal saving), output projection 2 T H_r d hidden, MLP 4 T hidden ffn_r;
  LayerNorm, softmax, activation, biases and residuals are not counted. Backward = 2x the
  forward, so forward + backward = 3x.
* Times: bytes / link_bytes_per_s and FLOPs / flops_per_s, no overlap, no latency.
"""
from __future__ import annotations

from tpgrade._harness import check, make_read_only
from tpgrade._layers import expect_bad_args
from tpgrade.verdict import expect_number, fail

KEYS = ("allreduces", "bytes_per_rank", "flops_per_rank", "comm_seconds", "compute_seconds",
        "comm_to_compute")


def config(layers=2, hidden=1024, heads=16, kv_heads=None, ffn=4096, seq=512, batch=2, tp=4,
           dtype_bytes=2, backward=False, link_bytes_per_s=100e9, flops_per_s=100e12):
    """A test configuration (multi-head attention unless kv_heads is given)."""
    kv_heads = heads if kv_heads is None else kv_heads
    return dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn, seq=seq,
                batch=batch, tp=tp, dtype_bytes=dtype_bytes, backward=backward,
                link_bytes_per_s=link_bytes_per_s, flops_per_s=flops_per_s)


def expected(c):
    """The reference answers for a valid config (the formulas above)."""
    t, L, b, s, h = c["tp"], c["layers"], c["batch"], c["seq"], c["hidden"]
    d, tokens = h // c["heads"], b * s
    heads_r, ffn_r = c["heads"] // t, c["ffn"] // t
    kv_r = c["kv_heads"] // t if c["kv_heads"] >= t else 1
    allreduces = (4 if c["backward"] else 2) * L if t > 1 else 0
    nbytes = allreduces * 2 * (t - 1) / t * tokens * h * c["dtype_bytes"]
    forward = (2 * tokens * h * (heads_r + 2 * kv_r) * d + 4 * b * heads_r * s * s * d
               + 2 * tokens * heads_r * d * h + 4 * tokens * h * ffn_r)
    flops = L * forward * (3 if c["backward"] else 1)
    comm, compute = nbytes / c["link_bytes_per_s"], flops / c["flops_per_s"]
    return dict(allreduces=allreduces, bytes_per_rank=nbytes, flops_per_rank=flops,
                comm_seconds=comm, compute_seconds=compute, comm_to_compute=comm / compute)


def _describe(c):
    shown = {k: v for k, v in c.items() if k not in ("link_bytes_per_s", "flops_per_s")}
    return "tp_cost(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _expect_keys(tp_cost, c, keys, hints):
    name = _describe(c)
    got = tp_cost(dict(c))
    if not isinstance(got, dict):
        fail(f"{name} returned {type(got).__name__}, expected a dict with keys {list(KEYS)}")
    want = expected(c)
    for key in keys:
        if key not in got:
            fail(f"{name} has no key {key!r}: the dict holds {list(KEYS)}")
        expect_number(got[key], want[key], f"{name}[{key!r}]", hints.get(key, ""))


_HINTS = {
    "allreduces": "2 per layer forward (after attention's output projection, after the MLP's "
                  "W2), 4 per layer with backward, 0 when tp == 1",
    "bytes_per_rank": "every all-reduce moves a (batch, seq, hidden) activation: each rank "
                      "sends 2 (tp - 1) / tp * batch * seq * hidden * dtype_bytes bytes",
    "flops_per_rank": "2 m k n per matmul: QKV, scores, probabilities @ V, output projection, "
                      "the MLP's two matmuls, on this rank's heads (KV heads replicated when "
                      "fewer than tp) and MLP units; times layers; times 3 with backward",
    "comm_seconds": "bytes_per_rank / link_bytes_per_s",
    "compute_seconds": "flops_per_rank / flops_per_s",
    "comm_to_compute": "comm_seconds / compute_seconds",
}


@check
def cost_example(tp_cost):
    """The notebook's worked example (GQA, 4 ranks, forward only): every key."""
    _expect_keys(tp_cost, config(kv_heads=4), KEYS, _HINTS)


@check
def cost_allreduces(tp_cost):
    for c in [config(layers=3, tp=2), config(layers=5, tp=8, backward=True),
              config(tp=1), config(tp=1, backward=True), config(layers=7, tp=16, heads=32)]:
        _expect_keys(tp_cost, c, ("allreduces",), _HINTS)


@check
def cost_bytes(tp_cost):
    for c in [config(layers=3, tp=2, dtype_bytes=4), config(tp=8, seq=300, backward=True),
              config(tp=1), config(layers=1, hidden=768, heads=12, ffn=3072, tp=3, batch=5)]:
        _expect_keys(tp_cost, c, ("bytes_per_rank",), _HINTS)


@check
def cost_flops(tp_cost):
    """Multi-head, grouped-query (KV heads divided, and replicated when fewer than tp),
    forward and forward + backward."""
    for c in [config(tp=2), config(layers=3, kv_heads=8, tp=4, seq=100),
              config(heads=32, kv_heads=2, hidden=2048, tp=8),       # KV heads replicated
              config(kv_heads=1, tp=4, backward=True), config(tp=1, seq=7, batch=3),
              config(layers=1, hidden=768, heads=12, kv_heads=12, ffn=3072, tp=3)]:
        _expect_keys(tp_cost, c, ("flops_per_rank",), _HINTS)


@check
def cost_time_ratio(tp_cost):
    for c in [config(tp=8, link_bytes_per_s=450e9, flops_per_s=989e12),
              config(layers=4, tp=2, seq=2048, link_bytes_per_s=25e9, flops_per_s=300e12),
              config(tp=1)]:
        _expect_keys(tp_cost, c, ("comm_seconds", "compute_seconds", "comm_to_compute"), _HINTS)


@check
def cost_bad_config(tp_cost):
    cases = [("hidden=4096 with heads=12 (head_dim 341.33...)",
              config(hidden=4096, heads=12, kv_heads=12, tp=4)),
             ("heads=12 with tp=8 (heads not divisible by tp)",
              config(hidden=768, heads=12, kv_heads=12, tp=8)),
             ("kv_heads=3 with tp=2 (neither divides the other)",
              config(hidden=768, heads=12, kv_heads=3, tp=2)),
             ("heads=16 with kv_heads=5", config(kv_heads=5, tp=1)),
             ("ffn=1000 with tp=3 (ffn not divisible by tp)",
              config(hidden=768, heads=12, kv_heads=12, ffn=1000, tp=3)),
             ("tp=0", config(tp=0)), ("layers=0", config(layers=0)),
             ("tp=2.5", config(tp=2.5))]
    expect_bad_args(tp_cost, "tp_cost", [(f" with {what}", (c,), {}) for what, c in cases])


make_read_only(__name__)
