"""gpu_runner, the fast parts: plan, extraction, counting names, the process supervisor, the
scale-out files, the catalogue, the machine rules (backend, world sizes, the jobs' environment,
faults) with a mocked GPU count, the judge on synthetic and malformed reports, and the rank side
with the judge on forked gloo ranks (tests/forked_runner.py). (The torchrun end-to-end tests, in
the sandbox, are test_gpu_runner_slow.py.)"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from gpu_runner import extract, machine
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
    cells = set(extract.gpu_cells(source_nb))
    planned = planned_checks(make_plan([1, 2, 3, 4], cells=cells))
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


def test_students_and_shards(tmp_path):
    from gpu_runner.grade import students
    for name in ("d", "a", "c", "b", "e"):
        (tmp_path / "submitted" / name / "tp_torch").mkdir(parents=True)
    (tmp_path / "submitted" / "x" / "other").mkdir(parents=True)
    assert students(tmp_path, "tp_torch", [], None) == ["a", "b", "c", "d", "e"]
    shards = [students(tmp_path, "tp_torch", [], f"{i}/2") for i in range(2)]
    assert shards == [["a", "c", "e"], ["b", "d"]]
    assert students(tmp_path, "tp_torch", ["c"], None) == ["c"]


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


# -- the machine rules: the same grade on every machine ----------------------------------------
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
        planned = planned_checks(make_plan(sizes, cells=cells))
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


def test_world_sizes_are_a_course_setting(tmp_path, capsys):
    from gpu_runner.settings import course_world_sizes
    assert "c.GpuRunner.world_sizes = [1, 2, 3, 4]" in (REPO / "nbgrader_config.py").read_text()
    assert course_world_sizes(REPO) == (1, 2, 3, 4)
    root = _course_root(tmp_path, "c.GpuRunner.world_sizes = [2, 1, 2]\n")
    assert backend_and_sizes(root, "gloo", None) == ("gloo", (1, 2))
    assert "WARNING" not in capsys.readouterr().err
    assert backend_and_sizes(root, "gloo", "3,1") == ("gloo", (1, 3))
    assert "grades differ from the course's" in capsys.readouterr().err
    with pytest.raises(machine.Refused):
        backend_and_sizes(root, "gloo", "0,2")


def test_job_environment_pins_the_network_and_drops_the_sites():
    site = {"PATH": "/bin", "NCCL_DEBUG": "INFO", "NCCL_P2P_DISABLE": "1",
            "NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0", "NCCL_NET": "IB",
            "NCCL_NET_PLUGIN": "aws-ofi", "NCCL_COLLNET_ENABLE": "1",
            "NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_BLOCKING_WAIT": "0",
            "GLOO_SOCKET_IFNAME": "eth0"}
    env, dropped = machine.job_env(site, "nccl")
    assert {k: env[k] for k in ("NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "GLOO_SOCKET_IFNAME")} \
        == {"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    assert {k: env[k] for k in machine.PINNED_NCCL} == machine.PINNED_NCCL
    assert env["TORCH_NCCL_BLOCKING_WAIT"] == "1"
    for gone in ("NCCL_IB_HCA", "NCCL_NET", "NCCL_NET_PLUGIN", "NCCL_COLLNET_ENABLE",
                 "NCCL_ASYNC_ERROR_HANDLING"):
        assert gone not in env and gone in dropped, gone
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_P2P_DISABLE"] == "1" and env["PATH"] == "/bin"
    assert "NCCL_SOCKET_IFNAME" in dropped and "PATH" not in dropped
    gloo, _ = machine.job_env(site, "gloo")
    assert not any(k.startswith("TORCH_NCCL_") for k in gloo) and gloo["GLOO_SOCKET_IFNAME"] == "lo"
    from gpu_runner.launch import confined_env
    assert set(confined_env({**env, "SECRET_TOKEN": "x"})) >= set(machine.PINNED_NETWORK)
    assert "SECRET_TOKEN" not in confined_env({**env, "SECRET_TOKEN": "x"})


def test_pinned_watchdog_settings_are_names_this_torch_reads():
    import torch
    header = (Path(torch.__file__).parent / "include" / "torch" / "csrc" / "distributed" / "c10d"
              / "ProcessGroupNCCL.hpp")
    if not header.exists():
        pytest.skip("this torch ships no c10d headers")
    text = header.read_text()
    for name in machine.PINNED_NCCL:
        assert f'"{name}"' in text, name


def test_nccl_rank_binds_its_device_before_the_students_code(monkeypatch, tmp_path):
    """worker.main on NCCL, everything CUDA mocked: set_device, then the process groups (with
    device_id, every group warmed up), then the student's module."""
    import torch
    import torch.distributed as dist
    from gpu_runner import worker
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(worker.counting, "use_dispatch", lambda on: None)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda *a, **k: calls.append(("init", a[0], k.get("device_id"))))
    monkeypatch.setattr(dist, "new_group", lambda ranks=None, **k: ("group", tuple(ranks or ()),
                                                                    k.get("backend")))
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: (
        calls.append(("warm", group)), t.fill_(4 if group is None else len(group[1]))))
    monkeypatch.setattr(dist, "barrier", lambda group=None: calls.append(("barrier", group[2])))
    monkeypatch.setattr(torch, "ones", lambda *a, **k: torch.zeros(1))   # no CUDA here
    monkeypatch.setattr(worker, "load_module", lambda path: calls.append(("import", path)))

    class Done(Exception):
        pass
    monkeypatch.setattr(worker, "finish", lambda rec, code: (_ for _ in ()).throw(Done(code)))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(Done):
        worker.main(["--module", "m.py", "--out", str(tmp_path), "--units", "",
                     "--sizes", "1,2,4", "--backend", "nccl"])
    assert calls[0] == ("set_device", 3)
    assert calls[1] == ("init", "nccl", torch.device("cuda", 3))
    warmed = [c[1] for c in calls if c[0] == "warm"]
    assert warmed == [("group", (3,), None), ("group", (2, 3), None), None]   # every size
    assert [c for c in calls if c[0] == "barrier"] == [("barrier", "gloo")] * 3
    assert calls[-1] == ("import", "m.py")
    assert machine.init_options("gloo", 3) == {}


