"""tp_torch_attention without nbgrader or torchrun (fast): the dense float64 references against
torch's own autograd, the notebook's cells and checks (the mistakes named, in-process and
through the judge; what the grade table says of every student), the gpu_runner's plan and
timing verdicts on synthetic reports, and the gpu_runner's units on forked gloo ranks
(gpu_runner.forked): the reference at full marks at world sizes 1-4 with its timing, each
timing mistake losing its check. Every student's grades are test_catalogue.py's; the nbgrader
cycle is in test_torch_notebooks.py, the torchrun path in test_gpu_runner_slow.py."""
from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import assignments  # noqa: E402
from assignments.tp_torch_attention import checks as check  # noqa: E402
from assignments.tp_torch_attention import dense as attention_dense  # noqa: E402
from assignments.tp_torch_attention import examples as cat  # noqa: E402
from assignments.tp_torch_attention.gpu import data  # noqa: E402
from gpu_runner.forked import lost  # noqa: E402
from gpu_runner.judge import judge  # noqa: E402
from gpu_runner.plan import Unit, make_plan, planned_checks  # noqa: E402
from tpcourse.catalogue import gpu_report, recorded  # noqa: E402
from tpgrade import offline  # noqa: E402
from tpjudge import local  # noqa: E402
from tpjudge.cells import gpu_cells, grade_id, graded_tests, read, solution_ids  # noqa: E402

F = torch.nn.functional
A = "tp_torch_attention"
SOURCE = read(cat.SOURCE)


def _graded_path(nb):
    """The notebook without its ungraded demo cells (the try-it and plot cells)."""
    nb = nb.copy()
    nb.cells = [c for c in nb.cells if c.cell_type != "code" or grade_id(c)]
    return nb


# -- the dense references ---------------------------------------------------------------------------
def _torch_layer(x, P, H, G, causal, with_mlp):
    d = x.shape[-1] // H
    heads = (lambda t, n: t.unflatten(-1, (n, d)).transpose(-2, -3))
    a = F.layer_norm(x, (x.shape[-1],), P["ln1_w"], P["ln1_b"]) if with_mlp else x
    q, k, v = heads(a @ P["wq"].T, H), heads(a @ P["wk"].T, G), heads(a @ P["wv"].T, G)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    y = o.transpose(-2, -3).flatten(-2) @ P["wo"].T + P["bo"]
    if not with_mlp:
        return y
    h = x + y
    a2 = F.layer_norm(h, (h.shape[-1],), P["ln2_w"], P["ln2_b"])
    return h + F.gelu(a2 @ P["w1"].T + P["b1"]) @ P["w2"].T + P["b2"]


@pytest.mark.parametrize("H, G, causal", [(6, 3, False), (6, 2, True), (4, 1, True), (3, 3, False)])
def test_the_dense_references_equal_torch_autograd(H, G, causal):
    P, x, g = attention_dense.weights(7, (2, 5, 12), H, G, ffn=10)
    T = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in P.items()}
    for with_mlp in (False, True):
        tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        (_torch_layer(tx, T, H, G, causal, with_mlp) * torch.tensor(g, dtype=torch.float64)).sum() \
            .backward()
        ref = (attention_dense.layer(x, P, H, G, causal, 1e-5, g) if with_mlp else
               attention_dense.attention(x, P["wq"], P["wk"], P["wv"], P["wo"], H, G, causal,
                                         P["bo"], g))
        attn = ref.attention if with_mlp else ref
        assert np.allclose(ref.dx, tx.grad.numpy(), atol=1e-12)
        assert np.allclose(attn.dwq, T["wq"].grad.numpy(), atol=1e-12)
        assert np.allclose(attention_dense.dense_wk(attn, "k"), T["wk"].grad.numpy(), atol=1e-12)
        assert np.allclose(attention_dense.dense_wk(attn, "v"), T["wv"].grad.numpy(), atol=1e-12)
        if with_mlp:
            for key, value in ref.params.items():
                assert np.allclose(value, T[key].grad.numpy(), atol=1e-12), key
        for t in T.values():
            t.grad = None


