"""The judge's end of a student's process (tpjudge.student): start it in the sandbox, run the
student's cells there, call the student's functions, and carry out what they ask of the judge.

Nothing the student's process sends is run or unpickled here: its messages are data
(tpjudge.wire), bounded in size (the settings' limits, which that process applies to what it
sends too), and every wait on it, receiving and decoding a reply included, is bounded in time.
A cell's limit is counted in the CPU time of the student's process tree (tpsim.cputime: a
busy grader makes a cell take longer, not fail), with a stop for code that computes nothing
while the judge waits for it and a wall-clock backstop. A request that runs past its cell's
limit is interrupted (a KeyboardInterrupt in the student's main thread, as a kernel
interrupt); if the process does not answer within the grace period, or two cells in a row run
past their limits, it is killed, and every later request fails with the reason. So it is when
the notebook's grading budget (shared with its kernel) is used up, and when a reply is not
valid data (over the limits, not of the grammar, or still being decoded a grace period after
it came), with what was wrong.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import tpsim
from tpsandbox import TimeLimits
from tpsim import cputime

from . import wire
from .errors import CellTimeout, StudentGone, rebuild

# The genuine collectives, as this process (where no student code runs) has them.
_COLLECTIVES = {name: getattr(tpsim, name) for name in tpsim.COLLECTIVES}
_TERMINAL = {"ready", "done", "result", "raised", "missing", "callable", "value"}


class StudentObject:
    """A function or class of the student's program. Calling it calls it in the student's
    process, with copies of the arguments; arrays it changes in place are changed here too."""

    def __init__(self, student: "Student", name: str):
        self.__tpjudge_remote__ = student      # tpgrade._torch_trusted.run_on_ranks looks for it
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        return self.__tpjudge_remote__.call(wire.Ref(self.__name__), args, kwargs)

    def __repr__(self):
        return f"<the student's {self.__name__}>"


class Student:
    """One student's program, running in a sandboxed process of its own."""

    def __init__(self, proc, channel, control, settings, scratch=None, time_limits=None,
                 budget=None):
        self.proc, self.channel, self.control = proc, channel, control
        self.settings, self.scratch = settings, scratch
        self.timeout = settings.timeout
        self.time_limits, self.budget = time_limits or TimeLimits(), budget
        self.meter = cputime.Meter(proc.pid)        # the CPU time of its whole process tree
        if budget is not None:
            budget.add(self.meter)
        self.clock = self._limit(settings.startup_timeout)
        self.cell, self.interrupted, self.consecutive_timeouts = "start-up", False, 0
        self.expired: cputime.Expired | None = None   # why the running cell was interrupted
        self.interrupts = self.settled = 0    # interrupts sent; of those, known to be taken
        self.gone: str | None = None
        self.gone_kind: str | None = None     # "timeouts", "budget", or None (any other end)
        self.out, self.err = [], []
        channel.opaque = _remote_ref
        self._callbacks: list = []

    def _limit(self, cpu_seconds, stall=None) -> cputime.Limit:
        return cputime.Limit(self.meter, cpu_seconds, wall_factor=self.time_limits.wall_factor,
                             stall=self.time_limits.stall_seconds if stall is None else stall,
                             budget=self.budget)

    def _grace(self) -> cputime.Limit:
        """After an interrupt: the code must answer before it has used the grace period's CPU
        time, or computed nothing for as long (stuck), or a wall_factor of it has passed."""
        grace = self.settings.interrupt_grace
        limit = self._limit(grace, stall=grace)
        limit.waiting()
        return limit

    # -- cells ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def cell_limit(self, name: str):
        """Everything inside counts against one cell's time limit, as in a kernel."""
        self.cell = name
        if self.interrupts > self.settled and self.gone is None:
            self._settle()
        self.interrupted, self.expired = False, None
        self.clock = self._limit(self.timeout)
        try:
            yield
        except CellTimeout as exc:
            self.consecutive_timeouts += 1
            if self.consecutive_timeouts >= 2 and self.gone is None:
                self.kill(f"it stopped responding: two cells in a row ran past their time "
                          f"limits (the last, {name}: {exc.expired.text if exc.expired else ''})",
                          kind="timeouts")
            raise
        self.consecutive_timeouts = 0

    def _settle(self) -> None:
        """Wait until the student's process has taken every interrupt sent to it. One sent just
        as a cell finished reaches the process later, and would raise its KeyboardInterrupt in
        whatever cell runs next (a loaded machine makes that likely)."""
        self.interrupted = True          # no second interrupt: past the grace, a kill
        self.clock = self._grace()
        try:
            self._send({"op": "settle", "interrupts": self.interrupts})
        except OSError:
            self._lost("its connection closed")
        reply = self._receive()
        if not (isinstance(reply, dict) and reply.get("op") == "settled"):
            self._lost("it did not answer as the judge's student process does")
        self.settled = self.interrupts

    def run_cell(self, name: str, code: str):
        """Run a given or solution cell; returns its error (described) or None."""
        reply = self._exchange({"op": "exec", "name": name, "code": code})
        return reply.get("error") if reply["op"] == "raised" else None

    def preload(self, modules) -> None:
        """Import the course's modules in the student's process before any student code."""
        reply = self._exchange({"op": "preload", "modules": list(modules)})
        if reply["op"] == "raised":
            raise rebuild(reply["error"])

    def lookup(self, name: str):
        """('missing' | 'callable' | 'value', the value) for a name of the student's program."""
        reply = self._exchange({"op": "lookup", "name": name})
        if reply["op"] == "raised":
            raise rebuild(reply["error"])
        return reply["op"], reply.get("value")

    def call(self, target, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        reply = self._exchange({"op": "call", "target": target, "args": list(args),
                                "kwargs": kwargs})
        if reply["op"] == "raised":
            raise rebuild(reply["error"])
        _copy_back(args, reply.get("args"))
        _copy_back(list(kwargs.values()), list((reply.get("kwargs") or {}).values()))
        return reply.get("value")

    def run_on_ranks(self, fn, world_size, *args, **kwargs):
        """tpsim.ranks.run_on_ranks(fn, world_size, *args) in the student's process: the
        ranks are forked there, in its sandbox; what they return comes back as data. First, as
        the notebook's checks always did, torch.distributed's functions are put back as they
        were before the student's code ran (tpgrade._torch_trusted.restore, captured then)."""
        self.call(wire.Harness("tpgrade._torch_trusted:restore"))
        return self.call(wire.Harness("tpsim.ranks:run_on_ranks"),
                         (wire.Harness(fn), world_size, *args), kwargs)

    def take_output(self) -> tuple[str, str]:
        out, err = "".join(self.out), "".join(self.err)
        self.out, self.err = [], []
        return out, err

    # -- the conversation -------------------------------------------------------------------
    def wait_ready(self) -> None:
        reply = self._receive()
        if not (isinstance(reply, dict) and reply.get("op") == "ready"):
            self._lost("it did not say it was ready")

    def _exchange(self, message) -> dict:
        if self.gone is not None:
            raise StudentGone(self.gone)
        outer, self._callbacks = self._callbacks, []   # a callback may call the student again
        try:
            return self._converse(message)
        finally:
            self._callbacks = outer

    def _converse(self, message) -> dict:
        try:
            self._send(message, callbacks=self._callbacks)
        except OSError:
            self._lost("its connection closed")
        while True:
            reply = self._receive()
            op = reply.get("op") if isinstance(reply, dict) else None
            if op in _TERMINAL:
                if self.interrupted:
                    why = self.expired.text if self.expired else "ran past its limit"
                    raise CellTimeout(f"the student's code {why} in this cell and was "
                                      f"interrupted (each cell may use {self.timeout} s of CPU "
                                      "time)", self.expired)
                return reply
            if op in ("service", "callback"):
                self._answer(reply)
            else:
                self._lost(f"it sent something that is not a message ({op!r})")

    def _send(self, message, callbacks=None) -> None:
        """A message to the student's process, which has until the cell's wall-clock backstop
        and its grace to take it (its socket's state from the last receive does not apply)."""
        left = max(self.clock.wall_left(), 0.0)
        try:
            self.channel.send(message, callbacks, timeout=left + self.settings.interrupt_grace)
        except TimeoutError:
            self._lost(f"it did not take the judge's message within the time limit of "
                       f"{self.cell}")

    def _receive(self):
        """The next message, while the student's code works: checked against the running
        limit (self.clock) whenever no message has come for one of its intervals."""
        self.clock.waiting()
        while True:
            try:    # a reply has the grace period to be decoded, however late the judge is
                reply = self.channel.receive(timeout=self.clock.interval(),
                                             decode_within=self.settings.interrupt_grace)
            except TimeoutError:       # what came of a message is kept for the next call
                self._check_clock()
                continue
            except EOFError:
                self._lost("")
            except wire.ProtocolError as exc:
                self.kill(f"the student's process was stopped in {self.cell}: the reply was not "
                          f"valid data: {exc}")
                raise StudentGone(self.gone) from None
            if isinstance(reply, dict):
                self._collect_output(reply)
            return reply

    def _check_clock(self) -> None:
        """No message yet: has the running limit run out? Past a cell's limit, an interrupt;
        past the grace after it, or past the notebook's budget, the process is killed."""
        why = self.clock.check()
        if why is None:
            return
        if why.kind == "budget":
            self.kill(f"the student's code {why.text} (in {self.cell}): nothing more of this "
                      "notebook is run", kind="budget")
            raise StudentGone(self.gone)
        if not self.interrupted:
            self.interrupted, self.expired = True, why
            self._interrupt()
            self.clock = self._grace()
            return
        after = f" after it {self.expired.text}" if self.expired else ""
        self.kill(f"it did not stop within {self.settings.interrupt_grace:g} s of an "
                  f"interrupt{after} in {self.cell}", kind="timeouts")
        raise StudentGone(self.gone)

    def _answer(self, request) -> None:
        """A collective or a callback the student's code asked for, carried out here."""
        try:
            args, kwargs = list(request.get("args") or []), dict(request.get("kwargs") or {})
            if request["op"] == "service":
                name = request.get("name")
                if name not in _COLLECTIVES:
                    raise ValueError(f"no collective named {name!r}")
                value = _COLLECTIVES[name](*args, **kwargs)
            else:
                number = request.get("number")
                if type(number) is not int or not 0 <= number < len(self._callbacks):
                    raise ValueError("no such function")
                value = self._callbacks[number](*args, **kwargs)
            answer = {"op": "return", "value": value}
        except Exception as exc:  # noqa: BLE001 - the student's code sees it, as it would
            answer = _raise(exc)
        try:
            try:
                self._send(answer)
            except wire.ProtocolError as exc:     # e.g. a gathered result over the limits
                self._send(_raise(exc))
        except OSError:
            self._lost("its connection closed")

    def _collect_output(self, reply) -> None:
        for key, sink in (("out", self.out), ("err", self.err)):
            text = reply.get(key)
            if isinstance(text, str) and text:
                kept = sum(map(len, sink))
                room = self.settings.max_output_bytes - kept
                if room > 0:
                    sink.append(text[:room] + ("" if len(text) <= room else
                                               "\n[output truncated by the judge]\n"))

    # -- the end ----------------------------------------------------------------------------
    def _interrupt(self) -> None:
        try:
            self.control.send(b"i")
        except OSError:
            return
        self.interrupts += 1

    def _lost(self, why: str):
        status = self._exit_status()
        self.kill(f"the student's process ended in {self.cell}"
                  + (f" ({status})" if status else "") + (f": {why}" if why else ""))
        raise StudentGone(self.gone)

    def _exit_status(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return ""
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}" if -code in \
                signal.valid_signals() else f"signal {-code}"
        return f"exit status {code}" if code else "exited"

    def kill(self, why: str, kind: str | None = None) -> None:
        if self.gone is None:
            self.gone, self.gone_kind = why, kind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)   # bwrap, or the unsandboxed process group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.gone is None:
            with contextlib.suppress(OSError):
                self._send({"op": "bye"})
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
        self.kill("closed")
        for sock in (self.channel.sock, self.control):
            sock.close()
        if self.scratch is not None:
            self.scratch()


