"""The process a student's code runs in while the judge grades it: `python -m tpjudge.student
FD CONTROL_FD [LIMITS]`, started by the judge (tpjudge.session) inside the grading sandbox;
LIMITS are the judge's (wire.Limits.argument()), so that a value over them fails here, as the
student's code's error, instead of reaching the judge as a reply it refuses.

It runs the cells the judge sends (the course's given cells and the student's solution cells,
in notebook order) in one namespace, calls the student's functions when asked, and answers
with data (tpjudge.wire). It decides nothing: every verdict is the judge's. What the student's
code calls that the judge must see happen goes back to the judge as a request:

- the simulated collectives (`tpsim.all_gather`, ...) are carried out and recorded by the
  judge, so a call log cannot be forged or skipped (a collective of the student's own is simply
  never recorded);
- a function the judge passed in (an activation) is called back on the judge's side.

Output the student's code writes (fd 1 and 2, Python or C) is captured and sent along with
each message. The judge interrupts over CONTROL_FD (a KeyboardInterrupt in the main thread, as
a kernel interrupt would) and kills the sandbox if that does not work.
"""
from __future__ import annotations

import _thread
import builtins
import contextlib
import importlib
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import types

from . import wire

MAX_OUTPUT = 1 << 20          # bytes of captured output sent per message
# The modules whose functions the judge may name (wire.Harness): the checks' core, the student
# runtime (tpsim.ranks runs the ranks) and a notebook's check modules.
HARNESS = ("tpgrade.", "tpsim")
_CHECK_MODULE = re.compile(r"assignments\.\w+\.checks(\.\w+)*")
_HARNESS_ERRORS = ("tpsim.ranks",)  # whose exceptions' attributes (a rank's traceback) travel


class Output:
    """fd 1 and 2 redirected into files that are read and emptied as messages go out."""

    def __init__(self):
        self.fds = {}
        for fd, name in ((1, "out"), (2, "err")):
            handle, path = tempfile.mkstemp(prefix=f"judge-{name}-")
            os.close(handle)
            target = os.open(path, os.O_RDWR | os.O_APPEND)
            os.unlink(path)
            os.dup2(target, fd)
            os.close(target)
            self.fds[name] = fd

    def take(self) -> dict:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a stream the student replaced or closed
                pass
        taken = {}
        for name, fd in self.fds.items():
            try:
                size = os.fstat(fd).st_size
                data = os.pread(fd, min(size, MAX_OUTPUT), 0)
                os.ftruncate(fd, 0)
            except OSError:
                size, data = 0, b""
            text = data.decode("utf-8", errors="replace")
            if size > MAX_OUTPUT:
                text += f"\n[{size - MAX_OUTPUT} more bytes of output dropped]\n"
            taken[name] = text
        return taken


def describe(exc: BaseException) -> dict:
    """An exception as data: its type's name and built-in bases, message, traceback lines
    (the student's frames, not this module's), and the attributes of the harness's own
    exceptions (RankError's rank and rank traceback)."""
    cls = type(exc)
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a __str__ that raises
        message = f"<{cls.__name__} whose message cannot be read>"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(os.path.dirname(__file__))]
    attrs = {}
    for name in ("rank", "exc_type", "rank_traceback", "rank_stderr"):
        value = getattr(exc, name, None) if cls.__module__ in _HARNESS_ERRORS else None
        if isinstance(value, (int, str)):
            attrs[name] = value
    return {"ename": cls.__name__, "module": str(cls.__module__), "evalue": message[:20000],
            "bases": [c.__name__ for c in cls.__mro__ if c.__module__ == "builtins"],
            "traceback": traceback.format_list(frames)[-30:], "attrs": attrs}


