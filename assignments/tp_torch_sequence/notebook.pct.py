# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tensor parallelism with `torch.distributed` 2: the sequence and the vocabulary
#
# In `tp_sequence` you removed, in numpy, the two things plain tensor parallelism leaves whole on
# every rank: the **activations around each block** (sequence parallelism) and the **vocabulary**
# (a table split by rows, logits split by columns). In `tp_torch` you built Megatron's
# autograd-aware mappings and the column and row layers on real `torch.distributed` ranks. This
# notebook puts the two together: the same functions, names and layouts as `tp_sequence`, as
# `nn.Module`s and `autograd.Function`s whose **backward pass** is right too.
#
# You will write, in four exercises (after pasting your `tp_torch` layers):
#
# 1. the sequence-parallel mappings of Megatron-LM's `mappings.py`:
#    `gather_from_sequence_parallel_region` (all-gather along the sequence forward,
#    reduce-scatter backward), `reduce_scatter_to_sequence_parallel_region` (the reverse) and
#    `scatter_to_sequence_parallel_region` (keep your tokens forward, all-gather backward), for
#    sequence lengths that do not divide by the number of ranks;
# 2. `LayerSP`: the MLP block of `tp_sequence`'s `layer_sp`, LayerNorm and residual on each rank's
#    own tokens, one all-gather and one reduce-scatter per pass;
# 3. `VocabParallelEmbedding`: the table's rows split by the balanced split of the vocabulary, a
#    masked lookup, one all-reduce;
# 4. `vocab_parallel_cross_entropy`: the loss on logits split by vocabulary, as an
#    `autograd.Function`: three all-reduces of one number per token (a MAX, two sums), the logits
#    never gathered, numerically stable, and a backward with no communication at all.
#
# **No GPU needed.** As in `tp_torch`, `run_on_ranks(fn, world_size, *args)` forks `world_size`
# processes on this machine, joins them in a `gloo` process group and returns what each rank
# returned.
#
# **Grading.** The small test cells (1 point each) run on 2 CPU ranks when the notebook is
# autograded. The larger part of the grade comes from the **gpu_runner** (the cells *Graded on real
# ranks* at the end): it runs your code under `torchrun` on 1 to 4 ranks, with uneven sequence
# lengths and vocabularies, forward and backward, and counts which collectives you call, how many,
# and how much data each one carries.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Read-only set-up (restored when the notebook is graded). Run it first.
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tpsim.ranks import run_on_ranks
import tpgrade                      # the self-checks (tpgrade.selfcheck.run)
import assignments.tp_torch_sequence.checks  # the checks of the graded cells (set up before your code runs)


# %% [markdown]
# ## 0. Bring your `tp_torch` layers (`sol_tp_torch`)
#
# This notebook builds on **your own** `tp_torch` solution: the balanced split, the rank in a
# group, the `g` mapping, `full_weight` and the two linear layers. Paste into the next cell, in
# this order, the whole contents of your `tp_torch` solution cells **`sol_mappings`**,
# **`sol_column_layer`** and **`sol_row_layer`** (not `sol_parallel_mlp`). The names and
# signatures this notebook calls are listed at the top of the cell; they are the ones the
# `tp_torch` notebook gave you, so a complete `tp_torch` solution has all of them.
#
# If your `tp_torch` solution lost points, fix it first (its feedback says what failed): a wrong
# `shard_range` or a `reduce_from_tp_region` with the wrong backward makes the layers below wrong
# too, and their tests will say so.

# %% nbgrader={"grade": false, "grade_id": "sol_tp_torch", "locked": false, "schema_version": 3, "solution": true, "task": false}
# Paste here, in this order, your tp_torch solution cells sol_mappings, sol_column_layer
# and sol_row_layer (the whole cells; sol_parallel_mlp is not needed). This notebook uses:
#   tp_rank_and_size(group=None) -> (rank, world_size) in `group`
#   shard_range(n, rank, world_size) -> (start, stop), the balanced split
#   reduce_from_tp_region(x, group=None)            (g: all-reduce forward, identity backward)
#   full_weight(master_weight, out_features, in_features) -> the full weight
#   ColumnParallelLinear(in_features, out_features, bias=True, master_weight=None, *,
#                        gather_output=True, group=None)     .weight: its rows, .bias: its slice
#   RowParallelLinear(in_features, out_features, bias=True, master_weight=None, *,
#                     input_is_parallel=True, group=None)    .weight: its columns, .bias: full
### BEGIN SOLUTION
def tp_rank_and_size(group=None):
    """(rank, world size) of this process in `group` (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "no torch.distributed process group is initialised: call dist.init_process_group(...) "
            "first (torchrun scripts do), or run your code through run_on_ranks(fn, world_size)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(n, rank, world_size):
    """(start, stop) of `rank`'s share of n items; the first n % world_size ranks get one more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _all_reduce(t, group):
    """The sum of `t` over the ranks of `group`, in a new tensor."""
    out = t.clone()  # all_reduce overwrites its argument; the caller's tensor must survive
    dist.all_reduce(out, group=group)
    return out


def _own_slice(t, group):
    """This rank's balanced share of the last dimension of `t`."""
    rank, p = tp_rank_and_size(group)
    start, stop = shard_range(t.shape[-1], rank, p)
    return t[..., start:stop].contiguous()


def _all_gather_last_dim(t, full_size, group):
    """Every rank's `t` concatenated along the last dim (widths from the balanced split)."""
    rank, p = tp_rank_and_size(group)
    widths = [stop - start for start, stop in (shard_range(full_size, r, p) for r in range(p))]
    if t.shape[-1] != widths[rank]:
        raise ValueError(f"rank {rank} holds {t.shape[-1]} of {full_size} columns, "
                         f"expected {widths[rank]}")
    widest = max(widths)  # all_gather needs the same shape on every rank: pad, then trim
    padded = F.pad(t, (0, widest - t.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(p)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[..., :w] for part, w in zip(parts, widths)], dim=-1)


