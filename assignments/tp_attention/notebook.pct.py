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
# # Tensor parallelism 3: attention heads across ranks, and a whole layer
#
# In `tp_mlp` the MLP block became *column-parallel, then row-parallel*, with one all-reduce.
# Self-attention follows the same recipe, and the unit that is split is the **head**: heads
# are independent of each other until the output projection adds them up, so each rank
# computes a few whole heads (Q, K and V projections column-parallel, no communication), and
# the output projection is row-parallel (one all-reduce). A transformer layer is attention
# plus MLP: **two all-reduces** in the forward pass, whatever the number of heads.
#
# You will build, with numpy and the simulated ranks of `tpsim`:
#
# | exercise | you write | what it teaches |
# |---|---|---|
# | 1 | `attention_heads` | scaled dot-product attention on a stack of heads (dense, no TP) |
# | 2 | `kv_head_ranges` | which query and key/value heads each rank holds (grouped-query attention) |
# | 3 | `qkv_shard` | a rank's rows of the fused QKV weight, laid out as vLLM lays it out |
# | 4 | `attention_tp` | multi-head attention with heads split across ranks, one all-reduce |
# | 5 | `transformer_layer_tp` | attention + MLP with LayerNorm and residuals, two all-reduces |
# | 6 | `tp_cost` | all-reduces, bytes, FLOPs and the communication / compute ratio of a model |
#
# **Conventions (the tests rely on every one of them)**
#
# * Weights are `(out_features, in_features)` and a projection is `y = x @ W.T` (PyTorch's
#   `nn.Linear`, as in the earlier notebooks).
# * `x` has shape `(..., seq, hidden)`: the last axis holds the features, the one before it
#   the positions in the sequence, and any leading axes are batch axes (`(seq, hidden)` and
#   `(batch, seq, hidden)` are the common cases). Every batch element attends only within
#   its own sequence.
# * `H = num_heads` query heads, `G = num_kv_heads` key/value heads (`G` divides `H`;
#   `G == H` is ordinary multi-head attention), head size `d = Wq.shape[0] / H`, which must
#   be an integer. Usually `H * d == hidden`, but nothing here needs it.
# * `Wq` is `(H*d, hidden)`: rows `h*d : (h+1)*d` produce query head `h`. `Wk` and `Wv` are
#   `(G*d, hidden)`: rows `g*d : (g+1)*d` produce key / value head `g`. `Wo` is `(out, H*d)`:
#   columns `h*d : (h+1)*d` read head `h`'s output. `bo` is `(out,)`.
# * Query head `j` reads key/value head `j // (H // G)` (neighbouring query heads share one).
# * Rank `r` holds the query heads `shard_slices(H, num_ranks)[r]` (the balanced split of
#   `tp_linear`, in whole heads: **a head is never split**); ranks may hold no head at all.
# * Bad arguments raise `ValueError`; inputs are never modified; float32 in, float32 out.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
# Run this cell first. It is read-only: the grader restores it before grading.
import numpy as np

import tpsim                              # the simulated collectives (and their call log)
import tpgrade                            # the self-checks (tpgrade.selfcheck.run)
import assignments.tp_attention.checks    # the checks used by the test cells below
from tpsim import all_gather, all_reduce


# %% nbgrader={"grade": false, "grade_id": "helpers", "locked": true, "schema_version": 3, "solution": false}
# Given (read-only): helpers from the earlier notebooks, reshaping between features and heads,
# and LayerNorm.
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


def split_heads(t, head_dim):
    """(..., seq, n * head_dim) -> (..., n, seq, head_dim): head i is features
    i*head_dim : (i+1)*head_dim. Works for n == 0 too."""
    n = t.shape[-1] // head_dim
    return t.reshape(t.shape[:-1] + (n, head_dim)).swapaxes(-2, -3)


def merge_heads(o):
    """(..., n, seq, head_dim) -> (..., seq, n * head_dim), the inverse of split_heads."""
    o = o.swapaxes(-2, -3)
    return o.reshape(o.shape[:-2] + (o.shape[-2] * o.shape[-1],))


def layer_norm(x, weight, bias, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance, as
    torch.nn.LayerNorm); weight and bias have shape (hidden,)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


t = np.arange(2 * 3 * 4).reshape(3, 8)          # seq 3, two heads of size 4
print(split_heads(t, 4).shape, (merge_heads(split_heads(t, 4)) == t).all())


# %% [markdown]
# ## Exercise 1: attention on a stack of heads (dense)
#
# One head of self-attention, for a sequence of `seq` positions with queries `q`, keys `k` and
# values `v` of size `d`:
#
# ```
#  scores  = q @ k.T / sqrt(d)        (seq, seq)  [i, j]: query i against key j
#  scores += mask                     causal: -inf where j > i (not the future)
#  weights = softmax(scores, axis=-1) (seq, seq)  each row sums to 1 over keys
#  out     = weights @ v              (seq, d)    weighted average of the values
# ```
#
# `attention_heads(q, k, v, causal=False)` does this for a whole stack of heads at once:
# `q`, `k` and `v` all have shape `(..., n, seq, d)` (`n` heads, any leading batch axes), and
# the result has that shape too. numpy's `@` works on the last two axes and broadcasts the
# rest, so `q @ k.swapaxes(-1, -2)` is `(..., n, seq, seq)`: every head's scores in one go.
#
# **Pitfalls** (each one has a test):
#
# * *Scaling.* Divide by `sqrt(d)` (the head size), not by `d`, not by `sqrt(hidden)`.
# * *The softmax axis.* Normalize over the **keys**, the last axis. Not over the queries, and
#   never over the heads: heads are independent (and the heads axis is exactly what tensor
#   parallelism will split across ranks).
# * *The mask goes before the softmax.* Set the masked scores to `-inf` so that they get
#   weight `exp(-inf) = 0` and the remaining weights still sum to 1. Zeroing weights after
#   the softmax leaves rows that no longer sum to 1; setting scores to `0` still gives them
#   weight `exp(0) = 1`. Query `i` may see keys `j <= i` (itself included).
# * *Overflow.* Scores can be large (the tests use scores in the thousands); `np.exp(1000)`
#   is `inf`. Subtract each row's maximum before `exp`: softmax does not change, and every
#   exponent is `<= 0`.
# * *float32.* `np.sqrt(d)` is a float64 numpy scalar, and numpy 2 promotes float32 arrays
#   divided by it to float64. Use `d ** -0.5` (a Python float) or `math.sqrt(d)`.
#
# Raise `ValueError` unless `q`, `k` and `v` have the same shape with at least 3 dims.

