"""Processes the grader starts die with it, even when it dies while starting them (the race
that left a sandboxed kernel behind a SIGKILLed grader)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _run(script: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                            stdout=subprocess.PIPE, text=True)


def test_a_tied_child_dies_with_the_process_that_started_it():
    starter = _run("""
        import subprocess, time
        from tpsandbox.lifetime import tied_child
        child = subprocess.Popen(["sleep", "120"], preexec_fn=tied_child())
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    child = int(starter.stdout.readline())
    assert _alive(child)
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the child outlived the process that started it"


def test_a_child_whose_starter_died_before_the_exec_never_runs():
    # The starter makes the preexec, forks, and dies before the child calls it: the child
    # must exit instead of running on as an orphan.
    starter = _run("""
        import os, time
        from tpsandbox.lifetime import tied_child
        preexec, starter = tied_child(), os.getpid()
        if os.fork() == 0:
            while os.getppid() == starter:
                time.sleep(0.01)
            preexec()
            print("ran on", flush=True)
            os._exit(0)
        print("forked", flush=True)
        os._exit(0)
    """)
    out, _ = starter.communicate(timeout=30)   # EOF once the forked child is gone too
    assert out.split() == ["forked"]
