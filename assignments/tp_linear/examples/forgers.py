"""tp_linear's forgers: in-process attacks on the checks from the `sol_column_parallel` cell
(the attack, then a column_parallel that returns zeros). What they are and what the judge must
make of them: tpcourse.forgery.
"""
from __future__ import annotations

from tpcourse.forgery import NOOP, QUIET_FAIL, REWRITE_GOT, Forger

LINEAR = "tp_linear"

# The wrong answer: the right shape, zeros for values, no collective.
ZEROS = '''
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    return np.zeros(x.shape[:-1] + (W.shape[0],), dtype=x.dtype)
'''

def _linear(student, why, attack, answer=ZEROS, control=ZEROS, shell_only=False):
    return Forger(student, LINEAR, why, "sol_column_parallel", attack, answer, control,
                  shell_only)


FORGERS = [
    _linear("f_planted_module", "plants a module of no-op checks in sys.modules and in the "
            "package's __dict__ (past its read-only guard)", NOOP + '''
import sys, types, assignments.tp_linear
_fake = types.ModuleType("assignments.tp_linear.checks")
_fake.__getattr__ = lambda name: _Anything()
sys.modules["assignments.tp_linear.checks"] = _fake
assignments.tp_linear.__dict__["checks"] = _fake
'''),
    _linear("f_guard_undone", "goes around the check module's read-only guard "
            "(types.ModuleType.__setattr__) and replaces every check", '''
import types
import assignments.tp_linear.checks as _checks
for _name in [n for n in vars(_checks) if not n.startswith("_")]:
    if callable(getattr(_checks, _name)):
        types.ModuleType.__setattr__(_checks, _name, lambda *a, **k: None)
'''),
    _linear("f_import_hook", "wraps builtins.__import__ so that the checks' import in a test "
            "cell gets no-op checks", NOOP + '''
import builtins
_real_import = builtins.__import__
def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if name.startswith(("tpgrade", "assignments")) and level == 0:
        return _Anything()
    return _real_import(name, globals, locals, fromlist, level)
builtins.__import__ = _import
'''),
    _linear("f_meta_path", "drops the checks from sys.modules and installs an import finder "
            "that serves no-op ones", NOOP + '''
import sys, types, importlib.abc, importlib.util
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tpgrade", "assignments"):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = lambda attr: _Anything()
        return module
    def exec_module(self, module):
        pass
for _name in [n for n in sys.modules if n.split(".")[0] in ("tpgrade", "assignments")]:
    del sys.modules[_name]
sys.meta_path.insert(0, _Finder())
'''),
    _linear("f_code_swap", "swaps the code object of every check for a no-op's", '''
import assignments.tp_linear.checks as _checks
def _noop(*args, **kwargs):
    return None
for _name in dir(_checks):
    _check = getattr(_checks, _name)
    _inner = getattr(_check, "__wrapped__", None)
    if _inner is not None and hasattr(_inner, "__code__"):
        _inner.__code__ = _noop.__code__
'''),
    _linear("f_shell_class", "patches the notebook shell's CLASS so that no error is ever "
            "shown (the checks reset the instance, not the class)", '''
from IPython.core.interactiveshell import InteractiveShell
InteractiveShell.showtraceback = lambda self, *a, **k: None
InteractiveShell._showtraceback = lambda self, *a, **k: None
try:
    from ipykernel.zmqshell import ZMQInteractiveShell
    ZMQInteractiveShell._showtraceback = lambda self, *a, **k: None
except ImportError:
    pass
''', shell_only=True),
    _linear("f_trace_hook", "a trace hook that, in every check's frame, overwrites the "
            "student's output with the expected one", REWRITE_GOT + "sys.settrace(_hook)\n"),
    _linear("f_profile_hook", "the same through a profile hook (sys.setprofile)",
            REWRITE_GOT + "sys.setprofile(_hook)\n"),
    _linear("f_gc_closure", "finds the checks' `fail` through the garbage collector and "
            "empties it", QUIET_FAIL),
    _linear("f_forged_log", "computes the layer densely (no rank ever holds a shard) and "
            "forges an all_gather of the right slices into the collectives' log", "",
            answer='''
import tpsim
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    y = x @ W.T + (0 if b is None else b)           # dense: no rank computes a shard
    cuts = np.cumsum(shard_sizes(W.shape[0], num_ranks))[:-1]
    forged = tpsim.Call("all_gather", tuple(p.copy() for p in np.split(y, cuts, axis=-1)), -1)
    for calls in tpsim._open_recordings:
        calls.append(forged)
    return y
''', control='''
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    y = x @ W.T + (0 if b is None else b)           # dense: no rank computes a shard
    shard_sizes(W.shape[0], num_ranks)
    return y
'''),
    _linear("f_lying_array", "returns an ndarray subclass whose subtraction and comparison "
            "always say 'equal'", '''
class _Agreeable(np.ndarray):
    def __sub__(self, other):
        return np.zeros(np.broadcast(self, other).shape)
    __rsub__ = __sub__
    def __eq__(self, other):
        return np.ones(np.broadcast(self, other).shape, dtype=bool)
    def __ne__(self, other):
        return np.zeros(np.broadcast(self, other).shape, dtype=bool)
''', answer='''
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    return np.zeros(x.shape[:-1] + (W.shape[0],), dtype=x.dtype).view(_Agreeable)
'''),
]
