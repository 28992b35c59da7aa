"""tp_mlp's checks: they name the classic mistakes of the MLP and of the communication count."""
import numpy as np
import pytest

import assignments
from assignments.tp_mlp.checks import comm, mlp as mlp_checks
from tpgrade import offline
from tpgrade.verdict import CheckFailed
from tpjudge.cells import read


@pytest.fixture(scope="module")
def mlp_ns():
    return offline.run(read(assignments.get("tp_mlp").notebook)).namespace


def test_float32_upcast_is_named(mlp_ns):
    mlp = mlp_ns["mlp_tp"]
    def upcast(x, W1, W2, p, b1=None, b2=None, activation=mlp_ns["relu"]):
        return mlp(x.astype(np.float64), W1.astype(np.float64), W2.astype(np.float64), p,
                   b1, b2, activation)
    with pytest.raises(CheckFailed, match="float32 but the output is float64"):
        mlp_checks.mlp_dtype(upcast)


def test_activation_after_reduce_is_named(mlp_ns):
    def late(x, W1, W2, p, b1=None, b2=None, activation=mlp_ns["relu"]):
        return activation(mlp_ns["mlp_tp"](x, W1, W2, p, b1, None, activation=lambda h: h))
    with pytest.raises(CheckFailed, match="activation was applied after the all-reduce"):
        mlp_checks.mlp_small(late)


def test_comm_checks_catch_a_forgotten_tp1_case():
    with pytest.raises(CheckFailed, match="nothing to reduce"):
        comm.allreduces_backward_and_tp1(lambda tp, backward=False: 4 if backward else 2)
