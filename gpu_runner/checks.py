"""The checks, run on every rank of a unit's group against a dense reference.

Every rank builds the same full weights, biases, inputs and output gradients from a seed, runs
the dense `F.linear`/MLP itself, and compares its own shard of the student's layer with the
matching slice of the dense result. Biases are set to non-zero values after construction so
that a bias added on every rank shows. Each unit is a sequence of phases; after each phase the
group agrees (over a gloo control group) whether every rank got through, so a rank that raised
never leaves the others waiting in a collective of the next phase.
"""
from __future__ import annotations

import inspect
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .counting import CollectiveCounter

ATOL, RTOL = 1e-5, 1e-4
BATCH = 3
COLUMN_DIMS = (5, 7)          # in, out: out splits unevenly over 2, 3 and 4 ranks
ROW_DIMS = (7, 5)             # in splits unevenly
MLP_DIMS = (6, 10)            # hidden, ffn: ffn splits evenly over 2, unevenly over 3 and 4
MLP_ACTIVATION = F.gelu       # passed as activation= when the student's ParallelMLP takes it


class PhaseFailed(Exception):
    """Some rank of the group did not get through a phase; the unit's remaining checks fail."""


class Ctx:
    """What a unit needs: the student's module, the group and this rank's place in it."""

    def __init__(self, module, group, size, rank, device, control, seed):
        self.m, self.group, self.size, self.rank = module, group, size, rank
        self.device, self.control, self.seed = device, control, seed
        self.results: dict[str, tuple[bool, str]] = {}
        self.comm_error: BaseException | None = None

    # -- phases -----------------------------------------------------------------------------
    def phase(self, fn):
        """Run fn() on every rank, then agree: returns its value, or raises PhaseFailed on
        every rank if it raised on any (a collective error is kept for the fault report)."""
        value, ok, why = None, True, ""
        try:
            value = fn()
        except Exception as exc:  # the student's error: reported, never propagated
            ok, why = False, describe(exc)
            if is_comm_error(exc):
                self.comm_error = exc
        if self.control is None:
            oks = [(ok, why)]
        else:
            oks = [None] * self.size
            dist.all_gather_object(oks, (ok, why), group=self.control)
        if not all(o for o, _ in oks):
            bad = next(f"rank {r} of {self.size}: {w}" for r, (o, w) in enumerate(oks) if not o)
            raise PhaseFailed(bad)
        return value

    def check(self, name, ok, detail=""):
        self.results[name] = (bool(ok), "" if ok else detail)

    def compare(self, name, got, want):
        self.check(name, *close(got, want))

    # -- data -------------------------------------------------------------------------------
    def randn(self, *shape, salt=0):
        gen = torch.Generator().manual_seed(self.seed * 1000 + salt)
        return torch.randn(*shape, generator=gen)

    def shard(self, n):
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def to_dev(self, t):
        return t.to(self.device)

    def build(self, cls, *args, **kwargs):
        """Construct on CPU, then move to the rank's device (nn.Module.to keeps Parameters)."""
        return cls(*args, group=self.group, **kwargs).to(self.device)


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def is_comm_error(exc: BaseException) -> bool:
    """A failure inside a collective (timeout, peer gone): the process group is not usable."""
    if type(exc).__name__ in ("DistBackendError", "DistError", "DistNetworkError",
                              "DistStoreError"):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("timed out", "timeout", "connection closed", "connection reset",
                            "broken pipe", "nccl error", "gloo/transport"))


def close(got, want) -> tuple[bool, str]:
    if not isinstance(got, torch.Tensor):
        return False, f"got {type(got).__name__}, expected a tensor"
    if tuple(got.shape) != tuple(want.shape):
        return False, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        return True, ""
    return False, f"max abs error {(got - want).abs().max().item():.3g}"


