"""Benchmark the class grader (issue 4): N synthetic submissions (correct, wrong and hostile) of
the assignment whose examples hold the hostile students, graded by `tpcourse.grade_class` and by
a sequential stock `nbgrader autograde` on the same submissions in the same run; plus the
sandbox's overhead per notebook.

    .venv/bin/python bench/class_bench.py [--n 200] [--batches 4] [--workers N] [--overhead-n 20]

The class arrives in `--batches` batches; each batch is graded by both, in alternating order,
so that both see the same machine: on a shared virtual machine the CPU time the host takes
away (steal) drifts over minutes. Both skip what they graded in earlier batches (stock nbgrader
skips existing autograded folders; grade_class resumes). The steal seen by each is reported.

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
from tpgrader.classgrade import ClassGrader  # noqa: E402
from tpcourse.cycle import Course  # noqa: E402
import assignments  # noqa: E402
from tpcourse.catalogue import examples, students  # noqa: E402
from tpcourse.cycle import ensure_tools_on_path  # noqa: E402
from tpcourse.submissions import build  # noqa: E402

A = next(a for a in assignments.names() if getattr(examples(a), "HOSTILE", ()))
H = examples(A).hostile
SANDBOX = "from tpgrader import configure\nconfigure(c)\n"
# Hostile students that cost no timeout (those would only measure the timeout itself).
FAST_HOSTILE = ("h_os_exit", "h_sys_exit", "h_kill_parent", "h_memory_grab", "h_network",
                "h_read_source", "h_write_gradebook", "h_rebind_numpy", "h_tamper_tests",
                "h_stdout_flood")


def synthetic(n: int) -> list[tuple[str, dict]]:
    """n (student, notebooks) pairs cycling through correct, wrong and hostile work."""
    ordinary = [s for s in students(A) if s.student not in ("looping",)]
    kinds = [(s.student, build(s)) for s in ordinary]
    kinds += [(h.student, H.notebooks(h)) for h in H.HOSTILE if h.student in FAST_HOSTILE]
    return [(f"s{i:03d}_{kinds[i % len(kinds)][0]}", kinds[i % len(kinds)][1]) for i in range(n)]


def course(base: Path, name: str, subs, extra="") -> Course:
    c = Course.create(base / name, [A], extra_config=SANDBOX + extra)
    c.generate(A)
    place(c, subs)
    return c


def place(c: Course, subs) -> None:
    for student, nbs in subs:
        c.place_submission(student, A, nbs, timestamp="2026-11-20 10:00:00.000000 UTC")


def _cpu_ticks() -> tuple[int, int]:
    """(all, steal) jiffies of the machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7]


class Clock:
    """Wall seconds of the timed calls, and the share of the machine's CPU time the host took
    away (steal) while they ran."""

    def __init__(self):
        self.seconds, self.ticks, self.steal = 0.0, 0, 0

    def __call__(self, fn) -> float:
        (a0, s0), t = _cpu_ticks(), time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        a1, s1 = _cpu_ticks()
        self.seconds, self.ticks, self.steal = self.seconds + dt, self.ticks + a1 - a0, self.steal + s1 - s0
        return dt

    @property
    def steal_share(self) -> float:
        return round(self.steal / self.ticks, 3) if self.ticks else 0.0


def timed(fn) -> float:
    return Clock()(fn)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--overhead-n", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "bench_output"))
    args = ap.parse_args(argv)
    ensure_tools_on_path()
    base = Path(tempfile.mkdtemp(prefix="class-bench-"))
    try:
        subs = synthetic(args.n)
        ours, stock = course(base, "ours", []), course(base, "stock", [])
        grader = ClassGrader(ours.root, A, workers=args.workers, progress=False,
                             feedback=False, export=False)
        ours_clock, stock_clock = Clock(), Clock()
        size = -(-len(subs) // max(1, args.batches))
        for i, start in enumerate(range(0, len(subs), size)):
            batch = subs[start:start + size]
            place(ours, batch)
            place(stock, batch)
            runs = [lambda: ours_clock(grader.run),
                    lambda: stock_clock(lambda: stock.nbgrader("autograde", A, timeout=7200))]
            for run in runs if i % 2 == 0 else runs[::-1]:
                run()
        t_ours, t_stock = ours_clock.seconds, stock_clock.seconds
        same = all(ours.scores(A, s) == stock.scores(A, s) for s, _ in subs)
        # the rest of the command: a rerun finds every grade recorded, writes feedback, exports
        t_rest = timed(ClassGrader(ours.root, A, workers=args.workers, progress=False).run)

        # sandbox overhead: stock autograde of correct/wrong work, sandboxed or not
        plain = [(s, nbs) for s, nbs in subs if not s.split("_", 1)[1].startswith("h_")]
        plain = plain[:args.overhead_n]
        boxed = course(base, "boxed", plain)
        bare = course(base, "bare", plain, extra="c.Sandbox.enabled = False\n")
        boxed_clock, bare_clock = Clock(), Clock()
        t_boxed = boxed_clock(lambda: boxed.nbgrader("autograde", A, timeout=7200))
        t_bare = bare_clock(lambda: bare.nbgrader("autograde", A, timeout=7200))
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
        "batches": -(-n // size),
        "cpu_steal_share_grade_class": ours_clock.steal_share,
        "cpu_steal_share_stock": stock_clock.steal_share,
        "feedback_and_export_s": round(t_rest, 1),
        "grade_class_full_command_s": round(t_ours + t_rest, 1),
        "overhead_notebooks": m,
        "sandboxed_s_per_notebook": round(t_boxed / m, 3),
        "unsandboxed_s_per_notebook": round(t_bare / m, 3),
        "sandbox_overhead_s_per_notebook": round((t_boxed - t_bare) / m, 3),
        "cpu_steal_share_sandboxed": boxed_clock.steal_share,
        "cpu_steal_share_unsandboxed": bare_clock.steal_share,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "class_bench.json").write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:36s} {value}")
    return result


if __name__ == "__main__":
    main()
