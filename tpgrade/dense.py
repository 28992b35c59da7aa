"""The dense float64 reference math the judges share, one copy of each: LayerNorm forward and
backward, the softmax, and scaled dot-product attention's scores (causal mask included).

The numpy checks (tpgrade._attention_dense, the sequence-parallel block's) add error scales on
top;
the torch assignments' references (assignments/<name>/dense.py, read by their notebook checks
and gpu_runner judges) add backward passes and the values known mistakes produce. numpy only
(the functions captured in tpgrade._trusted, before any student code ran): judge side, no
torch.
"""
from __future__ import annotations

import math

from . import _trusted as trusted
from .cases import f64

_NEG_INF = float("-inf")


def zeros(shape):
    """float64 zeros through ndarray methods only (tpgrade._trusted has no np.zeros)."""
    return trusted.asarray(0.0).repeat(math.prod(shape)).reshape(shape)


# -- LayerNorm --------------------------------------------------------------------------------
def layer_norm(x, weight, bias, eps=1e-5):
    """torch.nn.LayerNorm over the last axis (biased variance), in float64: (y, x-hat, 1/std),
    the last two what the backward and the error scales need."""
    x = f64(x)
    centred = x - x.mean(axis=-1, keepdims=True)
    inv_std = ((centred * centred).mean(axis=-1, keepdims=True) + eps) ** -0.5
    xhat = centred * inv_std
    return xhat * f64(weight) + f64(bias), xhat, inv_std


def layer_norm_backward(dy, weight, xhat, inv_std):
    """(dL/dx, dL/dweight, dL/dbias) of a LayerNorm from dL/dy (the weight's and bias's summed
    over every token)."""
    dxhat = dy * weight
    dx = inv_std * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                    - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    tokens = (-1, dy.shape[-1])
    return dx, (dy * xhat).reshape(tokens).sum(axis=0), dy.reshape(tokens).sum(axis=0)


# -- attention --------------------------------------------------------------------------------
def causal_mask(seq):
    """(seq, seq) bool: query i may attend to key j when j <= i."""
    i = trusted.arange(seq)
    return i[:, None] >= i[None, :]


def softmax(s):
    """Softmax over the last axis (keys); -inf entries get weight 0."""
    e = trusted.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def scores(q, k, causal):
    """q @ k.T / sqrt(head_dim) with -inf above the diagonal when causal: (..., seq, seq)."""
    s = q @ k.swapaxes(-1, -2) / q.shape[-1] ** 0.5
    if causal:   # 0 where allowed, -inf above the diagonal (picked by index: no np.where)
        s = s + trusted.asarray([_NEG_INF, 0.0])[causal_mask(s.shape[-1]).astype(int)]
    return s
