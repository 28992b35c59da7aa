"""Nothing changes for users: every assignment's example catalogue (found through the registry),
graded in-process (tpcourse.catalogue: the judge for the test cells, the gpu_runner's units and
judge on forked gloo ranks for the gpu_* cells), gets exactly the grades recorded in its table
(assignments/<name>/grades.json, written by `python -m tpcourse.catalogue --write`). What each
table must say of a numpy assignment's students is what the catalogue states (`loses`); the
torch assignments' own tests hold their tables to their catalogues."""
from __future__ import annotations

import pytest

import assignments
from tpcourse import catalogue

NAMES = assignments.names()
CASES = [(a, sub) for a in NAMES for sub in catalogue.everyone(a)]


@pytest.fixture(scope="module")
def tables():
    return {a: catalogue.recorded(a) for a in NAMES}


def test_every_catalogued_student_is_in_its_table_and_no_other(tables):
    for a in NAMES:
        assert tables[a]["cells"] == catalogue.cells(a), a
        assert set(tables[a]["lost"]) == {s.student for s in catalogue.everyone(a)}, a


def test_a_numpy_table_says_what_its_catalogue_states(tables):
    for a in (a.name for a in assignments.discover() if a.kind == "numpy"):
        for sub in catalogue.students(a):
            want = set(tables[a]["cells"]) if sub.loses_all else set(sub.loses)
            assert set(tables[a]["lost"][sub.student]) == want, (a, sub.student, sub.why)


def test_a_forger_loses_exactly_what_its_wrong_answer_alone_loses(tables):
    forgers = [(a, f) for a in NAMES for f in getattr(catalogue.examples(a), "FORGERS", ())]
    assert len(forgers) >= 10
    for a, f in forgers:
        lost = tables[a]["lost"]
        assert lost[f.student] == lost[f"{f.student}_control"] and lost[f.student], f.why


# A student process per student (make test-fast judges the numpy catalogues in one process:
# test_judge_catalogue.py).
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("assignment, sub", CASES, ids=lambda v: getattr(v, "student", v))
def test_the_catalogue_gets_the_recorded_grades(tables, assignment, sub):
    assert catalogue.grade(sub) == tables[assignment]["lost"][sub.student], sub.why
