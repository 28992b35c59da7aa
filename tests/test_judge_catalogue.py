"""The example catalogue through the judge, in-process (tpjudge.local: no nbgrader, no sandbox).

- Every numpy student gets from the judge exactly the verdicts it got when the test cells ran
  in the student's own process (tpgrade.offline runs a notebook's cells in one process, as the
  kernel did), which are the verdicts the catalogue states.
- Every forger (tpcourse.examples.forgers) loses under the judge exactly what its wrong answer
  loses without the attack, while in the student's own process the attack wins it points
  (shown in a fresh interpreter, which the attack may wreck); it is flagged; honest students are not.
The real nbgrader pipeline, sandboxed, is exercised by test_course_cycle, test_hostile and
test_torch_notebook.
"""
from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest

from tpcourse import REPO
from tpcourse.demo import catalogue
from tpcourse.examples import forgers as F
from tpcourse.examples import torch_attention_students as A
from tpcourse.examples import torch_sequence_students as S
from tpcourse.examples import torch_students as T
from tpgrade import offline
from tpjudge import local, reach
from tpjudge.cells import read, reference_answers, graded_tests


def _source(assignment):
    return read(REPO / "source" / assignment / f"{assignment}.ipynb")


NUMPY = [s for group in catalogue() for s in group]       # every numpy catalogue
SOURCES = {a: _source(a) for a in {s.assignment for s in NUMPY} | {"tp_torch", A.ASSIGNMENT}}


def _answers(sub):
    return sub.answers.get(sub.assignment, {})


def _expected(sub):
    return set(graded_tests(SOURCES[sub.assignment])) if sub.loses_all else set(sub.loses)


@pytest.mark.parametrize("sub", NUMPY, ids=lambda s: f"{s.assignment}-{s.student}")
def test_every_numpy_student_gets_the_verdicts_it_got_in_its_own_process(sub):
    nb = local.with_answers(SOURCES[sub.assignment], _answers(sub),
                            release=sub.assignment in sub.unanswered)
    judged = set(local.judge(nb, timeout=5, interrupt_grace=2).failed)
    assert judged == _expected(sub), sub.why
    if "loop" not in sub.student:               # in-process, a loop would never end
        assert judged == set(offline.run(nb).failed)


# -- forgers --------------------------------------------------------------------------------------
# A few are graded for real in test_hostile too (nbgrader, the sandboxed judge, the flags).
_IN_PROCESS = r'''
import json, sys, nbformat
from tpgrade import offline
print(json.dumps(sorted(offline.run(nbformat.reads(sys.stdin.read(), as_version=4)).failed)))
'''


def _forger_notebook(f, control=False):
    answers = _answers(F.submission(f, reference_answers(SOURCES[f.assignment]), control))
    return local.with_answers(SOURCES[f.assignment], answers)


@pytest.fixture(scope="module")
def wrong_answers():
    """{forger: what its wrong answer alone loses under the judge} (one run per distinct one)."""
    runs = {}
    for f in F.FORGERS:
        nb = _forger_notebook(f, control=True)
        key = nbformat.writes(nb)
        if key not in runs:
            runs[key] = set(local.judge(nb, timeout=60).failed)
        runs[f.student] = runs[key]
    return runs


@pytest.mark.parametrize("f", F.FORGERS, ids=lambda f: f.student)
def test_a_forger_loses_exactly_what_its_wrong_answer_loses(wrong_answers, f):
    assert wrong_answers[f.student], "the control must be a wrong answer"
    assert set(local.judge(_forger_notebook(f), timeout=60).failed) == \
        wrong_answers[f.student], f.why


@pytest.mark.parametrize("f", [f for f in F.FORGERS if not f.shell_only], ids=lambda f: f.student)
def test_in_its_own_process_the_attack_wins_points(wrong_answers, f):
    """The attacks are real: run as the kernel ran test cells (one process; a fresh
    interpreter, which the attack may wreck), each turns some of its wrong answer's lost tests
    into passes."""
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS],
                          input=nbformat.writes(_forger_notebook(f)),
                          capture_output=True, text=True, timeout=300)
    lost_in_process = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert lost_in_process < wrong_answers[f.student], f"{f.student} won nothing in-process"


@pytest.mark.parametrize("f", F.FORGERS, ids=lambda f: f.student)
def test_a_forger_is_flagged(f):
    assert reach.scan(f.attack + f.answer), f.why


def test_honest_students_are_not_flagged():
    honest = {a: reference_answers(nb) for a, nb in SOURCES.items()}
    hostile = {s.student for s in T.HOSTILE}          # attacks by design (graded elsewhere)
    for sub in NUMPY + [s for s in T.ALL if s.student not in hostile] + A.ALL + S.ALL:
        for assignment, answers in sub.answers.items():
            honest[f"{assignment}:{sub.student}"] = answers
    flagged = {who for who, answers in honest.items()
               if any(reach.scan(code) for code in answers.values())}
    # these reach on purpose: they rebind library functions, silence the shell, or kill themselves
    assert flagged == {"tp_linear:rebinds_allclose", "tp_linear:own_all_reduce",
                       "tp_linear:swallows_errors", "tp_torch:torch_crash", "tp_torch:torch_os_exit"}


def test_the_gpu_runners_hostile_students_are_flagged():
    for sub in T.HOSTILE:
        assert any(reach.scan(code) for code in sub.answers[T.NOTEBOOK].values()), sub.why
