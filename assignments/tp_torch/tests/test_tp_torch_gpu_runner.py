"""tp_torch's gpu_runner units, the fast parts: its gpu_* cells and their checks, the plan's
order and fault skips, the extraction of its solution module, its catalogue, the same checks
and points on every machine, the judge on synthetic and malformed reports, the launch's fault
handling on its units, and its rank side with the judge on forked gloo ranks
(gpu_runner.forked), and what `make gpu-check` expects of its GPU_CHECK students. (The torchrun
end-to-end tests, in the sandbox, are tests/test_gpu_runner_slow.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import assignments
from assignments.tp_torch import examples as cat
from assignments.tp_torch.gpu import data
from gpu_runner import extract, machine
from gpu_runner.data import seed_of, shard
from gpu_runner.grade import backend_and_sizes
from gpu_runner.plan import Unit, cell_of, make_plan, planned_checks, skipped_by_fault
from tpcourse import REPO
from tpcourse.catalogue import gpu_report
from tpcourse.submissions import build
from tpgrade.cases import balanced

A = "tp_torch"
SOURCE = assignments.get(A).notebook
@pytest.fixture(scope="module")
def source_nb():
    return extract.read(SOURCE)


def test_gpu_cells_are_task_cells_with_the_agreed_points(source_nb):
    """Task cells (grade=false): a cell that is both a grade and a task cell would be counted
    twice in nbgrader's max score."""
    cells = {c.metadata.nbgrader["grade_id"]: c.metadata.nbgrader for c in source_nb.cells
             if str(c.metadata.get("nbgrader", {}).get("grade_id", "")).startswith("gpu_")}
    assert {k: v["points"] for k, v in cells.items()} == cat.GPU_CELLS
    for gid, meta in cells.items():
        assert meta["task"] and not meta["grade"] and not meta["solution"] and meta["locked"], gid


def test_every_gpu_cell_has_checks_and_every_check_a_cell(source_nb):
    cells = set(extract.gpu_cells(source_nb))
    planned = planned_checks(make_plan(A, [1, 2, 3, 4], cells=cells))
    assert set(planned.values()) == cells
    for cell in cells:
        assert sum(1 for c in planned.values() if c == cell) >= 4, cell
    # counts are checked where there is communication only
    assert not any(c.startswith("counts.") and c.endswith("@1") for c in planned)


def test_plan_order_and_fault_skips():
    plan = make_plan(A, [1, 2, 3, 4])
    ids = [u.id for u in plan]
    assert ids[:2] == ["errors.nopg@4", "errors.shape@4"]
    assert ids.index("column.shards@4") < ids.index("column.forward@1")
    assert ids.index("column.local@1") < ids.index("column.forward@2")
    fault = Unit.parse("mlp.forward@2", A)
    pending = plan[ids.index("mlp.forward@2"):]
    skipped = {u.id for u in skipped_by_fault(fault, pending)}
    assert "mlp.backward@2" in skipped and "mlp.forward@4" in skipped
    assert "timing.mlp@3" in skipped and "timing.row@3" not in skipped
    assert "mlp.forward@2" not in skipped
    assert Unit.parse("row.forward@3", A).members(4) == range(1, 4)
    assert cell_of(A, "counts.mlp_forward@2") == "gpu_collective_counts"
    assert cell_of(A, "column.empty_shard@2") == "gpu_column_shards"
    assert cell_of(A, "row.grad_input_full@3") == "gpu_row_backward"


def test_extracted_module_has_setup_and_solutions_only(source_nb, tmp_path):
    sub = cat.BY_NAME["torch_bias_every_rank"]
    submitted = build(sub)[f"{A}.ipynb"]
    submitted.cells[0].source = "%matplotlib inline"      # a stray magic must not break it
    for cell in submitted.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "sol_parallel_mlp":
            cell.source = "%load_ext autoreload\n" + cell.source
    dest = tmp_path / "solution.py"
    assert extract.write_module(source_nb, submitted, dest) == []
    text = dest.read_text()
    compile(text, str(dest), "exec")
    assert "import torch.distributed as dist" in text                 # the source's setup
    assert "reduce_from_tp_region(F.linear(x, self.weight, self.bias)" in text   # the student's
    assert "# %load_ext autoreload" in text
    assert "test_" not in text and "run_on_ranks(" not in text.split("import run_on_ranks")[-1]
    assert extract.solution_ids(source_nb) == list(cat.SOLUTION_IDS)


