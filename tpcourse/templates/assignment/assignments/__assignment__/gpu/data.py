"""__assignment__'s test data, from a seed (gpu_runner.data's rules: numpy float32 arrays the
ranks turn into tensors and the judge into the dense float64 reference; numpy only).

in_features = 7 splits unevenly over 2, 3 and 4 ranks. Each rank gets its OWN master_weight:
the true weight in its columns and noise elsewhere (tpgrade.tensors.noisy_master), so a layer
that multiplies by the whole master_weight gets noise in its answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_runner.data import rank_seed, shard
from tpgrade.cases import arrays
from tpgrade.tensors import noisy_master

BATCH, IN, OUT = 3, 7, 5


@dataclass
class Case:
    """Weight w (OUT, IN), input x (BATCH, IN); the columns of w split over the ranks."""
    w: np.ndarray
    x: np.ndarray
    seed: int

    def master(self, rank: int, size: int) -> np.ndarray:
        """The master_weight rank `rank` of `size` is given."""
        lo, hi = shard(IN, rank, size)
        return noisy_master(self.w, lo, hi, 1, rank_seed(self.seed, rank, size, 1))


def case(seed: int) -> Case:
    w, x = arrays(seed, (OUT, IN), (BATCH, IN), dtype=np.float32)
    return Case(w, x, seed)
