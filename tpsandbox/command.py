"""Build the command line that runs a program inside the sandbox.

Mechanism: bubblewrap (Debian package `bubblewrap`) gives the program its own PID, IPC, UTS
and network namespaces and a read-only view of the host with the sensitive trees replaced by
empty directories; `prlimit` then sets the resource limits and `setpriv` drops to an
unprivileged uid before the program starts. When bwrap (or the grader above it) dies, the
namespace's init is SIGKILLed and the kernel takes every process it started with it.

A grader that is not root (an instructor running nbgrader as themselves) cannot switch uid:
bwrap then also unshares a user namespace (unprivileged user namespaces must be allowed, see
check.py), the program runs under the grader's own uid mapped into it, with no capabilities
and no way to make further user namespaces, and every tree it can see is read-only except its
scratch folder and its private /tmp. Hidden trees are read-only empty directories either way.

The grader's Python is shown wherever it lives (interpreter_paths: its prefixes and every
sys.path entry, also under /tmp, /root or /home), read-only, each bound alone into the hidden
or private tree around it; never a path whose showing would uncover a hidden tree whole.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import os
import stat
import sys
import tempfile
from pathlib import Path

from .settings import Sandbox

# The project checkout (instructor tooling, example solutions): hidden from student code.
REPO = Path(__file__).resolve().parents[1]

# Environment passed through from the grader (everything else, e.g. database passwords, is not).
_PASS_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONHASHSEED", "PYTHONPATH",
             "NBGRADER_EXECUTION", "JPY_SESSION_NAME",
             "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
# One BLAS thread per kernel: parallel workers already fill the cores.
_THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def default_hidden(extra=()) -> list[str]:
    """Trees no student may read: homes, runtime sockets, the project checkout, and `extra`
    (the course root, exchange, gradebook...)."""
    paths = ["/root", "/home", "/run", "/var/run", "/var/lib/postgresql", str(REPO), *extra]
    return _existing_unique(paths)


# Trees every sandbox replaces with a private, writable tmpfs of its own.
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")


def interpreter_paths() -> list[str]:
    """Where the grader's Python lives and imports from: its prefixes, its bin folder and every
    sys.path entry (site-packages, .pth and PYTHONPATH entries). A kernel or torchrun job
    started from this interpreter needs all of them, wherever they are: a venv under /tmp, a
    pyenv build under /root, a user site under /home. '' (the working folder) is not one."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable),
             *(p for p in sys.path if p)]
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def course_packages(private=()) -> dict[str, str]:
    """{package: source folder} of the packages installed in editable mode, except the
    `private` ones (instructor tooling: tpcourse holds example solutions)."""
    mapping = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("__editable__") and hasattr(mod, "MAPPING"):
            mapping.update(mod.MAPPING)
    mapping.update(_editable_mappings())
    return {pkg: path for pkg, path in mapping.items() if pkg not in private}


def public_paths(package: str, folder: str, private=()) -> list[str]:
    """What of an editable package's source folder the sandbox shows: the folder, or, where
    some of its modules are private (a pattern such as `assignments.*.examples`: the example
    students beside an assignment's checks), every file and folder in it but those (their
    compiled copies in __pycache__ too)."""
    patterns = [p.split(".")[1:] for p in private if fnmatch.fnmatch(package, p.split(".")[0])
                and "." in p]
    if not patterns:
        return [folder]
    return _public(Path(folder), [], patterns)


def _public(folder: Path, name: list[str], patterns) -> list[str]:
    def private(parts):
        return any(len(p) == len(parts) and all(map(fnmatch.fnmatch, parts, p)) for p in patterns)

    def above_private(parts):
        return any(len(p) > len(parts) and all(map(fnmatch.fnmatch, parts, p[:len(parts)]))
                   for p in patterns)
    shown = []
    for entry in sorted(folder.iterdir()):
        if entry.name == "__pycache__":        # compiled modules: this folder's namespace
            shown += [str(c) for c in sorted(entry.iterdir())
                      if not private(name + [c.name.split(".")[0]])]
            continue
        parts = name + [entry.name.split(".")[0] if entry.is_file() else entry.name]
        if private(parts):
            continue
        if entry.is_dir() and above_private(parts):
            shown += _public(entry, parts, patterns)
        else:
            shown.append(str(entry))
    return shown