def test_missing_solution_cell_is_reported(source_nb, tmp_path):
    submitted = build(cat.BY_NAME["torch_reference"])[f"{A}.ipynb"]
    submitted.cells = [c for c in submitted.cells
                       if c.metadata.get("nbgrader", {}).get("grade_id") != "sol_row_layer"]
    assert extract.write_module(source_nb, submitted, tmp_path / "s.py") == ["sol_row_layer"]


def test_catalogue_is_consistent():
    assert len(cat.WRONG) >= 6
    for sub in cat.ALL:
        assert sub.loses <= set(cat.GPU_CELLS), sub.student
        assert sub.assignment == A
        build(sub)                      # every edit applies to the reference
    assert not cat.BY_NAME["torch_reference"].loses
    for sub in cat.WRONG + cat.FAULTS:
        assert sub.loses, sub.student


def _course_root(tmp_path, extra=""):
    root = tmp_path / "course"
    root.mkdir()
    (root / "nbgrader_config.py").write_text((REPO / "nbgrader_config.py").read_text() + extra)
    return root


def test_the_same_checks_and_points_on_every_machine(tmp_path, monkeypatch, source_nb):
    """Planning the grading on machines with 0, 1, 2, 4 and 8 GPUs: the course's world sizes,
    the same sub-checks and points everywhere; only the backend differs (NCCL from 4 GPUs)."""
    root = _course_root(tmp_path)
    cells = extract.gpu_cells(source_nb)
    plans = {}
    for gpus in (0, 1, 2, 4, 8):
        monkeypatch.setattr(machine, "gpu_count", lambda gpus=gpus: gpus)
        backend, sizes = backend_and_sizes(root, "auto", None)
        planned = planned_checks(make_plan(A, sizes, cells=cells))
        plans[gpus] = (backend, sizes, {cell: (cells[cell], sorted(c for c, g in planned.items()
                                                                    if g == cell))
                                        for cell in cells})
    assert {g: p[0] for g, p in plans.items()} == {0: "gloo", 1: "gloo", 2: "gloo", 4: "nccl",
                                                   8: "nccl"}
    assert {p[1] for p in plans.values()} == {(1, 2, 3, 4)}
    assert len({repr(p[2]) for p in plans.values()}) == 1
    assert sum(points for points, _ in plans[0][2].values()) == sum(cat.GPU_CELLS.values())
    monkeypatch.setattr(machine, "gpu_count", lambda: 2)
    with pytest.raises(machine.Refused, match="world size 4 > 2 GPUs"):
        backend_and_sizes(root, "nccl", None)
    monkeypatch.setattr(machine, "gpu_count", lambda: 8)
    assert backend_and_sizes(root, "gloo", None) == ("gloo", (1, 2, 3, 4))


def _records(units, fault_unit=None, kind="cuda"):
    """Two ranks' records of one launch: every unit ends cleanly until `fault_unit`."""
    rows = {0: [{"event": "hello"}], 1: [{"event": "hello"}]}
    for u in units:
        for r in (0, 1):
            if r not in u.members(2):
                continue
            rows[r].append({"event": "start", "unit": u.id})
            fault = "RuntimeError: CUDA error: device-side assert triggered" \
                if u.id == fault_unit else None
            rows[r].append({"event": "end", "unit": u.id, "status": "ok", "error": "",
                            "fault": fault, "fault_kind": kind if fault else None, "obs": {}})
        if u.id == fault_unit:
            break
    return rows


