"""What can go wrong between the judge and a student's process, and the student's exceptions
as the judge re-raises them (built from data: a type's name, its built-in bases, a message)."""
from __future__ import annotations

import builtins


class StudentGone(RuntimeError):
    """The student's process has ended (it exited, crashed, was killed, or broke the protocol);
    every later request fails with the same reason."""


class CellTimeout(RuntimeError):
    """The student's code ran past its cell's time limit and was interrupted; `expired` (a
    tpsim.cputime.Expired) says which limit."""

    def __init__(self, message: str = "", expired=None):
        super().__init__(message)
        self.expired = expired


_HARNESS_ERRORS = {("tpsim.ranks", "RankError")}
_CLASSES: dict = {}
# What of a student's exception the judge keeps: its outputs go to the notebook, the gradebook
# and the feedback page, and the judge grades a whole class in one process, so a reply the
# wire allows (megabytes of message, a new exception class per call) must not grow them.
MAX_MESSAGE = 20_000          # characters of the message (the rest is cut, and says so)
MAX_TRACEBACK = (200, 2_000)  # lines, characters per line
MAX_CLASSES = 1_000           # exception classes made for student names, across students
# Exceptions that must never unwind the judge itself: re-raised as ordinary Exceptions.
_SPECIAL = {"SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException"}


def rebuild(desc) -> Exception:
    """An exception raised by the student's code, to raise here: the same built-in type
    (ValueError stays ValueError), or a class of the same name derived from its nearest
    built-in base, so `except ValueError` in a check behaves as if the code ran here."""
    desc = desc if isinstance(desc, dict) else {}
    name = str(desc.get("ename") or "Exception")[:100]
    message = _cut(str(desc.get("evalue", "")), MAX_MESSAGE)
    module = str(desc.get("module", ""))
    if (module, name) in _HARNESS_ERRORS:
        exc = _harness_error(name, message, desc.get("attrs") or {})
    else:
        exc = _class(name, desc.get("bases") or [])(message)
    lines = desc.get("traceback")
    most, width = MAX_TRACEBACK
    exc.student_traceback = ([_cut(str(line), width) for line in lines[-most:]]
                             if isinstance(lines, list) else [])
    return exc


def _cut(text: str, most: int) -> str:
    return text if len(text) <= most else f"{text[:most]} ... ({len(text) - most} more characters)"


def _class(name: str, bases) -> type:
    found = getattr(builtins, name, None)
    if name not in _SPECIAL and isinstance(found, type) and issubclass(found, Exception):
        return found
    base = next((getattr(builtins, b) for b in bases if isinstance(b, str) and b not in _SPECIAL
                 and isinstance(getattr(builtins, b, None), type)
                 and issubclass(getattr(builtins, b), Exception)), Exception)
    key = (name, base)
    if key in _CLASSES:
        return _CLASSES[key]
    made = type(name if name.isidentifier() else "StudentError", (base,), {})
    if len(_CLASSES) < MAX_CLASSES:
        _CLASSES[key] = made
    return made


def _harness_error(name, message, attrs):
    from tpsim.ranks import RankError
    text = {k: str(attrs.get(k, "")) for k in ("exc_type", "rank_traceback", "rank_stderr")}
    rank = attrs.get("rank") if type(attrs.get("rank")) is int else -1
    return RankError(message, rank, text["exc_type"], text["rank_traceback"], None,
                     text["rank_stderr"])
