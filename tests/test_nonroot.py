"""Grading as an instructor who is not root (issue 4): stock `nbgrader autograde` and
`python -m tpcourse.grade_class` run by an unprivileged uid give the grades a root grader
gives, the hostile students gain nothing, and where unprivileged user namespaces are off,
grading refuses with a message that says what to do.

The grader here is uid 65533 (no passwd entry needed), made from root by a launcher that
switches uid completely before it runs anything, so that the interpreter is found, loaded and
run with that uid's rights only. An instructor's own Python is readable by them; where this
checkout's interpreter lies in a tree the uid cannot enter (a pyenv build under /root, mode
0700), the launcher shows it that interpreter, and nothing else of the tree, through a private
mount namespace. The refusal is shown by running the same grader in a user namespace whose
limit on further user namespaces is 0, which is what `sysctl user.max_user_namespaces=0` does.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import nbformat
import pytest

from tpcourse import REPO
from tpcourse.cycle import Course
from tpsandbox import problem
from tpcourse.submissions import build

pytestmark = [
    pytest.mark.nbgrader,
    pytest.mark.skipif(os.geteuid() != 0, reason="makes an unprivileged grader from root (run "
                       "as a non-root user, the whole suite already grades without root)"),
    pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available"),
]

UID = 65533
import assignments
from tpcourse.catalogue import examples, students

# Exercised on the assignment whose examples hold the hostile students (their HOSTILE).
A = next(a for a in assignments.names() if getattr(examples(a), "HOSTILE", ()))
H = examples(A).hostile
CONFIG = "from tpgrader import configure\nconfigure(c)\nc.Execute.timeout = 15\n"
STAMP = "2026-11-20 10:00:00.000000 UTC"
ORDINARY = [s for s in students(A) if s.student in ("reference", "np_split")]
HOSTILE = [H.by_name(n) for n in ("h_read_source", "h_write_gradebook", "h_kill_parent")]
STUDENTS = sorted([s.student for s in ORDINARY] + [h.student for h in HOSTILE])

# Runs argv as spec["uid"] (setresuid, no groups, no capabilities) in a private mount
# namespace, after mounting over each tree the uid cannot enter an empty one that shows only
# the paths it must reach; with spec["no_userns"], inside a user namespace (every uid mapped
# to itself) that may make no further user namespaces.
_LAUNCHER = r'''
import ctypes, json, os, sys, tempfile
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18

def check(ok, what):
    if not ok:
        sys.exit(f"launcher: {what}: {os.strerror(ctypes.get_errno())}")

def mount(src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s else None
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) == 0,
          f"mount {target}")

if spec["no_userns"]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid:
        os.read(r1, 1)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("0 0 4294967295\n")
        os.write(w2, b"x")
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0, "unshare")
    os.write(w1, b"x")
    os.read(r2, 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
else:
    check(libc.unshare(CLONE_NEWNS) == 0, "unshare")
mount(None, "/", None, MS_REC | MS_PRIVATE)
for blocked, needed in spec["reveal"].items():
    stages = []
    for path in needed:
        stages.append((tempfile.mkdtemp(), path))
        mount(path, stages[-1][0], None, MS_BIND | MS_REC)
    mount("tmpfs", blocked, "tmpfs", 0, "mode=0755,size=1m")
    for stage, path in stages:
        os.makedirs(path, exist_ok=True)
        mount(stage, path, None, MS_MOVE)
        os.rmdir(stage)
uid = spec["uid"]
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
os.chdir(spec["cwd"])
os.execve(spec["argv"][0], spec["argv"], spec["env"])
'''


def _enterable(path: str) -> bool:
    """Can UID (in no group) search this directory?"""
    st = os.stat(path)
    return bool(st.st_mode & (0o100 if st.st_uid == UID else 0o001))


def _reveal() -> dict[str, list[str]]:
    """{tree UID cannot enter: [paths inside it the grader needs]}."""
    import site
    needed = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)),
              str(REPO), *site.getsitepackages()]
    needed = sorted({os.path.realpath(p) for p in needed if os.path.isdir(p)})
    needed = [p for p in needed if not any(p.startswith(q + "/") for q in needed)]
    out: dict[str, list[str]] = {}
    for path in needed:
        parts = Path(path).parts
        for i in range(1, len(parts)):
            ancestor = str(Path(*parts[:i]))
            if not _enterable(ancestor):
                out.setdefault(ancestor, []).append(path)
                break
    return out


class User:
    """Runs commands as UID, with a HOME and TMPDIR of its own under `base`."""

    def __init__(self, base: Path):
        self.base = base
        self.home, self.tmp = base / "home", base / "tmp"
        self.reveal = _reveal()

    def run(self, argv, *, cwd, no_userns=False, timeout=900):
        env = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"]),
               "HOME": str(self.home), "TMPDIR": str(self.tmp), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0"}
        spec = {"uid": UID, "no_userns": no_userns, "reveal": self.reveal, "cwd": str(cwd),
                "argv": [str(a) for a in argv], "env": env}
        return subprocess.run([sys.executable, "-c", _LAUNCHER, json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)

    def python(self, *args, cwd, **kw):
        return self.run([sys.executable, *args], cwd=cwd, **kw)


def _chown_tree(path: Path):
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.lchown(name, UID, UID)


def _processes_of(uid, settle=5.0) -> list[str]:
    """Processes of `uid` still there after up to `settle` s (exiting ones take a moment)."""
    import time
    deadline = time.time() + settle
    while True:
        left = _scan(uid)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.1)


def _scan(uid) -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
                out.append(f"{pid} {cmd or open(f'/proc/{pid}/stat').read()[:80]}")
        except OSError:
            continue
    return out


@pytest.fixture(scope="module")
def user():
    if _scan(UID):
        pytest.skip(f"uid {UID} already runs processes here: {_scan(UID)[:3]}")
    base = Path(tempfile.mkdtemp(prefix="tp-nonroot-"))
    base.chmod(0o755)
    u = User(base)
    for d in (u.home, u.tmp):
        d.mkdir()
    _chown_tree(base)
    trial = u.python("-c", "import nbgrader, numpy, tpcourse, tpgrade, tpsim", cwd=u.home)
    if trial.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"uid {UID} cannot run the grader's interpreter {sys.executable} "
                    f"(trees shown to it: {u.reveal}): {trial.stderr.strip()[-500:]}")
    yield u
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def courses(user):
    """One class (two ordinary, three hostile students) in four identical courses: graded
    by root with stock nbgrader, the other three handed to UID."""
    template = Course.create(user.base / "template" / "course", [A], CONFIG)
    template.generate(A)
    for sub in ORDINARY:
        template.place_submission(sub.student, A, build(sub), timestamp=STAMP)
    for h in HOSTILE:
        template.place_submission(h.student, A, H.notebooks(h), timestamp=STAMP)
    out = {}
    for name in ("root", "autograde", "grade_class", "refused"):
        root = user.base / name / "course"
        shutil.copytree(template.root, root)
        cfg = root / "nbgrader_config.py"
        cfg.write_text(cfg.read_text().replace(str(template.root), str(root)))
        out[name] = Course(root, root / "exchange")
        if name != "root":
            _chown_tree(root.parent)
    out["root"].nbgrader("autograde", A)
    return out


def _scores(course) -> dict:
    return {s: course.scores(A, s) for s in STUDENTS}


def _cell_outputs(course, student, grade_id="sol_column_parallel") -> str:
    nb = nbformat.read(str(course.root / "autograded" / student / A / f"{A}.ipynb"), 4)
    [cell] = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id]
    return json.dumps(cell.outputs)


def _check_against_root(course, root_course):
    """Every grade a root grader gives, except h_kill_parent's (see below); the hostile
    students reached neither the hidden tests nor the gradebook."""
    got, want = _scores(course), _scores(root_course)
    assert {s: v for s, v in got.items() if s != "h_kill_parent"} == \
        {s: v for s, v in want.items() if s != "h_kill_parent"}
    # Its SIGKILL goes to the sandbox's init (pid 1 of its PID namespace), which the kernel
    # shields from its own namespace: under root the kernel's uid differs from init's and
    # os.kill raises PermissionError (the cell fails); here both are the grader's uid mapped
    # into the sandbox's user namespace, the signal is silently dropped, the cell goes on.
    # Either way the grader survives and the attack earns nothing.
    [(_, kp)] = got["h_kill_parent"].items()
    assert all(score == top for score, top in kp.values())
    [(_, kp_root)] = want["h_kill_parent"].items()
    lost = {g for g, (s, t) in kp_root.items() if s < t}
    assert lost == {g for g in kp_root if g.startswith("test_column")}, \
        {g: _cell_outputs(root_course, "h_kill_parent", g)[:600] for g in sorted(lost)
         if not g.startswith("test_column")}
    for sub in ORDINARY:
        [(_, grades)] = got[sub.student].items()
        assert {g for g, (s, t) in grades.items() if s < t} == set(sub.loses)
    for student, nbs in got.items():
        assert all(score <= top for grades in nbs.values() for score, top in grades.values())
    source = _cell_outputs(course, "h_read_source")
    assert source.count("blocked: [Errno 2]") == 2 and "BEGIN SOLUTION" not in source
    # the course root is an empty, read-only tree in the sandbox: no gradebook to open
    assert "unable to open database file" in _cell_outputs(course, "h_write_gradebook")


def _check_clean(user, course):
    assert _processes_of(UID) == []
    assert [p.name for p in user.tmp.iterdir()] == [f"tpsb-etc-{UID}"]  # kernel folders gone
    owners = {p.stat().st_uid for p in (course.root / "autograded").rglob("*")}
    assert owners == {UID}


def test_the_sandbox_confines_a_non_root_graders_student(user, tmp_path):
    """wrap() run by UID: the code runs as UID mapped into a user namespace, with no
    capabilities, no further user namespaces, hidden trees empty and read-only, and a
    process limit of its own that the grader's other processes do not eat into."""
    course = user.base / "probe" / "course"
    (course / "source").mkdir(parents=True)
    (course / "source" / "secret.txt").write_text("hidden tests")
    _chown_tree(course.parent)
    script = user.base / "probe" / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, subprocess, sys, textwrap
        from tpsandbox import command, wrap
        inside = textwrap.dedent('''
            import ctypes, json, os, resource, time
            res = {{"uid": os.getuid(), "status": open("/proc/self/status").read(),
                    "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
                    "course": os.listdir({str(course)!r})}}
            for name, path in [("course", {str(course)!r} + "/x"), ("root", "/root/x"),
                               ("tmp", "/tmp/x"), ("scratch", "x")]:
                try:
                    open(path, "w").write("x")
                    res["w_" + name] = "wrote"
                except OSError as err:
                    res["w_" + name] = err.errno
            libc = ctypes.CDLL(None, use_errno=True)
            res["userns"] = libc.unshare(0x10000000) or 0
            kids = []
            try:
                for _ in range(200):
                    pid = os.fork()
                    if pid == 0:
                        time.sleep(1)
                        os._exit(0)
                    kids.append(pid)
            except OSError:
                pass
            for pid in kids:
                os.waitpid(pid, 0)
            res["forked"] = len(kids)
            print(json.dumps(res))
        ''')
        sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(60)]
        work = {str(course)!r} + "/autograded/alice/a1"
        os.makedirs(work)
        argv = wrap([sys.executable, "-c", inside], workdir=work, scratch=os.environ["HOME"] +
                    "/scratch", hidden=[{str(course)!r}], max_processes=30)
        proc = subprocess.run(argv, capture_output=True, text=True)
        for s in sleepers:
            s.kill()
            s.wait()
        print(json.dumps({{"rc": proc.returncode, "err": proc.stderr[-2000:],
                          "per_userns": command.nproc_counted_per_userns(), "argv": argv,
                          "out": json.loads(proc.stdout) if proc.returncode == 0 else None}}))
    """))
    proc = user.python(str(script), cwd=user.home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["rc"] == 0, res["err"]
    out = res["out"]
    assert "--unshare-user" in res["argv"] and "setpriv" not in res["argv"]
    assert out["uid"] == UID
    status = dict(line.split(":\t", 1) for line in out["status"].splitlines() if ":\t" in line)
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert out["course"] == ["autograded"]           # source/ hidden
    assert out["w_course"] == out["w_root"] == 30     # EROFS: hidden trees are read-only
    assert out["w_tmp"] == out["w_scratch"] == "wrote"
    assert out["userns"] != 0                          # no nested user namespace
    # RLIMIT_NPROC: on kernels that count it per user namespace (Linux >= 5.14) it is the
    # sandbox's own budget; on older ones the grader's process count is added. Either way
    # the 60 sleeping processes of the grader's uid cost the sandbox nothing.
    assert out["nproc"] == 30 if res["per_userns"] else out["nproc"] > 60
    assert 20 <= out["forked"] < 30, out["forked"]
    assert _processes_of(UID) == []


def test_stock_autograde_as_the_instructor_matches_root(user, courses):
    course = courses["autograde"]
    proc = user.python("-m", "nbgrader", "autograde", A, cwd=course.root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_against_root(course, courses["root"])
    _check_clean(user, course)


def test_grade_class_as_the_instructor_matches_root(user, courses):
    course = courses["grade_class"]
    proc = user.python("-m", "tpcourse.grade_class", A, "--no-progress", "--workers=2",
                       cwd=course.root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "5 graded, 0 unchanged" in proc.stdout
    _check_against_root(course, courses["root"])
    html = "".join(course.feedback_html(A, "h_read_source").values())
    assert html.count("blocked: [Errno 2]") == 2 and "BEGIN SOLUTION" not in html
    assert (course.root / "grades.csv").read_text().count("\n") == len(STUDENTS) + 1
    _check_clean(user, course)


def test_refuses_with_the_fix_when_user_namespaces_are_off(user, courses):
    course = courses["refused"]
    proc = user.python("-m", "nbgrader", "autograde", A, "--student=reference",
                       cwd=course.root, no_userns=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for words in ("sandbox is unavailable", "not root", "user.max_user_namespaces is 0",
                  "sysctl -w user.max_user_namespaces", "c.Sandbox.enabled = False"):
        assert words in out, words
    proc = user.python("-m", "tpcourse.grade_class", A, "--no-progress", cwd=course.root,
                       no_userns=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "user.max_user_namespaces is 0" in proc.stderr
    assert "c.Sandbox.enabled = False" in proc.stderr
    assert not list(course.root.glob("autograded/*/*/*.ipynb"))   # no notebook was run
    # the opt-out still grades (unconfined, with a warning)
    proc = user.python("-m", "nbgrader", "autograde", A, "--student=reference",
                       "--Sandbox.enabled=False", cwd=course.root, no_userns=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Sandbox disabled" in proc.stdout + proc.stderr
    assert course.scores(A, "reference") == courses["root"].scores(A, "reference")
