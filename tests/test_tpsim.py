"""tpsim: the simulated collectives students import, and their call log."""
import numpy as np
import pytest

import tpsim
from tpsim import all_gather, all_reduce


def test_all_gather_concatenates_along_the_last_axis_by_default():
    a, b = np.ones((2, 1)), np.zeros((2, 2))
    np.testing.assert_array_equal(all_gather([a, b]), np.concatenate([a, b], axis=-1))
    np.testing.assert_array_equal(all_gather([a.T, b.T], axis=0), np.concatenate([a.T, b.T]))


def test_all_gather_accepts_empty_shards_and_keeps_dtype():
    parts = [np.ones((3, 2), np.float32), np.ones((3, 0), np.float32)]
    out = all_gather(parts)
    assert out.shape == (3, 2) and out.dtype == np.float32


def test_all_reduce_sums_keeps_dtype_and_does_not_alias_inputs():
    parts = [np.full(3, 1.0, np.float32), np.full(3, 2.0, np.float32)]
    out = all_reduce(parts)
    np.testing.assert_array_equal(out, [3, 3, 3])
    assert out.dtype == np.float32
    single = [np.ones(2)]
    assert all_reduce(single) is not single[0]


@pytest.mark.parametrize("call, message", [
    (lambda: all_reduce(np.ones(3)), "list"),
    (lambda: all_reduce([]), "at least one rank"),
    (lambda: all_reduce([np.ones(2), np.ones(3)]), "rank 1 has shape (3,)"),
    (lambda: all_reduce([np.ones(2), "x"]), "rank 1 passed str"),
    (lambda: all_gather([np.ones((2, 1)), np.ones((3, 1))]), "differ only along axis"),
    (lambda: all_gather([np.ones(2), np.ones((2, 1))]), "number"),
    (lambda: all_gather([np.ones(2)], axis=1), "out of range"),
])
def test_bad_inputs_raise_value_error_saying_what_is_wrong(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_recording_keeps_copies_of_each_ranks_input():
    a, b = np.ones(2), np.zeros(2)
    with tpsim.recording() as calls:
        all_reduce([a, b])
        tpsim.all_gather([a, b])            # either import style is recorded
    a[:] = 7                                # a later in-place change does not rewrite history
    assert [c.op for c in calls] == ["all_reduce", "all_gather"]
    np.testing.assert_array_equal(calls[0].inputs[0], [1, 1])
    assert calls[1].axis == -1
    assert tpsim.log[-1] is calls[1]


def test_nested_recordings_both_see_inner_calls():
    with tpsim.recording() as outer:
        all_reduce([np.ones(1)])
        with tpsim.recording() as inner:
            all_reduce([np.ones(1)])
    assert len(outer) == 2 and len(inner) == 1
    assert tpsim._open_recordings == []
