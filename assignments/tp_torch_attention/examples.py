"""Example submissions for `tp_torch_attention` (tests, demo): the torch part of attention.

Each student is a `tpcourse.submissions.Submission` whose answers are the instructor's own
(source/tp_torch_attention) with one mistake edited in. `loses` names every cell that must come
out below its maximum: the notebook's test cells (2 CPU ranks, judged in the grader) and the
gpu_* cells (the gpu_runner, world sizes 1-4); every other cell keeps full marks. A mistake that
makes the student's layer raise on some ranks also loses the collective counts there (nothing to
count), and is listed so.
"""
from __future__ import annotations

import assignments
from tpcourse.submissions import Submission
from tpjudge.cells import read, reference_answers

ASSIGNMENT = NOTEBOOK = "tp_torch_attention"
SOURCE = assignments.get(ASSIGNMENT).notebook
GPU_CELLS = {"gpu_attention_forward": 3, "gpu_attention_backward": 3, "gpu_layer_forward": 2,
             "gpu_layer_backward": 2, "gpu_collective_counts": 2, "gpu_timing": 3}
SOLUTION_IDS = ("sol_tp_torch", "sol_head_layers", "sol_attention", "sol_layer", "sol_measure",
                "sol_model")

_ANSWERS = reference_answers(read(SOURCE))
_ATTENTION = {"test_attention_forward", "test_attention_backward", "test_layer_forward",
              "test_layer_backward"}
_GPU_LAYERS = {"gpu_attention_forward", "gpu_attention_backward", "gpu_layer_forward",
               "gpu_layer_backward"}


def _edited(cell, *edits):
    """The instructor's answer of `cell` with (old, new) replacements (each old exactly once)."""
    code = _ANSWERS[cell]
    for old, new in edits:
        if code.count(old) != 1:
            raise ValueError(f"{cell}: the reference answer no longer holds {old!r} once")
        code = code.replace(old, new)
    return code


def _student(name, cell, edits, loses, why):
    return Submission(name, ASSIGNMENT, {NOTEBOOK: {cell: _edited(cell, *edits)}},
                      frozenset(loses), why)


REFERENCE = [Submission("tattn_reference", ASSIGNMENT, {}, frozenset(),
                        "the instructor's solution from source/tp_torch_attention")]
UNMODIFIED = [Submission("tattn_unmodified", ASSIGNMENT, {}, frozenset(), "the release as is",
                         unanswered=frozenset({NOTEBOOK}), loses_all=True)]

# Valid alternatives: full marks.
VALID = [
    _student("tattn_sdpa", "sol_attention", [(
        "        scores = q @ k.transpose(-1, -2) * d ** -0.5               # (..., H_r, seq, seq)\n"
        "        if self.causal:\n"
        "            seq = x.shape[-2]\n"
        "            future = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)\n"
        "            scores = scores.masked_fill(future, float(\"-inf\"))     # before the softmax\n"
        "        o = scores.softmax(dim=-1) @ v                             # over the keys\n",
        "        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)\n")],
        (), "torch's fused scaled_dot_product_attention on the local heads"),
]

