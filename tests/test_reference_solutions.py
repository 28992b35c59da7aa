"""The numpy notebooks (every numpy assignment of the registry) without nbgrader: reference
solutions pass every check, the release stubs fail every check, the nbgrader metadata is well
formed. Fast (a few seconds); what each example student loses is test_catalogue.py's, the real
nbgrader cycle test_course_cycle.py's."""
import pytest

import assignments
from tpgrade import offline
from tpjudge.cells import read

NOTEBOOKS = [a.name for a in assignments.discover() if a.kind == "numpy"]


def _source(assignment):
    return read(assignments.get(assignment).notebook)


@pytest.mark.parametrize("assignment", NOTEBOOKS)
def test_reference_solutions_pass_every_graded_cell(assignment):
    run = offline.run(_source(assignment))
    assert run.errors == {} and run.failed == {}
    assert len(run.graded) >= 10


@pytest.mark.parametrize("assignment", NOTEBOOKS)
def test_release_stubs_fail_every_graded_cell(assignment):
    run = offline.run(_source(assignment), release=True)
    assert set(run.failed) == set(run.graded)
    assert all("NotImplementedError" in e or "NameError" in e for e in run.failed.values())


@pytest.mark.parametrize("assignment", NOTEBOOKS)
def test_nbgrader_metadata_is_well_formed(assignment):
    cells = [c for c in _source(assignment).cells if "nbgrader" in c.metadata]
    meta = [c.metadata.nbgrader for c in cells]
    ids = [m.grade_id for m in meta]
    assert len(ids) == len(set(ids))
    assert all(m.schema_version == 3 for m in meta)
    for cell, m in zip(cells, meta):
        if m.grade:
            assert m.grade_id.startswith("test_") and m.locked and 1 <= m.points <= 3
            hidden = "### BEGIN HIDDEN TESTS" in cell.source
            # checks go through the notebook's own check module, imported afresh: nothing a
            # solution cell can rebind
            assert f"from assignments.{assignment}" in cell.source and "np." not in cell.source, \
                m.grade_id
            assert hidden or "check." in cell.source
        elif m.solution:
            assert m.grade_id.startswith("sol_") and "### BEGIN SOLUTION" in cell.source
        else:
            assert m.locked
    setup = next(c for c in cells if c.metadata.nbgrader.grade_id == "setup")
    assert f"import assignments.{assignment}.checks" in setup.source
    assert "import tpgrade" in setup.source and setup.metadata.nbgrader.locked
    assert cells.index(setup) == 0
