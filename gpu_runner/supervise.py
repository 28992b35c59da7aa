"""Run one torchrun job under a time limit and leave no process of it behind.

    python -m gpu_runner.supervise --timeout S [--wall-factor F] --result FILE -- CMD...

The limit is S seconds of CPU time of the job's processes together (tpsim.cputime: a busy
machine makes the job take longer, not run out), with a wall-clock backstop F times longer.

torchrun starts every worker in a session of its own (start_new_session), so killing
torchrun's process group leaves the workers running, and a worker whose torchrun died is
re-parented away from us. This small process therefore:
- makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER): orphaned workers (and
  anything they spawned) are re-parented to it, not to init, so it can find and reap them;
- tags the job's environment (GPU_RUNNER_JOB=<id>), inherited by every worker;
- after the job ends or the limit passes, SIGKILLs every descendant, then every process of
  this user still carrying the tag, and reaps them;
- dies with its parent (PR_SET_PDEATHSIG), cleaning up on the way (SIGTERM handler).
It writes {"rc", "timed_out", "why", "seconds", "killed"} to --result. It is a separate process
so the grader (or pytest) that calls it never becomes a subreaper itself.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil

from tpsim import cputime

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
TAG = "GPU_RUNNER_JOB"


def _prctl(option, value):
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):   # not Linux: the tag scan still finds the workers
        return False


def tagged(tag):
    """Processes of this user whose environment carries the job's tag."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.pid != os.getpid() and proc.info["uids"].real == os.getuid() \
                    and proc.environ().get(TAG) == tag:
                found.append(proc)
        except (psutil.Error, AttributeError):
            continue
    return found


def kill_all(tag) -> list[int]:
    """SIGKILL every descendant and every tagged process, then reap; returns the pids."""
    me = psutil.Process()
    victims = {p.pid: p for p in me.children(recursive=True)}
    victims.update({p.pid: p for p in tagged(tag)})
    for proc in victims.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=5)
    _reap()
    return sorted(victims)


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, required=True,
                    help="CPU time the job's processes may use together (s)")
    ap.add_argument("--wall-factor", type=float, default=cputime.WALL_FACTOR,
                    help="the wall-clock backstop, in multiples of --timeout")
    ap.add_argument("--result", required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    tag = uuid.uuid4().hex
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def on_term(signum, frame):
        kill_all(tag)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    start = time.monotonic()
    proc = subprocess.Popen(cmd, env={**os.environ, TAG: tag})
    # our own tree: the job, and its workers re-parented to us if torchrun dies
    limit = cputime.Limit(cputime.Meter(os.getpid()), args.timeout,
                          wall_factor=args.wall_factor, stall=0)
    why = None
    while True:
        try:
            rc = proc.wait(timeout=limit.interval())
            break
        except subprocess.TimeoutExpired:
            why = limit.check()
        if why is not None:
            proc.kill()         # its workers are re-parented to us (subreaper), killed below
            rc = proc.wait()
            break
    killed = kill_all(tag)      # also after a clean exit: a student may have forked
    result = {"rc": rc, "timed_out": why is not None, "why": why.text if why else "",
              "seconds": time.monotonic() - start, "killed": killed}
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
