"""Dense float64 attention and pre-LN transformer layer, forward AND backward, in numpy, and
their test data (the weights, and the master weights each rank is given).

The references of the torch attention assignment: its notebook checks (checks.py, 2 CPU
ranks) and its gpu_runner judge (gpu/judge.py, in the grader process, which imports no
torch). Layouts as in tp_attention and tp_torch_attention: Wq (H*d, hidden), Wk and Wv
(G*d, hidden), Wo (out, H*d), query head h reads KV head h // (H / G); the loss of every
backward is L = sum(y * upstream).

Weight gradients are kept per query head (`Grads.wk_of[h]`: query head h's share of its KV
head's rows), because a rank's autograd sees only its own heads: a KV head replicated on several
ranks gets on each rank the share of the query heads that rank holds (`qkv_rows`), and the dense
gradient is their sum over the replicas.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tpgrade import _trusted as trusted
from tpgrade.cases import arrays, balanced, f64, kv_heads
from tpgrade.dense import causal_mask, layer_norm, layer_norm_backward, scores, softmax, zeros
from tpgrade.tensors import gelu, noisy_master

def _t(a):
    return a.swapaxes(-1, -2)


def _flat(a):
    """(..., n) -> (rows, n): the batch and sequence axes as one (for weight gradients)."""
    return a.reshape(-1, a.shape[-1])


def _wgrad(d_out, inp):
    """dL/dW of out = inp @ W.T: sum over every position of d_out^T inp."""
    return _t(_flat(d_out)) @ _flat(inp)


@dataclass
class Grads:
    """Attention's output and gradients (no bias in `y_heads`; `bo` added once in `y`)."""
    y: object
    y_heads: list
    dx: object
    dwq: object                                  # (H*d, hidden)
    dwo: object                                  # (out, H*d)
    dbo: object                                  # (out,)
    wk_of: list = field(default_factory=list)    # per query head: its share of dL/dWk[kv rows]
    wv_of: list = field(default_factory=list)
    heads: int = 0
    kv: int = 0
    d: int = 0

    def qkv_rows(self, rank, size):
        """What rank `rank` of `size` holds as dL/d(its fused [q; k; v] weight rows): its query
        heads' rows of dWq, and for each KV head it holds, the share of ITS query heads."""
        (a, z), (ka, kz) = head_ranges(self.heads, self.kv, rank, size)
        group, d = self.heads // self.kv, self.d
        rows = [self.dwq[a * d:z * d]]
        for shares in (self.wk_of, self.wv_of):
            for g in range(ka, kz):
                mine = [shares[h] for h in range(a, z) if h // group == g]
                total = mine[0]
                for extra in mine[1:]:
                    total = total + extra
                rows.append(total)
        return _concat(rows, self.dwq.shape[1])

    def proj_columns(self, rank, size):
        (a, z), _ = head_ranges(self.heads, self.kv, rank, size)
        return self.dwo[:, a * self.d:z * self.d]


def head_ranges(num_heads, num_kv_heads, rank, size):
    """((a, z), (ka, kz)): the query heads of `rank` (the balanced split of the heads) and the
    KV heads they read (tp_attention's rule: replicated when fewer than ranks)."""
    return balanced(num_heads, size)[rank], kv_heads(num_heads, num_kv_heads, size)[rank]


def _concat(blocks, width):
    out = zeros((sum(b.shape[0] for b in blocks), width))
    start = 0
    for b in blocks:
        out[start:start + b.shape[0]] = b
        start += b.shape[0]
    return out


def _head_forward(x, wq, wk, wv, causal, mask_after=False):
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    if causal and mask_after:              # a mistake, for diagnoses: rows no longer sum to 1
        p = softmax(scores(q, k, False)) * causal_mask(q.shape[-2])
    else:
        p = softmax(scores(q, k, causal))
    return q, k, v, p, p @ v


def attention(x, wq, wk, wv, wo, num_heads, num_kv_heads, causal=False, bo=None,
              upstream=None, mask_after=False) -> Grads:
    """Dense (grouped-query) attention y = sum_h o_h @ Wo_h.T + bo, and with `upstream` the
    gradients of L = sum(y * upstream). `mask_after`: the causal mask applied after the softmax
    (a classic mistake, forward only)."""
    x, wq, wk, wv, wo = (f64(a) for a in (x, wq, wk, wv, wo))
    H, G = num_heads, num_kv_heads
    d, group = wq.shape[0] // H, H // G
    out_shape = x.shape[:-1] + (wo.shape[0],)
    U = None if upstream is None else f64(upstream)
    g = Grads(y=None, y_heads=[], dx=zeros(x.shape), dwq=zeros(wq.shape), dwo=zeros(wo.shape),
              dbo=zeros((wo.shape[0],)) if U is None else _flat(U).sum(axis=0),
              heads=H, kv=G, d=d)
    for h in range(H):
        rows, kv_rows = slice(h * d, (h + 1) * d), slice(h // group * d, (h // group + 1) * d)
        q, k, v, p, o = _head_forward(x, wq[rows], wk[kv_rows], wv[kv_rows], causal, mask_after)
        g.y_heads.append(o @ wo[:, rows].T)
        if U is None:
            continue
        g.dwo[:, rows] = _wgrad(U, o)
        do = U @ wo[:, rows]
        dp = do @ _t(v)
        dv = _t(p) @ do
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))   # softmax backward; 0 if masked
        dq, dk = ds @ k * d ** -0.5, _t(ds) @ q * d ** -0.5
        g.dwq[rows] = _wgrad(dq, x)
        g.wk_of.append(_wgrad(dk, x))
        g.wv_of.append(_wgrad(dv, x))
        g.dx = g.dx + dq @ wq[rows] + dk @ wk[kv_rows] + dv @ wv[kv_rows]
    y = zeros(out_shape)
    for part in g.y_heads:
        y = y + part
    g.y = y if bo is None else y + f64(bo)
    return g


