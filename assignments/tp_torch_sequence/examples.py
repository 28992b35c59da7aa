"""Example submissions for `tp_torch_sequence` (tests, demo): sequence parallelism and the
vocabulary split with torch.distributed.

Each student is a `tpcourse.submissions.Submission` whose answers replace solution cells of the
tp_torch_sequence notebook; `loses` names the gpu_* task cells (scored by the gpu_runner) that
must come out below their maximum, and `NOTEBOOK_LOSES` the notebook's own test cells that must
fail (both exact: every other cell keeps full marks).

Every student keeps the instructor's `sol_tp_torch` cell (the pasted tp_torch layers). The
wrong ones are edits of the catalogue's own reference (`MEGATRON`, Megatron-flavoured: tensor
collectives on padded buffers, `masked_input` + `F.embedding` with the mask applied in the
graph, a flattened cross-entropy Function), so they do not depend on how the instructor's
solution in source/tp_torch_sequence is written; `tseq_reference` is that solution itself.
"""
from __future__ import annotations

from tpcourse.submissions import Submission, edited

ASSIGNMENT = NOTEBOOK = "tp_torch_sequence"
SOLUTION_IDS = ("sol_tp_torch", "sol_sequence_mappings", "sol_layer_sp", "sol_vocab_embedding",
                "sol_vocab_cross_entropy")
GPU_CELLS = {
    "gpu_sp_mappings": 3, "gpu_sp_forward": 2, "gpu_sp_backward": 3,
    "gpu_embedding_forward": 2, "gpu_embedding_backward": 2, "gpu_embedding_errors": 1,
    "gpu_ce_forward": 2, "gpu_ce_backward": 2, "gpu_ce_stable": 2, "gpu_sp_collectives": 3,
}

# ---------------------------------------------------------------------------------------------
# The catalogue's reference implementation, one string per solution cell.
MAPPINGS = '''
def _lengths(n, group):
    """(this rank, every rank's number of rows of n): the balanced split."""
    rank, p = tp_rank_and_size(group)
    return rank, [b - a for a, b in (shard_range(n, r, p) for r in range(p))]


def _all_gather_first_dim(t, seq_len, group):
    rank, lengths = _lengths(seq_len, group)
    if t.shape[0] != lengths[rank]:
        raise ValueError(f"{t.shape[0]} tokens on rank {rank}, expected {lengths[rank]}")
    longest = max(lengths)
    padded = t.new_zeros(longest, *t.shape[1:])
    padded[:t.shape[0]] = t
    out = t.new_empty(longest * len(lengths), *t.shape[1:])
    dist.all_gather_single(out, padded, group=group)            # one buffer, rank-major
    return torch.cat([out[r * longest:r * longest + n] for r, n in enumerate(lengths)])


def _reduce_scatter_first_dim(t, group):
    rank, lengths = _lengths(t.shape[0], group)
    longest = max(lengths)
    stacked = t.new_zeros(longest * len(lengths), *t.shape[1:])
    start = 0
    for r, n in enumerate(lengths):                              # slot r: rank r's rows, padded
        stacked[r * longest:r * longest + n] = t[start:start + n]
        start += n
    out = t.new_empty(longest, *t.shape[1:])
    dist.reduce_scatter_single(out, stacked, group=group)
    return out[:lengths[rank]]


def _own_rows(t, group):
    rank, p = tp_rank_and_size(group)
    a, b = shard_range(t.shape[0], rank, p)
    return t[a:b].clone()


class _GatherFromSP(torch.autograd.Function):         # all-gather fwd, reduce-scatter bwd
    @staticmethod
    def forward(ctx, x, seq_len, group):
        ctx.group = group
        return _all_gather_first_dim(x.contiguous(), seq_len, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_first_dim(grad.contiguous(), ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):    # reduce-scatter fwd, all-gather bwd
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[0]
        return _reduce_scatter_first_dim(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first_dim(grad.contiguous(), ctx.n, ctx.group), None


class _ScatterToSP(torch.autograd.Function):          # own rows fwd, all-gather bwd
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[0]
        return _own_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first_dim(grad.contiguous(), ctx.n, ctx.group), None


def gather_from_sequence_parallel_region(x, seq_len, group=None):
    return _GatherFromSP.apply(x, seq_len, group)


def reduce_scatter_to_sequence_parallel_region(x, group=None):
    return _ReduceScatterToSP.apply(x, group)


def scatter_to_sequence_parallel_region(x, group=None):
    return _ScatterToSP.apply(x, group)
'''