class _CopyToTPRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return _all_reduce(grad_output, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _GatherFromTPRegion(torch.autograd.Function):
    """All-gather along the last dim forward, keep own slice backward."""

    @staticmethod
    def forward(ctx, x, full_size, group):
        ctx.group = group
        return _all_gather_last_dim(x, full_size, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _own_slice(grad_output, ctx.group), None, None


class _ScatterToTPRegion(torch.autograd.Function):
    """Keep own slice of the last dim forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.full_size = group, x.shape[-1]
        return _own_slice(x, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _all_gather_last_dim(grad_output.contiguous(), ctx.full_size, ctx.group), None


# The public mappings (given): use these in the layers.
def copy_to_tp_region(x, group=None):
    """f: identity forward, all-reduce of the gradient backward."""
    return _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x, group=None):
    """g: all-reduce (sum over ranks) forward, identity backward."""
    return _ReduceFromTPRegion.apply(x, group)


def gather_from_tp_region(x, full_size, group=None):
    """Concatenate every rank's slice along the last dim (to width `full_size`); backward keeps
    this rank's slice of the gradient."""
    return _GatherFromTPRegion.apply(x, full_size, group)


def scatter_to_tp_region(x, group=None):
    """Keep this rank's slice of the last dim; backward all-gathers the gradient."""
    return _ScatterToTPRegion.apply(x, group)


def full_weight(master_weight, out_features, in_features):
    """The full (out_features, in_features) weight every rank starts from."""
    if out_features < 1 or in_features < 1:
        raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
    if master_weight is None:
        # The same seed on every rank gives the same matrix everywhere; each rank keeps its shard.
        gen = torch.Generator().manual_seed(0)
        bound = 1.0 / math.sqrt(in_features)
        return (torch.rand(out_features, in_features, generator=gen) * 2 - 1) * bound
    expected = (out_features, in_features)
    if tuple(master_weight.shape) != expected:
        raise ValueError(f"master_weight must have shape (out_features, in_features) = {expected}, "
                         f"got {tuple(master_weight.shape)}")
    return master_weight.detach()


class ColumnParallelLinear(nn.Module):
    """y = x @ W.T + b with the rows of W (the output features) split over the ranks of `group`."""

    def __init__(self, in_features, out_features, bias=True, master_weight=None, *,
                 gather_output=True, group=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.group = gather_output, group
        rank, world_size = tp_rank_and_size(group)
        weight = full_weight(master_weight, out_features, in_features)
        start, stop = shard_range(out_features, rank, world_size)
        self.weight = nn.Parameter(weight[start:stop].clone())
        if bias:
            self.bias = nn.Parameter(torch.zeros(stop - start, dtype=weight.dtype, device=weight.device))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected an input of shape (..., {self.in_features}), got {tuple(x.shape)}")
        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)
        if self.gather_output:
            return gather_from_tp_region(y, self.out_features, self.group)
        return y


class RowParallelLinear(nn.Module):
    """y = x @ W.T + b with the columns of W (the input features) split over the ranks of `group`."""

    def __init__(self, in_features, out_features, bias=True, master_weight=None, *,
                 input_is_parallel=True, group=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.group = input_is_parallel, group
        rank, world_size = tp_rank_and_size(group)
        weight = full_weight(master_weight, out_features, in_features)
        start, stop = shard_range(in_features, rank, world_size)
        self.weight = nn.Parameter(weight[:, start:stop].clone())
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=weight.device))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        if not self.input_is_parallel:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"expected the full input (..., {self.in_features}), got {tuple(x.shape)}")
            x = scatter_to_tp_region(x, self.group)
        elif x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"expected this rank's input slice (..., {self.weight.shape[1]}), "
                             f"got {tuple(x.shape)}")
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)  # bias not in the partials
        return y if self.bias is None else y + self.bias
### END SOLUTION


# %% [markdown]
# ## 1. Sequence-first activations, and who holds which tokens
#
# Activations are **sequence-first**, `(s, b, h)` (or `(s, h)`, or `(s, ..., h)`), Megatron-LM's
# `[s, b, h]` layout: a rank's share of the sequence is a contiguous block of rows along **dim 0**,
# the balanced split of `s` (`shard_range(s, rank, p)`, as for features in `tp_torch`). In
# `tp_sequence` a sharded activation was a list with one array per rank; here each rank holds only
# its own item of that list, `x_r = x[start_r:stop_r]`, and `s` itself (the full length) is passed
# along where a rank needs the others' lengths, as `full_size` was in `gather_from_tp_region`.
#
# ```
# s = 7 tokens, p = 3 ranks:  rank 0: x[0:3]  rank 1: x[3:5]  rank 2: x[5:7]
# x (7, b, h)                         (3, b, h)       (2, b, h)       (2, b, h)
# ```
#
# ### The three sequence-parallel mappings
#
# Like `f`/`g` and gather/scatter in `tp_torch`, they come in conjugate pairs: the backward of
# each is the other collective of the pair (Megatron-LM, `megatron/core/tensor_parallel/
# mappings.py`; "first dim" is the sequence there too):
#
# | Megatron-LM (`mappings.py`) | forward | backward |
# |---|---|---|
# | `gather_from_sequence_parallel_region` (`_GatherFromSequenceParallelRegion`) | all-gather, dim 0 | reduce-scatter, dim 0 |
# | `reduce_scatter_to_sequence_parallel_region` (`_ReduceScatterToSequenceParallelRegion`) | reduce-scatter, dim 0 | all-gather, dim 0 |
# | `scatter_to_sequence_parallel_region` (`_ScatterToSequenceParallelRegion`) | keep own rows | all-gather, dim 0 |
#
# Why is the backward of the gather a **reduce-scatter**, not "keep my rows"? After the gather,
# every rank computes with the whole sequence `u`, but only with **its own** hidden units of the
# column layer. Rank `r` therefore holds only its term of `dL/du`, and the real gradient is the
# sum over ranks; each rank needs that sum only for its own tokens: a reduce-scatter.
#
# ```
# gather_from_sequence_parallel_region(u_r, s)
#   fwd:  u_r (s_r, ...)    ── all-gather ─────►  u (s, ...)      on every rank
#   bwd:  Σ_q du_q[rows r]  ◄── reduce-scatter ──  du_r (s, ...)   rank r's term
#
# reduce_scatter_to_sequence_parallel_region(p_r)
#   fwd:  p_r (s, ...)      ── reduce-scatter ─►  z_r (s_r, ...)  rows r of Σ p_q
#   bwd:  dz (s, ...)       ◄──── all-gather ────  dz_r (s_r, ...)
# ```
#
# (Megatron's gather takes `tensor_parallel_output_grad=True` by default: the reduce-scatter
# above. With `False`, when what follows the gather is replicated rather than tensor-parallel, its
# backward only splits. We need the first kind only.)
#
# ### Uneven lengths: pad, collective, trim
#
# `all_gather` and `reduce_scatter` need the same shape on every rank (gloo refuses anything else;
# `dist.all_gather_single` / `dist.reduce_scatter_single`, called `all_gather_into_tensor` /
# `reduce_scatter_tensor` before torch 2.13, need it on every backend). With `s = 5` on
# `p = 2`, rank 0 holds 3 tokens and rank 1 holds 2: pad every piece to the longest shard
# (`ceil(s / p)` rows), run one collective, trim each piece back to its rank's length, exactly as
# `tp_torch`'s gather padded columns. For the reduce-scatter, each rank cuts its full `(s, ...)`
# partial into the `p` pieces of the balanced split and pads each:
#
# ```
#  rank 0's partial (5 rows): a0 a1 a2 | a3 a4  ─ pad ─► [a0 a1 a2] [a3 a4 0]
#  rank 1's partial (5 rows): b0 b1 b2 | b3 b4  ─ pad ─► [b0 b1 b2] [b3 b4 0]
#  dist.reduce_scatter(out, pieces): rank r gets the sum of every rank's piece r
#  rank 0: [a0+b0 a1+b1 a2+b2]         rank 1: [a3+b3 a4+b4 0] ─ trim ─► 2 rows
# ```
#
# (Megatron instead asserts that `s` divides by `p`, or takes explicit `output_split_sizes`.)
#
# ### What they cost: the same bytes as one all-reduce
#
# In a ring of `p` ranks, an all-gather of an `N`-element result and a reduce-scatter of
# `N`-element inputs each send `(p - 1) / p * N` elements per rank, and **an all-reduce is a
# reduce-scatter followed by an all-gather**: `2 (p - 1) / p * N`. So the SP block's all-gather of
# `u` plus its reduce-scatter of the partial output move exactly what the plain TP block's one
# all-reduce moved (`tp_sequence`, section "The collectives"), for `1/p` of the activation memory.
# The gpu_runner checks that your block calls exactly one of each.
#
# (On CPU, gloo runs a reduce-scatter as an all-reduce internally, so there it saves nothing; NCCL
# runs the real ring. The gpu_runner counts the collective *you call*.)
#
# Run this: two ranks gather their rows and reduce-scatter a partial sum along dim 0.

