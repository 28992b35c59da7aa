"""Run student code confined: bubblewrap namespaces, resource limits, an unprivileged uid.

Switched on from nbgrader_config.py, so that a plain `nbgrader autograde` is sandboxed:

    from tpcourse.sandbox import configure
    configure(c)                      # Execute -> SandboxedExecute in Autograde's pipeline
    c.Sandbox.memory_mb = 4096        # optional: limits, see tpcourse/sandbox/settings.py

`wrap(argv, ...)` gives the same confinement to any other command (the gpu_runner's torchrun
jobs, with `gpu=True` so the device nodes stay reachable).
"""
from __future__ import annotations

from .check import SandboxUnavailable, problem, require
from .settings import UID_ENV, Sandbox

__all__ = ["Sandbox", "SandboxUnavailable", "UID_ENV", "configure", "for_torchrun", "problem",
           "require", "wrap"]


def configure(c) -> None:
    """Swap nbgrader's Execute for SandboxedExecute in the autograde pipeline of config `c`."""
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import Execute
    from .execute import SandboxedExecute
    current = c.Autograde.get("autograde_preprocessors") or Autograde.autograde_preprocessors.default()
    c.Autograde.autograde_preprocessors = [SandboxedExecute if p is Execute else p for p in current]


def wrap(argv: list[str], *, workdir: str, scratch: str | None = None, gpu: bool = False,
         network: bool = False, hidden=(), readonly=(), config=None, **limits) -> list[str]:
    """argv prefixed so that it runs in the sandbox. `scratch` (a host directory) is bound
    read-write at `workdir`; `readonly` paths stay readable even inside a hidden tree;
    `limits` override Sandbox traits (memory_mb=0 for CUDA)."""
    import os
    from pathlib import Path
    from . import command
    cfg = Sandbox(config=config) if config is not None else Sandbox()
    cfg.gpu, cfg.network = gpu or cfg.gpu, network or cfg.network
    for key, value in limits.items():
        setattr(cfg, key, value)
    if not cfg.enabled:
        return list(argv)
    require(cfg)
    binds = {}
    if scratch:
        command.prepare_dir(Path(scratch), cfg, mode=0o755)
        binds[os.path.abspath(scratch)] = workdir
    return command.build(cfg, argv, workdir=workdir, binds=binds, hidden=[os.getcwd(), *hidden],
                         exposed=readonly)


def for_torchrun(course_root: str, *, gpu: bool, readonly=(), config=None):
    """A `wrap(torchrun_argv, launch_dir) -> argv` for gpu_runner.launch.Config.wrap: the job
    runs confined like a kernel, writing only its launch folder, with the GPU device nodes
    bound in (and no address-space limit, which CUDA's reservations would trip) when `gpu`.
    Ranks talk over the sandbox's own loopback."""
    def wrapper(argv, launch_dir):
        limits = {"max_processes": 1024, "cpu_seconds": 1800}
        if gpu:
            limits["memory_mb"] = 0
        return wrap(list(argv), workdir=str(launch_dir), scratch=str(launch_dir), gpu=gpu,
                    hidden=[str(course_root)], readonly=readonly, config=config, **limits)
    return wrapper
