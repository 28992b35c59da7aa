"""gpu_runner, the fast parts that hold for every torch assignment: counting names, the
students and shards, the process supervisor, the scale-out files, the machine rules (world
sizes, the jobs' environment, faults) with a mocked GPU count, the records, the judging side's
imports, and `make gpu-check` without a GPU. What one assignment's units do (its plan, data,
rank side and judge, on synthetic reports and on forked gloo ranks) is tested in its folder,
assignments/<name>/tests/. (The torchrun end-to-end tests, in the sandbox, are
test_gpu_runner_slow.py.)"""
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

import assignments
from gpu_runner import machine
from gpu_runner.counting import kind
from gpu_runner.grade import backend_and_sizes, parse_args
from tpcourse import REPO

TORCH = [a.name for a in assignments.discover() if a.has_gpu]
RUNNER = REPO / "gpu_runner"


def test_collective_names_are_canonical():
    assert kind("all_reduce") == kind("allreduce_") == kind("allreduce_coalesced_") == "allreduce"
    assert kind("all_gather") == kind("_allgather_base") == kind("all_gather_into_tensor") \
        == kind("allgather_into_tensor_coalesced") == "allgather"
    assert kind("reduce_scatter_tensor") == "reducescatter"


def test_students_and_shards(tmp_path):
    from gpu_runner.grade import students
    for name in ("d", "a", "c", "b", "e"):
        (tmp_path / "submitted" / name / "hw1").mkdir(parents=True)
    (tmp_path / "submitted" / "x" / "other").mkdir(parents=True)
    assert students(tmp_path, "hw1", [], None) == ["a", "b", "c", "d", "e"]
    shards = [students(tmp_path, "hw1", [], f"{i}/2") for i in range(2)]
    assert shards == [["a", "c", "e"], ["b", "d"]]
    assert students(tmp_path, "hw1", ["c"], None) == ["c"]


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
    from tpconfig import load_config
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
        grade.main([TORCH[0], f"--course-root={tmp_path}"])        # the warning comes first
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
        worker.main(["--assignment", TORCH[0], "--module", "m.py", "--out", str(tmp_path),
                     "--units", "", "--sizes", "1,2,4", "--backend", "nccl"])
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


def test_record_reading_is_bounded(tmp_path, monkeypatch):
    from gpu_runner import launch
    out = tmp_path / "launch0"
    launch.job_dir(out).mkdir(parents=True)
    line = json.dumps({"event": "end", "unit": "row.forward@1", "obs": {}}) + "\n"
    (launch.job_dir(out) / "rank0.jsonl").write_text(line + "x" * 5000 + "\n" + line)
    monkeypatch.setattr(launch, "MAX_BYTES_PER_RANK", 1000)
    assert launch._read_records(out) == {0: [json.loads(line)]}


def test_the_judging_side_imports_no_torch_and_no_grader_module_imports_tpcourse():
    """The grader's side of every torch assignment (its gpu/judge.py and gpu/data.py, its dense
    references) is numpy only; the grader packages import no instructor tooling."""
    judging = [f"{a}.gpu.{part}" for a in (assignments.get(n).package for n in TORCH)
               for part in ("judge", "data")]
    code = ("import sys; import gpu_runner.judge, gpu_runner.launch, gpu_runner.report, "
            "gpu_runner.reference, gpu_runner.records, gpu_runner.data, tpgrade.tensors, "
            "tpgrade.verdict, tpgrade.dense, "
            + ", ".join(judging) + "; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    for path in RUNNER.glob("*.py"):
        assert "tpcourse" not in path.read_text(), path


def test_uneven_all_gather_is_refused_as_gloo_refuses_it():
    """Under NCCL the ranks run in observe.EqualAllGather (NCCL would accept uneven sizes);
    here on gloo: the mode's refusal comes first, and even sizes pass through."""
    from tpsim.ranks import run_on_ranks
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
    from tpcourse import gpu_check
    monkeypatch.setattr(machine, "gpu_count", lambda: 0)
    assert gpu_check.main() == gpu_check.EXIT_NO_GPU == 77
    assert "gpu-check: no GPU on this machine" in capsys.readouterr().out
    make = subprocess.run(["make", "-n", "gpu-check"], cwd=REPO, capture_output=True, text=True)
    assert "-m tpcourse.gpu_check" in make.stdout and "pip" not in make.stdout

