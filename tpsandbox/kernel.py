"""A Jupyter kernel manager that starts the kernel inside the sandbox.

The kernel talks to the grader over ZMQ `ipc` sockets in a private directory bind-mounted
into the sandbox (a network namespace cuts it off from the grader's TCP loopback). It works
in a scratch copy of the notebook's folder (without any notebook in it: the file being graded
holds the hidden tests), bound at the same path so that relative paths behave as usual.

Its folder (tpsandbox.scratch) is removed when the kernel is cleaned up, or by the next grader
after a grader killed with SIGKILL.
"""
from __future__ import annotations

import os
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from traitlets import Unicode

from . import command
from .lifetime import tied_child
from .scratch import LOCK_MARK, new_scratch, remove_tree, working_copy  # noqa: F401
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
        self._release()  # a restart makes a new folder
        self._base, self._lock_fd = new_scratch(self.sandbox_dir or None, self.log)
        self._base.chmod(0o711)  # bwrap mirrors it as the mount point's parent: uid must traverse
        conn = command.prepare_dir(self._base / "c", self.sandbox)
        self.transport, self.cache_ports = "ipc", False
        self.ip = str(conn / "k")
        self.connection_file = str(conn / "kernel.json")
        workdir = os.path.abspath(kw.get("cwd") or os.getcwd())
        scratch = working_copy(workdir, self._base / "w", self.sandbox)
        kernel_cmd, kw = await super()._async_pre_start_kernel(**kw)
        os.chown(self.connection_file, self.sandbox.effective_uid(), -1) if os.geteuid() == 0 else None
        kernel_cmd = command.build(self.sandbox, kernel_cmd, workdir=workdir,
                                   binds={str(conn): str(conn), str(scratch): workdir},
                                   hidden=course_paths(self.config))
        kw.pop("env", None)  # bwrap --clearenv/--setenv decides the kernel's environment
        kw["cwd"] = str(self._base)
        kw["preexec_fn"] = tied_child()  # no orphaned kernel if the grader dies mid-launch
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
