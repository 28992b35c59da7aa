"""tpsim.ranks.run_on_ranks: results, failures, deadlocks, and what reaches the caller."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from tpsim.ranks import RankError, run_on_ranks  # noqa: E402

pytestmark = pytest.mark.slow     # gloo ranks


def rank_and_sum(offset):
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t, torch.get_num_threads()


@pytest.mark.parametrize("p", (1, 2, 3))
def test_results_come_back_in_rank_order(p):
    results = run_on_ranks(rank_and_sum, p, 10)
    assert [r[:2] for r in results] == [(rank, p) for rank in range(p)]
    total = sum(range(p)) + 10 * p
    assert all(torch.equal(r[2], torch.tensor([float(total)])) for r in results)
    assert all(r[3] == 1 for r in results)  # one torch thread per rank
    assert not dist.is_initialized()  # the caller never joins a process group


def tensor_with_history():
    w = torch.ones(2, requires_grad=True)
    return {"y": [w * 3]}


def test_tensors_with_autograd_history_come_back_detached():
    (result,) = run_on_ranks(tensor_with_history, 1)
    y = result["y"][0]
    assert torch.equal(y, torch.full((2,), 3.0)) and not y.requires_grad


def raise_on_rank_one():
    if dist.get_rank() == 1:
        os.write(2, b"some C++ noise on stderr\n")
        raise ValueError("bad shard on purpose")
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 waits here for rank 1, which has failed: it must be killed
    return "unreachable"


def test_a_rank_exception_names_the_rank_and_its_traceback():
    with pytest.raises(RankError) as info:
        run_on_ranks(raise_on_rank_one, 2, timeout=60)
    err = info.value
    assert err.rank == 1 and err.exc_type == "ValueError"
    assert isinstance(err.original, ValueError)
    assert "rank 1 of 2 raised ValueError: bad shard on purpose" in str(err)
    assert "raise_on_rank_one" in str(err)  # the rank's traceback, down to the user's frame
    assert "some C++ noise" in str(err)  # the rank's stderr, shown because it failed
    assert mp.active_children() == []


def collective_on_rank_zero_only():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def test_a_deadlock_is_a_timeout_naming_the_stuck_ranks():
    with pytest.raises(TimeoutError) as info:
        run_on_ranks(collective_on_rank_zero_only, 3, timeout=3)
    assert "ranks [0] of 3 did not finish" in str(info.value)
    assert "deadlock" in str(info.value)
    assert mp.active_children() == []


def exit_abruptly():
    if dist.get_rank() == 1:
        os._exit(7)
    return 0


def test_a_rank_that_exits_without_returning_is_reported():
    with pytest.raises(RankError, match="exited"):
        run_on_ranks(exit_abruptly, 2, timeout=30)
    assert mp.active_children() == []


def noisy_but_fine():
    print(f"hello from {dist.get_rank()}")
    print("python stderr", file=sys.stderr)
    os.write(2, b"C-level stderr\n")
    return dist.get_rank()


def test_prints_are_replayed_and_stderr_stays_quiet_on_success(capfd):
    assert run_on_ranks(noisy_but_fine, 2) == [0, 1]
    out, err = capfd.readouterr()
    assert "[rank 0] hello from 0" in out and "[rank 1] hello from 1" in out
    assert err == ""


def unpicklable_result():
    return lambda: None


def test_an_unpicklable_result_is_a_rank_error():
    with pytest.raises(RankError, match="pickle"):
        run_on_ranks(unpicklable_result, 1)


@pytest.mark.parametrize("bad", (0, -1, 1.5))
def test_bad_world_size(bad):
    with pytest.raises(ValueError, match="world_size"):
        run_on_ranks(rank_and_sum, bad, 0)
