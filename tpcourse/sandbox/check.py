"""Is the sandbox usable here? Grading refuses (never silently unsafe) when it is not."""
from __future__ import annotations

import functools
import shutil
import subprocess

from .settings import Sandbox


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run on this machine and the instructor has not opted out."""


HOW_TO_FIX = (
    "Install it with `sudo .ci/setup-system.sh` (Debian/Ubuntu: apt-get install bubblewrap "
    "util-linux), or, knowing that student code then runs with the grader's rights, opt out in "
    "nbgrader_config.py with `c.Sandbox.enabled = False`.")


@functools.lru_cache(maxsize=None)
def _probe(bwrap: str) -> str:
    """'' when a trial sandbox runs, else why not."""
    from . import command
    for tool in (bwrap, "prlimit", "setpriv"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed"
    cfg = Sandbox(bwrap=bwrap)
    argv = command.build(cfg, ["true"], workdir="/", binds={})
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"a trial sandbox did not start: {err}"
    if proc.returncode != 0:
        return (f"a trial sandbox failed (exit {proc.returncode}): {proc.stderr.strip()[:400]} "
                "(are user/PID/network namespaces allowed here?)")
    return ""


def problem(cfg: Sandbox | None = None) -> str:
    """'' when grading may go ahead: the sandbox works, or it is explicitly disabled."""
    cfg = cfg or Sandbox()
    if not cfg.enabled:
        return ""
    why = _probe(cfg.bwrap)
    return f"The grading sandbox is unavailable: {why}. {HOW_TO_FIX}" if why else ""


def require(cfg: Sandbox | None = None) -> None:
    why = problem(cfg)
    if why:
        raise SandboxUnavailable(why)