MISTAKES = [
    _student("tattn_head_split", "sol_head_layers", [
        ("        self.weight = nn.Parameter(torch.cat([wq[a * d:z * d], wk[ka * d:kz * d],",
         "        lo, hi = shard_range(num_heads * d, rank, world_size)   # a split of features\n"
         "        self.weight = nn.Parameter(torch.cat([wq[lo:hi], wk[ka * d:kz * d],"),
        ("        self.weight = nn.Parameter(wo[:, a * d:z * d].clone())",
         "        lo, hi = shard_range(num_heads * d, rank, world_size)\n"
         "        self.weight = nn.Parameter(wo[:, lo:hi].clone())")],
        {"test_projection_shards", *_ATTENTION, *_GPU_LAYERS, "gpu_collective_counts"},
        "the Q rows and Wo columns split by features (shard_range(H * d)), cutting heads when "
        "the head count does not divide"),
    _student("tattn_kv_not_replicated", "sol_head_layers", [(
        "    if a == z:                                   # no query heads: no KV heads either\n"
        "        return (a, z), (a // group, a // group)\n"
        "    return (a, z), (a // group, (z - 1) // group + 1)",
        "    return (a, z), shard_range(num_kv_heads, rank, world_size)   # KV heads split too")],
        {"test_head_ranges", "test_projection_shards", *_ATTENTION, *_GPU_LAYERS,
         "gpu_collective_counts"},
        "KV heads split by the balanced split of the KV heads: with fewer KV heads than ranks "
        "some ranks miss the KV head their query heads read"),
    _student("tattn_softmax_heads", "sol_attention", [(
        "        o = scores.softmax(dim=-1) @ v                             # over the keys",
        "        o = scores.softmax(dim=-3) @ v                             # over the heads")],
        {*_ATTENTION, *_GPU_LAYERS},
        "the softmax over the heads axis, the one tensor parallelism splits"),
    _student("tattn_mask_after_softmax", "sol_attention", [(
        "            scores = scores.masked_fill(future, float(\"-inf\"))     # before the softmax\n"
        "        o = scores.softmax(dim=-1) @ v                             # over the keys",
        "            o = scores.softmax(dim=-1).masked_fill(future, 0.0) @ v\n"
        "        else:\n"
        "            o = scores.softmax(dim=-1) @ v")],
        {*_ATTENTION, *_GPU_LAYERS},
        "the causal mask applied after the softmax: rows no longer sum to 1"),
    _student("tattn_mask_device", "sol_attention", [(
        "torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)",
        "torch.ones(seq, seq, dtype=torch.bool).triu(1)   # no device=")],
        {"gpu_attention_forward", "gpu_attention_backward"},
        "the causal mask created without device=: right on the CPU, on another device than the "
        "scores on a GPU (caught by the float64 run on the meta default device)"),
    _student("tattn_allreduce_after_qkv", "sol_attention", [(
        "        q, k, v = self.qkv(x).split(",
        "        q, k, v = reduce_from_tp_region(self.qkv(x), self.qkv.group).split(")],
        {*_ATTENTION, *_GPU_LAYERS, "gpu_collective_counts"},
        "an all-reduce after the column-parallel QKV projection"),
    _student("tattn_bias_every_rank", "sol_head_layers", [(
        "        y = reduce_from_tp_region(F.linear(o, self.weight), self.group)  # bias not in the "
        "partials\n        return y if self.bias is None else y + self.bias",
        "        return reduce_from_tp_region(F.linear(o, self.weight, self.bias), self.group)")],
        {"test_attention_forward", "test_layer_forward", "test_layer_backward",
         "gpu_attention_forward", "gpu_layer_forward", "gpu_layer_backward"},
        "the output projection's bias added on every rank before the all-reduce (in the layer "
        "it changes everything after the attention, its gradients too)"),
    _student("tattn_no_f", "sol_head_layers", [(
        "        return F.linear(copy_to_tp_region(x, self.group), self.weight)",
        "        return F.linear(x, self.weight)")],
        {"test_attention_backward", "test_layer_backward", "gpu_attention_backward",
         "gpu_layer_backward", "gpu_collective_counts"},
        "the QKV projection without f (copy_to_tp_region): dL/dx holds one rank's term"),
    _student("tattn_layer_extra_allreduce", "sol_layer", [(
        "        h = x + self.attn(self.ln1(x))            # all-reduce 1 (inside attn.proj)\n",
        "        h = x + self.attn(self.ln1(x))            # all-reduce 1 (inside attn.proj)\n"
        "        dist.all_reduce(h.detach().clone(), group=self.attn.qkv.group)  # a leftover "
        "check\n")],
        {"gpu_collective_counts"},
        "a second (debugging) all-reduce in the layer: right numbers, more traffic"),
    _student("tattn_no_barrier", "sol_measure", [(
        "        dist.barrier(group=group)                  # every rank starts the clock together\n",
        "")],
        {"gpu_timing"}, "timing without a barrier: a rank's all-reduce includes the wait for "
                        "slower ranks"),
    _student("tattn_no_warmup", "sol_measure", [(
        "        for _ in range(warmup):                              # first calls are slow: "
        "not timed\n            x @ w.T\n            dist.all_reduce(partial, group=group)\n",
        "")],
        {"gpu_timing"}, "timing without warm-up rounds: the first, slow calls are timed"),
    _student("tattn_timing_seconds", "sol_measure", [(
        "        return (time.perf_counter() - start) * 1e3", "        return time.perf_counter() - start")],
        {"gpu_timing"}, "times in seconds where milliseconds are asked"),
    _student("tattn_model_half_bytes", "sol_model", [(
        "    nbytes = 2 * (tp - 1) / tp * tokens * hidden * dtype_bytes",
        "    nbytes = (tp - 1) / tp * tokens * hidden * dtype_bytes")],
        {"test_model_example", "test_model_values"},
        "a ring all-reduce counted as sending (tp - 1) / tp of the tensor (a reduce-scatter "
        "only), not 2 (tp - 1) / tp"),
]

STUDENTS = [*VALID, *MISTAKES]
ALL = [*REFERENCE, *UNMODIFIED, *STUDENTS]
BY_NAME = {s.student: s for s in ALL}
DEMO = ("tattn_no_barrier",)