def counts_ok(counter: CollectiveCounter, expected: dict) -> tuple[bool, str]:
    got = {k: n for k, n in counter.counts.items() if n}
    if got == expected:
        return True, ""
    want = ", ".join(f"{n} {k}" for k, n in expected.items()) or "no collectives"
    return False, f"ran {counter.describe()}, expected {want}"


def dense_linear(x, w, b, g):
    """Dense forward/backward: (y, x.grad, w.grad, b.grad) for loss = sum(y * g)."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = F.linear(x, w, b)
    (y * g).sum().backward()
    return y.detach(), x.grad, w.grad, b.grad


def set_param(param, value):
    if param is None or tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"parameter shape {None if param is None else tuple(param.shape)}, "
                         f"expected {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value)


# -- errors ---------------------------------------------------------------------------------
_NO_GROUP = [("the process group", r"process.?group|init_process_group|initiali[sz]")]


def _raises(fn, types, mentions=()):
    """(ok, why): fn() raises one of `types` whose message matches every (label, regex)."""
    try:
        fn()
    except types as exc:
        missing = [label for label, rx in mentions if not re.search(rx, str(exc), re.I)]
        if missing:
            return False, f"{describe(exc)} -- the message does not name {' / '.join(missing)}"
        return True, ""
    except Exception as exc:
        return False, f"raised {describe(exc)}, expected {' or '.join(t.__name__ for t in types)}"
    return False, "no error raised"


def errors_nopg(ctx: Ctx):
    """Before init_process_group: constructing a layer must fail clearly."""
    m = ctx.m
    ctx.check("errors.no_group_column", *_raises(lambda: m.ColumnParallelLinear(4, 4),
                                                 (RuntimeError, ValueError), _NO_GROUP))
    ctx.check("errors.no_group_row", *_raises(lambda: m.RowParallelLinear(4, 4),
                                              (RuntimeError, ValueError), _NO_GROUP))


def errors_shape(ctx: Ctx):
    """A wrong master_weight shape: ValueError whose message names both shapes."""
    m, (i, o) = ctx.m, COLUMN_DIMS
    ok = ctx.phase(lambda: _raises(lambda: ctx.build(
        m.ColumnParallelLinear, i, o, master_weight=torch.zeros(o + 2, i)), (ValueError,),
        mentions=_shape_pattern((o, i), (o + 2, i))))
    ctx.check("errors.bad_shape_column", *ok)
    i, o = ROW_DIMS
    ok = ctx.phase(lambda: _raises(lambda: ctx.build(
        m.RowParallelLinear, i, o, master_weight=torch.zeros(o, i + 2)), (ValueError,),
        mentions=_shape_pattern((o, i), (o, i + 2))))
    ctx.check("errors.bad_shape_row", *ok)


def _shape_pattern(*shapes):
    """Regexes matching each shape however it is written: (7, 5), torch.Size([7, 5]), 7x5."""
    return [(f"{a}, {b}", rf"\b{a}\D{{1,4}}{b}\b") for a, b in shapes]


# -- column ---------------------------------------------------------------------------------
def _column(ctx, **kw):
    i, o = COLUMN_DIMS
    w, b = ctx.randn(o, i, salt=1), ctx.randn(o, salt=2)
    x, g = ctx.randn(BATCH, i, salt=3), ctx.randn(BATCH, o, salt=4)
    lo, hi = ctx.shard(o)

    def make():
        layer = ctx.build(ctx.m.ColumnParallelLinear, i, o, master_weight=w.clone(), **kw)
        set_param(layer.bias, ctx.to_dev(b[lo:hi]))
        return layer
    return make, (x, w, b, g), (lo, hi)


def column_shards(ctx: Ctx):
    i, o = COLUMN_DIMS
    w = ctx.randn(o, i, salt=1)
    lo, hi = ctx.shard(o)
    layer = ctx.phase(lambda: ctx.build(ctx.m.ColumnParallelLinear, i, o, master_weight=w.clone()))
    ctx.check("column.shards", *_shards_ok(layer, w[lo:hi], (hi - lo,)))
    layer = ctx.phase(lambda: ctx.build(ctx.m.ColumnParallelLinear, i, o))
    ctx.check("column.default_init", *_default_ok(layer, (hi - lo, i), (hi - lo,)))
    layer = ctx.phase(lambda: ctx.build(ctx.m.ColumnParallelLinear, i, o, bias=False,
                                        master_weight=w.clone()))
    ctx.check("column.no_bias", getattr(layer, "bias", None) is None,
              f"bias=False left a bias {getattr(getattr(layer, 'bias', None), 'shape', '')}")
    if ctx.size >= 2:          # fewer output features than ranks: the last rank holds none
        small = ctx.size - 1
        lo, hi = ctx.shard(small)
        layer = ctx.phase(lambda: ctx.build(ctx.m.ColumnParallelLinear, i, small,
                                            master_weight=w[:small].clone()))
        ctx.check("column.empty_shard", *_shards_ok(layer, w[lo:hi], (hi - lo,)))


def column_forward(ctx: Ctx):
    make, (x, w, b, g), _ = _column(ctx)
    layer = ctx.phase(make)
    fwd = CollectiveCounter()

    def forward():
        with fwd:
            return layer(ctx.to_dev(x))
    y = ctx.phase(forward)
    ctx.compare("column.forward", y, F.linear(x, w, b))
    _count(ctx, "counts.column_gather", fwd, {"allgather": 1})
    x1, x3 = x[0], ctx.randn(2, BATCH, COLUMN_DIMS[0], salt=5)     # 1-D and 3-D inputs
    y1, y3 = ctx.phase(lambda: (layer(ctx.to_dev(x1)), layer(ctx.to_dev(x3))))
    ctx.check("column.forward_nd", *_all(close(y1, F.linear(x1, w, b)),
                                         close(y3, F.linear(x3, w, b))))


def column_backward(ctx: Ctx):
    make, (x, w, b, g), (lo, hi) = _column(ctx)
    _, dx, dw, db = dense_linear(x, w, b, g)
    layer, xs = ctx.phase(lambda: (make(), ctx.to_dev(x).requires_grad_()))
    y = ctx.phase(lambda: _shaped(layer(xs), (BATCH, COLUMN_DIMS[1])))
    ctx.phase(lambda: (y * ctx.to_dev(g)).sum().backward())
    ctx.compare("column.grad_weight", layer.weight.grad, dw[lo:hi])
    ctx.compare("column.grad_bias", layer.bias.grad, db[lo:hi])
    ctx.compare("column.grad_input", xs.grad, dx)


def column_local(ctx: Ctx):
    make, (x, w, b, g), (lo, hi) = _column(ctx, gather_output=False)
    # Summed over ranks, the local losses sum(y_r * g_r) make the dense loss sum(y * g).
    _, dx, _, _ = dense_linear(x, w, b, g)
    layer, xs = ctx.phase(lambda: (make(), ctx.to_dev(x).requires_grad_()))
    fwd, bwd = CollectiveCounter(), CollectiveCounter()

    def forward():
        with fwd:
            return layer(xs)
    y = ctx.phase(forward)
    ctx.compare("column.forward_local", y, F.linear(x, w, b)[:, lo:hi])
    _count(ctx, "counts.column_forward", fwd, {})
    ctx.phase(lambda: _shaped(y, (BATCH, hi - lo)))

    def backward():
        with bwd:
            (y * ctx.to_dev(g[:, lo:hi])).sum().backward()
    ctx.phase(backward)
    ctx.compare("column.grad_input_local", xs.grad, dx)
    _count(ctx, "counts.column_backward", bwd, {"allreduce": 1})


# -- row ------------------------------------------------------------------------------------
def _row(ctx, **kw):
    i, o = ROW_DIMS
    w, b = ctx.randn(o, i, salt=11), ctx.randn(o, salt=12)
    x, g = ctx.randn(BATCH, i, salt=13), ctx.randn(BATCH, o, salt=14)

    def make():
        layer = ctx.build(ctx.m.RowParallelLinear, i, o, master_weight=w.clone(), **kw)
        set_param(layer.bias, ctx.to_dev(b))
        return layer
    return make, (x, w, b, g), ctx.shard(i)


def row_shards(ctx: Ctx):
    i, o = ROW_DIMS
    w = ctx.randn(o, i, salt=11)
    lo, hi = ctx.shard(i)
    layer = ctx.phase(lambda: ctx.build(ctx.m.RowParallelLinear, i, o, master_weight=w.clone()))
    ctx.check("row.shards", *_shards_ok(layer, w[:, lo:hi], (o,)))
    layer = ctx.phase(lambda: ctx.build(ctx.m.RowParallelLinear, i, o))
    ctx.check("row.default_init", *_default_ok(layer, (o, hi - lo), (o,)))


def row_forward(ctx: Ctx):
    make, (x, w, b, g), (lo, hi) = _row(ctx)
    layer = ctx.phase(make)
    fwd = CollectiveCounter()

    def forward():
        with fwd:
            return layer(ctx.to_dev(x[:, lo:hi].clone()))
    y = ctx.phase(forward)
    ctx.compare("row.forward", y, F.linear(x, w, b))
    _count(ctx, "counts.row_forward", fwd, {"allreduce": 1})


def row_backward(ctx: Ctx):
    make, (x, w, b, g), (lo, hi) = _row(ctx)
    _, dx, dw, db = dense_linear(x, w, b, g)
    layer, xs = ctx.phase(lambda: (make(), ctx.to_dev(x[:, lo:hi].clone()).requires_grad_()))
    y = ctx.phase(lambda: _shaped(layer(xs), (BATCH, ROW_DIMS[1])))
    bwd = CollectiveCounter()

    def backward():
        with bwd:
            (y * ctx.to_dev(g)).sum().backward()
    ctx.phase(backward)
    ctx.compare("row.grad_weight", layer.weight.grad, dw[:, lo:hi])
    ctx.compare("row.grad_bias", layer.bias.grad, db)
    ctx.compare("row.grad_input", xs.grad, dx[:, lo:hi])
    _count(ctx, "counts.row_backward", bwd, {})


def row_full(ctx: Ctx):
    make, (x, w, b, g), _ = _row(ctx, input_is_parallel=False)
    _, dx, _, _ = dense_linear(x, w, b, g)
    layer, xs = ctx.phase(lambda: (make(), ctx.to_dev(x).requires_grad_()))
    y = ctx.phase(lambda: layer(xs))
    ctx.compare("row.forward_full", y, F.linear(x, w, b))
    ctx.phase(lambda: (_shaped(y, (BATCH, ROW_DIMS[1])) * ctx.to_dev(g)).sum().backward())
    ctx.compare("row.grad_input_full", xs.grad, dx)


# -- MLP ------------------------------------------------------------------------------------
def _mlp(ctx):
    h, f = MLP_DIMS
    w1, b1 = ctx.randn(f, h, salt=21), ctx.randn(f, salt=22)
    w2, b2 = ctx.randn(h, f, salt=23), ctx.randn(h, salt=24)
    x, g = ctx.randn(BATCH, h, salt=25), ctx.randn(BATCH, h, salt=26)
    lo, hi = ctx.shard(f)
    cls = ctx.m.ParallelMLP
    kw = {"activation": MLP_ACTIVATION} if _takes(cls, "activation") else {}

    def make():
        mlp = ctx.build(cls, h, f, bias=True, w1=w1.clone(), w2=w2.clone(), **kw)
        p = _mlp_params(mlp, h, hi - lo)
        set_param(p["b1"], ctx.to_dev(b1[lo:hi]))
        set_param(p["b2"], ctx.to_dev(b2))
        return mlp, p
    return make, (x, w1, b1, w2, b2, g), (lo, hi)


def _dense_mlp(x, w1, b1, w2, b2, g):
    x, w1, b1, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w1, b1, w2, b2))
    y = F.linear(MLP_ACTIVATION(F.linear(x, w1, b1)), w2, b2)
    (y * g).sum().backward()
    return y.detach(), x.grad, w1.grad, b1.grad, w2.grad, b2.grad


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
    make, (x, w1, b1, w2, b2, g), _ = _mlp(ctx)
    mlp, _ = ctx.phase(make)
    fwd = CollectiveCounter()

    def forward():
        with fwd:
            return mlp(ctx.to_dev(x))
    y = ctx.phase(forward)
    ctx.compare("mlp.forward", y, _dense_mlp(x, w1, b1, w2, b2, g)[0])
    _count(ctx, "counts.mlp_forward", fwd, {"allreduce": 1})


def mlp_backward(ctx: Ctx):
    make, (x, w1, b1, w2, b2, g), (lo, hi) = _mlp(ctx)
    _, dx, dw1, db1, dw2, db2 = _dense_mlp(x, w1, b1, w2, b2, g)
    (mlp, p), xs = ctx.phase(lambda: (make(), ctx.to_dev(x).requires_grad_()))
    y = ctx.phase(lambda: _shaped(mlp(xs), (BATCH, MLP_DIMS[0])))
    bwd = CollectiveCounter()

    def backward():
        with bwd:
            (y * ctx.to_dev(g)).sum().backward()
    ctx.phase(backward)
    ctx.check("mlp.grad_weights", *_all(close(p["w1"].grad, dw1[lo:hi]),
                                        close(p["w2"].grad, dw2[:, lo:hi])))
    ctx.check("mlp.grad_biases", *_all(close(p["b1"].grad, db1[lo:hi]), close(p["b2"].grad, db2)))
    ctx.compare("mlp.grad_input", xs.grad, dx)
    _count(ctx, "counts.mlp_backward", bwd, {"allreduce": 1})


# -- helpers --------------------------------------------------------------------------------
def _shaped(y, shape):
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(shape):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"output {got}, expected {tuple(shape)}")
    return y


def _shards_ok(layer, weight, bias_shape):
    ok, why = close(getattr(layer, "weight", None), weight)
    if not ok:
        return False, f"weight: {why}"
    bias = getattr(layer, "bias", None)
    if not isinstance(bias, torch.nn.Parameter):
        return False, "bias is not an nn.Parameter"
    ok, why = close(bias, torch.zeros(bias_shape))
    return (True, "") if ok else (False, f"bias (zero-initialised): {why}")


def _default_ok(layer, weight_shape, bias_shape):
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    for name, t, shape in (("weight", weight, weight_shape), ("bias", bias, bias_shape)):
        if not isinstance(t, torch.nn.Parameter) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return False, f"{name} without master_weight: {got}, expected an nn.Parameter {shape}"
    return True, ""


def _all(*results):
    bad = [why for ok, why in results if not ok]
    return (not bad), "; ".join(bad)


def _count(ctx, name, counter, expected):
    if ctx.size >= 2:
        ctx.check(name, *counts_ok(counter, expected))


def _takes(cls, param):
    try:
        return param in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


UNITS = {
    ("errors", "nopg"): errors_nopg, ("errors", "shape"): errors_shape,
    ("column", "shards"): column_shards, ("column", "forward"): column_forward,
    ("column", "backward"): column_backward, ("column", "local"): column_local,
    ("row", "shards"): row_shards, ("row", "forward"): row_forward,
    ("row", "backward"): row_backward, ("row", "full"): row_full,
    ("mlp", "forward"): mlp_forward, ("mlp", "backward"): mlp_backward,
}