def rebuild(desc: dict) -> BaseException:
    """An exception the judge described (a collective's ValueError), as a built-in type."""
    cls = getattr(builtins, str(desc.get("ename")), None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    return cls(desc.get("evalue", ""))


class Runner:
    def __init__(self, channel: wire.Channel, output: Output, interrupts: Interrupts):
        self.channel, self.output, self.interrupts = channel, output, interrupts
        self.module = types.ModuleType("__main__")
        self.module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = self.module        # pickling by reference, `__name__` checks
        channel.opaque = _tensor
        self.harness = Harness()

    # -- what the judge asks ----------------------------------------------------------------
    def serve(self) -> None:
        while True:
            try:
                request = self.channel.receive()
            except KeyboardInterrupt:  # a SIGINT from elsewhere (the judge's hit only code)
                continue
            except EOFError:
                return
            if request.get("op") == "bye":
                return
            self.send(self.answer(request))

    def answer(self, request) -> dict:
        try:
            op = request.get("op")
            if op == "exec":
                code = compile(request["code"], f"<{request['name']}>", "exec")
                with self.interrupts.armed():
                    exec(code, self.module.__dict__)  # noqa: S102 - the student's cell, sandboxed
                return {"op": "done"}
            if op == "lookup":
                return self._lookup(request["name"])
            if op == "preload":
                for name in request["modules"]:
                    self.harness.preload(name)
                return {"op": "done"}
            if op == "call":
                with self.interrupts.armed():
                    return self._call(request)
            if op == "settle":
                return self.interrupts.settle(int(request.get("interrupts") or 0))
            return {"op": "raised", "error": describe(ValueError(f"unknown request {op!r}"))}
        except BaseException as exc:  # noqa: BLE001 - whatever the student's code raised
            return {"op": "raised", "error": describe(exc)}

    def _lookup(self, name):
        if name not in self.module.__dict__:
            return {"op": "missing"}
        value = self.module.__dict__[name]
        if callable(value):
            return {"op": "callable"}
        return {"op": "value", "value": value}

    def _call(self, request):
        target, args, kwargs = (wire.substitute(request[k], self._materialize)
                                for k in ("target", "args", "kwargs"))
        value = target(*args, **kwargs)
        # arrays the student changed in place go back, so a check can see that it did
        return {"op": "result", "value": value, "args": args, "kwargs": kwargs}

    # -- what the student's code asks the judge -----------------------------------------------
    def request(self, message):
        """Send a request and wait for its answer, answering the judge's own requests meanwhile."""
        self.send(message)
        while True:
            reply = self.channel.receive()
            op = reply.get("op")
            if op == "return":
                return reply["value"]
            if op == "raise":
                raise rebuild(reply["error"])
            self.send(self.answer(reply))

    def send(self, message) -> None:
        message.update(self.output.take())
        try:
            self.channel.send(message)
        except Exception as exc:  # noqa: BLE001 - a value that cannot travel
            self.channel.send({"op": "raised", "error": describe(exc), **self.output.take()})

    def _materialize(self, obj):
        """What a Ref, Harness or Callback from the judge stands for, here."""
        if isinstance(obj, wire.Ref):
            if obj.name not in self.module.__dict__:
                raise NameError(f"name {obj.name!r} is not defined")
            return self.module.__dict__[obj.name]
        if isinstance(obj, wire.Harness):
            return self.harness.resolve(obj.path)

        def callback(*args, **kwargs):
            return self.request({"op": "callback", "number": obj.number, "args": list(args),
                                 "kwargs": kwargs})
        return callback

    def collective(self, name):
        def collective(*args, **kwargs):
            return self.request({"op": "service", "name": name, "args": list(args),
                                 "kwargs": kwargs})
        collective.__name__ = collective.__qualname__ = name
        collective.__module__ = "tpsim"
        return collective


class Harness:
    """The course's own functions the judge names (the rank functions of a torch notebook's
    checks, tpsim.ranks.run_on_ranks), as they were before any student code ran: the modules
    are imported when the judge asks (before the given cells) and their contents kept, so a
    module planted in sys.modules later, or a name rebound in it, does not change what runs."""

    def __init__(self):
        self.modules: dict[str, dict] = {}

    def preload(self, name: str) -> None:
        if not (name.startswith(HARNESS) or _CHECK_MODULE.fullmatch(name)):
            raise ValueError(f"{name} is not a course package")
        self.modules[name] = dict(vars(importlib.import_module(name)))

    def resolve(self, path: str):
        module, _, qualname = str(path).partition(":")
        if module not in self.modules:
            self.preload(module)
        first, *rest = qualname.split(".")
        obj = self.modules[module][first]
        for part in rest:
            obj = getattr(obj, part)
        return obj


def _tensor(obj, encoder):
    """A torch tensor travels as its values (the judge needs no torch to read them)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    try:
        values = obj.detach().cpu().numpy()
    except Exception:  # noqa: BLE001 - a meta tensor, a tensor subclass...
        return ["x", "Tensor"]
    return encoder.array("T", values) if values.dtype.str in wire.DTYPES else ["x", "Tensor"]


class Interrupts:
    """The interrupts the judge sends over CONTROL_FD. Each is a KeyboardInterrupt in the main
    thread (as SIGINT would raise it) while the student's code runs there, and nothing at all
    between requests, where it would cut a message in two or hit the next cell."""

    def __init__(self, control: socket.socket):
        self.control, self.lock = control, threading.Lock()
        self.running = self.received = 0

    def watch(self) -> None:
        while True:
            try:
                data = self.control.recv(1)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                if self.running:
                    _thread.interrupt_main()
                self.received += 1

    @contextlib.contextmanager
    def armed(self):
        """While the student's code runs (nested, when the judge's callbacks call it again)."""
        with self.lock:
            self.running += 1
        try:
            yield
        finally:
            with self.lock:
                self.running -= 1
            try:          # one sent as the code finished is raised here, at the latest
                for _ in range(100):
                    pass
            except KeyboardInterrupt:
                pass

    def settle(self, sent: int) -> dict:
        """Answer once every interrupt the judge sent (`sent`) has been received: none is
        left to reach a later cell."""
        deadline = time.monotonic() + 10
        while self.received < sent and time.monotonic() < deadline:
            time.sleep(0.002)
        return {"op": "settled"}


def main(argv=None) -> None:
    fd, control_fd, *limits = (argv or sys.argv[1:])[:3]
    channel = wire.Channel(socket.socket(fileno=int(fd)),
                           limits=wire.Limits.parse(limits[0]) if limits else None)
    control = socket.socket(fileno=int(control_fd))
    runner = Runner(channel, Output(), Interrupts(control))
    # Interrupts arrive as SIGINT, which does nothing while it is ignored, and a grader started
    # as a script's background job ignores it and passes that on: take Python's own handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import tpsim
    for name in tpsim.COLLECTIVES:                 # before any cell does `from tpsim import`
        setattr(tpsim, name, runner.collective(name))
    threading.Thread(target=runner.interrupts.watch, daemon=True).start()
    runner.send({"op": "ready", "pid": os.getpid()})
    runner.serve()
    os._exit(0)   # no atexit handlers of the student's


if __name__ == "__main__":
    main()
