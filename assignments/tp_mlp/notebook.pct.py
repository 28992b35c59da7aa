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
# # Tensor parallelism 2: the Megatron MLP block, and what TP costs
#
# In `tp_linear` you built a column-parallel and a row-parallel linear layer. Each needed one
# collective. A transformer MLP is two linear layers with an elementwise activation between:
#
#     y = activation(x @ W1.T + b1) @ W2.T + b2
#     W1: (hidden, d)   W2: (d_out, hidden)
#
# Megatron-LM's trick (Shoeybi et al., 2019) is to make **W1 column-parallel and W2
# row-parallel**. The column layer leaves each rank with a *slice of the hidden units*, which is
# exactly the input the row layer wants. The activation is elementwise, so each rank applies it
# to its own slice. The whole block then needs **one all-reduce**:
#
# ```
#  rank r holds W1[s_r] (rows), b1[s_r], W2[:, s_r] (columns)
#
#  x (..., d)   h_r = x @ W1[s_r].T + b1[s_r]    (..., hidden_r)  column-parallel,
#  on every                                                       no communication
#  rank ──────► a_r = activation(h_r)            (..., hidden_r)  elementwise,
#                                                                 per shard
#               p_r = a_r @ W2[:, s_r].T         (..., d_out)     row-parallel
#                             │                                   partial sum
#                             ▼
#               y = all_reduce([p_0, p_1, ...]) + b2   (..., d_out)
#                                                      the one collective
# ```
#
# **Pitfalls**
#
# * *Gathering the hidden layer.* `all_gather` of `h` before the activation, then splitting it
#   again for W2, gives the right numbers with two collectives and `hidden`-sized traffic.
# * *Reducing after the column layer.* The column layer's outputs are disjoint slices, not
#   partial sums; there is nothing to add up until after W2.
# * *Activation after the reduce.* `activation(p_0 + p_1) != activation(p_0) + activation(p_1)`:
#   the activation must run on `h_r`, before W2, never on the reduced output.
# * *The N-fold bias.* `b1` is sliced like W1's rows; `b2` is added once, after the reduce.
#
# **In the real engines.** Megatron-LM's `ParallelMLP` is `dense_h_to_4h =
# ColumnParallelLinear(gather_output=False)` followed by `dense_4h_to_h =
# RowParallelLinear(input_is_parallel=True)`. In `mappings.py`, the column layer starts with
# **f** = `copy_to_tensor_model_parallel_region` (identity forward, all-reduce backward) and the
# row layer ends with **g** = `reduce_from_tensor_model_parallel_region` (all-reduce forward,
# identity backward). vLLM's `LlamaMLP` is `gate_up_proj = MergedColumnParallelLinear` (gate and
# up projections, column-parallel, one GEMM), `SiluAndMul` on each shard, and `down_proj =
# RowParallelLinear`, whose forward calls `tensor_model_parallel_all_reduce` once. Attention is
# split the same way: heads are column-parallel (`QKVParallelLinear`), the output projection is
# row-parallel: one more all-reduce.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
# Run this cell first. It is read-only: the grader restores it before grading.
import numpy as np

import tpsim                              # the simulated collectives (and their call log)
import tpgrade                            # the self-checks (tpgrade.selfcheck.run)
import assignments.tp_mlp.checks          # the checks used by the test cells below
from tpsim import all_gather, all_reduce


# %% nbgrader={"grade": false, "grade_id": "helpers", "locked": true, "schema_version": 3, "solution": false}
# Given (read-only): the default activation, and tp_linear's balanced split as slices.
def relu(h):
    """max(h, 0), elementwise; keeps h's dtype."""
    return np.maximum(h, 0)


