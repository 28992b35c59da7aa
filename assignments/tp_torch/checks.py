"""Checks for the tp_torch notebook: the mappings, ColumnParallelLinear, RowParallelLinear,
ParallelMLP and their errors, on 2 (or 1) CPU gloo ranks.

Each public function is one graded test cell (`from assignments.tp_torch import checks as
check; check.column_forward(ColumnParallelLinear)`): it raises an AssertionError whose message names
the mistake, a RankError when the student's code raised on a rank, and prints nothing when
the solution is right. The setup cell imports this module before any student code runs; what
that protects, and how, is in tpgrade._torch_trusted.
"""
from __future__ import annotations

from tpgrade import _trusted as trusted
from tpgrade import replies, tensors, verdict
from tpgrade._harness import check, make_checks_read_only
from tpgrade._torch_trusted import (TIMEOUT, as_numpy, backprop, get_rank, is_initialized, no_grad,
                                    run_on_ranks, tensor)
from tpgrade._torch_trusted import torch_check as _torch_check
from tpgrade.verdict import fail


# -- shard_range ------------------------------------------------------------------------------
def _ints(got):
    try:
        return tuple(trusted.index(v) for v in got)
    except TypeError:
        return None


@check
def shard_range(shard_range):
    """shard_range(n, rank, p) for (10, 4), (2, 3) and (6, 2): balanced, first ranks larger."""
    expected = {(10, 4): [(0, 3), (3, 6), (6, 8), (8, 10)],
                (2, 3): [(0, 1), (1, 2), (2, 2)],
                (6, 2): [(0, 3), (3, 6)]}
    for (n, p), want in expected.items():
        got = [_ints(shard_range(n, r, p)) for r in range(p)]
        if got != want:
            fail(f"shard_range({n}, rank, {p}) for rank = 0..{p - 1} gave {got}, expected {want}: "
                 f"the first n % p ranks get one item more, and ranks may be empty")


# -- the mappings -------------------------------------------------------------------------------
def _f_and_g(copy_to_tp_region, reduce_from_tp_region):
    rank = get_rank()
    x = tensor(trusted.asarray([[1.0] * 3] * 2, dtype=trusted.float32), requires_grad=True)
    backprop(copy_to_tp_region(x), trusted.asarray([[rank + 1.0] * 3] * 2, dtype=trusted.float32),
             "copy_to_tp_region")                                     # incoming grads 1 and 2
    partial = tensor(trusted.asarray([rank + 1.0] * 2, dtype=trusted.float32), requires_grad=True)
    summed = reduce_from_tp_region(partial)
    backprop(summed, trusted.asarray([10.0] * 2, dtype=trusted.float32), "reduce_from_tp_region")
    return as_numpy(x.grad), as_numpy(summed), as_numpy(partial.grad)


def _expect(rank, got, want, what, size=2, **diagnoses):
    """Fail unless `got` (this rank's) matches `want` (verdict.mismatch, float64's tolerance)."""
    text = verdict.mismatch(got, trusted.asarray(want, dtype=trusted.float64), what,
                            dtype="float64", **diagnoses)
    if text:
        fail(f"{verdict.where(rank, size)}: {text}")


_F_AND_G = replies.ranks(2, replies.tensors("x.grad", "reduce_from_tp_region's output",
                                            "the input's .grad"))
_PLAIN_F = ("copy_to_tp_region passes the gradient through unchanged: its backward must "
            "all-reduce it (an autograd.Function whose backward calls dist.all_reduce), not "
            "return x or a plain view of it")


