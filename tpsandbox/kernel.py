"""A Jupyter kernel manager that starts the kernel inside the sandbox.

The kernel talks to the grader over ZMQ `ipc` sockets in a private directory bind-mounted
into the sandbox (a network namespace cuts it off from the grader's TCP loopback). It works
in a scratch copy of the notebook's folder (without any notebook in it: the file being graded
holds the hidden tests), bound at the same path so that relative paths behave as usual.

Those folders (`tpsb-*` in the temp dir) are removed when the kernel is cleaned up; a grader
killed with SIGKILL cannot, so the grader holds an flock on each folder it made for as long as it
lives, and the next kernel any grader of the same uid starts removes those whose lock is free.
"""
from __future__ import annotations

import fcntl
import glob
import os
import shutil
import stat
import tempfile
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from traitlets import Unicode

from . import command
from .settings import Sandbox


def course_paths(config) -> list[str]:
    """The grader's own trees, hidden from the student: course root, exchange, gradebook."""
    paths = [os.getcwd()]  # nbgrader runs converters from the course root
    cd = config.get("CourseDirectory", {})
    if cd.get("root"):
        paths.append(str(cd["root"]))
    if str(cd.get("db_url", "")).startswith("sqlite:///"):
        paths.append(os.path.dirname(str(cd["db_url"])[len("sqlite:///"):]))
    if config.get("Exchange", {}).get("root"):
        paths.append(str(config["Exchange"]["root"]))
    return paths


PREFIX = "tpsb-"
# Made inside a kernel folder once its maker holds the folder's lock: a folder without it (an
# older grader's, or one being made this instant) is never judged stale.
LOCK_MARK = "grader.lock"


def make_kernel_dir(parent: str | None = None) -> tuple[Path, int]:
    """A new kernel folder and the descriptor that holds its lock (close it after removing)."""
    base = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: no sweeper locks an unmarked one
        os.close(os.open(base / LOCK_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600))
    except BaseException:
        os.close(fd)
        remove_tree(base)
        raise
    return base, fd


def sweep_stale(parent: str | None = None) -> list[str]:
    """Remove the kernel folders in `parent` (default: the temp dir) that belong to this uid,
    are marked, and whose lock nobody holds: their grader was killed. Live ones are kept."""
    removed = []
    for path in glob.glob(os.path.join(parent or tempfile.gettempdir(), PREFIX + "*")):
        try:
            st = os.lstat(path)
            if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
                    or not os.path.isfile(os.path.join(path, LOCK_MARK))):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live grader's
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                remove_tree(path)
                removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def remove_tree(path) -> None:
    """rmtree, also through folders a student left without permissions for their owner (a
    grader that is not root shares its uid with the student's code)."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            sub = os.path.join(root, name)
            if not os.path.islink(sub):
                try:
                    os.chmod(sub, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)


_swept: set = set()  # temp dirs this process has swept already


class SandboxKernelManager(AsyncKernelManager):
    """AsyncKernelManager whose kernel runs under bubblewrap, limits and an unprivileged uid."""

    sandbox_dir = Unicode("", help="Where per-kernel socket and scratch folders are made "
                          "(default: the system temp dir).").tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sandbox = Sandbox(parent=self)
        self._base: Path | None = None
        self._lock_fd: int | None = None

    async def _async_pre_start_kernel(self, **kw):
        if not self.sandbox.enabled:
            return await super()._async_pre_start_kernel(**kw)
        from .check import require
        require(self.sandbox)
        parent = self.sandbox_dir or None
        if parent not in _swept:
            _swept.add(parent)
            stale = sweep_stale(parent)
            if stale:
                self.log.info("removed %d sandbox folder(s) left by killed graders: %s",
                              len(stale), " ".join(stale))
        self._release()  # a restart makes a new folder
        self._base, self._lock_fd = make_kernel_dir(parent)
        self._base.chmod(0o711)  # bwrap mirrors it as the mount point's parent: uid must traverse
        conn = command.prepare_dir(self._base / "c", self.sandbox)
        self.transport, self.cache_ports = "ipc", False
        self.ip = str(conn / "k")
        self.connection_file = str(conn / "kernel.json")
        workdir = os.path.abspath(kw.get("cwd") or os.getcwd())
        scratch = self._base / "w"
        if os.path.isdir(workdir) and not str(self._base).startswith(workdir.rstrip("/") + "/"):
            shutil.copytree(workdir, scratch, ignore=shutil.ignore_patterns("*.ipynb"),
                            dirs_exist_ok=True)
        command.prepare_dir(scratch, self.sandbox)
        kernel_cmd, kw = await super()._async_pre_start_kernel(**kw)
        os.chown(self.connection_file, self.sandbox.effective_uid(), -1) if os.geteuid() == 0 else None
        kernel_cmd = command.build(self.sandbox, kernel_cmd, workdir=workdir,
                                   binds={str(conn): str(conn), str(scratch): workdir},
                                   hidden=course_paths(self.config))
        kw.pop("env", None)  # bwrap --clearenv/--setenv decides the kernel's environment
        kw["cwd"] = str(self._base)
        return kernel_cmd, kw

    async def _async_interrupt_kernel(self):
        # A signal to bwrap's process group would not reach into the PID namespace reliably;
        # ipykernel interrupts itself on a control-channel message.
        if self.sandbox.enabled and self.has_kernel:
            msg = self.session.msg("interrupt_request", content={})
            self._connect_control_socket()
            self.session.send(self._control_socket, msg)
            return
        await super()._async_interrupt_kernel()

    async def _async_cleanup_resources(self, restart: bool = False):
        await super()._async_cleanup_resources(restart=restart)
        if not restart:
            self._release()

    def _release(self):
        """Remove this kernel's folder, then let go of its lock."""
        if self._base is not None:
            remove_tree(self._base)
            self._base = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # AsyncKernelManager binds these public names to the base coroutines at class creation;
    # rebind them so that callers (nbclient) reach the overrides above.
    interrupt_kernel = _async_interrupt_kernel
    cleanup_resources = _async_cleanup_resources