LAYER_SP = '''
class LayerSP(nn.Module):
    def __init__(self, hidden, ffn_hidden, bias=True, w1=None, w2=None, *, activation=F.gelu,
                 eps=1e-5, group=None):
        super().__init__()
        self.activation, self.group = activation, group
        self.ln = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = ColumnParallelLinear(hidden, ffn_hidden, bias, w1, gather_output=False,
                                        group=group)
        self.fc2 = RowParallelLinear(ffn_hidden, hidden, bias, w2, input_is_parallel=True,
                                     group=group)

    def forward(self, x, seq_len):
        u = self.ln(x)
        u = gather_from_sequence_parallel_region(u, seq_len, self.group)
        h = self.activation(F.linear(u, self.fc1.weight, self.fc1.bias))
        z = reduce_scatter_to_sequence_parallel_region(F.linear(h, self.fc2.weight), self.group)
        if self.fc2.bias is not None:
            z = z + self.fc2.bias
        return x + z
'''

EMBEDDING = '''
class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings, embedding_dim, master_weight=None, *, group=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        rank, p = tp_rank_and_size(group)
        self.vocab_start_index, self.vocab_end_index = shard_range(num_embeddings, rank, p)
        weight = full_weight(master_weight, num_embeddings, embedding_dim)
        self.weight = nn.Parameter(weight[self.vocab_start_index:self.vocab_end_index].clone())

    def forward(self, input_):
        if input_.is_floating_point() or input_.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got {input_.dtype}")
        if ((input_ < 0) | (input_ >= self.num_embeddings)).any():
            raise ValueError(f"token ids must be in [0, {self.num_embeddings})")
        input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        masked_input = (input_ - self.vocab_start_index).masked_fill(input_mask, 0)
        if self.weight.shape[0] == 0:           # no rows here (V < p): zeros to contribute
            output_parallel = self.weight.new_zeros(*input_.shape, self.embedding_dim)
        else:
            output_parallel = F.embedding(masked_input, self.weight)
            output_parallel = output_parallel.masked_fill(input_mask.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(output_parallel, self.group)
'''

CROSS_ENTROPY = '''
class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, vocab_size, group):
        rank, p = tp_rank_and_size(group)
        vocab_start, vocab_end = shard_range(vocab_size, rank, p)
        partition = vocab_end - vocab_start
        logits_2d = vocab_parallel_logits.reshape(target.numel(), partition)
        logits_max = logits_2d.new_full((logits_2d.shape[0],), float("-inf"))
        if partition:
            logits_max = logits_2d.amax(dim=-1)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits_2d = logits_2d - logits_max.unsqueeze(-1)
        target_1d = target.reshape(-1)
        target_mask = (target_1d < vocab_start) | (target_1d >= vocab_end)
        masked_target = (target_1d - vocab_start).masked_fill(target_mask, 0)
        predicted = logits_2d.new_zeros(logits_2d.shape[0])
        if partition:
            predicted = logits_2d.gather(1, masked_target.unsqueeze(1)).squeeze(1)
            predicted = predicted.masked_fill(target_mask, 0.0)
        dist.all_reduce(predicted, group=group)
        exp_logits = logits_2d.exp()
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp_logits / sum_exp.unsqueeze(-1), target_mask, masked_target)
        ctx.shape = vocab_parallel_logits.shape
        return (sum_exp.log() - predicted).reshape(target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad = softmax.clone()
        if grad.shape[1]:
            rows = torch.arange(grad.shape[0], device=grad.device)
            grad[rows, masked_target] -= (~target_mask).to(grad.dtype)
        grad = grad * grad_output.reshape(-1, 1)
        return grad.reshape(ctx.shape), None, None, None


def vocab_parallel_cross_entropy(logits_shard, target, vocab_size, group=None):
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer ids, got {target.dtype}")
    if ((target < 0) | (target >= vocab_size)).any():
        raise ValueError(f"targets must be in [0, {vocab_size})")
    return _VocabParallelCrossEntropy.apply(logits_shard, target, vocab_size, group)
'''

