"""tpsim: the simulated collectives students import, and their call log."""
import numpy as np
import pytest

import tpsim
from tpsim import all_gather, all_reduce, reduce_scatter


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


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
def test_all_gather_concatenates_along_any_axis_it_is_given(axis):
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal(tuple(3 + r if d == axis % 3 else 2 for d in range(3)))
             for r in range(3)]
    with tpsim.recording() as calls:
        out = all_gather(parts, axis=axis)
    np.testing.assert_array_equal(out, np.concatenate(parts, axis=axis))
    assert calls[0].axis == axis and calls[0].reduce_op is None


def test_all_reduce_max_takes_the_elementwise_maximum_and_is_recorded():
    parts = [np.array([1.0, 5.0, -2.0], np.float32), np.array([3.0, 2.0, -7.0], np.float32)]
    with tpsim.recording() as calls:
        out = all_reduce(parts, op="max")
        all_reduce(parts)
    np.testing.assert_array_equal(out, [3, 5, -2])
    assert out.dtype == np.float32
    assert [(c.op, c.reduce_op) for c in calls] == [("all_reduce", "max"), ("all_reduce", "sum")]


@pytest.mark.parametrize("n, p, axis", [(6, 3, 0), (7, 3, 0), (2, 4, 0), (5, 2, -1), (5, 2, 1),
                                        (0, 2, 0), (4, 1, -2)])
def test_reduce_scatter_sums_then_gives_rank_r_its_balanced_piece(n, p, axis):
    rng = np.random.default_rng(n * 10 + p)
    shape = [3, 3]
    shape[axis] = n
    parts = [rng.standard_normal(shape) for _ in range(p)]
    with tpsim.recording() as calls:
        out = reduce_scatter(parts, axis=axis)
    total = sum(parts)
    want = np.array_split(total, p, axis=axis)       # the first n % p ranks get one more
    assert isinstance(out, list) and len(out) == p
    for got, expected in zip(out, want):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    sizes = [piece.shape[axis] for piece in out]
    assert sizes == [n // p + (r < n % p) for r in range(p)]
    (call,) = calls
    assert (call.op, call.axis, call.reduce_op) == ("reduce_scatter", axis, "sum")
    assert len(call.inputs) == p and all(np.array_equal(a, b) for a, b in zip(call.inputs, parts))


def test_reduce_scatter_keeps_dtype_defaults_to_the_last_axis_and_copies_inputs():
    parts = [np.ones((2, 4), np.float32), np.full((2, 4), 2.0, np.float32)]
    with tpsim.recording() as calls:
        out = reduce_scatter(parts)
    assert [o.shape for o in out] == [(2, 2), (2, 2)] and out[0].dtype == np.float32
    parts[0][:] = 9                                   # history is not rewritten
    np.testing.assert_array_equal(calls[0].inputs[0], np.ones((2, 4)))
    assert calls[0].axis == -1


def test_collectives_tuple_names_every_collective_and_each_is_exported():
    assert tpsim.COLLECTIVES == ("all_gather", "all_reduce", "reduce_scatter")
    assert all(name in tpsim.__all__ and callable(getattr(tpsim, name))
               for name in tpsim.COLLECTIVES)


@pytest.mark.parametrize("call, message", [
    (lambda: all_reduce(np.ones(3)), "list"),
    (lambda: all_reduce([]), "at least one rank"),
    (lambda: all_reduce([np.ones(2), np.ones(3)]), "rank 1 has shape (3,)"),
    (lambda: all_reduce([np.ones(2), "x"]), "rank 1 passed str"),
    (lambda: all_gather([np.ones((2, 1)), np.ones((3, 1))]), "differ only along axis"),
    (lambda: all_gather([np.ones(2), np.ones((2, 1))]), "number"),
    (lambda: all_gather([np.ones(2)], axis=1), "out of range"),
    (lambda: all_gather([np.ones(2)], axis=True), "out of range"),
    (lambda: all_reduce([np.ones(2)], op="min"), "op must be one of"),
    (lambda: all_reduce([np.ones(2)], op=None), "op must be one of"),
    (lambda: reduce_scatter(np.ones((2, 2))), "list"),
    (lambda: reduce_scatter([]), "at least one rank"),
    (lambda: reduce_scatter([np.ones((2, 2)), np.ones((3, 2))]), "rank 1 has shape (3, 2)"),
    (lambda: reduce_scatter([np.ones((2, 2))], axis=2), "out of range"),
    (lambda: reduce_scatter([np.ones((2, 2))], axis=0.0), "out of range"),
    (lambda: reduce_scatter([np.float64(1.0)]), "0-d"),
    (lambda: reduce_scatter([np.ones(2), [1.0, 2.0]]), "rank 1 passed list"),
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