@_torch_check
def mappings_f_and_g(copy_to_tp_region, reduce_from_tp_region):
    """2 ranks: f = copy_to_tp_region (all-reduce backward), g = reduce_from_tp_region."""
    per_rank = run_on_ranks(_f_and_g, 2, copy_to_tp_region, reduce_from_tp_region,
                            timeout=TIMEOUT, reply=_F_AND_G)
    for rank, (x_grad, summed, partial_grad) in enumerate(per_rank):
        _expect(rank, x_grad, [[3.0] * 3] * 2, "x.grad after copy_to_tp_region (its backward "
                "all-reduces the gradients 1 and 2: 3 everywhere)",
                missing="copy_to_tp_region's output is not connected to x in autograd",
                suspects=[([[rank + 1.0] * 3] * 2, _PLAIN_F)])
        _expect(rank, summed, [3.0, 3.0], "reduce_from_tp_region's output (the sum over ranks, "
                "1 + 2 = 3)", suspects=[([rank + 1.0] * 2, "no all-reduce in forward: "
                                         "reduce_from_tp_region returns this rank's partial")])
        _expect(rank, partial_grad, [10.0, 10.0], "the input's .grad after "
                "reduce_from_tp_region (its backward is the identity: 10 stays 10)",
                missing="reduce_from_tp_region's output is not connected to its input in autograd",
                suspects=[([20.0, 20.0], "its backward all-reduces the gradient too (f's "
                                         "backward, or a collective autograd differentiates): "
                                         "g's backward is the identity")])


_GRID = trusted.arange(10.0).reshape(2, 5)            # gathered from 3 + 2 columns
_GRID_GRAD = trusted.arange(10.0, 20.0).reshape(2, 5)


def _columns(rank):
    return [0, 1, 2] if rank == 0 else [3, 4]   # 5 columns on 2 ranks: 3 + 2


def _gather_and_scatter(gather_from_tp_region, scatter_to_tp_region):
    rank = get_rank()
    shard = tensor(_GRID[:, _columns(rank)].astype(trusted.float32), requires_grad=True)
    full = gather_from_tp_region(shard, 5)
    backprop(full, _GRID_GRAD.astype(trusted.float32), "gather_from_tp_region")
    z = tensor(trusted.arange(5.0, dtype=trusted.float32), requires_grad=True)
    mine = scatter_to_tp_region(z)
    backprop(mine, trusted.asarray([rank + 1.0] * len(_columns(rank)), dtype=trusted.float32),
             "scatter_to_tp_region")
    return as_numpy(full), as_numpy(shard.grad), as_numpy(mine), as_numpy(z.grad)


_GATHER_SCATTER = replies.ranks(2, replies.tensors(
    "gather_from_tp_region's output", "the shard's .grad", "scatter_to_tp_region's output",
    "the input's .grad"))


@_torch_check
def mappings_gather_scatter(gather_from_tp_region, scatter_to_tp_region):
    """2 ranks, 5 columns as 3 + 2: gather / scatter along the last dim, both ways."""
    per_rank = run_on_ranks(_gather_and_scatter, 2, gather_from_tp_region, scatter_to_tp_region,
                            timeout=TIMEOUT, reply=_GATHER_SCATTER)
    for rank, (full, shard_grad, mine, z_grad) in enumerate(per_rank):
        cols = _columns(rank)
        own = [1.0 * (c in cols) * (rank + 1) for c in range(5)]
        _expect(rank, full, _GRID, "gather_from_tp_region's output (shards of 3 and 2 columns: "
                "the full (2, 5) tensor on every rank)",
                shapes=[((2, len(cols)), "this rank's shard came back: all_gather every rank's "
                                         "shard and concatenate along the last dim"),
                        ((2, 6), "the padding was not trimmed: pad to the widest shard, "
                                 "all_gather, then cut each part to its own width")])
        _expect(rank, shard_grad, _GRID_GRAD[:, cols], f"the shard's .grad (the backward of "
                f"gather_from_tp_region keeps this rank's columns {cols} of the gradient)",
                missing="the gather's output is not connected to its input in autograd (a "
                        "plain dist.all_gather: an autograd.Function must carry the gradient)",
                shapes=[((2, 5), "the backward returned the whole gradient: keep this rank's "
                                 "columns")])
        _expect(rank, mine, trusted.arange(5.0)[cols], f"scatter_to_tp_region's output (this "
                f"rank's slice {cols})",
                shapes=[((5,), "the whole input came back: keep this rank's slice"),
                        ((2 if rank == 0 else 3,), "another rank's slice: the first n % p "
                                                   "ranks get one more")])
        _expect(rank, z_grad, [1.0, 1, 1, 2, 2], "the input's .grad after scatter_to_tp_region "
                "(its backward all-gathers the slices' gradients: [1, 1, 1, 2, 2])",
                missing="scatter_to_tp_region's output is not connected to its input in "
                        "autograd",
                suspects=[(own, "the backward of a plain slice: the other ranks' slices get "
                                "zeros; scatter's backward must all-gather every rank's slice "
                                "of the gradient (an autograd.Function)")])


