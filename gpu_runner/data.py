"""The rules every assignment's test data follows (its gpu/data.py builds it from a seed):
numpy float32 arrays, so that the ranks (which turn them into tensors) and the judge (which
computes the dense reference from them, in the grader process) build exactly the same numbers.
numpy only: the judging side imports no torch. Each rank gets its OWN master weights: the true
weight inside its shard and noise outside it, different noise on every rank
(`tpgrade.tensors.noisy_master`), so a layer that uses rows or columns it does not own gets
noise in its answer.
"""
from __future__ import annotations

from tpgrade.cases import balanced


def seed_of(unit) -> int:
    """Same data on every rank, in every relaunch and in the judge: a seed from the unit's
    assignment and name (not its world size: every size checks the same layer)."""
    name = f"{unit.assignment}/{unit.kind}.{unit.step}"
    return sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 100_000


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    return balanced(n, size)[rank]


def rank_seed(seed: int, rank: int, size: int, salt: int) -> int:
    """The seed of what one rank of `size` holds alone (its noisy master weight, its partial
    sum), `salt` telling its arrays apart."""
    return seed * 1000 + salt * 100 + size * 10 + rank