def test_a_sticky_cuda_error_costs_only_its_unit(monkeypatch, tmp_path):
    """The rank with a sticky CUDA error is relaunched; only the unit that caused it fails (a
    deadlock also skips its layer's larger sizes)."""
    from gpu_runner import launch
    plan = make_plan(A, [1, 2], timing=False)
    cfg = launch.Config(sizes=(1, 2), max_launches=3)
    seen = []

    def fake_launch(module, out, todo, cfg, index):
        seen.append([u.id for u in todo])
        for r, rows in _records(todo, "row.forward@2" if index == 0 else None).items():
            (launch.job_dir(out) / f"rank{r}.jsonl").write_text(
                "".join(json.dumps(row) + "\n" for row in rows))
        return {"rc": 0, "timed_out": False, "seconds": 1.0, "killed": 0,
                "log": str(out / "torchrun.log")}
    monkeypatch.setattr(launch, "_launch", lambda *a: (launch.job_dir(a[1]).mkdir(parents=True),
                                                        fake_launch(*a))[1])
    results, launches = launch.run_submission(tmp_path / "m.py", tmp_path / "runs", plan, cfg)
    assert len(launches) == 2 and "row.forward@2" not in seen[1]
    assert "row.backward@2" in seen[1] and "mlp.forward@2" in seen[1]
    faulty = [u for u, r in results.items() if r.status == "fault"]
    assert faulty == ["row.forward@2"]
    assert "sticky CUDA error" in results["row.forward@2"].reason
    assert not [u for u, r in results.items() if r.status in ("skipped", "not_run")]
    # a deadlock instead: the layer's larger sizes are not retried
    rows = _records(plan, "row.forward@1", kind="comm")
    res = {}
    launch._interpret(rows, plan, cfg, {"rc": 1, "timed_out": False}, tmp_path / "x.log", res)
    assert res["row.forward@2"].status == "skipped" and "mlp.forward@1" not in res


def test_a_launch_that_never_reaches_student_code_is_the_environments(tmp_path):
    from gpu_runner.launch import Config, EnvironmentFailure, _interpret
    plan, cfg = make_plan(A, [1, 2], timing=False), Config(sizes=(1, 2))
    sup = {"rc": 1, "timed_out": False}
    env_error = {0: [{"event": "hello"}, {"event": "env_error", "error": "NCCL error: unhandled "
                                                                         "system error"}]}
    for records, says in ((env_error, "NCCL error"), ({}, "no rank started"),
                          ({0: [{"event": "watchdog", "unit": "setup", "seconds": 9}]},
                           "setting up the process groups")):
        with pytest.raises(EnvironmentFailure, match=says):
            _interpret(records, plan, cfg, sup, tmp_path / "log", {})


def _ends(unit, obs_by_rank, error=""):
    return {r: {"event": "end", "unit": unit.id, "status": "ok", "error": error, "obs": obs}
            for r, obs in obs_by_rank.items()}


def test_malformed_reports_fail_their_checks_never_the_grader():
    from gpu_runner.judge import judge
    u = Unit.parse("column.forward@2", A)
    good = {"shape": [3, 7], "dtype": "float32", "device": "cpu", "data": [0.0] * 21}
    for bad in ("not a dict", {"shape": "3x7"}, {**good, "data": [0.0] * 20},
                {**good, "data": ["zero"] * 21}, {**good, "data": [True] * 21},
                {**good, "dtype": "object"}, {**good, "shape": [-1, 7]},
                {**good, "shape": [10 ** 6, 10 ** 6], "data": None}, {"type": "list"}):
        verdicts = judge(u, _ends(u, {0: {"y": bad}, 1: {"y": good}}))
        ok, detail = verdicts["column.forward"]
        assert not ok and detail.startswith("rank 0 of 2:"), (bad, detail)
    verdicts = judge(u, {0: {"obs": "junk", "error": ""}, 1: {"obs": None, "error": 3}})
    assert all(not ok for ok, _ in verdicts.values())
    # NaN travels as text and never matches
    nan = {**good, "data": ["nan"] * 21}
    assert not judge(u, _ends(u, {0: {"y": nan}, 1: {"y": nan}}))["column.forward"][0]


def _obs_tensor(values):
    import torch
    from gpu_runner.records import encode_tensor
    return encode_tensor(torch.as_tensor(values, dtype=torch.float32))