# %%
def hello_sequence_collectives():
    rank, p = dist.get_rank(), dist.get_world_size()
    mine = torch.full((2, 3), float(rank))          # this rank's 2 tokens, h = 3
    parts = [torch.empty_like(mine) for _ in range(p)]
    dist.all_gather(parts, mine)
    gathered = torch.cat(parts, dim=0)              # (2p, 3): every token, every rank
    partial = (rank + 1.0) * torch.arange(2.0 * p).unsqueeze(1).expand(2 * p, 3)
    out = torch.empty(2, 3)
    dist.reduce_scatter(out, list(partial.chunk(p, dim=0)))   # my rows of the sum
    print(f"gathered {gathered[:, 0].tolist()}, my rows of the sum {out[:, 0].tolist()}")

run_on_ranks(hello_sequence_collectives, 2)


# %% [markdown]
# ## Exercise 1: the sequence-parallel mappings (`sol_sequence_mappings`)
#
# Fill in the bodies marked `YOUR CODE HERE`; the public functions at the end of the cell are given.
#
# - `_all_gather_first_dim(t, seq_len, group)`: `t` is this rank's rows `(s_r, ...)`; return all
#   `seq_len` rows on every rank, in rank order: pad, `dist.all_gather`, trim (section 1). Raise
#   `ValueError` when `t` does not hold this rank's number of rows of the balanced split.
# - `_reduce_scatter_first_dim(t, group)`: `t` is this rank's partial sum over the whole sequence,
#   `(s, ...)`, the same shape on every rank; return this rank's rows `(s_r, ...)` of the sum over
#   ranks: cut, pad, `dist.reduce_scatter(out, pieces)` (or one `dist.reduce_scatter_single` on
#   the pieces concatenated), trim.
# - `_own_rows(t, group)`: this rank's rows of `t`, a copy.
# - The three `torch.autograd.Function`s: forward, and the conjugate collective in backward.
#   `backward` returns one gradient per input of `forward` (`None` for `seq_len` and `group`); the
#   functions that need the full length in backward keep it in `ctx` (`x.shape[0]` in forward).
# - Make every new tensor from the input (`F.pad`, `torch.empty_like`, `t.new_zeros`), never
#   `torch.zeros(shape)`: `tp_torch`'s *Devices and dtypes* rules hold here too, and the
#   gpu_runner checks them the same way. Call the collectives at every world size, 1 included.
# - Everything is along **dim 0**. `tp_torch`'s mappings worked on the last dim; do not reuse
#   them here, or move dim 0 to the end first (`movedim`) if you do.

# %% nbgrader={"grade": false, "grade_id": "sol_sequence_mappings", "locked": false, "schema_version": 3, "solution": true, "task": false}
def _all_gather_first_dim(t, seq_len, group):
    """Every rank's rows of `t` concatenated along dim 0 (lengths from the balanced split of
    seq_len), on every rank."""
    ### BEGIN SOLUTION
    rank, p = tp_rank_and_size(group)
    lengths = [stop - start for start, stop in (shard_range(seq_len, r, p) for r in range(p))]
    if t.shape[0] != lengths[rank]:
        raise ValueError(f"rank {rank} holds {t.shape[0]} of {seq_len} tokens, "
                         f"expected {lengths[rank]} (the balanced split)")
    longest = max(lengths)  # all_gather needs the same shape on every rank: pad, then trim
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - t.shape[0])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(p)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)], dim=0)
    ### END SOLUTION


def _reduce_scatter_first_dim(t, group):
    """This rank's rows (the balanced split of dim 0) of the sum over ranks of `t`."""
    ### BEGIN SOLUTION
    rank, p = tp_rank_and_size(group)
    bounds = [shard_range(t.shape[0], r, p) for r in range(p)]
    longest = max(stop - start for start, stop in bounds)
    # piece r: rank r's rows, padded to the longest, so that every piece has one shape
    pad = (0, 0) * (t.dim() - 1)
    pieces = [F.pad(t[start:stop], pad + (0, longest - (stop - start))).contiguous()
              for start, stop in bounds]
    out = torch.empty_like(pieces[rank])
    dist.reduce_scatter(out, pieces, group=group)      # rank r gets the sum of the pieces r
    start, stop = bounds[rank]
    return out[:stop - start]
    ### END SOLUTION


def _own_rows(t, group):
    """This rank's rows (the balanced split of dim 0) of `t`, a copy."""
    ### BEGIN SOLUTION
    rank, p = tp_rank_and_size(group)
    start, stop = shard_range(t.shape[0], rank, p)
    return t[start:stop].clone()
    ### END SOLUTION


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """All-gather along dim 0 forward, reduce-scatter along dim 0 backward."""

    @staticmethod
    def forward(ctx, x, seq_len, group):
        ### BEGIN SOLUTION
        ctx.group = group
        return _all_gather_first_dim(x, seq_len, group)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_output):
        ### BEGIN SOLUTION
        return _reduce_scatter_first_dim(grad_output, ctx.group), None, None
        ### END SOLUTION


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Reduce-scatter along dim 0 forward, all-gather along dim 0 backward."""

    @staticmethod
    def forward(ctx, x, group):
        ### BEGIN SOLUTION
        ctx.group, ctx.seq_len = group, x.shape[0]
        return _reduce_scatter_first_dim(x, group)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_output):
        ### BEGIN SOLUTION
        return _all_gather_first_dim(grad_output.contiguous(), ctx.seq_len, ctx.group), None
        ### END SOLUTION


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Keep this rank's rows forward, all-gather along dim 0 backward."""

    @staticmethod
    def forward(ctx, x, group):
        ### BEGIN SOLUTION
        ctx.group, ctx.seq_len = group, x.shape[0]
        return _own_rows(x, group)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_output):
        ### BEGIN SOLUTION
        return _all_gather_first_dim(grad_output.contiguous(), ctx.seq_len, ctx.group), None
        ### END SOLUTION


