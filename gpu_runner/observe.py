"""The rank side: build the student's layers, run them, and REPORT what came out.

Runs in the torchrun ranks, next to the student's module: nothing here decides a grade (code in
the same process could change any decision). Every unit builds the student's layer from the
unit's data (gpu_runner.data, the same numbers the judge recomputes), runs it, and reports its
outputs, gradients, shards, parameter shapes, exceptions and collective counts as JSON data
(`ctx.obs`, gpu_runner.records); gpu_runner.judge compares them with the dense reference in the
grader process.

Each unit is a sequence of phases; after each phase the group agrees (over a gloo control
group) whether every rank got through, so a rank that raised never leaves the others waiting in
a collective of the next phase. Student code runs inside phases only.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import data, observe_sequence
from .counting import CollectiveCounter
from .records import encode_outcome, encode_param, encode_tensor

MLP_ACTIVATION = F.gelu       # passed as activation= when the student's ParallelMLP takes it


class PhaseFailed(Exception):
    """Some rank of the group did not get through a phase; the unit's remaining steps are off."""


class Ctx:
    """What a unit needs: the student's module, the group and this rank's place in it."""

    def __init__(self, module, group, size, rank, device, control, seed):
        self.m, self.group, self.size, self.rank = module, group, size, rank
        self.device, self.control, self.seed = device, control, seed
        self.obs: dict = {}
        self.fault: tuple[str, str] | None = None      # (kind, description)

    # -- phases -----------------------------------------------------------------------------
    def phase(self, fn):
        """Run fn() on every rank, then agree: returns its value, or raises PhaseFailed on
        every rank if it raised on any (a fault is kept for the fault report)."""
        value, ok, why = None, True, ""
        try:
            value = fn()
        except Exception as exc:  # the student's error: reported, never propagated
            ok, why = False, describe(exc)
            self.note_fault(exc)
        if self.control is None:
            oks = [(ok, why)]
        else:
            oks = [None] * self.size
            dist.all_gather_object(oks, (ok, why), group=self.control)
        if not all(o for o, _ in oks):
            bad = next(f"rank {r} of {self.size}: {w}" for r, (o, w) in enumerate(oks) if not o)
            raise PhaseFailed(bad)
        return value

    def note_fault(self, exc):
        kind = fault_kind(exc)
        if kind and self.fault is None:
            self.fault = (kind, describe(exc))

    def report(self, key, value):
        self.obs[key] = value

    def observe(self, key, fn):
        """Report the tensor fn() returns (None for none); fn() and its encoding run in a phase
        (the tensor is the student's: a subclass of it may raise), the value is returned."""
        def run():
            value = fn()
            return value, encode_tensor(value)
        value, rec = self.phase(run)
        self.report(key, rec)
        return value

    # -- data -------------------------------------------------------------------------------
    def tensor(self, array, dtype=None, requires_grad=False):
        """The unit's numpy data as a tensor on this rank's device (a copy)."""
        t = cpu(array).to(self.device)
        t = t if dtype is None else t.to(dtype)
        return t.requires_grad_() if requires_grad else t

    def shard(self, n):
        return data.shard(n, self.rank, self.size)

    def build(self, cls, *args, **kwargs):
        """Construct on CPU, then move to the rank's device (nn.Module.to keeps Parameters)."""
        return cls(*args, group=self.group, **kwargs).to(self.device)


def cpu(array):
    """A CPU tensor holding a copy of `array`: master weights are handed over on the CPU, as a
    checkpoint loader would; the layer is moved to the device afterwards (Ctx.build)."""
    return torch.from_numpy(array.copy())


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


_COMM_TYPES = ("DistBackendError", "DistError", "DistNetworkError", "DistStoreError")
_COMM_TEXT = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
              "nccl error", "gloo/transport")
# CUDA errors after which the context is unusable: every later CUDA call fails too.
_STICKY_CUDA = ("device-side assert", "illegal memory access", "illegal instruction",
                "misaligned address", "unspecified launch failure", "hardware stack error",
                "uncorrectable ecc error", "cuda error: an illegal")