def test_the_judge_names_the_mistake_with_world_size_and_rank():
    """Reports shaped like two classic mistakes, judged against the grader's own reference."""
    from gpu_runner.judge import judge
    from tpgrade import tensors
    u = Unit.parse("row.forward@3", A)
    case = data.row(seed_of(u))
    dense = tensors.linear(case.x, case.w, case.b)
    verdicts = judge(u, _ends(u, {r: {"y": _obs_tensor(dense + 2 * case.b),
                                      "counts": {"allreduce": 1}} for r in range(3)}))
    ok, detail = verdicts["row.forward"]
    assert not ok and detail.startswith("rank 0 of 3: ") and \
        "bias added on every rank before the all-reduce (counted 3 times)" in detail
    assert verdicts["counts.row_forward"] == (True, "")
    u = Unit.parse("row.backward@2", A)
    case = data.row(seed_of(u))
    dx, dw, db = tensors.linear_grads(case.x, case.w, case.g)

    def obs(r):
        lo, hi = shard(7, r, 2)
        return {"gx": _obs_tensor(dx[:, lo:hi]), "gw": _obs_tensor(dw[:, lo:hi]),
                "gb": _obs_tensor(db if r == 0 else db * 0), "counts": {}}
    verdicts = judge(u, _ends(u, {r: obs(r) for r in range(2)}))
    assert verdicts["row.grad_weight"] == (True, "") and verdicts["row.grad_input"] == (True, "")
    ok, detail = verdicts["row.grad_bias"]
    assert not ok and detail.startswith("rank 1 of 2:") and "rank 0 only" in detail


def test_report_comments_list_every_failed_check_and_no_grader_paths(tmp_path):
    from gpu_runner import launch, report
    plan = make_plan(A, [1, 2, 3, 4], timing=False)
    cfg = launch.Config()
    results = {u.id: launch._failed(u, "failed", f"rank 0 of {u.size}: wrong {u.id}")
               for u in plan}
    rep = report.build("s", A, A, cat.GPU_CELLS, plan, results, [], cfg, 1.0)
    comment = rep["cells"]["gpu_column_backward"]["comment"]
    names = {c.split("@")[0] for c, v in rep["checks"].items()
             if v["cell"] == "gpu_column_backward"}
    assert len(names) == 5 and all(f"- {n} (world sizes 1, 2, 3, 4): " in comment for n in names)
    assert "see the gpu_runner report" not in comment
    assert launch._launch_hint([{"rc": 1, "timed_out": True, "completed": 0,
                                 "why": "used more than 900 s of CPU time",
                                 "log": "/secret/torchrun.log"}]) == \
        " (torchrun exit 1, the launch's time limit reached (it used more than 900 s of CPU time))"
    assert rep["untested"] == machine.untested("gloo") and rep["untested"]


def test_reference_refusal_names_the_check_and_the_log_and_its_cache_key(tmp_path):
    from gpu_runner import launch, reference
    rep = {"score": 23.0, "max_score": 24, "launches": [{"log": "/r/launch0/torchrun.log"}],
           "checks": {"row.forward@1": {"ok": True, "detail": ""},
                      "row.forward@2": {"ok": False, "detail": "rank 1 of 2: differs"}}}
    text = reference.failure(rep, Path("src.ipynb"), launch.Config())
    assert "row.forward@2: rank 1 of 2: differs" in text and "/r/launch0/torchrun.log" in text
    root = _course_root(tmp_path)
    key = reference.cache_key(SOURCE, root, launch.Config(), A)
    assert key == reference.cache_key(SOURCE, root, launch.Config(), A)
    assert key != reference.cache_key(SOURCE, root, launch.Config(sizes=(1, 2)), A)
    with open(root / "nbgrader_config.py", "a") as f:
        f.write("c.Sandbox.memory_mb = 300\n")
    assert key != reference.cache_key(SOURCE, root, launch.Config(), A)


# -- the rank side and the judge on forked gloo ranks ------------------------------------------
def _graded(student, tmp_path, sizes=(1, 2, 3)):
    return gpu_report(cat.BY_NAME[student], sizes, tmp_path)


