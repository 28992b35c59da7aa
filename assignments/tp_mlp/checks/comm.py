"""Checks for the communication-counting exercise (tp_mlp notebook).

Conventions (stated in the notebook): Megatron-style layer = attention block + MLP block,
each with one column-parallel and one row-parallel part. Forward: one all-reduce per block
(operator g) -> 2 per layer; backward adds one per block (operator f) -> 4 for forward +
backward; with tp == 1 there is nothing to reduce -> 0. A ring all-reduce of N elements over
p ranks makes every rank send 2 (p - 1) / p * N elements.
"""
from __future__ import annotations

from tpgrade._harness import check, make_read_only
from tpgrade._layers import expect_bad_args
from tpgrade.verdict import expect_number as _expect_number


@check
def allreduces_forward(allreduces_per_layer):
    for tp in (2, 4, 8):
        _expect_number(allreduces_per_layer(tp), 2, f"allreduces_per_layer({tp})",
                       "one all-reduce after attention's row-parallel output projection and one "
                       "after the MLP's row-parallel W2 (the heads and hidden size do not matter)")


@check
def allreduces_backward_and_tp1(allreduces_per_layer):
    for tp in (2, 4, 8):
        _expect_number(allreduces_per_layer(tp, backward=True), 4,
                       f"allreduces_per_layer({tp}, backward=True)",
                       "forward + backward: the backward pass all-reduces the input gradient of "
                       "each column-parallel block (Megatron's f), so 2 + 2")
    for backward in (False, True):
        _expect_number(allreduces_per_layer(1, backward=backward), 0,
                       f"allreduces_per_layer(1, backward={backward})",
                       "with a single rank there is nothing to reduce")


@check
def ring_bytes(ring_allreduce_bytes):
    for n, p, nbytes, want in [(1000, 4, 2, 3000), (1024, 2, 4, 4096), (600, 3, 2, 1600)]:
        _expect_number(ring_allreduce_bytes(n, p, nbytes), want,
                       f"ring_allreduce_bytes({n}, {p}, {nbytes})",
                       "each rank sends 2 (p - 1) / p * N elements (reduce-scatter, then "
                       "all-gather), times bytes_per_elem")


@check
def ring_bytes_edges(ring_allreduce_bytes):
    for n, p, nbytes, want in [(1000, 1, 2, 0), (0, 4, 2, 0), (10, 3, 4, 2 * 2 / 3 * 10 * 4),
                               (2 ** 24, 8, 2, 2 * 7 / 8 * 2 ** 24 * 2)]:
        _expect_number(ring_allreduce_bytes(n, p, nbytes), want,
                       f"ring_allreduce_bytes({n}, {p}, {nbytes})")
    _expect_number(ring_allreduce_bytes(1000, 4), 3000, "ring_allreduce_bytes(1000, 4)",
                   "bytes_per_elem defaults to 2 (bf16 / fp16)")


@check
def layer_bytes(layer_allreduce_bytes):
    b, s, h = 8, 2048, 4096
    n = b * s * h
    for tp, backward, count in [(8, False, 2), (8, True, 4), (2, False, 2), (1, False, 0),
                                (1, True, 0)]:
        want = count * 2 * (tp - 1) / tp * n * 2
        _expect_number(layer_allreduce_bytes(b, s, h, tp, backward=backward), want,
                       f"layer_allreduce_bytes({b}, {s}, {h}, tp={tp}, backward={backward})",
                       "allreduces_per_layer(tp, backward) all-reduces, each of the "
                       "(batch, seq, hidden) activation, each costing ring_allreduce_bytes")
    want = 2 * 2 * 3 / 4 * (2 * 16 * 64) * 4
    _expect_number(layer_allreduce_bytes(2, 16, 64, 4, bytes_per_elem=4), want,
                   "layer_allreduce_bytes(2, 16, 64, 4, bytes_per_elem=4)")


@check
def comm_bad_args(allreduces_per_layer, ring_allreduce_bytes, layer_allreduce_bytes):
    cases = [(f"({tp!r})", (tp,), {}) for tp in (0, -1, 2.5, "2")]
    expect_bad_args(allreduces_per_layer, "allreduces_per_layer", cases)
    expect_bad_args(ring_allreduce_bytes, "ring_allreduce_bytes", [
        ("(1000, 0, 2)", (1000, 0, 2), {}), ("(1000, 2.5, 2)", (1000, 2.5, 2), {}),
        ("(-1, 4, 2)", (-1, 4, 2), {}), ("(1000, 4, 0)", (1000, 4, 0), {}),
    ])
    expect_bad_args(layer_allreduce_bytes, "layer_allreduce_bytes", [
        ("(8, 16, 64, tp=0)", (8, 16, 64, 0), {}), ("(8, -16, 64, tp=2)", (8, -16, 64, 2), {}),
    ])


make_read_only(__name__)
