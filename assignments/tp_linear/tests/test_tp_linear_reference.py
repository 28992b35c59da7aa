"""tp_linear's catalogue covers the classic cases, and the instructor's layers equal the dense
ones on a grid of shapes, with one collective each. Fast (in-process, tpgrade.offline)."""
import itertools

import numpy as np
import pytest

import assignments
import tpsim
from assignments.tp_linear import examples
from assignments.tp_linear.examples import students
from tpgrade import offline
from tpjudge.cells import graded_tests, read

SOURCE = read(assignments.get("tp_linear").notebook)


@pytest.fixture(scope="module")
def ns():
    return offline.run(SOURCE).namespace


def test_catalogue_covers_the_required_cases():
    mistakes = {s.student for s in students.MISTAKES}
    assert len(mistakes) >= 12 and len(students.VALID) >= 3
    assert all(s.loses for s in students.MISTAKES) and not any(s.loses for s in students.VALID)
    ids = [s.student for s in examples.ALL]
    assert len(ids) == len(set(ids))
    for s in examples.ALL:
        assert set(s.loses) <= set(graded_tests(SOURCE)), s.student
    assert students.COLUMN_TESTS | students.ROW_TESTS <= set(graded_tests(SOURCE))


def _dense(x, W, b=None):
    y = x @ W.T
    return y if b is None else y + b


@pytest.mark.parametrize("n, p", itertools.product(range(1, 10), (1, 2, 3, 4, 5, 8, 9)))
def test_reference_layers_equal_dense_with_one_collective(ns, n, p):
    rng = np.random.default_rng(n * 100 + p)
    x, W, b = rng.standard_normal((2, 3, n)), rng.standard_normal((n, n)), rng.standard_normal(n)
    assert ns["shard_sizes"](n, p) == [len(a) for a in np.array_split(np.arange(n), p)]
    for name, op in (("column_parallel", "all_gather"), ("row_parallel", "all_reduce")):
        with tpsim.recording() as calls:
            y = ns[name](x, W, p, b=b)
        np.testing.assert_allclose(y, _dense(x, W, b), rtol=1e-12, atol=1e-12)
        assert [c.op for c in calls] == [op] and len(calls[0].inputs) == p
