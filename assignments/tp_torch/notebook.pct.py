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
# # Tensor parallelism with `torch.distributed`: real layers, forward **and** backward
#
# In `tp_linear` and `tp_mlp` you split a linear layer over simulated ranks in numpy and proved that
# the pieces add up to the dense layer. Here you build the layers a real engine uses: `nn.Module`s
# whose ranks are separate processes talking through `torch.distributed` collectives, and whose
# **backward pass** is right as well.
#
# You will write, in four exercises:
#
# 1. the autograd-aware collectives of Megatron-LM's `mappings.py` (`copy_to_tp_region`,
#    `reduce_from_tp_region`, `gather_from_tp_region`, `scatter_to_tp_region`) and the balanced
#    split `shard_range`;
# 2. `ColumnParallelLinear`;
# 3. `RowParallelLinear`;
# 4. `ParallelMLP`: column, activation, row, with one all-reduce in forward and one in backward.
#
# **No GPU needed.** `run_on_ranks(fn, world_size, *args)` forks `world_size` processes on this
# machine, joins them in a `gloo` process group (CPU), calls `fn(*args)` on each and returns the list
# of what each rank returned. Everything below runs that way.
#
# **Grading.** The small test cells (1 point each) run on 2 CPU ranks when the notebook is
# autograded. The larger part of the grade comes from the **gpu_runner** (the cells *Graded on real
# ranks* at the end): it runs your layers under `torchrun` on 1 to 4 ranks (NCCL on GPUs where there
# are enough, gloo on CPU otherwise) and checks shards, outputs, gradients, uneven sizes and how many
# collectives you call.

# %% [markdown]
# ## 1. Tensor parallelism is not data parallelism
#
# | | data parallel (DDP) | tensor parallel (this notebook) |
# |---|---|---|
# | each rank holds | the **whole** model | a **slice** of every big weight matrix |
# | each rank computes on | its own part of the batch | the **same** input `x` as every other rank |
# | what travels | gradients, once per step | activations, **inside** every layer, forward and backward |
# | why | more throughput | a layer too big (or too slow) for one device |
#
# DDP ranks see different data and agree on gradients at the end of the step. TP ranks see the same
# data and must combine partial results *in the middle of each layer*: a TP layer that forgets its
# collective is wrong, not merely slow. Since activations cross the link in every layer, TP wants the
# fastest interconnect (NVLink inside a node); the usual recipe is TP inside a node, DDP across nodes.
#
# Notation, as in the numpy exercises: a linear layer is `y = x @ W.T + b` with `W` of shape
# `(out_features, in_features)` (the `nn.Linear` convention), input `x` of shape `(..., in_features)`,
# `p` ranks, this rank `r`.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Read-only set-up (restored when the notebook is graded). Run it first.
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tpsim.ranks import run_on_ranks
import tpgrade                      # the self-checks (tpgrade.selfcheck.run)
import assignments.tp_torch.checks  # the checks of the graded cells (set up before your code runs)


# %% [markdown]
# ## 2. `torch.distributed` in five minutes
#
# A **process group** is the set of ranks that take part in a collective. `torchrun` (here:
# `run_on_ranks`) starts the processes and each one calls `dist.init_process_group(...)`. Then:
#
# - `dist.get_rank(group)`, `dist.get_world_size(group)`: who am I, how many are we (`group=None`
#   means the default group of all ranks; a layer built with `group=g` must use `g` everywhere);
# - `dist.all_reduce(t, group=group)` works **in place**: every rank's `t` becomes the sum over ranks;
# - `dist.all_gather(tensor_list, t, group=group)`: every rank receives every rank's `t`, into
#   receive buffers allocated before anything arrives. **Give every rank's `t` the same shape**:
#   gloo raises when the buffers differ; NCCL accepts buffers of different sizes but then runs one
#   broadcast per rank instead of one all-gather (and `dist.all_gather_into_tensor` needs equal
#   sizes on every backend). Section 4 pads the shards so that one all-gather works everywhere.
#
# Every rank must call the same collectives in the same order. If only some ranks call `all_reduce`,
# they wait forever for the others: a **deadlock**. (`run_on_ranks` kills the ranks after its
# `timeout` and tells you which ranks were stuck.)
#
# Run this: two ranks, each contributes `rank + 1`. What a rank prints comes back prefixed with its rank.

# %%
def hello_collectives():
    rank, p = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)                                   # in place: 1 + 2 on both ranks
    parts = [torch.empty(2) for _ in range(p)]           # receive buffers, one per rank
    dist.all_gather(parts, torch.tensor([rank, 10.0 * rank]))
    print(f"all_reduce -> {t.item()}, all_gather -> {torch.cat(parts).tolist()}")
    return rank * 100

run_on_ranks(hello_collectives, 2)


