"""The example catalogue through the judge, against the student's own process (no nbgrader, no
sandbox).

- Every numpy student gets from the judge the verdicts it got when the test cells ran in its
  own process (tpgrade.offline runs a notebook's cells in one process, as the kernel did): the
  judge's are its grade table (assignments/<name>/grades.json, checked by test_catalogue.py).
- Every forger (an assignment's FORGERS, tpcourse.forgery) loses under the judge exactly what its
  wrong answer loses without the attack (its table says so, test_catalogue.py), while in the
  student's own process the attack wins it points (shown in a fresh interpreter, which the
  attack may wreck); it is flagged; honest students are not.
The real nbgrader pipeline, sandboxed, is exercised by test_course_cycle, test_hostile and
test_torch_notebooks.
"""
from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest

import assignments
from tpcourse import catalogue
from tpgrade import offline
from tpjudge import local, reach
from tpjudge.cells import reference_answers

NUMPY = [a.name for a in assignments.discover() if a.kind == "numpy"]
SOURCES = {a: catalogue.source(a) for a in assignments.names()}
FORGERS = [f for a in assignments.names() for f in getattr(catalogue.examples(a), "FORGERS", ())]


def _notebook(sub):
    return local.with_answers(SOURCES[sub.assignment], sub.answers.get(sub.assignment, {}),
                              release=sub.assignment in sub.unanswered)


@pytest.fixture(scope="module")
def tables():
    return {a: catalogue.recorded(a) for a in assignments.names()}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("sub", [s for a in NUMPY for s in catalogue.students(a)
                                 if not catalogue.is_looping(s)],   # in-process: it never ends
                         ids=lambda s: f"{s.assignment}-{s.student}")
def test_every_numpy_student_gets_the_verdicts_it_got_in_its_own_process(tables, sub):
    assert set(offline.run(_notebook(sub)).failed) == \
        set(tables[sub.assignment]["lost"][sub.student]), sub.why


# -- forgers --------------------------------------------------------------------------------------
# A few are graded for real in test_hostile too (nbgrader, the sandboxed judge, the flags).
_IN_PROCESS = r'''
import json, sys, nbformat
from tpgrade import offline
print(json.dumps(sorted(offline.run(nbformat.reads(sys.stdin.read(), as_version=4)).failed)))
'''


def _forger_notebook(f):
    return _notebook(f.submission(reference_answers(SOURCES[f.assignment])))


@pytest.mark.slow                  # a fresh interpreter per attack
@pytest.mark.parametrize("f", [f for f in FORGERS if not f.shell_only], ids=lambda f: f.student)
def test_in_its_own_process_the_attack_wins_points(tables, f):
    """The attacks are real: run as the kernel ran test cells (one process; a fresh
    interpreter, which the attack may wreck), each turns some of its wrong answer's lost tests
    into passes."""
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS],
                          input=nbformat.writes(_forger_notebook(f)),
                          capture_output=True, text=True, timeout=300)
    lost_in_process = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    wrong_answer_loses = set(tables[f.assignment]["lost"][f"{f.student}_control"])
    assert lost_in_process < wrong_answer_loses, f"{f.student} won nothing in-process"


@pytest.mark.parametrize("f", FORGERS, ids=lambda f: f.student)
def test_a_forger_is_flagged(f):
    assert reach.scan(f.attack + (f.answer or "")), f.why


def test_honest_students_are_not_flagged():
    """Every catalogued student but the attacks (those that reach on purpose: they rebind
    library functions, silence the shell or kill themselves) and the gpu_runner's rank attacks
    (graded elsewhere)."""
    flagged, honest = set(), 0
    for a in assignments.names():
        cat = catalogue.examples(a)
        attacks = {s.student for s in getattr(cat, "RANK_ATTACKS", ())}
        for sub in [s for s in catalogue.students(a) if s.student not in attacks]:
            honest += 1
            if any(reach.scan(code) for code in sub.answers.get(a, {}).values()):
                flagged.add(sub.student)
        if any(reach.scan(code) for code in reference_answers(SOURCES[a]).values()):
            flagged.add(f"{a} (the instructor's solutions)")
    assert honest >= 100
    assert flagged == {"rebinds_allclose", "own_all_reduce", "swallows_errors", "torch_crash",
                       "torch_os_exit"}


def test_the_gpu_runners_rank_attacks_are_flagged():
    attacks = [s for a in assignments.names()
               for s in getattr(catalogue.examples(a), "RANK_ATTACKS", ())]
    assert attacks
    for sub in attacks:
        assert any(reach.scan(code) for code in sub.answers[sub.assignment].values()), sub.why
