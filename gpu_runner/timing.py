"""Communication vs computation per world size (the seeds' exercise), measured and plotted.

On each rank of the group, a layer of the assignment's TIMED_LAYERS (built by its
gpu/observe.py's timed_layer) runs forward+backward ITERS times under the torch
profiler. Communication time is what the backend spends in collectives: the duration of the
"gloo:<op>" events (gloo runs each collective synchronously on a worker thread), or on GPUs
the device time of the NCCL kernels. Compute is the rest of the wall time (CPU) or the other
kernels' device time (GPU). Ungraded: it goes into the JSON report and a PNG.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

ITERS = 5
CPU_DIMS = {"batch": 32, "hidden": 256, "ffn": 1024}
GPU_DIMS = {"batch": 4096, "hidden": 4096, "ffn": 16384}


def measure(ctx, build) -> dict:
    """{"total_ms", "comm_ms", "compute_ms"} per forward+backward on this rank of the layer
    `build(dims)` returns, with the shape of its input (an assignment's observe.timed_layer)."""
    cuda = ctx.device.type == "cuda"
    dims = GPU_DIMS if cuda else CPU_DIMS
    module, shape = build(dims)
    x = torch.randn(*shape, device=ctx.device, requires_grad=True)

    def step():
        module(x).float().sum().backward()

    step()                      # warm-up (allocations, NCCL communicator set-up)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    # GPUs: kineto, for the kernels' device time. CPU: the legacy profiler, which starts in
    # milliseconds where kineto's first start costs seconds per process.
    prof = (profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if cuda
            else torch.autograd.profiler.profile(use_kineto=False))
    with prof:
        start = time.perf_counter()
        for _ in range(ITERS):
            step()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    comm_us, kernel_us = 0.0, 0.0
    for e in (prof.events() if cuda else prof.function_events):
        dt = e.time_range.elapsed_us()
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us += dt
            comm_us += dt if "nccl" in e.name.lower() else 0.0
        elif not cuda and e.name.startswith("gloo:"):
            comm_us += dt
    compute_us = (kernel_us - comm_us) if cuda else max(wall_us - comm_us, 0.0)
    per = 1e-3 / ITERS
    return {"total_ms": wall_us * per, "comm_ms": comm_us * per, "compute_ms": compute_us * per}


def plot(timing: dict, path, title: str = "") -> None:
    """Stacked bars, one panel per layer: compute and communication time per world size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [name for name in ("column", "row", "mlp") if timing.get(name)]
    fig, axes = plt.subplots(1, max(len(layers), 1), figsize=(4 * max(len(layers), 1), 3.2),
                             squeeze=False)
    for ax, name in zip(axes[0], layers):
        sizes = sorted(timing[name], key=int)
        compute = [timing[name][s]["compute_ms"] for s in sizes]
        comm = [timing[name][s]["comm_ms"] for s in sizes]
        ax.bar(sizes, compute, label="compute")
        ax.bar(sizes, comm, bottom=compute, label="collectives")
        ax.set_title(name)
        ax.set_xlabel("world size")
        ax.set_ylabel("ms per forward+backward")
    if layers:
        axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
