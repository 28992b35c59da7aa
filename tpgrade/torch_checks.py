"""Checks for the tp_torch notebook: the mappings, ColumnParallelLinear, RowParallelLinear,
ParallelMLP and their errors, on 2 (or 1) CPU gloo ranks.

Each public function is one graded test cell (`import tpgrade.torch_checks as check;
check.column_forward(ColumnParallelLinear)`): it raises an AssertionError whose message names
the mistake, a RankError when the student's code raised on a rank, and prints nothing when
the solution is right. The setup cell imports this module before any student code runs; what
that protects, and how, is in tpgrade._torch_trusted.
"""
from __future__ import annotations

import functools

from . import _torch_compare as C
from . import _trusted as T
from ._harness import check, make_read_only
from ._torch_trusted import (as_numpy, backprop, get_rank, is_initialized, no_grad, restore,
                             run_on_ranks, tensor)
from .compare import fail

TIMEOUT = 20           # seconds per run_on_ranks call: a deadlock is reported well within a cell


def _torch_check(func):
    """A check that first puts back the genuine torch.distributed and rank machinery."""
    @functools.wraps(func)
    def restored(*args, **kwargs):
        restore()
        return func(*args, **kwargs)
    return check(restored)


# -- shard_range ------------------------------------------------------------------------------
def _ints(got):
    try:
        return tuple(T.index(v) for v in got)
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
    x = tensor(T.asarray([[1.0] * 3] * 2, dtype=T.float32), requires_grad=True)
    backprop(copy_to_tp_region(x), T.asarray([[rank + 1.0] * 3] * 2, dtype=T.float32),
             "copy_to_tp_region")                                     # incoming grads 1 and 2
    partial = tensor(T.asarray([rank + 1.0] * 2, dtype=T.float32), requires_grad=True)
    summed = reduce_from_tp_region(partial)
    backprop(summed, T.asarray([10.0] * 2, dtype=T.float32), "reduce_from_tp_region")
    return as_numpy(x.grad), as_numpy(summed), as_numpy(partial.grad)


@_torch_check
def mappings_f_and_g(copy_to_tp_region, reduce_from_tp_region):
    """2 ranks: f = copy_to_tp_region (all-reduce backward), g = reduce_from_tp_region."""
    per_rank = run_on_ranks(_f_and_g, 2, copy_to_tp_region, reduce_from_tp_region, timeout=TIMEOUT)
    for rank, values in enumerate(per_rank):
        x_grad, summed, partial_grad = (C.array(v, rank, what) for v, what in
                                        zip(values, ("x.grad", "the output", "the input's .grad")))
        if not C.equal(x_grad, T.asarray([[3.0] * 3] * 2)):
            fail(f"rank {rank}: copy_to_tp_region's backward should all-reduce the gradient "
                 f"(1 + 2 = 3 everywhere); got {C.show(x_grad)}")
        if not C.equal(summed, T.asarray([3.0, 3.0])):
            fail(f"rank {rank}: reduce_from_tp_region should sum over ranks in forward "
                 f"(1 + 2 = 3); got {C.show(summed)}")
        if not C.equal(partial_grad, T.asarray([10.0, 10.0])):
            fail(f"rank {rank}: reduce_from_tp_region's backward is the identity (10 stays 10); "
                 f"got {C.show(partial_grad)}")


_GRID = T.arange(10.0).reshape(2, 5)            # gathered from 3 + 2 columns
_GRID_GRAD = T.arange(10.0, 20.0).reshape(2, 5)


def _columns(rank):
    return [0, 1, 2] if rank == 0 else [3, 4]   # 5 columns on 2 ranks: 3 + 2


def _gather_and_scatter(gather_from_tp_region, scatter_to_tp_region):
    rank = get_rank()
    shard = tensor(_GRID[:, _columns(rank)].astype(T.float32), requires_grad=True)
    full = gather_from_tp_region(shard, 5)
    backprop(full, _GRID_GRAD.astype(T.float32), "gather_from_tp_region")
    z = tensor(T.arange(5.0, dtype=T.float32), requires_grad=True)
    mine = scatter_to_tp_region(z)
    backprop(mine, T.asarray([rank + 1.0] * len(_columns(rank)), dtype=T.float32),
             "scatter_to_tp_region")
    return as_numpy(full), as_numpy(shard.grad), as_numpy(mine), as_numpy(z.grad)