MEGATRON = {"sol_sequence_mappings": MAPPINGS, "sol_layer_sp": LAYER_SP,
             "sol_vocab_embedding": EMBEDDING, "sol_vocab_cross_entropy": CROSS_ENTROPY}


def _with(**changes):
    """The catalogue reference with some cells' code edited: {cell: [(old, new), ...]}."""
    return edited(MEGATRON, **changes)


NOTEBOOK_LOSES: dict[str, frozenset] = {}


def _student(name, answers, loses, tests, why):
    NOTEBOOK_LOSES[name] = frozenset(tests)
    return Submission(name, ASSIGNMENT, answers={NOTEBOOK: answers} if answers else {},
                      loses=frozenset(loses), why=why)


# ---------------------------------------------------------------------------------------------
# Full marks: the instructor's solution, the catalogue's, and two other valid ways.
VALID = [
    _student("tseq_reference", None, (), (), "the instructor's solution from source/"),
    _student("tseq_megatron", MEGATRON, (), (),
             "the catalogue's Megatron-flavoured solution: tensor collectives on padded "
             "buffers, masked_input + F.embedding, a flattened cross-entropy Function"),
    _student("tseq_ce_with_g", _with(sol_vocab_cross_entropy=[(
        "    return _VocabParallelCrossEntropy.apply(logits_shard, target, vocab_size, group)",
        "    rank, p = tp_rank_and_size(group)\n"
        "    start, stop = shard_range(vocab_size, rank, p)\n"
        "    m = F.pad(logits_shard.detach(), (0, 1), value=float('-inf')).amax(dim=-1)\n"
        "    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)  # a shift: no gradient\n"
        "    shifted = logits_shard - m.unsqueeze(-1)\n"
        "    sum_exp = reduce_from_tp_region(shifted.exp().sum(dim=-1), group)\n"
        "    owned = (target >= start) & (target < stop)\n"
        "    local = (target - start).masked_fill(~owned, 0).unsqueeze(-1)\n"
        "    padded = F.pad(shifted, (0, 1))                 # a column to pick when not owned\n"
        "    picked = padded.gather(-1, local).squeeze(-1) * owned\n"
        "    return sum_exp.log() - reduce_from_tp_region(picked, group)")]), (), (),
        "the cross-entropy from autograd-aware pieces (the max detached, g for the two sums) "
        "instead of a Function"),
    _student("tseq_gather_via_last_dim", _with(sol_sequence_mappings=[(
        "def _all_gather_first_dim(t, seq_len, group):\n",
        "def _all_gather_first_dim(t, seq_len, group):   # tp_torch's gather, on dim 0\n"
        "    rank, lengths = _lengths(seq_len, group)\n"
        "    if t.shape[0] != lengths[rank]:\n"
        "        raise ValueError(f'{t.shape[0]} tokens on rank {rank}')\n"
        "    return _all_gather_last_dim(t.movedim(0, -1), seq_len, group).movedim(-1, 0)\n\n\n"
        "def _unused_gather(t, seq_len, group):\n")]), (), (),
        "the all-gather along the sequence by tp_torch's own _all_gather_last_dim, dim 0 moved "
        "to the end and back"),
]

