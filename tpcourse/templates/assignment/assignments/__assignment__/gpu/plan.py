"""__assignment__'s units (gpu_runner.plan says what each table means): RowParallelMatmul's
forward, its output and its collectives, all counting towards one cell, gpu_matmul_forward."""
from __future__ import annotations

from gpu_runner.plan import naming_rule

LAYERS = ("matmul",)
STEPS = {"matmul": ("forward",)}
CHECKS = {
    # "*": checked at world size >= 2 only (one rank may rightly skip its collective)
    ("matmul", "forward"): ("matmul.forward", "counts.matmul_forward*"),
}


def cell_of(check: str) -> str:
    return naming_rule(check, family_cells={"counts": "gpu_matmul_forward"})
