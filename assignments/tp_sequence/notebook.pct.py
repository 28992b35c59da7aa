# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tensor parallelism 3: sequence parallelism, and the vocabulary split over ranks
#
# In `tp_mlp` the MLP block split its two big matrices over `p` ranks and paid one all-reduce.
# Two things were left whole on every rank:
#
# * **the activations around the block.** The LayerNorm, the residual add (and, in a real
#   model, the dropout) run on the full `(s, b, h)` activation on *every* rank. They cost little
#   compute but a lot of memory, since the backward pass keeps their inputs.
# * **the vocabulary.** The embedding table and the output logits have a `V`-sized axis
#   (`V` = 50 257 for GPT-3, 128 256 for Llama 3): the largest matrix and the largest
#   activation of the model.
#
# This notebook removes both, as Megatron-LM does:
#
# 1. `layer_sp`: an MLP block with **sequence parallelism** (Korthikanti et al., 2022): the
#    LayerNorm and the residual work on each rank's own tokens; the all-reduce becomes an
#    **all-gather** before the column layer and a **reduce-scatter** after the row layer, for the
#    same number of bytes.
# 2. `vocab_parallel_embedding`: the embedding table split by rows (`VocabParallelEmbedding`).
# 3. `vocab_parallel_cross_entropy`: the loss on logits split over the vocabulary, without ever
#    moving the logits (`vocab_parallel_cross_entropy`).
#
# **Conventions (as in `tp_linear` and `tp_mlp`, plus two)**
#
# * `W` is `(out_features, in_features)` and a linear layer is `x @ W.T + b`; weights are passed
#   whole and each rank takes its slice with the **balanced split** (the first `n % p` ranks get
#   one more; empty shards must work).
# * **Activations are sequence-first**, `(s, b, h)` (or `(s, h)`, or `(s, ..., h)`): Megatron-LM's
#   `[s, b, h]` layout, so that a sequence shard is a contiguous block of rows, axis 0.
# * **Activations that live sharded are passed as a list with one array per rank**: item `r` is
#   what rank `r` holds (`x_shards[r]`, `logit_shards[r]`). A function that ends with sharded
#   activations returns such a list too.
# * Bad arguments raise `ValueError` saying what is wrong; inputs are never modified; the output
#   dtype follows the inputs.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
# Run this cell first. It is read-only: the grader restores it before grading.
import numpy as np

import tpsim                              # the simulated collectives (and their call log)
import tpgrade                            # the self-checks (tpgrade.selfcheck.run)
import assignments.tp_sequence.checks     # the checks used by the test cells below
from tpsim import all_gather, all_reduce, reduce_scatter

# %% [markdown]
# ## The collectives of this notebook
#
# `tpsim` gains a third collective, and `all_reduce` a second reduction:
#
# | collective | per-rank inputs | what rank `r` holds afterwards |
# |---|---|---|
# | `all_gather(per_rank, axis=-1)` | pieces `u_0, u_1, ...` | `np.concatenate(per_rank, axis)` (every rank the same) |
# | `all_reduce(per_rank)` | same-shape `p_0, p_1, ...` | `p_0 + p_1 + ...` (every rank the same) |
# | `all_reduce(per_rank, op="max")` | same-shape `m_0, m_1, ...` | the elementwise maximum (every rank the same) |
# | `reduce_scatter(per_rank, axis=-1)` | same-shape `p_0, p_1, ...` | **piece `r`** of `p_0 + p_1 + ...`, split along `axis` |
#
# `reduce_scatter` returns the list of pieces (item `r` is rank `r`'s), split with the balanced
# split. `op="max"` is `torch.distributed.all_reduce(t, op=ReduceOp.MAX)`; `tpsim` records it
# (`Call.reduce_op`), so a test can tell it from a sum.
#
# **What they cost.** In a ring of `p` ranks, an all-gather of an `N`-element result passes
# every piece on to the `p - 1` other ranks; a reduce-scatter of `N`-element inputs sends
# `p - 1` chunks of `N / p` from each rank. An **all-reduce is a reduce-scatter followed by an
# all-gather**:
#
# | collective (ring, `N` elements) | elements each rank sends | in total over the ranks |
# |---|---|---|
# | all-gather | `(p - 1) / p * N` | `(p - 1) * N` |
# | reduce-scatter | `(p - 1) / p * N` | `(p - 1) * N` |
# | all-reduce | `2 (p - 1) / p * N` | `2 (p - 1) * N` |
#
# (per rank exactly when `p` divides `N`; the totals hold for any split). So an all-gather plus
# a reduce-scatter of the same `N` elements cost **exactly one all-reduce**: sequence
# parallelism saves memory for free.