# Wrong solutions, each losing the cells that name its mistake.
WRONG = [
    _student("tseq_rs_wrong_axis", _with(sol_sequence_mappings=[(
        "def _reduce_scatter_first_dim(t, group):\n",
        "def _reduce_scatter_first_dim(t, group):        # along the last (hidden) dim\n"
        "    return _rs_rows(t.movedim(-1, 0).contiguous(), group).movedim(0, -1)\n\n\n"
        "def _rs_rows(t, group):\n")]),
        ("gpu_sp_mappings", "gpu_sp_forward", "gpu_sp_backward", "gpu_sp_collectives"),
        ("test_sequence_gather", "test_sequence_reduce_scatter", "test_layer_sp_forward",
         "test_layer_sp_backward"),
        "reduce-scatters along the hidden dim instead of the sequence"),
    _student("tseq_layernorm_gathered", _with(sol_layer_sp=[(
        "        u = self.ln(x)\n"
        "        u = gather_from_sequence_parallel_region(u, seq_len, self.group)\n",
        "        u = gather_from_sequence_parallel_region(x, seq_len, self.group)\n"
        "        u = self.ln(u)                             # every token, on every rank\n")]),
        ("gpu_sp_backward",), ("test_layer_sp_backward",),
        "LayerNorm on the gathered sequence: right outputs, every rank's LayerNorm gradient "
        "over all tokens"),
    _student("tseq_sp_f_in_block", _with(sol_layer_sp=[(
        "h = self.activation(F.linear(u, self.fc1.weight, self.fc1.bias))",
        "h = self.activation(self.fc1(u))            # the layer, with its f")]),
        ("gpu_sp_backward", "gpu_sp_collectives"), ("test_layer_sp_backward",),
        "calls its ColumnParallelLinear after the gather: f all-reduces dL/du, the gather's "
        "reduce-scatter sums it again"),
    _student("tseq_sp_allreduce_slice", _with(sol_sequence_mappings=[(
        "def _reduce_scatter_first_dim(t, group):\n",
        "def _reduce_scatter_first_dim(t, group):        # all-reduce, then keep my rows\n"
        "    total = t.clone()\n"
        "    dist.all_reduce(total, group=group)\n"
        "    return _own_rows(total, group)\n\n\n"
        "def _unused_reduce_scatter(t, group):\n")]),
        ("gpu_sp_collectives",), (),
        "an all-reduce and a slice instead of a reduce-scatter: right numbers, twice the data"),
    _student("tseq_sp_no_autograd", _with(sol_sequence_mappings=[
        ("def gather_from_sequence_parallel_region(x, seq_len, group=None):\n"
         "    return _GatherFromSP.apply(x, seq_len, group)",
         "def gather_from_sequence_parallel_region(x, seq_len, group=None):\n"
         "    with torch.no_grad():                # a plain collective: autograd never sees it\n"
         "        return _all_gather_first_dim(x.contiguous(), seq_len, group)"),
        ("def reduce_scatter_to_sequence_parallel_region(x, group=None):\n"
         "    return _ReduceScatterToSP.apply(x, group)",
         "def reduce_scatter_to_sequence_parallel_region(x, group=None):\n"
         "    with torch.no_grad():\n"
         "        return _reduce_scatter_first_dim(x.contiguous(), group)"),
        ("def scatter_to_sequence_parallel_region(x, group=None):\n"
         "    return _ScatterToSP.apply(x, group)",
         "def scatter_to_sequence_parallel_region(x, group=None):\n"
         "    with torch.no_grad():\n"
         "        return _own_rows(x, group)")]),
        ("gpu_sp_mappings", "gpu_sp_backward", "gpu_sp_collectives"),
        ("test_sequence_gather", "test_sequence_reduce_scatter", "test_sequence_scatter",
         "test_layer_sp_backward"),
        "the sequence-parallel mappings as plain collectives (under no_grad), without their "
        "autograd twin: no gradient flows through them"),
    _student("tseq_emb_not_masked", _with(sol_vocab_embedding=[(
        "            output_parallel = output_parallel.masked_fill(input_mask.unsqueeze(-1), 0.0)\n",
        "")], ), ("gpu_embedding_forward", "gpu_embedding_backward"),
        ("test_embedding_forward", "test_embedding_backward"),
        "looks up row 0 for the ids it does not own and never zeros them"),
    _student("tseq_emb_offset_even_split", _with(sol_vocab_embedding=[(
        "        masked_input = (input_ - self.vocab_start_index).masked_fill(input_mask, 0)\n",
        "        offset = dist.get_rank(self.group) * self.weight.shape[0]   # r * V_r\n"
        "        input_mask = (input_ < offset) | (input_ >= offset + self.weight.shape[0])\n"
        "        masked_input = (input_ - offset).masked_fill(input_mask, 0)\n")]),
        ("gpu_embedding_forward", "gpu_embedding_backward"),
        ("test_embedding_forward", "test_embedding_backward"),
        "shifts the ids by r * V_r (Megatron's offset for a padded vocabulary), not by the "
        "rank's real offset: wrong rows whenever the vocabulary splits unevenly"),
    _student("tseq_emb_grad_leak", _with(sol_vocab_embedding=[(
        "            output_parallel = output_parallel.masked_fill(input_mask.unsqueeze(-1), 0.0)\n",
        "            with torch.no_grad():                # zeroed outside the graph\n"
        "                output_parallel[input_mask] = 0.0\n")]),
        ("gpu_embedding_backward",), ("test_embedding_backward",),
        "zeros the foreign ids' lookups under no_grad: right embeddings, their gradient lands "
        "on local row 0"),
    _student("tseq_emb_no_id_check", _with(sol_vocab_embedding=[(
        "        if ((input_ < 0) | (input_ >= self.num_embeddings)).any():\n"
        "            raise ValueError(f\"token ids must be in [0, {self.num_embeddings})\")\n",
        "")]), ("gpu_embedding_errors",), ("test_embedding_bad_ids",),
        "no check of the ids: an id outside [0, V) silently embeds as zeros"),
    _student("tseq_ce_no_max", _with(sol_vocab_cross_entropy=[
        ("        logits_max = logits_2d.new_full((logits_2d.shape[0],), float(\"-inf\"))\n"
         "        if partition:\n"
         "            logits_max = logits_2d.amax(dim=-1)\n"
         "        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)\n"
         "        logits_2d = logits_2d - logits_max.unsqueeze(-1)\n", "")]),
        ("gpu_ce_stable", "gpu_sp_collectives"), ("test_ce_large_logits",),
        "no max subtracted: exp overflows on large logits (and one all-reduce fewer)"),
    _student("tseq_ce_gathers_logits", _with(sol_vocab_cross_entropy=[(
        "    return _VocabParallelCrossEntropy.apply(logits_shard, target, vocab_size, group)",
        "    logits = gather_from_tp_region(logits_shard, vocab_size, group)   # (..., V)\n"
        "    loss = F.cross_entropy(logits.reshape(-1, vocab_size), target.reshape(-1),\n"
        "                           reduction='none')\n"
        "    return loss.reshape(target.shape)")]),
        ("gpu_sp_collectives",), (),
        "gathers the whole logits and computes a dense loss: right numbers, V / p numbers per "
        "token on the wire"),
    _student("tseq_ce_max_in_graph", _with(sol_vocab_cross_entropy=[(
        "    return _VocabParallelCrossEntropy.apply(logits_shard, target, vocab_size, group)",
        "    rank, p = tp_rank_and_size(group)\n"
        "    start, stop = shard_range(vocab_size, rank, p)\n"
        "    m = F.pad(logits_shard, (0, 1), value=float('-inf')).amax(dim=-1)\n"
        "    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)   # autograd cannot see it\n"
        "    shifted = logits_shard - m.unsqueeze(-1)\n"
        "    sum_exp = shifted.exp().sum(dim=-1)\n"
        "    dist.all_reduce(sum_exp, group=group)\n"
        "    owned = (target >= start) & (target < stop)\n"
        "    local = (target - start).masked_fill(~owned, 0).unsqueeze(-1)\n"
        "    picked = F.pad(shifted, (0, 1)).gather(-1, local).squeeze(-1) * owned\n"
        "    dist.all_reduce(picked, group=group)\n"
        "    return sum_exp.log() - picked")]),
        ("gpu_ce_backward", "gpu_ce_stable"), ("test_ce_backward", "test_ce_large_logits"),
        "plain autograd around in-place all-reduces, the max left in the graph: its backward "
        "reads the all-reduced max, and the logits' gradient is wrong (NaN on the ranks that "
        "do not hold the global max)"),
]

REFERENCE = VALID[:1]
UNMODIFIED: list = []
STUDENTS = VALID[1:] + WRONG
ALL = REFERENCE + STUDENTS
BY_NAME = {s.student: s for s in ALL}
DEMO = ("tseq_layernorm_gathered", "tseq_ce_gathers_logits")
