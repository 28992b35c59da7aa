"""tp_torch's units, the rank side: build the student's ColumnParallelLinear, RowParallelLinear
and ParallelMLP from the unit's data (assignments/tp_torch/gpu/data.py, the same numbers the
judge recomputes), run them, and REPORT outputs, gradients, shards, parameter shapes,
exceptions and collective counts as data. Nothing here decides a grade: gpu/judge.py does, in
the grader process. The phases and the helpers are gpu_runner.observe's.
"""
from __future__ import annotations

import inspect

import torch

from gpu_runner.observe import (MLP_ACTIVATION, Ctx, counted, cpu, float64_run, no_default_group,
                                outcome, set_param, shaped)
from gpu_runner.records import encode_param, encode_tensor

from . import data


def _params(layer):
    return {"weight": encode_param(getattr(layer, "weight", None)),
            "bias": encode_param(getattr(layer, "bias", None))}


# -- errors -----------------------------------------------------------------------------------
def errors_nopg(ctx: Ctx):
    """With no process group: construct each layer, report what it raised."""
    m = ctx.m
    with no_default_group():
        ctx.report("no_group_column", outcome(lambda: m.ColumnParallelLinear(4, 4)))
        ctx.report("no_group_row", outcome(lambda: m.RowParallelLinear(4, 4)))


def errors_shape(ctx: Ctx):
    """A master_weight of the wrong shape (2 rows / 2 columns too many)."""
    m, (i, o) = ctx.m, data.COLUMN_DIMS
    ctx.report("bad_shape_column", ctx.phase(lambda: outcome(lambda: ctx.build(
        m.ColumnParallelLinear, i, o, master_weight=torch.zeros(o + 2, i)))))
    i, o = data.ROW_DIMS
    ctx.report("bad_shape_row", ctx.phase(lambda: outcome(lambda: ctx.build(
        m.RowParallelLinear, i, o, master_weight=torch.zeros(o, i + 2)))))


# -- linear layers ----------------------------------------------------------------------------
_LAYERS = {"column": ("ColumnParallelLinear", data.column, data.COLUMN_DIMS),
           "row": ("RowParallelLinear", data.row, data.ROW_DIMS)}


def _case(ctx, kind):
    name, make_case, (i, o) = _LAYERS[kind]
    return getattr(ctx.m, name), make_case(ctx.seed), i, o


def _maker(ctx, kind, **kw):
    """A function building the student's layer with this rank's master_weight and the case's
    (non-zero) bias, as the group's ranks hold it."""
    cls, case, i, o = _case(ctx, kind)
    lo, hi = ctx.shard(o)
    bias = case.b[lo:hi] if kind == "column" else case.b

    def make():
        layer = ctx.build(cls, i, o, master_weight=cpu(case.master(ctx.rank, ctx.size)), **kw)
        set_param(layer.bias, ctx.tensor(bias))
        return layer
    return make, case


def _input(ctx, kind, case):
    """The layer's input on this rank: the full x (column), this rank's slice (row)."""
    return case.x if kind == "column" else case.x[:, slice(*ctx.shard(case.x.shape[1]))]


def shards(ctx: Ctx, kind):
    """The shards of a layer built with this rank's master_weight; the default init; for the
    column layer also bias=False and fewer output features than ranks (an empty shard)."""
    cls, case, i, o = _case(ctx, kind)
    master = cpu(case.master(ctx.rank, ctx.size))
    layer = ctx.phase(lambda: ctx.build(cls, i, o, master_weight=master.clone()))
    ctx.report("shards", ctx.phase(lambda: _params(layer)))
    layer = ctx.phase(lambda: ctx.build(cls, i, o))
    ctx.report("default", ctx.phase(lambda: _params(layer)))
    if kind != "column":
        return
    layer = ctx.phase(lambda: ctx.build(cls, i, o, bias=False, master_weight=master.clone()))
    ctx.report("no_bias", ctx.phase(lambda: _params(layer)))
    if ctx.size >= 2:          # fewer output features than ranks: the last rank holds none
        small = cpu(case.master(ctx.rank, ctx.size, rows=ctx.size - 1))
        layer = ctx.phase(lambda: ctx.build(cls, i, ctx.size - 1, master_weight=small))
        ctx.report("empty", ctx.phase(lambda: _params(layer)))