# %%
# Try it (not graded): 2 ranks.
with tpsim.recording() as calls:
    pieces = reduce_scatter([np.ones((3, 2)), 2 * np.ones((3, 2))], axis=0)
    print([piece.shape for piece in pieces], pieces[1])   # rank 0: 2 rows, rank 1: 1 row of 3s
    print(all_reduce([np.array([1.0, 7.0]), np.array([5.0, 2.0])], op="max"))   # [5. 7.]
print([(c.op, c.axis, c.reduce_op) for c in calls])


# %% nbgrader={"grade": false, "grade_id": "helpers", "locked": true, "schema_version": 3, "solution": false}
# Given (read-only): the default activation, the balanced split, and LayerNorm.
def relu(h):
    """max(h, 0), elementwise; keeps h's dtype."""
    return np.maximum(h, 0)


def shard_slices(n, num_ranks):
    """Rank r's part of n items, slice(start_r, stop_r), for n items over num_ranks ranks
    (the first n % num_ranks ranks get one more). ValueError for a bad num_ranks."""
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, (int, np.integer)) or num_ranks < 1:
        raise ValueError(f"num_ranks must be an int >= 1, got {num_ranks!r}")
    base, extra = divmod(n, num_ranks)
    slices, start = [], 0
    for rank in range(num_ranks):
        stop = start + base + (1 if rank < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


def split_sequence(x, num_ranks):
    """[x_0, x_1, ...]: rank r's tokens of a sequence-first x (s, ..., h), the balanced split
    of axis 0 (what each rank holds under sequence parallelism)."""
    return [x[tokens] for tokens in shard_slices(len(x), num_ranks)]


def layer_norm(x, weight, bias, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, for every token on
    its own (biased variance, as torch.nn.LayerNorm). weight, bias: (h,). Keeps x's dtype."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


print(shard_slices(7, 3), [x_r.shape for x_r in split_sequence(np.zeros((7, 2, 4)), 3)])


# %% [markdown]
# ## Why sequence parallelism: what plain TP leaves on every rank
#
# What each rank holds in one MLP block, `s` tokens, batch `b`, hidden size `h`, MLP width `f`:
#
# ```
#                      plain TP (tp_mlp)               TP + sequence parallelism
#  x (block input)     (s, b, h)      every rank       (s/p, b, h)   own tokens
#  u = layer_norm(x)   (s, b, h)      every rank       (s/p, b, h)   own tokens;
#                                                      gathered (s, b, h) for W1
#  W1's output         (s, b, f/p)    own units        (s, b, f/p)   own units
#  W2's partial sum    (s, b, h) -> all_reduce         (s, b, h) -> reduce_scatter
#  y = x + ...         (s, b, h)      every rank       (s/p, b, h)   own tokens
# ```
#
# LayerNorm, dropout and the residual add treat every token on its own, so they can run on a
# slice of the **sequence** instead of being repeated on every rank. Korthikanti et al. count
# the activations one layer keeps for the backward pass, in bytes (16-bit values, 1-byte
# dropout masks; `a` attention heads): `sbh (34 + 5as/h)` without parallelism; with TP over `t`
# ranks `sbh (10 + 24/t + 5as/(ht))`, where the `10 sbh` are exactly those replicated pieces
# (LayerNorm inputs, dropout masks, the residual); with TP **and** SP, `sbh/t (34 + 5as/h)`:
# everything is divided by `t`. The cell below works it out for GPT-3 175B.

# %%
# Activation memory per rank (Korthikanti et al. 2022, section 4), and the vocabulary.
def activation_bytes_per_layer(s, b, h, heads, t, sequence_parallel):
    """Bytes one transformer layer keeps for backward on each of t tensor-parallel ranks."""
    scores = 5 * heads * s / h                  # attention scores, softmax, their dropout mask
    if sequence_parallel:
        return s * b * h * (34 + scores) / t    # every activation divided by t
    return s * b * h * (10 + 24 / t + scores / t)   # 10 sbh replicated on every rank


GPT3 = dict(s=2048, b=1, h=12288, heads=96)     # GPT-3 175B: 96 layers, vocabulary 50257
LAYERS, VOCAB, TP = 96, 50257, 8
GiB, MiB = 2 ** 30, 2 ** 20
print(f"GPT-3 175B, {GPT3}, {LAYERS} layers, activation memory per rank:")
for label, t, sp in [("no parallelism", 1, False), (f"TP = {TP}", TP, False),
                     (f"TP = {TP} + SP", TP, True)]:
    layer = activation_bytes_per_layer(**GPT3, t=t, sequence_parallel=sp)
    print(f"  {label:16} {layer / GiB:5.2f} GiB per layer, {LAYERS * layer / GiB:6.1f} GiB in all")

# The vocabulary: the embedding table (bf16) and one micro-batch's logits (float32 for the loss)
table = VOCAB * GPT3["h"] * 2
logits = GPT3["s"] * GPT3["b"] * VOCAB * 4
print(f"embedding table {table / GiB:.2f} GiB, {table / TP / GiB:.2f} GiB per rank by rows")
print(f"logits {logits / GiB:.2f} GiB, {logits / TP / GiB:.2f} GiB per rank by vocabulary")

# Bytes each rank sends per MLP block, one bf16 (s, b, h) activation, ring collectives.
n = GPT3["s"] * GPT3["b"] * GPT3["h"]
all_reduce_bytes = 2 * (TP - 1) / TP * n * 2
all_gather_bytes = reduce_scatter_bytes = (TP - 1) / TP * n * 2
print(f"TP: all-reduce {all_reduce_bytes / MiB:.0f} MiB; TP + SP: all-gather "
      f"{all_gather_bytes / MiB:.0f} + reduce-scatter {reduce_scatter_bytes / MiB:.0f} MiB")


# %% [markdown]
# ## Exercise 1: the MLP block with sequence parallelism, `layer_sp`
#
# The block, exactly (pre-LayerNorm transformer; LayerNorm over the last axis, biased variance):
#
#     y = x + MLP(layer_norm(x))
#     MLP(u) = activation(u @ W1.T + b1) @ W2.T + b2
#
# `x` is `(s, ..., h)`; rank `r` holds its tokens `x_r = x[start_r:stop_r]`, the balanced split
# of the `s` tokens, and hidden units `c_r = shard_slices(f, p)[r]` of the MLP (`W1[c_r]`,
# `b1[c_r]`, `W2[:, c_r]`, as in `tp_mlp`). Two ranks, `s = 4`:
#
# ```
#  rank 0: x_0 = x[0:2] (2, b, h)              rank 1: x_1 = x[2:4] (2, b, h)
#  u_0 = layer_norm(x_0)  (2, b, h)            u_1 = layer_norm(x_1)  (2, b, h)
#         └──────────── u = all_gather([u_0, u_1], axis=0) ───────────┘  (4, b, h)
#  a_0 = act(u @ W1[c_0].T + b1[c_0])          a_1 = act(u @ W1[c_1].T + b1[c_1])
#        (4, b, f_0)   column-parallel               (4, b, f_1)
#  p_0 = a_0 @ W2[:, c_0].T  (4, b, h)         p_1 = a_1 @ W2[:, c_1].T  (4, b, h)
#         └──── [z_0, z_1] = reduce_scatter([p_0, p_1], axis=0) ──────┘
#  y_0 = x_0 + z_0 + b2  (2, b, h)             y_1 = x_1 + z_1 + b2  (2, b, h)
# ```
#
# The all-gather gathers `N = s * b * h` elements and the reduce-scatter scatters `N`: in a
# ring, `(p - 1) * N` each, together `2 (p - 1) * N`, exactly the all-reduce that `mlp_tp`
# paid for the same block. The tests count it from your recorded collectives.
#
# **Pitfalls**
#
# * *LayerNorm on the gathered tensor.* It gives the right numbers (LayerNorm is per token),
#   but every rank then normalizes all `s` tokens and keeps the `(s, b, h)` input for the
#   backward pass: the memory SP exists to save. Normalize your own shard, then gather.
# * *The wrong axis.* `tpsim`'s default is `axis=-1`, the hidden axis; SP splits the
#   **sequence**, axis 0, in both collectives.
# * *All-reduce, then slice.* `all_reduce` of the partials followed by `[start_r:stop_r]` gives
#   the right numbers for 1.5 times the traffic: use `reduce_scatter`.
# * *The N-fold bias.* `b2` is added after the reduce-scatter, by each rank to its own tokens;
#   inside the partial sums it would be counted `p` times. The residual, too, is each rank's own
#   `x_r`.
#
# **In Megatron-LM** (`megatron/core/tensor_parallel/`, with `sequence_parallel=True`): the
# gather is `gather_from_sequence_parallel_region` (all-gather along the first dim forward,
# reduce-scatter backward; `ColumnParallelLinear` does it inside its GEMM function,
# `linear_with_grad_accumulation_and_async_allreduce`), and `RowParallelLinear` ends with
# `reduce_scatter_to_sequence_parallel_region` (reduce-scatter along the first dim forward,
# all-gather backward) instead of `reduce_from_tensor_model_parallel_region`, then adds its
# bias to the scattered output. The LayerNorm weights stay whole on every rank (their
# gradients are all-reduced over the TP group, the `sequence_parallel` attribute marks them).
# Megatron requires `s` to divide by `p`; here uneven splits must work too.
#
# Write `layer_sp`: exactly **one `all_gather` and one `reduce_scatter`, both along axis 0**, and
# no `all_reduce`. Raise `ValueError` for an empty or non-list `x_shards`, shards whose
# `(..., h)` differ or that are not at least 2-D, shard lengths that are not the balanced split
# of their total (the reduce-scatter hands back the balanced split, and the residual must line
# up with it), and weights that do not fit (`W2` must map back to `h` for the residual).

# %% nbgrader={"grade": false, "grade_id": "sol_layer_sp", "locked": false, "schema_version": 3, "solution": true}
def layer_sp(x_shards, ln_weight, ln_bias, W1, W2, b1=None, b2=None, activation=relu, eps=1e-5):
    """y = x + MLP(layer_norm(x)) for one transformer MLP block with sequence parallelism.

    x_shards[r]: rank r's tokens of x, (s_r, ..., h), the balanced split of the s tokens over
    p = len(x_shards) ranks. ln_weight, ln_bias: (h,), whole on every rank. W1: (f, h) and
    b1: (f,) column-parallel, W2: (h, f) row-parallel, b2: (h,);
    MLP(u) = activation(u @ W1.T + b1) @ W2.T + b2, layer_norm as given (with eps).
    One all_gather (axis 0) before W1, one reduce_scatter (axis 0) after W2, no all_reduce.
    Returns [y_0, ..., y_{p-1}]: y_r (s_r, ..., h), rank r's tokens of y.
    """
    ### BEGIN SOLUTION
    if not isinstance(x_shards, (list, tuple)) or len(x_shards) == 0:
        raise ValueError("x_shards must be a non-empty list with one array per rank")
    x_shards = [np.asarray(x_r) for x_r in x_shards]
    p, inner = len(x_shards), x_shards[0].shape[1:]
    if len(inner) < 1 or any(x_r.shape[1:] != inner for x_r in x_shards):
        raise ValueError(f"every shard must be (s_r, ..., h) with the same (..., h), got "
                         f"{[x_r.shape for x_r in x_shards]}")
    lengths = [len(x_r) for x_r in x_shards]
    balanced = [t.stop - t.start for t in shard_slices(sum(lengths), p)]
    if lengths != balanced:
        raise ValueError(f"the shards hold {lengths} tokens; the balanced split of "
                         f"{sum(lengths)} over {p} ranks is {balanced}")
    h = inner[-1]
    W1, W2 = np.asarray(W1), np.asarray(W2)
    if np.shape(ln_weight) != (h,) or np.shape(ln_bias) != (h,):
        raise ValueError(f"ln_weight and ln_bias must be ({h},), got {np.shape(ln_weight)} "
                         f"and {np.shape(ln_bias)}")
    if W1.ndim != 2 or W1.shape[1] != h or W2.shape != (h, W1.shape[0]):
        raise ValueError(f"need W1 (f, {h}) and W2 ({h}, f), got W1 {W1.shape}, W2 {W2.shape}")
    if b1 is not None and np.shape(b1) != (W1.shape[0],):
        raise ValueError(f"b1 must be ({W1.shape[0]},), got {np.shape(b1)}")
    if b2 is not None and np.shape(b2) != (h,):
        raise ValueError(f"b2 must be ({h},), got {np.shape(b2)}")
    u_shards = [layer_norm(x_r, ln_weight, ln_bias, eps) for x_r in x_shards]  # own tokens
    u = all_gather(u_shards, axis=0)                     # (s, ..., h): all tokens, every rank
    partials = []
    for units in shard_slices(W1.shape[0], p):           # rank r's hidden units
        a_r = u @ W1[units].T                            # column-parallel: (s, ..., f_r)
        if b1 is not None:
            a_r = a_r + b1[units]
        partials.append(activation(a_r) @ W2[:, units].T)   # row-parallel partial: (s, ..., h)
    z_shards = reduce_scatter(partials, axis=0)          # rank r: its tokens of the sum
    y_shards = []
    for x_r, z_r in zip(x_shards, z_shards):
        y_r = x_r + z_r                                  # the residual, on the rank's tokens
        if b2 is not None:
            y_r = y_r + b2                               # once, after the reduce-scatter
        y_shards.append(y_r)
    return y_shards
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_sp_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# 2 ranks, x (4, 2, 4) split [2, 2], W1 (8, 4), W2 (4, 8): each shard equals the dense y
from assignments.tp_sequence.checks import sequence as check
check.sp_small(layer_sp)

# %% nbgrader={"grade": true, "grade_id": "test_sp_matches_dense", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: equals the dense block (float64, ~1e-12) for 1, 2, 3, 4, 8 ranks
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_matches_dense(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_uneven_sequence", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: s not divisible by the ranks, and empty shards
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_uneven_sequence(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_input_dims", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: x (s, h) and (s, b1, b2, h)
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_input_dims(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_biases_and_activation", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: b1 sliced, b2 once after the reduce_scatter, the activation passed in
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_biases_and_activation(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_layernorm_on_shard", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: the all_gather carries each rank's layer_norm(x_r), not the raw tokens
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_layernorm_on_shard(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_one_gather_one_reduce_scatter", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: exactly one all_gather and one reduce_scatter, no all_reduce
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_one_gather_one_reduce_scatter(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_reduce_scatter_inputs", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: rank r passes its partial sum over all s tokens, along axis 0
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_reduce_scatter_inputs(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_comm_bytes", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: all_gather + reduce_scatter move what one all-reduce moves, 2 (p - 1) * s * b * h
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_comm_bytes(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_inputs_unmodified", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: x_shards and the weights are not modified
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_inputs_unmodified(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_dtype", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: float32 in, float32 out
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_dtype(layer_sp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_sp_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import sequence as check
check.sp_bad_args(layer_sp)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_layer_sp")


# %% [markdown]
# ## Exercise 2: the vocabulary-parallel embedding, `vocab_parallel_embedding`
#
# An embedding is a lookup, `table[token_ids]`, with `table` of shape `(V, h)`. Split it **by
# rows**: rank `r` holds the rows `shard_slices(V, p)[r]` = `start_r:stop_r`, and every rank sees
# all the token ids. A rank can look up only the ids it owns; the rest it fills with zeros, and
# since each id is owned by exactly one rank, an **all-reduce (sum)** of the `(..., h)` results
# gives every rank every embedding. `V = 7` over 3 ranks (rows `0-2`, `3-4`, `5-6`):
#
# ```
#  token_ids = [5, 1, 3]                       (every rank sees all ids)
#            owns   local row = id - start_r   rank r's lookup (3, h)
#  rank 0    1      1 - 0 = 1                  [  0  , E[1],  0   ]
#  rank 1    3      3 - 3 = 0                  [  0  ,  0  , E[3] ]
#  rank 2    5      5 - 5 = 0                  [ E[5],  0  ,  0   ]
#                              all_reduce (sum) ─► [ E[5], E[1], E[3] ]
# ```
#
# **Pitfalls**
#
# * *Not masking.* A rank that looks up "some" row for an id it does not own (clipping it into
#   range, or wrapping it) adds a wrong row to the sum. Zero them.
# * *Not shifting.* Rank `r`'s table holds global rows `start_r ...` at local rows `0 ...`:
#   id `t` is local row `t - start_r`. Using `t` itself indexes out of the shard.
# * *Silent garbage for bad ids.* An id outside `[0, V)` is owned by no rank: every rank puts
#   zeros and the result is a zero vector, no error. Check the ids (`ValueError`); a negative id
#   would even index from the end of a numpy array.
#
# **In Megatron-LM**, `VocabParallelEmbedding` (`layers.py`) builds `input_mask` for ids outside
# `[vocab_start_index, vocab_end_index)`, looks up `masked_input = input_ - vocab_start_index`
# with the masked ids set to 0, sets `output_parallel[input_mask, :] = 0.0`, and all-reduces with
# `reduce_from_tensor_model_parallel_region`. With sequence parallelism
# (`reduce_scatter_embeddings=True`) it reduce-scatters along the sequence instead, so the
# embeddings arrive already split as `layer_sp` wants them. Megatron pads the vocabulary to a
# multiple of `p` (`make_vocab_size_divisible_by`); here uneven splits must work. vLLM's
# `VocabParallelEmbedding` does the same masking (`get_masked_input_and_mask`).
#
# Write `vocab_parallel_embedding`: one `all_reduce` (sum), nothing else. `token_ids` is an
# integer array of any shape; the output is `(..., h)` in the table's dtype. Raise `ValueError`
# for ids outside `[0, V)` or not integers, a table that is not 2-D, and a bad `num_ranks`.

# %% nbgrader={"grade": false, "grade_id": "sol_vocab_parallel_embedding", "locked": false, "schema_version": 3, "solution": true}
def vocab_parallel_embedding(token_ids, table, num_ranks):
    """table[token_ids] with the table's rows (the vocabulary) split over num_ranks ranks.

    token_ids: integer array (...), every id in [0, V); table: (V, h). Rank r holds the rows
    shard_slices(V, num_ranks)[r] and sees every id; it looks up the ids it owns (local row
    id - start_r) and puts zeros for the others. One all_reduce (sum) gives every rank the
    embeddings (..., h), in the table's dtype.
    """
    ### BEGIN SOLUTION
    token_ids, table = np.asarray(token_ids), np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must be (V, h), got shape {table.shape}")
    if not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {token_ids.dtype}")
    vocab = table.shape[0]
    outside = token_ids[(token_ids < 0) | (token_ids >= vocab)]
    if outside.size:
        raise ValueError(f"token ids must be in [0, {vocab}), got {outside[:5].tolist()}")
    lookups = []
    for rows in shard_slices(vocab, num_ranks):          # also validates num_ranks
        table_r = table[rows]                            # (V_r, h): this rank's rows
        owned = (token_ids >= rows.start) & (token_ids < rows.stop)
        lookup = np.zeros(token_ids.shape + (table.shape[1],), dtype=table.dtype)
        lookup[owned] = table_r[token_ids[owned] - rows.start]   # shifted into the shard
        lookups.append(lookup)                           # zeros where another rank owns it
    return all_reduce(lookups)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_embedding_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# 2 ranks, table (6, 3) split [3, 3], token_ids [5, 0, 3, 2]: equals table[token_ids]
from assignments.tp_sequence.checks import vocab as check
check.embedding_small(vocab_parallel_embedding)

# %% nbgrader={"grade": true, "grade_id": "test_embedding_matches_dense", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: equals table[token_ids] for 1, 2, 3, 4, 8 ranks, ids of any shape
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.embedding_matches_dense(vocab_parallel_embedding)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_embedding_uneven_vocab", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: V not divisible by the ranks, and ranks with no rows
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.embedding_uneven_vocab(vocab_parallel_embedding)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_embedding_one_all_reduce", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: exactly one all_reduce, nothing else
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.embedding_one_all_reduce(vocab_parallel_embedding)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_embedding_masked_inputs", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: rank r passes its own rows' lookups and zeros for the ids it does not own
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.embedding_masked_inputs(vocab_parallel_embedding)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_embedding_inputs_unmodified", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: token_ids and table are not modified
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.embedding_inputs_unmodified(vocab_parallel_embedding)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_embedding_dtype", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: a float32 table gives float32 embeddings
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.embedding_dtype(vocab_parallel_embedding)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_embedding_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError for ids outside [0, V), non-integer ids, a 1-D table, a bad num_ranks
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.embedding_bad_args(vocab_parallel_embedding)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_vocab_parallel_embedding")


# %% [markdown]
# ## Exercise 3: the cross-entropy on vocabulary-parallel logits, `vocab_parallel_cross_entropy`
#
# The output layer is column-parallel over the vocabulary (in GPT models it often shares its
# weight with the embedding table), so rank `r` ends up with the logits of its own vocabulary slice,
# `z_r = z[..., start_r:stop_r]`. Gathering them would move `V` numbers per token, the biggest
# activation of the model. The loss needs much less. Per token, with target `t`:
#
#     loss = log(sum_v exp(z_v)) - z_t
#          = m + log(sum_v exp(z_v - m)) - z_t,      m = max_v z_v
#
# Subtracting `m` keeps every `exp` in `(0, 1]`: `exp(1e4)` is `inf` even in float64, and logits
# of that size do occur (a diverging run, an unscaled head). Each piece is a sum or a max over
# the vocabulary, so each rank reduces its own slice to **one number per token** first:
#
# ```
#  z (tokens, V=7): rank 0 z[:, 0:3], rank 1 z[:, 3:5], rank 2 z[:, 5:7]
#
#  rank r, per token                  collective             on every rank
#  m_r = max of its own z_r           all_reduce, op="max" ─► m   (tokens,)
#  e_r = sum of exp(z_r - m)          all_reduce (sum)     ─► e   (tokens,)
#  t_r = z_r[t - start_r] if it       all_reduce (sum)     ─► z_t (tokens,)
#        owns t, else 0
#  loss = m + log(e) - z_t   (tokens,): nothing vocabulary-sized travels
# ```
#
# **How the max is done.** `tpsim.all_reduce(per_rank, op="max")`, recorded with
# `reduce_op="max"`: Megatron's `torch.distributed.all_reduce(logits_max,
# op=ReduceOp.MAX)`. Every rank must subtract the **same** `m`: with each rank's own max the
# sums of different ranks are scaled differently and do not add up. A rank with an empty
# vocabulary slice (`V < p`) contributes `-inf` to the max (`np.max(z_r, axis=-1,
# initial=-np.inf)`), `0` to the sum and to the target logit.
#
# **Pitfalls**
#
# * *Gathering the logits* (`all_gather` along the vocabulary, then a dense loss): right numbers,
#   `V / p` numbers per token per rank on the wire. The tests fail any collective that carries
#   more than one number per token.
# * *No max, or each rank's own max*: overflow on large logits, or wrong sums.
# * *The offset.* Rank `r`'s column `j` is vocabulary id `start_r + j`; `start_r` is the sum of
#   the widths before it (with uneven slices it is not `r * V_r`).
# * *In place.* Megatron subtracts the max in place (`vocab_parallel_logits -= logits_max`);
#   here the shards are the caller's arrays: do not modify them.
#
# **In Megatron-LM**, `vocab_parallel_cross_entropy(vocab_parallel_logits, target)`
# (`cross_entropy.py`, logits `[s, b, V/p]`, target `[s, b]`) does exactly this: an all-reduce
# `MAX` of `logits_max`, then all-reduce `SUM`s of `predicted_logits` (the target's logit after
# the max is subtracted, 0 where masked) and of `sum_exp_logits`; it returns the per-token loss
# (the mean over tokens comes later). vLLM, serving rather than training, gathers the logits
# instead (`LogitsProcessor._gather_logits`), because sampling needs the whole distribution.
#
# Write `vocab_parallel_cross_entropy`: exactly **three `all_reduce`s** (one `op="max"`, two
# sums), each carrying one number per token from each rank, no other collective. Return the
# per-token loss, shape `target.shape`, in the logits' dtype. Raise `ValueError` for an empty or
# non-list `logit_shards`, shards whose leading dims differ from `target.shape`, and targets
# that are not integers or not in `[0, V)`.

# %% nbgrader={"grade": false, "grade_id": "sol_vocab_parallel_cross_entropy", "locked": false, "schema_version": 3, "solution": true}
def vocab_parallel_cross_entropy(logit_shards, target):
    """Per-token loss log(sum_v exp(z_v)) - z_target, the logits' vocabulary split over
    p = len(logit_shards) ranks.

    logit_shards[r]: rank r's logits (..., V_r) for the vocabulary ids start_r, ...,
    start_r + V_r - 1 (rank order; start_r is the sum of the widths before it); target (...):
    integer ids in [0, V), V the sum of the widths. Three all_reduces, each one number per
    token: the max (op="max"), the sum of exp(z - max), the target's logit.
    Returns the loss (...) in the logits' dtype.
    """
    ### BEGIN SOLUTION
    if not isinstance(logit_shards, (list, tuple)) or len(logit_shards) == 0:
        raise ValueError("logit_shards must be a non-empty list with one array per rank")
    logit_shards = [np.asarray(z_r) for z_r in logit_shards]
    target = np.asarray(target)
    if not np.issubdtype(target.dtype, np.integer):
        raise ValueError(f"target must hold integer ids, got dtype {target.dtype}")
    if any(z_r.shape[:-1] != target.shape or z_r.ndim != target.ndim + 1 for z_r in logit_shards):
        raise ValueError(f"every shard must be target.shape + (V_r,) = {target.shape} + (V_r,), "
                         f"got {[z_r.shape for z_r in logit_shards]}")
    widths = [z_r.shape[-1] for z_r in logit_shards]
    starts = np.cumsum([0] + widths[:-1])
    outside = target[(target < 0) | (target >= sum(widths))]
    if outside.size:
        raise ValueError(f"targets must be in [0, {sum(widths)}), got {outside[:5].tolist()}")
    # 1. the largest logit of all ranks, per token: every rank shifts by the same m
    m = all_reduce([z_r.max(axis=-1, initial=-np.inf) for z_r in logit_shards], op="max")
    # 2. the sum of exp(z - m): each rank over its own slice, then over the ranks
    e = all_reduce([np.exp(z_r - m[..., None]).sum(axis=-1) for z_r in logit_shards])
    # 3. the target's logit: only the rank that owns the target id has it, the others give 0
    picked = []
    for z_r, start in zip(logit_shards, starts):
        owned = (target >= start) & (target < start + z_r.shape[-1])
        t_r = np.zeros(target.shape, dtype=z_r.dtype)
        t_r[owned] = z_r[owned, target[owned] - start]   # its column = id - start
        picked.append(t_r)
    z_t = all_reduce(picked)
    return m + np.log(e) - z_t
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_ce_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# 2 ranks, logits (3, 6) split [3, 3]: equals the dense per-token cross-entropy
from assignments.tp_sequence.checks import vocab as check
check.ce_small(vocab_parallel_cross_entropy)

# %% nbgrader={"grade": true, "grade_id": "test_ce_matches_dense", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: equals the dense loss (float64, ~1e-12) for 1, 2, 3, 4, 8 ranks, any leading dims
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.ce_matches_dense(vocab_parallel_cross_entropy)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_ce_uneven_vocab", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: V not divisible by the ranks, and ranks with no vocabulary
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.ce_uneven_vocab(vocab_parallel_cross_entropy)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_ce_large_logits", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: logits around 1e4 and spread over +-3e4: no overflow, the exact loss
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.ce_large_logits(vocab_parallel_cross_entropy)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_ce_three_all_reduces", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: exactly three all_reduces (one op="max", two sums), nothing else
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.ce_three_all_reduces(vocab_parallel_cross_entropy)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_ce_token_sized_collectives", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: every collective carries one number per token per rank
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.ce_token_sized_collectives(vocab_parallel_cross_entropy)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_ce_reduce_inputs", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: rank r passes its max, its sum of exp(z_r - m), its target logit (or 0)
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.ce_reduce_inputs(vocab_parallel_cross_entropy)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_ce_inputs_unmodified", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: logit_shards and target are not modified
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.ce_inputs_unmodified(vocab_parallel_cross_entropy)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_ce_dtype", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: float32 in, float32 out
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.ce_dtype(vocab_parallel_cross_entropy)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_ce_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError for targets outside [0, V) or not integers, shapes that do not fit
### BEGIN HIDDEN TESTS
from assignments.tp_sequence.checks import vocab as check
check.ce_bad_args(vocab_parallel_cross_entropy)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_vocab_parallel_cross_entropy")

# %% [markdown]
# ## What you built
#
# | this notebook | Megatron-LM (`megatron/core/tensor_parallel/`) | vLLM |
# |---|---|---|
# | `all_gather(u_shards, axis=0)` in `layer_sp` | `gather_from_sequence_parallel_region` (all-gather first dim; backward reduce-scatter) | (training only) |
# | `reduce_scatter(partials, axis=0)` | `reduce_scatter_to_sequence_parallel_region` in `RowParallelLinear` (backward all-gather) | (training only) |
# | `layer_norm` on `x_r`, residual on `x_r` | LayerNorm weights marked `sequence_parallel`, grads all-reduced | |
# | `vocab_parallel_embedding` | `VocabParallelEmbedding` (+ `reduce_from_tensor_model_parallel_region`, or `reduce_scatter_embeddings=True`) | `VocabParallelEmbedding` |
# | `vocab_parallel_cross_entropy` | `vocab_parallel_cross_entropy` (all-reduce MAX, two SUMs) | `LogitsProcessor` gathers the logits |
# | `all_reduce(..., op="max")` | `torch.distributed.all_reduce(t, op=ReduceOp.MAX)` | |
#
# The same functions, names and layouts (sequence-first activations split along axis 0, the
# vocabulary split by rows) carry over to `torch.distributed`, where each rank holds only its
# own item of these lists and the collectives become autograd functions whose backward is the
# other collective of the pair.
