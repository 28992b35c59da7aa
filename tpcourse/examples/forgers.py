"""Students who try to forge their verdicts from inside their own code: the in-process attacks.

Each one reaches for the checks from a solution cell (a planted module, an import hook, a
swapped code object, a trace hook, the garbage collector, a forged collective log, an array
that lies about its arithmetic, ...) and hands in a WRONG answer. When the test cells ran in the
student's kernel, each of these turned lost points into full ones (tests/test_forgers.py shows
it for those that work without a notebook shell). With the judge (tpjudge) the checks run in
the grader's process and the student's code in another: each must lose exactly the points its
wrong answer loses without the attack (`control`), be flagged for the instructor
(tpjudge.reach), and change nobody else's grade.

tp_linear's forgers attack from the `sol_column_parallel` cell (the attack, then a
column_parallel that returns zeros); tp_torch's from `sol_mappings` (the notebook's own checks),
with the row layer adding its bias on every rank (wrong values, right shapes).
"""
from __future__ import annotations

from dataclasses import dataclass

from tpcourse.submissions import Submission

LINEAR, TORCH = "tp_linear", "tp_torch"

# The wrong answer: the right shape, zeros for values, no collective.
ZEROS = '''
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    return np.zeros(x.shape[:-1] + (W.shape[0],), dtype=x.dtype)
'''

# A callable that accepts anything and returns None: what planted checks are made of.
_NOOP = '''
class _Anything:
    def __getattr__(self, name):
        return _Anything()
    def __call__(self, *args, **kwargs):
        return None
'''


# A hook (trace or profile) that sets `got = want` in every check's frame it enters.
_REWRITE_GOT = '''
import sys, ctypes
def _hook(frame, event, arg):
    names = frame.f_locals
    if event == "call" and "tpgrade" in frame.f_code.co_filename and "got" in names \\
            and "want" in names:
        names["got"] = names["want"]
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
    return None
'''

# Every `fail` of the checks, found through the garbage collector, made to say nothing.
_QUIET_FAIL = '''
import gc, types
def _quiet(message):
    return None
for _obj in gc.get_objects():
    if isinstance(_obj, types.FunctionType) and _obj.__name__ == "fail" \\
            and getattr(_obj, "__module__", "").startswith("tpgrade"):
        _obj.__code__ = _quiet.__code__
'''


@dataclass(frozen=True)
class Forger:
    student: str
    assignment: str
    why: str
    cell: str             # the solution cell the attack is written into
    attack: str           # runs first in that cell
    answer: str           # the (wrong) answer that follows it
    control: str          # the same wrong answer without the attack: what must be lost
    shell_only: bool = False   # works only where a notebook shell runs the tests


def _linear(student, why, attack, answer=ZEROS, control=ZEROS, shell_only=False):
    return Forger(student, LINEAR, why, "sol_column_parallel", attack, answer, control,
                  shell_only)


LINEAR_FORGERS = [
    _linear("f_planted_module", "plants a module of no-op checks in sys.modules and in the "
            "package's __dict__ (past its read-only guard)", _NOOP + '''
import sys, types, tpgrade
_fake = types.ModuleType("tpgrade.linear")
_fake.__getattr__ = lambda name: _Anything()
sys.modules["tpgrade.linear"] = _fake
tpgrade.__dict__["linear"] = _fake
'''),
    _linear("f_guard_undone", "goes around the check module's read-only guard "
            "(types.ModuleType.__setattr__) and replaces every check", '''
import types
import tpgrade.linear as _checks
for _name in [n for n in vars(_checks) if not n.startswith("_")]:
    if callable(getattr(_checks, _name)):
        types.ModuleType.__setattr__(_checks, _name, lambda *a, **k: None)
'''),
    _linear("f_import_hook", "wraps builtins.__import__ so that `import tpgrade...` in a test "
            "cell gets no-op checks", _NOOP + '''
import builtins
_real_import = builtins.__import__
def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if name.startswith("tpgrade") and level == 0:
        return _Anything()
    return _real_import(name, globals, locals, fromlist, level)
builtins.__import__ = _import
'''),
    _linear("f_meta_path", "drops the checks from sys.modules and installs an import finder "
            "that serves no-op ones", _NOOP + '''
import sys, types, importlib.abc, importlib.util
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "tpgrade" or name.startswith("tpgrade."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = lambda attr: _Anything()
        return module
    def exec_module(self, module):
        pass
for _name in [n for n in sys.modules if n == "tpgrade" or n.startswith("tpgrade.")]:
    del sys.modules[_name]
sys.meta_path.insert(0, _Finder())
'''),
    _linear("f_code_swap", "swaps the code object of every check for a no-op's", '''
import tpgrade.linear as _checks
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
            "student's output with the expected one", _REWRITE_GOT + "sys.settrace(_hook)\n"),
    _linear("f_profile_hook", "the same through a profile hook (sys.setprofile)",
            _REWRITE_GOT + "sys.setprofile(_hook)\n"),
    _linear("f_gc_closure", "finds the checks' `fail` through the garbage collector and "
            "empties it", _QUIET_FAIL),
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


# -- tp_torch: the notebook's own (2-rank) checks ---------------------------------------------------
# The row layer adds its bias on every rank, before the all-reduce.
BIAS_EVERY_RANK = ("y = reduce_from_tp_region(F.linear(x, self.weight), self.group)",
                   "y = reduce_from_tp_region(F.linear(x, self.weight, self.bias), self.group)\n"
                   "        return y")


def _torch(student, why, attack, shell_only=False):
    return Forger(student, TORCH, why, "sol_mappings", attack, "", "", shell_only)


TORCH_FORGERS = [
    _torch("f_torch_comparisons", "rebinds torch.allclose / torch.equal and the checks' own "
           "comparison helpers to always agree", '''
import types, torch
import tpgrade.tensors as _tensors
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
for _name, _agree in (("close", lambda *a, **k: True), ("equal", lambda *a, **k: True),
                      ("mismatch", lambda *a, **k: "")):
    types.ModuleType.__setattr__(_tensors, _name, _agree)   # past its read-only guard
'''),
    _torch("f_torch_planted", "plants no-op torch checks in sys.modules and the package", '''
import sys, types, tpgrade
class _Anything:
    def __getattr__(self, name):
        return _Anything()
    def __call__(self, *args, **kwargs):
        return None
_fake = types.ModuleType("tpgrade.torch_checks")
_fake.__getattr__ = lambda name: _Anything()
sys.modules["tpgrade.torch_checks"] = _fake
tpgrade.__dict__["torch_checks"] = _fake
'''),
    _torch("f_torch_gc", "empties every check's `fail` found through the garbage collector",
           _QUIET_FAIL),
]

FORGERS = LINEAR_FORGERS + TORCH_FORGERS


def submission(f: Forger, reference: dict[str, str], control=False) -> Submission:
    """The forger as an example student; `control`: its wrong answer alone (no attack).
    `reference`: the instructor's answers of the assignment (tpjudge.cells.reference_answers)."""
    if f.assignment == TORCH:
        row = reference["sol_row_layer"]
        assert row.count(BIAS_EVERY_RANK[0]) == 1, "the tp_torch reference changed"
        answers = {"sol_row_layer": row.replace(*BIAS_EVERY_RANK),
                   f.cell: (("" if control else f.attack) + "\n" + reference[f.cell])}
    else:
        answers = {f.cell: f.control if control else f.attack + f.answer}
    name = f"{f.student}_control" if control else f.student
    return Submission(name, f.assignment, {f.assignment: answers}, why=f.why)