# -- the layers' shards -------------------------------------------------------------------------
def _shards(layer_class, in_features, out_features, master):
    layer = layer_class(in_features, out_features, master_weight=tensor(master))
    return as_numpy(layer.weight), as_numpy(layer.bias)


_SHARDS = replies.ranks(2, replies.tensors(".weight", ".bias"))


def _check_shards(per_rank, master, axis, names, bias_shape, bias_says):
    """2 ranks, 3 rows (axis 0) or columns (axis 1) of `master` each, and a zero bias."""
    bounds = [(0, 3), (3, 6)]
    for rank, (weight, bias) in enumerate(per_rank):
        lo, hi = bounds[rank]
        mine = master[lo:hi] if axis == 0 else master[:, lo:hi]
        text = verdict.mismatch(weight, mine, ".weight", suspects=tensors.other_shards(
            master, bounds, rank, axis, names), shapes=[(master.shape, (
                f"the whole master_weight: keep this rank's {names} {lo}..{hi - 1} only"))])
        if text:
            fail(f"{verdict.where(rank, 2)}: {text}")
        if verdict.shape(bias) != bias_shape:
            fail(f"{verdict.where(rank, 2)}: .bias should be {bias_says}, shape {bias_shape}; got "
                 f"{verdict.shape(bias)}")
        text = tensors.zero_init(bias, ".bias")
        if text:
            fail(f"{verdict.where(rank, 2)}: {text}")


@_torch_check
def column_shards(ColumnParallelLinear):
    """2 ranks, (4 -> 6): .weight holds 3 rows of master_weight, .bias 3 zeros."""
    master = tensors.master(6, 4)
    per_rank = run_on_ranks(_shards, 2, ColumnParallelLinear, 4, 6, master, timeout=TIMEOUT,
                            reply=_SHARDS)
    _check_shards(per_rank, master, 0, "rows", (3,), "this rank's slice of the bias")


@_torch_check
def row_shards(RowParallelLinear):
    """2 ranks, (6 -> 4): .weight holds 3 columns of master_weight, .bias 4 zeros."""
    master = tensors.master(4, 6)
    per_rank = run_on_ranks(_shards, 2, RowParallelLinear, 6, 4, master, timeout=TIMEOUT,
                            reply=_SHARDS)
    _check_shards(per_rank, master, 1, "columns", (4,), "the FULL bias")


# Every rank gets its own master_weight: the real weight inside its shard, noise outside it
# (tensors.noisy_master), so a rank that computes more than its shard gets a wrong answer.
def _masters(w, axis, seed):
    return [tensors.noisy_master(w, 3 * r, 3 * r + 3, axis, seed + r) for r in range(2)]


def _check(rank, got, want, what, **diagnoses):
    text = verdict.mismatch(got, want, what, **diagnoses)
    if text:
        fail(f"{verdict.where(rank, 2)}: {text}")


# -- ColumnParallelLinear: forward and backward -------------------------------------------------
def _column_layer(ColumnParallelLinear, masters, b, **kwargs):
    rank = get_rank()
    layer = ColumnParallelLinear(4, 6, master_weight=tensor(masters[rank]), **kwargs)
    with no_grad():
        layer.bias.copy_(tensor(b[3 * rank:3 * rank + 3]))
    return layer


def _column_forward(ColumnParallelLinear, x, masters, b):
    return [as_numpy(_column_layer(ColumnParallelLinear, masters, b, gather_output=g)(tensor(x)))
            for g in (True, False)]