def test_the_ranks_shares_add_up_to_the_dense_gradients():
    """Replicated KV heads: each rank's share of a KV head's rows (its query heads') sums over
    the replicas to the dense gradient; the ranks' own-heads input gradients sum to dL/dx."""
    P, x, g = attention_dense.weights(11, (2, 5, 12), 6, 2)
    ref = attention_dense.attention(x, P["wq"], P["wk"], P["wv"], P["wo"], 6, 2, True, P["bo"], g)
    d, p = 2, 4
    dk = np.zeros((2 * d, 12))
    dx = 0
    for rank in range(p):
        rows = ref.qkv_rows(rank, p)
        (a, z), (ka, kz) = attention_dense.head_ranges(6, 2, rank, p)
        assert rows.shape == ((z - a + 2 * (kz - ka)) * d, 12)
        assert np.allclose(rows[:(z - a) * d], ref.dwq[a * d:z * d])
        dk[ka * d:kz * d] += rows[(z - a) * d:(z - a + kz - ka) * d]
        dx = dx + attention_dense.own_heads(x, P, 6, 2, rank, p, True, g).dx
    # rank 1 reads both KV heads
    assert attention_dense.head_ranges(6, 2, 1, 4) == ((2, 4), (0, 2))
    assert np.allclose(dk, attention_dense.dense_wk(ref, "k")) and np.allclose(dx, ref.dx)


# -- the notebook -----------------------------------------------------------------------------------
def test_the_notebooks_cells():
    assert gpu_cells(SOURCE) == cat.GPU_CELLS
    assert solution_ids(SOURCE) == list(cat.SOLUTION_IDS)
    tests = graded_tests(SOURCE)
    assert len(tests) >= 10 and set(tests.values()) == {1.0}
    called = []
    for cell in SOURCE.cells:
        if grade_id(cell) in tests:
            lines = [ln for ln in cell.source.splitlines()
                     if ln.strip() and not ln.startswith("#")]
            assert lines[0] == f"from assignments.{A} import checks as check", grade_id(cell)
            assert len(lines) == 2 and re.fullmatch(r"check\.\w+\([\w, ]*\)", lines[1])
            called.append(lines[1].split("(")[0][len("check."):])
        elif str(grade_id(cell)).startswith("gpu_"):
            meta = cell.metadata.nbgrader
            assert cell.cell_type == "markdown" and meta.task and meta.locked and not meta.grade
    public = [name for name, f in vars(check).items() if inspect.isfunction(f)
              and not name.startswith("_") and f.__module__ == check.__name__ and name != "model"]
    assert sorted(called) == sorted(public)
    setup = next(c.source for c in SOURCE.cells if grade_id(c) == "setup")
    assert re.search(rf"^import assignments\.{A}\.checks\b", setup, re.M)


_NAMED = {"tattn_bias_every_rank": ("test_attention_forward", "bias added on every rank"),
          "tattn_kv_not_replicated": ("test_head_ranges", "replicated on every rank"),
          "tattn_head_split": ("test_projection_shards", "a head is cut between ranks"),
          "tattn_no_f": ("test_attention_backward", "copy_to_tp_region (f)"),
          "tattn_model_half_bytes": ("test_model_example", "2 (tp - 1) / tp")}


@pytest.mark.parametrize("name", _NAMED)
def test_a_notebook_mistake_is_named(name):
    sub = cat.BY_NAME[name]
    run = offline.run(_graded_path(SOURCE), sub.answers.get(cat.NOTEBOOK))
    cell, phrase = _NAMED[name]
    assert phrase in run.failed[cell], run.failed


def test_the_grade_table_says_what_the_catalogue_states():
    """Every student loses exactly the cells it names, test cells and gpu_* cells (the table:
    every student graded at world sizes 1-4, test_catalogue.py), but gpu_timing: no table can
    pin a verdict that depends on the machine's load (its own tests are below)."""
    table = recorded(A)
    for sub in cat.ALL:
        want = set(table["cells"]) if sub.loses_all else set(sub.loses) - {"gpu_timing"}
        assert set(table["lost"][sub.student]) == want, sub.why
    assert table["graded_with"]["not_recorded"] == ["gpu_timing"]