def _raise(exc: Exception) -> dict:
    """The answer that raises `exc` in the student's code."""
    return {"op": "raise", "error": {"ename": type(exc).__name__, "evalue": str(exc)}}


def _remote_ref(obj, encoder):
    """The student's own functions and classes go back to it by name."""
    return ["r", obj.__name__] if isinstance(obj, StudentObject) else None


def _copy_back(sent, returned, depth=0) -> None:
    """Arrays the student's code changed in place (also inside lists, tuples and dicts: a list
    of per-rank shards, a dict of parameters): change ours the same way, so a check sees what
    the student's code did (values, and shape, size or dtype where numpy lets an array change
    them in place)."""
    if depth > wire.MAX_DEPTH:
        return
    if isinstance(sent, dict) and isinstance(returned, dict):
        pairs = [(sent[k], returned[k]) for k in sent if k in returned]
    elif isinstance(sent, (list, tuple)) and isinstance(returned, (list, tuple)):
        pairs = zip(sent, returned)
    else:
        return
    for mine, theirs in pairs:
        if type(mine) in (list, tuple, dict):
            _copy_back(mine, theirs, depth + 1)
        elif (isinstance(mine, np.ndarray) and isinstance(theirs, np.ndarray)
                and mine.flags.writeable):
            _mirror(mine, theirs)