def test_fault_kinds():
    from gpu_runner.observe import fault_kind
    assert fault_kind(RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel "
                                   "errors might be asynchronously reported")) == "cuda"
    assert fault_kind(RuntimeError("CUDA error: an illegal memory access was encountered")) \
        == "cuda"
    assert fault_kind(RuntimeError("[..] Timed out waiting 5000ms for recv")) == "comm"
    assert fault_kind(type("DistBackendError", (RuntimeError,), {})("NCCL communicator")) \
        == "comm"
    assert fault_kind(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) is None
    assert fault_kind(ValueError("output (3, 4), expected (3, 7)")) is None


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
    plan = make_plan([1, 2], timing=False)
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
    plan, cfg = make_plan([1, 2], timing=False), Config(sizes=(1, 2))
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
    u = Unit.parse("column.forward@2")
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


def test_record_reading_is_bounded(tmp_path, monkeypatch):
    from gpu_runner import launch
    out = tmp_path / "launch0"
    launch.job_dir(out).mkdir(parents=True)
    line = json.dumps({"event": "end", "unit": "row.forward@1", "obs": {}}) + "\n"
    (launch.job_dir(out) / "rank0.jsonl").write_text(line + "x" * 5000 + "\n" + line)
    monkeypatch.setattr(launch, "MAX_BYTES_PER_RANK", 1000)
    assert launch._read_records(out) == {0: [json.loads(line)]}


def _obs_tensor(values):
    import torch
    from gpu_runner.records import encode_tensor
    return encode_tensor(torch.as_tensor(values, dtype=torch.float32))


def test_the_judge_names_the_mistake_with_world_size_and_rank():
    """Reports shaped like two classic mistakes, judged against the grader's own reference."""
    from gpu_runner import data
    from gpu_runner.judge import judge
    from tpgrade import tensors as V
    u = Unit.parse("row.forward@3")
    case = data.row(data.seed_of("row", "forward"))
    dense = V.linear(case.x, case.w, case.b)
    verdicts = judge(u, _ends(u, {r: {"y": _obs_tensor(dense + 2 * case.b),
                                      "counts": {"allreduce": 1}} for r in range(3)}))
    ok, detail = verdicts["row.forward"]
    assert not ok and detail.startswith("rank 0 of 3: ") and \
        "bias added on every rank before the all-reduce (counted 3 times)" in detail
    assert verdicts["counts.row_forward"] == (True, "")
    u = Unit.parse("row.backward@2")
    case = data.row(data.seed_of("row", "backward"))
    dx, dw, db = V.linear_grads(case.x, case.w, case.g)

    def obs(r):
        lo, hi = data.shard(7, r, 2)
        return {"gx": _obs_tensor(dx[:, lo:hi]), "gw": _obs_tensor(dw[:, lo:hi]),
                "gb": _obs_tensor(db if r == 0 else db * 0), "counts": {}}
    verdicts = judge(u, _ends(u, {r: obs(r) for r in range(2)}))
    assert verdicts["row.grad_weight"] == (True, "") and verdicts["row.grad_input"] == (True, "")
    ok, detail = verdicts["row.grad_bias"]
    assert not ok and detail.startswith("rank 1 of 2:") and "rank 0 only" in detail


def test_report_comments_list_every_failed_check_and_no_grader_paths(tmp_path):
    from gpu_runner import launch, report
    plan = make_plan([1, 2, 3, 4], timing=False)
    cfg = launch.Config()
    results = {u.id: launch._failed(u, "failed", f"rank 0 of {u.size}: wrong {u.id}")
               for u in plan}
    rep = report.build("s", "tp_torch", "tp_torch", cat.GPU_CELLS, plan, results, [], cfg, 1.0)
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


