"""The numpy notebooks without nbgrader: reference solutions pass every check, the release
stubs fail every check, the example students lose exactly what the catalogue says, and the
reference functions equal the dense layers on a grid of shapes. Fast (a few seconds); the
real nbgrader cycle is exercised in test_course_cycle.py."""
import itertools

import nbformat
import numpy as np
import pytest

import tpsim
from tpcourse import REPO
from tpcourse.examples import numpy_students as catalogue
from tpgrade import offline

NOTEBOOKS = ("tp_linear", "tp_mlp", "tp_sequence", "tp_attention")


def _source(assignment):
    return nbformat.read(str(REPO / "source" / assignment / f"{assignment}.ipynb"), as_version=4)


@pytest.fixture(scope="module")
def ns():
    return {a: offline.run(_source(a)).namespace for a in NOTEBOOKS}


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
            # checks go through tpgrade, imported afresh: nothing a solution cell can rebind
            assert "import tpgrade." in cell.source and "np." not in cell.source, m.grade_id
            assert hidden or "check." in cell.source
        elif m.solution:
            assert m.grade_id.startswith("sol_") and "### BEGIN SOLUTION" in cell.source
        else:
            assert m.locked
    setup = next(c for c in cells if c.metadata.nbgrader.grade_id == "setup")
    assert "import tpgrade" in setup.source and setup.metadata.nbgrader.locked
    assert cells.index(setup) == 0


@pytest.mark.parametrize("sub", [s for s in catalogue.ALL if s.student != "looping"],
                         ids=lambda s: f"{s.student}-{s.assignment}")
def test_catalogue_expectations_hold_in_process(sub):
    run = offline.run(_source(sub.assignment), sub.answers.get(sub.assignment),
                      release=bool(sub.unanswered))
    if sub.loses_all:
        assert set(run.failed) == set(run.graded)
    else:
        assert set(run.failed) == set(sub.loses), run.failed


def test_catalogue_covers_the_required_cases():
    mistakes = {s.student for s in catalogue.MISTAKES}
    assert len(mistakes) >= 12 and len(catalogue.VALID) >= 3
    assert all(s.loses for s in catalogue.MISTAKES) and not any(s.loses for s in catalogue.VALID)
    ids = [(s.student, s.assignment) for s in catalogue.ALL]
    assert len(ids) == len(set(ids))
    graded = {a: set(offline.run(_source(a)).graded) for a in NOTEBOOKS}
    for s in catalogue.ALL:
        assert set(s.loses) <= graded[s.assignment], s.student


def _dense(x, W, b=None):
    y = x @ W.T
    return y if b is None else y + b


@pytest.mark.parametrize("n, p", itertools.product(range(1, 10), (1, 2, 3, 4, 5, 8, 9)))
def test_reference_layers_equal_dense_with_one_collective(ns, n, p):
    lin, mlp = ns["tp_linear"], ns["tp_mlp"]
    rng = np.random.default_rng(n * 100 + p)
    x, W, b = rng.standard_normal((2, 3, n)), rng.standard_normal((n, n)), rng.standard_normal(n)
    assert lin["shard_sizes"](n, p) == [len(a) for a in np.array_split(np.arange(n), p)]
    for name, op in (("column_parallel", "all_gather"), ("row_parallel", "all_reduce")):
        with tpsim.recording() as calls:
            y = lin[name](x, W, p, b=b)
        np.testing.assert_allclose(y, _dense(x, W, b), rtol=1e-12, atol=1e-12)
        assert [c.op for c in calls] == [op] and len(calls[0].inputs) == p
    W2, b2 = rng.standard_normal((4, n)), rng.standard_normal(4)
    with tpsim.recording() as calls:
        y = mlp["mlp_tp"](x, W, W2, p, b1=b, b2=b2, activation=np.tanh)
    np.testing.assert_allclose(y, _dense(np.tanh(_dense(x, W, b)), W2, b2), rtol=1e-12, atol=1e-12)
    assert [c.op for c in calls] == ["all_reduce"]


def test_reference_comm_counts(ns):
    mlp = ns["tp_mlp"]
    assert [mlp["allreduces_per_layer"](tp) for tp in (1, 2, 8)] == [0, 2, 2]
    assert mlp["allreduces_per_layer"](4, backward=True) == 4
    assert mlp["ring_allreduce_bytes"](1000, 4, 2) == 3000
    # the seed chapter's total: 8 * b * s * h * (T - 1) / T elements per layer, fwd + bwd
    b, s, h, t = 8, 2048, 4096, 8
    assert mlp["layer_allreduce_bytes"](b, s, h, t, 1, backward=True) == 8 * b * s * h * (t - 1) / t
