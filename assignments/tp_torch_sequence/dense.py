"""Dense float64 references for the tp_torch_sequence checks: the sequence-parallel MLP block,
the vocabulary-parallel embedding and cross-entropy, with their gradients, and the values a few
known mistakes produce (for the diagnoses).

Used by the notebook's checks (checks.py) and by its gpu_runner judge (gpu/judge.py), both in
processes where no student code runs a verdict. numpy
only; the numpy functions are the ones captured when tpgrade was imported (tpgrade._trusted,
and those below), so a notebook that rebinds np.log cannot change a reference.

Layouts follow tp_sequence: activations are sequence-first (s, ..., h) and a rank holds the
rows balanced(s, p)[r] of axis 0; a table (V, h) is split by rows, logits (..., V) by columns.
"""
from __future__ import annotations

import numpy as _np

from tpgrade import _trusted as trusted
from tpgrade.cases import balanced, f64
from tpgrade.dense import layer_norm, layer_norm_backward
from tpgrade.tensors import gelu

# Captured at import, before any student code runs (tpgrade._trusted has none of these).
_log, _zeros, _add_at = _np.log, _np.zeros, _np.add.at


def rows(n, rank, size):
    """slice of rank `rank`'s part of n rows (the balanced split)."""
    return slice(*balanced(n, size)[rank])


def _token_sum(a):
    """Sum over every axis but the last (the tokens)."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


def _outer(a, b):
    """sum over tokens of a^T b, for (..., m) and (..., n): (m, n)."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


# -- the sequence-parallel MLP block ------------------------------------------------------------
def sp_block(x, ln_w, ln_b, w1, b1, w2, b2, g, eps=1e-5):
    """y = x + gelu(LayerNorm(x) @ W1.T + b1) @ W2.T + b2 for x (s, ..., h), and the gradients
    of L = sum(y * g): {"y", "dx", "dw1", "db1", "dw2", "db2", "dln_w", "dln_b", and for the
    per-rank parts and diagnoses "dx_ln" (the MLP's part of dx, through the LayerNorm), "du"
    (dL/d(LayerNorm's output)), "dh" (dL/d(fc1's output)), "xhat"}."""
    x, w1, w2, g = f64(x), f64(w1), f64(w2), f64(g)
    u, xhat, inv = layer_norm(x, ln_w, ln_b, eps)
    h = u @ w1.T + b1
    act, slope = gelu(h)
    dh = (g @ w2) * slope
    du = dh @ w1
    dx_ln = layer_norm_backward(du, ln_w, xhat, inv)[0]
    return {"y": x + act @ w2.T + b2, "dx": g + dx_ln, "dx_ln": dx_ln, "g": g,
            "dw1": _outer(dh, u), "db1": _token_sum(dh), "dw2": _outer(g, act),
            "db2": _token_sum(g), "dln_w": _token_sum(du * xhat), "dln_b": _token_sum(du),
            "du": du, "dh": dh, "xhat": xhat}


def own_token_grads(dense, tokens):
    """The gradients of the parameters every rank holds whole after the reduce-scatter (the
    LayerNorm's, fc2's bias), over the tokens `tokens` only: what a rank, which computes them on
    its own tokens, holds before Megatron all-reduces them (parameters marked
    sequence_parallel, in finalize_model_grads). {"ln_w", "ln_b", "b2"}."""
    du, xhat = dense["du"][tokens], dense["xhat"][tokens]
    return {"ln_w": _token_sum(du * xhat), "ln_b": _token_sum(du),
            "b2": _token_sum(dense["g"][tokens])}


def mlp_input_grad_twice(dense, tokens, size):
    """dL/dx when the MLP's part of it is summed over the ranks twice (a column layer's f after
    the gather, whose reduce-scatter sums the ranks' terms again): counted `size` times."""
    return dense["dx"][tokens] + (size - 1) * dense["dx_ln"][tokens]


