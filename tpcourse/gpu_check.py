"""`make gpu-check`: does this GPU machine grade right? About a few minutes, one GPU.

A temporary course is graded by `python -m gpu_runner.grade` exactly as a class would be, with
CUDA and NCCL at world size 1, in the course's sandbox: the first torch assignment whose
examples name GPU_CHECK students (such as a padding buffer created on the CPU, which NCCL's
all-gather refuses, or an all-reduce of a CPU copy: NCCL refuses CPU tensors, gloo does not, so
the CPU test suite cannot catch it). First the runner's own preflight, the reference solution at full marks (else the
runner exits 2), then those wrong students, which only a GPU machine can judge fully and which
must lose exactly their named cells. Then one line: `gpu-check: PASS` or `gpu-check: FAIL (...)`.

Exit 0 PASS, 1 FAIL, 77 no GPU on this machine (the conventional "skipped": it says so, and it
is not a failure of `make test`, which never runs it).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import assignments as registry
from gpu_runner import machine
from gpu_runner.plan import make_plan, planned_checks

from .catalogue import examples

EXIT_NO_GPU = 77
SIZES = (1,)
WALL = 240          # seconds per launch; the whole check stays well under 5 minutes


def checked_assignment() -> str:
    """The first torch assignment whose examples name the students a GPU check grades."""
    return next(a.name for a in registry.discover()
                if a.has_gpu and getattr(examples(a.name), "GPU_CHECK", ()))


def expected_losses(assignment, loses, sizes=SIZES) -> set[str]:
    """The cells a student must lose at `sizes`: its catalogued ones that have checks there."""
    checked = set(planned_checks(make_plan(assignment, sizes, timing=False)).values())
    return set(loses) & checked


def verdict(rc: int, output: str, reports: dict, expected: dict) -> list[str]:
    """What is wrong with a gpu-check run (empty: PASS). reports: {name: report or None},
    "(reference)" included; expected: {student: cells it must lose}."""
    problems = []
    if rc != 0:
        last = [line for line in output.splitlines() if line.strip()][-1:] or [""]
        problems.append(f"the grader exited {rc}: {last[0][:300]}")
    for name in ["(reference)", *expected]:
        rep = reports.get(name)
        if rep is None:
            problems.append(f"{name}: no report")
            continue
        if rep["backend"] != "nccl" or tuple(rep["world_sizes"]) != SIZES or not rep["sandboxed"]:
            problems.append(f"{name}: graded with {rep['backend']}, world sizes "
                            f"{rep['world_sizes']}, sandboxed {rep['sandboxed']}")
        lost = {gid for gid, c in rep["cells"].items() if c["score"] < c["points"]}
        want = expected.get(name, set())
        if lost != want:
            problems.append(f"{name}: lost {sorted(lost) or 'nothing'}, expected "
                            f"{sorted(want) or 'nothing'}")
    return problems


def _grade_examples(tmp: Path):
    from .cycle import Course
    from .submissions import build
    assignment = checked_assignment()
    cat = examples(assignment)
    by_name = {s.student: s for s in cat.ALL}
    course = Course.create(tmp / "course", [assignment])
    for name in cat.GPU_CHECK:
        course.place_submission(name, assignment, build(by_name[name]))
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_runner.grade", assignment, "--course-root", str(course.root),
         "--backend", "nccl", "--world-sizes", ",".join(map(str, SIZES)), "--no-gradebook",
         "--no-timing", "--timeout", str(WALL)],
        capture_output=True, text=True, timeout=4 * WALL)
    reports = {}
    folder = course.root / "gpu_reports" / assignment
    runs = sorted((folder / ".reference").glob("run-*/report.json"),
                  key=lambda path: path.stat().st_mtime)      # the last run, passed or not
    for name, path in [("(reference)", runs[-1] if runs else None),
                       *((s, folder / s / "report.json") for s in cat.GPU_CHECK)]:
        reports[name] = json.loads(path.read_text()) if path and path.exists() else None
    expected = {s: expected_losses(assignment, by_name[s].loses) for s in cat.GPU_CHECK}
    return proc, reports, expected


def main(argv=None) -> int:
    gpus = machine.gpu_count()
    if gpus < 1:
        print("gpu-check: no GPU on this machine (torch.cuda.device_count() is 0): nothing "
              "checked. Run it on a GPU runner set up as gpu_runner/README.md says.", flush=True)
        return EXIT_NO_GPU
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        proc, reports, expected = _grade_examples(Path(tmp))
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr[-4000:])
    for name, rep in reports.items():
        if rep is not None:
            print(f"gpu-check: {name}: {rep['score']:g}/{rep['max_score']:g} "
                  f"({rep['backend']}, {rep['seconds']:.0f}s)")
    problems = verdict(proc.returncode, proc.stdout + proc.stderr, reports, expected)
    print("gpu-check: PASS" if not problems else f"gpu-check: FAIL ({'; '.join(problems)})",
          flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
