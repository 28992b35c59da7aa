"""Nothing changes for users: every assignment's example catalogue, graded in-process
(tpcourse.catalogue: the judge for the test cells, the gpu_runner's units and judge on forked
gloo ranks for the gpu_* cells), gets exactly the grades recorded in its table
(assignments/<name>/grades.json, written by `python -m tpcourse.catalogue --write`)."""
from __future__ import annotations

import pytest

from tpcourse import ASSIGNMENTS, catalogue

CASES = [(a, sub) for a in ASSIGNMENTS for sub in catalogue.students(a)]


@pytest.fixture(scope="module")
def tables():
    return {a: catalogue.recorded(a) for a in ASSIGNMENTS}


def test_every_catalogued_student_is_in_its_table_and_no_other(tables):
    for assignment in ASSIGNMENTS:
        assert tables[assignment]["cells"] == catalogue.cells(assignment), assignment
        assert list(tables[assignment]["lost"]) == \
            [s.student for s in catalogue.students(assignment)], assignment


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("assignment, sub", CASES, ids=lambda v: getattr(v, "student", v))
def test_the_catalogue_gets_the_recorded_grades(tables, assignment, sub):
    assert catalogue.grade(sub) == tables[assignment]["lost"][sub.student], sub.why