def default_exposed(extra=(), private=()) -> list[str]:
    """What the interpreter needs even where it lies under a hidden or private tree: the Python
    environment (interpreter_paths) and the source folders of packages installed in editable
    mode, except the `private` ones (packages, or modules inside one: public_paths). build()
    shows none that would uncover a hidden tree."""
    packages = [path for pkg, folder in course_packages(private).items()
                for path in public_paths(pkg, folder, private)]
    paths = [*interpreter_paths(), *extra, *packages]
    return [p for p in dict.fromkeys(os.path.abspath(p) for p in paths if p) if os.path.exists(p)]


def uncovers(path: str, covered) -> bool:
    """Would showing `path` show a covered tree (hidden or private tmp) whole? The working
    folder or the checkout on sys.path, or /tmp on PYTHONPATH, stay hidden."""
    return any(_under(c, path) for c in covered)


def exposures(paths, covered) -> list[tuple[str, str]]:
    """The read-only binds (host source, sandbox path) that make `paths` readable where they
    lie under a `covered` tree: each at its real location and, when reached through a symlink,
    at its own path too; none that uncovers a covered tree, none inside another."""
    wanted = {}
    for path in paths:
        for dest in dict.fromkeys([os.path.abspath(path), os.path.realpath(path)]):
            if (os.path.exists(dest) and any(_under(dest, c) for c in covered)
                    and not uncovers(dest, covered)):
                wanted[dest] = os.path.realpath(dest)
    binds = []
    for dest in sorted(wanted, key=len):
        if not any(_under(dest, inside) for _, inside in binds):
            binds.append((wanted[dest], dest))
    return binds


def _editable_mappings() -> dict[str, str]:
    import site
    found = {}
    for sp in site.getsitepackages():
        for finder in glob.glob(os.path.join(sp, "__editable__*_finder.py")):
            text = Path(finder).read_text()
            start = text.find("MAPPING")
            if start < 0:
                continue
            try:
                import ast
                line = text[start:].split("\n", 1)[0]
                found.update(ast.literal_eval(line.split("=", 1)[1].strip()))
            except (ValueError, SyntaxError, IndexError):
                continue
    return found


def _existing_unique(paths) -> list[str]:
    out = []
    for p in paths:
        if not p:
            continue
        real = os.path.realpath(p)
        if os.path.exists(real) and real not in out:
            out.append(real)
    return out


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def build(cfg: Sandbox, command: list[str], *, workdir: str, binds: dict[str, str],
          hidden=(), exposed=(), env: dict | None = None) -> list[str]:
    """The full argv: bwrap ... -- prlimit ... -- setpriv ... -- command.

    workdir: the working directory inside the sandbox; binds: {host dir: sandbox path} mounted
    read-write (the student's scratch directory, the kernel's connection directory).
    """
    hidden = sorted(set(default_hidden(list(hidden) + list(cfg.hide_paths))), key=len)
    exposed = default_exposed(list(exposed) + list(cfg.readonly_paths), cfg.private_packages)
    size = str(cfg.tmpfs_mb * 1024 * 1024)
    argv = [cfg.bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox"]
    if not cfg.network:
        argv.append("--unshare-net")
    if os.geteuid() != 0:
        argv.append("--unshare-user")  # unprivileged grader: bwrap needs a user namespace
        if _bwrap_has(cfg.bwrap, "--disable-userns"):  # bubblewrap >= 0.8
            argv.append("--disable-userns")  # no nested namespace to regain capabilities in
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    tree = _Tree(argv)
    for tmp in PRIVATE_TMP:
        tree.mount(["--perms", "1777", "--size", size, "--tmpfs"], tmp)
    for path in hidden:
        tree.mount(["--tmpfs"], path)
    for source, path in exposures(exposed, [*hidden, *PRIVATE_TMP]):
        tree.mount(["--ro-bind", source], path)
    argv += ["--ro-bind", _hosts_file(), "/etc/hosts"]  # "sandbox" resolves, to loopback
    if cfg.gpu:
        for node in sorted(glob.glob("/dev/nvidia*")) + (["/dev/dri"] if os.path.exists("/dev/dri") else []):
            argv += ["--dev-bind", node, node]
    for host, inside in binds.items():
        tree.mount(["--bind", host], inside)
    # Last, once the mount points inside them exist: a hidden tree's tmpfs belongs to the
    # grader's uid in a user namespace, and the student's code runs as that uid there.
    for path in hidden:
        argv += ["--remount-ro", path]
    argv += ["--chdir", workdir, "--clearenv"]
    for key, value in sandbox_env(cfg, env).items():
        argv += ["--setenv", key, value]
    return argv + ["--", *limits_argv(cfg), *drop_argv(cfg), *command]


_HOSTS = "127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost ip6-loopback\n"


@functools.lru_cache(maxsize=None)
def _hosts_file() -> str:
    """/etc/hosts for the sandbox: its hostname on loopback (torch's rendezvous looks it up;
    without this every lookup waits on an unreachable DNS server). One shared file in a
    directory of the grader's own, so that killed graders leave nothing new behind."""
    folder = Path(tempfile.gettempdir()) / f"tpsb-etc-{os.geteuid()}"
    folder.mkdir(mode=0o755, exist_ok=True)
    st = folder.lstat()
    if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        raise RuntimeError(f"{folder} is not a private directory of this user")
    path = folder / "hosts"
    if not path.exists() or path.read_text() != _HOSTS:
        fd, tmp = tempfile.mkstemp(dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(_HOSTS)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return str(path)


class _Tree:
    """Emits mounts, first creating (mode 0755) any missing parent inside an earlier tmpfs:
    bwrap would create it 0700 and the unprivileged uid could not get through."""

    def __init__(self, argv):
        self.argv, self.tmpfs, self.made = argv, [], set()

    def mount(self, opts, target):
        parts = target.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in self.made and any(_under(parent, t) and parent != t for t in self.tmpfs):
                self.argv += ["--perms", "0755", "--dir", parent]
                self.made.add(parent)
        self.argv += [*opts, target]
        self.made.add(target)
        if "--tmpfs" in opts:
            self.tmpfs.append(target)


def sandbox_env(cfg: Sandbox, env: dict | None = None) -> dict[str, str]:
    source = dict(os.environ)
    source.update(env or {})
    out = {k: source[k] for k in _PASS_ENV if k in source}
    out.update(_THREAD_ENV)
    out.update(PATH=os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin",
                                     "/bin"]),
               HOME="/tmp", USER="student", LOGNAME="student", MPLBACKEND="Agg",
               TPCOURSE_SANDBOXED="1",
               # ipykernel polls its parent pid; inside the PID namespace that is bwrap's init
               # (pid 1), and bwrap --die-with-parent already ends the kernel with the grader.
               JPY_PARENT_PID="1")
    out.update({k: str(v) for k, v in cfg.env.items()})
    return out


