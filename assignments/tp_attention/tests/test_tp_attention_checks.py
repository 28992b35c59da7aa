"""tp_attention without nbgrader (fast, in-process, tpgrade.offline): the catalogue covers the
classic mistakes, each hidden check runs well under a second, and the reference functions (and
the grader's own dense reference) equal an independent dense transformer on a grid of head
counts and ranks. What every catalogued student loses is test_catalogue.py's (against
grades.json); the reference and the release stubs are run by test_reference_solutions.py; the
real nbgrader cycle by test_course_cycle.py."""
import itertools
import re
import time

import numpy as np
import pytest

import assignments
import tpsim
from assignments.tp_attention import examples as catalogue
from assignments.tp_attention.checks import cost
from tpgrade import _attention_dense, offline
from tpjudge.cells import read


@pytest.fixture(scope="module")
def notebook():
    return read(assignments.get("tp_attention").notebook)


@pytest.fixture(scope="module")
def ns(notebook):
    run = offline.run(notebook)
    assert run.failed == {} and run.errors == {}
    return run.namespace


def test_catalogue_covers_the_required_cases(notebook):
    graded = set(offline.run(notebook).graded)
    mistakes = {s.student for s in catalogue.MISTAKES}
    assert len(mistakes) >= 10 and len(catalogue.VALID) >= 3
    assert {"qkv_thirds", "kv_not_replicated", "heads_split_inside", "softmax_over_heads",
            "mask_after_softmax", "qkv_all_reduce", "output_bias_every_rank",
            "layer_extra_all_reduce", "layer_norm_on_partials", "wrong_scaling"} <= mistakes
    assert all(s.loses and s.loses <= graded for s in catalogue.MISTAKES)
    assert not any(s.loses for s in catalogue.VALID)
    assert len({s.student for s in catalogue.ALL}) == len(catalogue.ALL)
    # each mistake loses the test named for it
    named = {"qkv_thirds": "test_qkv_shard_blocks",
             "kv_not_replicated": "test_kv_ranges_replicated",
             "qkv_all_reduce": "test_attention_one_all_reduce",
             "output_bias_every_rank": "test_attention_bias_once",
             "layer_extra_all_reduce": "test_layer_two_all_reduces",
             "mask_after_softmax": "test_heads_causal", "wrong_scaling": "test_heads_scaling",
             "cost_no_head_check": "test_cost_bad_config"}
    for student, test in named.items():
        assert test in next(s for s in catalogue.MISTAKES if s.student == student).loses


def test_each_graded_check_is_fast(notebook, ns):
    """Every test cell (hidden ones included) of the reference runs well under a second."""
    marker = re.compile(r"^\s*### (BEGIN|END) HIDDEN TESTS\s*$", re.M)
    slowest = 0.0
    for cell in notebook.cells:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade"):
            start = time.perf_counter()
            exec(marker.sub("", cell.source), dict(ns))  # noqa: S102 - the course's own cell
            slowest = max(slowest, time.perf_counter() - start)
    assert slowest < 1.0, f"slowest check {slowest:.2f} s"


# --------------------------------------------------------------------------- independent dense


