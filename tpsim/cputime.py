"""Time limits that measure what student code costs, not how busy the grading machine is.

A limit on student code (a notebook cell in the kernel or in the judge's student process, a
call of `run_on_ranks`, a gpu_runner unit or launch, a whole notebook) is counted in the CPU
time of the student's process tree: its processes, their descendants and the children they
reaped (utime, stime, cutime and cstime of /proc/<pid>/stat). On a machine with several busy
processes per core a correct cell takes longer on the clock but uses the same CPU time, so it
keeps its points; an infinite loop uses CPU time as fast as it runs and is stopped at its limit.

Code that waits instead of computing (a deadlock, a sleep, a read that never returns) uses no
CPU time. It is stopped when its tree has computed nothing (under STALL_SHARE of one core) for
`stall` seconds while it was expected to work: on a loaded machine a runnable process still
gets a slice of a core every fraction of a second, so only waiting looks like that. And in any
case by a wall-clock backstop, `wall_factor` times the CPU-time limit (code that computes a
little and then waits a little, forever).

The defaults (TimeLimits in tpsandbox/settings.py, `c.TimeLimits.*`) keep a correct student
whole with about 4 busy processes per core competing with it; the figures come from
tests/test_load.py, which grades the seven reference notebooks on a machine loaded so.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

WALL_FACTOR = 5.0      # the wall-clock backstop, in multiples of a CPU-time limit
STALL_SECONDS = 20.0   # computing nothing this long, while expected to work: waiting forever
STALL_SHARE = 0.005    # "nothing": under this share of one core over the stall window
INTERRUPT_GRACE = 5.0  # after an interrupt: this much CPU time, or as long computing nothing
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CORES = os.cpu_count() or 1
# Without /proc (not Linux: a student's own Mac) nothing is measured: a limit counts the clock
# instead, as if the code used a whole core all the time, and nothing is taken for a stall.
MEASURED = os.path.isdir("/proc/self")


def snapshot() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, CPU seconds of the process and of the children it reaped)} for every
    process this user can see, read from /proc in one pass."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:           # not Linux (MEASURED is False)
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                text = f.read()
        except OSError:       # gone meanwhile
            continue
        # the command name (field 2) may hold spaces and parentheses: fields follow the last ")"
        fields = text[text.rfind(b")") + 2:].split()
        try:
            ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
            table[int(name)] = (int(fields[1]), ticks / _TICK)
        except (IndexError, ValueError):
            continue
    return table


def tree_seconds(pid: int, table=None) -> float | None:
    """CPU seconds used so far by process `pid` and all its descendants (live ones, and those
    reaped by a process of the tree); None when `pid` is gone."""
    table = snapshot() if table is None else table
    if pid not in table:
        return None
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    total, todo, seen = 0.0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += table[current][1]
        todo.extend(children.get(current, ()))
    return total


class Meter:
    """The CPU time the process trees of `pids` have used since the meter was made. Once they
    are gone their last reading stays (a budget still counts what a killed process used)."""

    def __init__(self, *pids: int):
        self.pids = pids
        self.start = self._now() or 0.0
        self.used = 0.0

    def _now(self, table=None) -> float | None:
        table = snapshot() if table is None else table
        found = [tree_seconds(pid, table) for pid in self.pids]
        return sum(seconds for seconds in found if seconds is not None) if any(
            seconds is not None for seconds in found) else None

    def read(self, table=None) -> float:
        now = self._now(table)
        if now is not None:
            self.used = max(self.used, now - self.start)
        return self.used


@dataclass(frozen=True)
class Expired:
    """Why a limit ran out: kind is "cpu", "stall", "wall" or "budget"; text completes "the
    student's code ..." """
    kind: str
    text: str


