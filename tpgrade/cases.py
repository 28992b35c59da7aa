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