LAYERNORM_GATHERED = ("the LayerNorm ran on the gathered tensor (every token on every rank): "
                      "normalize this rank's own tokens, then gather")


def layer_norm_grads_gathered(dense, w1, units):
    """The LayerNorm gradients of a rank that normalizes the GATHERED tensor (every token):
    the gradient reaching it is only this rank's hidden units' part of dL/du."""
    du_r = dense["dh"][..., units] @ f64(w1)[units]
    return _token_sum(du_r * dense["xhat"]), _token_sum(du_r)


# -- the vocabulary-parallel embedding ------------------------------------------------------------
def embedding(table, ids, g):
    """table[ids] and dL/d table for L = sum(table[ids] * g)."""
    table, g = f64(table), f64(g)
    grad = _zeros(table.shape)
    _add_at(grad, ids.reshape(-1), g.reshape(-1, table.shape[1]))
    return table[ids], grad


def embedding_unmasked(table, ids, size):
    """The sum over ranks of lookups that send foreign ids to local row 0 (Megatron's
    masked_input) and never zero them (the embedding without its output mask)."""
    return embedding_with_starts(table, ids, size, masked=False)


def embedding_with_starts(table, ids, size, starts=None, masked=True):
    """The sum over ranks of masked lookups, rank r's rows taken to start at starts[r] (default:
    the balanced split's), foreign ids looked up at local row 0 and zeroed when `masked`."""
    table = f64(table)
    total = 0.0
    for r, (lo, hi) in enumerate(balanced(table.shape[0], size)):
        start = lo if starts is None else starts[r]
        if hi > lo:
            owned = (ids >= start) & (ids < start + hi - lo)
            rows = table[lo:hi][(ids - start) * owned]
            total = total + (rows * owned[..., None] if masked else rows)
    return total


EVEN_SPLIT_OFFSET = ("this rank's rows were taken to start at r * V_r (the offset of an evenly "
                     "split, padded vocabulary): with an uneven split rank r starts at the sum "
                     "of the shards before it (shard_range)")


EMB_NOT_MASKED = ("the ids this rank does not own were looked up (as its local row 0) and not "
                  "zeroed: every rank added a row for every token; zero the lookups of the ids "
                  "outside [vocab_start, vocab_end)")


def embedding_grad_leak(grad_rows, ids, g, lo, hi):
    """A rank's weight gradient when the zeroing of foreign ids is not in the graph (done under
    no_grad or on .data): their upstream gradient lands on local row 0, where they were looked
    up."""
    if hi <= lo:
        return grad_rows
    foreign = (ids < lo) | (ids >= hi)
    leaked = grad_rows.copy()
    leaked[0] = leaked[0] + f64(g)[foreign].reshape(-1, grad_rows.shape[1]).sum(axis=0)
    return leaked


EMB_GRAD_LEAK = ("local row 0 also got the gradient of the tokens this rank does not own: their "
                 "lookups were not zeroed in the graph (not at all, or under no_grad or on "
                 ".data); zero them in the graph (index assignment into zeros, masked_fill, a "
                 "multiply by the mask)")


# -- the vocabulary-parallel cross-entropy ------------------------------------------------------
def cross_entropy(z, target, g):
    """The per-token loss log(sum_v exp(z_v)) - z_target of logits z (..., V), computed stably,
    and dL/dz for L = sum(loss * g)."""
    z, g = f64(z), f64(g)
    m = z.max(axis=-1, keepdims=True)
    e = trusted.exp(z - m)
    total = e.sum(axis=-1, keepdims=True)
    flat = z.reshape(-1, z.shape[-1])
    picked = flat[trusted.arange(flat.shape[0]), target.reshape(-1)].reshape(target.shape)
    loss = m[..., 0] + _log(total[..., 0]) - picked
    grad = e / total
    grad.reshape(-1, z.shape[-1])[trusted.arange(flat.shape[0]), target.reshape(-1)] -= 1.0
    return loss, grad * g[..., None]