def _dense_attention(x, Wq, Wk, Wv, Wo, H, G, causal, bo=None):
    d = Wq.shape[0] // H
    seq = x.shape[-2]

    def heads(W, n):
        return (x @ W.T).reshape(x.shape[:-1] + (n, d)).swapaxes(-2, -3)
    q = heads(Wq, H)
    k, v = (np.repeat(heads(W, G), H // G, axis=-3) for W in (Wk, Wv))   # head j reads j // g
    s = q @ k.swapaxes(-1, -2) / np.sqrt(d)
    if causal:
        s = np.where(np.triu(np.ones((seq, seq), bool), 1), -np.inf, s)
    w = np.exp(s - s.max(-1, keepdims=True))
    o = (w / w.sum(-1, keepdims=True)) @ v
    y = o.swapaxes(-2, -3).reshape(x.shape[:-1] + (H * d,)) @ Wo.T
    return y if bo is None else y + bo


def _ln(t, w, b, eps=1e-5):
    return (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("H, G, p", [(H, G, p) for H, G in [(1, 1), (4, 4), (4, 2), (6, 3),
                                                            (8, 1), (12, 4)]
                                     for p in (1, 2, 3, 4, 5, 8)])
def test_reference_attention_equals_dense_with_one_all_reduce(ns, H, G, p):
    rng = np.random.default_rng(H * 100 + G * 10 + p)
    d, hidden = 2, 6
    x = rng.standard_normal((2, 4, hidden))
    Wq, Wk, Wv = (rng.standard_normal((n * d, hidden)) / 3 for n in (H, G, G))
    Wo, bo = rng.standard_normal((5, H * d)) / 3, rng.standard_normal(5)
    for causal in (False, True):
        want = _dense_attention(x, Wq, Wk, Wv, Wo, H, G, causal, bo)
        with tpsim.recording() as calls:
            got = ns["attention_tp"](x, Wq, Wk, Wv, Wo, H, p, num_kv_heads=G, bo=bo, causal=causal)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert [c.op for c in calls] == ["all_reduce"] and len(calls[0].inputs) == p
        # the grader's dense reference agrees with this independent one
        graders, _ = _attention_dense.attention(x, Wq, Wk, Wv, Wo, H, G, causal, bo)
        np.testing.assert_allclose(graders, want, rtol=1e-12, atol=1e-12)
    # the KV heads a rank holds are those its query heads read, and its fused shard has them
    ranges = ns["kv_head_ranges"](H, G, p)
    W_qkv = np.concatenate([Wq, Wk, Wv])
    for r, ((ka, kz), heads) in enumerate(zip(ranges, ns["shard_slices"](H, p))):
        assert set(range(ka, kz)) == {j // (H // G) for j in range(heads.start, heads.stop)}
        shard = ns["qkv_shard"](W_qkv, H, G, p, r)
        want_rows = np.concatenate([Wq[heads.start * d:heads.stop * d], Wk[ka * d:kz * d],
                                    Wv[ka * d:kz * d]])
        assert np.array_equal(shard, want_rows)


@pytest.mark.parametrize("H, G, ffn, p", [(2, 2, 6, 1), (2, 1, 6, 2), (4, 2, 5, 3), (3, 3, 7, 4),
                                          (4, 4, 8, 8)])
def test_reference_layer_equals_dense_with_two_all_reduces(ns, H, G, ffn, p):
    rng = np.random.default_rng(H * 1000 + ffn * 10 + p)
    hidden, d = 8, 2
    x = rng.standard_normal((3, 5, hidden))
    shapes = {"ln1_w": (hidden,), "ln1_b": (hidden,), "Wq": (H * d, hidden),
              "Wk": (G * d, hidden), "Wv": (G * d, hidden), "Wo": (hidden, H * d), "bo": (hidden,),
              "ln2_w": (hidden,), "ln2_b": (hidden,), "W1": (ffn, hidden), "b1": (ffn,),
              "W2": (hidden, ffn), "b2": (hidden,)}
    P = {key: rng.standard_normal(shape) / 3 for key, shape in shapes.items()}
    P["ln1_w"], P["ln2_w"] = P["ln1_w"] + 1, P["ln2_w"] + 1
    h = x + _dense_attention(_ln(x, P["ln1_w"], P["ln1_b"]), P["Wq"], P["Wk"], P["Wv"], P["Wo"],
                             H, G, True, P["bo"])
    want = h + np.tanh(_ln(h, P["ln2_w"], P["ln2_b"]) @ P["W1"].T + P["b1"]) @ P["W2"].T + P["b2"]
    with tpsim.recording() as calls:
        got = ns["transformer_layer_tp"](x, P, H, p, num_kv_heads=G, causal=True,
                                         activation=np.tanh)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert [c.op for c in calls] == ["all_reduce", "all_reduce"]


def test_reference_cost_reproduces_the_worked_example_and_rejects_the_seed_config(ns):
    tp_cost = ns["tp_cost"]
    example = cost.config(kv_heads=4)
    got = tp_cost(example)
    assert got["allreduces"] == 4 and got["bytes_per_rank"] == 12_582_912
    assert got["flops_per_rank"] == 12_348_030_976
    assert got["comm_to_compute"] == pytest.approx(1.019, abs=1e-3)
    for tp, backward, kv_heads in itertools.product((1, 2, 4, 8), (False, True), (1, 2, 4, 16)):
        config = cost.config(tp=tp, backward=backward, kv_heads=kv_heads)
        assert tp_cost(config) == pytest.approx(cost.expected(config), rel=1e-12)
    with pytest.raises(ValueError):
        tp_cost(cost.config(hidden=4096, heads=12, tp=4))
    # the notebook's claims about a 175B-class model on NVLink and on a network link
    big = cost.config(layers=96, hidden=12288, heads=96, ffn=49152, seq=2048, batch=1, tp=8,
                      backward=True, flops_per_s=989e12)
    for link, ratio in ((450e9, 0.27), (50e9, 2.4)):
        got = tp_cost({**big, "link_bytes_per_s": link})["comm_to_compute"]
        assert got == pytest.approx(ratio, rel=0.02)
