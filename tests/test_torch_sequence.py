"""tp_torch_sequence, the fast parts: the notebook's cells and its catalogue
(tpcourse.examples.torch_sequence_students), the notebook's checks in-process
(tpgrade.offline) and through the judge (tpjudge.local), the gpu_runner's units and judges on
forked gloo ranks (tests/forked_runner.py), and the collective trace that tells the kinds and
sizes of collectives apart. The nbgrader cycle is in test_torch_notebook.py, the torchrun
launches in test_gpu_runner_slow.py.
"""
from __future__ import annotations

import copy
import inspect
import re

import pytest

pytest.importorskip("torch")

import forked_runner  # noqa: E402
import tpgrade.torch_sequence as check  # noqa: E402  (captures torch before any answer runs)
from gpu_runner import extract  # noqa: E402
from gpu_runner.judge_sequence import trace_counts  # noqa: E402
from gpu_runner.plan import make_plan, planned_checks  # noqa: E402
from gpu_runner.records import Malformed  # noqa: E402
from tpcourse import REPO  # noqa: E402
from tpcourse.examples import torch_sequence_students as cat  # noqa: E402
from tpcourse.submissions import build  # noqa: E402
from tpgrade import offline  # noqa: E402
from tpgrade.torch_ranks import run_on_ranks  # noqa: E402
from tpjudge import local  # noqa: E402
from tpjudge.cells import grade_id, graded_tests, read, reference_answers  # noqa: E402

SOURCE = REPO / "source" / cat.ASSIGNMENT / f"{cat.ASSIGNMENT}.ipynb"
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
            assert lines[0] == "import tpgrade.torch_sequence as check", grade_id(cell)
            assert len(lines) == 2 and re.fullmatch(r"check\.\w+\(\w+\)", lines[1]), cell.source
            called.append(lines[1].split("(")[0][len("check."):])
    public = [n for n, f in vars(check).items() if inspect.isfunction(f) and not n.startswith("_")
              and f.__module__ == check.__name__]
    assert sorted(called) == sorted(public)
    setup = next(c.source for c in SRC.cells if grade_id(c) == "setup")
    assert re.search(r"^import tpgrade\.torch_sequence\b", setup, re.M)


def test_every_gpu_cell_has_checks_at_every_size_and_every_check_a_cell():
    planned = planned_checks(make_plan([1, 2, 3, 4], cells=cat.GPU_CELLS))
    assert set(planned.values()) == set(cat.GPU_CELLS)
    for cell in cat.GPU_CELLS:
        assert sum(1 for c in planned.values() if c == cell) >= 4, cell
    assert not any(c.startswith("seqcounts.") and c.endswith("@1") for c in planned)
    assert {u.kind for u in make_plan([1, 2], cells=cat.GPU_CELLS)} == {"seqmap", "sp", "emb",
                                                                        "ce"}


def test_the_pasted_cell_is_the_students_own_tp_torch_solution():
    """The reference's first cell is tp_torch's three solution cells, as the release asks; the
    names its stub lists are the ones the tp_torch notebook gives."""
    tp_torch = read(REPO / "source" / "tp_torch" / "tp_torch.ipynb")
    theirs = reference_answers(tp_torch)
    pasted = reference_answers(SRC)["sol_tp_torch"]
    position = [pasted.index(theirs[gid]) for gid in ("sol_mappings", "sol_column_layer",
                                                      "sol_row_layer")]
    assert position == sorted(position)
    release = read(REPO / "release" / cat.ASSIGNMENT / f"{cat.ASSIGNMENT}.ipynb")
    stub = next(c.source for c in release.cells if grade_id(c) == "sol_tp_torch")
    listed = set(re.findall(r"^#\s+(\w+)\(", stub, re.M))
    assert {"tp_rank_and_size", "shard_range", "reduce_from_tp_region", "full_weight",
            "ColumnParallelLinear", "RowParallelLinear"} <= listed
    for name in listed:
        assert re.search(rf"^(def|class) {name}\(", pasted, re.M), name


