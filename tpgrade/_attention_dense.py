"""Dense float64 references for the attention checks, each with its error scale.

An error scale S bounds, in units of the working precision, how far a correct implementation
may be from the exact value: the checks allow |got - want| <= ~1e-12 S in float64
(tpgrade.verdict, its TERMS tolerance). It is built from absolute values (|x| @ |W|.T, ...),
so it does not shrink when terms cancel, and it is carried through each step next to the
value, in first order:

* a product a @ W.T: (|a| + S_a) @ |W|.T (its own rounding plus a's error);
* scores: S_s = (S_q @ |k|.T + |q| @ S_k.T + |q| @ |k|.T) / sqrt(d); a score error e changes
  a probability by a relative e, so o = P @ v has S_o = P @ S_v + (P @ |v|) (1 + 2 max S_s);
* LayerNorm: centring and dividing by the standard deviation amplify errors by about
  max|x| / std (input errors too).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import _trusted as trusted
from . import dense
from .cases import f64
from .dense import scores, softmax, zeros


def heads(q, k, v, causal=False, errors=None):
    """softmax(q @ k.T / sqrt(d), masked) @ v for arrays (..., seq, d) (any leading dims, a
    heads axis included), and its error scale. `errors`: (S_q, S_k, S_v) of the inputs
    (default: exact inputs)."""
    q, k, v = f64(q), f64(k), f64(v)
    Sq, Sk, Sv = errors or (0.0 * q, 0.0 * k, 0.0 * v)
    p = softmax(scores(q, k, causal))
    Ss = (scores(Sq, abs(k), causal) + scores(abs(q), Sk, causal)
          + scores(abs(q), abs(k), causal))                     # -inf where masked
    worst = trusted.maximum(Ss.max(axis=-1, keepdims=True), 0.0)
    return p @ v, p @ Sv + (p @ abs(v)) * (1.0 + 2.0 * worst)


def _project(x, Sx, W):
    """x @ W.T and its error scale."""
    return x @ W.T, (abs(x) + Sx) @ abs(W).T


def head_contributions(x, Wq, Wk, Wv, Wo, num_heads, num_kv_heads, causal, x_err=None,
                       kv_of=None, dims=None):
    """[(y_h, S_h)]: query head h's share o_h @ Wo[:, h's columns].T of the attention output
    (no bias), for x (..., seq, hidden) with error scale x_err (default exact); head h reads
    KV head h // (H / G). To reproduce a mistake: `kv_of(h)`, another KV head; `dims`
    (start, stop), only those features of every head (as if a head were split across ranks)."""
    x, Wq, Wk, Wv, Wo = f64(x), f64(Wq), f64(Wk), f64(Wv), f64(Wo)
    Sx = 0.0 * x if x_err is None else x_err
    d = Wq.shape[0] // num_heads
    group = num_heads // num_kv_heads
    kv_of = kv_of or (lambda h: h // group)
    lo, hi = dims or (0, d)
    out = []
    for h in range(num_heads):
        q_rows = slice(h * d + lo, h * d + hi)
        kv_rows = slice(kv_of(h) * d + lo, kv_of(h) * d + hi)
        (q, Sq), (k, Sk), (v, Sv) = (_project(x, Sx, W[rows]) for W, rows in
                                     ((Wq, q_rows), (Wk, kv_rows), (Wv, kv_rows)))
        o, So = heads(q, k, v, causal, (Sq, Sk, Sv))
        out.append(_project(o, So, Wo[:, q_rows]))
    return out


def add_up(contributions, shape, bias=None):
    """Sum of (value, scale) pairs (zeros of `shape` for none), plus a bias counted once."""
    y, scale = zeros(shape), zeros(shape)
    for value, s in contributions:
        y, scale = y + value, scale + s
    if bias is not None:
        y, scale = y + f64(bias), scale + abs(f64(bias))
    return y, scale


def attention(x, Wq, Wk, Wv, Wo, num_heads, num_kv_heads, causal=False, bo=None):
    """Dense multi-head (grouped-query) attention and its error scale."""
    parts = head_contributions(x, Wq, Wk, Wv, Wo, num_heads, num_kv_heads, causal)
    return add_up(parts, x.shape[:-1] + (Wo.shape[0],), bo)


def layer_norm(x, weight, bias, eps, x_err):
    """LayerNorm over the last axis (biased variance, as torch.nn.LayerNorm) and its error
    scale: rounding and input errors, amplified by 1 / std, relative to max|x| of the row."""
    y, _, inv_std = dense.layer_norm(x, weight, bias, eps)
    row = (4.0 * abs(f64(x)) + 2.0 * x_err).max(axis=-1, keepdims=True)
    return y, abs(f64(weight)) * row * inv_std + abs(f64(bias))


@dataclass
class Layer:
    """The dense pre-LN layer, step by step (float64), with error scales (S_...):
    a1 = LN1(x); h = x + attention(a1) + bo; a2 = LN2(h); y = h + mlp(a2) + b2."""
    params: dict
    activation: object
    heads: list = None
    h: object = None
    a2: object = None
    S_a2: object = None
    y: object = None
    scale: object = None

    @classmethod
    def of(cls, x, params, num_heads, num_kv_heads, causal, eps, activation):
        P = {k: f64(v) for k, v in params.items()}
        ref = cls(P, activation)
        x = f64(x)
        a1, S_a1 = layer_norm(x, P["ln1_w"], P["ln1_b"], eps, 0.0 * x)
        ref.heads = head_contributions(a1, P["Wq"], P["Wk"], P["Wv"], P["Wo"], num_heads,
                                       num_kv_heads, causal, S_a1)
        attn, S_attn = add_up(ref.heads, x.shape, P["bo"])
        ref.h, S_h = x + attn, abs(x) + S_attn
        ref.a2, ref.S_a2 = layer_norm(ref.h, P["ln2_w"], P["ln2_b"], eps, S_h)
        mlp, S_mlp = ref.mlp_partial(slice(0, P["W1"].shape[0]))
        ref.y = ref.h + mlp + P["b2"]
        ref.scale = abs(ref.h) + S_h + S_mlp + abs(P["b2"])
        return ref

    def attention_partial(self, start, stop):
        """Rank partial of the attention all-reduce: heads [start, stop), no bias."""
        return add_up(self.heads[start:stop], self.h.shape)

    def mlp_partial(self, units):
        """Rank partial of the MLP all-reduce: activation(a2 @ W1_r.T + b1_r) @ W2_r.T
        (the activation: |f(u)| <= |u| and slope <= 1, as relu and tanh)."""
        W1, b1, W2 = self.params["W1"][units], self.params["b1"][units], self.params["W2"][:, units]
        u, S_u = _project(self.a2, self.S_a2, W1)
        u, S_u = u + b1, S_u + abs(b1)
        return _project(self.activation(u), S_u, W2)
