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
# # Tensor parallelism 1: column- and row-parallel linear layers
#
# When one layer is too big (or too slow) for one GPU, **tensor parallelism (TP)** splits the
# layer itself: every rank (GPU) holds a slice of the weight matrix, computes with it, and the
# ranks combine their results with a *collective* (all-gather or all-reduce).
#
# **TP is not DDP.** Data parallelism (DDP) gives every rank a full copy of the model and a
# different slice of the *batch*, and all-reduces *gradients* once per step. Tensor parallelism
# gives every rank the *same* batch and a slice of each *layer*, and communicates *activations*
# inside every layer's forward (and backward) pass. That is why TP lives inside one node, on the
# fastest links (NVLink), while DP can span nodes.
#
# In this notebook you build the two basic pieces, exactly as Megatron-LM and vLLM do, but with
# numpy arrays and *simulated* ranks, so that you can check the result against the dense layer
# to machine precision.
#
# **Conventions (used everywhere in this course)**
#
# * `W` has shape `(out_features, in_features)` and the layer is `y = x @ W.T + b`
#   (the PyTorch `nn.Linear` convention).
# * `x` has any number of leading dims: shape `(..., in_features)`; `y` is `(..., out_features)`.
# * Shards follow the **balanced split** (numpy's `array_split`): `n` features over `p` ranks,
#   the first `n % p` ranks get one more. If `n < p`, some ranks hold *empty* shards and
#   everything must still work.
# * Bad arguments (`num_ranks < 1` or not an int, shapes that do not fit) raise `ValueError`
#   with a message saying what is wrong; inputs are never modified in place; the output dtype
#   follows the inputs (float32 in, float32 out).

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
# Run this cell first. It is read-only: the grader restores it before grading.
import numpy as np

import tpsim                              # the simulated collectives (and their call log)
import tpgrade                            # the self-checks (tpgrade.selfcheck.run)
import assignments.tp_linear.checks       # the checks used by the test cells below
from tpsim import all_gather, all_reduce

# %% [markdown]
# ## The simulated collectives: `tpsim`
#
# A rank is a position in a Python list. A collective takes *what every rank contributes* and
# returns *what every rank holds afterwards* (the same array on each rank):
#
# | collective | per-rank inputs | result (on every rank) | used by |
# |---|---|---|---|
# | `all_gather(per_rank, axis=-1)` | disjoint slices `y_0, y_1, ...` | `np.concatenate(per_rank, axis)` | column-parallel |
# | `all_reduce(per_rank)` | partial sums `p_0, p_1, ...` (same shape) | `p_0 + p_1 + ...` | row-parallel |
#
# `tpsim` records every call with a copy of each rank's input, and the tests use that record:
# they count your collectives and check that rank `r` really contributed what rank `r` can
# compute from its own shard. Computing the dense answer and passing it through a collective
# is not tensor parallelism, and the tests notice. **Every rank takes part in a collective**,
# also a rank with an empty shard: pass one array per rank.

# %%
# Try it (not graded): two ranks, each with a piece.
with tpsim.recording() as calls:
    print(all_gather([np.ones((2, 1)), np.zeros((2, 2))]))   # (2, 3): pieces side by side
    print(all_reduce([np.ones(3), 2 * np.ones(3)]))          # [3. 3. 3.]
print([c.op for c in calls], [c.inputs[0].shape for c in calls])


# %% [markdown]
# ## Exercise 1: the balanced split
#
# Which features does each rank own? With `n` features over `p` ranks every rank gets
# `n // p`, and the first `n % p` ranks get one more (numpy's `np.array_split` order):
#
# | n | p | sizes |
# |---|---|---|
# | 8 | 4 | `[2, 2, 2, 2]` |
# | 10 | 4 | `[3, 3, 2, 2]` |
# | 3 | 8 | `[1, 1, 1, 0, 0, 0, 0, 0]` (five empty shards) |
#
# Rank `r`'s features are then `start_r : start_r + size_r`, where `start_r` is the sum of the
# sizes before it. Write `shard_sizes(n, num_ranks)`; raise `ValueError` for `n` that is not an
# int `>= 0` or `num_ranks` that is not an int `>= 1` (a `float` such as 2.5 or a `str`
# such as `"2"` is not an int). `np.split` is *not* the balanced split: it refuses sizes that
# do not divide.

