"""Run student code confined: bubblewrap namespaces, resource limits, an unprivileged uid.

Used by every place where student code runs while grading: the notebook kernels of `nbgrader
autograde` (tpsandbox.kernel, plugged in by tpgrader.configure from nbgrader_config.py), the
judge's student processes (tpjudge) and the gpu_runner's torchrun jobs. Limits are set in
nbgrader_config.py as `c.Sandbox.<name>` (tpsandbox/settings.py).

`wrap(argv, ...)` confines any command (with `gpu=True` the device nodes stay reachable).
How long student code may run is counted in the CPU time it uses (tpsim.cputime,
`c.TimeLimits.<name>`), not on the clock of a machine that may be busy.
"""
from __future__ import annotations

from .check import SandboxUnavailable, problem, require
from .settings import UID_ENV, Sandbox, TimeLimits

__all__ = ["Sandbox", "SandboxUnavailable", "TimeLimits", "UID_ENV", "for_torchrun", "problem",
           "require", "wrap"]


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


def for_torchrun(course_root: str, *, gpu: bool, readonly=(), hidden=(), config=None):
    """A `wrap(torchrun_argv, job_dir, env=None) -> argv` for gpu_runner.launch.Config.wrap:
    the whole torchrun job (agent and ranks) runs confined like a kernel, in one sandbox, as
    the unprivileged uid, writing only `job_dir`; `course_root` and `hidden` are hidden,
    `readonly` paths stay readable; `env` is added to the job's (otherwise empty) environment.
    Ranks talk over the sandbox's own loopback.

    Limits come from `config` (c.Sandbox.*). Those sized for a notebook kernel and not set
    there explicitly get torchrun's: RLIMIT_NPROC and RLIMIT_NOFILE for W ranks' threads and
    sockets, RLIMIT_CPU per process for a whole launch. With `gpu` the device nodes are bound
    in, there is no address-space limit (CUDA reserves huge virtual ranges) and /dev/shm
    (NCCL's transport) is larger."""
    explicit = set(config["Sandbox"].keys()) if config is not None and "Sandbox" in config \
        else set()
    limits = {"max_processes": 1024, "cpu_seconds": 1800, "max_open_files": 4096}
    if gpu:
        limits["tmpfs_mb"] = 2048
    limits = {key: value for key, value in limits.items() if key not in explicit}
    if gpu:
        limits["memory_mb"] = 0
    base_env = dict(Sandbox(config=config).env) if config is not None else {}
    hide = [str(course_root), *map(str, hidden)]

    def wrapper(argv, job_dir, env=None):
        return wrap(list(argv), workdir=str(job_dir), scratch=str(job_dir), gpu=gpu,
                    hidden=hide, readonly=readonly, config=config,
                    env={**base_env, **(env or {})}, **limits)
    return wrapper