def limits_argv(cfg: Sandbox) -> list[str]:
    mib = 1024 * 1024
    nproc = cfg.max_processes
    if os.geteuid() != 0 and not nproc_counted_per_userns(cfg.bwrap):
        # Old kernels (before Linux 5.14) count RLIMIT_NPROC per host uid, and without a uid
        # of its own the sandbox shares the grader's count; newer ones count the processes of
        # each user namespace apart (the grader's own limit still caps the total).
        nproc += _processes_of_uid(os.getuid())
    argv = ["prlimit", f"--cpu={cfg.cpu_seconds}", f"--nproc={nproc}",
            f"--nofile={cfg.max_open_files}", f"--fsize={cfg.max_file_mb * mib}", "--core=0"]
    if cfg.memory_mb:
        argv.append(f"--as={cfg.memory_mb * mib}")
    return argv + ["--"]


def drop_argv(cfg: Sandbox) -> list[str]:
    if os.geteuid() != 0:
        return []  # already unprivileged
    uid = cfg.effective_uid()
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


@functools.lru_cache(maxsize=None)
def _bwrap_has(bwrap: str, option: str) -> bool:
    import subprocess
    try:
        proc = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in proc.stdout + proc.stderr


@functools.lru_cache(maxsize=None)
def nproc_counted_per_userns(bwrap: str = "bwrap") -> bool:
    """Does RLIMIT_NPROC count only the processes of the caller's user namespace (Linux >=
    5.14), so that a non-root grader's sandbox starts from zero? Tried, not guessed from the
    kernel version: a limit of 2 lets the one process inside fork once only if the grader's
    own processes do not count. False when the trial cannot run (the cautious answer)."""
    import subprocess
    probe = [bwrap, "--unshare-user", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
             "--", "prlimit", "--nproc=2", "--", "/bin/sh", "-c", "/bin/true && echo forked"]
    try:
        proc = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip() == "forked"


def _processes_of_uid(uid: int) -> int:
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                continue
    return count


def prepare_dir(path: Path, cfg: Sandbox, mode=0o700) -> Path:
    """A directory the sandboxed uid owns (so the student can write there and nowhere else)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        uid = cfg.effective_uid()
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(name, uid, uid)
    path.chmod(mode)
    return path
