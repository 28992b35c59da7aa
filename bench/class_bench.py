"""Benchmark the class grader (issue 4): N synthetic tp_linear submissions (correct, wrong and
hostile), graded by `tpcourse.grade_class` and by a sequential stock `nbgrader autograde` on
the same submissions in the same run; plus the sandbox's overhead per notebook.

    .venv/bin/python bench/class_bench.py [--n 200] [--workers N] [--overhead-n 20] [--out DIR]

Prints seconds per notebook for each, the speed-up ratio, and the overhead; writes
bench_output/class_bench.json. Timings only: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpcourse import REPO  # noqa: E402
from tpcourse.classgrade import ClassGrader  # noqa: E402
from tpcourse.cycle import Course  # noqa: E402
from tpcourse.examples import hostile_students as H  # noqa: E402
from tpcourse.examples import numpy_students as N  # noqa: E402
from tpcourse.cycle import ensure_tools_on_path  # noqa: E402
from tpcourse.submissions import build  # noqa: E402

A = "tp_linear"
SANDBOX = "from tpcourse.sandbox import configure\nconfigure(c)\n"
# Hostile students that cost no timeout (those would only measure the timeout itself).
FAST_HOSTILE = ("h_os_exit", "h_sys_exit", "h_kill_parent", "h_memory_grab", "h_network",
                "h_read_source", "h_write_gradebook", "h_rebind_numpy", "h_tamper_tests",
                "h_stdout_flood")


def synthetic(n: int) -> list[tuple[str, dict]]:
    """n (student, notebooks) pairs cycling through correct, wrong and hostile work."""
    ordinary = [s for s in N.ALL if s.assignment == A and s.student not in ("looping",)]
    kinds = [(s.student, build(s)) for s in ordinary]
    kinds += [(h.student, H.notebooks(h)) for h in H.HOSTILE if h.student in FAST_HOSTILE]
    return [(f"s{i:03d}_{kinds[i % len(kinds)][0]}", kinds[i % len(kinds)][1]) for i in range(n)]


def course(base: Path, name: str, subs, extra="") -> Course:
    c = Course.create(base / name, [A], extra_config=SANDBOX + extra)
    c.generate(A)
    for student, nbs in subs:
        c.place_submission(student, A, nbs, timestamp="2026-11-20 10:00:00.000000 UTC")
    return c


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--overhead-n", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "bench_output"))
    args = ap.parse_args(argv)
    ensure_tools_on_path()
    base = Path(tempfile.mkdtemp(prefix="class-bench-"))
    try:
        subs = synthetic(args.n)
        ours, stock = course(base, "ours", subs), course(base, "stock", subs)
        grader = ClassGrader(ours.root, A, workers=args.workers, progress=False,
                             feedback=False, export=False)
        t_ours = timed(grader.run)
        t_stock = timed(lambda: stock.nbgrader("autograde", A, timeout=7200))
        same = all(ours.scores(A, s) == stock.scores(A, s) for s, _ in subs)
        # the rest of the command: a rerun finds every grade recorded, writes feedback, exports
        t_rest = timed(ClassGrader(ours.root, A, workers=args.workers, progress=False).run)

        # sandbox overhead: stock autograde of correct/wrong work, sandboxed or not
        plain = [(s, nbs) for s, nbs in subs if not s.split("_", 1)[1].startswith("h_")]
        plain = plain[:args.overhead_n]
        boxed = course(base, "boxed", plain)
        bare = course(base, "bare", plain, extra="c.Sandbox.enabled = False\n")
        t_boxed = timed(lambda: boxed.nbgrader("autograde", A, timeout=7200))
        t_bare = timed(lambda: bare.nbgrader("autograde", A, timeout=7200))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    n, m = args.n, len(plain)
    result = {
        "notebooks": n, "workers": grader.workers, "cores": len(os.sched_getaffinity(0)),
        "grade_class_autograde_s": round(t_ours, 1),
        "grade_class_s_per_notebook": round(t_ours / n, 3),
        "stock_sequential_s": round(t_stock, 1),
        "stock_s_per_notebook": round(t_stock / n, 3),
        "speedup_vs_stock": round(t_stock / t_ours, 2),
        "grades_identical": same,
        "feedback_and_export_s": round(t_rest, 1),
        "grade_class_full_command_s": round(t_ours + t_rest, 1),
        "overhead_notebooks": m,
        "sandboxed_s_per_notebook": round(t_boxed / m, 3),
        "unsandboxed_s_per_notebook": round(t_bare / m, 3),
        "sandbox_overhead_s_per_notebook": round((t_boxed - t_bare) / m, 3),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "class_bench.json").write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:36s} {value}")
    return result


if __name__ == "__main__":
    main()