# %% [markdown]
# ## 3. Who holds what: the balanced split, and the shapes
#
# Sizes do not always divide by `p` (3 ranks, or `ffn_hidden = 11008` on 3 GPUs). We use the split of
# the numpy exercises (`numpy.array_split`): `n` items over `p` ranks, the first `n % p` ranks get one
# item more, and with `n < p` some ranks get nothing.
#
# ```
# n = 10, p = 4:  rank 0: [0, 3)  rank 1: [3, 6)  rank 2: [6, 8)  rank 3: [8, 10)
# n =  2, p = 3:  rank 0: [0, 1)  rank 1: [1, 2)  rank 2: [2, 2) (empty)
# ```
#
# With `out_r`, `in_r` this rank's share of `out_features`, `in_features`:
#
# | layer | `.weight` on rank r | `.bias` on rank r | input on rank r | output on rank r |
# |---|---|---|---|---|
# | `ColumnParallelLinear` | rows of `W`: `(out_r, in)` | its slice: `(out_r,)` | full `x`: `(..., in)` | `(..., out)` gathered; `(..., out_r)` if `gather_output=False` |
# | `RowParallelLinear` | columns of `W`: `(out, in_r)` | full `b`: `(out,)` | its slice `x_r`: `(..., in_r)` (full `x` if `input_is_parallel=False`) | `(..., out)` after the all-reduce |
#
# Megatron-LM and vLLM simply require `out % p == 0` (Megatron's `divide()` asserts it); the uneven
# split is our addition, and it is what makes the all-gather below interesting.

# %% [markdown]
# ## 4. Why the collectives must be autograd-aware: Megatron's `f` and `g`
#
# `dist.all_reduce` is invisible to autograd: it overwrites a tensor in place and records nothing. A
# layer that calls it directly gets the forward right and the **backward wrong**. See why on the
# column layer's input gradient.
#
# Forward on rank `r`: `y_r = x @ W_r.T` (`W_r` = this rank's rows of `W`), and the full output is
# `y = [y_0 | y_1 | ... | y_{p-1}]`. The chain rule gives
#
# ```
# dL/dx = dL/dy_0 @ W_0  +  dL/dy_1 @ W_1  +  ...  +  dL/dy_{p-1} @ W_{p-1}
# ```
#
# Rank `r` can only compute its own term `dL/dy_r @ W_r`. The gradient of `x` is the **sum over ranks:
# an all-reduce in backward**, although the forward pass had no collective on `x` at all. Megatron
# calls this operator **f**: identity forward, all-reduce backward. Its mirror image **g** ends the row
# layer: all-reduce forward (summing the partial outputs), identity backward (the gradient of a sum
# reaches every term unchanged).
#
# ```
#             f  (copy_to_tp_region)
# forward:    x ──────── identity ────────► x
# backward:   Σ_r dx_r ◄── all-reduce ───── dx_r
#
#             g  (reduce_from_tp_region)
# forward:    y_r ────── all-reduce ──────► y = Σ_r y_r
# backward:   dy  ◄───── identity ───────── dy
# ```
#
# The gather and split operators are conjugate in the same way:
#
# | ours | Megatron-LM `megatron/core/tensor_parallel/mappings.py` | forward | backward |
# |---|---|---|---|
# | `copy_to_tp_region` (**f**) | `copy_to_tensor_model_parallel_region`, `_CopyToModelParallelRegion` | identity | all-reduce |
# | `reduce_from_tp_region` (**g**) | `reduce_from_tensor_model_parallel_region`, `_ReduceFromModelParallelRegion` | all-reduce | identity |
# | `gather_from_tp_region` | `gather_from_tensor_model_parallel_region`, `_GatherFromModelParallelRegion` | all-gather (last dim) | keep own slice |
# | `scatter_to_tp_region` | `scatter_to_tensor_model_parallel_region`, `_ScatterToModelParallelRegion` | keep own slice | all-gather (last dim) |
#
# Each one is a `torch.autograd.Function`: `forward(ctx, ...)` runs with autograd off and returns the
# output; `backward(ctx, grad_output)` returns one gradient per input of `forward` (`None` for inputs
# that are not tensors, such as `group` or a size).
#
# ### Gathering uneven shards
#
# `all_gather` needs equal shapes, but with `n = 5` on `p = 2` rank 0 holds 3 columns and rank 1 holds
# 2. Pad every shard to the widest one (`ceil(n / p)` columns), gather, then trim each piece back to
# its rank's width (every rank can work out every width from `n`, `p` and `shard_range`):
#
# ```
#          shards    pad to 3      all_gather         trim
# rank 0: [a a a]  ──► [a a a] ─┐
# rank 1: [b b]    ──► [b b 0] ─┴──► [a a a][b b 0] ──► [a a a b b]  (every rank)
# ```
#
# One all-gather, the same on gloo and on NCCL. Its backward needs no communication: every rank
# already holds the whole `dL/dy` and keeps its own columns. (NCCL would also take the uneven
# shards as they are, as one broadcast per rank: slower, and gloo refuses it. The gpu_runner
# refuses it on NCCL too, so that every grading machine gives the same grade.)

