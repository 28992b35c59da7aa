"""tp_torch's test data, from a seed (gpu_runner.data's rules: numpy float32 arrays the ranks
turn into tensors and the judge into the dense float64 reference; numpy only).

Dimensions are uneven on purpose (column 5 -> 7, row 7 -> 5, MLP 6 -> 10 -> 6). Each rank gets
its OWN master_weight: the true weight inside its shard and noise outside it, different noise
on every rank (`tpgrade.tensors.noisy_master`). A layer that keeps its shard gets the true
shard; one that computes the dense layer on every rank (or uses rows or columns it does not
own) gets noise in its answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_runner.data import rank_seed
from tpgrade.cases import arrays, balanced
from tpgrade.tensors import noisy_master

BATCH = 3
COLUMN_DIMS = (5, 7)          # in, out: out splits unevenly over 2, 3 and 4 ranks
ROW_DIMS = (7, 5)             # in splits unevenly
MLP_DIMS = (6, 10)            # hidden, ffn: ffn splits evenly over 2, unevenly over 3 and 4


@dataclass
class Linear:
    """A linear layer's case: weight w (out, in), bias b, input x, output gradient g; `axis` is
    the weight's split (0: rows, the column layer; 1: columns, the row layer)."""
    w: np.ndarray
    b: np.ndarray
    x: np.ndarray
    g: np.ndarray
    axis: int
    seed: int
    x3: np.ndarray | None = None       # a 3-D input (column layer)

    @property
    def split(self) -> int:
        """The number of features split over the ranks."""
        return self.w.shape[self.axis]

    def bounds(self, size):
        return balanced(self.split, size)

    def master(self, rank: int, size: int, rows: int | None = None) -> np.ndarray:
        """The master_weight rank `rank` of `size` is given (the first `rows` rows only: the
        empty-shard case)."""
        w = self.w if rows is None else self.w[:rows]
        lo, hi = balanced(w.shape[self.axis], size)[rank]
        return noisy_master(w, lo, hi, self.axis, rank_seed(self.seed, rank, size, self.axis))


def column(seed: int) -> Linear:
    i, o = COLUMN_DIMS
    w, b, x, g, x3 = arrays(seed, (o, i), (o,), (BATCH, i), (BATCH, o), (2, BATCH, i),
                            dtype=np.float32)
    return Linear(w, b, x, g, axis=0, seed=seed, x3=x3)


def row(seed: int) -> Linear:
    i, o = ROW_DIMS
    w, b, x, g = arrays(seed, (o, i), (o,), (BATCH, i), (BATCH, o), dtype=np.float32)
    return Linear(w, b, x, g, axis=1, seed=seed)


@dataclass
class MLP:
    """fc1 (w1 (ffn, hidden), b1), fc2 (w2 (hidden, ffn), b2), input x, output gradient g."""
    fc1: Linear
    fc2: Linear
    x: np.ndarray
    g: np.ndarray

    def bounds(self, size):
        return balanced(MLP_DIMS[1], size)


def mlp(seed: int) -> MLP:
    h, f = MLP_DIMS
    w1, b1, w2, b2, x, g = arrays(seed, (f, h), (f,), (h, f), (h,), (BATCH, h), (BATCH, h),
                                  dtype=np.float32)
    return MLP(Linear(w1, b1, x, None, axis=0, seed=seed),
               Linear(w2, b2, None, g, axis=1, seed=seed + 1), x, g)
