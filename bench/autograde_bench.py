"""How long stock `nbgrader autograde` takes per notebook on this machine.

    python bench/autograde_bench.py [--n 20] [--assignment NAME] [--student reference]

Places N copies of one catalogue submission (the reference solution by default) in a fresh
temporary course, runs ONE `nbgrader autograde` call over all of them, and prints the wall time
of that call, seconds per notebook, and the fixed cost of an nbgrader command with nothing to
grade (measured in the same run), so the per-notebook figure can be read net of start-up.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

import assignments  # noqa: E402
from tpcourse.catalogue import students  # noqa: E402
from tpcourse.cycle import Course  # noqa: E402
from tpcourse.demo import gradebook_scores  # noqa: E402
from tpcourse.submissions import Submission, build  # noqa: E402


def pick(assignment: str, student: str) -> Submission:
    for sub in students(assignment):
        if sub.student == student:
            return sub
    if student == "reference":
        return Submission("reference", assignment)  # the instructor's answers from source/
    raise SystemExit(f"no catalogue entry {student!r} for {assignment}")


def bench(n: int, assignment: str, student: str, root: Path) -> dict:
    course = Course.create(root, assignments=[assignment])
    course.generate(assignment)
    sub = pick(assignment, student)
    notebooks = build(sub, course.root / "source", course.root / "release")
    for i in range(n):
        course.place_submission(f"bench{i:03d}", assignment, notebooks)

    t0 = time.perf_counter()
    course.autograde(assignment)
    total = time.perf_counter() - t0

    # The same command with nothing new to grade: nbgrader's start-up and bookkeeping alone.
    t0 = time.perf_counter()
    course.nbgrader("autograde", assignment)  # no --force: skips what is already graded
    startup = time.perf_counter() - t0

    scores = gradebook_scores(course, assignment)
    full = sum(all(s == m for s, m in g.values()) for g in scores.values())
    return {"n": n, "notebooks": n * len(notebooks), "total": total, "startup": startup,
            "graded": len(scores), "full_marks": full}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="copies of the submission (default 20)")
    parser.add_argument("--assignment", default=assignments.names()[0],
                        help="default: the course's first assignment")
    parser.add_argument("--student", default="reference", help="catalogue entry to copy")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
        r = bench(args.n, args.assignment, args.student, Path(tmp) / "course")
    per = r["total"] / r["notebooks"]
    net = (r["total"] - r["startup"]) / r["notebooks"]
    print(f"autograde {args.assignment}: {r['notebooks']} notebooks ({r['n']} x {args.student}) "
          f"in one nbgrader call")
    print(f"  total wall time          {r['total']:8.1f} s")
    print(f"  seconds per notebook     {per:8.2f} s")
    print(f"  nbgrader start-up alone  {r['startup']:8.1f} s  "
          f"(per notebook net of it: {net:.2f} s)")
    print(f"  graded {r['graded']}, full marks {r['full_marks']}")
    return 0 if r["graded"] == r["n"] else 1


if __name__ == "__main__":
    sys.exit(main())
