"""tp_sequence without nbgrader: the catalogue covers the classic cases, the reference functions
equal the dense computations on a grid of sizes with the collectives the notebook prescribes,
and the checks call the student's functions only with data (what the out-of-process judge can
pass). What every catalogued student loses is test_catalogue.py's (against grades.json); the
reference, the release stubs and the nbgrader metadata are covered with the other notebooks in
test_reference_solutions.py; the real nbgrader cycle in test_course_cycle.py."""
import inspect
import itertools
import types

import numpy as np
import pytest

import assignments
import assignments.tp_sequence.checks as checks
import tpsim
from assignments.tp_sequence import examples as catalogue
from assignments.tp_sequence.checks import sequence, vocab
from tpgrade import offline
from tpgrade.verdict import CheckFailed
from tpjudge.cells import read


@pytest.fixture(scope="module")
def source():
    return read(assignments.get("tp_sequence").notebook)


@pytest.fixture(scope="module")
def ns(source):
    return offline.run(source).namespace


def test_catalogue_covers_the_required_cases(source):
    graded = set(offline.run(source).graded)
    assert graded == catalogue.SP_TESTS | catalogue.EMBEDDING_TESTS | catalogue.CE_TESTS
    assert len(catalogue.MISTAKES) >= 8 and len(catalogue.VALID) >= 2
    assert all(s.loses and s.loses <= graded for s in catalogue.MISTAKES)
    assert not any(s.loses for s in catalogue.VALID)
    students = [s.student for s in catalogue.ALL]
    assert len(students) == len(set(students))
    # every graded cell is lost by some mistake: no check that nothing can fail
    assert set().union(*(s.loses for s in catalogue.MISTAKES)) >= graded - {
        "test_sp_input_dims", "test_sp_bad_args", "test_sp_dtype", "test_sp_uneven_sequence",
        "test_sp_inputs_unmodified", "test_embedding_inputs_unmodified", "test_ce_bad_args"}


# --------------------------------------------------------------------------- the reference


def _layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def _ring_elements(call):
    p = len(call.inputs)
    if call.op == "all_gather":
        return (p - 1) * sum(a.size for a in call.inputs)
    return (2 if call.op == "all_reduce" else 1) * (p - 1) * call.inputs[0].size


@pytest.mark.parametrize("s, p", itertools.product(range(1, 10), (1, 2, 3, 4, 5, 8, 9)))
def test_layer_sp_equals_the_dense_block_with_one_gather_and_one_reduce_scatter(ns, s, p):
    rng = np.random.default_rng(s * 100 + p)
    x = rng.standard_normal((s, 2, 6))
    w, b = 1 + rng.standard_normal(6) / 2, rng.standard_normal(6)
    W1, b1 = rng.standard_normal((s + 3, 6)), rng.standard_normal(s + 3)
    W2, b2 = rng.standard_normal((6, s + 3)), rng.standard_normal(6)
    shards = np.array_split(x, p, axis=0)
    with tpsim.recording() as calls:
        y_shards = ns["layer_sp"](shards, w, b, W1, W2, b1=b1, b2=b2, activation=np.tanh)
    want = x + np.tanh(_layer_norm(x, w, b) @ W1.T + b1) @ W2.T + b2
    assert [y_r.shape for y_r in y_shards] == [x_r.shape for x_r in shards]
    np.testing.assert_allclose(np.concatenate(y_shards), want, rtol=1e-12, atol=1e-12)
    assert [(c.op, c.axis % 3) for c in calls] == [("all_gather", 0), ("reduce_scatter", 0)]
    # the byte relation the notebook states: the pair moves exactly one all-reduce of x
    assert sum(_ring_elements(c) for c in calls) == 2 * (p - 1) * x.size


@pytest.mark.parametrize("vocab, p", itertools.product(range(1, 10), (1, 2, 3, 4, 8)))
def test_vocab_functions_equal_dense_with_token_sized_collectives(ns, vocab, p):
    rng = np.random.default_rng(vocab * 10 + p)
    table, ids = rng.standard_normal((vocab, 3)), rng.integers(0, vocab, (2, 5))
    with tpsim.recording() as calls:
        out = ns["vocab_parallel_embedding"](ids, table, p)
    np.testing.assert_array_equal(out, table[ids])
    assert [c.op for c in calls] == ["all_reduce"] and len(calls[0].inputs) == p
    z = rng.standard_normal((2, 5, vocab)) * 50 + 1e4 * rng.standard_normal()
    with tpsim.recording() as calls:
        loss = ns["vocab_parallel_cross_entropy"](np.array_split(z, p, axis=-1), ids)
    m = z.max(-1)
    want = m + np.log(np.exp(z - m[..., None]).sum(-1)) - np.take_along_axis(
        z, ids[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-12 * abs(z).max())
    assert [(c.op, c.reduce_op) for c in calls] == [("all_reduce", "max"), ("all_reduce", "sum"),
                                                    ("all_reduce", "sum")]
    assert all(a.size == ids.size for c in calls for a in c.inputs)


# --------------------------------------------------------------------------- judge conventions


def _is_data(value):
    """What the out-of-process judge can pass (see the project's judge conventions)."""
    if isinstance(value, (np.ndarray, np.generic, int, float, bool, str, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_data(v) for k, v in value.items())
    return isinstance(value, (types.FunctionType, np.ufunc))    # an activation


def _data_only(f, seen):
    def proxy(*args, **kwargs):
        assert _is_data(list(args)) and _is_data(kwargs), (args, kwargs)
        seen.append(f.__name__)
        result = f(*args, **kwargs)
        assert _is_data(result), type(result)
        return result
    proxy.__name__ = f.__name__
    return proxy


@pytest.mark.parametrize("module", [sequence, vocab])
def test_checks_pass_the_student_only_data(ns, module):
    checks = [(n, f) for n, f in vars(module).items()
              if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == module.__name__
              and hasattr(f, "__wrapped__")]
    assert len(checks) >= 8
    for name, check in checks:
        params = list(inspect.signature(check.__wrapped__).parameters)
        seen = []
        check(*[_data_only(ns[p], seen) for p in params])
        assert seen, f"{name} never called {params}"


@pytest.mark.parametrize("module", [sequence, vocab])
def test_check_modules_are_read_only_and_imported_with_the_notebooks_checks(module):
    with pytest.raises(AttributeError, match="read-only"):
        module.sp_small = lambda f: None
    assert getattr(checks, module.__name__.rsplit(".", 1)[1]) is module
    with pytest.raises(AttributeError, match="read-only"):
        checks.vocab = sequence


def test_a_rebound_numpy_log_does_not_change_the_loss_verdict(monkeypatch):
    def max_minus_target(logit_shards, target):      # the loss without its log-sum-exp
        z = np.concatenate(logit_shards, axis=-1)
        return z.max(-1) - np.take_along_axis(z, target[..., None], -1)[..., 0]

    monkeypatch.setattr(np, "log", lambda a: a * 0)   # makes that answer "right" for np.log
    with pytest.raises(CheckFailed, match="values differ from the dense result"):
        vocab.ce_small(max_minus_target)
