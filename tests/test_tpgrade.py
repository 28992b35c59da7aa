"""tpgrade: the checks catch the classic mistakes, say so in words, and are not fooled by a
notebook that rebinds numpy helpers or tpsim."""
import types
import nbformat
import numpy as np
import pytest

import tpsim
import tpgrade.comm
import tpgrade.linear
import tpgrade.mlp
from tpcourse import REPO
from tpgrade import offline
from tpgrade.compare import CheckFailed


def _reference(assignment):
    nb = nbformat.read(str(REPO / "source" / assignment / f"{assignment}.ipynb"), as_version=4)
    return offline.run(nb).namespace


@pytest.fixture(scope="module")
def linear_ns():
    return _reference("tp_linear")


@pytest.fixture(scope="module")
def mlp_ns():
    return _reference("tp_mlp")


def test_check_failures_are_assertion_errors():
    assert issubclass(CheckFailed, AssertionError)


def test_local_shard_is_named(linear_ns):
    def local_shard(x, W, num_ranks, b=None):
        return x @ W[: W.shape[0] // num_ranks].T
    with pytest.raises(CheckFailed, match=r"expected shape \(3, 6\), got \(3, 3\): only the local shard"):
        tpgrade.linear.column_small(local_shard)


def test_bias_on_every_rank_is_named(linear_ns):
    def every_rank(x, W, num_ranks, b=None):
        parts = [x[..., s] @ W[:, s].T + b for s in np.array_split(np.arange(W.shape[1]), num_ranks)]
        return tpsim.all_reduce(parts)
    with pytest.raises(CheckFailed, match="bias was added 2 times"):
        tpgrade.linear.row_bias_once(every_rank)


def test_dense_result_through_a_collective_fails():
    def dressed(x, W, num_ranks, b=None):
        y = x @ W.T
        return tpsim.all_reduce([y] + [np.zeros_like(y)] * (num_ranks - 1))
    tpgrade.linear.row_matches_dense(dressed)            # the numbers are right ...
    with pytest.raises(CheckFailed, match="rank 0's input to all_reduce"):
        tpgrade.linear.row_reduce_inputs(dressed)        # ... but it is not tensor parallel


def test_rebinding_numpy_helpers_does_not_change_verdicts(monkeypatch):
    monkeypatch.setattr(np, "allclose", lambda *a, **k: True)
    monkeypatch.setattr(np, "asarray", lambda a, *args, **kw: a)
    monkeypatch.setattr(np.testing, "assert_allclose", lambda *a, **k: None)
    with pytest.raises(CheckFailed):
        tpgrade.linear.column_matches_dense(lambda x, W, p, b=None: tpsim.all_gather([x @ W.T * 2]))


def test_a_patched_tpsim_is_restored_before_checking():
    genuine, code = tpsim.all_reduce, tpsim.all_reduce.__code__
    try:
        tpsim.all_reduce = lambda per_rank: sum(per_rank)                  # a fake: records nothing
        tpsim.all_gather.__code__ = (lambda per_rank, axis=-1: None).__code__
        tpgrade.linear.row_one_all_reduce(_row_via_module)   # passes: genuine one is back
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
        tpgrade.linear.row_one_all_reduce(own)


def test_shell_that_swallows_exceptions_is_reset():
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    try:
        shell.set_custom_exc((Exception,), lambda *args, **kwargs: None)
        shell.user_ns["wrong"] = lambda x, W, p, b=None: x
        result = shell.run_cell("import tpgrade.linear as check\ncheck.column_small(wrong)")
        assert isinstance(result.error_in_exec, CheckFailed)
        assert shell.custom_exceptions == ()
    finally:
        InteractiveShell.clear_instance()


def test_float32_upcast_is_named(mlp_ns):
    mlp = mlp_ns["mlp_tp"]
    def upcast(x, W1, W2, p, b1=None, b2=None, activation=mlp_ns["relu"]):
        return mlp(x.astype(np.float64), W1.astype(np.float64), W2.astype(np.float64), p,
                   b1, b2, activation)
    with pytest.raises(CheckFailed, match="float32 but the output is float64"):
        tpgrade.mlp.mlp_dtype(upcast)


def test_activation_after_reduce_is_named(mlp_ns):
    def late(x, W1, W2, p, b1=None, b2=None, activation=mlp_ns["relu"]):
        return activation(mlp_ns["mlp_tp"](x, W1, W2, p, b1, None, activation=lambda h: h))
    with pytest.raises(CheckFailed, match="activation was applied after the all-reduce"):
        tpgrade.mlp.mlp_small(late)


def test_comm_checks_catch_a_forgotten_tp1_case():
    with pytest.raises(CheckFailed, match="nothing to reduce"):
        tpgrade.comm.allreduces_backward_and_tp1(lambda tp, backward=False: 4 if backward else 2)


def test_bad_args_check_wants_value_error():
    def no_checks(n, num_ranks):
        return [n // num_ranks] * num_ranks
    with pytest.raises(CheckFailed, match="expected ValueError"):
        tpgrade.linear.shard_sizes_bad_args(no_checks)


def test_check_modules_cannot_be_replaced_by_assignment():
    with pytest.raises(AttributeError, match="read-only"):
        tpgrade.linear.column_small = lambda f: None


def test_the_package_cannot_swap_a_check_module():
    # A test cell runs `import tpgrade.linear as check`, which reads the package attribute.
    with pytest.raises(AttributeError, match="read-only"):
        tpgrade.linear = types.SimpleNamespace(column_small=lambda f: None)
    assert tpgrade.linear.__name__ == "tpgrade.linear"
