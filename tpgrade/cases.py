"""Deterministic test data and the dense reference computations (float64)."""
from __future__ import annotations

from . import _trusted as T


def arrays(seed, *shapes, dtype=None):
    """Random normal arrays of the given shapes (None -> None), float64 unless dtype given."""
    rng = T.default_rng(seed)
    out = []
    for shape in shapes:
        if shape is None:
            out.append(None)
            continue
        a = rng.standard_normal(shape)
        out.append(a.astype(dtype or T.float64))
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
    return None if a is None else a.astype(T.float64)


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
    return T.maximum(h, 0)


def kv_heads(num_heads, num_kv_heads, p):
    """(start, stop) of the KV heads each rank holds: exactly those its query heads use.

    Query head j reads KV head j // g, g = num_heads // num_kv_heads. Rank r holds query
    heads balanced(num_heads, p)[r] = [a, z), so KV heads [a // g, ceil(z / g)); a rank
    without query heads holds none. With num_kv_heads < p several ranks hold the same KV
    head (vLLM's QKVParallelLinear replicates it there)."""
    g = num_heads // num_kv_heads
    return [(a // g, -(-z // g)) if z > a else (a // g, a // g) for a, z in balanced(num_heads, p)]