# %% nbgrader={"grade": false, "grade_id": "sol_shard_sizes", "locked": false, "schema_version": 3, "solution": true}
def shard_sizes(n, num_ranks):
    """How many of n features each of num_ranks ranks holds (numpy's array_split split).

    The first n % num_ranks ranks get one extra feature; when n < num_ranks the last ranks
    get 0. Raises ValueError if n is not an int >= 0 or num_ranks not an int >= 1.
    """
    ### BEGIN SOLUTION
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, (int, np.integer)) or num_ranks < 1:
        raise ValueError(f"num_ranks must be an int >= 1, got {num_ranks!r}")
    base, extra = divmod(n, num_ranks)
    return [base + 1 if rank < extra else base for rank in range(num_ranks)]
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_shard_sizes_divisible", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# divisible splits: 8 over 4 -> [2, 2, 2, 2], 6 over 3, 5 over 1, 12 over 2
from assignments.tp_linear import checks as check
check.shard_sizes_divisible(shard_sizes)

# %% nbgrader={"grade": true, "grade_id": "test_shard_sizes_balanced", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: uneven splits and empty shards
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.shard_sizes_balanced(shard_sizes)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_shard_sizes_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.shard_sizes_bad_args(shard_sizes)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_shard_sizes")


# %% [markdown]
# ## Exercise 2: column-parallel linear (split the output features)
#
# Split `W` by **rows** (each row of `W` produces one output feature). Rank `r` holds `W_r`,
# rows `start_r : stop_r` of `W`, and the *full* input `x`:
#
# ```
#  x (3, 4) on every rank   W (6, 4)        rank r computes
#                       ┌──────────────┐
#  rank 0:  x ───────── │ W_0 = W[0:3] │ ─► y_0 = x @ W_0.T (3, 3) ─┐
#                       ├──────────────┤                            │
#  rank 1:  x ───────── │ W_1 = W[3:6] │ ─► y_1 = x @ W_1.T (3, 3) ─┤
#                       └──────────────┘                            ▼
#                                              all_gather   ┌─────┬─────┐
#                                                           │ y_0 │ y_1 │ = y
#                                                           └─────┴─────┘ (3, 6)
#                                          concatenated on the last axis
# ```
#
# Shapes: `x (..., in)`, `W_r (out_r, in)`, `y_r = x @ W_r.T (..., out_r)`, and the bias slice
# `b[start_r:stop_r]` is added by rank `r` to its own `y_r`. The slices are *disjoint*, so they
# are combined by **concatenation** (`all_gather` along the last axis), never by a sum.
#
# **Pitfall: returning the local shard.** After `x @ W_r.T` a rank holds only `out_r` of the
# `out` features. Forgetting the gather gives a `(3, 3)` output where `(3, 6)` was expected.
#
# **In the real engines.** This is Megatron-LM's `ColumnParallelLinear` (its forward is
# `copy_to_tensor_model_parallel_region` (f), the local GEMM with the bias shard, then
# `gather_from_tensor_model_parallel_region` when `gather_output=True`) and vLLM's
# `ColumnParallelLinear` (`gather_output=False` by default, because the next layer is usually
# row-parallel and wants the output sharded). vLLM's `MergedColumnParallelLinear` stacks
# several column-parallel weights (e.g. an MLP's gate and up projections) into one GEMM, each
# split the same way.
#
# Write `column_parallel`: one `all_gather`, no `all_reduce`. The tests compare with the dense
# `x @ W.T + b` for 1, 2, 3, 4 and 8 ranks, uneven and empty shards, 1-D to 4-D inputs, float32,
# and they check what each rank passed to the gather.

