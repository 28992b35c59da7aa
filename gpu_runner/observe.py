"""The rank side: build the student's layers, run them, and REPORT what came out.

Runs in the torchrun ranks, next to the student's module: nothing here decides a grade (code in
the same process could change any decision). Every unit (an assignment's gpu/observe.py: its
UNITS) builds the student's layer from the unit's data (its gpu/data.py, the same numbers the
judge recomputes), runs it, and reports its outputs, gradients, shards, parameter shapes,
exceptions and collective counts as JSON data (`ctx.obs`, gpu_runner.records); the
assignment's gpu/judge.py compares them with the dense reference in the grader process. This
module holds what every unit runs in: the phases, the context, the fault rules and helpers.

Each unit is a sequence of phases; after each phase the group agrees (over a gloo control
group) whether every rank got through, so a rank that raised never leaves the others waiting in
a collective of the next phase. Student code runs inside phases only.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import assignments

from . import data
from .counting import CollectiveCounter
from .records import encode_outcome, encode_tensor

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


def plain_tensors(module) -> list[str]:
    """Tensor attributes that are neither parameters nor buffers: `.to(device)` and
    `.to(dtype)` leave them where they were created."""
    found = []
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not name.startswith("_"):
                found.append(f"{prefix}.{name}" if prefix else name)
    return found


def shaped(y, shape):
    """The harness cannot take a gradient through an output of the wrong shape."""
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(shape):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"the output has shape {got}, expected {tuple(shape)}: its gradients "
                         f"cannot be checked")
    return y


def counted(ctx, key, fn):
    """fn(), its collective counts reported as `key`."""
    with CollectiveCounter() as counter:
        value = fn()
    ctx.report(key, dict(counter.counts))
    return value


# -- errors ---------------------------------------------------------------------------------------
def outcome(fn):
    try:
        fn()
    except Exception as exc:  # what it raised is the observation
        return encode_outcome(exc)
    return None


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
    ctx.phase(lambda: (shaped(y, g.shape) * ctx.tensor(g, torch.float64)).sum().backward())
    ctx.observe("gx", lambda: xs.grad)


def units_of(assignment: str) -> dict:
    """The assignment's (layer, step) -> unit table (its gpu/observe.py's UNITS)."""
    return assignments.get(assignment).load("gpu.observe").UNITS
