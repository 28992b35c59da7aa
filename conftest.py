"""Shared fixtures for the repository's tests.

Tests that run real nbgrader commands build a throwaway course with `make_course` (one per test
module, via module-scoped fixtures) so every nbgrader call batches as much work as it can.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from tpcourse.cycle import Course

# A shorter per-cell limit than the course's 30 s keeps the timeout test fast; it is still a
# real nbgrader timeout (kernel interrupted, cell marked with an error, grading goes on).
FAST_TIMEOUT = "c.Execute.timeout = 10\n"


def pytest_collection_modifyitems(config, items):
    """The tiers (README, "Tests"): whatever runs real nbgrader commands, and the tests of a
    torch assignment (each starts gloo ranks), are `slow` too, so `make test-fast` leaves them
    to `make test`."""
    import assignments
    torch = {a.folder / "tests" for a in assignments.discover() if a.kind == "torch"}
    for item in items:
        if item.get_closest_marker("nbgrader") or item.path.parent in torch:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def make_course(tmp_path_factory):
    """make_course(name, assignments=None, extra_config=FAST_TIMEOUT) -> a fresh Course."""
    def make(name: str, assignments=None, extra_config: str = FAST_TIMEOUT) -> Course:
        return Course.create(tmp_path_factory.mktemp(name) / "course", assignments, extra_config)
    return make


def pytest_sessionstart(session):
    """Under pytest-xdist, give each test worker its own range of sandbox uids, so that per-uid
    process limits (the process-storm test) never couple two workers' kernels."""
    from tpsandbox import UID_ENV, Sandbox
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and UID_ENV not in os.environ:
        os.environ[UID_ENV] = str(Sandbox().uid + 100 * (int(worker[2:]) + 1))


@contextlib.contextmanager
def busy_machine(per_core: int = 3):
    """`per_core` processes per core that compute forever, at the caller's nice level, each in
    a session of its own (with the scheduler's autogroups, Linux's default, the processes of
    one session share one slice: started together they would compete as one). Yields them;
    they are killed on the way out."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                              start_new_session=True)
             for _ in range(per_core * len(os.sched_getaffinity(0)))]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
