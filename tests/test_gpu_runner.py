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
SLURM, K8S, WORKFLOW = RUNNER / "slurm", RUNNER / "k8s", RUNNER / "github" / "gpu-grade.yml"
# The Kubernetes versions the manifests must be valid for: the oldest with every field they
# use (hostUsers, procMount, appArmorProfile, backoffLimitPerIndex), and the newest known.
K8S_VERSIONS = ("1.33.0", "latest")


def _largest_world_size() -> int:
    """max of the course's world sizes: c.GpuRunner.world_sizes in nbgrader_config.py where
    set, else gpu_runner.grade's default (both 1-4)."""
    from tpgrader import load_config
    config = load_config(str(REPO))
    if "GpuRunner" in config and "world_sizes" in config.GpuRunner:
        return max(config.GpuRunner.world_sizes)
    return max(backend_and_sizes("gloo", None)[1])


def _argv(command: str, module: str) -> list[str]:
    """The arguments after `-m MODULE`, with shell and Actions variables filled in."""
    command = command.replace('"${student[@]}"', "--student X")   # what it expands to
    command = re.sub(r"\$\{\{[^}]*\}\}", "X", command)

    def value(m):
        name = m[1] or m[3]
        numeric = "INDEX" in name or name in ("SHARD", "SHARDS") or name.endswith("PER_TASK")
        return "0" if numeric else "X"
    command = re.sub(r"\$\{(\w+)(:-[^}]*)?\}|\$(\w+)", value, command)
    words = shlex.split(command.replace("\\\n", " "))
    words = words[words.index(module) + 1:]
    ends = [i for i, w in enumerate(words) if w in ("||", "&&", ";", "|")]
    return words[:ends[0]] if ends else words


def _commands(text: str, module: str) -> list[list[str]]:
    joined = text.replace("\\\n", " ")
    return [_argv(line, module) for line in joined.splitlines()
            if f"-m {module}" in line and not line.lstrip().startswith("#")]


def _runner_args(argv):
    args = parse_args(argv)       # argparse exits (fails the test) on an unknown flag
    assert args.assignment and args.world_sizes is None, argv   # the course's world sizes
    if args.shard:
        assert re.fullmatch(r"\d+/\d+", args.shard), args.shard
    return args


def _class_args(argv):
    from tpcourse.grade_class import parser
    return parser().parse_args(argv)


def _k8s(name):
    return yaml.safe_load((K8S / name).read_text())


def _container(doc):
    return doc["spec"]["template"]["spec"]["containers"][0]


def test_slurm_scripts_parse_and_call_the_entry_points():
    for path in SLURM.glob("*.sbatch"):
        subprocess.run(["bash", "-n", str(path)], check=True)
    gpu = (SLURM / "grade_array.sbatch").read_text()
    assert re.search(r"^#SBATCH --array=0-\d+$", gpu, re.M)
    assert re.findall(r"^#SBATCH --gres=gpu:(\d+)$", gpu, re.M) == [str(_largest_world_size())]
    [args] = [_runner_args(a) for a in _commands(gpu, "gpu_runner.grade")]
    assert args.no_gradebook and args.shard
    auto = (SLURM / "autograde_array.sbatch").read_text()
    assert re.search(r"^#SBATCH --array=0-\d+$", auto, re.M) and "--gres" not in auto
    [args] = [_class_args(a) for a in _commands(auto, "tpcourse.grade_class")]
    assert args.shard and args.shard_dir and not args.merge
    finish = (SLURM / "finish.sbatch").read_text()
    [merge] = [_class_args(a) for a in _commands(finish, "tpcourse.grade_class")]
    [load] = [_runner_args(a) for a in _commands(finish, "gpu_runner.grade")]
    assert merge.merge and load.load_reports