@_torch_check
def mappings_gather_scatter(gather_from_tp_region, scatter_to_tp_region):
    """2 ranks, 5 columns as 3 + 2: gather / scatter along the last dim, both ways."""
    per_rank = run_on_ranks(_gather_and_scatter, 2, gather_from_tp_region, scatter_to_tp_region,
                            timeout=TIMEOUT)
    for rank, values in enumerate(per_rank):
        full, shard_grad, mine, z_grad = (
            C.array(v, rank, what) for v, what in zip(values, (
                "gather_from_tp_region's output", "the shard's .grad",
                "scatter_to_tp_region's output", "the input's .grad")))
        cols = _columns(rank)
        if not C.equal(full, _GRID):
            fail(f"rank {rank}: gather_from_tp_region of shards with 3 and 2 columns should give "
                 f"the full (2, 5) tensor on every rank (pad to the widest shard, all_gather, "
                 f"trim); got {C.show(full)}")
        if not C.equal(shard_grad, _GRID_GRAD[:, cols]):
            fail(f"rank {rank}: the backward of gather_from_tp_region keeps this rank's columns "
                 f"{cols} of the gradient; got {C.show(shard_grad)}")
        if not C.equal(mine, T.arange(5.0)[cols]):
            fail(f"rank {rank}: scatter_to_tp_region should keep this rank's slice {cols}; "
                 f"got {C.show(mine)}")
        if not C.equal(z_grad, T.asarray([1.0, 1, 1, 2, 2])):
            fail(f"rank {rank}: the backward of scatter_to_tp_region all-gathers the slices' "
                 f"gradients (expected [1, 1, 1, 2, 2]); got {C.show(z_grad)}")


# -- the layers' shards -------------------------------------------------------------------------
def _shards(layer_class, in_features, out_features, master):
    layer = layer_class(in_features, out_features, master_weight=tensor(master))
    return as_numpy(layer.weight), as_numpy(layer.bias)


def _expect_zero_bias(bias, rank):
    if bool((bias != 0).any()):
        fail(f"rank {rank}: .bias must start at zero, got {C.show(bias)}")


@_torch_check
def column_shards(ColumnParallelLinear):
    """2 ranks, (4 -> 6): .weight holds 3 rows of master_weight, .bias 3 zeros."""
    master = C.master(6, 4)
    per_rank = run_on_ranks(_shards, 2, ColumnParallelLinear, 4, 6, master, timeout=TIMEOUT)
    for rank, (weight, bias) in enumerate(per_rank):
        weight, bias = C.array(weight, rank, ".weight"), C.array(bias, rank, ".bias")
        if C.shape(weight) != (3, 4):
            fail(f"rank {rank}: .weight has shape {C.shape(weight)}, expected (3, 4): the column "
                 f"layer keeps out_features / 2 = 3 ROWS of the (6, 4) master_weight")
        if not C.equal(weight, master[3 * rank:3 * rank + 3]):
            fail(f"rank {rank}: .weight should be rows {3 * rank}..{3 * rank + 2} of "
                 f"master_weight; wrong shard for the rank?")
        if C.shape(bias) != (3,):
            fail(f"rank {rank}: .bias should be this rank's slice of the bias, shape (3,); got "
                 f"{C.shape(bias)}")
        _expect_zero_bias(bias, rank)


