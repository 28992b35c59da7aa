"""The data of tp_torch_attention's units (ParallelAttention, ParallelTransformerLayer, the TP
overhead measurement): numpy only, so the ranks and the judge build the same numbers from a
seed (gpu_runner.data's rules).

Head counts are uneven on purpose: 6 query heads of size 2 (hidden 12) with 3 or 2 KV heads over
1-4 ranks give ranks 2+2+1+1 heads at world size 4, KV heads replicated on several ranks
(3 KV heads: at sizes 2 and 4; 2 KV heads: at sizes 2, 3 and 4), and a rank whose query heads
read two KV heads. Every rank gets its own master weights (the assignment's dense.master_weights:
the true rows of its heads and MLP units, noise elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass

from assignments.tp_torch_attention import dense as attention_dense

SHAPE = (2, 5, 12)           # batch, seq, hidden
HEADS, FFN = 6, 10
# (kv heads, causal) of each attention case, by step
ATTENTION = {"forward": ((3, False), (2, True)), "backward": ((2, True),),
             "float64": ((2, True),)}
LAYER = (2, True)            # the layer's (kv heads, causal)


@dataclass
class Case:
    """One problem: the weights P (dense.weights), input x, upstream g."""
    heads: int
    kv: int
    causal: bool
    P: dict
    x: object
    g: object
    seed: int

    def masters(self, rank, size):
        return attention_dense.master_weights(self.P, rank, size, self.heads, self.kv, self.seed)

    def attention(self, upstream=False):
        P = self.P
        return attention_dense.attention(self.x, P["wq"], P["wk"], P["wv"], P["wo"], self.heads,
                                         self.kv,
                                         self.causal, P["bo"], self.g if upstream else None)

    def layer(self, upstream=False):
        return attention_dense.layer(self.x, self.P, self.heads, self.kv, self.causal, 1e-5,
                                     self.g if upstream else None)


def attention_cases(seed, step) -> list[Case]:
    return [Case(HEADS, kv, causal, *attention_dense.weights(seed + i, SHAPE, HEADS, kv), seed + i)
            for i, (kv, causal) in enumerate(ATTENTION[step])]


def layer_case(seed) -> Case:
    kv, causal = LAYER
    return Case(HEADS, kv, causal, *attention_dense.weights(seed, SHAPE, HEADS, kv, FFN), seed)


# -- the TP overhead measurement (gpu/overhead.py on the ranks, gpu/judge.py) -------------------
# measure_overhead is called with these arguments on CPU (gloo) and on GPUs (NCCL, larger sizes
# so that the times are not launch overheads); untested on GPUs in the test suite (no GPU there).
MEASURE = {"cpu": {"sizes": (256, 512, 1024), "tokens": 64, "repeats": 7, "warmup": 2},
           "cuda": {"sizes": (2048, 4096, 8192), "tokens": 4096, "repeats": 7, "warmup": 2}}
AGREE_RUNS = 4        # the student's function runs 4 times, between 5 runs of the grader's own
AGREE_FACTOR = 3.0    # each median within [min of the grader's / 3, max of the grader's x 3]
# The barrier probe: the group's last rank sleeps SKEW_MS after every matmul (a slow rank); on the
# other ranks an all-reduce timed without a barrier first includes that wait.
SKEW_MS = 40.0
# The warm-up probe: the first COLD_CALLS matmuls and all-reduces of each shape sleep COLD_MS
# (first calls are slow on a GPU: kernel selection, NCCL's lazy set-up, the allocator); called with
# warmup=COLD_CALLS and repeats=PROBE_REPEATS (< 2 x COLD_CALLS), a median with no warm-up
# includes them.
COLD_MS, COLD_CALLS = 40.0, 3
PROBE_REPEATS = 5
# Each probe runs twice and passes when one run does: the mistake it looks for shows in every
# run, a burst of load on the machine would have to hit both.
PROBE_RUNS = 2


def probe_args(device_type: str) -> dict:
    """measure_overhead's arguments in the two probes: the first size, few repeats."""
    base = MEASURE[device_type]
    return {"sizes": base["sizes"][:1], "tokens": base["tokens"], "repeats": PROBE_REPEATS,
            "warmup": COLD_CALLS}
