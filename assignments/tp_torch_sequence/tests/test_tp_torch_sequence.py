"""tp_torch_sequence, the fast parts: the notebook's cells and its catalogue (examples.py, and
what its grade table says of each student), the release failing the notebook's checks
in-process (tpgrade.offline), what the gpu_runner's units and judges say of each mistake on
forked gloo ranks (gpu_runner.forked), and the collective trace that tells the kinds and sizes
of collectives apart. Every student's grades are test_catalogue.py's; the nbgrader
cycle is in test_torch_notebooks.py, the torchrun launches in test_gpu_runner_slow.py.
"""
from __future__ import annotations

import copy
import inspect
import re

import pytest

pytest.importorskip("torch")

import assignments  # noqa: E402
from assignments.tp_torch_sequence import checks as check  # noqa: E402  (captures torch first)
from assignments.tp_torch_sequence import examples as cat  # noqa: E402
from assignments.tp_torch_sequence.gpu.judge import trace_counts  # noqa: E402
from gpu_runner import extract  # noqa: E402
from gpu_runner.forked import lost  # noqa: E402
from gpu_runner.plan import make_plan, planned_checks  # noqa: E402
from gpu_runner.records import Malformed  # noqa: E402
from tpcourse.catalogue import gpu_report, recorded  # noqa: E402
from tpcourse.submissions import build  # noqa: E402
from tpgrade import offline  # noqa: E402
from tpjudge.cells import grade_id, graded_tests, read, reference_answers  # noqa: E402
from tpsim.ranks import run_on_ranks  # noqa: E402

A = assignments.get("tp_torch_sequence")
SOURCE = A.notebook
SRC = read(SOURCE)
TESTS = graded_tests(SRC)


def _graded_path(nb):
    """The notebook without its ungraded demo cells (the collectives demo, the try-it run)."""
    nb = copy.deepcopy(nb)
    nb.cells = [c for c in nb.cells if c.cell_type != "code" or grade_id(c)]
    return nb