def _lost(rep):
    return {gid for gid, c in rep["cells"].items() if c["score"] < c["points"]}


def test_reference_full_marks_and_every_rank_holds_its_own_master_weight(tmp_path):
    rep = _graded("torch_reference", tmp_path)
    assert rep["score"] == rep["max_score"], {k: v for k, v in rep["checks"].items()
                                               if not v["ok"]}
    case = data.column(1)
    masters = [case.master(r, 3) for r in range(3)]
    for r, (lo, hi) in enumerate(balanced(7, 3)):      # its shard true, the rest noise
        assert (masters[r][lo:hi] == case.w[lo:hi]).all()
        others = [i for i in range(7) if not lo <= i < hi]
        assert not (masters[r][others] == case.w[others]).any()
    assert not (masters[0] == masters[1]).all()


def test_dense_on_every_rank_loses_its_forward_cells(tmp_path):
    rep = _graded("torch_dense_each_rank", tmp_path)
    assert _lost(rep) == set(cat.BY_NAME["torch_dense_each_rank"].loses)
    detail = rep["checks"]["column.forward@2"]["detail"]
    assert detail.startswith("rank 0 of 2: ") and "computed from the whole master_weight" in detail
    assert rep["checks"]["column.forward@1"]["ok"]      # one rank: its master is the weight


@pytest.mark.parametrize("student, says", [
    ("torch_device_new_tensor", "is on meta, the input on cpu: a tensor created without device="),
    ("torch_device_plain_attribute", "tensor attribute rows: neither a parameter nor a buffer"),
])
def test_device_mistakes_are_caught_on_cpu(tmp_path, student, says):
    rep = _graded(student, tmp_path, sizes=(1, 2))
    assert _lost(rep) == set(cat.BY_NAME[student].loses)
    assert says in rep["checks"]["column.forward_float64@2"]["detail"]


def test_a_cpu_collective_is_untested_here_and_the_report_says_so(tmp_path):
    """gloo runs collectives on CPU tensors: the mistake NCCL refuses gets full marks on this
    machine, and the report lists it as untested here."""
    rep = _graded("torch_device_cpu_collective", tmp_path, sizes=(1, 2))
    assert "torch_device_cpu_collective" not in cat.CAUGHT_ON_CPU and not _lost(rep)
    assert any("collectives on CPU tensors" in item for item in rep["untested"])


def _check_report(backend="nccl", sizes=(1,), lost=()):
    cells = {gid: {"score": 0.0 if gid in lost else float(p), "points": p}
             for gid, p in cat.GPU_CELLS.items()}
    return {"backend": backend, "world_sizes": list(sizes), "sandboxed": True, "cells": cells,
            "score": 0, "max_score": 24, "seconds": 1}


def test_gpu_check_verdict():
    from tpcourse.gpu_check import checked_assignment, expected_losses, verdict
    assert checked_assignment() == A
    STUDENTS = cat.GPU_CHECK
    expected = {s: expected_losses(A, cat.BY_NAME[s].loses) for s in STUDENTS}
    assert expected["torch_device_cpu_collective"] == {      # no counts at world size 1
        "gpu_row_forward", "gpu_row_backward", "gpu_mlp_forward", "gpu_mlp_backward"}
    assert expected["torch_device_new_tensor"] == set(cat.BY_NAME["torch_device_new_tensor"].loses)
    good = {"(reference)": _check_report(), **{s: _check_report(lost=expected[s])
                                               for s in STUDENTS}}
    assert verdict(0, "", good, expected) == []
    caught_nothing = {**good, "torch_device_cpu_collective": _check_report()}
    assert "torch_device_cpu_collective: lost nothing" in verdict(0, "", caught_nothing,
                                                                   expected)[0]
    assert "graded with gloo" in verdict(0, "", {**good, "(reference)": _check_report("gloo")},
                                         expected)[0]
    refused = verdict(2, "gpu_runner: nothing graded. the reference ...", {}, expected)
    assert refused[0].startswith("the grader exited 2") and "(reference): no report" in refused