def shard_slices(n, num_ranks):
    """Rank r's features, slice(start_r, stop_r), for n features over num_ranks ranks
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


print(shard_slices(10, 4))


# %% [markdown]
# ## Exercise 1: `mlp_tp`
#
# Write `mlp_tp(x, W1, W2, num_ranks, b1=None, b2=None, activation=relu)`, equal to
# `activation(x @ W1.T + b1) @ W2.T + b2`, with rank `r` holding hidden units `shard_slices(hidden,
# num_ranks)[r]` (uneven splits and empty shards included), the activation applied per shard,
# **exactly one `all_reduce` and no `all_gather`**. `x` may have any leading dims. Raise
# `ValueError` for a bad `num_ranks` or shapes that do not fit; do not modify the inputs; keep
# the dtype (float32 in, float32 out). The tests compare with the dense block for 1, 2, 3, 4
# and 8 ranks, with other activations (`np.tanh`, ...), and check each rank's partial sum.

# %% nbgrader={"grade": false, "grade_id": "sol_mlp_tp", "locked": false, "schema_version": 3, "solution": true}
def mlp_tp(x, W1, W2, num_ranks, b1=None, b2=None, activation=relu):
    """activation(x @ W1.T + b1) @ W2.T + b2, tensor-parallel over num_ranks ranks.

    x: (..., d), W1: (hidden, d), b1: (hidden,), W2: (d_out, hidden), b2: (d_out,).
    W1 is column-parallel (its output stays sharded), the activation runs on each rank's
    shard, W2 is row-parallel: exactly one all_reduce, no all_gather; b2 once, at the end.
    """
    ### BEGIN SOLUTION
    x, W1, W2 = np.asarray(x), np.asarray(W1), np.asarray(W2)
    if W1.ndim != 2 or W2.ndim != 2 or x.ndim < 1:
        raise ValueError(f"need x (..., d), W1 (hidden, d), W2 (d_out, hidden); got x {x.shape}, "
                         f"W1 {W1.shape}, W2 {W2.shape}")
    if x.shape[-1] != W1.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but W1 {W1.shape} expects {W1.shape[1]}")
    if W2.shape[1] != W1.shape[0]:
        raise ValueError(f"W1 {W1.shape} makes {W1.shape[0]} hidden units but W2 {W2.shape} "
                         f"expects {W2.shape[1]}")
    if b1 is not None and np.shape(b1) != (W1.shape[0],):
        raise ValueError(f"b1 must have shape ({W1.shape[0]},), got {np.shape(b1)}")
    if b2 is not None and np.shape(b2) != (W2.shape[0],):
        raise ValueError(f"b2 must have shape ({W2.shape[0]},), got {np.shape(b2)}")
    partials = []
    for s in shard_slices(W1.shape[0], num_ranks):       # rank r's hidden units
        h_r = x @ W1[s].T                                # column-parallel: (..., hidden_r)
        if b1 is not None:
            h_r = h_r + b1[s]
        partials.append(activation(h_r) @ W2[:, s].T)    # row-parallel partial: (..., d_out)
    y = all_reduce(partials)                             # the one collective
    if b2 is not None:
        y = y + b2
    return y
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_mlp_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# 2 ranks, x (2, 4), W1 (8, 4), W2 (4, 8), relu: equals the dense MLP, shape (2, 4)
from assignments.tp_mlp.checks import mlp as check
check.mlp_small(mlp_tp)

# %% nbgrader={"grade": true, "grade_id": "test_mlp_matches_dense", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: equals the dense MLP (float64, ~1e-12) for num_ranks 1, 2, 3, 4, 8
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_matches_dense(mlp_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_mlp_uneven_shards", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: hidden size not divisible by num_ranks, and empty shards
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_uneven_shards(mlp_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_mlp_input_dims", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: 1-D, 3-D and 4-D inputs
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_input_dims(mlp_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_mlp_biases", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: b1 sliced per rank, b2 added once after the all-reduce
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_biases(mlp_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_mlp_activation", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: the activation passed in runs on each rank's hidden shard
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_activation(mlp_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_mlp_one_all_reduce", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: exactly one all_reduce, no all_gather
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_one_all_reduce(mlp_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_mlp_reduce_inputs", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: rank r passes its own partial activation(h_r) @ W2_r.T to the all_reduce
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_reduce_inputs(mlp_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_mlp_inputs_unmodified", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: x, W1, W2, b1, b2 are not modified
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_inputs_unmodified(mlp_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_mlp_dtype", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: float32 in, float32 out
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_dtype(mlp_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_mlp_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import mlp as check
check.mlp_bad_args(mlp_tp)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_mlp_tp")


# %% [markdown]
# ## Exercise 2: counting the communication
#
# TP's price is communication *inside every layer*. Count it.
#
# **All-reduces per transformer layer.** A Megatron transformer layer is an attention block
# (QKV column-parallel, output projection row-parallel) and an MLP block (W1 column, W2 row).
#
# * Forward: each block ends with **g** (all-reduce forward), so **2** per layer.
# * Backward: g is the identity, but each block *starts* with **f**, whose backward all-reduces
#   the gradient of the block's input (every rank computed only its shard's contribution), so
#   forward + backward is **4** per layer.
# * With `tp == 1` there is nothing to combine: **0** (f and g are the identity).
# * The number of heads or the hidden size changes the *size* of the messages, not their number:
#   12 heads on TP = 4 (3 heads per rank) still make 2 all-reduces in the forward pass. (The
#   seed chapter's "hidden 4096 with 12 heads" cannot exist: hidden = heads x head_dim, and
#   4096 is not a multiple of 12; real engines reject such a configuration.)
#
# **Bytes of a ring all-reduce.** Ring all-reduce of `N` elements over `p` ranks is a
# reduce-scatter (`p - 1` steps, each rank sends a chunk of `N / p` elements per step) followed
# by an all-gather (again `p - 1` steps of `N / p`). So each rank **sends**
#
#     2 * (p - 1) / p * N * bytes_per_elem   bytes      (0 when p == 1)
#
# and the same amount is received. In this exercise "bytes" always means *bytes sent per rank*
# (a float is fine: `N` need not divide by `p`).
#
# **Per layer.** Every all-reduce in a layer is on an activation of shape `(batch, seq,
# hidden)`, so a layer costs `allreduces_per_layer(tp, backward)` such all-reduces. For
# `batch=8, seq=2048, hidden=4096, tp=8`, bf16 (2 bytes), forward: 2 * 2 * 7/8 * 2^26 * 2 bytes
# = 470 MB per rank per layer: about 1 ms at NVLink's ~450 GB/s per direction, and about 18x
# longer over a 25 GB/s (200 Gb/s) network link. That is why TP stays inside a node.
#
# Write the three functions (one cell). Raise `ValueError` for a `tp` / `num_ranks` that is not
# an int `>= 1`, a negative size, or `bytes_per_elem < 1`.

# %% nbgrader={"grade": false, "grade_id": "sol_comm_counts", "locked": false, "schema_version": 3, "solution": true}
def allreduces_per_layer(tp, backward=False):
    """All-reduces in one Megatron transformer layer (attention + MLP) with TP degree tp:
    forward only, or forward + backward when backward=True. ValueError for a bad tp."""
    ### BEGIN SOLUTION
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be an int >= 1, got {tp!r}")
    if tp == 1:
        return 0                      # one rank: nothing to combine
    forward = 2                       # g after attention's out-projection, g after the MLP's W2
    return forward + 2 if backward else forward   # backward: f before QKV and before W1
    ### END SOLUTION


def ring_allreduce_bytes(num_elements, num_ranks, bytes_per_elem=2):
    """Bytes each rank sends in a ring all-reduce of num_elements elements of bytes_per_elem
    bytes each (default 2: bf16/fp16): 2 * (num_ranks - 1) / num_ranks * num_elements *
    bytes_per_elem. ValueError when num_ranks is not an int >= 1, num_elements not an int >= 0,
    or bytes_per_elem not an int >= 1."""
    ### BEGIN SOLUTION
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks must be an int >= 1, got {num_ranks!r}")
    if isinstance(num_elements, bool) or not isinstance(num_elements, int) or num_elements < 0:
        raise ValueError(f"num_elements must be an int >= 0, got {num_elements!r}")
    if isinstance(bytes_per_elem, bool) or not isinstance(bytes_per_elem, int) or bytes_per_elem < 1:
        raise ValueError(f"bytes_per_elem must be an int >= 1, got {bytes_per_elem!r}")
    return 2 * (num_ranks - 1) / num_ranks * num_elements * bytes_per_elem
    ### END SOLUTION


def layer_allreduce_bytes(batch, seq, hidden, tp, bytes_per_elem=2, backward=False):
    """Bytes each rank sends for one transformer layer's all-reduces (forward only, or forward
    + backward): allreduces_per_layer(tp, backward) all-reduces, each of a (batch, seq, hidden)
    activation, each costing ring_allreduce_bytes. ValueError when batch, seq or hidden is not
    an int >= 0, or tp is bad."""
    ### BEGIN SOLUTION
    for name, value in (("batch", batch), ("seq", seq), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    count = allreduces_per_layer(tp, backward)
    return count * ring_allreduce_bytes(batch * seq * hidden, tp, bytes_per_elem)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_comm_allreduces_forward", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# forward all-reduces per layer with tp = 2, 4, 8
from assignments.tp_mlp.checks import comm as check
check.allreduces_forward(allreduces_per_layer)

# %% nbgrader={"grade": true, "grade_id": "test_comm_allreduces_backward_tp1", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: forward + backward, and tp == 1
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import comm as check
check.allreduces_backward_and_tp1(allreduces_per_layer)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_comm_ring_bytes", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# ring_allreduce_bytes(1000, 4, 2) == 3000, and two more
from assignments.tp_mlp.checks import comm as check
check.ring_bytes(ring_allreduce_bytes)

# %% nbgrader={"grade": true, "grade_id": "test_comm_ring_bytes_edges", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: one rank, no elements, N not divisible by p, the default bytes_per_elem
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import comm as check
check.ring_bytes_edges(ring_allreduce_bytes)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_comm_layer_bytes", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: bytes per rank for one layer, forward and forward + backward
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import comm as check
check.layer_bytes(layer_allreduce_bytes)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_comm_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_mlp.checks import comm as check
check.comm_bad_args(allreduces_per_layer, ring_allreduce_bytes, layer_allreduce_bytes)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_comm_counts")

# %% [markdown]
# ## What you built
#
# | this notebook | Megatron-LM | vLLM |
# |---|---|---|
# | `mlp_tp` | `ParallelMLP`: `ColumnParallelLinear` -> activation -> `RowParallelLinear` | `LlamaMLP`: `MergedColumnParallelLinear` -> `SiluAndMul` -> `RowParallelLinear` |
# | the one `all_reduce` | g = `reduce_from_tensor_model_parallel_region` | `tensor_model_parallel_all_reduce` |
# | backward all-reduce | f = `copy_to_tensor_model_parallel_region` | (inference only: no backward) |
# | `allreduces_per_layer` | 2 forward + 2 backward per layer | 2 per decoder layer |
#
# Next (`tp_torch`): the same layers with `torch.distributed` and real processes.