# %% [markdown]
# ### Devices and dtypes: what changes on a GPU
#
# Here everything lives on the CPU in float32, so three mistakes stay invisible until the layers run on
# GPUs (the gpu_runner runs them there when the grading machine has enough GPUs):
#
# 1. **Create every tensor from the input.** `torch.zeros(shape)` is a float32 tensor on the CPU,
#    whatever `x` is. Inside `forward` and `backward`, make new tensors with `x.new_zeros(...)`,
#    `torch.empty_like(x)`, `F.pad(x, ...)`, or `torch.zeros(..., device=x.device, dtype=x.dtype)`.
# 2. **No collectives on CPU tensors under NCCL.** NCCL moves GPU memory only: `dist.all_reduce(t)`
#    with `t` on the CPU fails there, while gloo (here) accepts it. Reduce the tensor where it is,
#    never a `.cpu()` copy.
# 3. **Parameters are created on the CPU, then moved.** `__init__` builds `nn.Parameter`s (or
#    buffers, `self.register_buffer(...)`) from `master_weight` on the CPU; whoever uses the layer
#    moves it with `layer.to(device)`, which moves parameters and buffers only. A tensor kept in a
#    plain attribute (`self.rows = weight[a:b]`) stays on the CPU, in float32.
#
# The gpu_runner checks these on every machine, GPU or not: it moves your layer with
# `.to(torch.float64)` (as `.to("cuda")` would move it) and runs it on a float64 input with `meta` as
# the default device (`with torch.device("meta"):`). A tensor created without `device=` then lands on
# `meta`, one created without `dtype=` is float32, and a plain tensor attribute is named in your
# feedback.

# %% [markdown]
# ## Exercise 1: the mappings (`sol_mappings`)
#
# Fill in the bodies marked `YOUR CODE HERE`; the public functions at the end of the cell are given.
#
# - `tp_rank_and_size(group)`: if no process group is initialised (`dist.is_initialized()`), raise a
#   `RuntimeError` that says so and what to do; otherwise return `(rank, world_size)` **in `group`**.
# - `shard_range(n, rank, world_size)`: `(start, stop)` of the balanced split of section 3.
# - `_all_reduce`: `dist.all_reduce` works in place, so reduce a **copy** (`clone()`), never a tensor
#   the caller (or autograd) still uses.
# - `_all_gather_last_dim(t, full_size, group)`: pad, gather, trim. Make the padding and the
#   receive buffers from `t` (`F.pad`, `t.new_zeros`, `torch.empty_like`), never `torch.zeros(shape)`:
#   see *Devices and dtypes* in section 4. `full_size` is the width after
#   gathering; it is how each rank knows the others' widths.
# - Call the collectives at every world size, 1 included: one code path everywhere. (Megatron skips
#   them when the world size is 1, a pure optimisation.)

# %% nbgrader={"grade": false, "grade_id": "sol_mappings", "locked": false, "schema_version": 3, "solution": true, "task": false}
def tp_rank_and_size(group=None):
    """(rank, world size) of this process in `group` (None: the default group)."""
    ### BEGIN SOLUTION
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "no torch.distributed process group is initialised: call dist.init_process_group(...) "
            "first (torchrun scripts do), or run your code through run_on_ranks(fn, world_size)")
    return dist.get_rank(group), dist.get_world_size(group)
    ### END SOLUTION


def shard_range(n, rank, world_size):
    """(start, stop) of `rank`'s share of n items; the first n % world_size ranks get one more."""
    ### BEGIN SOLUTION
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
    ### END SOLUTION


def _all_reduce(t, group):
    """The sum of `t` over the ranks of `group`, in a new tensor."""
    ### BEGIN SOLUTION
    out = t.clone()  # all_reduce overwrites its argument; the caller's tensor must survive
    dist.all_reduce(out, group=group)
    return out
    ### END SOLUTION


def _own_slice(t, group):
    """This rank's balanced share of the last dimension of `t`."""
    ### BEGIN SOLUTION
    rank, p = tp_rank_and_size(group)
    start, stop = shard_range(t.shape[-1], rank, p)
    return t[..., start:stop].contiguous()
    ### END SOLUTION


def _all_gather_last_dim(t, full_size, group):
    """Every rank's `t` concatenated along the last dim (widths from the balanced split)."""
    ### BEGIN SOLUTION
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
    ### END SOLUTION


class _CopyToTPRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ### BEGIN SOLUTION
        ctx.group = group
        return x.view_as(x)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_output):
        ### BEGIN SOLUTION
        return _all_reduce(grad_output, ctx.group), None
        ### END SOLUTION


class _ReduceFromTPRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        ### BEGIN SOLUTION
        return _all_reduce(x, group)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_output):
        ### BEGIN SOLUTION
        return grad_output, None
        ### END SOLUTION


class _GatherFromTPRegion(torch.autograd.Function):
    """All-gather along the last dim forward, keep own slice backward."""

    @staticmethod
    def forward(ctx, x, full_size, group):
        ### BEGIN SOLUTION
        ctx.group = group
        return _all_gather_last_dim(x, full_size, group)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_output):
        ### BEGIN SOLUTION
        return _own_slice(grad_output, ctx.group), None, None
        ### END SOLUTION


