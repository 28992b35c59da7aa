"""What comes back from the student's process is checked whole before any comparison reads it
(tpgrade.replies, in tpgrade._torch_trusted.run_on_ranks): every rank check of every torch
notebook (the registry's torch assignments), fed a reply of the wrong shape (no list, an empty
list, fewer or more ranks' results, the wrong number of values, values of the wrong kind),
fails with a message saying what came back, never passes. In-process and fast: the student's process is a stand-in whose
`run_on_ranks` returns the forged reply, the route the judge's replies take (tpjudge.student).
That the reference's genuine replies pass the same validation is tests/test_catalogue.py's
(every catalogue's reference at full marks through the judge)."""
from __future__ import annotations

import importlib
import inspect
import re

import numpy as np
import pytest

pytest.importorskip("torch")

import assignments  # noqa: E402
from tpgrade import replies  # noqa: E402
from tpgrade.verdict import CheckFailed  # noqa: E402

NOTEBOOKS = [a.name for a in assignments.discover() if a.kind == "torch"]


class _StudentProcess:
    """The judge's end of a student's process, as a check sees it: run_on_ranks sends back
    whatever `forge(world_size)` makes."""

    def __init__(self, forge):
        self.forge, self.calls = forge, 0

    def run_on_ranks(self, fn, world_size, *args, **kwargs):
        self.calls += 1
        return self.forge(world_size)


class _StandIn:
    """A student's function or class under the judge: a stand-in for code in that process."""

    def __init__(self, process):
        self.__tpjudge_remote__ = process


def _run(check, forge):
    process = _StudentProcess(forge)
    stand_ins = [_StandIn(process) for _ in inspect.signature(check).parameters]
    try:
        check(*stand_ins)
    except CheckFailed as exc:
        return process.calls, str(exc)
    except Exception:  # noqa: BLE001 - a check that calls the student's code directly
        return process.calls, None
    return process.calls, ""


def _rank_checks():
    """(notebook, name, check) for every public check that runs code on ranks."""
    found = []
    for notebook in NOTEBOOKS:
        module = importlib.import_module(f"assignments.{notebook}.checks")
        for name, check in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(check) or \
                    check.__module__ != module.__name__:
                continue
            if _run(check, lambda size: None)[0]:
                found.append((notebook, name, check))
    return found


RANK_CHECKS = _rank_checks()

# (forged reply of a world of `size`, what the message must say)
FORGED = {
    "nothing": (lambda size: None, r"the ranks' results came back as nothing"),
    "empty list": (lambda size: [], r"rank 0 of \d returned nothing"),
    "one rank short": (lambda size: [[]] * (size - 1), r"rank \d of \d returned nothing"),
    "one rank more": (lambda size: [[]] * (size + 1), r"\d results came back for \d ranks"),
    "empty results": (lambda size: [[]] * size, r"rank 0 of \d"),
    "numbers": (lambda size: [1] * size, r"rank 0 of \d"),
    "dicts": (lambda size: [{}] * size, r"rank 0 of \d"),
    "a string": (lambda size: ["zeros"] * size, r"rank 0 of \d"),
    "nested": (lambda size: [[[np.zeros(2)]] * 5] * size, r"rank 0 of \d"),
}


def test_every_rank_check_of_the_torch_notebooks_is_found():
    assert len(NOTEBOOKS) >= 3
    for notebook in NOTEBOOKS:
        names = {name for nb, name, _ in RANK_CHECKS if nb == notebook}
        assert len(names) >= 6, (notebook, sorted(names))
    names = {name for _, name, _ in RANK_CHECKS}
    assert {"mappings_f_and_g", "errors_master_weight", "embedding_bad_ids", "ce_backward",
            "projection_shards", "overhead_result"} <= names
    assert len(RANK_CHECKS) >= 25


@pytest.mark.parametrize("forged", FORGED, ids=str)
@pytest.mark.parametrize("notebook, name, check", RANK_CHECKS,
                         ids=[f"{nb}.{name}" for nb, name, _ in RANK_CHECKS])
def test_a_reply_of_the_wrong_shape_fails_the_check_and_says_so(notebook, name, check, forged):
    forge, says = FORGED[forged]
    calls, message = _run(check, forge)
    assert calls == 1 and message, (forged, message)
    assert re.search(says, message), message


def test_the_messages_say_what_came_back():
    reply = replies.ranks(2, replies.tensors("x.grad", "the output"))
    value = np.ones(3, dtype=np.float32)

    def message(got):
        with pytest.raises(CheckFailed) as info:
            reply.check(got)
        return str(info.value)

    assert message([(value, value)]) == ("rank 1 of 2 returned nothing: 1 result came back "
                                         "for 2 ranks")
    assert message([]).startswith("rank 0 of 2 returned nothing")
    assert message(None).startswith("the ranks' results came back as nothing")
    assert message([(value,), (value, value)]) == ("rank 0 of 2 returned 1 values, expected 2: "
                                                   "x.grad, the output")
    assert message([(value, [1.0]), (value, value)]) == (
        "rank 0 of 2: the output: came back as a list, not a tensor's values")
    assert message([(value, "a meta tensor"), (value, value)]) == (
        "rank 0 of 2: the output: is a meta tensor, expected a torch.Tensor")
    got = reply.check([(value, None), [value, value]])
    assert got[0][1] is None and got[1][0].dtype == np.float64      # None is for the verdict


def test_outcomes_of_calls_that_should_raise():
    reply = replies.ranks(1, replies.outcomes(2))
    assert reply.check([[None, ("ValueError", "bad")]]) == [[None, ("ValueError", "bad")]]
    for forged, says in (([[None]], "holds 1 entries, expected 2"),
                         ([[None, ("ValueError", 3)]], "its message: came back as"),
                         ([[None, ("ValueError",)]], "returned 1 values, expected 2")):
        with pytest.raises(CheckFailed, match=says):
            reply.check(forged)
