"""Which collectives a piece of student code runs, of which KIND, and how much data each carries.

gpu_runner.counting counts the backend's own events ("gloo:all_reduce", ...), below anything a
student can call. That is not enough to tell the kinds apart on gloo: gloo has no reduce-scatter
of its own and runs `dist.reduce_scatter_tensor` as one "gloo:all_reduce" of the whole input,
`dist.reduce_scatter` as p of them. So a trace records two layers of the same legacy profiler
run (record_shapes on):

* the dispatcher's c10d ops ("c10d::allreduce_", "c10d::_reduce_scatter_base_",
  "c10d::allgather_", ...): the collective the code asked for, by kind. Every path through
  torch.distributed passes here: `dist.*`, the ProcessGroup object's methods, the c10d
  internals, on whatever thread (the autograd engine's included);
* the backend's events, each with the size of its input: what actually ran, and how big.

The grader reads the record (an assignment's gpu/judge.py, with its trace_counts): {kind: n}
of the ops, plus any backend event that no op explains (code that called the backend object
directly, below the dispatcher); and the element count of every backend event (gloo: the
rank's contribution; for an emulated reduce-scatter, its input or an input piece).

Verified on gloo (torch 2.13, CPU): all_reduce (sum and MAX), all_gather, all_gather_into_tensor,
reduce_scatter, reduce_scatter_tensor, broadcast, the ProcessGroup's allreduce, the backend
object's allreduce (no op, one backend event: counted), collectives inside an autograd backward.
On NCCL the events are named "nccl:<op>" and carry their inputs the same way (c10d's Work
records them); that could not be run here (no GPU).
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch

from .counting import _NOT_COLLECTIVE, kind

_OP = re.compile(r"^_?c10d(?:_functional)?::(\w+)$")
_BACKEND = re.compile(r"^(gloo|nccl|mpi|ucc|xccl):(\w+)$")


class CollectiveTrace:
    """`with CollectiveTrace(world_size) as t: ...`, then `t.record()` (JSON data)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.ops: list[str] = []
        self.events: list[tuple[str, int]] = []

    def __enter__(self):
        self._prof = torch.autograd.profiler.profile(use_kineto=False, record_shapes=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()   # NCCL work is asynchronous; let it be recorded
        self._prof.__exit__(*exc)
        for event in self._prof.function_events:
            op, backend = _OP.match(event.name), _BACKEND.match(event.name)
            if op and kind(op.group(1)) not in _NOT_COLLECTIVE:
                self.ops.append(kind(op.group(1)))
            elif backend and kind(backend.group(2)) not in _NOT_COLLECTIVE:
                shapes = event.input_shapes   # -1: the backend recorded no input
                numel = math.prod(shapes[0]) if shapes and isinstance(shapes[0], list) else -1
                self.events.append((kind(backend.group(2)), numel))
        return False

    def record(self) -> dict:
        return {"ops": dict(Counter(self.ops)), "events": [list(e) for e in self.events],
                "world_size": self.world_size}