def test_the_judging_side_imports_no_torch_and_no_grader_module_imports_tpcourse():
    code = ("import sys; import gpu_runner.judge, gpu_runner.launch, gpu_runner.report, "
            "gpu_runner.reference, gpu_runner.records, gpu_runner.data, tpgrade.tensors, "
            "gpu_runner.judge_attention, gpu_runner.data_attention, tpgrade.attention_backward; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    for path in RUNNER.glob("*.py"):
        if path.name != "gpu_check.py":     # instructor tooling on top of the grader
            assert "tpcourse" not in path.read_text(), path


def test_reference_refusal_names_the_check_and_the_log_and_its_cache_key(tmp_path):
    from gpu_runner import launch, reference
    rep = {"score": 23.0, "max_score": 24, "launches": [{"log": "/r/launch0/torchrun.log"}],
           "checks": {"row.forward@1": {"ok": True, "detail": ""},
                      "row.forward@2": {"ok": False, "detail": "rank 1 of 2: differs"}}}
    text = reference.failure(rep, Path("src.ipynb"), launch.Config())
    assert "row.forward@2: rank 1 of 2: differs" in text and "/r/launch0/torchrun.log" in text
    root = _course_root(tmp_path)
    key = reference.cache_key(SOURCE, root, launch.Config())
    assert key == reference.cache_key(SOURCE, root, launch.Config())
    assert key != reference.cache_key(SOURCE, root, launch.Config(sizes=(1, 2)))
    with open(root / "nbgrader_config.py", "a") as f:
        f.write("c.Sandbox.memory_mb = 300\n")
    assert key != reference.cache_key(SOURCE, root, launch.Config())


# -- the rank side and the judge on forked gloo ranks ------------------------------------------
def _graded(student, tmp_path, sizes=(1, 2, 3)):
    import forked_runner
    return forked_runner.grade(cat.BY_NAME[student], sizes, tmp_path)


def _lost(rep):
    return {gid for gid, c in rep["cells"].items() if c["score"] < c["points"]}


def test_reference_full_marks_and_every_rank_holds_its_own_master_weight(tmp_path):
    from gpu_runner import data
    rep = _graded("torch_reference", tmp_path)
    assert rep["score"] == rep["max_score"], {k: v for k, v in rep["checks"].items()
                                               if not v["ok"]}
    case = data.column(1)
    masters = [case.master(r, 3) for r in range(3)]
    for r, (lo, hi) in enumerate(data.balanced(7, 3)):      # its shard true, the rest noise
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


def test_uneven_all_gather_is_refused_as_gloo_refuses_it():
    """Under NCCL the ranks run in observe.EqualAllGather (NCCL would accept uneven sizes);
    here on gloo: the mode's refusal comes first, and even sizes pass through."""
    from tpgrade.torch_ranks import run_on_ranks
    results = run_on_ranks(_gather_in_mode, 2, timeout=60)
    assert results[0][0] == [[0.0, 0.0], [1.0, 1.0]]
    assert "all_gather of tensors of different sizes" in results[0][1]


def _gather_in_mode():
    import torch
    import torch.distributed as dist
    from gpu_runner.observe import EqualAllGather
    rank = dist.get_rank()
    with EqualAllGather():
        parts = [torch.empty(2) for _ in range(2)]
        dist.all_gather(parts, torch.full((2,), float(rank)))
        try:
            dist.all_gather([torch.empty(2), torch.empty(1)], torch.ones(2 - rank))
            refused = ""
        except RuntimeError as exc:
            refused = str(exc)
    return [p.tolist() for p in parts], refused


# -- make gpu-check, the parts a CPU machine can run -------------------------------------------
def test_gpu_check_without_a_gpu_says_so_and_skips(monkeypatch, capsys):
    from gpu_runner import gpu_check
    monkeypatch.setattr(machine, "gpu_count", lambda: 0)
    assert gpu_check.main() == gpu_check.EXIT_NO_GPU == 77
    assert "gpu-check: no GPU on this machine" in capsys.readouterr().out
    make = subprocess.run(["make", "-n", "gpu-check"], cwd=REPO, capture_output=True, text=True)
    assert "-m gpu_runner.gpu_check" in make.stdout and "pip" not in make.stdout


def _check_report(backend="nccl", sizes=(1,), lost=()):
    cells = {gid: {"score": 0.0 if gid in lost else float(p), "points": p}
             for gid, p in cat.GPU_CELLS.items()}
    return {"backend": backend, "world_sizes": list(sizes), "sandboxed": True, "cells": cells,
            "score": 0, "max_score": 24, "seconds": 1}


def test_gpu_check_verdict():
    from gpu_runner.gpu_check import STUDENTS, expected_losses, verdict
    expected = {s: expected_losses(cat.BY_NAME[s].loses) for s in STUDENTS}
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
