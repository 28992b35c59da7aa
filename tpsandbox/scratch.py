"""Scratch folders for sandboxed student code (a kernel's, or a judge's student process).

Each is `tpsb-*` in the temp dir (or a configured parent): the code's working copy and, for a
kernel, its connection files. They are removed when the code is done; a grader killed with
SIGKILL cannot, so the grader holds an flock on each folder it made for as long as it lives, and
the next folder any grader of the same uid makes removes those whose lock is free.
"""
from __future__ import annotations

import fcntl
import glob
import os
import shutil
import stat
import tempfile
from pathlib import Path

from . import command

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


_swept: set = set()  # parents this process has swept already


def new_scratch(parent: str | None = None, log=None) -> tuple[Path, int]:
    """make_kernel_dir, after sweeping (once per process and parent) folders of killed graders."""
    if parent not in _swept:
        _swept.add(parent)
        stale = sweep_stale(parent)
        if stale and log is not None:
            log.info("removed %d sandbox folder(s) left by killed graders: %s",
                     len(stale), " ".join(stale))
    return make_kernel_dir(parent)


def working_copy(workdir: str, dest: Path, cfg) -> Path:
    """`dest`: a copy of `workdir` without its notebooks (the one being graded holds the hidden
    tests), owned by the sandbox's uid, to be bound at `workdir` so that relative paths work."""
    if os.path.isdir(workdir) and not str(dest).startswith(workdir.rstrip("/") + "/"):
        shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("*.ipynb"),
                        dirs_exist_ok=True)
    return command.prepare_dir(dest, cfg)