@_torch_check
def row_shards(RowParallelLinear):
    """2 ranks, (6 -> 4): .weight holds 3 columns of master_weight, .bias 4 zeros."""
    master = C.master(4, 6)
    per_rank = run_on_ranks(_shards, 2, RowParallelLinear, 6, 4, master, timeout=TIMEOUT)
    for rank, (weight, bias) in enumerate(per_rank):
        weight, bias = C.array(weight, rank, ".weight"), C.array(bias, rank, ".bias")
        if C.shape(weight) != (4, 3):
            fail(f"rank {rank}: .weight has shape {C.shape(weight)}, expected (4, 3): the row "
                 f"layer keeps in_features / 2 = 3 COLUMNS of the (4, 6) master_weight")
        if not C.equal(weight, master[:, 3 * rank:3 * rank + 3]):
            fail(f"rank {rank}: .weight should be columns {3 * rank}..{3 * rank + 2} of "
                 f"master_weight; wrong shard for the rank?")
        if C.shape(bias) != (4,):
            fail(f"rank {rank}: .bias should be the FULL bias, shape (4,); got {C.shape(bias)}")
        _expect_zero_bias(bias, rank)


# -- ColumnParallelLinear: forward and backward -------------------------------------------------
def _column_layer(ColumnParallelLinear, w, b, **kwargs):
    rank = get_rank()
    layer = ColumnParallelLinear(4, 6, master_weight=tensor(w), **kwargs)
    with no_grad():
        layer.bias.copy_(tensor(b[3 * rank:3 * rank + 3]))
    return layer


def _column_forward(ColumnParallelLinear, x, w, b):
    return [as_numpy(_column_layer(ColumnParallelLinear, w, b, gather_output=g)(tensor(x)))
            for g in (True, False)]


@_torch_check
def column_forward(ColumnParallelLinear):
    """2 ranks: the dense F.linear output, full (gather_output) or this rank's columns."""
    x, w, b = C.f32((5, 4), (6, 4), (6,), seed=1)
    dense = C.linear(x, w, b)
    per_rank = run_on_ranks(_column_forward, 2, ColumnParallelLinear, x, w, b, timeout=TIMEOUT)
    for rank, (full, local) in enumerate(per_rank):
        full = C.array(full, rank, "the output (gather_output=True)")
        local = C.array(local, rank, "the output (gather_output=False)")
        if C.shape(full) != (5, 6):
            fail(f"rank {rank}: output shape {C.shape(full)}, expected (5, 6): with "
                 f"gather_output=True every rank returns the FULL output (only the local shard "
                 f"returned?)")
        if not C.close(full, dense):
            fail(f"rank {rank}: output differs from the dense F.linear(x, W, b) by up to "
                 f"{C.max_diff(full, dense):.3g}")
        if not C.close(local, dense[:, 3 * rank:3 * rank + 3]):
            fail(f"rank {rank}: with gather_output=False the output should be this rank's columns "
                 f"{3 * rank}..{3 * rank + 2} of the dense output, shape (5, 3); got shape "
                 f"{C.shape(local)}")


def _linear_grads(grads, rank):
    """A rank's (x.grad, weight.grad, bias.grad) from a linear layer, as float64 arrays."""
    return (C.array(g, rank, what) for g, what in
            zip(grads, ("x.grad", ".weight.grad", ".bias.grad")))


def _column_backward(ColumnParallelLinear, x, w, b, dy):
    layer = _column_layer(ColumnParallelLinear, w, b)
    x = tensor(x, requires_grad=True)
    backprop(layer(x), dy, "ColumnParallelLinear(4, 6)")
    return as_numpy(x.grad), as_numpy(layer.weight.grad), as_numpy(layer.bias.grad)


@_torch_check
def column_backward(ColumnParallelLinear):
    """2 ranks: dL/dx, and this rank's rows of dL/dW and dL/db, as the dense layer's."""
    x, w, b, dy = C.f32((5, 4), (6, 4), (6,), (5, 6), seed=2)
    dx, dw, db = C.linear_grads(x, w, dy)
    per_rank = run_on_ranks(_column_backward, 2, ColumnParallelLinear, x, w, b, dy, timeout=TIMEOUT)
    for rank, grads in enumerate(per_rank):
        x_grad, w_grad, b_grad = _linear_grads(grads, rank)
        rows = slice(3 * rank, 3 * rank + 3)
        if x_grad is None:
            fail(f"rank {rank}: x.grad is None: the output is not connected to x in autograd")
        if not C.close(x_grad, dx):
            fail(f"rank {rank}: dL/dx differs from the dense gradient by up to "
                 f"{C.max_diff(x_grad, dx):.3g}. Each rank holds only its term dL/dy_r @ W_r: "
                 f"x must go through copy_to_tp_region, whose backward all-reduces (section 4)")
        if not C.close(w_grad, dw[rows]):
            fail(f"rank {rank}: .weight.grad should equal rows {3 * rank}..{3 * rank + 2} of the "
                 f"dense weight gradient")
        if not C.close(b_grad, db[rows]):
            fail(f"rank {rank}: .bias.grad should equal this rank's slice of the dense bias "
                 f"gradient")


