"""What every check runs inside: the genuine tpsim, a trusted recorder, and a shell whose
error reporting a solution cell has not switched off."""
from __future__ import annotations

import contextlib
import functools
import sys
import textwrap
import types

import tpsim


class Genuine:
    """A module's contents (all of them, or the `names` given) as they were when tpgrade was
    imported, with the code objects and defaults of its functions, to put back before a check."""

    def __init__(self, module, names=None):
        self.module = module
        found = vars(module)
        self.values = {n: found[n] for n in (found if names is None else names) if n in found}
        functions = [f for f in self.values.values() if isinstance(f, types.FunctionType)]
        functions += [f.__wrapped__ for f in list(functions)
                      if isinstance(getattr(f, "__wrapped__", None), types.FunctionType)]
        self.code = {f: (f.__code__, f.__defaults__, f.__kwdefaults__) for f in functions}

    def restore(self):
        """Undo rebound names, swapped code and changed defaults."""
        for name, value in self.values.items():
            if vars(self.module).get(name) is not value:
                setattr(self.module, name, value)
        for f, (code, defaults, kwdefaults) in self.code.items():
            if f.__code__ is not code:
                f.__code__ = code
            if f.__defaults__ is not defaults:
                f.__defaults__ = defaults
            if f.__kwdefaults__ is not kwdefaults:
                f.__kwdefaults__ = kwdefaults


# The genuine tpsim, captured before any student code ran.
_TPSIM = Genuine(tpsim)
_recording = tpsim.recording
_open_recordings = tpsim._open_recordings


def restore_tpsim():
    """Undo anything a notebook did to tpsim: rebound names, swapped code, changed defaults."""
    _TPSIM.restore()
    del _open_recordings[:]   # a recording left open by a student's `with` is not ours


@contextlib.contextmanager
def record():
    """The collective calls made inside the block, through the genuine recorder."""
    restore_tpsim()
    with _recording() as calls:
        yield calls


_REPORTING = ("showtraceback", "_showtraceback", "showsyntaxerror", "CustomTB",
              "custom_exceptions")
_MISSING = object()


def _shell():
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def _reporting_state(shell):
    return {name: vars(shell).get(name, _MISSING) for name in _REPORTING}


# How the shell reported errors when tpgrade was imported (the setup cell, before any student
# code): ipykernel itself sets some of these on the instance, so restore, do not delete.
_SHELL = _shell()
_SHELL_STATE = _reporting_state(_SHELL) if _SHELL is not None else {}


def show_verdicts(*exception_types, width=80):
    """In a notebook, a check's verdict (an exception of these types) shows as its type and
    whole message, wrapped to `width` columns, without the checks' own frames: they say nothing
    to a student, and `nbgrader validate` cuts every line of an error at 90 columns. The
    shell's error reporting with this handler is what restore_error_reporting puts back."""
    global _SHELL_STATE
    shell = _shell()
    if shell is None or not hasattr(shell, "set_custom_exc"):
        return

    def verdict(self, etype, value, tb, tb_offset=None):
        name = etype.__name__
        text = "\n".join(textwrap.fill(paragraph, width, break_long_words=False,
                                       break_on_hyphens=False) or paragraph
                         for paragraph in f"{name}: {value}".splitlines())
        stb = [f"\x1b[31m{name}\x1b[39m{text[len(name):]}"]
        self._showtraceback(etype, value, stb)
        return stb
    shell.set_custom_exc(tuple(exception_types), verdict)
    if shell is _SHELL:
        _SHELL_STATE = _reporting_state(shell)


def restore_error_reporting():
    """A solution cell could make the shell swallow exceptions (set_custom_exc, or replacing
    showtraceback); then a failing check would show no error and score full marks."""
    shell = _shell()
    if shell is None:
        return
    if shell is not _SHELL:          # a shell started after tpgrade's import: reset the basics
        shell.custom_exceptions = ()
        for name in ("showtraceback", "showsyntaxerror"):
            if name in vars(shell):
                delattr(shell, name)
        return
    for name, value in _SHELL_STATE.items():
        current = vars(shell).get(name, _MISSING)
        if current is value:
            continue
        if value is _MISSING:
            delattr(shell, name)
        else:
            setattr(shell, name, value)


def check(func):
    """Decorator for the public checks: run them against a clean tpsim and shell."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        restore_error_reporting()
        restore_tpsim()
        return func(*args, **kwargs)
    return wrapper


class _ReadOnlyModule(types.ModuleType):
    """A check module whose functions cannot be replaced by plain assignment
    (`check.column_small = lambda f: None`). This only raises the bar: see the threat model.

    Reading a check (`check.column_small`) restores the shell's error reporting: in a test
    cell `check.column_small(column_parallel)` that happens before the name `column_parallel`
    is looked up, so even a NameError (a deleted answer) cannot be swallowed.
    """

    def __getattribute__(self, name):
        if not name.startswith("_"):
            restore_error_reporting()
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        raise AttributeError(f"{self.__name__} is read-only: its checks cannot be replaced")

    def __delattr__(self, name):
        raise AttributeError(f"{self.__name__} is read-only: its checks cannot be removed")


class _ReadOnlyPackage(_ReadOnlyModule):
    """A package (`tpgrade` itself, an assignment's): `from assignments.<name> import checks`
    reads the attribute `checks` of the package, so `assignments.<name>.checks = fake` must fail
    too. Importing a submodule still works: importlib sets the attribute to the module it has
    just put in sys.modules."""

    def __setattr__(self, name, value):
        if value is not None and value is sys.modules.get(f"{self.__name__}.{name}"):
            types.ModuleType.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)


def make_read_only(module_name):
    module = sys.modules[module_name]
    if isinstance(module, _ReadOnlyModule):  # already locked (tpgrade locks itself on import)
        return
    module.__class__ = _ReadOnlyPackage if hasattr(module, "__path__") else _ReadOnlyModule


def make_checks_read_only(module_name):
    """A notebook's check module read-only, and the assignment's package above it: a test cell's
    `from assignments.<name> import checks as check` reads the attribute `checks` of the
    package, so `assignments.<name>.checks = fake` must fail too."""
    make_read_only(module_name)
    make_read_only(module_name.rpartition(".")[0])
