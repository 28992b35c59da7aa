"""tp_mlp's catalogue covers the classic cases, and the instructor's MLP equals the dense one on
a grid of shapes with exactly one all-reduce; its communication counts are the seed chapter's.
Fast (in-process, tpgrade.offline)."""
import itertools

import numpy as np
import pytest

import assignments
import tpsim
from assignments.tp_mlp import examples
from tpgrade import offline
from tpjudge.cells import graded_tests, read

SOURCE = read(assignments.get("tp_mlp").notebook)


@pytest.fixture(scope="module")
def ns():
    return offline.run(SOURCE).namespace


def test_catalogue_covers_the_required_cases():
    assert len(examples.MISTAKES) >= 3 and examples.VALID
    assert all(s.loses for s in examples.MISTAKES) and not any(s.loses for s in examples.VALID)
    ids = [s.student for s in examples.ALL]
    assert len(ids) == len(set(ids))
    for s in examples.ALL:
        assert set(s.loses) <= set(graded_tests(SOURCE)), s.student


@pytest.mark.parametrize("n, p", itertools.product(range(1, 10), (1, 2, 3, 4, 5, 8, 9)))
def test_reference_mlp_equals_dense_with_one_all_reduce(ns, n, p):
    rng = np.random.default_rng(n * 100 + p)
    x, W, b = rng.standard_normal((2, 3, n)), rng.standard_normal((n, n)), rng.standard_normal(n)
    W2, b2 = rng.standard_normal((4, n)), rng.standard_normal(4)
    with tpsim.recording() as calls:
        y = ns["mlp_tp"](x, W, W2, p, b1=b, b2=b2, activation=np.tanh)
    dense = np.tanh(x @ W.T + b) @ W2.T + b2
    np.testing.assert_allclose(y, dense, rtol=1e-12, atol=1e-12)
    assert [c.op for c in calls] == ["all_reduce"]


def test_reference_comm_counts(ns):
    mlp = ns
    assert [mlp["allreduces_per_layer"](tp) for tp in (1, 2, 8)] == [0, 2, 2]
    assert mlp["allreduces_per_layer"](4, backward=True) == 4
    assert mlp["ring_allreduce_bytes"](1000, 4, 2) == 3000
    # the seed chapter's total: 8 * b * s * h * (T - 1) / T elements per layer, fwd + bwd
    b, s, h, t = 8, 2048, 4096, 8
    assert mlp["layer_allreduce_bytes"](b, s, h, t, 1, backward=True) == 8 * b * s * h * (t - 1) / t
