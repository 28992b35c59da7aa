"""Is the sandbox usable here? Grading refuses (never silently unsafe) when it is not."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess

from .settings import Sandbox


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run on this machine and the instructor has not opted out."""


OPT_OUT = ("knowing that student code then runs with the grader's rights, opt out in "
           "nbgrader_config.py with `c.Sandbox.enabled = False`.")

HOW_TO_FIX = (
    "Install it with `sudo .ci/setup-system.sh` (Debian/Ubuntu: apt-get install bubblewrap "
    "util-linux), or, " + OPT_OUT)

# A grader that is not root (an instructor running nbgrader as themselves) needs unprivileged
# user namespaces for bwrap.
USERNS_FIX = (
    "A grader that is not root needs unprivileged user namespaces: allow them (as root: "
    "`sysctl -w user.max_user_namespaces=15000`; Debian before 11: "
    "`sysctl -w kernel.unprivileged_userns_clone=1`; Ubuntu 23.10 and later: "
    "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor profile that "
    "grants /usr/bin/bwrap `userns`), or grade as root (the kernels then run as unprivileged "
    "uids of their own, c.Sandbox.uid), or, " + OPT_OUT)

_USERNS_SWITCHES = (("/proc/sys/user/max_user_namespaces", "0", "user.max_user_namespaces is 0"),
                    ("/proc/sys/kernel/unprivileged_userns_clone", "0",
                     "kernel.unprivileged_userns_clone is 0"),
                    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
                     "kernel.apparmor_restrict_unprivileged_userns is 1"))


def userns_blockers() -> list[str]:
    """The sysctls found to forbid unprivileged user namespaces here (other causes, e.g. a
    container's seccomp policy, are not detected)."""
    found = []
    for path, bad, what in _USERNS_SWITCHES:
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    found.append(what)
        except OSError:
            continue
    return found


@functools.lru_cache(maxsize=None)
def _probe(bwrap: str) -> tuple[str, str]:
    """('', '') when a trial sandbox runs, else (why not, how to fix it)."""
    from . import command
    tools = (bwrap, "prlimit", "setpriv") if os.geteuid() == 0 else (bwrap, "prlimit")
    for tool in tools:
        if not shutil.which(tool):
            return f"`{tool}` is not installed", HOW_TO_FIX
    cfg = Sandbox(bwrap=bwrap)
    argv = command.build(cfg, ["true"], workdir="/", binds={})
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"a trial sandbox did not start: {err}", HOW_TO_FIX
    if proc.returncode != 0:
        why = f"a trial sandbox failed (exit {proc.returncode}): {proc.stderr.strip()[:400]}"
        if os.geteuid() != 0:
            blockers = userns_blockers() or ["user namespaces may be forbidden here"]
            return (f"{why} (the grader runs as uid {os.geteuid()}, not root, and "
                    f"{', '.join(blockers)})"), USERNS_FIX
        return why + " (are PID/network namespaces allowed here?)", HOW_TO_FIX
    return "", ""


def problem(cfg: Sandbox | None = None) -> str:
    """'' when grading may go ahead: the sandbox works, or it is explicitly disabled."""
    cfg = cfg or Sandbox()
    if not cfg.enabled:
        return ""
    why, fix = _probe(cfg.bwrap)
    return f"The grading sandbox is unavailable: {why}. {fix}" if why else ""


def require(cfg: Sandbox | None = None) -> None:
    why = problem(cfg)
    if why:
        raise SandboxUnavailable(why)
