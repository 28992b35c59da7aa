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


# A kernel (or torchrun job) is the grader's interpreter started in the sandbox: if that
# interpreter, a folder it imports from, or a package it needs cannot be read there, every
# kernel dies before replying ("Kernel died before replying to kernel_info") and every
# student would get 0. The trial runs it there first and names what it cannot read.
_IMPORT_TRIAL = r"""
import importlib.util, json, os, sys
paths, modules = json.loads(sys.argv[1])
unreadable, missing = [], []
for path in paths:
    try:
        os.listdir(path) if os.path.isdir(path) else open(path, "rb").close()
    except OSError as err:
        unreadable.append(f"{path} ({err.strerror})")
for name in modules:
    try:
        spec = importlib.util.find_spec(name)
        if spec is None:
            missing.append(f"{name} (not found)")
        elif spec.has_location and spec.origin:
            open(spec.origin, "rb").close()
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__}: {err})")
print(json.dumps({"unreadable": unreadable, "missing": missing}))
"""

PATHS_FIX = (
    "The sandbox shows the interpreter's prefix and every sys.path entry (site-packages, "
    "PYTHONPATH, editable source folders) wherever they lie, read-only, but not through "
    "folders its uid may not enter and not where a path holds the course or the checkout: "
    "make those paths readable by that uid (e.g. `chmod o+rx` on each folder down to them), "
    "keep the course and checkout off sys.path, or install the grading environment elsewhere.")


def _sandbox_uid(cfg: Sandbox) -> int:
    return cfg.effective_uid() if os.geteuid() == 0 else os.geteuid()


def _namespaces(cfg: Sandbox) -> tuple[str, str]:
    """('', '') when a trial sandbox runs `true`, else (why not, how to fix it)."""
    from . import command
    tools = (cfg.bwrap, "prlimit", "setpriv") if os.geteuid() == 0 else (cfg.bwrap, "prlimit")
    for tool in tools:
        if not shutil.which(tool):
            return f"`{tool}` is not installed", HOW_TO_FIX
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


def _interpreter(cfg: Sandbox) -> tuple[str, str]:
    """('', '') when the grader's Python starts in a trial sandbox and reads there everything
    it imports from, as a kernel would; else (what it cannot read, how to fix it)."""
    import json
    import sys
    from . import command
    hidden = [os.getcwd()]          # hidden from kernels and jobs (wrap, course_paths)
    covered = [*command.default_hidden([*hidden, *cfg.hide_paths]), *command.PRIVATE_TMP]
    paths = [p for p in command.interpreter_paths()
             if os.path.exists(p) and not command.uncovers(p, covered)]
    modules = [m for m in ("ipykernel", *command.course_packages(cfg.private_packages))
               if _findable(m)]
    argv = command.build(cfg, [sys.executable, "-c", _IMPORT_TRIAL, json.dumps([paths, modules])],
                         workdir="/", binds={}, hidden=hidden)
    who = f"uid {_sandbox_uid(cfg)}"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        found = json.loads(proc.stdout) if proc.returncode == 0 else None
        detail = f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"
    except (OSError, subprocess.TimeoutExpired, ValueError) as err:
        found, detail = None, f"{type(err).__name__}: {err}"
    if found is None:
        return (f"the grader's Python ({sys.executable}) does not start in a trial sandbox "
                f"(as {who}; {detail}), so no kernel could"), PATHS_FIX
    if found["unreadable"] or found["missing"]:
        what = [f"folders it imports from are unreadable: {', '.join(found['unreadable'])}"
                ] if found["unreadable"] else []
        what += [f"packages a kernel imports are not importable: {', '.join(found['missing'])}"
                 ] if found["missing"] else []
        return (f"the grader's Python ({sys.executable}) runs in a trial sandbox (as {who}) but "
                f"{'; '.join(what)}; kernels would die before replying to kernel_info"), PATHS_FIX
    return "", ""


def _findable(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _probe(key: tuple) -> tuple[str, str]:
    """('', '') when trial sandboxes run here, else (why not, how to fix it); `key` holds what
    the answer depends on (see problem())."""
    bwrap, uid, hide, readonly, private = key[:5]
    cfg = Sandbox(bwrap=bwrap, uid=uid, hide_paths=list(hide), readonly_paths=list(readonly),
                  private_packages=list(private))
    found = _namespaces(cfg)
    return found if found[0] else _interpreter(cfg)


def problem(cfg: Sandbox | None = None) -> str:
    """'' when grading may go ahead: the sandbox works, or it is explicitly disabled."""
    cfg = cfg or Sandbox()
    if not cfg.enabled:
        return ""
    import sys
    key = (cfg.bwrap, cfg.uid, tuple(cfg.hide_paths), tuple(cfg.readonly_paths),
           tuple(cfg.private_packages), sys.executable, tuple(sys.path), os.getcwd(),
           os.environ.get("PYTHONPATH", ""), _sandbox_uid(cfg))
    why, fix = _probe(key)
    return f"The grading sandbox is unavailable: {why}. {fix}" if why else ""


def require(cfg: Sandbox | None = None) -> None:
    why = problem(cfg)
    if why:
        raise SandboxUnavailable(why)