@_torch_check
def column_forward(ColumnParallelLinear):
    """2 ranks: the dense F.linear output, full (gather_output) or this rank's columns."""
    x, w, b = tensors.f32((5, 4), (6, 4), (6,), seed=1)
    dense, masters = tensors.linear(x, w, b), _masters(w, 0, seed=101)
    per_rank = run_on_ranks(_column_forward, 2, ColumnParallelLinear, x, masters, b,
                            timeout=TIMEOUT, reply=_COLUMN_OUTPUTS)
    for rank, (full, local) in enumerate(per_rank):
        cols = slice(3 * rank, 3 * rank + 3)
        _check(rank, full, dense,
               "the output (gather_output=True)", shapes=[tensors.local_shard((5, 3))],
               suspects=[(tensors.linear(x, masters[rank], b), tensors.DENSE_ON_RANK)])
        _check(rank, local, dense[:, cols],
               f"the output with gather_output=False (this rank's columns {cols.start}.."
               f"{cols.stop - 1})")


_COLUMN_OUTPUTS = replies.ranks(2, replies.tensors("the output with gather_output=True",
                                                  "the output with gather_output=False"))
# a rank's (x.grad, weight.grad, bias.grad) from a linear layer
_LINEAR_GRADS = replies.ranks(2, replies.tensors("x.grad", ".weight.grad", ".bias.grad"))


def _column_backward(ColumnParallelLinear, x, masters, b, dy):
    layer = _column_layer(ColumnParallelLinear, masters, b)
    x = tensor(x, requires_grad=True)
    backprop(layer(x), dy, "ColumnParallelLinear(4, 6)")
    return as_numpy(x.grad), as_numpy(layer.weight.grad), as_numpy(layer.bias.grad)


_NOT_CONNECTED = "the output is not connected to it in autograd"


@_torch_check
def column_backward(ColumnParallelLinear):
    """2 ranks: dL/dx, and this rank's rows of dL/dW and dL/db, as the dense layer's."""
    x, w, b, dy = tensors.f32((5, 4), (6, 4), (6,), (5, 6), seed=2)
    dx, dw, db = tensors.linear_grads(x, w, dy)
    masters = _masters(w, 0, seed=201)
    per_rank = run_on_ranks(_column_backward, 2, ColumnParallelLinear, x, masters, b, dy,
                            timeout=TIMEOUT, reply=_LINEAR_GRADS)
    for rank, (x_grad, w_grad, b_grad) in enumerate(per_rank):
        rows = slice(3 * rank, 3 * rank + 3)
        _check(rank, x_grad, dx, "dL/dx", missing=_NOT_CONNECTED, suspects=[
            tensors.own_term_only(dy[:, rows].astype(trusted.float64) @ w[rows])])
        _check(rank, w_grad, dw[rows], f".weight.grad (rows {rows.start}..{rows.stop - 1} of "
               f"the dense weight gradient)", missing=_NOT_CONNECTED)
        _check(rank, b_grad, db[rows], ".bias.grad (this rank's slice of the dense bias "
               "gradient)", missing=_NOT_CONNECTED)


# -- RowParallelLinear: forward and backward ----------------------------------------------------
def _row_layer(RowParallelLinear, masters, b, **kwargs):
    layer = RowParallelLinear(6, 4, master_weight=tensor(masters[get_rank()]), **kwargs)
    with no_grad():
        layer.bias.copy_(tensor(b))
    return layer


def _row_forward(RowParallelLinear, x, masters, b):
    rank = get_rank()
    outputs = []
    for input_is_parallel in (True, False):
        layer = _row_layer(RowParallelLinear, masters, b, input_is_parallel=input_is_parallel)
        outputs.append(as_numpy(layer(tensor(x[:, 3 * rank:3 * rank + 3] if input_is_parallel
                                             else x))))
    return outputs


_ROW_OUTPUTS = replies.ranks(2, replies.tensors("the output with input_is_parallel=True",
                                               "the output with input_is_parallel=False"))


@_torch_check
def row_forward(RowParallelLinear):
    """2 ranks: the dense F.linear output, from the input slice or the full input."""
    x, w, b = tensors.f32((5, 6), (4, 6), (4,), seed=3)
    dense, masters = tensors.linear(x, w, b), _masters(w, 1, seed=301)
    per_rank = run_on_ranks(_row_forward, 2, RowParallelLinear, x, masters, b, timeout=TIMEOUT,
                            reply=_ROW_OUTPUTS)
    for rank, outputs in enumerate(per_rank):
        for name, y in zip(("input_is_parallel=True (this rank's slice of x)",
                            "input_is_parallel=False (the full x)"), outputs):
            _check(rank, y, dense, f"the output with {name}",
                   suspects=[tensors.bias_every_rank(dense, b, 2)])