def test_the_judge_grades_apart_from_the_students_process():
    """The checks' rank functions run in the student's (sandboxable) process, the verdicts here:
    a mistake loses exactly its tests, the others pass (the reference through the judge:
    tests/test_torch_notebooks.py's autograde)."""
    sub = cat.BY_NAME["tattn_bias_every_rank"]
    failed = local.judge_answers(SOURCE, sub.answers[cat.NOTEBOOK], timeout=60).failed
    assert set(failed) == {g for g in sub.loses if g.startswith("test_")}
    assert "bias added on every rank before the all-reduce" in failed["test_attention_forward"]


def test_the_catalogue_names_the_required_mistakes():
    names = {s.student for s in cat.MISTAKES}
    assert {"tattn_head_split", "tattn_kv_not_replicated", "tattn_softmax_heads",
            "tattn_mask_after_softmax", "tattn_allreduce_after_qkv", "tattn_bias_every_rank",
            "tattn_layer_extra_allreduce", "tattn_no_barrier", "tattn_no_warmup"} <= names
    for sub in cat.MISTAKES:
        assert sub.loses <= set(graded_tests(SOURCE)) | set(cat.GPU_CELLS), sub.student
        assert sub.loses and sub.why


# -- the gpu_runner's plan and verdicts ---------------------------------------------------------
def test_the_plan_holds_the_notebooks_own_layers_and_shares_the_counts_cell():
    sizes = [1, 2, 3, 4]
    mine = make_plan(A, sizes, timing=False, cells=cat.GPU_CELLS)
    assert {u.kind for u in mine} == {"attention", "layer", "overhead"}
    assert [u.id for u in mine if u.kind == "overhead"] == ["overhead.measure@2"]
    assert set(planned_checks(mine).values()) == set(cat.GPU_CELLS)
    own = assignments.get(A).load("gpu.plan")
    assert own.cell_of("overhead.barrier@2") == "gpu_timing"
    assert own.cell_of("counts.layer_forward@3") == "gpu_collective_counts"
    assert make_plan(A, [1], cells=cat.GPU_CELLS)[-1].id == "layer.backward@1"   # no timing at 1


def _rows(compute, comm, sizes=data.MEASURE["cpu"]["sizes"]):
    return [[n, compute, comm] for n in sizes]


def _timing_ends(student=(0.5, 0.5), skew=(0.3, 0.6, 40.2), cold=(0.3, 0.6), grader=(0.5, 0.5)):
    """Two ranks' reports of the overhead unit; `skew`: (compute on rank 0, comm on rank 0,
    compute on the slow rank 1)."""
    probe = data.probe_args("cpu")["sizes"]
    ends = {}
    for rank in range(2):
        skewed = _rows(skew[2], 0.6, probe) if rank == 1 else _rows(skew[0], skew[1], probe)
        ends[rank] = {"obs": {"device": "cpu", "grader": [_rows(*grader)] * (data.AGREE_RUNS + 1),
                              "student": [_rows(*student)] * data.AGREE_RUNS,
                              "skew": [skewed] * data.PROBE_RUNS,
                              "cold": [_rows(*cold, probe)] * data.PROBE_RUNS}}
    return ends


@pytest.mark.parametrize("kwargs, failing, says", [
    ({}, None, ""),
    ({"student": (0.5 * 1e-3, 0.5 * 1e-3)}, "overhead.agrees", "within 3x"),
    ({"student": (1.4, 0.5)}, None, ""),                        # inside [min / 3, max x 3]
    ({"student": (1.6, 0.5)}, "overhead.agrees", "the compute time at n=256: your 4 runs"),
    ({"skew": (0.3, 41.0, 40.2)}, "overhead.barrier", "timed the wait"),
    ({"cold": (0.3, 40.5)}, "overhead.warmup", "run `warmup` untimed rounds"),
])
def test_the_timing_verdicts(kwargs, failing, says):
    verdicts = judge(Unit.parse("overhead.measure@2", A), _timing_ends(**kwargs))
    assert {k for k, (ok, _) in verdicts.items() if not ok} == ({failing} if failing else set())
    if failing:
        assert verdicts[failing][1].startswith("rank 0 of 2: ") and says in verdicts[failing][1]


