"""Seconds per submission of the gpu_runner, against a bare torchrun launch.

    .venv/bin/python bench/gpu_runner_bench.py [--students 3] [--backend auto] [--world-sizes 1,2,3,4]

In one run: a throwaway course with the first torch assignment's source and some of its
catalogue's submissions (its examples, no faults), graded with
`python -m gpu_runner.grade --no-gradebook`; then, REPEATS times, a bare `torchrun` of the
same world size whose workers only `import torch`. Prints seconds per submission (wall
clock of the whole command / submissions, and the mean launch time from the reports) and the
ratio to the bare launch: what the checks add on top of the cost of starting the ranks. The
whole command includes grading the reference solution once (one launch) before the students.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tpcourse.cycle import Course  # noqa: E402
import assignments  # noqa: E402
from tpcourse.catalogue import examples  # noqa: E402
from tpcourse.submissions import build  # noqa: E402

REPEATS = 3


def bare_launch(world: int, workdir: Path) -> float:
    script = workdir / "bare.py"
    script.write_text("import torch\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                    f"--nproc-per-node={world}", str(script)], check=True,
                   capture_output=True, cwd=workdir)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    ap.add_argument("--world-sizes", default=None)
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    from gpu_runner.grade import backend_and_sizes
    a = next(a.name for a in assignments.discover() if a.has_gpu)
    cat = examples(a)
    students = (cat.VALID + cat.WRONG)[:args.students]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        course = Course.create(tmp / "course", [a])
        backend, sizes = backend_and_sizes(course.root, args.backend, args.world_sizes)
        for sub in students:
            course.place_submission(sub.student, a, build(sub))
        cmd = [sys.executable, "-m", "gpu_runner.grade", a, "--course-root",
               str(course.root), "--no-gradebook", "--backend", backend]
        cmd += ["--world-sizes", args.world_sizes] if args.world_sizes else []
        cmd += ["--no-timing"] if args.no_timing else []
        start = time.perf_counter()
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.returncode:
            sys.exit(out.stdout + out.stderr)
        reports = [json.loads((course.root / "gpu_reports" / a / s.student /
                               "report.json").read_text()) for s in students]
        bare = [bare_launch(max(sizes), tmp) for _ in range(REPEATS)]
    per_sub = wall / len(students)
    launch = statistics.mean(l["seconds"] for r in reports for l in r["launches"])
    bare_s = statistics.median(bare)
    print(f"backend {backend}, world sizes {','.join(map(str, sizes))}, "
          f"{len(students)} submissions, timing {'off' if args.no_timing else 'on'}")
    for r in reports:
        print(f"  {r['student']}: {r['score']:g}/{r['max_score']:g}, {len(r['launches'])} "
              f"launch(es), {r['seconds']:.2f}s")
    print(f"seconds per submission (whole command / submissions): {per_sub:.2f}")
    print(f"seconds per torchrun launch of the checks (mean):      {launch:.2f}")
    print(f"bare torchrun, {max(sizes)} ranks, import torch only (median of {REPEATS}): {bare_s:.2f}")
    print(f"ratio per submission / bare launch: {per_sub / bare_s:.2f}")
    print(f"ratio checks launch / bare launch:  {launch / bare_s:.2f}")


if __name__ == "__main__":
    main()
