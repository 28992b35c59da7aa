"""How far the grader's own TP-overhead measurement disagrees with itself on this machine: the
margin behind gpu_timing's "agrees" check (tp_torch_attention).

    .venv/bin/python assignments/tp_torch_attention/bench/overhead_agreement_bench.py \
        [--trials 10]

Each trial, on 2 forked gloo ranks, interleaves runs of the assignment's gpu/overhead.py measure
with the arguments the runner uses on CPU (gpu/data.py's MEASURE): as the judge does, AGREE_RUNS runs
play the student, one more the grader, and for every size, quantity (compute, all-reduce) and
rank the ratio is how far the best of the student's runs lies outside [min, max] of the two
grader runs around it (1: inside; the check's statistic). Prints the worst and median ratio over
all trials, and for comparison the median of the student's runs against [min, max] of all the
grader's runs, and one run against one run. Run two copies at once (and something busy) to see
it under load.
The check allows 3 (gpu/data.py's AGREE_FACTOR); a correct function is this procedure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from assignments.tp_torch_attention.gpu import data  # noqa: E402


def _trial():
    import torch
    import torch.distributed as dist

    from assignments.tp_torch_attention.gpu.overhead import measure
    args = data.MEASURE["cpu"]
    runs = [measure(group=None, device=torch.device("cpu"), **args)
            for _ in range(2 * data.AGREE_RUNS + 1)]
    grader, student = runs[0::2], runs[1::2]
    worst = [1.0, 1.0, 1.0]           # best pair (the check's), median vs all, one vs one
    for n in args["sizes"]:
        for i in range(2):
            pairs = [(run[n][i], grader[k][n][i], grader[k + 1][n][i])
                     for k, run in enumerate(student)]
            best = min(max(1.0, min(a, b) / s, s / max(a, b)) for s, a, b in pairs)
            low, high = min(r[n][i] for r in grader), max(r[n][i] for r in grader)
            mid = statistics.median(run[n][i] for run in student)
            one, other = student[0][n][i], grader[0][n][i]
            ratios = (best, max(1.0, low / mid, mid / high), max(one / other, other / one))
            worst = [max(w, r) for w, r in zip(worst, ratios)]
    dist.barrier()
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args(argv)
    from tpsim.ranks import run_on_ranks
    start = time.perf_counter()
    results = []
    for _ in range(args.trials):
        results += run_on_ranks(_trial, 2, timeout=300)
    print(f"{args.trials} trials x 2 ranks in {time.perf_counter() - start:.0f} s")
    for k, name in enumerate(("best pair of runs (the check's)", "median against all runs",
                              "one run against one run")):
        ratios = [r[k] for r in results]
        print(f"{name:34s} worst {max(ratios):.2f}, median {statistics.median(ratios):.2f}"
              + (f" (allowed {data.AGREE_FACTOR:g})" if k == 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