def test_agreement_needs_one_pair_of_runs_to_agree():
    """Runs alternate grader, student, grader, ...: a burst of load may slow any run (here three
    of the student's and the grader's last, 10x); one student run agreeing with the two grader
    runs around it is enough. A constant factor (7x: a total over 7 repeats) disagrees in every
    pair."""
    def agrees(student, grader):
        ends = _timing_ends()
        for rank in range(2):
            ends[rank]["obs"]["student"] = [_rows(0.5, c) for c in student]
            ends[rank]["obs"]["grader"] = [_rows(0.5, c) for c in grader]
        return judge(Unit.parse("overhead.measure@2", A), ends)["overhead.agrees"]
    assert agrees([5.0, 5.0, 0.5, 5.0], [0.5, 0.5, 0.6, 0.5, 5.0]) == (True, "")
    ok, detail = agrees([3.5] * 4, [0.5] * 5)
    assert not ok and "none within 3x of the runs around it" in detail


def test_a_probe_passes_when_one_of_its_runs_does():
    """A burst of load in one run of a probe (an all-reduce median of 45 ms with a barrier) does
    not fail a student whose other run is clean; a missing barrier shows in both runs."""
    probe = data.probe_args("cpu")["sizes"]
    ends = _timing_ends()
    ends[0]["obs"]["skew"] = [_rows(0.3, 45.0, probe), _rows(0.3, 0.7, probe)]
    assert judge(Unit.parse("overhead.measure@2", A), ends)["overhead.barrier"] == (True, "")
    ends[0]["obs"]["skew"] = [_rows(0.3, 45.0, probe), _rows(0.3, 41.0, probe)]
    ok, detail = judge(Unit.parse("overhead.measure@2", A), ends)["overhead.barrier"]
    assert not ok and "41 ms (median; the better of 2 runs)" in detail


def test_a_timing_result_of_the_wrong_kind_fails_its_checks_not_the_grader():
    ends = _timing_ends()
    ends[1]["obs"]["student"][2] = {"type": "list"}
    ends[0]["obs"]["skew"] = [[[256, "nan", 1.0]]] * data.PROBE_RUNS
    del ends[0]["obs"]["cold"]
    verdicts = judge(Unit.parse("overhead.measure@2", A), ends)
    assert "rank 1 of 2: measure_overhead returned a list" in verdicts["overhead.result"][1]
    assert "two positive numbers" in verdicts["overhead.barrier"][1]
    assert not verdicts["overhead.warmup"][0] and not verdicts["overhead.agrees"][0]


# -- the rank side and the judge on forked gloo ranks -----------------------------------------------
def test_the_reference_gets_full_marks_at_world_sizes_1_to_4(tmp_path):
    """With its timing (gpu_timing, which the grade table leaves out)."""
    rep = gpu_report(cat.REFERENCE[0], (1, 2, 3, 4), tmp_path, pg_timeout=15)
    assert rep["score"] == rep["max_score"] == sum(cat.GPU_CELLS.values()), \
        {k: v["detail"] for k, v in rep["checks"].items() if not v["ok"]}
    assert {k.split("@")[1] for k in rep["checks"]} == {"1", "2", "3", "4"}


@pytest.mark.parametrize("name, failing", [("tattn_no_barrier", "overhead.barrier"),
                                           ("tattn_no_warmup", "overhead.warmup"),
                                           ("tattn_timing_seconds", "overhead.agrees")])
def test_a_timing_mistake_loses_its_check(name, failing, tmp_path):
    """Each mistake fails the check that names it, every time; without a barrier the plain runs
    measure something else too (all-reduces that include the other rank's matmul), which the
    agreement may or may not see."""
    rep = gpu_report(cat.BY_NAME[name], (2,), tmp_path, pg_timeout=15,
                     steps={("overhead", "measure")})
    assert lost(rep) == {"gpu_timing"}
    failed = {k for k, v in rep["checks"].items() if not v["ok"]}
    assert f"{failing}@2" in failed and failed <= {f"{failing}@2", "overhead.agrees@2"}
