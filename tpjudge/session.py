"""The judge's end of a student's process (tpjudge.student): start it in the sandbox, run the
student's cells there, call the student's functions, and carry out what they ask of the judge.

Nothing the student's process sends is run or unpickled here: its messages are data
(tpjudge.wire), bounded in size, and every wait on it is bounded in time. A request that runs
past its cell's limit is interrupted (a KeyboardInterrupt in the student's main thread, as a
kernel interrupt); if the process does not answer within the grace period, or two cells in a
row run past the limit, it is killed, and every later request fails with the reason.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import tpsim

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

    def __init__(self, proc, channel, control, settings, scratch=None):
        self.proc, self.channel, self.control = proc, channel, control
        self.settings, self.scratch = settings, scratch
        self.timeout = settings.timeout
        self.deadline = time.monotonic() + settings.startup_timeout
        self.cell, self.interrupted, self.consecutive_timeouts = "start-up", False, 0
        self.interrupts = self.settled = 0    # interrupts sent; of those, known to be taken
        self.gone: str | None = None
        self.out, self.err = [], []
        channel.opaque = _remote_ref
        self._callbacks: list = []

    # -- cells ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def cell_limit(self, name: str):
        """Everything inside counts against one cell's time limit, as in a kernel."""
        self.cell = name
        if self.interrupts > self.settled and self.gone is None:
            self._settle()
        self.interrupted = False
        self.deadline = time.monotonic() + self.timeout
        try:
            yield
        except CellTimeout:
            self.consecutive_timeouts += 1
            if self.consecutive_timeouts >= 2 and self.gone is None:
                self.kill(f"it stopped responding: two cells in a row ran past the "
                          f"{self.timeout} s limit (the last: {name})")
            raise
        self.consecutive_timeouts = 0

    def _settle(self) -> None:
        """Wait until the student's process has taken every interrupt sent to it. One sent just
        as a cell finished reaches the process later, and would raise its KeyboardInterrupt in
        whatever cell runs next (a loaded machine makes that likely)."""
        self.interrupted = True          # no second interrupt: past the grace, a kill
        self.deadline = time.monotonic() + self.settings.interrupt_grace
        try:
            self.channel.send({"op": "settle", "interrupts": self.interrupts})
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
            self.channel.send(message, callbacks=self._callbacks)
        except OSError:
            self._lost("its connection closed")
        while True:
            reply = self._receive()
            op = reply.get("op") if isinstance(reply, dict) else None
            if op in _TERMINAL:
                if self.interrupted:
                    raise CellTimeout(f"the student's code ran past the {self.timeout} s limit "
                                      f"of this cell and was interrupted")
                return reply
            if op in ("service", "callback"):
                self._answer(reply)
            else:
                self._lost(f"it sent something that is not a message ({op!r})")

    def _receive(self):
        while True:
            left = self.deadline - time.monotonic()
            try:
                reply = self.channel.receive(timeout=max(left, 0.001))
            except TimeoutError:
                if not self.interrupted:
                    self.interrupted = True
                    self._interrupt()
                    self.deadline = time.monotonic() + self.settings.interrupt_grace
                    continue
                self.kill(f"it did not stop within {self.settings.interrupt_grace:g} s of an "
                          f"interrupt after the {self.timeout} s limit of {self.cell}")
                raise StudentGone(self.gone) from None
            except (EOFError, wire.ProtocolError) as exc:
                self._lost(str(exc) if isinstance(exc, wire.ProtocolError) else "")
            if isinstance(reply, dict):
                self._collect_output(reply)
            return reply

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
            answer = {"op": "raise", "error": {"ename": type(exc).__name__, "evalue": str(exc)}}
        try:
            self.channel.send(answer)
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

    def kill(self, why: str) -> None:
        if self.gone is None:
            self.gone = why
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)   # bwrap, or the unsandboxed process group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.gone is None:
            with contextlib.suppress(OSError):
                self.channel.send({"op": "bye"})
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
        self.kill("closed")
        for sock in (self.channel.sock, self.control):
            sock.close()
        if self.scratch is not None:
            self.scratch()


def _remote_ref(obj, encoder):
    """The student's own functions and classes go back to it by name."""
    return ["r", obj.__name__] if isinstance(obj, StudentObject) else None


def _copy_back(sent, returned, depth=0) -> None:
    """Arrays the student's code changed in place (also inside lists, as a list of per-rank
    shards): change ours the same way, so a check sees what the student's code did."""
    if not isinstance(returned, (list, tuple)) or depth > wire.MAX_DEPTH:
        return
    for mine, theirs in zip(sent, returned):
        if type(mine) in (list, tuple):
            _copy_back(mine, theirs, depth + 1)
        elif (isinstance(mine, np.ndarray) and isinstance(theirs, np.ndarray)
                and mine.flags.writeable and mine.dtype == theirs.dtype
                and mine.size == theirs.size):
            if mine.shape != theirs.shape:     # `x.shape = ...` inside the student's function
                with contextlib.suppress(AttributeError, ValueError):
                    mine.shape = theirs.shape
            if mine.shape == theirs.shape:
                np.copyto(mine, theirs)


def start(workdir: str, settings, wrap=None, scratch: Path | None = None, cleanup=None,
          preexec=None) -> Student:
    """Start a student's process working in `workdir` (its sandbox: `wrap(argv) -> argv`, or
    none; `preexec`: Popen's preexec_fn), and wait until it is ready. Raises StudentGone when
    it cannot start: that is the grader's problem (no student code has run yet), with the
    process's own words."""
    judge_end, student_end = socket.socketpair()
    control, control_end = socket.socketpair()
    argv = [sys.executable, "-m", "tpjudge.student", str(student_end.fileno()),
            str(control_end.fileno())]
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
    channel = wire.Channel(judge_end, max_bytes=settings.max_message_mb << 20)
    student = Student(proc, channel, control, settings, cleanup)
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