def column_forward(ctx: Ctx):
    make, case = _maker(ctx, "column")
    layer = ctx.phase(make)
    x = ctx.tensor(case.x)
    ctx.observe("y", lambda: counted(ctx, "counts", lambda: layer(x)))
    ctx.observe("y1", lambda: layer(ctx.tensor(case.x[0])))
    ctx.observe("y3", lambda: layer(ctx.tensor(case.x3)))


def backward(ctx: Ctx, kind):
    """Forward and backward of loss = sum(y * g): the input's, weight's and bias's gradients."""
    make, case = _maker(ctx, kind)
    layer, xs = ctx.phase(lambda: (make(), ctx.tensor(_input(ctx, kind, case),
                                                      requires_grad=True)))
    y = ctx.phase(lambda: shaped(layer(xs), case.g.shape))
    ctx.phase(lambda: counted(ctx, "counts", lambda: (y * ctx.tensor(case.g)).sum().backward()))
    ctx.observe("gx", lambda: xs.grad)
    ctx.observe("gw", lambda: layer.weight.grad)
    ctx.observe("gb", lambda: layer.bias.grad)


def column_local(ctx: Ctx):
    """gather_output=False: this rank's slice of the output, and the input's gradient when each
    rank's loss is its slice's part (summed over ranks they make the dense loss)."""
    make, case = _maker(ctx, "column", gather_output=False)
    lo, hi = ctx.shard(case.w.shape[0])
    layer, xs = ctx.phase(lambda: (make(), ctx.tensor(case.x, requires_grad=True)))
    y = ctx.observe("y", lambda: counted(ctx, "counts.forward", lambda: layer(xs)))
    ctx.phase(lambda: shaped(y, (data.BATCH, hi - lo)))
    ctx.phase(lambda: counted(ctx, "counts.backward",
                               lambda: (y * ctx.tensor(case.g[:, lo:hi])).sum().backward()))
    ctx.observe("gx", lambda: xs.grad)


def row_forward(ctx: Ctx):
    make, case = _maker(ctx, "row")
    layer = ctx.phase(make)
    x = ctx.tensor(_input(ctx, "row", case))
    ctx.observe("y", lambda: counted(ctx, "counts", lambda: layer(x)))


def row_full(ctx: Ctx):
    """input_is_parallel=False: the full input comes in."""
    make, case = _maker(ctx, "row", input_is_parallel=False)
    layer, xs = ctx.phase(lambda: (make(), ctx.tensor(case.x, requires_grad=True)))
    y = ctx.observe("y", lambda: layer(xs))
    ctx.phase(lambda: (shaped(y, case.g.shape) * ctx.tensor(case.g)).sum().backward())
    ctx.observe("gx", lambda: xs.grad)


def float64(ctx: Ctx, kind):
    """The device and dtype rules, checkable on any machine: the layer built as usual, then
    moved with .to(torch.float64) (as .to(device) moves it to a GPU), and run on a float64 input
    with meta as the default device. A tensor created in forward without device= lands on meta;
    one created without dtype= is float32 (a wrong dtype, or values rounded to float32); a tensor
    attribute that is not a parameter or buffer stays behind. (The backward runs outside the
    meta context, autograd does not carry it: there only the dtype shows.)"""
    if kind == "mlp":
        make, case = _mlp_maker(ctx)
        module = ctx.phase(lambda: make()[0])
    else:       # the row layer takes the full input: its scatter's backward gathers
        make, case = _maker(ctx, kind, **({"input_is_parallel": False} if kind == "row" else {}))
        module = ctx.phase(make)
    float64_run(ctx, module, case.x, case.g)


