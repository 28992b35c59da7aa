"""Processes that end with the process that started them.

A grader killed with SIGKILL cannot clean up, so every process it starts asks Linux to kill it
when its parent dies (PR_SET_PDEATHSIG). Asking is racy: a parent that dies between the fork
and the child's prctl leaves an orphan that no signal will reach. bwrap --die-with-parent asks
only once bwrap is running, after the exec; `tied_child` asks in the forked child before the
exec and then checks that the parent it meant is still there.
"""
from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: nothing to ask
        return None


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when `parent_pid` (its parent) dies; exit now if it already has."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def tied_child():
    """A Popen preexec_fn that ties the child to the calling process (and thread): looked up
    here, before the fork, so that the child only calls into libc."""
    parent, prctl = os.getpid(), _prctl()

    def preexec():
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
    return preexec