# The public mappings (given): use these in the layers.
def gather_from_sequence_parallel_region(x, seq_len, group=None):
    """This rank's tokens (s_r, ...) -> all seq_len tokens (s, ...) on every rank; backward:
    reduce-scatter of the gradient (every rank's terms summed, this rank's rows kept)."""
    return _GatherFromSequenceParallelRegion.apply(x, seq_len, group)


def reduce_scatter_to_sequence_parallel_region(x, group=None):
    """Partial sums (s, ...) on every rank -> this rank's rows (s_r, ...) of their sum;
    backward: all-gather of the gradient."""
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x, group=None):
    """The full sequence (s, ...) -> this rank's rows (s_r, ...); backward: all-gather."""
    return _ScatterToSequenceParallelRegion.apply(x, group)


# %% nbgrader={"grade": true, "grade_id": "test_sequence_gather", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks, 5 tokens as 3 + 2: gather forward, reduce-scatter backward
from assignments.tp_torch_sequence import checks as check
check.sequence_gather(gather_from_sequence_parallel_region)

# %% nbgrader={"grade": true, "grade_id": "test_sequence_reduce_scatter", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: reduce-scatter forward (this rank's rows of the sum), all-gather backward
from assignments.tp_torch_sequence import checks as check
check.sequence_reduce_scatter(reduce_scatter_to_sequence_parallel_region)

# %% nbgrader={"grade": true, "grade_id": "test_sequence_scatter", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: this rank's rows forward, all-gather backward
from assignments.tp_torch_sequence import checks as check
check.sequence_scatter(scatter_to_sequence_parallel_region)

# %%
tpgrade.selfcheck.run("sol_sequence_mappings")


# %% [markdown]
# ## Exercise 2: the MLP block with sequence parallelism, `LayerSP` (`sol_layer_sp`)
#
# `tp_sequence`'s `layer_sp`, as a module, on rank `r` (pre-LayerNorm block, GELU like
# `tp_torch`'s `ParallelMLP`):
#
#     y_r = x_r + MLP(LayerNorm(x))[rows of rank r]
#     MLP(u) = act(u @ W1.T + b1) @ W2.T + b2
#
# Two ranks, `s = 4`, hidden `h`, MLP width `f` (rank `r` holds the hidden units `f_r`):
#
# ```
#  rank 0: x_0 (2, b, h)                   rank 1: x_1 (2, b, h)
#  u_0 = self.ln(x_0)   own tokens         u_1 = self.ln(x_1)
#      └── gather_from_sequence_parallel_region(u_r, s) ──┘    bwd: reduce-scatter
#  u (4, b, h)                             u (4, b, h)
#  a_0 = act(F.linear(u, fc1.weight,       a_1 = ...       (4, b, f_r)
#                     fc1.bias))
#  p_0 = F.linear(a_0, fc2.weight)         p_1 = ...       (4, b, h) partial sums
#      └── reduce_scatter_to_sequence_parallel_region(p_r) ──┘  bwd: all-gather
#  y_0 = x_0 + z_0 + fc2.bias (2, b, h)    y_1 = x_1 + z_1 + fc2.bias (2, b, h)
# ```
#
# - `LayerSP(hidden, ffn_hidden, bias=True, w1=None, w2=None, *, activation=F.gelu, eps=1e-5,
#   group=None)`; `forward(x, seq_len)` takes this rank's tokens `(s_r, ..., hidden)` of a
#   sequence of `seq_len` tokens and returns this rank's tokens of `y`, the same shape.
# - Store **`self.ln`** (`nn.LayerNorm(hidden, eps=eps)`, whole on every rank), **`self.fc1`** (your
#   `ColumnParallelLinear(hidden, ffn_hidden, ..., gather_output=False)`, from `w1`) and
#   **`self.fc2`** (your `RowParallelLinear(ffn_hidden, hidden, ..., input_is_parallel=True)`, from
#   `w2`), both on `group`: they hold the shards (`fc1.weight`: rows of `W1`, `fc2.weight`: columns
#   of `W2`, `fc2.bias`: the full `b2`). The graders read them by these names.
# - But do **not** call `self.fc1(u)` or `self.fc2(a)`: use `F.linear` with their parameters. The
#   layers' forward begins with `f` (the column layer) or ends with `g` (the row layer), and under
#   sequence parallelism the gather and the reduce-scatter take their place. Megatron does the same:
#   with `sequence_parallel=True`, `ColumnParallelLinear` all-gathers its input along the sequence
#   inside its GEMM function (`linear_with_grad_accumulation_and_async_allreduce`) instead of
#   calling `copy_to_tensor_model_parallel_region`, and `RowParallelLinear` ends with
#   `reduce_scatter_to_sequence_parallel_region` instead of
#   `reduce_from_tensor_model_parallel_region`, then adds its bias.
#
# **Pitfalls**
#
# * *LayerNorm on the gathered tensor.* Gather `x`, then normalize: the same numbers (LayerNorm
#   is per token), but every rank normalizes (and keeps for backward) all `s` tokens, the memory SP
#   exists to save. It shows in the gradients: each rank's `ln.weight.grad` must be the gradient
#   over **its own tokens** (Megatron all-reduces those partial gradients once per step, for the
#   parameters marked `sequence_parallel`, in `finalize_model_grads`; we stop before that step).
#   `fc2.bias`, added to this rank's tokens only, is in the same case.
# * *`f` and the gather together.* `self.fc1(u)` after the gather: `f` all-reduces `dL/du` in
#   backward and the gather's reduce-scatter sums the same terms again: `dL/dx` counted `p` times,
#   and one collective too many.
# * *The wrong axis.* The sequence is dim 0. A reduce-scatter along the hidden dim gives
#   `(s, b, h/p)`.
# * *All-reduce, then slice.* `reduce_from_tp_region` of the partials followed by `[start:stop]`
#   gives the right numbers for twice the data of a reduce-scatter (and its backward is wrong
#   without a matching all-gather): use the reduce-scatter.
# * *The N-fold bias.* `b2` is added after the reduce-scatter, to this rank's tokens; inside the
#   partial sums it would be counted `p` times. The residual too is this rank's own `x_r`.
#
# (Megatron's column layer does not even keep the gathered `u` for its weight gradient: it
# all-gathers `u` again in backward, trading communication for memory. Ours lets autograd keep
# `u`, so its backward runs one reduce-scatter (the gather's twin) and one all-gather (the
# reduce-scatter's twin).)