def _row_backward(RowParallelLinear, x, masters, b, dy):
    rank = get_rank()
    layer = _row_layer(RowParallelLinear, masters, b)
    x_r = tensor(x[:, 3 * rank:3 * rank + 3], requires_grad=True)
    backprop(layer(x_r), dy, "RowParallelLinear(6, 4)")
    return as_numpy(x_r.grad), as_numpy(layer.weight.grad), as_numpy(layer.bias.grad)


@_torch_check
def row_backward(RowParallelLinear):
    """2 ranks: the input slice's, this rank's columns of dL/dW, and dL/db, as dense."""
    x, w, b, dy = tensors.f32((5, 6), (4, 6), (4,), (5, 4), seed=4)
    dx, dw, db = tensors.linear_grads(x, w, dy)
    masters = _masters(w, 1, seed=401)
    per_rank = run_on_ranks(_row_backward, 2, RowParallelLinear, x, masters, b, dy,
                            timeout=TIMEOUT, reply=_LINEAR_GRADS)
    for rank, (x_grad, w_grad, b_grad) in enumerate(per_rank):
        cols = slice(3 * rank, 3 * rank + 3)
        _check(rank, x_grad, dx[:, cols], f"dL/dx of this rank's input slice (columns "
               f"{cols.start}..{cols.stop - 1} of the dense dL/dx)", missing=_NOT_CONNECTED)
        _check(rank, w_grad, dw[:, cols], f".weight.grad (columns {cols.start}..{cols.stop - 1} "
               f"of the dense weight gradient)", missing=_NOT_CONNECTED)
        _check(rank, b_grad, db, ".bias.grad", missing=tensors.bias_grad_rank0_only(db)[1],
               suspects=[tensors.bias_grad_rank0_only(db)])


# -- ParallelMLP ----------------------------------------------------------------------------------
def _mlp(ParallelMLP, x, w1s, b1, w2s, b2, dy):
    rank = get_rank()
    mlp = ParallelMLP(4, 6, w1=tensor(w1s[rank]), w2=tensor(w2s[rank]))
    with no_grad():
        mlp.fc1.bias.copy_(tensor(b1[3 * rank:3 * rank + 3]))
        mlp.fc2.bias.copy_(tensor(b2))
    x = tensor(x, requires_grad=True)
    y = mlp(x)
    backprop(y, dy, "ParallelMLP(4, 6)")
    return (as_numpy(y), as_numpy(x.grad), as_numpy(mlp.fc1.weight.grad),
            as_numpy(mlp.fc2.weight.grad))


_MLP_REPLY = replies.ranks(2, replies.tensors("the output", "x.grad", "fc1.weight.grad",
                                             "fc2.weight.grad"))


def _mlp_run(ParallelMLP):
    """Per rank (y, dL/dx, dL/dW1 shard, dL/dW2 shard) as arrays, the data and the dense MLP."""
    x, w1, b1, w2, b2, dy = tensors.f32((5, 4), (6, 4), (6,), (4, 6), (4,), (5, 4), seed=5)
    got = run_on_ranks(_mlp, 2, ParallelMLP, x, _masters(w1, 0, seed=501), b1,
                       _masters(w2, 1, seed=511), b2, dy, timeout=TIMEOUT, reply=_MLP_REPLY)
    return got, (x, w1, b1, w2, b2, dy), tensors.dense_mlp(x, w1, b1, w2, b2, dy)


@_torch_check
def mlp_forward(ParallelMLP):
    """2 ranks: ParallelMLP(4, 6) equals the dense gelu MLP."""
    per_rank, (x, w1, b1, w2, b2, dy), dense = _mlp_run(ParallelMLP)
    for rank, (y, *_) in enumerate(per_rank):
        _check(rank, y, dense["y"], "ParallelMLP's output (the dense gelu MLP: fc1 with "
               "gather_output=False, fc2 with input_is_parallel=True)",
               suspects=[tensors.bias_every_rank(dense["y"], b2, 2)])


