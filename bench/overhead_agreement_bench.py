"""How far the grader's own TP-overhead measurement disagrees with itself on this machine: the
margin behind gpu_timing's "agrees" check (tp_torch_attention).

    .venv/bin/python bench/overhead_agreement_bench.py [--trials 10]

Each trial, on 2 forked gloo ranks, interleaves runs of gpu_runner.overhead.measure with the
arguments the runner uses on CPU (data_attention.MEASURE): as the judge does, AGREE_RUNS runs
play the student, one more the grader, and for every size, quantity (compute, all-reduce) and rank the ratio is
how far the student's median lies outside [min, max] of the grader's runs (1: inside). Prints the
worst ratio of each trial, and for comparison the same statistic from one run against one run.
The check allows 3 (data_attention.AGREE_FACTOR); a correct function is this procedure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_runner import data_attention as D  # noqa: E402


def _trial():
    import torch
    import torch.distributed as dist

    from gpu_runner.overhead import measure
    args = D.MEASURE["cpu"]
    runs = [measure(group=None, device=torch.device("cpu"), **args)
            for _ in range(2 * D.AGREE_RUNS + 1)]
    grader, student = runs[0::2], runs[1::2]
    band = single = 1.0
    for n in args["sizes"]:
        for i in range(2):
            mine = statistics.median(run[n][i] for run in student)
            low, high = min(r[n][i] for r in grader), max(r[n][i] for r in grader)
            band = max(band, low / mine, mine / high)
            one, other = student[0][n][i], grader[0][n][i]
            single = max(single, one / other, other / one)
    dist.barrier()
    return band, single


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args(argv)
    from tpgrade.torch_ranks import run_on_ranks
    start = time.perf_counter()
    bands, singles = [], []
    for _ in range(args.trials):
        for band, single in run_on_ranks(_trial, 2, timeout=300):
            bands.append(band)
            singles.append(single)
    print(f"{args.trials} trials x 2 ranks in {time.perf_counter() - start:.0f} s")
    print(f"band statistic (the check's): worst {max(bands):.2f}, "
          f"median {statistics.median(bands):.2f} (allowed {D.AGREE_FACTOR:g})")
    print(f"one run against one run:      worst {max(singles):.2f}, "
          f"median {statistics.median(singles):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
