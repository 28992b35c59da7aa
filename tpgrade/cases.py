"""Deterministic test data and the dense reference computations (float64)."""
from __future__ import annotations

from . import _trusted as trusted


def arrays(seed, *shapes, dtype=None):
    """Random normal arrays of the given shapes (None -> None), float64 unless dtype given."""
    rng = trusted.default_rng(seed)
    out = []
    for shape in shapes:
        if shape is None:
            out.append(None)
            continue
        a = rng.standard_normal(shape)
        out.append(a.astype(dtype or trusted.float64))
    return out


def balanced(n, p):
    """(start, stop) of each rank's shard: the first n % p ranks get one more."""
    base, extra = divmod(n, p)
    bounds, start = [], 0
    for r in range(p):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def f64(a):
    return None if a is None else a.astype(trusted.float64)


def linear(x, W, b=None):
    """Dense y = x @ W.T + b in float64, and the error scale |x| @ |W|.T + |b|."""
    x, W, b = f64(x), f64(W), f64(b)
    y = x @ W.T
    scale = abs(x) @ abs(W).T
    if b is not None:
        y = y + b
        scale = scale + abs(b)
    return y, scale


def relu(h):
    return trusted.maximum(h, 0)


def mlp(x, W1, W2, b1=None, b2=None, activation=relu, x_scale=None):
    """activation(x @ W1.T + b1) @ W2.T + b2 in float64, its error scale, and the hidden
    pre-activation. x_scale: the error scale of x itself, when x was computed (default |x|);
    an activation with slope <= 1 (relu, tanh, abs) keeps the scale of its input."""
    x, W1, W2, b1, b2 = f64(x), f64(W1), f64(W2), f64(b1), f64(b2)
    h = x @ W1.T
    h_scale = (abs(x) if x_scale is None else x_scale) @ abs(W1).T
    if b1 is not None:
        h, h_scale = h + b1, h_scale + abs(b1)
    y, scale = activation(h) @ W2.T, h_scale @ abs(W2).T
    if b2 is not None:
        y, scale = y + b2, scale + abs(b2)
    return y, scale, h


def kv_heads(num_heads, num_kv_heads, p):
    """(start, stop) of the KV heads each rank holds: exactly those its query heads use.

    Query head j reads KV head j // g, g = num_heads // num_kv_heads. Rank r holds query
    heads balanced(num_heads, p)[r] = [a, z), so KV heads [a // g, ceil(z / g)); a rank
    without query heads holds none. With num_kv_heads < p several ranks hold the same KV
    head (vLLM's QKVParallelLinear replicates it there)."""
    g = num_heads // num_kv_heads
    return [(a // g, -(-z // g)) if z > a else (a // g, a // g) for a, z in balanced(num_heads, p)]
