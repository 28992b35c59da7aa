"""Students who try to forge their verdicts from inside their own code: the in-process attacks.

Each one reaches for the checks from a solution cell (a planted module, an import hook, a
swapped code object, a trace hook, the garbage collector, a forged collective log, an array
that lies about its arithmetic, ...) and hands in a WRONG answer. When the test cells ran in the
student's kernel, each of these turned lost points into full ones (tests/test_judge_catalogue.py
shows it for those that work without a notebook shell). With the judge (tpjudge) the checks run
in the grader's process and the student's code in another: each must lose exactly the points
its wrong answer loses without the attack (`control`), be flagged for the instructor
(tpjudge.reach), and change nobody else's grade.

An assignment's forgers are in its examples (`FORGERS`); the attacks that work on any
notebook's checks are here.
"""
from __future__ import annotations

from dataclasses import dataclass

from .submissions import Submission, edited

# A callable that accepts anything and returns None: what planted checks are made of.
NOOP = '''
class _Anything:
    def __getattr__(self, name):
        return _Anything()
    def __call__(self, *args, **kwargs):
        return None
'''

# A hook (trace or profile) that sets `got = want` in every check's frame it enters.
REWRITE_GOT = '''
import sys, ctypes
def _hook(frame, event, arg):
    names = frame.f_locals
    if event == "call" and ("tpgrade" in frame.f_code.co_filename
                            or "assignments" in frame.f_code.co_filename) \\
            and "got" in names and "want" in names:
        names["got"] = names["want"]
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
    return None
'''

# Every `fail` of the checks, found through the garbage collector, made to say nothing.
QUIET_FAIL = '''
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
    answer: str | None    # the (wrong) answer that follows it; None: the cell's reference
    control: str | None   # the same wrong answer without the attack: what must be lost
    shell_only: bool = False   # works only where a notebook shell runs the tests
    edits: tuple = ()     # ((cell, old, new), ...): the wrong answer's edits of other cells

    def submission(self, reference: dict[str, str], control=False) -> Submission:
        """The forger as an example student; `control`: its wrong answer alone (no attack).
        `reference`: the instructor's answers (tpjudge.cells.reference_answers)."""
        changes = {}
        for cell, old, new in self.edits:
            changes.setdefault(cell, []).append((old, new))
        answers = {cell: code for cell, code in edited(reference, **changes).items()
                   if cell in changes}
        base = "\n" + reference[self.cell]
        answers[self.cell] = ((base if self.control is None else self.control) if control
                              else self.attack + (base if self.answer is None else self.answer))
        name = f"{self.student}_control" if control else self.student
        return Submission(name, self.assignment, {self.assignment: answers}, why=self.why)