@_torch_check
def mlp_backward(ParallelMLP):
    """2 ranks: dL/dx, fc1's rows and fc2's columns of the dense MLP's weight gradients."""
    per_rank, (x, w1, *_), dense = _mlp_run(ParallelMLP)
    for rank, (_, x_grad, w1_grad, w2_grad) in enumerate(per_rank):
        part = slice(3 * rank, 3 * rank + 3)
        own = dense["dh"][:, part] @ w1[part].astype(trusted.float64)
        _check(rank, x_grad, dense["dx"], "dL/dx of the MLP", missing=_NOT_CONNECTED,
               suspects=[tensors.own_term_only(own, "fc1's input must go through "
                                                    "copy_to_tp_region (f)")])
        _check(rank, w1_grad, dense["dw1"][part], f"fc1.weight.grad (rows {part.start}.."
               f"{part.stop - 1} of the dense W1 gradient)", missing=_NOT_CONNECTED)
        _check(rank, w2_grad, dense["dw2"][:, part], f"fc2.weight.grad (columns {part.start}.."
               f"{part.stop - 1} of the dense W2 gradient)", missing=_NOT_CONNECTED)


# -- errors ---------------------------------------------------------------------------------------
@_torch_check
def errors_no_process_group(ColumnParallelLinear, RowParallelLinear):
    """In the notebook (no process group): both layers raise an error saying so."""
    if is_initialized():
        fail("this check needs the notebook itself to have no process group")
    for name, layer_class in (("ColumnParallelLinear(4, 6)", ColumnParallelLinear),
                              ("RowParallelLinear(4, 6)", RowParallelLinear)):
        try:
            layer_class(4, 6)
        except NotImplementedError:
            fail(f"{name}: not implemented yet")
        except (RuntimeError, ValueError) as exc:
            text = str(exc).lower()
            if not ("process group" in text or "init_process_group" in text):
                fail(f"{name} with no process group raised {type(exc).__name__}({exc!r}): the "
                     f"message should say that no process group is initialised")
        else:
            fail(f"{name} was built with no process group initialised: it should raise a "
                 f"RuntimeError saying so (check dist.is_initialized())")


def _bad_master_weight(ColumnParallelLinear, RowParallelLinear):
    outcomes = []
    for make in (lambda: ColumnParallelLinear(4, 6, master_weight=tensor(trusted.asarray(
                     [[0.0] * 6] * 4, dtype=trusted.float32))),
                 lambda: RowParallelLinear(4, 6, master_weight=tensor(trusted.asarray(
                     [[0.0] * 5] * 6, dtype=trusted.float32)))):
        try:
            make()
            outcomes.append(None)
        except Exception as exc:  # noqa: BLE001 (the kind of exception is what is checked)
            outcomes.append((type(exc).__name__, str(exc)))
    return outcomes


def _spelled(shape, text):
    return any(s in text.replace(" ", "") for s in (f"({shape[0]},{shape[1]})",
                                                    f"[{shape[0]},{shape[1]}]"))


@_torch_check
def errors_master_weight(ColumnParallelLinear, RowParallelLinear):
    """1 rank: a master_weight of the wrong shape is a ValueError naming both shapes."""
    cases = (("ColumnParallelLinear(4, 6, master_weight of shape (4, 6))", (6, 4), (4, 6)),
             ("RowParallelLinear(4, 6, master_weight of shape (6, 5))", (6, 4), (6, 5)))
    outcomes = run_on_ranks(_bad_master_weight, 1, ColumnParallelLinear, RowParallelLinear,
                            timeout=TIMEOUT, reply=replies.ranks(1, replies.outcomes(2)))[0]
    for (name, want, got), outcome in zip(cases, outcomes):
        if outcome is None:
            fail(f"{name} was accepted: it should raise ValueError (expected shape {want})")
        kind, text = outcome
        if kind != "ValueError":
            fail(f"{name} raised {kind}({text!r}): it should raise ValueError")
        if not (_spelled(want, text) and _spelled(got, text)):
            fail(f"{name}: the message {text!r} should name the expected shape {want} and the "
                 f"actual shape {got}")


make_checks_read_only(__name__)