# -- MLP --------------------------------------------------------------------------------------
def _mlp_maker(ctx):
    """A function building the student's ParallelMLP with this rank's master weights and the
    case's biases; it returns (mlp, its four parameters found by shape)."""
    case = data.mlp(ctx.seed)
    h, f = data.MLP_DIMS
    lo, hi = ctx.shard(f)
    cls = ctx.m.ParallelMLP
    kw = {"activation": MLP_ACTIVATION} if _takes(cls, "activation") else {}

    def make():
        mlp = ctx.build(cls, h, f, bias=True, w1=cpu(case.fc1.master(ctx.rank, ctx.size)),
                        w2=cpu(case.fc2.master(ctx.rank, ctx.size)), **kw)
        p = _mlp_params(mlp, h, hi - lo)
        set_param(p["b1"], ctx.tensor(case.fc1.b[lo:hi]))
        set_param(p["b2"], ctx.tensor(case.fc2.b))
        return mlp, p
    return make, case


def _mlp_params(mlp, hidden, local):
    """The MLP's four parameters, found by shape (their attribute names are the student's)."""
    want = {"w1": (local, hidden), "b1": (local,), "w2": (hidden, local), "b2": (hidden,)}
    found = {}
    for param in mlp.parameters():
        for key, shape in want.items():
            if tuple(param.shape) == shape and key not in found:
                found[key] = param
                break
    missing = [f"{k} {s}" for k, s in want.items() if k not in found]
    if missing:
        raise ValueError(f"ParallelMLP has no parameter of shape {', '.join(missing)}")
    return found


def mlp_forward(ctx: Ctx):
    make, case = _mlp_maker(ctx)
    mlp, _ = ctx.phase(make)
    x = ctx.tensor(case.x)
    ctx.observe("y", lambda: counted(ctx, "counts", lambda: mlp(x)))


def mlp_backward(ctx: Ctx):
    make, case = _mlp_maker(ctx)
    (mlp, p), xs = ctx.phase(lambda: (make(), ctx.tensor(case.x, requires_grad=True)))
    y = ctx.phase(lambda: shaped(mlp(xs), case.g.shape))
    ctx.phase(lambda: counted(ctx, "counts", lambda: (y * ctx.tensor(case.g)).sum().backward()))
    ctx.observe("gx", lambda: xs.grad)
    ctx.report("grads", ctx.phase(lambda: {k: encode_tensor(p[k].grad) for k in p}))


def _takes(cls, param):
    try:
        return param in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


UNITS = {
    ("errors", "nopg"): errors_nopg, ("errors", "shape"): errors_shape,
    ("column", "shards"): lambda ctx: shards(ctx, "column"),
    ("column", "forward"): column_forward,
    ("column", "backward"): lambda ctx: backward(ctx, "column"),
    ("column", "local"): column_local,
    ("column", "float64"): lambda ctx: float64(ctx, "column"),
    ("row", "shards"): lambda ctx: shards(ctx, "row"),
    ("row", "forward"): row_forward,
    ("row", "backward"): lambda ctx: backward(ctx, "row"),
    ("row", "full"): row_full,
    ("row", "float64"): lambda ctx: float64(ctx, "row"),
    ("mlp", "forward"): mlp_forward, ("mlp", "backward"): mlp_backward,
    ("mlp", "float64"): lambda ctx: float64(ctx, "mlp"),
}


def timed_layer(ctx: Ctx, layer: str, dims: dict):
    """A layer of TIMED_LAYERS built for gpu_runner.timing, and its input's shape."""
    m, h, f = ctx.m, dims["hidden"], dims["ffn"]
    if layer == "column":
        return ctx.build(m.ColumnParallelLinear, h, f), (dims["batch"], h)
    if layer == "row":
        return ctx.build(m.RowParallelLinear, f, h), (dims["batch"], (f // ctx.size) + (
            1 if ctx.rank < f % ctx.size else 0))
    return ctx.build(m.ParallelMLP, h, f), (dims["batch"], h)
