"""The machine rules: the same grade on every grading machine.

- The world sizes graded are a course setting (`c.GpuRunner.world_sizes`, gpu_runner.settings),
  never derived from the number of GPUs: every machine plans the same checks and points.
- The backend: `auto` is NCCL with one rank per GPU when the machine has at least
  max(world sizes) GPUs, gloo on CPU otherwise; an explicit `nccl` without enough GPUs refuses.
- The job's environment: the network pinned to what the sandbox has (its loopback), the site's
  network and plugin variables dropped (and named in the report), NCCL's own watchdog set so
  that timeouts are the runner's (a timed-out collective raises in the rank, which records it).
- What a CPU machine cannot check is listed in every report as "untested on this machine".

Pure decisions, no torch and no GPU needed: the CPU test suite covers every branch.
"""
from __future__ import annotations

import re

# The network inside the sandbox is its own loopback: pinned for both backends (gloo also
# carries NCCL jobs' control groups).
PINNED_NETWORK = {"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo"}

# torch's ProcessGroupNCCL settings (names as torch 2.13 reads them, torch/csrc/distributed/c10d/
# ProcessGroupNCCL.hpp): wait() blocks and RAISES in the rank when --pg-timeout passes (with it
# set, torch creates no watchdog thread), errors abort the communicator without tearing the
# process down (2 = CleanUpOnly), and no heartbeat monitor or debug dump kills or stalls the
# rank: the runner's step watchdog and wall clock bound everything else.
PINNED_NCCL = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
               "TORCH_NCCL_ENABLE_MONITORING": "0", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
               "TORCH_NCCL_RETHROW_CUDA_ERRORS": "0"}

# The site's network and plugin settings (InfiniBand HCAs, interfaces, net plugins, CollNet,
# topology files) describe a network the sandbox does not have; the legacy aliases of the
# watchdog settings would fight the pinned ones.
_SITE = re.compile(r"^(NCCL_(SOCKET_|IB_|NET|COLLNET|CROSS_NIC|GDR|UCX|SHARP|TOPO_FILE|"
                   r"PLUGIN|BLOCKING_WAIT$|ASYNC_ERROR_HANDLING$|DESYNC_DEBUG$)|TORCH_NCCL_|"
                   r"GLOO_SOCKET_|GLOO_DEVICE_TRANSPORT)")

UNTESTED_ON_CPU = (
    "collectives on CPU tensors: NCCL refuses them, gloo runs them, so a layer that moves a "
    "tensor to the CPU for a collective passes here",
    "tensors created without device= inside a backward (the meta-device run covers forward "
    "only; dtype= is checked in both)",
    "sticky CUDA errors (device-side assert, illegal address) and NCCL's own set-up and "
    "timeouts",
)


class Refused(Exception):
    """The grader cannot do its job as asked: grade nobody (exit 2), say why."""


def choose_backend(requested: str, sizes, gpus: int) -> str:
    """The backend for these world sizes on a machine with `gpus` GPUs. The sizes never change."""
    need = max(sizes)
    if requested == "auto":
        return "nccl" if gpus >= need else "gloo"
    if requested == "nccl" and gpus < need:
        raise Refused(f"--backend nccl needs one GPU per rank: world size {need} > {gpus} GPUs "
                      f"(the world sizes are the course's, c.GpuRunner.world_sizes)")
    return requested


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:       # a broken CUDA set-up: grade on CPU
        return 0


def job_env(env: dict, backend: str) -> tuple[dict, list[str]]:
    """The environment a torchrun job gets from `env`: site network/plugin variables dropped
    (their names returned), the network and (NCCL) watchdog settings pinned."""
    pinned = {**PINNED_NETWORK, **(PINNED_NCCL if backend == "nccl" else {})}
    dropped = sorted(k for k in env if _SITE.match(k) and env[k] != pinned.get(k))
    out = {k: v for k, v in env.items() if not _SITE.match(k)}
    return {**out, **pinned}, dropped


def init_options(backend: str, local_rank: int) -> dict:
    """Extra init_process_group arguments: on NCCL the rank's device (`device_id`: the
    communicator is created at once, so a broken set-up shows in the harness's warm-up, and
    sub-groups split from it)."""
    if backend != "nccl":
        return {}
    import torch
    return {"device_id": torch.device("cuda", local_rank)}


def untested(backend: str) -> list[str]:
    """What this backend cannot check; the same grades come from the checks it can."""
    return [] if backend == "nccl" else list(UNTESTED_ON_CPU)