def fault_kind(exc: BaseException) -> str | None:
    """"comm": a collective failed (timeout, peer gone), the process group is unusable;
    "cuda": a sticky CUDA error, the CUDA context is unusable; None: an ordinary error."""
    text = str(exc).lower()
    if any(k in text for k in _STICKY_CUDA):
        return "cuda"
    if type(exc).__name__ in _COMM_TYPES:
        return "comm"
    if isinstance(exc, RuntimeError) and any(k in text for k in _COMM_TEXT):
        return "comm"
    return None


@contextlib.contextmanager
def no_default_group():
    """As if no process group were initialised (dist.is_initialized() is False, dist.get_rank()
    raises as it does then), for the checks of the errors a layer must raise without one; the
    real group is back afterwards. The harness initialises and warms up its groups before the
    student's module is imported (a failure there is the environment's, not the student's)."""
    world = c10d._world
    saved = world.default_pg
    world.default_pg = None
    try:
        yield
    finally:
        world.default_pg = saved


class EqualAllGather(TorchFunctionMode):
    """`dist.all_gather` with receive buffers of different sizes: gloo raises, NCCL accepts it
    (torch then runs one broadcast per rank). Under NCCL the ranks run in this mode, which
    raises as gloo does, so that such a layer gets the same grade on every machine. (A call on
    the ProcessGroup object itself is not seen here.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is dist.all_gather:
            parts = args[0] if args else kwargs.get("tensor_list", ())
            mine = args[1] if len(args) > 1 else kwargs.get("tensor")
            shapes = {tuple(t.shape) for t in [*parts, mine] if isinstance(t, torch.Tensor)}
            if len(shapes) > 1:
                raise RuntimeError(
                    f"all_gather of tensors of different sizes {sorted(shapes)}: gloo refuses "
                    f"it and NCCL turns it into one broadcast per rank; pad every shard to the "
                    f"widest, gather, then trim")
        return func(*args, **kwargs)


def set_param(param, value):
    if param is None or tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"parameter shape {None if param is None else tuple(param.shape)}, "
                         f"expected {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value)


def _params(layer):
    return {"weight": encode_param(getattr(layer, "weight", None)),
            "bias": encode_param(getattr(layer, "bias", None))}


def plain_tensors(module) -> list[str]:
    """Tensor attributes that are neither parameters nor buffers: `.to(device)` and
    `.to(dtype)` leave them where they were created."""
    found = []
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not name.startswith("_"):
                found.append(f"{prefix}.{name}" if prefix else name)
    return found


def _shaped(y, shape):
    """The harness cannot take a gradient through an output of the wrong shape."""
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(shape):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"the output has shape {got}, expected {tuple(shape)}: its gradients "
                         f"cannot be checked")
    return y


def _counted(ctx, key, fn):
    """fn(), its collective counts reported as `key`."""
    with CollectiveCounter() as counter:
        value = fn()
    ctx.report(key, dict(counter.counts))
    return value


# -- errors -----------------------------------------------------------------------------------
def _outcome(fn):
    try:
        fn()
    except Exception as exc:  # what it raised is the observation
        return encode_outcome(exc)
    return None


def errors_nopg(ctx: Ctx):
    """With no process group: construct each layer, report what it raised."""
    m = ctx.m
    with no_default_group():
        ctx.report("no_group_column", _outcome(lambda: m.ColumnParallelLinear(4, 4)))
        ctx.report("no_group_row", _outcome(lambda: m.RowParallelLinear(4, 4)))


def errors_shape(ctx: Ctx):
    """A master_weight of the wrong shape (2 rows / 2 columns too many)."""
    m, (i, o) = ctx.m, data.COLUMN_DIMS
    ctx.report("bad_shape_column", ctx.phase(lambda: _outcome(lambda: ctx.build(
        m.ColumnParallelLinear, i, o, master_weight=torch.zeros(o + 2, i)))))
    i, o = data.ROW_DIMS
    ctx.report("bad_shape_row", ctx.phase(lambda: _outcome(lambda: ctx.build(
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
    ctx.observe("y", lambda: _counted(ctx, "counts", lambda: layer(x)))
    ctx.observe("y1", lambda: layer(ctx.tensor(case.x[0])))
    ctx.observe("y3", lambda: layer(ctx.tensor(case.x3)))


def backward(ctx: Ctx, kind):
    """Forward and backward of loss = sum(y * g): the input's, weight's and bias's gradients."""
    make, case = _maker(ctx, kind)
    layer, xs = ctx.phase(lambda: (make(), ctx.tensor(_input(ctx, kind, case),
                                                      requires_grad=True)))
    y = ctx.phase(lambda: _shaped(layer(xs), case.g.shape))
    ctx.phase(lambda: _counted(ctx, "counts", lambda: (y * ctx.tensor(case.g)).sum().backward()))
    ctx.observe("gx", lambda: xs.grad)
    ctx.observe("gw", lambda: layer.weight.grad)
    ctx.observe("gb", lambda: layer.bias.grad)


