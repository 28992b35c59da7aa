"""tp_linear's checks: they catch the classic mistakes, say so in words, and are not fooled by
a notebook that rebinds numpy helpers or tpsim (the defences of tpgrade's core, in the student's
own notebook)."""
import types

import numpy as np
import pytest

import assignments
import assignments.tp_linear
import tpsim
from assignments.tp_linear import checks as linear
from tpgrade import offline
from tpgrade.verdict import CheckFailed
from tpjudge.cells import read


@pytest.fixture(scope="module")
def linear_ns():
    return offline.run(read(assignments.get("tp_linear").notebook)).namespace


def test_check_failures_are_assertion_errors():
    assert issubclass(CheckFailed, AssertionError)


def test_local_shard_is_named(linear_ns):
    def local_shard(x, W, num_ranks, b=None):
        return x @ W[: W.shape[0] // num_ranks].T
    with pytest.raises(CheckFailed, match=r"expected shape \(3, 6\), got \(3, 3\); probably "
                                          r"only the local shard"):
        linear.column_small(local_shard)


def test_bias_on_every_rank_is_named(linear_ns):
    def every_rank(x, W, num_ranks, b=None):
        parts = [x[..., s] @ W[:, s].T + b for s in np.array_split(np.arange(W.shape[1]), num_ranks)]
        return tpsim.all_reduce(parts)
    with pytest.raises(CheckFailed, match="bias was added 2 times"):
        linear.row_bias_once(every_rank)


def test_dense_result_through_a_collective_fails():
    def dressed(x, W, num_ranks, b=None):
        y = x @ W.T
        return tpsim.all_reduce([y] + [np.zeros_like(y)] * (num_ranks - 1))
    linear.row_matches_dense(dressed)            # the numbers are right ...
    with pytest.raises(CheckFailed, match="rank 0's input to all_reduce"):
        linear.row_reduce_inputs(dressed)        # ... but it is not tensor parallel


def test_rebinding_numpy_helpers_does_not_change_verdicts(monkeypatch):
    monkeypatch.setattr(np, "allclose", lambda *a, **k: True)
    monkeypatch.setattr(np, "asarray", lambda a, *args, **kw: a)
    monkeypatch.setattr(np.testing, "assert_allclose", lambda *a, **k: None)
    with pytest.raises(CheckFailed):
        linear.column_matches_dense(lambda x, W, p, b=None: tpsim.all_gather([x @ W.T * 2]))


def test_a_patched_tpsim_is_restored_before_checking():
    genuine, code = tpsim.all_reduce, tpsim.all_reduce.__code__
    try:
        tpsim.all_reduce = lambda per_rank: sum(per_rank)                  # a fake: records nothing
        tpsim.all_gather.__code__ = (lambda per_rank, axis=-1: None).__code__
        linear.row_one_all_reduce(_row_via_module)   # passes: genuine one is back
        assert tpsim.all_reduce is genuine and tpsim.all_reduce.__code__ is code
        assert tpsim.all_gather(  # the swapped code object was put back too
            [np.ones(1), np.ones(1)]).shape == (2,)
    finally:
        tpsim.all_reduce = genuine


def _row_via_module(x, W, num_ranks, b=None):
    cols = np.array_split(np.arange(W.shape[1]), num_ranks)
    y = tpsim.all_reduce([x[..., c] @ W[:, c].T for c in cols])   # looked up at call time
    return y if b is None else y + b


def test_a_private_all_reduce_is_not_counted():
    def own(x, W, num_ranks, b=None):
        cols = np.array_split(np.arange(W.shape[1]), num_ranks)
        return sum(x[..., c] @ W[:, c].T for c in cols)
    with pytest.raises(CheckFailed, match="made 0 all_reduce"):
        linear.row_one_all_reduce(own)


def test_shell_that_swallows_exceptions_is_reset():
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    try:
        shell.set_custom_exc((Exception,), lambda *args, **kwargs: None)
        shell.user_ns["wrong"] = lambda x, W, p, b=None: x
        result = shell.run_cell("from assignments.tp_linear import checks as check\n"
                                "check.column_small(wrong)")
        assert isinstance(result.error_in_exec, CheckFailed)
        assert shell.custom_exceptions == ()
    finally:
        InteractiveShell.clear_instance()


def test_bad_args_check_wants_value_error():
    def no_checks(n, num_ranks):
        return [n // num_ranks] * num_ranks
    with pytest.raises(CheckFailed, match="expected ValueError"):
        linear.shard_sizes_bad_args(no_checks)


def test_check_modules_cannot_be_replaced_by_assignment():
    with pytest.raises(AttributeError, match="read-only"):
        linear.column_small = lambda f: None


def test_the_package_cannot_swap_a_check_module():
    # A test cell runs `from assignments.tp_linear import checks as check`, which reads the
    # package attribute.
    with pytest.raises(AttributeError, match="read-only"):
        assignments.tp_linear.checks = types.SimpleNamespace(column_small=lambda f: None)
    assert assignments.tp_linear.checks.__name__ == "assignments.tp_linear.checks"
