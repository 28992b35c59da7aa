"""Count the collectives a piece of student code really runs, below anything it can patch.

Monkeypatching `torch.distributed.all_reduce` would miss a student who calls the
ProcessGroup object, `distributed_c10d` internals or the backend directly. The count comes
from the torch profiler instead: every collective a c10d backend executes records an event
named "<backend>:<op>" (gloo:all_reduce, nccl:all_reduce, ...) from inside the backend, on
whatever thread runs it (gloo's worker threads, the autograd engine's). Verified on gloo with
dist.all_reduce, ProcessGroup.allreduce, the backend object's allreduce and a collective
inside an autograd backward: four calls, four "gloo:all_reduce" events.

The legacy (non-kineto) profiler is used: it sees the same events and starts in
milliseconds, where kineto's first start costs seconds per process.

With NCCL a second counter runs too (`use_dispatch(True)`), and the larger count per kind
wins: a TorchDispatchMode that sees the c10d dispatcher ops (c10d.allreduce_, ...). NCCL's
profiler events are asynchronous (they end when the GPU work completes), which could not be
verified without a GPU here; the dispatcher ops are seen synchronously on the calling thread.
It misses calls made on the backend object directly, and its first use costs seconds of
imports per process, so on gloo (where the profiler path is verified) it is off.
"""
from __future__ import annotations

import re
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_BACKEND_EVENT = re.compile(r"^(gloo|nccl|mpi|ucc|xccl):(\w+)$")
_NOT_COLLECTIVE = {"wait", "waittensor", "monitoredbarrier"}


def kind(op: str) -> str:
    """Canonical name of a collective: all_reduce, _allgather_base, allgather_into_tensor_
    coalesced, reduce_scatter_tensor... -> allreduce, allgather, allgather, reducescatter."""
    name = op.lower().strip("_").replace("_", "")
    for suffix in ("coalesced", "intotensor", "tensor", "base", "multigpu"):
        name = name.replace(suffix, "")
    return name


_C10D_OP = re.compile(r"^_?c10d(?:_functional)?\.(\w+?)\.")
_DISPATCH = {"on": False}


def use_dispatch(on: bool) -> None:
    """Also count the c10d dispatcher ops (NCCL); warms the mode up once, on every rank at once."""
    _DISPATCH["on"] = on
    if on:
        with _DispatchCounter():
            torch.zeros(1) + 1


class _DispatchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        m = _C10D_OP.match(str(func))
        if m and kind(m.group(1)) not in _NOT_COLLECTIVE:
            self.counts[kind(m.group(1))] += 1
        return func(*args, **(kwargs or {}))


class CollectiveCounter:
    """`with CollectiveCounter() as c: ...` then `c.counts` ({kind: n}) and `c.total`."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __enter__(self):
        self._prof = torch.autograd.profiler.profile(use_kineto=False)
        self._prof.__enter__()
        self._mode = _DispatchCounter() if _DISPATCH["on"] else None
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._mode.__exit__(*exc)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()   # NCCL work is asynchronous; let it be recorded
        self._prof.__exit__(*exc)
        for event in self._prof.function_events:
            m = _BACKEND_EVENT.match(event.name)
            if m and kind(m.group(2)) not in _NOT_COLLECTIVE:
                self.counts[kind(m.group(2))] += 1
        for name, n in (self._mode.counts.items() if self._mode is not None else ()):
            self.counts[name] = max(self.counts[name], n)
        return False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())) or "no collectives"
