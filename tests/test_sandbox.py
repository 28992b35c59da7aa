"""The grading sandbox on its own: who the student's code runs as, what it can see, reach,
signal and consume, and that grading refuses when the sandbox is missing (issue 4)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from tpcourse import REPO
from tpsandbox import UID_ENV, Sandbox, SandboxUnavailable, problem, require, wrap

pytestmark = [pytest.mark.slow,     # sandboxed kernels and graders
              pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")]

UID = 64321  # a uid of its own, so that leftover processes are easy to find


@pytest.fixture(autouse=True)
def _own_uid(monkeypatch):
    # The environment's uid (set per pytest-xdist worker in conftest) would override UID.
    monkeypatch.delenv(UID_ENV, raising=False)


def run_inside(code: str, course: Path, *, timeout=60, **limits):
    """Run python `code` sandboxed as a kernel would be: scratch bound at the notebook folder
    inside `course`, the course itself hidden. Returns (exit status, stdout, stderr)."""
    workdir = course / "autograded" / "alice" / "a1"
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = course.parent / f"scratch-{time.monotonic_ns()}"
    argv = wrap([sys.executable, "-c", textwrap.dedent(code)], workdir=str(workdir),
                scratch=str(scratch), hidden=[str(course)], uid=UID, **limits)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture()
def course(tmp_path):
    root = tmp_path / "course"
    (root / "source" / "a1").mkdir(parents=True)
    (root / "source" / "a1" / "a1.ipynb").write_text("SOLUTIONS AND HIDDEN TESTS")
    (root / "gradebook.db").write_text("grades")
    (root / "autograded" / "bob" / "a1").mkdir(parents=True)
    (root / "autograded" / "bob" / "a1" / "a1.ipynb").write_text("bob's work")
    return root


def test_runs_unprivileged_in_its_own_pid_namespace(course):
    code, out, err = run_inside("""
        import os, json
        print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                          "groups": os.getgroups(), "pid": os.getpid(),
                          "procs": sorted(int(p) for p in os.listdir('/proc') if p.isdigit())}))
    """, course)
    assert code == 0, err
    info = json.loads(out)
    assert info["uid"] == info["euid"] == UID and info["gid"] == UID and info["groups"] == []
    assert info["pid"] < 10 and len(info["procs"]) <= 3, info  # bwrap's init, the program


def test_cannot_signal_the_grader(course):
    code, out, err = run_inside(f"""
        import os, signal
        for pid in (1, os.getppid(), {os.getpid()}):
            try:
                os.kill(pid, signal.SIGKILL)
                print(pid, "killed")
            except (PermissionError, ProcessLookupError) as e:
                print(pid, type(e).__name__)
    """, course)
    assert code == 0, err
    assert "killed" not in out, out


def test_sees_neither_course_nor_checkout_and_writes_only_its_scratch(course):
    code, out, err = run_inside(f"""
        import os, json
        root = {str(course)!r}
        res = {{"course": sorted(os.listdir(root)),
               "autograded": sorted(os.listdir(root + "/autograded")),
               "repo": sorted(os.listdir({str(REPO)!r}))}}
        for name, path in [("source", root + "/source/a1/a1.ipynb"),
                           ("gradebook", root + "/gradebook.db"),
                           ("bob", root + "/autograded/bob/a1/a1.ipynb"),
                           ("repo_source", {str(REPO / "source")!r})]:
            try:
                open(path).read() if not os.path.isdir(path) else os.listdir(path)
                res[name] = "READ"
            except OSError as e:
                res[name] = type(e).__name__
        for name, path in [("w_usr", "/usr/evil"), ("w_course", root + "/evil"),
                           ("w_venv", {sys.prefix!r} + "/evil"), ("w_scratch", "here.txt")]:
            try:
                open(path, "w").write("x")
                res[name] = "WROTE"
            except OSError as e:
                res[name] = type(e).__name__
        print(json.dumps(res))
    """, course)
    assert code == 0, err
    res = json.loads(out)
    assert res["course"] == ["autograded"] and res["autograded"] == ["alice"]
    assert "source" not in res["repo"] and res["repo_source"] == "FileNotFoundError"
    assert {res[k] for k in ("source", "gradebook", "bob")} == {"FileNotFoundError"}
    assert all(res[k] != "WROTE" for k in ("w_usr", "w_course", "w_venv")), res
    assert res["w_scratch"] == "WROTE"
    assert not (course / "autograded" / "alice" / "a1" / "here.txt").exists()  # went to scratch


def test_no_network_but_loopback(course):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        code, out, err = run_inside(f"""
            import socket
            for host, port in [("127.0.0.1", {port})]:   # the grader's loopback listener
                try:
                    socket.create_connection((host, port), timeout=3).close()
                    print(host, "CONNECTED")
                except OSError as e:
                    print(host, type(e).__name__, e)
            s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()   # its own loopback works
            c = socket.create_connection(s.getsockname(), timeout=3); print("loopback ok")
        """, course)
    finally:
        server.close()
    assert code == 0, err
    assert "CONNECTED" not in out and "loopback ok" in out, out


def test_resource_limits_are_set(course):
    code, out, err = run_inside("""
        import resource, json
        print(json.dumps({n: resource.getrlimit(getattr(resource, "RLIMIT_" + n))[0]
                          for n in ("AS", "CPU", "NPROC", "NOFILE", "FSIZE")}))
    """, course, memory_mb=1024, cpu_seconds=42, max_processes=77, max_open_files=99,
        max_file_mb=3)
    assert code == 0, err
    assert json.loads(out) == {"AS": 1024 * 2**20, "CPU": 42, "NPROC": 77, "NOFILE": 99,
                               "FSIZE": 3 * 2**20}


def test_memory_and_process_limits_bite(course):
    code, out, err = run_inside("""
        import os
        try:
            bytearray(600 * 2**20)
            print("allocated")
        except MemoryError:
            print("MemoryError")
        kids = []
        try:
            for _ in range(500):
                pid = os.fork()
                if pid == 0:
                    import time; time.sleep(1); os._exit(0)
                kids.append(pid)
        except OSError as e:
            print("fork stopped at", len(kids), type(e).__name__)
        for pid in kids:
            os.waitpid(pid, 0)
    """, course, memory_mb=512, max_processes=40)
    assert code == 0, err
    assert "MemoryError" in out and "fork stopped at" in out, out
    assert int(out.split("fork stopped at")[1].split()[0]) < 40


def _processes_of(uid: int) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.stat(f"/proc/{p}").st_uid == uid:
                    pids.append(int(p))
            except OSError:
                pass
    return pids


def test_whole_tree_dies_with_the_sandbox(course):
    """A daemonised grandchild (double fork, setsid) does not outlive the program or a SIGKILL
    of bwrap."""
    daemon = """
        import os, time, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(120); os._exit(0)
            os._exit(0)
        time.sleep(0.5)
        print("started", flush=True)
    """
    code, out, err = run_inside(daemon, course)
    assert code == 0 and "started" in out, err
    time.sleep(0.5)
    assert _processes_of(UID) == []
    # the same, with the sandbox killed from outside while everything runs
    workdir = course / "autograded" / "alice" / "a1"
    argv = wrap([sys.executable, "-c", textwrap.dedent(daemon) + "\ntime.sleep(120)"],
                workdir=str(workdir), scratch=str(course.parent / "s2"), hidden=[str(course)],
                uid=UID)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "started"
    assert len(_processes_of(UID)) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 5
    while _processes_of(UID) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_of(UID) == []


def test_refuses_clearly_without_bwrap_unless_opted_out():
    missing = Sandbox(bwrap="/nonexistent/bwrap")
    why = problem(missing)
    assert "unavailable" in why and "bubblewrap" in why and "c.Sandbox.enabled = False" in why
    with pytest.raises(SandboxUnavailable):
        require(missing)
    assert problem(Sandbox(bwrap="/nonexistent/bwrap", enabled=False)) == ""
    assert wrap(["true"], workdir="/", enabled=False) == ["true"]


# -- through stock `nbgrader autograde`, configured from nbgrader_config.py -----------------

SANDBOX_CONFIG = "from tpgrader import configure\nconfigure(c)\n"


def _toy(code: str):
    meta = {"nbgrader": {"grade": False, "solution": True, "locked": False,
                         "grade_id": "sol_double", "schema_version": 3}}
    test = {"nbgrader": {"grade": True, "solution": False, "locked": True, "points": 1,
                         "grade_id": "test_double", "schema_version": 3}}
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                               "display_name": "Python 3"}})
    nb.cells = [new_code_cell(code, metadata=meta),
                new_code_cell("assert double(2) == 4", metadata=test)]
    return nb


@pytest.fixture(scope="module")
def toy_course(make_course):
    course = make_course("sandbox_toy", assignments=[], extra_config=SANDBOX_CONFIG)
    (course.root / "source" / "toy").mkdir(parents=True)
    nbformat.write(_toy("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n"
                        "    ### END SOLUTION"), str(course.root / "source" / "toy" / "toy.ipynb"))
    course.generate("toy")
    course.place_submission("good", "toy", {"toy.ipynb": _toy("def double(x):\n    return x + x")})
    course.place_submission("killer", "toy", {"toy.ipynb": _toy(
        "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nfinally:\n"
        "    def double(x):\n        return 2 * x")})
    return course


def test_stock_autograde_is_sandboxed_and_survives_a_parent_killer(toy_course):
    proc = toy_course.nbgrader("autograde", "toy", "--force", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert toy_course.scores("toy", "good") == {"toy": {"test_double": (1.0, 1.0)}}
    assert toy_course.scores("toy", "killer") == {"toy": {"test_double": (1.0, 1.0)}}
    nb = nbformat.read(str(toy_course.root / "autograded/killer/toy/toy.ipynb"), 4)
    assert "PermissionError" in json.dumps(nb.cells[0].outputs)


def test_stock_autograde_refuses_without_sandbox_and_obeys_the_opt_out(toy_course):
    cfg = toy_course.root / "nbgrader_config.py"
    original = cfg.read_text()
    try:
        cfg.write_text(original + "\nc.Sandbox.bwrap = '/nonexistent/bwrap'\n")
        proc = toy_course.nbgrader("autograde", "toy", "--force", "--student=good", check=False)
        assert proc.returncode != 0
        assert "sandbox is unavailable" in proc.stdout + proc.stderr
        cfg.write_text(original + "\nc.Sandbox.bwrap = '/nonexistent/bwrap'\n"
                       "c.Sandbox.enabled = False\n")
        proc = toy_course.nbgrader("autograde", "toy", "--force", "--student=good", check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Sandbox disabled" in proc.stdout + proc.stderr
        assert toy_course.scores("toy", "good") == {"toy": {"test_double": (1.0, 1.0)}}
    finally:
        cfg.write_text(original)


def test_stock_autograde_refuses_when_the_judge_cannot_start_there(toy_course):
    """The judge's student process cannot import what it needs (here: its own package hidden
    like instructor tooling): grading stops with the cause, and nobody's grade changes."""
    cfg = toy_course.root / "nbgrader_config.py"
    original = cfg.read_text()
    toy_course.nbgrader("autograde", "toy", "--student=good")   # graded once (kept if so)
    before = toy_course.scores("toy", "good")
    try:
        cfg.write_text(original + "\nc.Sandbox.private_packages = ['tpcourse', 'tpjudge']\n")
        proc = toy_course.nbgrader("autograde", "toy", "--force", "--student=good", check=False)
        said = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "the judge cannot grade here" in said and "tpjudge" in said
        assert toy_course.scores("toy", "good") == before
    finally:
        cfg.write_text(original)