# %% nbgrader={"grade": false, "grade_id": "sol_layer_sp", "locked": false, "schema_version": 3, "solution": true, "task": false}
class LayerSP(nn.Module):
    """y = x + MLP(LayerNorm(x)) on this rank's tokens x (s_r, ..., hidden), with sequence
    parallelism: MLP(u) = activation(u @ W1.T + b1) @ W2.T + b2, W1's rows (fc1) and W2's
    columns (fc2) split over the ranks of `group`, the LayerNorm whole on every rank."""

    def __init__(self, hidden, ffn_hidden, bias=True, w1=None, w2=None, *, activation=F.gelu,
                 eps=1e-5, group=None):
        super().__init__()
        self.activation, self.group = activation, group
        ### BEGIN SOLUTION
        self.ln = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = ColumnParallelLinear(hidden, ffn_hidden, bias, w1, gather_output=False,
                                        group=group)
        self.fc2 = RowParallelLinear(ffn_hidden, hidden, bias, w2, input_is_parallel=True,
                                     group=group)
        ### END SOLUTION

    def forward(self, x, seq_len):
        """x: this rank's tokens (s_r, ..., hidden) of a sequence of seq_len tokens; returns
        this rank's tokens (s_r, ..., hidden) of y."""
        ### BEGIN SOLUTION
        u = gather_from_sequence_parallel_region(self.ln(x), seq_len, self.group)  # all tokens
        a = self.activation(F.linear(u, self.fc1.weight, self.fc1.bias))   # (s, ..., f_r)
        partial = F.linear(a, self.fc2.weight)                     # (s, ..., hidden), no bias
        z = reduce_scatter_to_sequence_parallel_region(partial, self.group)   # own tokens
        return x + (z if self.fc2.bias is None else z + self.fc2.bias)
        ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_layer_sp_forward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks, x (5, 2, 4) as 3 + 2 tokens: each rank's tokens of the dense block
from assignments.tp_torch_sequence import checks as check
check.layer_sp_forward(LayerSP)

# %% nbgrader={"grade": true, "grade_id": "test_layer_sp_backward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: dL/dx of own tokens, fc1/fc2 weight gradients, LayerNorm gradients over own tokens
from assignments.tp_torch_sequence import checks as check
check.layer_sp_backward(LayerSP)

# %%
tpgrade.selfcheck.run("sol_layer_sp")


# %% [markdown]
# ## Exercise 3: the vocabulary-parallel embedding, `VocabParallelEmbedding` (`sol_vocab_embedding`)
#
# The table `(V, h)` is split **by rows**: rank `r` holds the rows `shard_range(V, r, p)` =
# `vocab_start:vocab_end`, and every rank sees all the token ids. A rank looks up the ids it
# owns, **shifted** into its shard (global row `t` is local row `t - vocab_start`), puts zeros for
# the others, and one all-reduce (sum) gives every rank every embedding. `V = 7` on 3 ranks:
#
# ```
#  token_ids = [5, 1, 3]                     (the same on every rank)
#            rows    owns  local row          rank r's lookup (3, h)
#  rank 0    0-2     1     1 - 0 = 1          [  0  , E[1],  0   ]
#  rank 1    3-4     3     3 - 3 = 0          [  0  ,  0  , E[3] ]
#  rank 2    5-6     5     5 - 5 = 0          [ E[5],  0  ,  0   ]
#                     reduce_from_tp_region ─► [ E[5], E[1], E[3] ]  on every rank
# ```
#
# - `VocabParallelEmbedding(num_embeddings, embedding_dim, master_weight=None, *, group=None)`:
#   `.weight` is an `nn.Parameter` holding a copy of this rank's rows of the full table, which
#   comes from your `full_weight(master_weight, num_embeddings, embedding_dim)` (so a
#   `master_weight` of the wrong shape is a `ValueError` naming both shapes, and `None` gives the
#   seeded default). A rank with no rows (`V < p`) holds a `(0, embedding_dim)` weight and must
#   still work.
# - `forward(token_ids)`: integer ids `(...)`, the same on every rank; returns `(..., h)` on every
#   rank in the table's dtype, through **your `reduce_from_tp_region`** (one all-reduce forward;
#   its identity backward gives each rank the gradient of its own lookups).
# - Raise `ValueError` for ids outside `[0, V)` (every rank sees the same ids, so every rank
#   raises: no deadlock) and for ids that are not integers.
#
# **Pitfalls**
#
# * *Not masking.* A rank that looks up "some" row for an id it does not own (clamping it into
#   range) adds a wrong row to the sum.
# * *Not shifting.* Local row `t - vocab_start`, not `t`: `t` itself indexes past the shard (an
#   `IndexError`) or picks another row.
# * *Masking outside autograd.* Megatron sets the masked ids to local row 0, looks them up, then
#   zeros those outputs with `output_parallel[input_mask, :] = 0.0`, an in-place write that
#   autograd records, so their gradient is zero. Zeroing them under `torch.no_grad()` or through
#   `.data` gives the same forward, but the backward sends the foreign tokens' gradient into
#   local row 0. Zero in the graph (index assignment into zeros, `masked_fill`, a multiply by the
#   mask), or look up only the owned ids.
# * *Silent zeros for bad ids.* An id outside `[0, V)` is owned by no rank: its embedding would
#   be a zero vector, no error. Check the ids.
#
# **In Megatron-LM**, `VocabParallelEmbedding` (`layers.py`) builds `input_mask`, looks up
# `masked_input = input_ - vocab_start_index` (masked ids set to 0), zeros
# `output_parallel[input_mask, :]` and all-reduces with `reduce_from_tensor_model_parallel_region`; with sequence parallelism
# (`reduce_scatter_embeddings=True`) it reduce-scatters along the sequence instead, so the
# embeddings arrive split as `LayerSP` wants them. It pads the vocabulary to a multiple of `p`
# (`make_vocab_size_divisible_by`); here uneven splits must work. vLLM's `VocabParallelEmbedding`
# masks the same way (`get_masked_input_and_mask`).