# %% nbgrader={"grade": false, "grade_id": "sol_column_parallel", "locked": false, "schema_version": 3, "solution": true}
def column_parallel(x, W, num_ranks, b=None):
    """y = x @ W.T + b with W's rows (output features) split over num_ranks ranks.

    x: (..., in_features), W: (out_features, in_features), b: (out_features,) or None.
    Rank r holds rows r of W (and the matching slice of b) and the full x; it computes its
    slice of y. One all_gather (and no all_reduce) assembles the full y (..., out_features).
    """
    ### BEGIN SOLUTION
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.ndim < 1 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"need x (..., in_features) and W (out_features, in_features) with "
                         f"the same in_features, got x {x.shape} and W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"b must have shape ({W.shape[0]},), got {np.shape(b)}")
    sizes = shard_sizes(W.shape[0], num_ranks)      # also validates num_ranks
    pieces, start = [], 0
    for size in sizes:                               # what rank r computes, for r = 0, 1, ...
        stop = start + size
        y_r = x @ W[start:stop].T                    # (..., size): rank r's output features
        if b is not None:
            y_r = y_r + b[start:stop]                # each rank adds its own bias slice
        pieces.append(y_r)
        start = stop
    return all_gather(pieces, axis=-1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_column_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# 2 ranks, x (3, 4), W (6, 4): the output must equal the dense x @ W.T, shape (3, 6)
from assignments.tp_linear import checks as check
check.column_small(column_parallel)

# %% nbgrader={"grade": true, "grade_id": "test_column_matches_dense", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: equals the dense layer (float64, ~1e-12) for num_ranks 1, 2, 3, 4, 8
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.column_matches_dense(column_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_column_uneven_shards", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: out_features not divisible by num_ranks, and empty shards
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.column_uneven_shards(column_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_column_input_dims", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: 1-D, 3-D and 4-D inputs x (..., in_features)
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.column_input_dims(column_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_column_bias", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: bias: each rank adds its own slice
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.column_bias(column_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_column_one_all_gather", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: exactly one all_gather, no all_reduce
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.column_one_all_gather(column_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_column_gather_inputs", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: rank r passes its own slice x @ W_r.T to the all_gather
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.column_gather_inputs(column_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_column_inputs_unmodified", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: x, W and b are not modified
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.column_inputs_unmodified(column_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_column_dtype", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: float32 in, float32 out
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.column_dtype(column_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_column_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.column_bad_args(column_parallel)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_column_parallel")


# %% [markdown]
# ## Exercise 3: row-parallel linear (split the input features)
#
# Split `W` by **columns** (input features). Rank `r` holds `W_r = W[:, start_r:stop_r]` and
# the matching columns of the input, `x_r = x[..., start_r:stop_r]`. Because
# `x @ W.T = sum_r x_r @ W_r.T`, every rank computes a **partial sum over all outputs**, and an
# **all-reduce** (sum) gives every rank the full `y`:
#
# ```
#  x (3, 4)         W (6, 4)         rank r computes
#  ┌─────┬─────┐    ┌─────┬─────┐
#  │ x_0 │ x_1 │    │ W_0 │ W_1 │    rank 0:  p_0 = x_0 @ W_0.T  (3, 6) ─┐
#  └─────┴─────┘    │     │     │                                        │
#   cols 0-1, 2-3   └─────┴─────┘    rank 1:  p_1 = x_1 @ W_1.T  (3, 6) ─┤
#                                                                        ▼
#                                        all_reduce:  y = p_0 + p_1  (3, 6),
#                                                     then + b, once
# ```
#
# Shapes: `x_r (..., in_r)`, `W_r (out, in_r)`, `p_r = x_r @ W_r.T (..., out)`: every partial
# has the full output shape, so they are combined by a **sum**, not a concatenation.
#
# **Pitfall: the N-fold bias.** The bias is not split. If every rank adds `b` to its partial,
# the all-reduce adds it `num_ranks` times. Add `b` **once, after** the all-reduce, never inside
# a partial sum.
#
# **In the real engines.** Megatron-LM's `RowParallelLinear` (with `input_is_parallel=True` the
# input is already split; its forward is the local GEMM, then
# `reduce_from_tensor_model_parallel_region` (g), then `output + bias`). vLLM's
# `RowParallelLinear` calls `tensor_model_parallel_all_reduce` when `reduce_results=True`. (vLLM
# fuses the bias into rank 0's GEMM only, which gives the same sum; in this course the bias goes
# after the reduce, as in Megatron, and the tests check that the partials are bias-free.)
#
# Write `row_parallel`: one `all_reduce`, no `all_gather`, bias once after the reduce.

# %% nbgrader={"grade": false, "grade_id": "sol_row_parallel", "locked": false, "schema_version": 3, "solution": true}
def row_parallel(x, W, num_ranks, b=None):
    """y = x @ W.T + b with W's columns (input features) split over num_ranks ranks.

    Rank r holds columns r of W and the matching columns of x; it computes a partial sum
    over all outputs. One all_reduce (and no all_gather) adds the partials; the bias is added
    once, after the reduce.
    """
    ### BEGIN SOLUTION
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.ndim < 1 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"need x (..., in_features) and W (out_features, in_features) with "
                         f"the same in_features, got x {x.shape} and W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"b must have shape ({W.shape[0]},), got {np.shape(b)}")
    sizes = shard_sizes(W.shape[1], num_ranks)
    partials, start = [], 0
    for size in sizes:
        stop = start + size
        partials.append(x[..., start:stop] @ W[:, start:stop].T)   # (..., out_features)
        start = stop
    y = all_reduce(partials)
    if b is not None:
        y = y + b                                    # once, after the reduce
    return y
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_row_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# 2 ranks, x (3, 4), W (6, 4): the output must equal the dense x @ W.T, shape (3, 6)
from assignments.tp_linear import checks as check
check.row_small(row_parallel)

# %% nbgrader={"grade": true, "grade_id": "test_row_matches_dense", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: equals the dense layer (float64, ~1e-12) for num_ranks 1, 2, 3, 4, 8
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_matches_dense(row_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_row_uneven_shards", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: in_features not divisible by num_ranks, and empty shards
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_uneven_shards(row_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_row_input_dims", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: 1-D, 3-D and 4-D inputs x (..., in_features)
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_input_dims(row_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_row_bias_once", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: the bias is counted exactly once
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_bias_once(row_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_row_bias_after_reduce", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: the partial sums passed to all_reduce do not contain the bias
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_bias_after_reduce(row_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_row_one_all_reduce", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: exactly one all_reduce, no all_gather
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_one_all_reduce(row_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_row_reduce_inputs", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: rank r passes its own partial x_r @ W_r.T to the all_reduce
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_reduce_inputs(row_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_row_inputs_unmodified", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: x, W and b are not modified
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_inputs_unmodified(row_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_row_dtype", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: float32 in, float32 out
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_dtype(row_parallel)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_row_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_linear import checks as check
check.row_bad_args(row_parallel)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_row_parallel")

# %% [markdown]
# ## What you built
#
# | this notebook | Megatron-LM | vLLM |
# |---|---|---|
# | `shard_sizes` | `divide` / partition sizes (Megatron requires divisibility) | weight loaders' `narrow(shard_offset, shard_size)` |
# | `column_parallel` | `ColumnParallelLinear` (+ `gather_from_tensor_model_parallel_region`) | `ColumnParallelLinear`, `MergedColumnParallelLinear`, `QKVParallelLinear` |
# | `row_parallel` | `RowParallelLinear` (+ `reduce_from_tensor_model_parallel_region`) | `RowParallelLinear` + `tensor_model_parallel_all_reduce` |
# | list index `r` | `get_tensor_model_parallel_rank()` | `get_tensor_model_parallel_rank()` |
#
# Next (`tp_mlp`): put a column layer and a row layer back to back, and get a whole MLP block
# with a single all-reduce.