def test_kubernetes_manifests_pass_the_schema_and_call_the_entry_points():
    import copy

    import kubernetes_validate
    names = sorted(p.name for p in K8S.glob("*.yaml"))
    assert names == ["autograde-indexed-job.yaml", "finish-job.yaml", "grade-indexed-job.yaml"]
    for name in names:
        for version in K8S_VERSIONS:
            version = kubernetes_validate.latest_version() if version == "latest" else version
            kubernetes_validate.validate(_k8s(name), version, strict=True)
    broken = copy.deepcopy(_k8s("grade-indexed-job.yaml"))      # the check can fail
    _container(broken)["securityContext"]["procMounts"] = "Unmasked"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)

    gpu, auto = _k8s("grade-indexed-job.yaml"), _k8s("autograde-indexed-job.yaml")
    assert _container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == _largest_world_size()
    assert "nvidia.com/gpu" not in _container(auto)["resources"]["limits"]
    for doc in (gpu, auto):
        assert doc["spec"]["completionMode"] == "Indexed"
        shards = {e["name"]: e["value"] for e in _container(doc)["env"]}["SHARDS"]
        assert doc["spec"]["completions"] == int(shards)
    [args] = [_runner_args(a) for a in _commands(" ".join(_container(gpu)["args"]),
                                                 "gpu_runner.grade")]
    assert args.shard and args.no_gradebook
    [args] = [_class_args(a) for a in _commands(" ".join(_container(auto)["args"]),
                                                "tpcourse.grade_class")]
    assert args.shard and args.shard_dir
    command = _container(_k8s("finish-job.yaml"))["command"]
    assert (RUNNER / command[-1].split("/opt/tp-course/gpu_runner/")[1]).is_file()


def test_kubernetes_pods_grading_student_code_can_run_the_sandbox():
    """bubblewrap in a pod: a user namespace of the pod's own (hostUsers: false), root in it
    with CAP_SYS_ADMIN there (namespaces, mounts), /proc unmasked (a masked one cannot be
    mounted again in a new PID namespace), no seccomp/AppArmor filter that refuses mount and
    pivot_root. Both jobs that run student code carry the same context."""
    contexts = []
    for name in ("grade-indexed-job.yaml", "autograde-indexed-job.yaml"):
        doc = _k8s(name)
        assert doc["spec"]["template"]["spec"]["hostUsers"] is False, name
        contexts.append(_container(doc)["securityContext"])
    ctx = contexts[0]
    assert contexts[1] == ctx
    assert ctx["runAsUser"] == 0 and ctx["procMount"] == "Unmasked"
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert {"SYS_ADMIN", "NET_ADMIN", "SETUID", "SETGID", "SETPCAP"} <= set(ctx["capabilities"]["add"])
    assert "privileged" not in ctx and "allowPrivilegeEscalation" not in ctx   # API rule with SYS_ADMIN
    assert ctx["seccompProfile"]["type"] == ctx["appArmorProfile"]["type"] == "Unconfined"


def test_github_workflow_passes_the_schema_and_quotes_its_inputs(tmp_path):
    doc = yaml.safe_load(WORKFLOW.read_text())
    broken = tmp_path / "broken.yml"               # the check can fail
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs_on:"))
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.github-workflows", str(WORKFLOW), str(broken)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "broken.yml::$.jobs.grade" in proc.stdout, proc.stdout
    assert str(WORKFLOW) not in proc.stdout + proc.stderr, proc.stdout
    job = doc["jobs"]["grade"]
    assert job["runs-on"] == ["self-hosted", "gpu", f"gpus-{_largest_world_size()}"]
    runs = [step["run"] for step in job["steps"] if "run" in step]
    inputs = {name for name, value in job["env"].items() if "inputs." in value}
    assert inputs == {"ASSIGNMENT", "STUDENT"}
    for script in runs:
        assert "${{" not in script, script          # no expression pasted into a script
        for name in inputs:                          # every use of an input is quoted
            uses = re.findall(rf'.?\$\{{?{name}\b', script)
            assert all(use.startswith('"') for use in uses), (name, script)
    install = "\n".join(runs)
    assert "-m venv --system-site-packages" in install and "--no-deps -e ." in install
    assert "requirements-gpu.txt -c constraints.txt" in install
    assert not re.search(r"pip install[^\n]*\btorch\b", install)
    assert f"-m gpu_runner.versions --expect-gpus {_largest_world_size()}" in install
    [args] = [_runner_args(a) for a in _commands(install, "gpu_runner.grade")]
    assert args.student == ["X"]


def test_the_runner_warns_about_an_untested_torch(monkeypatch, capsys, tmp_path):
    from gpu_runner import grade, versions
    assert versions.warning(versions.torch_version()) == ""        # this machine's is tested
    assert versions.series("2.13.0+cu128") == "2.13"
    monkeypatch.setattr(versions, "TESTED_TORCH", {"1.0": "an old one"})
    with pytest.raises(SystemExit, match="no notebook with gpu_"):
        grade.main(["tp_torch", f"--course-root={tmp_path}"])       # the warning comes first
    err = capsys.readouterr().err
    assert f"torch {versions.torch_version()} is not a tested version (tested: 1.0.x" in err


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