def own_heads(x, P, num_heads, num_kv_heads, rank, size, causal=False, upstream=None) -> Grads:
    """Attention through rank `rank`'s query heads only (no bias): its partial output, and the
    input gradient it computes by itself (what a QKV projection without f leaves in x.grad)."""
    (a, z), _ = head_ranges(num_heads, num_kv_heads, rank, size)
    d, group = P["wq"].shape[0] // num_heads, num_heads // num_kv_heads
    if z == a:
        x = f64(x)
        return Grads(y=zeros(x.shape[:-1] + (P["wo"].shape[0],)), y_heads=[], dx=zeros(x.shape),
                     dwq=None, dwo=None, dbo=None)
    kv_rows = [r for h in range(a, z) for r in range(h // group * d, (h // group + 1) * d)]
    return attention(x, P["wq"][a * d:z * d], P["wk"][kv_rows], P["wv"][kv_rows],
                     P["wo"][:, a * d:z * d], z - a, z - a, causal, None, upstream)


def dense_wk(g: Grads, which="k"):
    """The dense dL/dWk (or dWv): every query head's share added into its KV head's rows."""
    shares, group, d = (g.wk_of if which == "k" else g.wv_of), g.heads // g.kv, g.d
    total = zeros((g.kv * d, g.dwq.shape[1]))
    for h, share in enumerate(shares):
        total[h // group * d:(h // group + 1) * d] += share
    return total


# -- the pre-LN layer -------------------------------------------------------------------------------
LAYER_PARAMS = ("ln1_w", "ln1_b", "wq", "wk", "wv", "wo", "bo", "ln2_w", "ln2_b", "w1", "b1", "w2",
                "b2")


@dataclass
class LayerGrads:
    y: object
    dx: object
    attention: Grads              # its gradients are those of the attention's own input LN1(x)
    params: dict                  # dL/d(ln1_w, ln1_b, ln2_w, ln2_b, w1, b1, w2, b2, bo)
    dh_mlp: object                # dL/d(fc1's output) (for diagnoses)


def layer(x, P, num_heads, num_kv_heads, causal=False, eps=1e-5, upstream=None) -> LayerGrads:
    """h = x + attention(LN1(x)) + bo; y = h + fc2(gelu(fc1(LN2(h)))), with gradients of
    L = sum(y * upstream) when `upstream` is given."""
    P = {k: f64(v) for k, v in P.items()}
    x = f64(x)
    a1, *ln1 = layer_norm(x, P["ln1_w"], P["ln1_b"], eps)
    attn_fwd = attention(a1, P["wq"], P["wk"], P["wv"], P["wo"], num_heads, num_kv_heads, causal,
                         P["bo"])
    h = x + attn_fwd.y
    a2, *ln2 = layer_norm(h, P["ln2_w"], P["ln2_b"], eps)
    u = a2 @ P["w1"].T + P["b1"]
    act, slope = gelu(u)
    y = h + act @ P["w2"].T + P["b2"]
    if upstream is None:
        return LayerGrads(y, None, attn_fwd, {}, None)
    U = f64(upstream)
    du = (U @ P["w2"]) * slope
    da2 = du @ P["w1"]
    dln2 = layer_norm_backward(da2, P["ln2_w"], *ln2)
    dh = U + dln2[0]
    attn = attention(a1, P["wq"], P["wk"], P["wv"], P["wo"], num_heads, num_kv_heads, causal,
                     P["bo"], dh)
    dln1 = layer_norm_backward(attn.dx, P["ln1_w"], *ln1)
    params = {"ln1_w": dln1[1], "ln1_b": dln1[2], "ln2_w": dln2[1], "ln2_b": dln2[2],
              "w1": _wgrad(du, a2), "b1": _flat(du).sum(axis=0), "w2": _wgrad(U, act),
              "b2": _flat(U).sum(axis=0), "bo": attn.dbo}
    return LayerGrads(y, dh + dln1[0], attn, params, du)


# -- test data ------------------------------------------------------------------------------------
def weights(seed, shape, heads, kv, ffn=None):
    """float32 {wq, wk, wv, wo, bo} (and with `ffn` the MLP's and LayerNorms' parameters) for
    inputs of `shape` (..., hidden), scaled like an init so that scores are O(1); and the input x
    and the upstream gradient, both of `shape`."""
    hidden = shape[-1]
    d = hidden // heads
    wq, wk, wv, wo, bo, x, g = arrays(seed, (heads * d, hidden), (kv * d, hidden),
                                      (kv * d, hidden), (hidden, heads * d), (hidden,), shape,
                                      shape)
    P = {"wq": wq * hidden ** -0.5, "wk": wk * hidden ** -0.5, "wv": wv * hidden ** -0.5,
         "wo": wo * (heads * d) ** -0.5, "bo": bo}
    if ffn:
        w1, b1, w2, b2, l1w, l1b, l2w, l2b = arrays(seed + 1, (ffn, hidden), (ffn,), (hidden, ffn),
                                                    (hidden,), (hidden,), (hidden,), (hidden,),
                                                    (hidden,))
        P.update(w1=w1 * hidden ** -0.5, b1=b1, w2=w2 * ffn ** -0.5, b2=b2, ln1_w=1 + 0.2 * l1w,
                 ln1_b=0.2 * l1b, ln2_w=1 + 0.2 * l2w, ln2_b=0.2 * l2b)
    as32 = (lambda a: a.astype(trusted.float32))
    return {k: as32(v) for k, v in P.items()}, as32(x), as32(g)


MASTERS = ("wq", "wk", "wv", "wo", "w1", "w2")


def master_weights(P, rank, size, heads, kv, seed):
    """{name: the master weight rank `rank` of `size` is given}: true inside its heads' rows (its
    heads' columns of wo) and its MLP units (rows of w1, columns of w2), seeded noise elsewhere,
    another noise on every rank and size."""
    d = P["wq"].shape[0] // heads
    (a, z), (ka, kz) = head_ranges(heads, kv, rank, size)
    parts = {"wq": (a * d, z * d, 0), "wk": (ka * d, kz * d, 0), "wv": (ka * d, kz * d, 0),
             "wo": (a * d, z * d, 1)}
    if "w1" in P:
        lo, hi = balanced(P["w1"].shape[0], size)[rank]
        parts.update(w1=(lo, hi, 0), w2=(lo, hi, 1))
    return {name: noisy_master(P[name], lo, hi, axis, seed * 1000 + 100 * i + 10 * size + rank)
            for i, (name, (lo, hi, axis)) in enumerate(parts.items())}