# -- RowParallelLinear: forward and backward ----------------------------------------------------
def _row_layer(RowParallelLinear, w, b, **kwargs):
    layer = RowParallelLinear(6, 4, master_weight=tensor(w), **kwargs)
    with no_grad():
        layer.bias.copy_(tensor(b))
    return layer


def _row_forward(RowParallelLinear, x, w, b):
    rank = get_rank()
    outputs = []
    for input_is_parallel in (True, False):
        layer = _row_layer(RowParallelLinear, w, b, input_is_parallel=input_is_parallel)
        outputs.append(as_numpy(layer(tensor(x[:, 3 * rank:3 * rank + 3] if input_is_parallel
                                             else x))))
    return outputs


@_torch_check
def row_forward(RowParallelLinear):
    """2 ranks: the dense F.linear output, from the input slice or the full input."""
    x, w, b = C.f32((5, 6), (4, 6), (4,), seed=3)
    dense = C.linear(x, w, b)
    per_rank = run_on_ranks(_row_forward, 2, RowParallelLinear, x, w, b, timeout=TIMEOUT)
    for rank, outputs in enumerate(per_rank):
        for name, y in zip(("input_is_parallel=True (this rank's slice of x)",
                            "input_is_parallel=False (the full x)"), outputs):
            y = C.array(y, rank, f"the output with {name}")
            if C.shape(y) != (5, 4):
                fail(f"rank {rank}, {name}: output shape {C.shape(y)}, expected (5, 4)")
            if C.close(y, dense):
                continue
            hint = (" The error is the bias once more: bias added on every rank before the "
                    "all-reduce?" if C.close(y - dense, dense * 0 + b) else "")
            fail(f"rank {rank}, {name}: output differs from the dense F.linear(x, W, b) by up to "
                 f"{C.max_diff(y, dense):.3g}.{hint}")


def _row_backward(RowParallelLinear, x, w, b, dy):
    rank = get_rank()
    layer = _row_layer(RowParallelLinear, w, b)
    x_r = tensor(x[:, 3 * rank:3 * rank + 3], requires_grad=True)
    backprop(layer(x_r), dy, "RowParallelLinear(6, 4)")
    return as_numpy(x_r.grad), as_numpy(layer.weight.grad), as_numpy(layer.bias.grad)


@_torch_check
def row_backward(RowParallelLinear):
    """2 ranks: the input slice's, this rank's columns of dL/dW, and dL/db, as dense."""
    x, w, b, dy = C.f32((5, 6), (4, 6), (4,), (5, 4), seed=4)
    dx, dw, db = C.linear_grads(x, w, dy)
    per_rank = run_on_ranks(_row_backward, 2, RowParallelLinear, x, w, b, dy, timeout=TIMEOUT)
    for rank, grads in enumerate(per_rank):
        x_grad, w_grad, b_grad = _linear_grads(grads, rank)
        cols = slice(3 * rank, 3 * rank + 3)
        if not C.close(x_grad, dx[:, cols]):
            fail(f"rank {rank}: the gradient of this rank's input slice should equal columns "
                 f"{3 * rank}..{3 * rank + 2} of the dense dL/dx (an autograd-aware all-reduce?)")
        if not C.close(w_grad, dw[:, cols]):
            fail(f"rank {rank}: .weight.grad should equal columns {3 * rank}..{3 * rank + 2} of "
                 f"the dense weight gradient")
        if not C.close(b_grad, db):
            fail(f"rank {rank}: .bias.grad should equal the dense bias gradient (bias added once, "
                 f"after the all-reduce)")


