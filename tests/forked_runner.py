"""The gpu_runner's rank side and judge on forked gloo ranks (gpu_runner.forked), for tests that
grade an example student: `grade(submission, sizes, tmp)`. The real path (torchrun in the
sandbox) is tests/test_gpu_runner_slow.py's."""
from __future__ import annotations

from pathlib import Path

from gpu_runner import extract, forked
from gpu_runner.forked import lost  # noqa: F401
from tpcourse import REPO
from tpcourse.submissions import build


def source(assignment: str) -> Path:
    return REPO / "source" / assignment / f"{assignment}.ipynb"


def grade(sub, sizes, tmp: Path, pg_timeout=10.0, steps=None, max_launches=1) -> dict:
    """The report of `sub` (a tpcourse Submission) graded at `sizes` on forked gloo ranks, the
    units of its assignment's gpu_* cells; `steps`: only the units of these (kind, step)s;
    `max_launches`: relaunches after a fault, as gpu_runner.launch makes them."""
    return forked.grade(sub.student, sub.assignment, extract.read(source(sub.assignment)),
                        build(sub)[f"{sub.assignment}.ipynb"], sizes, tmp, pg_timeout, steps,
                        max_launches)