def _mirror(mine: np.ndarray, theirs: np.ndarray) -> None:
    """Make `mine` what the student's code made its copy: `x.dtype = ...`, `x.shape = ...`,
    `x.resize(...)`, then the values. Where numpy refuses one (a view cannot be resized),
    ours keeps its old form and values, and the check compares what it can."""
    with contextlib.suppress(AttributeError, ValueError, TypeError):
        if mine.dtype != theirs.dtype and mine.nbytes == theirs.nbytes:
            mine.dtype = theirs.dtype
        if mine.shape != theirs.shape and mine.size == theirs.size:
            mine.shape = theirs.shape
        if mine.shape != theirs.shape and mine.dtype == theirs.dtype:
            mine.resize(theirs.shape, refcheck=False)
    if mine.shape == theirs.shape and mine.dtype == theirs.dtype:
        np.copyto(mine, theirs)


def start(workdir: str, settings, wrap=None, scratch: Path | None = None, cleanup=None,
          preexec=None, time_limits=None, budget=None) -> Student:
    """Start a student's process working in `workdir` (its sandbox: `wrap(argv) -> argv`, or
    none; `preexec`: Popen's preexec_fn), and wait until it is ready. `time_limits`: the
    TimeLimits (c.TimeLimits.*); `budget`: the notebook's cputime.Budget, shared with its
    kernel. Raises StudentGone when it cannot start: that is the grader's problem (no student
    code has run yet), with the process's own words."""
    judge_end, student_end = socket.socketpair()
    control, control_end = socket.socketpair()
    limits = wire.Limits(max_bytes=settings.max_message_mb << 20,
                         max_header=settings.max_header_kb << 10, max_items=settings.max_items)
    argv = [sys.executable, "-m", "tpjudge.student", str(student_end.fileno()),
            str(control_end.fileno()), limits.argument()]
    log_path = Path(scratch or workdir).parent / "judge-start.log" if scratch else None
    log = open(log_path, "w+") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(wrap(argv) if wrap else argv, cwd=str(scratch or workdir),
                                pass_fds=(student_end.fileno(), control_end.fileno()),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, preexec_fn=preexec)
    finally:
        student_end.close()
        control_end.close()
    channel = wire.Channel(judge_end, limits=limits)
    student = Student(proc, channel, control, settings, cleanup, time_limits, budget)
    try:
        student.wait_ready()
    except StudentGone as exc:
        said = _tail(log) if log_path else ""
        student.close()
        raise StudentGone(f"the judge's student process could not start: {exc}"
                          + (f"\n{said}" if said else "")) from None
    finally:
        if log_path:
            log.close()
    return student


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]