# -- ParallelMLP ----------------------------------------------------------------------------------
def _mlp(ParallelMLP, x, w1, b1, w2, b2, dy):
    rank = get_rank()
    mlp = ParallelMLP(4, 6, w1=tensor(w1), w2=tensor(w2))
    with no_grad():
        mlp.fc1.bias.copy_(tensor(b1[3 * rank:3 * rank + 3]))
        mlp.fc2.bias.copy_(tensor(b2))
    x = tensor(x, requires_grad=True)
    y = mlp(x)
    backprop(y, dy, "ParallelMLP(4, 6)")
    return (as_numpy(y), as_numpy(x.grad), as_numpy(mlp.fc1.weight.grad),
            as_numpy(mlp.fc2.weight.grad))


def _mlp_run(ParallelMLP):
    """Per rank (y, dL/dx, dL/dW1 shard, dL/dW2 shard) as arrays, and the dense (same order)."""
    data = C.f32((5, 4), (6, 4), (6,), (4, 6), (4,), (5, 4), seed=5)
    per_rank = run_on_ranks(_mlp, 2, ParallelMLP, *data, timeout=TIMEOUT)
    names = ("the output", "x.grad", "fc1.weight.grad", "fc2.weight.grad")
    got = [[C.array(v, rank, what) for v, what in zip(values, names)]
           for rank, values in enumerate(per_rank)]
    return got, C.dense_mlp(*data)


@_torch_check
def mlp_forward(ParallelMLP):
    """2 ranks: ParallelMLP(4, 6) equals the dense gelu MLP."""
    per_rank, (dense, *_) = _mlp_run(ParallelMLP)
    for rank, (y, *_) in enumerate(per_rank):
        if C.shape(y) != (5, 4):
            fail(f"rank {rank}: output shape {C.shape(y)}, expected (5, 4)")
        if not C.close(y, dense):
            fail(f"rank {rank}: ParallelMLP output differs from the dense gelu MLP by up to "
                 f"{C.max_diff(y, dense):.3g} (fc1 with gather_output=False, fc2 with "
                 f"input_is_parallel=True, bias of fc2 once?)")


@_torch_check
def mlp_backward(ParallelMLP):
    """2 ranks: dL/dx, fc1's rows and fc2's columns of the dense MLP's weight gradients."""
    per_rank, (_, dx, dw1, dw2) = _mlp_run(ParallelMLP)
    for rank, (_, x_grad, w1_grad, w2_grad) in enumerate(per_rank):
        part = slice(3 * rank, 3 * rank + 3)
        if not C.close(x_grad, dx):
            fail(f"rank {rank}: dL/dx of the MLP differs from the dense gradient (fc1's input must "
                 f"go through copy_to_tp_region: its backward is the MLP's one all-reduce in "
                 f"backward)")
        if not C.close(w1_grad, dw1[part]):
            fail(f"rank {rank}: fc1.weight.grad should equal rows {3 * rank}..{3 * rank + 2} of "
                 f"the dense W1 gradient")
        if not C.close(w2_grad, dw2[:, part]):
            fail(f"rank {rank}: fc2.weight.grad should equal columns {3 * rank}..{3 * rank + 2} of "
                 f"the dense W2 gradient")


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
    for make in (lambda: ColumnParallelLinear(4, 6, master_weight=tensor(T.asarray(
                     [[0.0] * 6] * 4, dtype=T.float32))),
                 lambda: RowParallelLinear(4, 6, master_weight=tensor(T.asarray(
                     [[0.0] * 5] * 6, dtype=T.float32)))):
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
                            timeout=TIMEOUT)[0]
    for (name, want, got), outcome in zip(cases, outcomes):
        if outcome is None:
            fail(f"{name} was accepted: it should raise ValueError (expected shape {want})")
        kind, text = (str(part) for part in outcome)
        if kind != "ValueError":
            fail(f"{name} raised {kind}({text!r}): it should raise ValueError")
        if not (_spelled(want, text) and _spelled(got, text)):
            fail(f"{name}: the message {text!r} should name the expected shape {want} and the "
                 f"actual shape {got}")


make_read_only(__name__)
make_read_only("tpgrade")   # `tpgrade.torch_checks = fake` must not replace the checks either