# -- the notebook and its catalogue ----------------------------------------------------------------
def test_cells_ids_points_and_one_line_checks():
    assert extract.gpu_cells(SRC) == cat.GPU_CELLS
    for cell in SRC.cells:
        meta = cell.metadata.get("nbgrader", {})
        if grade_id(cell) in cat.GPU_CELLS:      # task cells: never counted twice in the max
            assert cell.cell_type == "markdown" and meta["task"] and not meta["grade"]
    assert tuple(extract.solution_ids(SRC)) == cat.SOLUTION_IDS
    assert set(TESTS.values()) == {1.0} and len(TESTS) >= 10
    called = []
    for cell in SRC.cells:
        if grade_id(cell) in TESTS:
            lines = [ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")]
            assert lines[0] == f"from assignments.{A.name} import checks as check", grade_id(cell)
            assert len(lines) == 2 and re.fullmatch(r"check\.\w+\(\w+\)", lines[1]), cell.source
            called.append(lines[1].split("(")[0][len("check."):])
    public = [n for n, f in vars(check).items() if inspect.isfunction(f) and not n.startswith("_")
              and f.__module__ == check.__name__]
    assert sorted(called) == sorted(public)
    setup = next(c.source for c in SRC.cells if grade_id(c) == "setup")
    assert re.search(rf"^import assignments\.{A.name}\.checks\b", setup, re.M)


def test_every_gpu_cell_has_checks_at_every_size_and_every_check_a_cell():
    planned = planned_checks(make_plan(A.name, [1, 2, 3, 4], cells=cat.GPU_CELLS))
    assert set(planned.values()) == set(cat.GPU_CELLS)
    for cell in cat.GPU_CELLS:
        assert sum(1 for c in planned.values() if c == cell) >= 4, cell
    assert not any(c.startswith("seqcounts.") and c.endswith("@1") for c in planned)
    assert {u.kind for u in make_plan(A.name, [1, 2], cells=cat.GPU_CELLS)} == {
        "seqmap", "sp", "emb", "ce"}


def test_the_pasted_cell_is_the_students_own_tp_torch_solution():
    """The reference's first cell is tp_torch's three solution cells, as the release asks; the
    names its stub lists are the ones the tp_torch notebook gives."""
    tp_torch = read(assignments.get("tp_torch").notebook)
    theirs = reference_answers(tp_torch)
    pasted = reference_answers(SRC)["sol_tp_torch"]
    position = [pasted.index(theirs[gid]) for gid in ("sol_mappings", "sol_column_layer",
                                                      "sol_row_layer")]
    assert position == sorted(position)
    release = read(assignments.REPO / "release" / A.name / f"{A.name}.ipynb")
    stub = next(c.source for c in release.cells if grade_id(c) == "sol_tp_torch")
    listed = set(re.findall(r"^#\s+(\w+)\(", stub, re.M))
    assert {"tp_rank_and_size", "shard_range", "reduce_from_tp_region", "full_weight",
            "ColumnParallelLinear", "RowParallelLinear"} <= listed
    for name in listed:
        assert re.search(rf"^(def|class) {name}\(", pasted, re.M), name


def test_catalogue_is_consistent():
    assert len(cat.WRONG) >= 8
    for sub in cat.ALL:
        assert sub.assignment == A.name and sub.loses <= set(cat.GPU_CELLS), sub.student
        assert cat.NOTEBOOK_LOSES[sub.student] <= set(TESTS), sub.student
        build(sub)                       # every edit applies to the catalogue's reference
    for sub in cat.WRONG:
        assert sub.loses, sub.student
    assert not any(s.loses or cat.NOTEBOOK_LOSES[s.student] for s in cat.VALID)


def test_the_grade_table_says_what_the_catalogue_states():
    """Every student loses exactly the gpu_* cells and the notebook's test cells it names (the
    table: every student graded at world sizes 1-4, test_catalogue.py)."""
    lost = recorded(A.name)["lost"]
    for sub in cat.ALL:
        assert set(lost[sub.student]) == set(sub.loses) | cat.NOTEBOOK_LOSES[sub.student], sub.why


# -- the notebook's checks -------------------------------------------------------------------------
def test_the_release_fails_every_notebook_check():
    run = offline.run(_graded_path(SRC), release=True)
    assert set(run.failed) == set(TESTS)
    assert all("NotImplementedError" in text for text in run.failed.values()), run.failed


# -- the gpu_runner, on forked gloo ranks ----------------------------------------------------------
# what each mistake's feedback says (a check of the cells it loses)
SAYS = {
    "tseq_rs_wrong_axis": ("seqmap.reduce_scatter_forward@2",
                           "reduce-scattered along the last (hidden) dim"),
    "tseq_layernorm_gathered": ("sp.grad_layernorm@2", "LayerNorm ran on the gathered tensor"),
    "tseq_sp_f_in_block": ("sp.grad_input@2", "fc1 called as a layer after the gather"),
    "tseq_sp_allreduce_slice": ("seqcounts.reduce_scatter@2",
                                "ran 1 allreduce, expected 1 reducescatter"),
    "tseq_sp_no_autograd": ("seqmap.gather_backward@1", "not connected to the input in autograd"),
    "tseq_emb_not_masked": ("emb.forward@2", "looked up (as its local row 0) and not zeroed"),
    "tseq_emb_offset_even_split": ("emb.forward@2", "taken to start at r * V_r"),
    "tseq_emb_grad_leak": ("emb.grad_weight@2", "local row 0 also got the gradient"),
    "tseq_emb_no_id_check": ("emb.bad_ids@1", "no error raised"),
    "tseq_ce_no_max": ("ce.large_logits@1", "exp overflowed"),
    "tseq_ce_gathers_logits": ("seqcounts.ce_sizes@2", "the logits travelled"),
    "tseq_ce_max_in_graph": ("ce.grad_logits@2",
                             "values differ from the dense result by up to nan"),
}


@pytest.mark.parametrize("sub", cat.WRONG, ids=lambda s: s.student)
def test_each_mistake_loses_exactly_its_cells_and_says_why(sub, tmp_path):
    """World sizes 1 and 2 show every mistake of the catalogue (2: uneven 7 tokens as 4 + 3,
    a vocabulary of 11 as 6 + 5)."""
    rep = gpu_report(sub, (1, 2), tmp_path)
    assert lost(rep) == set(sub.loses), (sub.why, {
        k: v["detail"] for k, v in rep["checks"].items() if not v["ok"]})
    name, phrase = SAYS[sub.student]
    assert not rep["checks"][name]["ok"] and phrase in rep["checks"][name]["detail"]


# -- the collective trace --------------------------------------------------------------------------
def _collectives_traced():
    """Every way of calling a collective, each traced alone on this rank of 2."""
    import torch
    import torch.distributed as dist

    from gpu_runner.collective_trace import CollectiveTrace

    def traced(fn):
        with CollectiveTrace(2) as trace:
            fn()
        return trace.record()

    pg = dist.distributed_c10d._get_default_group()
    backend = pg._get_backend(torch.device("cpu"))

    class RS(torch.autograd.Function):       # a reduce-scatter in an autograd backward
        @staticmethod
        def forward(ctx, x):
            return x[:1].clone()

        @staticmethod
        def backward(ctx, g):
            out = g.new_empty(1, 3)
            dist.reduce_scatter_single(out, torch.cat([g, g]))
            return torch.cat([out, out])
    x = torch.ones(2, 3, requires_grad=True)
    y = RS.apply(x)
    return {
        "all_reduce max": traced(lambda: dist.all_reduce(torch.ones(5),
                                                         op=dist.ReduceOp.MAX)),
        "reduce_scatter list": traced(lambda: dist.reduce_scatter(
            torch.empty(2, 3), [torch.ones(2, 3), torch.ones(2, 3)])),
        "reduce_scatter_single": traced(lambda: dist.reduce_scatter_single(
            torch.empty(2, 3), torch.ones(4, 3))),
        "all_gather": traced(lambda: dist.all_gather([torch.empty(3), torch.empty(3)],
                                                     torch.ones(3))),
        "process group": traced(lambda: pg.allreduce([torch.ones(4)]).wait()),
        "backend object": traced(lambda: backend.allreduce([torch.ones(4)]).wait()),
        "in backward": traced(lambda: y.sum().backward()),
    }


def test_the_trace_tells_kinds_and_sizes_apart_on_gloo():
    records = run_on_ranks(_collectives_traced, 2, timeout=60)[0]
    got = {name: trace_counts(rec) for name, rec in records.items()}
    assert got == {"all_reduce max": {"allreduce": 1},
                   "reduce_scatter list": {"reducescatter": 1},   # gloo: 2 all-reduces
                   "reduce_scatter_single": {"reducescatter": 1},
                   "all_gather": {"allgather": 1},
                   "process group": {"allreduce": 1},
                   "backend object": {"allreduce": 1},            # below the dispatcher
                   "in backward": {"reducescatter": 1}}
    assert [n for _, n in records["all_reduce max"]["events"]] == [5]
    assert [n for _, n in records["all_gather"]["events"]] == [3]


def test_trace_counts_on_synthetic_and_malformed_records():
    rec = {"ops": {"reducescatter": 1}, "events": [["allreduce", 6], ["allreduce", 6],
                                                   ["allreduce", 6]], "world_size": 2}
    assert trace_counts(rec) == {"reducescatter": 1, "allreduce": 1}   # one more than explained
    assert trace_counts({"ops": {}, "events": [], "world_size": 4}) == {}
    for bad in ("x", {"ops": {}, "events": "x", "world_size": 2},
                {"ops": {"allreduce": -1}, "events": [], "world_size": 2},
                {"ops": {}, "events": [["allreduce", True]], "world_size": 2}):
        with pytest.raises(Malformed):
            trace_counts(bad)


def test_no_student_of_the_catalogue_reaches_for_the_grader():
    """None of these answers is flagged for the instructor (tpjudge.reach): the flags are for
    code that reaches for the grader, not for ordinary torch.distributed code."""
    from tpjudge import reach
    answers = [reference_answers(SRC)] + [s.answers[cat.NOTEBOOK] for s in cat.ALL if s.answers]
    flagged = {gid for a in answers for gid, code in a.items() if reach.scan(code)}
    assert not flagged