# -- wherever the grader's Python lives --------------------------------------------------------

@pytest.fixture(scope="module")
def tmp_python(tmp_path_factory):
    """A grader's Python in a venv under /tmp (as CI systems and quick trials make them, here
    inside pytest's 0700 temp folders): its own prefix and site-packages, and a .pth that adds
    this project's environment, a sys.path entry outside the prefix."""
    import site
    venv = tmp_path_factory.mktemp("grader-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [purelib] = venv.glob("lib/python*/site-packages")
    (purelib / "tp_project.pth").write_text(
        f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
    python = venv / "bin" / "python"
    assert str(python).startswith(tempfile.gettempdir() + "/")
    return python


def _env_for(python: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(python.parent), os.path.dirname(sys.executable),
                                   env.get("PATH", "")])   # nbgrader runs `alembic` by name
    return {**env, **extra}


def test_a_grader_python_under_tmp_grades_in_the_sandbox(toy_course, tmp_python):
    """The sandbox's private /tmp used to hide such an interpreter: every kernel died before
    replying to kernel_info. Its prefix and sys.path entries are now shown, read-only."""
    proc = subprocess.run([str(tmp_python), "-m", "nbgrader", "autograde", "toy", "--force",
                           "--student=good"], cwd=toy_course.root, capture_output=True,
                          text=True, timeout=300, env=_env_for(tmp_python))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert toy_course.scores("toy", "good") == {"toy": {"test_double": (1.0, 1.0)}}


def test_an_unreadable_import_path_stops_grading_naming_it(toy_course, tmp_python, tmp_path):
    """A PYTHONPATH folder the sandbox uid cannot read (mode 0): the trial sandbox imports as
    a kernel would, and grading refuses (exit 2) naming the folder, instead of a zero for
    every student."""
    locked = tmp_path / "locked-packages"
    locked.mkdir()
    locked.chmod(0)
    cmd = [str(tmp_python), "-m", "tpcourse.grade_class", "toy", "--no-progress",
           f"--root={toy_course.root}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=_env_for(tmp_python, PYTHONPATH=str(locked)))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"unreadable: {locked}" in proc.stderr and "kernel_info" in proc.stderr, proc.stderr


def test_exposures_follow_symlinks_and_never_uncover_a_hidden_tree(tmp_path):
    from tpsandbox.command import PRIVATE_TMP, exposures
    real = tmp_path / "real" / "site-packages"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    hidden = str(tmp_path / "course")
    os.mkdir(hidden)
    covered = [hidden, *PRIVATE_TMP]
    binds = exposures([str(tmp_path / "link"), hidden, str(tmp_path), "/tmp", "/usr/lib"],
                      covered)
    assert sorted(binds) == sorted([(str(real), str(real)), (str(real), str(tmp_path / "link"))])