class _ScatterToTPRegion(torch.autograd.Function):
    """Keep own slice of the last dim forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ### BEGIN SOLUTION
        ctx.group, ctx.full_size = group, x.shape[-1]
        return _own_slice(x, group)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_output):
        ### BEGIN SOLUTION
        return _all_gather_last_dim(grad_output.contiguous(), ctx.full_size, ctx.group), None
        ### END SOLUTION


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


# %% nbgrader={"grade": true, "grade_id": "test_shard_range", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# shard_range(n, rank, p) for (10, 4), (2, 3) and (6, 2): the first n % p ranks get one more
from assignments.tp_torch import checks as check
check.shard_range(shard_range)

# %% nbgrader={"grade": true, "grade_id": "test_mappings_f_and_g", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: copy_to_tp_region all-reduces the gradient, reduce_from_tp_region sums forward
from assignments.tp_torch import checks as check
check.mappings_f_and_g(copy_to_tp_region, reduce_from_tp_region)

# %% nbgrader={"grade": true, "grade_id": "test_mappings_gather_scatter", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks, 5 columns split 3 + 2: gather_from_tp_region / scatter_to_tp_region and their backward
from assignments.tp_torch import checks as check
check.mappings_gather_scatter(gather_from_tp_region, scatter_to_tp_region)

# %%
tpgrade.selfcheck.run("sol_mappings")


# %% [markdown]
# ## Exercise 2: `ColumnParallelLinear` (`sol_column_layer`)
#
# ```
#                   x (..., in)             the same x on every rank
#                        │
#                        f                  copy_to_tp_region: forward identity,
#                        │                  backward all-reduce of dL/dx
#           ┌────────────┴────────────┐
#   rank 0: x @ W_0.T + b_0   rank 1: x @ W_1.T + b_1    W_r = rows of W:
#           (..., out_0)              (..., out_1)       (out_r, in)
#           └─ gather_from_tp_region ─┘             only if gather_output
#                        │
#                   y (..., out)            on every rank; backward: keep
#                                           own slice of dL/dy
# ```
#
# - `full_weight(master_weight, out_features, in_features)` (first function of the cell) gives the full
#   matrix every rank starts from. With `master_weight=None` it is given: the same fixed seed on every
#   rank, in `nn.Linear`'s default range `U(-1/sqrt(in), 1/sqrt(in))`, so the sharded layer equals the
#   dense layer you would get from that seed (Megatron-LM's `_initialize_affine_weight_cpu` works the
#   same way: build the master weight, keep your split). You write the other case: a `master_weight`
#   that is not `(out_features, in_features)` is a `ValueError` naming both shapes.
# - `.weight` is an `nn.Parameter` holding a **copy** of this rank's rows; `.bias` this rank's slice of
#   the bias, **zero**-initialised (`None` when `bias=False`: `self.register_parameter("bias", None)`).
# - `forward(x)` sends `x` through `copy_to_tp_region` (else `dL/dx` is wrong: section 4) and returns a
#   plain tensor: the full output with `gather_output=True`, this rank's slice otherwise.

# %% nbgrader={"grade": false, "grade_id": "sol_column_layer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def full_weight(master_weight, out_features, in_features):
    """The full (out_features, in_features) weight every rank starts from."""
    if out_features < 1 or in_features < 1:
        raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
    if master_weight is None:
        # The same seed on every rank gives the same matrix everywhere; each rank keeps its shard.
        gen = torch.Generator().manual_seed(0)
        bound = 1.0 / math.sqrt(in_features)
        return (torch.rand(out_features, in_features, generator=gen) * 2 - 1) * bound
    ### BEGIN SOLUTION
    expected = (out_features, in_features)
    if tuple(master_weight.shape) != expected:
        raise ValueError(f"master_weight must have shape (out_features, in_features) = {expected}, "
                         f"got {tuple(master_weight.shape)}")
    return master_weight.detach()
    ### END SOLUTION


class ColumnParallelLinear(nn.Module):
    """y = x @ W.T + b with the rows of W (the output features) split over the ranks of `group`."""

    def __init__(self, in_features, out_features, bias=True, master_weight=None, *,
                 gather_output=True, group=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.group = gather_output, group
        ### BEGIN SOLUTION
        rank, world_size = tp_rank_and_size(group)
        weight = full_weight(master_weight, out_features, in_features)
        start, stop = shard_range(out_features, rank, world_size)
        self.weight = nn.Parameter(weight[start:stop].clone())
        if bias:
            self.bias = nn.Parameter(torch.zeros(stop - start, dtype=weight.dtype, device=weight.device))
        else:
            self.register_parameter("bias", None)
        ### END SOLUTION

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected an input of shape (..., {self.in_features}), got {tuple(x.shape)}")
        ### BEGIN SOLUTION
        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)
        if self.gather_output:
            return gather_from_tp_region(y, self.out_features, self.group)
        return y
        ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_column_shards", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks, ColumnParallelLinear(4, 6): .weight holds 3 rows of master_weight, .bias 3 zeros
from assignments.tp_torch import checks as check
check.column_shards(ColumnParallelLinear)

# %% nbgrader={"grade": true, "grade_id": "test_column_forward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: output equals the dense F.linear(x, W, b), full or (gather_output=False) local
from assignments.tp_torch import checks as check
check.column_forward(ColumnParallelLinear)

# %% nbgrader={"grade": true, "grade_id": "test_column_backward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: x.grad, .weight.grad and .bias.grad equal the dense layer's (or their rows)
from assignments.tp_torch import checks as check
check.column_backward(ColumnParallelLinear)

# %%
tpgrade.selfcheck.run("sol_column_layer")


# %% [markdown]
# ## Exercise 3: `RowParallelLinear` (`sol_row_layer`)
#
# ```
#   x_0 (..., in_0)          x_1 (..., in_1)    this rank's slice of x
#         │                        │            (input_is_parallel=True; with
#         │                        │            False the full x comes in and
#         │                        │            scatter_to_tp_region keeps it)
#    x_0 @ W_0.T              x_1 @ W_1.T       W_r = columns of W: (out, in_r);
#   (..., out) partial       (..., out) partial NO bias here
#         └─ g: reduce_from_tp_region ─┘        all-reduce forward,
#                       │                       identity backward
#                  + b  (full, once)            the same b on every rank,
#                       │                       AFTER the sum
#                  y (..., out)                 on every rank
# ```
#
# - `.weight` is an `nn.Parameter` holding a copy of this rank's **columns** of the full weight,
#   `(out_features, in_r)`; `.bias` is the **full** bias `(out_features,)`, zero-initialised.
# - Add the bias after `reduce_from_tp_region`: added before the sum, it would be counted `p` times.
# - `forward(x)` takes this rank's slice of the input (width `in_r`), or the full input (width
#   `in_features`) when `input_is_parallel=False`, and returns the full output on every rank.

# %% nbgrader={"grade": false, "grade_id": "sol_row_layer", "locked": false, "schema_version": 3, "solution": true, "task": false}
class RowParallelLinear(nn.Module):
    """y = x @ W.T + b with the columns of W (the input features) split over the ranks of `group`."""

    def __init__(self, in_features, out_features, bias=True, master_weight=None, *,
                 input_is_parallel=True, group=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.group = input_is_parallel, group
        ### BEGIN SOLUTION
        rank, world_size = tp_rank_and_size(group)
        weight = full_weight(master_weight, out_features, in_features)
        start, stop = shard_range(in_features, rank, world_size)
        self.weight = nn.Parameter(weight[:, start:stop].clone())
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=weight.device))
        else:
            self.register_parameter("bias", None)
        ### END SOLUTION

    def forward(self, x):
        ### BEGIN SOLUTION
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


# %% nbgrader={"grade": true, "grade_id": "test_row_shards", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks, RowParallelLinear(6, 4): .weight holds 3 columns of master_weight, .bias 4 zeros
from assignments.tp_torch import checks as check
check.row_shards(RowParallelLinear)

# %% nbgrader={"grade": true, "grade_id": "test_row_forward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: output equals the dense F.linear(x, W, b), from the input slice or the full input
from assignments.tp_torch import checks as check
check.row_forward(RowParallelLinear)

# %% nbgrader={"grade": true, "grade_id": "test_row_backward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: the input slice's, .weight's and .bias's gradients equal the dense layer's
from assignments.tp_torch import checks as check
check.row_backward(RowParallelLinear)

# %%
tpgrade.selfcheck.run("sol_row_layer")


# %% [markdown]
# ## Exercise 4: `ParallelMLP` (`sol_parallel_mlp`)
#
# Megatron's MLP block: the first linear layer column-parallel **without** gathering, the activation
# applied to each rank's slice of the hidden layer, the second linear layer row-parallel on that slice.
#
# ```
# x (..., h) ─ f ─► fc1: column-parallel, rows of W1  ─► (..., ffn_r) on rank r
#                        │
#                        ▼
#                   activation, elementwise on the rank's ffn_r units
#                        │
#                        ▼
#                   fc2: row-parallel, columns of W2  ─► partial (..., h)
#                        │
#                        ▼
#                   g ─► + b2 ─► y (..., h)
#
# collectives, forward:   f: none             g: ONE all-reduce
# collectives, backward:  f: ONE all-reduce   g: none
# (and no all-gather anywhere)
# ```
#
# This works because the activation is **elementwise**: rank `r` holds whole hidden units (columns
# `ffn_r` of the hidden layer), applies the activation to them, and multiplies by exactly the columns
# of `W2` that read those units. Something that mixes hidden units (a softmax or a norm over `ffn`)
# would need the full hidden vector, and a gather.
#
# - `ParallelMLP(hidden, ffn_hidden, bias=True, w1=None, w2=None, *, activation=F.gelu, group=None)`:
#   `w1` is the full first weight `(ffn_hidden, hidden)`, `w2` the full second weight
#   `(hidden, ffn_hidden)`. Store the layers as **`self.fc1`** (`ColumnParallelLinear`,
#   `gather_output=False`) and **`self.fc2`** (`RowParallelLinear`, `input_is_parallel=True`), both on
#   `group`; the graders read them by these names.
# - The default activation is `F.gelu` (Megatron's choice; the numpy exercise used relu, any
#   elementwise function works the same way).

# %% nbgrader={"grade": false, "grade_id": "sol_parallel_mlp", "locked": false, "schema_version": 3, "solution": true, "task": false}
class ParallelMLP(nn.Module):
    """fc2(activation(fc1(x))): fc1 column-parallel (no gather), fc2 row-parallel (sliced input)."""

    def __init__(self, hidden, ffn_hidden, bias=True, w1=None, w2=None, *,
                 activation=F.gelu, group=None):
        super().__init__()
        self.activation = activation
        ### BEGIN SOLUTION
        self.fc1 = ColumnParallelLinear(hidden, ffn_hidden, bias, w1, gather_output=False, group=group)
        self.fc2 = RowParallelLinear(ffn_hidden, hidden, bias, w2, input_is_parallel=True, group=group)
        ### END SOLUTION

    def forward(self, x):
        ### BEGIN SOLUTION
        return self.fc2(self.activation(self.fc1(x)))
        ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_mlp_forward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: ParallelMLP(4, 6) equals the dense gelu MLP
from assignments.tp_torch import checks as check
check.mlp_forward(ParallelMLP)

# %% nbgrader={"grade": true, "grade_id": "test_mlp_backward", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# 2 ranks: dL/dx, fc1.weight.grad and fc2.weight.grad equal the dense MLP's
from assignments.tp_torch import checks as check
check.mlp_backward(ParallelMLP)

# %%
tpgrade.selfcheck.run("sol_parallel_mlp")

# %% [markdown]
# ### Errors that say what is wrong
#
# Building a layer with no process group must fail with a message that says so (not an obscure error
# later on), and a `master_weight` of the wrong shape is a `ValueError` naming the expected and the
# actual shape.

# %% nbgrader={"grade": true, "grade_id": "test_errors_no_process_group", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# no process group in the notebook: both layers raise an error that says so
from assignments.tp_torch import checks as check
check.errors_no_process_group(ColumnParallelLinear, RowParallelLinear)

# %% nbgrader={"grade": true, "grade_id": "test_errors_master_weight", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
# a master_weight of the wrong shape: ValueError naming the expected and actual shapes
from assignments.tp_torch import checks as check
check.errors_master_weight(ColumnParallelLinear, RowParallelLinear)


# %% [markdown]
# ## Try it yourself
#
# The cell below runs your three layers on 2 ranks and on 3 ranks (uneven: 11 outputs over 3 ranks are
# 4 + 4 + 3, 7 inputs are 3 + 2 + 2) and compares every rank with dense torch: the output, and the
# gradients of the input, the weight shards and the bias. Every entry should be about `1e-5` or less
# (float32). Change the sizes, the world size or the seed and run it again; add `print(...)` calls
# inside `try_my_layers` to see what each rank holds.

# %%
def _err(mine, dense):
    if mine is None:
        return "None (no gradient)"
    if mine.shape != dense.shape:
        return f"shape {tuple(mine.shape)}, expected {tuple(dense.shape)}"
    return (mine - dense).abs().max().item()


def compare(layer, dense, x, x_index, params):
    """|difference| between `layer` on this rank and the `dense` function: the output, and the
    gradients of one random loss for the input and for each (name, my param, full tensor, index)."""
    x_dense = x.clone().requires_grad_()
    fulls = [full.clone().requires_grad_() for _, _, full, _ in params]
    y_dense = dense(x_dense, *fulls)
    upstream = torch.randn(y_dense.shape, generator=torch.Generator().manual_seed(1))
    (y_dense * upstream).sum().backward()
    x_mine = x[x_index].clone().requires_grad_()
    y = layer(x_mine)
    errors = {"output": _err(y, y_dense)}
    if isinstance(errors["output"], float):
        (y * upstream).sum().backward()
        errors["dL/dx"] = _err(x_mine.grad, x_dense.grad[x_index])
        for (name, mine, _, index), full in zip(params, fulls):
            errors[f"dL/d{name}"] = _err(mine.grad, full.grad[index])
    return errors


def try_my_layers(seed=0, hidden=7, ffn=11):
    torch.manual_seed(seed)   # the same x and weights on every rank: TP ranks see the same data
    rank, p = dist.get_rank(), dist.get_world_size()
    x, h = torch.randn(2, 3, hidden), torch.randn(2, 3, ffn)
    w1, b1, w2, b2 = torch.randn(ffn, hidden), torch.randn(ffn), torch.randn(hidden, ffn), torch.randn(hidden)
    mine = slice(*shard_range(ffn, rank, p))          # this rank's share of ffn
    col = ColumnParallelLinear(hidden, ffn, master_weight=w1)
    row = RowParallelLinear(ffn, hidden, master_weight=w2)
    mlp = ParallelMLP(hidden, ffn, w1=w1, w2=w2)
    with torch.no_grad():
        for layer in (col, mlp.fc1):
            layer.bias.copy_(b1[mine])
        for layer in (row, mlp.fc2):
            layer.bias.copy_(b2)
    dense_mlp = lambda a, W1, B1, W2, B2: F.linear(F.gelu(F.linear(a, W1, B1)), W2, B2)
    return {
        "column": compare(col, F.linear, x, ..., [("W", col.weight, w1, mine), ("b", col.bias, b1, mine)]),
        "row": compare(row, F.linear, h, (..., mine),
                       [("W", row.weight, w2, (slice(None), mine)), ("b", row.bias, b2, ...)]),
        "mlp": compare(mlp, dense_mlp, x, ...,
                       [("W1", mlp.fc1.weight, w1, mine), ("b1", mlp.fc1.bias, b1, mine),
                        ("W2", mlp.fc2.weight, w2, (slice(None), mine)), ("b2", mlp.fc2.bias, b2, ...)]),
    }


for world_size in (2, 3):
    per_rank = run_on_ranks(try_my_layers, world_size)
    print(f"world size {world_size}: largest |difference| from dense torch over all ranks")
    for name, errors in per_rank[0].items():
        cells = []
        for key in errors:
            values = [r[name][key] for r in per_rank]
            problems = [f"rank {i}: {v}" for i, v in enumerate(values) if isinstance(v, str)]
            cells.append(f"{key} {problems[0] if problems else f'{max(values):.1e}'}")
        print(f"  {name:7s}" + "  ".join(cells))


# %% [markdown]
# ### Communication against computation
#
# The seeds' exercise: how long does the matmul take against the all-reduce that follows it? The cell
# times a row-parallel layer's two halves on 2 CPU ranks. On CPU with gloo the all-reduce goes through
# local TCP and is slow compared with the link between GPUs of one node (NVLink: hundreds of GB/s),
# so do not read these numbers as GPU numbers; the gpu_runner measures the same split per world size on
# real GPUs and reports it with your grade.

# %%
def compute_vs_communication(batch=256, n=1024, repeats=10):
    import time
    p = dist.get_world_size()
    x_r, w_r = torch.randn(batch, n // p), torch.randn(n, n // p)   # a row layer's input and weight shards
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        partial = x_r @ w_r.T                                          # (batch, n) partial sums
    middle = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(partial)
    end = time.perf_counter()
    return (middle - start) / repeats * 1e3, (end - middle) / repeats * 1e3

for rank, (compute_ms, comm_ms) in enumerate(run_on_ranks(compute_vs_communication, 2)):
    print(f"rank {rank}: matmul {compute_ms:.2f} ms, all-reduce of the (256, 1024) partial output "
          f"{comm_ms:.2f} ms ({comm_ms / (compute_ms + comm_ms):.0%} of the layer)")

# %% [markdown]
# ## Pitfalls (each one is a test of the gpu_runner)
#
# 1. **Returning the local shard.** A column layer with `gather_output=True` returns `(..., out)`,
#    not `(..., out_r)`.
# 2. **A collective autograd cannot see.** Calling `dist.all_reduce` / `dist.all_gather` on the
#    activations directly gives the right forward and a wrong backward (and `all_reduce` overwrites a
#    tensor autograd may have saved). Wrap collectives in `autograd.Function`s, as in Exercise 1.
# 3. **Forgetting f.** Without `copy_to_tp_region` the column layer's weight gradients are right but
#    `dL/dx` holds only this rank's term. Checking the forward pass, or the weight gradients alone,
#    does not catch it.
# 4. **The bias on every rank** in the row layer: the all-reduce sums it `p` times. Add it once, after
#    the reduce, on every rank. Adding it on rank 0 only, before the reduce, gives the same output
#    but is not an equal choice when training: the other ranks' copies of the bias are not in the
#    graph, so their gradient is zero (or None) and they drift away from rank 0's
#    (`gpu_row_backward` checks the bias gradient on every rank). vLLM does it that way because
#    inference has no backward.
# 5. **An all-reduce after the column layer** instead of a gather: it sums the slices (wrong shape and
#    values); in the MLP it is a second all-reduce that the column-then-row design exists to avoid.
# 6. **Uneven shards without padding.** `all_gather` of shards of different widths raises on gloo;
#    NCCL turns it into one broadcast per rank (and the gpu_runner refuses it there as gloo does);
#    `torch.chunk(W, p)` or `W.split(out // p)` gives the wrong number or sizes of shards when `p`
#    does not divide `out`.
# 7. **The wrong rank.** With `group=g`, the shard index is `dist.get_rank(g)`, not the global rank.
# 8. **Different data on different ranks.** TP ranks must see the same `x` (same seed, or a
#    broadcast); with a different `x` per rank the sums mix unrelated rows.
# 9. **Deadlocks.** A collective under `if rank == 0:` (or inside a branch that depends on the data
#    of one rank) hangs the ranks that called it.
# 10. **Tensors on the wrong device or dtype** (section 4, *Devices and dtypes*): a tensor made
#     without `device=`/`dtype=`, a collective on a CPU copy, a plain tensor attribute.
# 11. **The whole layer on every rank.** Computing `x @ master_weight.T` on every rank and keeping
#     a slice gives the right numbers only when every rank holds the same `master_weight`. The
#     gpu_runner gives each rank its own: the real weight inside its shard, noise outside it.

# %% [markdown]
# ## Where this lives in real engines
#
# | this notebook | Megatron-LM `megatron/core/tensor_parallel/` | vLLM |
# |---|---|---|
# | `ColumnParallelLinear(gather_output=...)` | `layers.py` `ColumnParallelLinear(gather_output=...)` | `model_executor/layers/linear.py` `ColumnParallelLinear(gather_output=...)`; `MergedColumnParallelLinear` (gate and up projections in one), `QKVParallelLinear` |
# | `RowParallelLinear(input_is_parallel=...)` | `layers.py` `RowParallelLinear(input_is_parallel=...)`, bias added after the reduce | `RowParallelLinear(input_is_parallel=..., reduce_results=...)`, bias added by rank 0 only, before the reduce (inference: no bias gradient needed) |
# | `copy_to_tp_region` (f) | `mappings.py` `_CopyToModelParallelRegion` | not needed: inference has no backward |
# | `reduce_from_tp_region` (g) | `mappings.py` `_ReduceFromModelParallelRegion` | `distributed/communication_op.py` `tensor_model_parallel_all_reduce` |
# | `gather_from_tp_region` | `mappings.py` `_GatherFromModelParallelRegion` | `tensor_model_parallel_all_gather` |
# | `scatter_to_tp_region` | `mappings.py` `_ScatterToModelParallelRegion` | `split_tensor_along_last_dim` in `RowParallelLinear` when the input is not parallel |
# | `ParallelMLP` (`fc1`, `fc2`) | legacy `ParallelMLP` (`dense_h_to_4h`, `dense_4h_to_h`); `transformer/mlp.py` `MLP` (`linear_fc1`, `linear_fc2`) | each model's MLP, e.g. `LlamaMLP` (`gate_up_proj`, `down_proj`) |
# | `full_weight` with a fixed seed | `_initialize_affine_weight_cpu`: same master weight everywhere, keep own split | weights are loaded, each `weight_loader` narrows the checkpoint tensor to the rank's shard |
# | `shard_range` (uneven) | `divide()` asserts `out % p == 0` | sizes must divide too |
# | `run_on_ranks` | `torchrun` + `parallel_state.initialize_model_parallel` | `MultiprocExecutor` workers, `parallel_state` |
#
# Attention follows the same pattern: the Q, K, V projections are column-parallel (each rank owns
# whole heads), the output projection is row-parallel, and a transformer layer needs two all-reduces
# in forward (attention and MLP) and two in backward.

# %% [markdown]
# ## Graded on real ranks (gpu_runner)
#
# The cells below are scored by the gpu_runner, not by running this notebook: it extracts your solution
# cells into a module, launches them once with `torchrun` and runs every check on world sizes 1, 2, 3
# and 4 (sub-groups of the launched world, so your `group=` argument is exercised), with NCCL and one
# GPU per rank where there are 4 GPUs and gloo on CPU otherwise: the same checks and points on every
# machine. Each rank gets its own `master_weight` (the real weight inside its shard, noise outside
# it), and the device rules of section 4 are checked with a float64 run on the `meta` default device. A cell's score is its points
# times the fraction of its checks that pass; the reasons are in your feedback. A submission that
# deadlocks, crashes or never returns is stopped after a bounded time and scores 0 on the checks it
# broke. `gpu_runner/README.md` lists every check. The self-check cells
# above run this notebook's own tests, not these: the same layers on 2 ranks, a smaller
# sample of what the gpu_runner checks.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_column_shards", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `ColumnParallelLinear` shards (`gpu_column_shards`, 2 points, graded on real ranks)
#
# On every rank and world size: `.weight` is this rank's rows of `master_weight` (balanced split, uneven sizes and empty shards included), `.bias` this rank's slice, zero-initialised; `bias=False` gives no bias.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_column_forward", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": true}
# ### `ColumnParallelLinear` forward (`gpu_column_forward`, 3 points, graded on real ranks)
#
# The output equals a dense `nn.Linear` with the same weight and bias on every rank: the full output with `gather_output=True`, this rank's slice with `gather_output=False`; 1-D, 2-D and 3-D inputs, uneven `out_features`; and moved with `.to(torch.float64)`, on a float64 input with `meta` as the default device, a float64 output on the input's device (no tensor created without `device=`/`dtype=`, no plain tensor attribute).

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_column_backward", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": true}
# ### `ColumnParallelLinear` backward (`gpu_column_backward`, 3 points, graded on real ranks)
#
# The weight and bias gradients equal the matching slices of the dense layer's gradients, and the input gradient equals the dense one on every rank (in the float64 run too: float64, to float64 precision).

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_row_shards", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `RowParallelLinear` shards (`gpu_row_shards`, 2 points, graded on real ranks)
#
# `.weight` is this rank's columns of `master_weight` (balanced split), `.bias` the full bias, zero-initialised.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_row_forward", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": true}
# ### `RowParallelLinear` forward (`gpu_row_forward`, 3 points, graded on real ranks)
#
# The full output equals the dense layer on every rank, with `input_is_parallel=True` (this rank's input slice) and `False` (the full input); the bias counted once; uneven `in_features`; the float64 run's output float64 on the input's device.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_row_backward", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": true}
# ### `RowParallelLinear` backward (`gpu_row_backward`, 3 points, graded on real ranks)
#
# The weight gradient equals the dense one's matching columns, the bias gradient the dense one on every rank, and the input gradient the dense one (its slice when the input is parallel; the full input's in the float64 run).

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_mlp_forward", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `ParallelMLP` forward (`gpu_mlp_forward`, 2 points, graded on real ranks)
#
# The output equals the dense MLP `fc2(gelu(fc1(x)))` on every rank, uneven `ffn_hidden` included; the float64 run's output float64 on the input's device.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_mlp_backward", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": true}
# ### `ParallelMLP` backward (`gpu_mlp_backward`, 2 points, graded on real ranks)
#
# The gradients of `fc1`/`fc2` weights and biases and of the input equal the dense MLP's matching slices (the input's in the float64 run too).

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_collective_counts", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": true}
# ### How many collectives (`gpu_collective_counts`, 3 points, graded on real ranks)
#
# Counted below the Python API, so calls cannot hide: the column layer makes one all-gather per forward (none with `gather_output=False`) and one all-reduce per backward; the row layer one all-reduce per forward; the MLP exactly one all-reduce in forward, one in backward, and no all-gather.

# %% [markdown] nbgrader={"grade": false, "grade_id": "gpu_errors", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": true}
# ### Errors (`gpu_errors`, 1 point, graded on real ranks)
#
# With no process group, building a layer raises an error that says so; a `master_weight` of the wrong shape raises `ValueError` naming the expected and actual shapes.