class Budget:
    """CPU time and wall-clock time for everything one notebook's grading runs of student code
    (its kernel, the judge's student processes, the ranks they fork); shared by the threads
    that run them. 0 seconds: no budget."""

    def __init__(self, cpu_seconds: float, wall_factor: float = WALL_FACTOR):
        self.cpu_seconds = float(cpu_seconds or 0)
        self.wall_seconds = self.cpu_seconds * wall_factor
        self.start = time.monotonic()
        self.meters: list[Meter] = []
        self.lock = threading.Lock()
        self.spent: Expired | None = None

    def add(self, meter: Meter) -> None:
        with self.lock:
            self.meters.append(meter)

    def check(self, table=None) -> Expired | None:
        if not self.cpu_seconds:
            return None
        with self.lock:
            if self.spent is None:
                used = sum(m.read(table) for m in self.meters)
                if used > self.cpu_seconds:
                    self.spent = Expired("budget", f"used up the notebook's grading budget of "
                                         f"{self.cpu_seconds:g} s of CPU time")
                elif time.monotonic() - self.start > self.wall_seconds:
                    self.spent = Expired("budget", f"used up the notebook's grading budget of "
                                         f"{self.wall_seconds:g} s on the clock")
            return self.spent

    def cpu_used(self) -> float:
        """As of the last check."""
        with self.lock:
            return sum(m.used for m in self.meters)

    def cpu_left(self) -> float:
        return self.cpu_seconds - self.cpu_used() if self.cpu_seconds else float("inf")

    def wall_left(self) -> float:
        if not self.cpu_seconds:
            return float("inf")
        return self.wall_seconds - (time.monotonic() - self.start)


class Limit:
    """One stretch of student code (a cell, a unit, a call) against its limits: `cpu_seconds`
    of the tree's CPU time, computing nothing for `stall` seconds while `waiting()`, and
    `wall_factor * cpu_seconds` on the clock; within a notebook's `budget`, if any."""

    def __init__(self, meter: Meter, cpu_seconds: float, *, wall_factor: float = WALL_FACTOR,
                 stall: float = STALL_SECONDS, budget: Budget | None = None):
        self.meter, self.budget = meter, budget
        self.cpu_seconds, self.stall = float(cpu_seconds), float(stall)
        self.wall_seconds = self.cpu_seconds * wall_factor
        self.start = time.monotonic()
        self.cpu_start = meter.read()
        self.mark = (self.start, self.cpu_start)

    def waiting(self) -> None:
        """The student's code is expected to be working from now on (the caller waits for it):
        the stall window starts at the next check. No reading here: the judge waits once per
        call of a student's function, a reading scans all of /proc (about a millisecond per
        hundred processes), and most replies come before the first check."""
        self.mark = (time.monotonic(), None)

    def cpu_used(self) -> float:
        return self.meter.used - self.cpu_start

    def wall_left(self) -> float:
        left = self.wall_seconds - (time.monotonic() - self.start)
        return min(left, self.budget.wall_left()) if self.budget else left

    def interval(self) -> float:
        """How long to wait before the next check: no limit can run out sooner (CPU time
        grows at most one second per second per core)."""
        cpu_left = self.cpu_seconds - self.cpu_used()
        if self.budget:
            cpu_left = min(cpu_left, self.budget.cpu_left())
        return max(0.02, min(1.0, self.wall_left(), cpu_left / _CORES))

    def check(self) -> Expired | None:
        table = snapshot()
        now = time.monotonic()
        used = self.meter.read(table) - self.cpu_start if MEASURED else now - self.start
        if self.budget is not None:
            spent = self.budget.check(table)
            if spent is not None:
                return spent
        if used > self.cpu_seconds:
            return Expired("cpu", f"used more than {self.cpu_seconds:g} s of CPU time")
        since, cpu_then = self.mark
        if cpu_then is None or self.meter.used - cpu_then > STALL_SHARE * (now - since) \
                or not MEASURED:
            self.mark = (now, self.meter.used)
        elif self.stall and now - since > self.stall:
            return Expired("stall", f"computed nothing for {now - since:.0f} s (it waits for "
                           "something that never comes: a deadlock, a sleep, a blocking read)")
        if now - self.start > self.wall_seconds:
            return Expired("wall", f"ran for {now - self.start:.0f} s on the clock (the "
                           f"backstop for code that waits: {self.wall_seconds:g} s)")
        return None
