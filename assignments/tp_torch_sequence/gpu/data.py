"""tp_torch_sequence's test data, from a seed (gpu_runner.data's rules: numpy float32 arrays the
ranks turn into tensors and the judge into the dense float64 reference; numpy only).

Lengths and vocabularies are uneven on purpose: 7 tokens are 4 + 3, 3 + 2 + 2 and 2 + 2 + 2 + 1
over 2, 3 and 4 ranks, 3 tokens leave a rank with none at 4; a vocabulary of 11 is 6 + 5,
4 + 4 + 3 and 3 + 3 + 3 + 2, one of 3 leaves a rank with no rows at 4. Each rank gets its own
master weights (the true rows or columns in its shard, noise outside: tpgrade.tensors.
noisy_master) and, where a tensor-parallel layer would hand each rank a different tensor
(partial sums, the upstream gradient of a gathered activation), its own data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_runner.data import rank_seed as _rank_seed
from tpgrade.cases import arrays, balanced
from tpgrade.tensors import noisy_master

SEQ, SHORT_SEQ = 7, 3          # tokens; SHORT_SEQ < 4 ranks: an empty shard
BATCH = 2
MAP_HIDDEN = 3                 # the mappings' (s, b, h)
SP_DIMS = (6, 10)              # LayerSP: hidden, ffn
VOCAB, SMALL_VOCAB = 11, 3     # SMALL_VOCAB < 4 ranks: a rank with no rows / columns
EMB_DIM = 4
EPS = 1e-5


def rows(n: int, rank: int, size: int) -> slice:
    return slice(*balanced(n, size)[rank])


@dataclass
class Mappings:
    """x: a sequence (s, b, h); g: a gradient of the same shape; per_rank(rank, size): what
    one rank holds when every rank holds something different (its partial sum, or its
    upstream gradient of a gathered tensor)."""
    x: np.ndarray
    g: np.ndarray
    seed: int

    def per_rank(self, rank: int, size: int, salt: int = 0) -> np.ndarray:
        return arrays(_rank_seed(self.seed, rank, size, salt), self.x.shape,
                      dtype=np.float32)[0]


def mappings(seed: int) -> Mappings:
    x, g = arrays(seed, (SEQ, BATCH, MAP_HIDDEN), (SEQ, BATCH, MAP_HIDDEN), dtype=np.float32)
    return Mappings(x, g, seed)


@dataclass
class Block:
    """LayerSP's case: x (s, b, h), LayerNorm ln_w/ln_b, fc1 w1 (f, h)/b1, fc2 w2 (h, f)/b2,
    the output gradient g."""
    x: np.ndarray
    ln_w: np.ndarray
    ln_b: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    g: np.ndarray
    seed: int

    def masters(self, rank: int, size: int):
        """(w1, w2) as rank `rank` of `size` gets them: its rows of W1, its columns of W2."""
        lo, hi = balanced(SP_DIMS[1], size)[rank]
        return (noisy_master(self.w1, lo, hi, 0, _rank_seed(self.seed, rank, size, 1)),
                noisy_master(self.w2, lo, hi, 1, _rank_seed(self.seed, rank, size, 2)))


def block(seed: int) -> Block:
    h, f = SP_DIMS
    x, ln_w, ln_b, w1, b1, w2, b2, g = arrays(seed, (SEQ, BATCH, h), (h,), (h,), (f, h), (f,),
                                              (h, f), (h,), (SEQ, BATCH, h), dtype=np.float32)
    return Block(x, (1 + 0.5 * ln_w).astype(np.float32), ln_b, w1, b1, w2, b2, g, seed)


@dataclass
class Embedding:
    """A table (V, h), token ids (s, b) using every rank's rows (with repeats), the output
    gradient g (s, b, h)."""
    table: np.ndarray
    ids: np.ndarray
    g: np.ndarray
    seed: int

    def master(self, rank: int, size: int) -> np.ndarray:
        lo, hi = balanced(len(self.table), size)[rank]
        return noisy_master(self.table, lo, hi, 0, _rank_seed(self.seed, rank, size, 3))


def embedding(seed: int, vocab: int = VOCAB) -> Embedding:
    table, g = arrays(seed, (vocab, EMB_DIM), (SEQ, BATCH, EMB_DIM), dtype=np.float32)
    ids = np.random.default_rng(seed).integers(0, vocab, size=(SEQ, BATCH))
    ids.reshape(-1)[:vocab] = np.arange(vocab)[: ids.size]      # every row used at least once
    return Embedding(table, ids, g, seed)


@dataclass
class Logits:
    """Logits z (s, b, V), the targets (s, b), the loss's upstream gradient g (s, b)."""
    z: np.ndarray
    target: np.ndarray
    g: np.ndarray


def logits(seed: int, vocab: int = VOCAB, scale: float = 3.0, shift: float = 0.0) -> Logits:
    z, g = arrays(seed, (SEQ, BATCH, vocab), (SEQ, BATCH), dtype=np.float64)
    target = np.random.default_rng(seed + 1).integers(0, vocab, size=(SEQ, BATCH))
    return Logits((z * scale + shift).astype(np.float32), target, g.astype(np.float32))


def large_logits(seed: int) -> Logits:
    """Logits around 1e4, spread over +-3e4: exp overflows without the shared max."""
    return logits(seed, scale=1e4, shift=1e4)