# %% nbgrader={"grade": false, "grade_id": "sol_vocab_embedding", "locked": false, "schema_version": 3, "solution": true, "task": false}
class VocabParallelEmbedding(nn.Module):
    """table[token_ids] with the table's rows (the vocabulary) split over the ranks of `group`."""

    def __init__(self, num_embeddings, embedding_dim, master_weight=None, *, group=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        ### BEGIN SOLUTION
        rank, world_size = tp_rank_and_size(group)
        table = full_weight(master_weight, num_embeddings, embedding_dim)
        self.vocab_start, self.vocab_end = shard_range(num_embeddings, rank, world_size)
        self.weight = nn.Parameter(table[self.vocab_start:self.vocab_end].clone())
        ### END SOLUTION

    def forward(self, token_ids):
        """token_ids: integers (...) in [0, num_embeddings), the same on every rank;
        returns the embeddings (..., embedding_dim) on every rank."""
        ### BEGIN SOLUTION
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex:
            raise ValueError(f"token ids must be integers, got {token_ids.dtype}")
        outside = (token_ids < 0) | (token_ids >= self.num_embeddings)
        if outside.any():   # no rank owns them: they would embed as zeros, silently
            raise ValueError(f"token ids must be in [0, {self.num_embeddings}), got "
                             f"{token_ids[outside][:5].tolist()}")
        owned = (token_ids >= self.vocab_start) & (token_ids < self.vocab_end)
        out = self.weight.new_zeros(*token_ids.shape, self.embedding_dim)
        out[owned] = self.weight[token_ids[owned] - self.vocab_start]   # shifted into the shard
        return reduce_from_tp_region(out, self.group)      # zeros where another rank owns it
        ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_embedding_forward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks, table (5, 3) as rows 0-2 and 3-4: .weight and table[token_ids]
from assignments.tp_torch_sequence import checks as check
check.embedding_forward(VocabParallelEmbedding)

# %% nbgrader={"grade": true, "grade_id": "test_embedding_backward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: .weight.grad is this rank's rows of the dense table gradient
from assignments.tp_torch_sequence import checks as check
check.embedding_backward(VocabParallelEmbedding)

# %% nbgrader={"grade": true, "grade_id": "test_embedding_bad_ids", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 1 rank: ids outside [0, V) raise ValueError
from assignments.tp_torch_sequence import checks as check
check.embedding_bad_ids(VocabParallelEmbedding)

# %%
tpgrade.selfcheck.run("sol_vocab_embedding")


# %% [markdown]
# ## Exercise 4: the cross-entropy on vocabulary-parallel logits (`sol_vocab_cross_entropy`)
#
# The output layer is column-parallel over the vocabulary, so rank `r` holds the logits of its
# own vocabulary slice, `z_r = z[..., start_r:stop_r]`. Per token, with target `t` and
# `m = max_v z_v` over **all** ranks:
#
#     loss = log(sum_v exp(z_v)) - z_t = log(sum_v exp(z_v - m)) - (z_t - m)
#
# and its gradient, per token and vocabulary entry, is
#
#     dloss/dz_v = softmax(z)_v - [v == t]
#                = exp(z_v - m) / sum_u exp(z_u - m) - [v == t]
#
# Every piece of the forward is a max or a sum over the vocabulary, so each rank reduces its own
# slice to **one number per token** and an all-reduce combines them; the backward needs, on rank
# `r`, only its own columns of the softmax (its `exp(z_r - m)` divided by the all-reduced sum)
# and whether it owns `t`: **no communication at all**.
#
# ```
#  z (tokens, V = 7): rank 0 z[:, 0:3], rank 1 z[:, 3:5], rank 2 z[:, 5:7]
#
#  rank r, per token               collective              on every rank
#  m_r = max of its z_r            all_reduce, MAX      ─►  m        (tokens,)
#  e_r = sum of exp(z_r - m)       all_reduce, sum      ─►  e        (tokens,)
#  t_r = z_r[t - start_r] - m      all_reduce, sum      ─►  z_t - m  (tokens,)
#        if it owns t, else 0
#  loss = log(e) - (z_t - m)       nothing vocabulary-sized travels
#  backward, no collective:  dloss/dz_r = (exp(z_r - m) / e - onehot_r(t)) * dloss
# ```
#
# - `vocab_parallel_cross_entropy(logits_shard, target, vocab_size, group=None)`: this rank's
#   logits `(..., V_r)` (its columns of the balanced split of `vocab_size`), the target ids
#   `(...)` (the same on every rank); returns the per-token loss, shape `target.shape`, in the
#   logits' dtype, on every rank. Raise `ValueError` for targets that are not integers or not in
#   `[0, vocab_size)`. `vocab_size` is passed because a rank cannot tell where its slice starts
#   from its own width alone when the split is uneven (Megatron pads the vocabulary so that
#   `start_r = r * V_r`).
# - Write it as a `torch.autograd.Function`, `_VocabParallelCrossEntropy`, as Megatron does: the
#   forward makes the three all-reduces with `dist.all_reduce` (autograd does not see them) and
#   saves this rank's softmax and target columns; the backward returns `(softmax - onehot) *
#   grad_loss` for the logits and `None` for the other inputs.
# - Exactly three all-reduces of one number per token (one MAX, two sums), nothing else, and
#   never the logits themselves.
# - A rank with no vocabulary (`vocab_size < p`) takes part in every all-reduce: `-inf` to the
#   max (a `(..., 0)` tensor has no max: `torch.amax` raises; pad one `-inf` column, or start from
#   a `-inf` tensor), `0` to both sums.
#
# **Pitfalls**
#
# * *Gathering the logits* (`gather_from_tp_region`, then a dense loss): right numbers, `V / p`
#   numbers per token per rank on the wire, the largest activation of the model moved. The
#   gpu_runner fails any collective that carries more than one number per token.
# * *No max, or each rank's own max.* `exp(1e4)` is `inf` even in float64, and such logits do occur
#   (a diverging run, an unscaled head). With each rank's own max, the ranks' sums are scaled
#   differently and do not add up: every rank must subtract the **same** `m`.
# * *Letting autograd differentiate around an in-place `dist.all_reduce`.* Autograd does not see
#   the collective. For the two sums that happens to work (to this rank the other ranks' terms
#   are constants), but not for the max: `amax` keeps its result for its backward, the all-reduce
#   overwrites it with the global max, and the gradient then goes to entries that are not this
#   rank's maximum (NaN on a rank that does not hold the global one). The loss does not depend
#   on the shift, so nothing should flow through `m`: a `Function`, or a detached max and
#   `reduce_from_tp_region` for the sums, says so.
# * *The offset.* Rank `r`'s column `j` is vocabulary id `start_r + j`, with `start_r` from the
#   balanced split (not `r * V_r` when the split is uneven).
# * *In place.* Megatron subtracts the max from the logits in place (they are its own
#   temporaries); here `logits_shard` is the caller's tensor: do not modify it.
#
# **In Megatron-LM**, `vocab_parallel_cross_entropy(vocab_parallel_logits, target,
# label_smoothing=0.0, tp_group=None)` (`cross_entropy.py`, `_VocabParallelCrossEntropy`) does
# exactly this: `all_reduce(logits_max, op=ReduceOp.MAX)`, then SUMs of `predicted_logits` and
# `sum_exp_logits`; it saves the softmax for a backward without communication, and returns the
# per-token loss (the mean over tokens comes later). vLLM, serving rather than training, gathers
# the logits instead (`LogitsProcessor`), because sampling needs the whole distribution.

# %% nbgrader={"grade": false, "grade_id": "sol_vocab_cross_entropy", "locked": false, "schema_version": 3, "solution": true, "task": false}
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The per-token loss log(sum_v exp(z_v)) - z_target on logits split by vocabulary."""

    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        ### BEGIN SOLUTION
        rank, p = tp_rank_and_size(group)
        start, stop = shard_range(vocab_size, rank, p)
        if logits.shape[-1] != stop - start or logits.shape[:-1] != target.shape:
            raise ValueError(f"rank {rank}: logits {tuple(logits.shape)} do not fit target "
                             f"{tuple(target.shape)} + ({stop - start},)")
        # 1. the largest logit of all ranks, per token (-inf from a rank with no vocabulary)
        m = F.pad(logits, (0, 1), value=float("-inf")).amax(dim=-1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - m.unsqueeze(-1)                 # <= 0: exp cannot overflow
        exp = shifted.exp()
        # 2. the sum of exp(z - m): this rank's columns, then over the ranks
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        # 3. the target's logit (shifted): only the rank that owns the id has it, others 0
        owned = (target >= start) & (target < stop)
        tokens = owned.nonzero(as_tuple=True)
        columns = target[tokens] - start                   # its column = id - start
        picked = torch.zeros_like(sum_exp)
        picked[tokens] = shifted[tokens + (columns,)]
        dist.all_reduce(picked, group=group)
        # the gradient needs only this rank's softmax and its target columns: no collective
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), *tokens, columns)
        return sum_exp.log() - picked                      # log sum exp(z - m) - (z_t - m)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_loss):
        ### BEGIN SOLUTION
        softmax, *tokens, columns = ctx.saved_tensors
        grad = softmax.clone()
        grad[tuple(tokens) + (columns,)] -= 1.0             # softmax - onehot(target)
        return grad * grad_loss.unsqueeze(-1), None, None, None
        ### END SOLUTION


def vocab_parallel_cross_entropy(logits_shard, target, vocab_size, group=None):
    """Per-token cross-entropy (target.shape) of logits whose vocabulary of vocab_size ids is
    split over the ranks of `group` (this rank: its columns, the balanced split)."""
    ### BEGIN SOLUTION
    if target.dtype.is_floating_point or target.dtype.is_complex:
        raise ValueError(f"target must hold integer ids, got {target.dtype}")
    outside = (target < 0) | (target >= vocab_size)
    if outside.any():
        raise ValueError(f"targets must be in [0, {vocab_size}), got "
                         f"{target[outside][:5].tolist()}")
    return _VocabParallelCrossEntropy.apply(logits_shard, target, vocab_size, group)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_ce_forward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks, logits (3, 5) as columns 0-2 and 3-4: the dense per-token loss
from assignments.tp_torch_sequence import checks as check
check.ce_forward(vocab_parallel_cross_entropy)

# %% nbgrader={"grade": true, "grade_id": "test_ce_backward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: each shard's gradient is its columns of softmax - onehot
from assignments.tp_torch_sequence import checks as check
check.ce_backward(vocab_parallel_cross_entropy)

# %% nbgrader={"grade": true, "grade_id": "test_ce_large_logits", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks, logits ~1e4: no overflow, the exact loss and gradient
from assignments.tp_torch_sequence import checks as check
check.ce_large_logits(vocab_parallel_cross_entropy)

# %%
tpgrade.selfcheck.run("sol_vocab_cross_entropy")


# %% [markdown]
# ## Try it yourself
#
# The cell below runs your four pieces on 2 and on 3 ranks (uneven: 7 tokens are 4 + 3 and
# 3 + 2 + 2, a vocabulary of 11 is 6 + 5 and 4 + 4 + 3) and compares every rank with dense torch:
# outputs and gradients. Every entry should be about `1e-5` or less (float32). Change the sizes,
# the world size or the seed and run it again.

# %%
def _diff(mine, dense):
    if mine is None:
        return "None (no gradient)"
    if mine.shape != dense.shape:
        return f"shape {tuple(mine.shape)}, expected {tuple(dense.shape)}"
    return (mine - dense).abs().max().item()


def try_my_sequence_layers(seed=0, s=7, hidden=6, ffn=10, vocab=11):
    torch.manual_seed(seed)          # the same data on every rank
    rank, p = dist.get_rank(), dist.get_world_size()
    tokens, rows = (slice(*shard_range(n, rank, p)) for n in (s, vocab))
    x, g = torch.randn(s, 2, hidden), torch.randn(s, 2, hidden)
    w1, w2 = torch.randn(ffn, hidden), torch.randn(hidden, ffn)
    table, ids = torch.randn(vocab, hidden), torch.randint(0, vocab, (s, 2))
    logits, dloss = torch.randn(s, 2, vocab) * 3, torch.randn(s, 2)
    errors = {}
    # LayerSP against x + gelu(layer_norm(x) @ W1.T) @ W2.T (zero biases)
    block = LayerSP(hidden, ffn, w1=w1, w2=w2)
    x_r = x[tokens].clone().requires_grad_()
    (block(x_r, s) * g[tokens]).sum().backward()
    x_d = x.clone().requires_grad_()
    y_d = x_d + F.linear(F.gelu(F.linear(F.layer_norm(x_d, (hidden,)), w1)), w2)
    (y_d * g).sum().backward()
    errors["LayerSP dL/dx"] = _diff(x_r.grad, x_d.grad[tokens])
    # VocabParallelEmbedding against table[ids]
    emb = VocabParallelEmbedding(vocab, hidden, master_weight=table)
    (emb(ids) * g).sum().backward()
    t_d = table.clone().requires_grad_()
    (F.embedding(ids, t_d) * g).sum().backward()
    errors["embedding dL/dtable"] = _diff(emb.weight.grad, t_d.grad[rows])
    # vocab_parallel_cross_entropy against F.cross_entropy(reduction="none")
    z_r = logits[..., rows].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(z_r, ids, vocab)
    (loss * dloss).sum().backward()
    z_d = logits.clone().requires_grad_()
    loss_d = F.cross_entropy(z_d.reshape(-1, vocab), ids.reshape(-1), reduction="none")
    (loss_d.reshape(s, 2) * dloss).sum().backward()
    errors["cross-entropy loss"] = _diff(loss, loss_d.reshape(s, 2).detach())
    errors["cross-entropy dL/dz"] = _diff(z_r.grad, z_d.grad[..., rows])
    return errors


for world_size in (2, 3):
    per_rank = run_on_ranks(try_my_sequence_layers, world_size)
    print(f"world size {world_size}: largest |difference| from dense torch over all ranks")
    for key in per_rank[0]:
        values = [r[key] for r in per_rank]
        problems = [f"rank {i}: {v}" for i, v in enumerate(values) if isinstance(v, str)]
        print(f"  {key:22s} {problems[0] if problems else f'{max(values):.1e}'}")

# %% [markdown]
# ## Pitfalls (each one is a test of the gpu_runner)
#
# 1. **A mapping without its autograd twin.** A plain `dist.all_gather` / `dist.reduce_scatter` on
#    the activations gives the right forward and no (or a wrong) gradient. Every collective on an
#    activation goes through an `autograd.Function` whose backward is the conjugate collective.
# 2. **The wrong axis.** Sequence parallelism splits dim 0 (sequence-first activations); the
#    hidden dim stays whole.
# 3. **Uneven lengths without padding.** `dist.all_gather` of shards of different lengths raises
#    on gloo (the gpu_runner refuses it on NCCL too); pad to the longest, collect, trim.
# 4. **All-reduce where a reduce-scatter belongs**, then a slice: right numbers, twice the data.
# 5. **LayerNorm on the gathered tensor**: right outputs, every rank's LayerNorm gradient over the
#    wrong tokens, and no memory saved.
# 6. **`f` or `g` inside the SP block** (calling `self.fc1(u)` / `self.fc2(a)`): an extra
#    all-reduce and `dL/dx` counted `p` times, or the numbers of an all-reduce then a slice.
# 7. **The embedding not masked, not shifted, or masked outside autograd**: wrong sums, an
#    `IndexError`, or gradients leaking into local row 0.
# 8. **Gathering the logits** for the loss: `V / p` numbers per token on the wire instead of one.
# 9. **No max, or each rank's own max**: overflow on large logits, or sums that do not add up.
# 10. **Tensors on the wrong device or dtype** (`tp_torch`, section 4): the gpu_runner runs your
#     block, embedding and loss in float64 with `meta` as the default device.

# %% [markdown]
# ## Where this lives in real engines
#
# | this notebook | `tp_sequence` (numpy) | Megatron-LM `megatron/core/tensor_parallel/` | vLLM |
# |---|---|---|---|
# | `gather_from_sequence_parallel_region(x, seq_len)` | `all_gather(u_shards, axis=0)` | `mappings.py` `gather_from_sequence_parallel_region` (backward reduce-scatter) | (training only) |
# | `reduce_scatter_to_sequence_parallel_region(x)` | `reduce_scatter(partials, axis=0)` | `reduce_scatter_to_sequence_parallel_region` (backward all-gather), in `RowParallelLinear` with `sequence_parallel` | (training only) |
# | `scatter_to_sequence_parallel_region(x)` | `split_sequence(x, p)` | `scatter_to_sequence_parallel_region` (`LanguageModelEmbedding`: the embeddings, before their dropout) | |
# | `LayerSP` (`self.ln`, `self.fc1`, `self.fc2`) | `layer_sp` | `ColumnParallelLinear` / `RowParallelLinear` with `sequence_parallel=True`; LayerNorm weights marked `sequence_parallel`, their gradients all-reduced in `finalize_model_grads` | |
# | `VocabParallelEmbedding` | `vocab_parallel_embedding` | `layers.py` `VocabParallelEmbedding` (+ `reduce_from_tensor_model_parallel_region`, or `reduce_scatter_embeddings=True`) | `VocabParallelEmbedding` |
# | `vocab_parallel_cross_entropy(logits_shard, target, vocab_size)` | `vocab_parallel_cross_entropy` | `cross_entropy.py` `vocab_parallel_cross_entropy` (`_VocabParallelCrossEntropy`: MAX, two SUMs, softmax saved) | `LogitsProcessor` gathers the logits |
# | `dist.all_reduce(m, op=dist.ReduceOp.MAX)` | `all_reduce(..., op="max")` | `torch.distributed.all_reduce(logits_max, op=ReduceOp.MAX)` | |
# | uneven lengths and vocabularies (pad, trim) | the balanced split | `s % p == 0` asserted; vocabulary padded (`make_vocab_size_divisible_by`) | vocabulary padded |

# %% [markdown]
# ## Graded on real ranks (gpu_runner)
#
# The cells below are scored by the gpu_runner, not by running this notebook: it extracts your
# solution cells (your pasted `tp_torch` layers included) into a module, launches them once with
# `torchrun` and runs every check on world sizes 1, 2, 3 and 4 (sub-groups of the launched world, so
# your `group=` argument is exercised), with NCCL and one GPU per rank where there are 4 GPUs and
# gloo on CPU otherwise: the same checks and points on every machine. Sequences of 7 tokens (and 3:
# fewer tokens than ranks) and vocabularies of 11 (and 3: a rank with no rows) split unevenly; each
# rank gets its own `master_weight` (the real rows or columns inside its shard, noise outside it);
# the device rules are checked with a float64 run on the `meta` default device. A cell's score is
# its points times the fraction of its checks that pass; the reasons are in your feedback.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_sp_mappings", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": true}
# ### The sequence-parallel mappings (`gpu_sp_mappings`, 3 points, graded on real ranks)
#
# `gather_from_sequence_parallel_region`, `reduce_scatter_to_sequence_parallel_region` and `scatter_to_sequence_parallel_region` on every rank and world size, 7 and 3 tokens: the forward outputs (all tokens in rank order; this rank's rows of the sum; this rank's rows) and the backward gradients (this rank's rows of the sum of every rank's upstream gradient; the full gradient, all-gathered).

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_sp_forward", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `LayerSP` forward (`gpu_sp_forward`, 2 points, graded on real ranks)
#
# Each rank's output equals its tokens of the dense block `x + fc2(gelu(fc1(LayerNorm(x))))` (7 tokens, hidden 6, MLP width 10, uneven over 3 and 4 ranks); and the float64 run's output is float64 on the input's device (no tensor created without `device=`/`dtype=`, no plain tensor attribute).

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_sp_backward", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": true}
# ### `LayerSP` backward (`gpu_sp_backward`, 3 points, graded on real ranks)
#
# `dL/dx` of this rank's tokens; `fc1`'s rows and `fc2`'s columns of the dense weight gradients and `fc1`'s slice of its bias gradient; over this rank's own tokens only, the gradients of `fc2.bias` and of the LayerNorm's weight and bias (normalized before the gather); the float64 run's `dL/dx`.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_embedding_forward", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `VocabParallelEmbedding` forward (`gpu_embedding_forward`, 2 points, graded on real ranks)
#
# `.weight` is this rank's rows of `master_weight` (a vocabulary of 11, and of 3 with an empty shard), the default init has those shapes, and the output equals `table[token_ids]` on every rank, for both vocabularies; the float64 run's output.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_embedding_backward", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `VocabParallelEmbedding` backward (`gpu_embedding_backward`, 2 points, graded on real ranks)
#
# `.weight.grad` is this rank's rows of the dense table gradient: the upstream gradients of the tokens it owns summed per row, zero for rows no token uses (nothing leaks from the masked lookups); the float64 run's.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_embedding_errors", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": true}
# ### `VocabParallelEmbedding` errors (`gpu_embedding_errors`, 1 point, graded on real ranks)
#
# Token ids outside `[0, V)` (too large, negative) raise `ValueError`; a `master_weight` of the wrong shape raises `ValueError` naming the expected and the actual shape.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_ce_forward", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `vocab_parallel_cross_entropy` forward (`gpu_ce_forward`, 2 points, graded on real ranks)
#
# The per-token loss equals the dense cross-entropy on every rank, for a vocabulary of 11 (uneven) and of 3 (a rank with no columns at 4 ranks); the float64 run's loss is float64.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_ce_backward", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `vocab_parallel_cross_entropy` backward (`gpu_ce_backward`, 2 points, graded on real ranks)
#
# The gradient of each rank's logits shard equals its columns of the dense gradient `(softmax - onehot) * dloss`; the float64 run's.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_ce_stable", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `vocab_parallel_cross_entropy`, large logits (`gpu_ce_stable`, 2 points, graded on real ranks)
#
# Logits around `1e4`, spread over `+-3e4`: the loss and the gradient are finite and exact (every rank subtracts the same max first).

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_sp_collectives", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": true}
# ### Which collectives, how many, how big (`gpu_sp_collectives`, 3 points, graded on real ranks)
#
# Counted below the Python API, by kind, at world sizes 2 to 4: the gather one all-gather forward and one reduce-scatter backward, the reduce-scatter the reverse, the scatter none forward and one all-gather backward; `LayerSP` exactly one all-gather and one reduce-scatter in forward and in backward, no all-reduce; the embedding one all-reduce forward, nothing backward; the cross-entropy exactly three all-reduces forward, each of one number per token (never vocabulary-sized), nothing backward.