def test_catalogue_is_consistent():
    assert len(cat.WRONG) >= 8
    for sub in cat.ALL:
        assert sub.assignment == cat.ASSIGNMENT and sub.loses <= set(cat.GPU_CELLS), sub.student
        assert cat.NOTEBOOK_LOSES[sub.student] <= set(TESTS), sub.student
        build(sub)                       # every edit applies to the catalogue's reference
    for sub in cat.WRONG:
        assert sub.loses, sub.student
    assert not any(s.loses or cat.NOTEBOOK_LOSES[s.student] for s in cat.STUDENTS)


# -- the notebook's checks -------------------------------------------------------------------------
def _only_tests_of(nb, cells):
    """The notebook with only the test cells that follow the solution cells `cells` (each test
    cell belongs to the solution cell above it)."""
    nb = copy.deepcopy(nb)
    kept, owner = [], None
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in cat.SOLUTION_IDS:
            owner = gid
        if gid not in TESTS or owner in cells:
            kept.append(cell)
    nb.cells = kept
    return nb


@pytest.mark.parametrize("sub", cat.ALL, ids=lambda s: s.student)
def test_notebook_checks_fail_exactly_the_named_tests(sub):
    """The two references pass every check; every other student, an edit of the catalogue's
    reference (which passes them all), fails exactly its named tests (none for the valid ones)
    among those of the cells it edits."""
    answers = sub.answers.get(cat.NOTEBOOK)
    nb = _graded_path(SRC)
    if sub.student not in ("tseq_reference", "tseq_megatron"):
        edited = {g for g, code in answers.items() if code != cat.REFERENCE[g]}
        nb = _only_tests_of(nb, edited | ({"sol_layer_sp"} if "sol_sequence_mappings" in edited
                                          else set()))      # LayerSP calls the mappings
    run = offline.run(nb, answers=answers)
    assert not run.errors, run.errors
    assert set(run.failed) == cat.NOTEBOOK_LOSES[sub.student], (sub.why, run.failed)


def test_the_release_fails_every_notebook_check():
    run = offline.run(_graded_path(SRC), release=True)
    assert set(run.failed) == set(TESTS)
    assert all("NotImplementedError" in text for text in run.failed.values()), run.failed


@pytest.mark.parametrize("name", ["tseq_reference", "tseq_sp_no_autograd"])
def test_the_judge_gives_the_same_verdicts(name):
    """The checks run in the grader's process, the ranks in the student's (tpjudge)."""
    result = local.judge_answers(SRC, cat.BY_NAME[name].answers.get(cat.NOTEBOOK), timeout=60)
    assert set(result.failed) == cat.NOTEBOOK_LOSES[name], result.failed


# -- the gpu_runner, on forked gloo ranks ----------------------------------------------------------
@pytest.mark.parametrize("sub", cat.STUDENTS, ids=lambda s: s.student)
def test_valid_solutions_get_full_marks(sub, tmp_path):
    """The instructor's at world sizes 1-4, the other valid ways at 2 and 4 (uneven lengths
    and vocabularies, and at 4 a rank with no tokens or no vocabulary)."""
    sizes = (1, 2, 3, 4) if sub.student == "tseq_reference" else (2, 4)
    rep = forked_runner.grade(sub, sizes, tmp_path)
    assert rep["score"] == rep["max_score"] == sum(cat.GPU_CELLS.values()), {
        k: v["detail"] for k, v in rep["checks"].items() if not v["ok"]}
    assert {k.split("@")[1] for k in rep["checks"]} == {str(p) for p in sizes}


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
    "tseq_ce_max_in_graph": ("ce.grad_logits@2", "differs from the dense result by up to nan"),
}


@pytest.mark.parametrize("sub", cat.WRONG, ids=lambda s: s.student)
def test_each_mistake_loses_exactly_its_cells_and_says_why(sub, tmp_path):
    """World sizes 1 and 2 show every mistake of the catalogue (2: uneven 7 tokens as 4 + 3,
    a vocabulary of 11 as 6 + 5)."""
    rep = forked_runner.grade(sub, (1, 2), tmp_path)
    assert forked_runner.lost(rep) == set(sub.loses), (sub.why, {
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