def column_local(ctx: Ctx):
    """gather_output=False: this rank's slice of the output, and the input's gradient when each
    rank's loss is its slice's part (summed over ranks they make the dense loss)."""
    make, case = _maker(ctx, "column", gather_output=False)
    lo, hi = ctx.shard(case.w.shape[0])
    layer, xs = ctx.phase(lambda: (make(), ctx.tensor(case.x, requires_grad=True)))
    y = ctx.observe("y", lambda: _counted(ctx, "counts.forward", lambda: layer(xs)))
    ctx.phase(lambda: _shaped(y, (data.BATCH, hi - lo)))
    ctx.phase(lambda: _counted(ctx, "counts.backward",
                               lambda: (y * ctx.tensor(case.g[:, lo:hi])).sum().backward()))
    ctx.observe("gx", lambda: xs.grad)


def row_forward(ctx: Ctx):
    make, case = _maker(ctx, "row")
    layer = ctx.phase(make)
    x = ctx.tensor(_input(ctx, "row", case))
    ctx.observe("y", lambda: _counted(ctx, "counts", lambda: layer(x)))


def row_full(ctx: Ctx):
    """input_is_parallel=False: the full input comes in."""
    make, case = _maker(ctx, "row", input_is_parallel=False)
    layer, xs = ctx.phase(lambda: (make(), ctx.tensor(case.x, requires_grad=True)))
    y = ctx.observe("y", lambda: layer(xs))
    ctx.phase(lambda: (_shaped(y, case.g.shape) * ctx.tensor(case.g)).sum().backward())
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


def float64_run(ctx: Ctx, module, x, g):
    """`module` moved to float64, run on a float64 `x` with meta as the default device, then
    backward with upstream `g`: reports "plain", "input_device", "y" and "gx"."""
    ctx.phase(lambda: module.to(torch.float64))
    ctx.report("plain", ctx.phase(lambda: plain_tensors(module)))
    xs = ctx.tensor(x, torch.float64, requires_grad=True)
    ctx.report("input_device", str(xs.device))

    def forward():
        with torch.device("meta"):
            return module(xs)
    y = ctx.observe("y", forward)
    ctx.phase(lambda: (_shaped(y, g.shape) * ctx.tensor(g, torch.float64)).sum().backward())
    ctx.observe("gx", lambda: xs.grad)


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
    ctx.observe("y", lambda: _counted(ctx, "counts", lambda: mlp(x)))


def mlp_backward(ctx: Ctx):
    make, case = _mlp_maker(ctx)
    (mlp, p), xs = ctx.phase(lambda: (make(), ctx.tensor(case.x, requires_grad=True)))
    y = ctx.phase(lambda: _shaped(mlp(xs), case.g.shape))
    ctx.phase(lambda: _counted(ctx, "counts", lambda: (y * ctx.tensor(case.g)).sum().backward()))
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
    **observe_sequence.UNITS,
}


from . import observe_attention  # noqa: E402  (tp_torch_attention's units, same tables)

UNITS.update(observe_attention.UNITS)