# %% nbgrader={"grade": false, "grade_id": "sol_attention_heads", "locked": false, "schema_version": 3, "solution": true}
def attention_heads(q, k, v, causal=False):
    """softmax(q @ k.T / sqrt(d) (+ causal mask)) @ v for every head.

    q, k, v: (..., n, seq, d), the same shape (n heads, any leading batch axes).
    causal: query i attends only to keys j <= i. Returns (..., n, seq, d), q's dtype.
    """
    ### BEGIN SOLUTION
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if q.ndim < 3 or q.shape != k.shape or q.shape != v.shape or q.shape[-1] == 0:
        raise ValueError(f"q, k, v must share one shape (..., n, seq, d) with d >= 1; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    d = q.shape[-1]
    scores = q @ k.swapaxes(-1, -2) * d ** -0.5        # (..., n, seq, seq); keeps float32
    if causal:
        seq = q.shape[-2]
        future = np.arange(seq)[None, :] > np.arange(seq)[:, None]   # key j after query i
        scores = np.where(future, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)   # exp(<= 0) cannot overflow
    weights = np.exp(scores)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights @ v                                  # (..., n, seq, d)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_heads_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# 2 heads, seq 3, head_dim 4: q, k, v (2, 3, 4), no mask
from assignments.tp_attention.checks import attention as check
check.heads_small(attention_heads)

# %% nbgrader={"grade": true, "grade_id": "test_heads_matches_dense", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: equals dense attention (float64, ~1e-12), 3-D to 5-D, seq 1, head_dim 1
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.heads_matches_dense(attention_heads)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_heads_scaling", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: scores scaled by 1 / sqrt(head_dim)
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.heads_scaling(attention_heads)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_heads_causal", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: causal mask: -inf above the diagonal, before the softmax
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.heads_causal(attention_heads)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_heads_stable", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: scores in the thousands: no inf or NaN
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.heads_stable(attention_heads)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_heads_inputs_unmodified", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: q, k and v are not modified
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.heads_inputs_unmodified(attention_heads)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_heads_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.heads_bad_args(attention_heads)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_attention_heads")


# %% [markdown]
# ## Splitting attention across ranks
#
# Multi-head attention projects `x` to queries, keys and values, runs `attention_heads` on
# every head, puts the heads' outputs side by side and projects them back:
#
# ```
#  q = split_heads(x @ Wq.T, d)     (..., H, seq, d)    Wq (H*d, hidden)
#  k = split_heads(x @ Wk.T, d)     (..., G, seq, d)    Wk (G*d, hidden)
#  v = split_heads(x @ Wv.T, d)     (..., G, seq, d)    Wv (G*d, hidden)
#  o = attention_heads(q, k and v repeated to H heads, causal)    (..., H, seq, d)
#  y = merge_heads(o) @ Wo.T + bo   (..., seq, out)     Wo (out, H*d)
# ```
#
# Head `h` needs only *its own* rows of `Wq` (and the rows of `Wk`, `Wv` of the KV head it
# reads): that is a **column-parallel** split of the three projections, with no
# communication, because every rank has the full `x`. The heads meet only in the output
# projection, which is a sum over heads:
#
#     merge_heads(o) @ Wo.T  =  sum over heads h of  o_h @ Wo[:, h*d:(h+1)*d].T
#
# so a rank that holds some heads computes a **partial sum** with its columns of `Wo`
# (**row-parallel**), and one `all_reduce` adds the partials. Four heads on two ranks:
#
# ```
#                  x (..., seq, hidden): the same on every rank
#                   │                                     │
#  rank 0: heads 0, 1                       rank 1: heads 2, 3
#   q, k, v = x @ W[rows of heads 0-1].T     q, k, v = x @ W[rows of heads 2-3].T
#           (..., 2, seq, d) each                    (..., 2, seq, d) each
#   o_0 = attention_heads(q, k, v)           o_1 = attention_heads(q, k, v)
#   p_0 = merge_heads(o_0)                   p_1 = merge_heads(o_1)
#         @ Wo[:, cols of heads 0-1].T             @ Wo[:, cols of heads 2-3].T
#           (..., seq, out): a partial               (..., seq, out): a partial
#                   └──────────────── all_reduce ─────────┘
#                        y = p_0 + p_1 + bo    (..., seq, out), bo once
# ```
#
# **Why a head is never split.** Each score `q_h[i] . k[j]` is a sum over all `d` features of
# the head. A rank holding some of a head's features would hold only a partial sum `s_r` of
# every score, and `softmax(s_0 + s_1)` cannot be assembled from `softmax(s_0)` and
# `softmax(s_1)`: it would need another collective (an all-reduce of the `seq x seq` scores)
# before the softmax. So the head is the unit of tensor parallelism in
# attention. Megatron-LM and vLLM require `num_heads % tp == 0` so that every rank does the
# same work; here the balanced split also accepts uneven counts (and ranks with no head) to
# show that the mathematics does not care.
#
# **In the real engines.** Megatron-LM's `SelfAttention` has `linear_qkv`, a
# `ColumnParallelLinear` with `gather_output=False` (one GEMM for Q, K and V), a
# `core_attention` (`DotProductAttention`, or Transformer Engine's `TEDotProductAttention`)
# run on `num_attention_heads_per_partition` heads, and `linear_proj`, a `RowParallelLinear`
# with `input_is_parallel=True`, whose forward ends with the all-reduce
# (`reduce_from_tensor_model_parallel_region`). vLLM's `LlamaAttention` is `qkv_proj =
# QKVParallelLinear`, `attn = Attention(self.num_heads, self.head_dim, self.scaling,
# num_kv_heads=self.num_kv_heads)` on the rank's local heads, and `o_proj =
# RowParallelLinear`, which calls `tensor_model_parallel_all_reduce`.

# %% [markdown]
# ## Exercise 2: grouped-query attention, which KV heads each rank holds
#
# With grouped-query attention (GQA) there are fewer key/value heads than query heads:
# `G = num_kv_heads` divides `H = num_heads`, and query head `j` reads KV head `j // g` with
# `g = H // G` (multi-query attention is `G = 1`; `G = H` is plain multi-head attention). KV
# heads are cheap to hold and are what a KV cache stores, so models use few of them (a
# Llama-2-70B layer: 64 query heads, 8 KV heads).
#
# A rank must hold **exactly the KV heads its query heads read**. If rank `r` holds query
# heads `[a, z)`, it holds KV heads
#
#     [a // g, ceil(z / g))          and none at all (an empty range) if a == z.
#
# When there are fewer KV heads than ranks, several ranks hold the **same** KV head: it is
# *replicated*. Examples (`[a, z)` ranges, one per rank):
#
# | H | G | ranks | query heads per rank | KV heads per rank |
# |---|---|---|---|---|
# | 8 | 8 | 4 | `[0,2) [2,4) [4,6) [6,8)` | `[0,2) [2,4) [4,6) [6,8)` |
# | 8 | 4 | 2 | `[0,4) [4,8)` | `[0,2) [2,4)` |
# | 8 | 2 | 4 | `[0,2) [2,4) [4,6) [6,8)` | `[0,1) [0,1) [1,2) [1,2)` (each KV head on 2 ranks) |
# | 6 | 2 | 4 | `[0,2) [2,4) [4,5) [5,6)` | `[0,1) [0,2) [1,2) [1,2)` (rank 1 needs both) |
# | 3 | 1 | 4 | `[0,1) [1,2) [2,3) [3,3)` | `[0,1) [0,1) [0,1)` and, for rank 3, empty |
#
# **In the real engines.** vLLM's `QKVParallelLinear` gives each rank `num_heads / tp` query
# heads and, when `tp >= num_kv_heads`, **one** KV head replicated on `num_kv_head_replicas =
# tp / num_kv_heads` ranks: rank `r` loads KV head `r // num_kv_head_replicas`; otherwise
# `num_kv_heads / tp` KV heads per rank. Both cases are the rule above. vLLM rejects the
# other combinations (its `divide` asserts divisibility), and Megatron-LM requires
# `num_query_groups % tp == 0` (no replication). The rule above covers every case, uneven
# ones included.
#
# Write `kv_head_ranges(num_heads, num_kv_heads, num_ranks)`: a list with one `(start,
# stop)` pair of ints per rank (for a rank without query heads any empty pair `(k, k)` is
# accepted; the formula gives `(a // g, a // g)`). Raise `ValueError` unless `num_heads` and
# `num_kv_heads` are ints `>= 1` with `num_kv_heads` dividing `num_heads`, and `num_ranks`
# is an int `>= 1` (`shard_slices` checks that one).

# %% nbgrader={"grade": false, "grade_id": "sol_kv_head_ranges", "locked": false, "schema_version": 3, "solution": true}
def kv_head_ranges(num_heads, num_kv_heads, num_ranks):
    """[(start, stop), ...]: the KV heads rank r holds, those its query heads
    shard_slices(num_heads, num_ranks)[r] read (query head j reads KV head
    j // (num_heads // num_kv_heads)). A rank without query heads holds none."""
    ### BEGIN SOLUTION
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    group = num_heads // num_kv_heads              # query heads per KV head
    ranges = []
    for heads in shard_slices(num_heads, num_ranks):
        if heads.stop == heads.start:              # no query heads: no KV heads either
            ranges.append((heads.start // group, heads.start // group))
        else:                                      # first and last KV head read
            ranges.append((heads.start // group, (heads.stop - 1) // group + 1))
    return ranges
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_kv_ranges_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# (4, 4, 2) -> [(0, 2), (2, 4)]; (8, 2, 4) -> [(0, 1), (0, 1), (1, 2), (1, 2)]
from assignments.tp_attention.checks import attention as check
check.kv_ranges_small(kv_head_ranges)

# %% nbgrader={"grade": true, "grade_id": "test_kv_ranges_divisible", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: multi-head and grouped-query, KV heads divisible by the ranks
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.kv_ranges_divisible(kv_head_ranges)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_kv_ranges_replicated", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: fewer KV heads than ranks (replicated), KV heads not dividing the ranks, uneven and empty query splits
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.kv_ranges_replicated(kv_head_ranges)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_kv_ranges_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.kv_ranges_bad_args(kv_head_ranges)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_kv_head_ranges")


# %% [markdown]
# ## Exercise 3: the fused QKV weight, and each rank's shard of it
#
# Engines compute Q, K and V with **one** GEMM: the three weights are stacked into one fused
# weight. How they are stacked decides which rows a rank takes.
#
# **vLLM's layout (used here).** `QKVParallelLinear`'s full weight is the three matrices one
# after the other, `W_qkv = [Wq; Wk; Wv]`, of shape `((H + 2G) * d, hidden)`: its weight
# loader puts the checkpoint's `q_proj`, `k_proj` and `v_proj` at row offsets `0`, `H*d` and
# `(H + G)*d` (`_get_shard_offset_mapping`). A rank holds, **from each block, the rows of its
# own heads**, stacked in the same order, `[q rows; k rows; v rows]`: shape
# `((H_r + 2 G_r) * d, hidden)` with `H_r` query heads and `G_r` KV heads (Exercise 2). After
# the local GEMM, vLLM cuts the output with `qkv.split([q_size, kv_size, kv_size], dim=-1)`.
#
# ```
#  W_qkv, H = 4, G = 2, head_dim d, 2 ranks     rank 0's shard    rank 1's shard
#  rows 0d-1d    q head 0  ──────────────────►  q head 0
#  rows 1d-2d    q head 1  ──────────────────►  q head 1
#  rows 2d-3d    q head 2  ────────────────────────────────────►  q head 2
#  rows 3d-4d    q head 3  ────────────────────────────────────►  q head 3
#  rows 4d-5d    k head 0  ──────────────────►  k head 0
#  rows 5d-6d    k head 1  ────────────────────────────────────►  k head 1
#  rows 6d-7d    v head 0  ──────────────────►  v head 0
#  rows 7d-8d    v head 1  ────────────────────────────────────►  v head 1
#                                               (4d, hidden)      (4d, hidden)
# ```
#
# **Megatron-LM's layout.** `linear_qkv` interleaves per query group: `[q heads of group 0;
# k_0; v_0; q heads of group 1; k_1; v_1; ...]`, and `SelfAttention` views the local output
# as `(..., num_query_groups_per_partition, (heads per group + 2) * d)` before splitting it
# into q, k and v. In *that* layout a plain contiguous row split (what `ColumnParallelLinear`
# does) hands every rank whole groups, which is why Megatron can use an ordinary
# `ColumnParallelLinear` for `linear_qkv` (and why its checkpoint converters reorder the
# Hugging Face `[q; k; v]` weights).
#
# **Pitfall: contiguous thirds.** Splitting vLLM's `[q; k; v]` into `num_ranks` contiguous
# row blocks is the classic mistake: with 3 ranks and `G == H`, rank 0 gets all of `Wq`,
# rank 1 all of `Wk`, rank 2 all of `Wv`, and no rank can compute a single head.
#
# Write `qkv_shard(W_qkv, num_heads, num_kv_heads, num_ranks, rank)`: rank `rank`'s rows, in
# the order above (its query heads' rows of the q block, then its KV heads' rows of the k
# block, then the same KV heads' rows of the v block). A rank without heads gets a
# `(0, hidden)` array. Raise `ValueError` for a `W_qkv` that is not 2-D or whose row count is
# not a multiple of `num_heads + 2 * num_kv_heads` (the head size would not be an integer),
# for bad head counts (as in Exercise 2), and unless `0 <= rank < num_ranks`.

# %% nbgrader={"grade": false, "grade_id": "sol_qkv_shard", "locked": false, "schema_version": 3, "solution": true}
def qkv_shard(W_qkv, num_heads, num_kv_heads, num_ranks, rank):
    """Rank `rank`'s shard of the fused weight W_qkv = [Wq; Wk; Wv] ((H + 2G) * d, hidden):
    [its query heads' rows of Wq; its KV heads' rows of Wk; the same rows of Wv]."""
    ### BEGIN SOLUTION
    W_qkv = np.asarray(W_qkv)
    kv = kv_head_ranges(num_heads, num_kv_heads, num_ranks)     # validates the counts
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_ranks:
        raise ValueError(f"rank must be an int in [0, {num_ranks}), got {rank!r}")
    if W_qkv.ndim != 2 or W_qkv.shape[0] % (num_heads + 2 * num_kv_heads):
        raise ValueError(f"W_qkv {W_qkv.shape} is not ((num_heads + 2 * num_kv_heads) * d, "
                         f"hidden) for num_heads={num_heads}, num_kv_heads={num_kv_heads}")
    d = W_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    heads, (kv_start, kv_stop) = shard_slices(num_heads, num_ranks)[rank], kv[rank]
    k0, v0 = num_heads * d, (num_heads + num_kv_heads) * d    # where the k and v blocks start
    return np.concatenate([W_qkv[heads.start * d:heads.stop * d],
                           W_qkv[k0 + kv_start * d:k0 + kv_stop * d],
                           W_qkv[v0 + kv_start * d:v0 + kv_stop * d]])
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_qkv_shard_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# 2 heads, head_dim 2, 2 ranks: rank 0 takes rows 0-1, 4-5 and 8-9 of W_qkv (12, 3)
from assignments.tp_attention.checks import attention as check
check.qkv_shard_small(qkv_shard)

# %% nbgrader={"grade": true, "grade_id": "test_qkv_shard_blocks", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: multi-head attention: each rank takes its heads' rows from each of the q, k and v blocks
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.qkv_shard_blocks(qkv_shard)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_qkv_shard_uneven_heads", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: heads not divisible by the ranks, and a rank without heads
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.qkv_shard_uneven_heads(qkv_shard)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_qkv_shard_gqa", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: grouped-query attention, at least as many KV heads as ranks
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.qkv_shard_gqa(qkv_shard)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_qkv_shard_kv_replicated", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: fewer KV heads than ranks: KV rows replicated
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.qkv_shard_kv_replicated(qkv_shard)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_qkv_shard_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.qkv_shard_bad_args(qkv_shard)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_qkv_shard")


# %% [markdown]
# ## Exercise 4: `attention_tp`
#
# `attention_tp(x, Wq, Wk, Wv, Wo, num_heads, num_ranks, num_kv_heads=None, bo=None,
# causal=False)` equals dense (grouped-query) attention, `num_kv_heads=None` meaning
# `num_heads`. For each rank `r` (a loop over ranks, as before), with query heads
# `[a, z) = shard_slices(H, num_ranks)[r]` and KV heads `[ka, kz)` from `kv_head_ranges`:
#
# ```
#  q_r = split_heads(x @ Wq[a*d:z*d].T, d)     (..., H_r, seq, d)  column-parallel
#  k_r = split_heads(x @ Wk[ka*d:kz*d].T, d)   (..., G_r, seq, d)  column-parallel
#  v_r = split_heads(x @ Wv[ka*d:kz*d].T, d)   (..., G_r, seq, d)  column-parallel
#  local query head i (global a + i) reads local KV head (a + i) // g - ka
#  o_r = attention_heads(q_r, k_r and v_r picked per query head, causal)
#                                              (..., H_r, seq, d)
#  p_r = merge_heads(o_r) @ Wo[:, a*d:z*d].T   (..., seq, out)     row-parallel
#  y   = all_reduce([p_0, p_1, ...]) + bo      (..., seq, out)     one collective
# ```
#
# (`k_r[..., idx, :, :]` with a list `idx` of local KV heads, one per local query head, picks
# them; that is `np.repeat` on the heads axis when `g` divides evenly.) A rank without heads
# still takes part in the all-reduce: its partial is zeros of shape `(..., seq, out)` (what
# the formulas above give with empty slices).
#
# **Pitfalls:** an all-reduce after the Q/K/V projections (they are column-parallel: every
# rank computes its own heads from the full `x`, there is nothing to add up); `bo` added on
# every rank (the all-reduce then adds it `num_ranks` times: add it once, after); a head
# split between ranks; a rank whose query heads have no KV head (Exercise 2); the KV head of
# query head `j` taken as `j % G` (`np.tile`) instead of `j // g` (`np.repeat`). Exactly
# **one `all_reduce` and no `all_gather`**.
#
# Raise `ValueError` for a bad `num_ranks`, `num_heads` or `num_kv_heads` (as in Exercise 2),
# an `x` with fewer than 2 dims, `Wq` not `(H*d, hidden)` for an integer `d >= 1` (for
# instance `num_heads=12` with `Wq` of 4096 rows: `d` would be 341.33...), `Wk` or `Wv` not
# `(G*d, hidden)`, `Wo` not `(out, H*d)`, or `bo` not `(out,)`.

# %% nbgrader={"grade": false, "grade_id": "sol_attention_tp", "locked": false, "schema_version": 3, "solution": true}
def attention_tp(x, Wq, Wk, Wv, Wo, num_heads, num_ranks, num_kv_heads=None, bo=None,
                 causal=False):
    """Multi-head (grouped-query) self-attention with whole heads split over num_ranks ranks.

    x: (..., seq, hidden); Wq: (H*d, hidden); Wk, Wv: (G*d, hidden); Wo: (out, H*d);
    bo: (out,) or None; H = num_heads, G = num_kv_heads (None: G = H).
    Q/K/V column-parallel (a rank's heads), Wo row-parallel: exactly one all_reduce, no
    all_gather; bo added once, after it. Returns (..., seq, out).
    """
    ### BEGIN SOLUTION
    x, Wq, Wk, Wv, Wo = (np.asarray(a) for a in (x, Wq, Wk, Wv, Wo))
    H = num_heads
    G = H if num_kv_heads is None else num_kv_heads
    kv = kv_head_ranges(H, G, num_ranks)                # validates H, G and num_ranks
    if x.ndim < 2 or Wq.ndim != 2 or Wq.shape[1] != x.shape[-1] or Wq.shape[0] % H or not len(Wq):
        raise ValueError(f"need x (..., seq, hidden) and Wq (num_heads * d, hidden); got "
                         f"x {x.shape}, Wq {Wq.shape}, num_heads={H}")
    d = Wq.shape[0] // H
    if Wk.shape != (G * d, x.shape[-1]) or Wv.shape != Wk.shape:
        raise ValueError(f"Wk and Wv must be ({G * d}, {x.shape[-1]}), got {Wk.shape}, {Wv.shape}")
    if Wo.ndim != 2 or Wo.shape[1] != H * d:
        raise ValueError(f"Wo must be (out, {H * d}), got {Wo.shape}")
    if bo is not None and np.shape(bo) != (Wo.shape[0],):
        raise ValueError(f"bo must have shape ({Wo.shape[0]},), got {np.shape(bo)}")
    group = H // G
    partials = []
    for heads, (kv_start, kv_stop) in zip(shard_slices(H, num_ranks), kv):   # rank r
        rows = slice(heads.start * d, heads.stop * d)              # its query heads' rows
        kv_rows = slice(kv_start * d, kv_stop * d)                 # its KV heads' rows
        q = split_heads(x @ Wq[rows].T, d)                         # (..., H_r, seq, d)
        k = split_heads(x @ Wk[kv_rows].T, d)                      # (..., G_r, seq, d)
        v = split_heads(x @ Wv[kv_rows].T, d)
        reads = [j // group - kv_start for j in range(heads.start, heads.stop)]
        o = attention_heads(q, k[..., reads, :, :], v[..., reads, :, :], causal)
        partials.append(merge_heads(o) @ Wo[:, rows].T)            # (..., seq, out) partial
    y = all_reduce(partials)                                       # the one collective
    return y if bo is None else y + bo
    ### END SOLUTION


# %%
# Try it (not graded): the result must not depend on the number of ranks.
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 5, 8))
Wq, Wk, Wv, Wo = (rng.standard_normal(s) / 8 ** 0.5 for s in [(8, 8), (4, 8), (4, 8), (8, 8)])
one = attention_tp(x, Wq, Wk, Wv, Wo, 4, 1, num_kv_heads=2, causal=True)
for p in (2, 3, 4, 8):
    with tpsim.recording() as calls:
        y = attention_tp(x, Wq, Wk, Wv, Wo, 4, p, num_kv_heads=2, causal=True)
    print(p, "ranks:", np.abs(y - one).max(), [c.op for c in calls])

# %% nbgrader={"grade": true, "grade_id": "test_attention_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# x (3, 8), 4 heads of dim 2, 2 ranks: equals dense attention
from assignments.tp_attention.checks import attention as check
check.attention_small(attention_tp)

# %% nbgrader={"grade": true, "grade_id": "test_attention_matches_dense", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: equals dense attention (float64, ~1e-12) for 1, 2, 3, 4 and 6 ranks
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_matches_dense(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_uneven_heads", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: heads not divisible by the ranks, ranks without heads
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_uneven_heads(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_shapes", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: x (seq, hidden) to (..., seq, hidden), seq 1, H * d != hidden, out != hidden
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_shapes(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_causal", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: causal=True
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_causal(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_gqa", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: grouped-query attention, at least as many KV heads as ranks
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_gqa(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_kv_replicated", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: fewer KV heads than ranks (replicated), KV heads not dividing the ranks
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_kv_replicated(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_bias_once", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: bo counted exactly once
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_bias_once(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_bias_after_reduce", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: the partials passed to all_reduce do not contain bo
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_bias_after_reduce(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_one_all_reduce", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: exactly one all_reduce, no all_gather
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_one_all_reduce(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_reduce_inputs", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: rank r passes its own heads' partial output (zeros without heads)
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_reduce_inputs(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_inputs_unmodified", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: x and the weights are not modified
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_inputs_unmodified(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_dtype", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: float32 in, float32 out
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_dtype(attention_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_attention_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.attention_bad_args(attention_tp)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_attention_tp")

# %% [markdown]
# ## Exercise 5: a whole transformer layer, two all-reduces
#
# A pre-LN transformer layer (GPT-2, Megatron-LM's default; Llama uses RMSNorm in the same
# places):
#
# ```
#  h = x + attention(LN1(x))     attention as in Exercise 4, bo included
#  y = h + MLP(LN2(h))           MLP(a) = activation(a @ W1.T + b1) @ W2.T + b2
# ```
#
# with `LNi(t) = layer_norm(t, params["lni_w"], params["lni_b"], eps)` (the helper above).
# Under tensor parallelism:
#
# ```
#  x (..., seq, hidden), on every rank
#    ├─► LN1(x)        every rank, on the full x (replicated weights, no comm.)
#    ├─► attention:    heads column-parallel, Wo row-parallel
#    │                 ─► all_reduce #1, then + bo
#  h = x + attention   every rank holds the full h (residual added once, after)
#    ├─► LN2(h)        every rank, on the full, reduced h
#    ├─► MLP:          W1 column-parallel, activation, W2 row-parallel
#    │                 ─► all_reduce #2, then + b2
#  y = h + MLP         (..., seq, hidden), on every rank
# ```
#
# Exactly **two `all_reduce`s and no `all_gather`**. The LayerNorms, the residual additions
# and the biases `bo`, `b2` are done by every rank on full activations, each counted once.
#
# **Pitfalls:** adding the residual inside the partial sums (the all-reduce then counts `x`
# `num_ranks` times, like the N-fold bias); normalizing partial sums to save the first
# all-reduce (LayerNorm is not linear: `LN(p_0 + p_1) != LN(p_0) + LN(p_1)`, so the reduce
# must come before `LN2`); extra collectives (an all-reduce after `LN1` or after the column
# layers).
#
# `params` is a dict of arrays with the keys `ln1_w`, `ln1_b` (hidden,), `Wq`, `Wk`, `Wv`,
# `Wo`, `bo` (as in Exercise 4, with `Wo` of shape `(hidden, H*d)`), `ln2_w`, `ln2_b`
# (hidden,), `W1` (ffn, hidden), `b1` (ffn,), `W2` (hidden, ffn), `b2` (hidden,). Rank `r`
# holds MLP units `shard_slices(ffn, num_ranks)[r]`. Raise `ValueError` for a bad
# `num_ranks`, a missing key, or shapes that do not fit (`Wo` whose output is not `hidden`
# cannot be added to the residual); do not modify `x` or the arrays in `params`.
#
# **In the real engines.** Megatron-LM's `TransformerLayer` is `input_layernorm`,
# `self_attention`, `self_attn_bda` (bias-dropout-add: the residual and `linear_proj`'s bias,
# once, after the all-reduce), `pre_mlp_layernorm`, `mlp`, `mlp_bda`. vLLM's
# `LlamaDecoderLayer` is `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`,
# with the residual add fused into the next RMSNorm. With Megatron's sequence parallelism
# each all-reduce becomes a reduce-scatter and an all-gather (the same bytes) and the
# LayerNorms work on a slice of the sequence instead of redundantly.

# %% nbgrader={"grade": false, "grade_id": "sol_transformer_layer_tp", "locked": false, "schema_version": 3, "solution": true}
LAYER_KEYS = ("ln1_w", "ln1_b", "Wq", "Wk", "Wv", "Wo", "bo", "ln2_w", "ln2_b", "W1", "b1",
              "W2", "b2")


def transformer_layer_tp(x, params, num_heads, num_ranks, num_kv_heads=None, causal=False,
                         eps=1e-5, activation=relu):
    """Pre-LN layer h = x + attention(LN1(x)); y = h + MLP(LN2(h)), tensor-parallel.

    x: (..., seq, hidden); params: dict with LAYER_KEYS (shapes in the text). Attention and
    MLP each column -> row parallel: exactly two all_reduces, no all_gather; LayerNorms,
    residuals and the biases bo, b2 on full activations, once. Returns (..., seq, hidden).
    """
    ### BEGIN SOLUTION
    missing = [key for key in LAYER_KEYS if key not in params]
    if missing:
        raise ValueError(f"params is missing {missing}")
    P = {key: np.asarray(params[key]) for key in LAYER_KEYS}
    x = np.asarray(x)
    hidden = x.shape[-1] if x.ndim else 0
    for key in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "bo", "b2"):
        if P[key].shape != (hidden,):
            raise ValueError(f"params[{key!r}] must have shape ({hidden},), got {P[key].shape}")
    if P["Wo"].ndim != 2 or P["Wo"].shape[0] != hidden:
        raise ValueError(f"Wo {P['Wo'].shape} must produce hidden = {hidden} features")
    W1, b1, W2 = P["W1"], P["b1"], P["W2"]
    if W1.ndim != 2 or W1.shape[1] != hidden or b1.shape != W1.shape[:1] \
            or W2.shape != (hidden, W1.shape[0]):
        raise ValueError(f"MLP shapes do not fit: W1 {W1.shape}, b1 {b1.shape}, W2 {W2.shape}")
    a = layer_norm(x, P["ln1_w"], P["ln1_b"], eps)                 # every rank, full x
    h = x + attention_tp(a, P["Wq"], P["Wk"], P["Wv"], P["Wo"], num_heads, num_ranks,
                         num_kv_heads, bo=P["bo"], causal=causal)  # all_reduce #1
    a = layer_norm(h, P["ln2_w"], P["ln2_b"], eps)                 # on the reduced h
    partials = [activation(a @ W1[s].T + b1[s]) @ W2[:, s].T      # rank r's MLP units
                for s in shard_slices(W1.shape[0], num_ranks)]
    return h + all_reduce(partials) + P["b2"]                      # all_reduce #2
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_layer_small", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# x (4, 8), 2 heads, ffn 16, 2 ranks: equals the dense layer
from assignments.tp_attention.checks import attention as check
check.layer_small(transformer_layer_tp)

# %% nbgrader={"grade": true, "grade_id": "test_layer_matches_dense", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: equals the dense pre-LN layer (float64, ~1e-12): 1 to 4 ranks, GQA, tanh
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.layer_matches_dense(transformer_layer_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_layer_causal", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: causal=True, with grouped-query attention
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.layer_causal(transformer_layer_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_layer_uneven", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: heads and MLP units not divisible by the ranks, ranks without any
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.layer_uneven(transformer_layer_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_layer_two_all_reduces", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: exactly two all_reduces, no all_gather
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.layer_two_all_reduces(transformer_layer_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_layer_reduce_inputs", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: rank r passes its attention partial, then its MLP partial (no biases, no residuals)
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.layer_reduce_inputs(transformer_layer_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_layer_inputs_unmodified", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: x and the arrays in params are not modified
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.layer_inputs_unmodified(transformer_layer_tp)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_layer_bad_args", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError on bad arguments
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import attention as check
check.layer_bad_args(transformer_layer_tp)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_transformer_layer_tp")

# %% [markdown]
# ## Exercise 6: what tensor parallelism costs, counted
#
# `tp_cost(config)` takes a model and machine description and returns what one rank pays
# for one forward (or forward + backward) pass over all layers. `config` is a dict:
#
# | key | meaning |
# |---|---|
# | `layers`, `hidden`, `heads`, `kv_heads`, `ffn` | the model: layers, hidden size, query heads, KV heads, MLP units |
# | `seq`, `batch` | tokens per pass: `batch * seq` |
# | `tp` | tensor-parallel degree (ranks) |
# | `dtype_bytes` | bytes per activation element (2 for bf16) |
# | `backward` | `True`: forward + backward; `False`: forward only |
# | `link_bytes_per_s`, `flops_per_s` | one rank's link bandwidth (bytes/s, each direction) and compute rate |
#
# It returns a dict with the keys `allreduces`, `bytes_per_rank`, `flops_per_rank`,
# `comm_seconds`, `compute_seconds`, `comm_to_compute`. **The conventions** (the tests use
# exactly these):
#
# * **Validity.** `layers`, `hidden`, `heads`, `kv_heads`, `ffn`, `seq`, `batch`, `tp`,
#   `dtype_bytes` are ints `>= 1`, the two rates are `> 0`. `hidden % heads == 0` (the head
#   size `d = hidden / heads` is an integer), `heads % kv_heads == 0`, `heads % tp == 0` and
#   `ffn % tp == 0` (equal work per rank, as Megatron-LM and vLLM require), and either
#   `kv_heads % tp == 0` or `tp % kv_heads == 0` (vLLM's rule). Otherwise `ValueError`.
# * **Per rank:** `H_r = heads / tp` query heads, `G_r = kv_heads / tp` KV heads, or **1**
#   when `kv_heads < tp` (replicated: every rank computes its copy), `ffn / tp` MLP units.
# * **All-reduces:** 2 per layer forward, 4 per layer forward + backward, 0 when `tp == 1`
#   (as in `tp_mlp`).
# * **Bytes per rank:** every all-reduce is on a `(batch, seq, hidden)` activation, and a
#   ring all-reduce of `N` elements makes each rank send `2 * (tp - 1) / tp * N *
#   dtype_bytes` bytes. `bytes_per_rank` = all-reduces x that.
# * **FLOPs per rank:** a matmul `(m, k) @ (k, n)` costs `2 * m * k * n`. With `T = batch *
#   seq` tokens, one layer's forward on one rank is
#
#       QKV projection     2 * T * hidden * (H_r + 2 * G_r) * d
#       scores and @ V     4 * batch * H_r * seq^2 * d   (q @ k.T and weights @ v)
#       output projection  2 * T * (H_r * d) * hidden
#       MLP (W1 and W2)    4 * T * hidden * (ffn / tp)
#
#   Scores count every `(query, key)` pair: no saving for the causal mask. LayerNorm,
#   softmax, the activation, biases and residuals are not counted. Backward costs
#   twice the forward (gradients with respect to inputs and to weights), so forward +
#   backward is **3x** the forward. `flops_per_rank` = layers x that.
# * **Times:** `comm_seconds = bytes_per_rank / link_bytes_per_s`, `compute_seconds =
#   flops_per_rank / flops_per_s`, `comm_to_compute = comm_seconds / compute_seconds`
#   (no overlap of communication with compute, no latency term).
#
# **Worked example** (the visible test): `layers=2, hidden=1024, heads=16, kv_heads=4,
# ffn=4096, seq=512, batch=2, tp=4, dtype_bytes=2, backward=False, link_bytes_per_s=100e9,
# flops_per_s=100e12`. Then `d = 64`, `T = 1024`, `H_r = 4`, `G_r = 1`, `ffn / tp = 1024`:
#
# * all-reduces: 2 x 2 layers = **4**;
# * bytes: 4 x 2 x 3/4 x 1024 x 1024 x 2 = **12,582,912**;
# * FLOPs per layer: QKV 2 x 1024 x 1024 x 6 x 64 = 805,306,368; scores and @ V
#   4 x 2 x 4 x 512^2 x 64 = 536,870,912; output 2 x 1024 x 256 x 1024 = 536,870,912; MLP
#   4 x 1024 x 1024 x 1024 = 4,294,967,296; in all 6,174,015,488, so **12,348,030,976** for
#   two layers;
# * times: 1.258e-4 s of communication against 1.235e-4 s of compute: **ratio 1.02**. A
#   small model on a slow link spends as long talking as computing.
#
# A 175B-class model (`layers=96, hidden=12288, heads=96, kv_heads=96, ffn=49152, seq=2048,
# batch=1`, forward + backward) at `tp=8` on H100 NVLink (about 450e9 bytes/s each way, about
# 989e12 dense bf16 FLOP/s per GPU) gives a ratio of about 0.27; over a 50e9 bytes/s network
# link (400 Gb/s) about 2.4: communication would take longer than compute. That is why tensor
# parallelism stays inside a node. (This model assumes peak FLOP/s and no overlap; real
# kernels reach perhaps half the peak, which halves the ratio, and engines overlap some
# communication with compute.)
#
# **The seed exercise "TP = 4, 12 heads, hidden 4096".** The all-reduce count does not depend
# on heads or hidden size (2 per layer forward, 4 with backward). But the configuration
# itself does not exist: `4096 / 12 = 341.33...` is not a head size. Megatron-LM's argument
# checks assert `hidden_size % num_attention_heads == 0` (unless `kv_channels`, the head size,
# is given explicitly); in vLLM the head size comes from the model's config, and 12 heads of
# a whole-number size cannot make 4096 features. (`12 % 4 == 0`, so the split over 4 ranks
# would be fine.) A real 12-head model has, e.g., `hidden=768` (GPT-2 small, `d = 64`).
# `tp_cost` rejects `hidden=4096, heads=12` with `ValueError`.
#
# The seed chapter's "total per layer: 8 x batch x seq x hidden x (T-1)/T bytes" is this count
# for forward + backward in *elements* (4 all-reduces x `2 (T-1)/T x batch x seq x hidden`):
# multiply by `dtype_bytes` for bytes. Its per-block rows, "2 x batch x seq x hidden / T",
# should read `2 (T-1)/T x batch x seq x hidden` (a ring all-reduce sends almost twice the
# tensor, not a `1/T` slice of it).

# %% nbgrader={"grade": false, "grade_id": "sol_tp_cost", "locked": false, "schema_version": 3, "solution": true}
CONFIG_INTS = ("layers", "hidden", "heads", "kv_heads", "ffn", "seq", "batch", "tp",
               "dtype_bytes")


def tp_cost(config):
    """All-reduces, bytes sent per rank, FLOPs per rank, and the communication and compute
    times of one pass (forward, or forward + backward) of a tensor-parallel transformer,
    with the conventions above. Returns a dict with the keys allreduces, bytes_per_rank,
    flops_per_rank, comm_seconds, compute_seconds, comm_to_compute."""
    ### BEGIN SOLUTION
    for key in CONFIG_INTS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    for key in ("link_bytes_per_s", "flops_per_s"):
        if not config[key] > 0:
            raise ValueError(f"{key} must be > 0, got {config[key]!r}")
    L, h, H, G, ffn, s, b, t = (config[k] for k in CONFIG_INTS[:-1])
    if h % H:
        raise ValueError(f"hidden {h} is not divisible by heads {H}: head size {h / H:g}")
    if H % G or H % t or ffn % t:
        raise ValueError(f"need heads % kv_heads == heads % tp == ffn % tp == 0 "
                         f"(heads={H}, kv_heads={G}, ffn={ffn}, tp={t})")
    if G % t and t % G:
        raise ValueError(f"kv_heads {G} and tp {t}: one must divide the other")
    d, tokens = h // H, b * s
    heads_r, ffn_r = H // t, ffn // t
    kv_r = G // t if G >= t else 1                     # replicated when fewer than ranks
    passes = 3 if config["backward"] else 1            # backward = 2x forward
    allreduces = 0 if t == 1 else (4 if config["backward"] else 2) * L
    nbytes = allreduces * 2 * (t - 1) / t * tokens * h * config["dtype_bytes"]
    forward = (2 * tokens * h * (heads_r + 2 * kv_r) * d     # QKV projection
               + 4 * b * heads_r * s * s * d                 # q @ k.T and weights @ v
               + 2 * tokens * heads_r * d * h                # output projection
               + 4 * tokens * h * ffn_r)                     # MLP: W1 and W2
    flops = L * forward * passes
    comm, compute = nbytes / config["link_bytes_per_s"], flops / config["flops_per_s"]
    return {"allreduces": allreduces, "bytes_per_rank": nbytes, "flops_per_rank": flops,
            "comm_seconds": comm, "compute_seconds": compute, "comm_to_compute": comm / compute}
    ### END SOLUTION


# %%
# Try it (not graded): the worked example, and a 175B-class model on NVLink and on a network.
example = dict(layers=2, hidden=1024, heads=16, kv_heads=4, ffn=4096, seq=512, batch=2, tp=4,
               dtype_bytes=2, backward=False, link_bytes_per_s=100e9, flops_per_s=100e12)
print(tp_cost(example))
big = dict(layers=96, hidden=12288, heads=96, kv_heads=96, ffn=49152, seq=2048, batch=1,
           tp=8, dtype_bytes=2, backward=True, link_bytes_per_s=450e9, flops_per_s=989e12)
for link in (450e9, 50e9):
    ratio = tp_cost({**big, "link_bytes_per_s": link})["comm_to_compute"]
    print(f"link {link:.0e} B/s: comm / compute = {ratio:.2f}")

# %% nbgrader={"grade": true, "grade_id": "test_cost_example", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# the worked example: every key
from assignments.tp_attention.checks import cost as check
check.cost_example(tp_cost)

# %% nbgrader={"grade": true, "grade_id": "test_cost_allreduces", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: all-reduces for other configurations, tp == 1, backward
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import cost as check
check.cost_allreduces(tp_cost)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_cost_bytes", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: bytes sent per rank on a ring
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import cost as check
check.cost_bytes(tp_cost)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_cost_flops", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# Hidden test: FLOPs per rank: multi-head, grouped-query, replicated KV heads, backward
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import cost as check
check.cost_flops(tp_cost)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_cost_time_ratio", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: communication and compute seconds and their ratio
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import cost as check
check.cost_time_ratio(tp_cost)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "test_cost_bad_config", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Hidden test: ValueError for configurations no engine accepts (hidden 4096 with 12 heads, ...)
### BEGIN HIDDEN TESTS
from assignments.tp_attention.checks import cost as check
check.cost_bad_config(tp_cost)
### END HIDDEN TESTS

# %%
tpgrade.selfcheck.run("sol_tp_cost")

# %% [markdown]
# ## What you built
#
# | this notebook | Megatron-LM | vLLM |
# |---|---|---|
# | `attention_heads` | `DotProductAttention` / `TEDotProductAttention` (`core_attention`) | `Attention` (FlashAttention and other backends) |
# | `kv_head_ranges` | `num_query_groups_per_partition` (requires `num_query_groups % tp == 0`) | `QKVParallelLinear.num_kv_heads`, `num_kv_head_replicas` |
# | `qkv_shard` | `linear_qkv` (`ColumnParallelLinear`) on the per-group interleaved layout | `QKVParallelLinear.weight_loader` on the `[q; k; v]` layout |
# | `attention_tp` | `SelfAttention`: `linear_qkv` -> `core_attention` -> `linear_proj` (`RowParallelLinear`) | `LlamaAttention`: `qkv_proj` -> `attn` -> `o_proj` (`RowParallelLinear`) |
# | `transformer_layer_tp` | `TransformerLayer` (two all-reduces: `reduce_from_tensor_model_parallel_region`) | `LlamaDecoderLayer` (two `tensor_model_parallel_all_reduce`) |
# | `tp_cost` | communication vs compute per layer | why `tensor_parallel_size` stays within a node |
#
# The torch version of this notebook (`ParallelAttention` on real ranks) uses the same
# names, shapes and layouts.
