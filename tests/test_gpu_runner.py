"""gpu_runner, the fast parts: plan, extraction, counting names, the process supervisor, the
scale-out files and the catalogue. (The torchrun end-to-end tests are test_gpu_runner_slow.py.)"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import psutil
import pytest
import yaml

from gpu_runner import extract
from gpu_runner.counting import kind
from gpu_runner.grade import backend_and_sizes, parse_args
from gpu_runner.plan import Unit, cell_of, make_plan, planned_checks, skipped_by_fault
from tpcourse import REPO
from tpcourse.examples import torch_students as cat
from tpcourse.submissions import build

SOURCE = REPO / "source" / "tp_torch" / "tp_torch.ipynb"
RUNNER = REPO / "gpu_runner"


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
    planned = planned_checks(make_plan([1, 2, 3, 4]))
    cells = set(extract.gpu_cells(source_nb))
    assert set(planned.values()) == cells
    for cell in cells:
        assert sum(1 for c in planned.values() if c == cell) >= 4, cell
    # counts are checked where there is communication only
    assert not any(c.startswith("counts.") and c.endswith("@1") for c in planned)


def test_plan_order_and_fault_skips():
    plan = make_plan([1, 2, 3, 4])
    ids = [u.id for u in plan]
    assert ids[:2] == ["errors.nopg@4", "errors.shape@4"]
    assert ids.index("column.shards@4") < ids.index("column.forward@1")
    assert ids.index("column.local@1") < ids.index("column.forward@2")
    fault = Unit.parse("mlp.forward@2")
    pending = plan[ids.index("mlp.forward@2"):]
    skipped = {u.id for u in skipped_by_fault(fault, pending)}
    assert "mlp.backward@2" in skipped and "mlp.forward@4" in skipped
    assert "timing.mlp@3" in skipped and "timing.row@3" not in skipped
    assert "mlp.forward@2" not in skipped
    assert Unit.parse("row.forward@3").members(4) == range(1, 4)
    assert cell_of("counts.mlp_forward@2") == "gpu_collective_counts"
    assert cell_of("column.empty_shard@2") == "gpu_column_shards"
    assert cell_of("row.grad_input_full@3") == "gpu_row_backward"


def test_collective_names_are_canonical():
    assert kind("all_reduce") == kind("allreduce_") == kind("allreduce_coalesced_") == "allreduce"
    assert kind("all_gather") == kind("_allgather_base") == kind("all_gather_into_tensor") \
        == kind("allgather_into_tensor_coalesced") == "allgather"
    assert kind("reduce_scatter_tensor") == "reducescatter"


def test_extracted_module_has_setup_and_solutions_only(source_nb, tmp_path):
    sub = cat.BY_NAME["torch_bias_every_rank"]
    submitted = build(sub)["tp_torch.ipynb"]
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
    submitted = build(cat.BY_NAME["torch_reference"])["tp_torch.ipynb"]
    submitted.cells = [c for c in submitted.cells
                       if c.metadata.get("nbgrader", {}).get("grade_id") != "sol_row_layer"]
    assert extract.write_module(source_nb, submitted, tmp_path / "s.py") == ["sol_row_layer"]


def test_catalogue_is_consistent():
    assert len(cat.WRONG) >= 6
    for sub in cat.ALL:
        assert sub.loses <= set(cat.GPU_CELLS), sub.student
        assert sub.assignment == "tp_torch"
        build(sub)                      # every edit applies to the reference
    assert not cat.BY_NAME["torch_reference"].loses
    for sub in cat.WRONG + cat.FAULTS:
        assert sub.loses, sub.student


def test_backend_choice_without_gpus():
    backend, sizes = backend_and_sizes("auto", None)
    if backend == "gloo":
        assert sizes == (1, 2, 3, 4)
    assert backend_and_sizes("gloo", "3,1,2") == ("gloo", (1, 2, 3))
    if not _gpus():
        with pytest.raises(SystemExit):
            backend_and_sizes("nccl", "1,2")


def test_students_and_shards(tmp_path):
    from gpu_runner.grade import students
    for name in ("d", "a", "c", "b", "e"):
        (tmp_path / "submitted" / name / "tp_torch").mkdir(parents=True)
    (tmp_path / "submitted" / "x" / "other").mkdir(parents=True)
    assert students(tmp_path, "tp_torch", [], None) == ["a", "b", "c", "d", "e"]
    shards = [students(tmp_path, "tp_torch", [], f"{i}/2") for i in range(2)]
    assert shards == [["a", "c", "e"], ["b", "d"]]
    assert students(tmp_path, "tp_torch", ["c"], None) == ["c"]


def _gpus():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_supervisor_kills_workers_that_left_the_session(tmp_path):
    """A grandchild in a new session whose parent is gone (torchrun's workers after torchrun
    died) must not outlive the launch, nor must one that is still running at the limit."""
    pidfile = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "os._exit(0)\n")                      # the parent leaves; the grandchild is orphaned
    result = tmp_path / "sup.json"
    # the orphan sleeps 120 s: had the supervisor waited for it, the 60 s timeout would fire
    subprocess.run([sys.executable, "-m", "gpu_runner.supervise", "--timeout", "20",
                    "--result", str(result), "--", sys.executable, "-c", script],
                   check=True, cwd=REPO, timeout=60)
    orphan = int(pidfile.read_text())
    assert not _alive(orphan)
    loop = tmp_path / "loop.json"
    subprocess.run([sys.executable, "-m", "gpu_runner.supervise", "--timeout", "1",
                    "--result", str(loop), "--", sys.executable, "-c", "while True: pass"],
                   check=True, cwd=REPO, timeout=60)
    assert '"timed_out": true' in loop.read_text()


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- scale-out files -------------------------------------------------------------------------
def _grade_argv(command: str) -> list[str]:
    """The arguments after `-m gpu_runner.grade`, with shell/Actions variables filled in."""
    command = command.replace("$STUDENT_FLAG", "--student X")   # what it expands to
    command = re.sub(r"\$\{\{[^}]*\}\}", "X", command)
    command = re.sub(r"\$\{?(\w+)\}?", lambda m: "0" if "INDEX" in m[1] or "SHARD" in m[1]
                     else "X", command)
    command = command.replace("\\\n", " ")
    words = shlex.split(command)
    return words[words.index("gpu_runner.grade") + 1:]


def _commands(text: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    return [line for line in joined.splitlines()
            if "-m gpu_runner.grade" in line and not line.lstrip().startswith("#")]


def _check_args(argv):
    args = parse_args(argv)       # argparse exits (fails the test) on an unknown flag
    assert args.assignment
    if args.shard:
        assert re.fullmatch(r"\d+/\d+", args.shard) or "X" in args.shard
    return args


def test_slurm_script_parses_and_calls_the_entry_point():
    path = RUNNER / "slurm" / "grade_array.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert re.search(r"^#SBATCH --array=\d+-\d+", text, re.M)
    commands = _commands(text)
    assert commands
    args = _check_args(_grade_argv(commands[0].replace('"$PYTHON"', "python")))
    assert args.no_gradebook and args.shard


def test_kubernetes_job_parses_and_calls_the_entry_point():
    doc = yaml.safe_load((RUNNER / "k8s" / "grade-indexed-job.yaml").read_text())
    assert doc["kind"] == "Job" and doc["spec"]["completionMode"] == "Indexed"
    container = doc["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"]
    args = _check_args(_grade_argv(" ".join(container["args"])))
    assert args.shard and args.no_gradebook


def test_github_workflow_parses_and_calls_the_entry_point():
    doc = yaml.safe_load((RUNNER / "github" / "gpu-grade.yml").read_text())
    job = doc["jobs"]["grade"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "requirements-gpu.txt" in runs and "--no-deps" in runs
    commands = _commands(runs)
    assert commands
    assert _check_args(_grade_argv(commands[0])).student == ["X"]


def test_gpu_requirements_leave_torch_alone():
    lines = [ln.split("==")[0].strip().lower() for ln in
             (RUNNER / "requirements-gpu.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert "torch" not in lines and "nbgrader" in lines and "psutil" in lines


def test_readme_documents_every_flag():
    readme = (RUNNER / "README.md").read_text()
    flags = re.findall(r'add_argument\("(--[\w-]+)"', (RUNNER / "grade.py").read_text())
    assert flags
    for flag in flags:
        assert f"`{flag}" in readme, flag


def test_broken_setup_cell_grades_nobody(source_nb, tmp_path):
    """If the source's setup cell cannot run outside the notebook, every student would get 0
    for an import error that is not theirs: the runner refuses instead."""
    import copy

    import nbformat

    from gpu_runner.grade import preflight
    nb = copy.deepcopy(source_nb)
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "setup":
            cell.source = "import no_such_module_anywhere"
    path = tmp_path / "tp_torch.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(SystemExit, match="no_such_module_anywhere"):
        preflight(path)
