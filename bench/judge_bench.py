"""What the judge costs: `nbgrader autograde` seconds per notebook with and without it, one run.

    python bench/judge_bench.py [--n 10] [--rounds 2] [--assignment NAME ...]

Two courses with the same N copies of the reference solution per assignment: one grades with
the judge (the test cells decided in the grader's process, the student's functions called in a
sandboxed process of their own: the course's nbgrader_config.py as shipped), the other with
`c.Judge.enabled = False` (the test cells run in the student's kernel, as before the judge).
Both are sandboxed. The rounds alternate which goes first, so a machine whose speed drifts
(shared CPU) weighs on both alike; the figures are the ratios of the two totals, in wall time
(what one `nbgrader autograde` takes: the judge runs alongside the kernel) and in CPU time of
every process involved (what a class grader whose cores are all busy pays), and both must give
every notebook the same scores.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

import assignments  # noqa: E402
from tpcourse.cycle import Course  # noqa: E402
from tpcourse.demo import gradebook_scores  # noqa: E402
from tpcourse.submissions import Submission, build  # noqa: E402

MODES = {"judge": "", "kernel": "c.Judge.enabled = False\n"}


def course_for(mode: str, assignments, n: int, root: Path) -> Course:
    course = Course.create(root / mode, assignments=list(assignments), extra_config=MODES[mode])
    course.generate("*")
    for assignment in assignments:
        notebooks = build(Submission("reference", assignment), course.root / "source",
                          course.root / "release")
        for i in range(n):
            course.place_submission(f"bench{i:03d}", assignment, notebooks)
    return course


def timed_autograde(course: Course) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every process it ran: nbgrader, kernels, the judge's
    student processes)."""
    cpu = _children_cpu()
    start = time.perf_counter()
    course.autograde("*")          # --force: every round grades every notebook again
    return time.perf_counter() - start, _children_cpu() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10, help="copies per assignment (default 10)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--assignment", nargs="+", help="default: the first two numpy assignments",
                    default=[a.name for a in assignments.discover() if a.kind == "numpy"][:2])
    args = ap.parse_args(argv)
    totals = {mode: 0.0 for mode in MODES}
    cpu = {mode: 0.0 for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="tp-judge-bench-") as tmp:
        courses = {m: course_for(m, args.assignment, args.n, Path(tmp)) for m in MODES}
        for r in range(args.rounds):
            for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
                seconds, cpu_seconds = timed_autograde(courses[mode])
                totals[mode] += seconds
                cpu[mode] += cpu_seconds
                print(f"round {r + 1}: {mode:6s} {seconds:7.1f} s wall, {cpu_seconds:7.1f} s CPU",
                      flush=True)
        scores = {m: {a: gradebook_scores(c, a) for a in args.assignment}
                  for m, c in courses.items()}
    notebooks = args.n * len(args.assignment) * args.rounds
    per = {m: t / notebooks for m, t in totals.items()}
    per_cpu = {m: t / notebooks for m, t in cpu.items()}
    same = scores["judge"] == scores["kernel"]
    print(f"{notebooks} notebooks per mode ({', '.join(args.assignment)}), reference solutions")
    for what, figures in (("wall", per), ("CPU", per_cpu)):
        print(f"  {what:4s}: with the judge {figures['judge']:.2f} s per notebook, test cells in "
              f"the kernel {figures['kernel']:.2f} s: the judge's cost "
              f"{100 * (figures['judge'] / figures['kernel'] - 1):+.0f}%")
    print(f"  identical scores: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
