"""The rank side of the graded TP-overhead measurement (tp_torch_attention's gpu_timing).

`measure` is the grader's own measurement: the procedure the notebook asks of the student's
measure_overhead, written here (the grader never runs the student's code for its reference):
for each size n, this rank's slice of a row-parallel layer, x_r (tokens, n_r) and W_r (n, n_r);
`warmup` untimed rounds of the matmul and the all-reduce of the (tokens, n) partial; then
`repeats` rounds, each region timed after a barrier of the group (and a device synchronisation on
a GPU, before and after); the median of each.

`Probe` perturbs the student's run, deterministically, so that two mistakes show in its numbers
(this assignment's gpu/judge.py reads them; its gpu/data.py holds the amounts):
- slow=True (on one rank): every matmul of that rank is followed by a sleep, as a rank with more
  work would be late; the other ranks' all-reduces include the wait unless a barrier came first;
- cold_calls=K: the first K matmuls and all-reduces of each output shape sleep, as first calls
  are slow on a GPU; a median of repeats without warm-up rounds includes them.
It sees what the student's code calls through torch's function hooks (a TorchFunctionMode), as
gpu_runner.observe.EqualAllGather does: `x @ w.T`, torch.matmul, F.linear, ..., dist.all_reduce.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from gpu_runner.data import shard

_MATMULS = {"matmul", "__matmul__", "__rmatmul__", "mm", "linear", "addmm", "bmm", "einsum",
            "baddbmm"}


def measure(sizes, tokens, repeats, warmup, group, device) -> dict:
    """{n: (compute_ms, comm_ms)} on this rank, by the notebook's procedure."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(step):
        dist.barrier(group=group)
        sync()
        start = time.perf_counter()
        step()
        sync()
        return (time.perf_counter() - start) * 1e3

    out = {}
    for n in sizes:
        lo, hi = shard(n, rank, size)
        x, w = torch.randn(tokens, hi - lo, device=device), torch.randn(n, hi - lo, device=device)
        partial = x @ w.T
        for _ in range(warmup):
            x @ w.T
            dist.all_reduce(partial, group=group)
        compute, comm = [], []
        for _ in range(repeats):
            compute.append(timed(lambda: x @ w.T))
            comm.append(timed(lambda: dist.all_reduce(partial, group=group)))
        out[n] = (statistics.median(compute), statistics.median(comm))
    return out


class Probe(TorchFunctionMode):
    def __init__(self, slow_ms: float = 0.0, cold_calls: int = 0, cold_ms: float = 0.0):
        super().__init__()
        self.slow_ms, self.cold_calls, self.cold_ms = slow_ms, cold_calls, cold_ms
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in _MATMULS and isinstance(result, torch.Tensor):
            self._cold(("matmul", tuple(result.shape)))
            if self.slow_ms:
                time.sleep(self.slow_ms / 1e3)
        elif name == "all_reduce":
            tensor = args[0] if args else (kwargs or {}).get("tensor")
            if isinstance(tensor, torch.Tensor):
                self._cold(("all_reduce", tuple(tensor.shape)))
        return result

    def _cold(self, key):
        self.calls[key] += 1
        if self.calls[key] <= self.cold_calls:
            time.sleep(self.cold_ms / 1e3)


def encode(result):
    """A measure_overhead result as JSON data: [[n, compute_ms, comm_ms], ...], or what it was."""
    if not isinstance(result, dict):
        return {"type": type(result).__name__}
    rows = []
    for key, value in list(result.items())[:64]:
        try:
            rows.append([int(key), *[_number(float(v)) for v in list(value)[:3]]])
        except (TypeError, ValueError, OverflowError):
            return {"type": f"dict holding {type(value).__name__}"}
    return rows


def _number(v):
    """JSON has no NaN or infinity: they travel as text (and never pass as a time)."""
    return v if math.isfinite(v) else repr(v)
