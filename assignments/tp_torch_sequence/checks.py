"""Checks for the tp_torch_sequence notebook: the sequence-parallel mappings, LayerSP (an MLP
block with sequence parallelism), VocabParallelEmbedding and vocab_parallel_cross_entropy, on
2 (or 1) CPU gloo ranks, small shapes, values only (the collectives themselves are counted by
the gpu_runner).

Each public function is one graded test cell (`from assignments.tp_torch_sequence import
checks as check; check.layer_sp_forward(LayerSP)`): it raises an AssertionError whose message names the mistake
and prints nothing when the solution is right. The ranks (module-level functions below, forked
by run_on_ranks: in the student's process under the judge) build the student's layers from
numpy data and send back arrays; every verdict is made here, with tpgrade.verdict, on replies
checked whole first (tpgrade.replies).
"""
from __future__ import annotations

from assignments.tp_torch_sequence import dense as sequence_dense
from tpgrade import _trusted as trusted
from tpgrade import replies, tensors, verdict
from tpgrade._harness import make_checks_read_only
from tpgrade._torch_trusted import (TIMEOUT, as_numpy, backprop, get_rank, no_grad, run_on_ranks,
                                    tensor, torch_check)
from tpgrade.cases import balanced
from tpgrade.verdict import fail

RANKS = 2
SEQ = 5                       # tokens: 3 + 2 over the two ranks
HIDDEN, FFN = 4, 6            # LayerSP(4, 6): 3 hidden units per rank
VOCAB, EMB = 5, 3             # a (5, 3) table: rows 0-2 and 3-4
_NOT_CONNECTED = "the output is not connected to it in autograd"


def _rows(n, rank):
    return sequence_dense.rows(n, rank, RANKS)


def _check(rank, got, want, what, **diagnoses):
    text = verdict.mismatch(got, want, what, **diagnoses)
    if text:
        fail(f"{verdict.where(rank, RANKS)}: {text}")


# -- the sequence-parallel mappings ------------------------------------------------------------
# rows 0-2 on rank 0, rows 3-4 on rank 1 (the balanced split of 5 tokens)
def _x(seed):
    return tensors.f32((SEQ, 2), seed=seed)[0]


def _per_rank(seed):
    """A different (5, 2) array on each rank (the partial sums of a tensor-parallel layer)."""
    return [tensors.f32((SEQ, 2), seed=seed + r)[0] for r in range(RANKS)]


def _mapping(fn, inputs, upstreams, full, what):
    """fn(this rank's input), then the backward of sum(output * this rank's upstream)."""
    rank = get_rank()
    x = tensor(inputs[rank], requires_grad=True)
    y = fn(x, SEQ) if full else fn(x)
    backprop(y, upstreams[rank], what)
    return as_numpy(y), as_numpy(x.grad)


def _run_mapping(fn, inputs, upstreams, full, what):
    reply = replies.ranks(RANKS, replies.tensors(f"{what}'s output", "the input's .grad"))
    return run_on_ranks(_mapping, RANKS, fn, inputs, upstreams, full, what, timeout=TIMEOUT,
                        reply=reply)


_GATHER = "gather_from_sequence_parallel_region"
_REDUCE_SCATTER = "reduce_scatter_to_sequence_parallel_region"
_SCATTER = "scatter_to_sequence_parallel_region"


@torch_check
def sequence_gather(gather_from_sequence_parallel_region):
    """2 ranks, 5 tokens as 3 + 2: the full sequence on every rank; backward: this rank's rows
    of the SUM of every rank's upstream gradient (a reduce-scatter)."""
    x, ups = _x(1), _per_rank(11)
    inputs = [x[_rows(SEQ, r)] for r in range(RANKS)]
    got = _run_mapping(gather_from_sequence_parallel_region, inputs, ups, True, _GATHER)
    for rank, (y, grad) in enumerate(got):
        mine = _rows(SEQ, rank)
        _check(rank, y, x, f"{_GATHER}(x_r, 5)'s output (all 5 tokens, in rank order)",
               shapes=[((mine.stop - mine.start, 2), "only this rank's tokens returned")])
        _check(rank, grad, (ups[0] + ups[1])[mine], "the gradient of this rank's tokens",
               missing=_NOT_CONNECTED, suspects=[(ups[rank][mine], (
                   "only this rank's upstream gradient: the backward of the gather must "
                   "reduce-scatter (sum over ranks, keep this rank's rows), not split"))],
               shapes=[((SEQ, 2), "the whole gradient: reduce-scatter it, keep this rank's rows")])


@torch_check
def sequence_reduce_scatter(reduce_scatter_to_sequence_parallel_region):
    """2 ranks: this rank's rows of the sum of every rank's (5, 2) input; backward: the full
    gradient, all-gathered from every rank's rows."""
    parts, g = _per_rank(21), _x(31)
    ups = [g[_rows(SEQ, r)] for r in range(RANKS)]
    got = _run_mapping(reduce_scatter_to_sequence_parallel_region, parts, ups, False,
                       _REDUCE_SCATTER)
    total = parts[0] + parts[1]
    for rank, (y, grad) in enumerate(got):
        mine = _rows(SEQ, rank)
        _check(rank, y, total[mine], f"{_REDUCE_SCATTER}'s output (this rank's rows of the sum)",
               shapes=[((SEQ, 2), "the whole sum (an all-reduce): keep this rank's rows only"),
                       ((SEQ, 1), "split along the last dim: sequence parallelism splits the "
                                  "sequence, dim 0")])
        _check(rank, grad, g, "the input's gradient (every rank's rows, all-gathered)",
               missing=_NOT_CONNECTED, suspects=[(_only(g, mine), (
                   "only this rank's rows: the backward of the reduce-scatter all-gathers"))])


@torch_check
def sequence_scatter(scatter_to_sequence_parallel_region):
    """2 ranks: this rank's rows of the full (5, 2) input; backward: all-gathered."""
    x, g = _x(41), _x(51)
    ups = [g[_rows(SEQ, r)] for r in range(RANKS)]
    got = _run_mapping(scatter_to_sequence_parallel_region, [x, x], ups, False, _SCATTER)
    for rank, (y, grad) in enumerate(got):
        mine = _rows(SEQ, rank)
        _check(rank, y, x[mine], f"{_SCATTER}'s output (this rank's rows {mine.start}.."
               f"{mine.stop - 1})")
        _check(rank, grad, g, "the input's gradient (every rank's rows, all-gathered)",
               missing=_NOT_CONNECTED, suspects=[(_only(g, mine), (
                   "only this rank's rows: the backward of the scatter all-gathers"))])


def _only(full, rows):
    """`full` with zeros outside `rows`."""
    out = full.astype(trusted.float64) * 0
    out[rows] = full[rows]
    return out


# -- LayerSP -----------------------------------------------------------------------------------
def _sp_case():
    x, w1, b1, w2, b2, g = tensors.f32((SEQ, 2, HIDDEN), (FFN, HIDDEN), (FFN,), (HIDDEN, FFN),
                                       (HIDDEN,), (SEQ, 2, HIDDEN), seed=61)
    ln_w = 1.0 + 0.5 * tensors.f32((HIDDEN,), seed=62)[0]
    ln_b = tensors.f32((HIDDEN,), seed=63)[0]
    return x, ln_w, ln_b, w1, b1, w2, b2, g


def _layer_sp(LayerSP, x, ln_w, ln_b, w1s, b1, w2s, b2, g):
    rank = get_rank()
    units = _rows(FFN, rank)
    layer = LayerSP(HIDDEN, FFN, w1=tensor(w1s[rank]), w2=tensor(w2s[rank]))
    with no_grad():
        for param, value in ((layer.ln.weight, ln_w), (layer.ln.bias, ln_b),
                             (layer.fc1.bias, b1[units]), (layer.fc2.bias, b2)):
            param.copy_(tensor(value))
    mine = _rows(SEQ, rank)
    x_r = tensor(x[mine], requires_grad=True)
    y = layer(x_r, SEQ)
    backprop(y, g[mine], f"LayerSP({HIDDEN}, {FFN})(x_r, {SEQ})")
    return [as_numpy(t) for t in (y, x_r.grad, layer.fc1.weight.grad, layer.fc2.weight.grad,
                                  layer.ln.weight.grad, layer.ln.bias.grad)]


_SP_REPLY = replies.ranks(RANKS, replies.tensors(
    "the output", "x_r.grad", "fc1.weight.grad", "fc2.weight.grad", "ln.weight.grad",
    "ln.bias.grad"))


def _sp_run(LayerSP):
    x, ln_w, ln_b, w1, b1, w2, b2, g = case = _sp_case()
    masters = ([tensors.noisy_master(w1, *balanced(FFN, RANKS)[r], 0, 701 + r)
                for r in range(RANKS)],
               [tensors.noisy_master(w2, *balanced(FFN, RANKS)[r], 1, 711 + r)
                for r in range(RANKS)])
    got = run_on_ranks(_layer_sp, RANKS, LayerSP, x, ln_w, ln_b, masters[0], b1, masters[1], b2,
                       g, timeout=TIMEOUT, reply=_SP_REPLY)
    return got, case, sequence_dense.sp_block(x, ln_w, ln_b, w1, b1, w2, b2, g)


@torch_check
def layer_sp_forward(LayerSP):
    """2 ranks, x (5, 2, 4) as 3 + 2 tokens: each rank's output is its tokens of the dense
    block x + MLP(LayerNorm(x))."""
    per_rank, (*_, b2, _), dense = _sp_run(LayerSP)
    for rank, (y, *_) in enumerate(per_rank):
        mine = _rows(SEQ, rank)
        _check(rank, y, dense["y"][mine], f"LayerSP's output (this rank's tokens {mine.start}.."
               f"{mine.stop - 1} of the dense block)",
               shapes=[((SEQ, 2, HIDDEN), "every token returned: the block ends with a "
                                          "reduce-scatter, each rank keeps its own tokens")],
               suspects=[(dense["y"][mine] + (RANKS - 1) * b2,
                          "fc2's bias counted on every rank before the reduce-scatter: add it "
                          "once, to the scattered output")])


@torch_check
def layer_sp_backward(LayerSP):
    """2 ranks: dL/dx of this rank's tokens, fc1's rows and fc2's columns of the dense weight
    gradients, and the LayerNorm gradients over this rank's own tokens."""
    per_rank, (x, ln_w, ln_b, w1, *_), dense = _sp_run(LayerSP)
    for rank, (_, gx, gw1, gw2, gln_w, gln_b) in enumerate(per_rank):
        mine, units = _rows(SEQ, rank), _rows(FFN, rank)
        _check(rank, gx, dense["dx"][mine], "dL/dx of this rank's tokens", missing=_NOT_CONNECTED,
               suspects=[(sequence_dense.mlp_input_grad_twice(dense, mine, RANKS), (
                   "the MLP's part of dL/dx counted 2 times: fc1 was called as a layer after the "
                   "gather, so its f (copy_to_tp_region) all-reduces what the gather's "
                   "reduce-scatter sums again; use F.linear with fc1's weight"))])
        _check(rank, gw1, dense["dw1"][units], "fc1.weight.grad (its rows of the dense W1 "
               "gradient)", missing=_NOT_CONNECTED)
        _check(rank, gw2, dense["dw2"][:, units], "fc2.weight.grad (its columns of the dense W2 "
               "gradient)", missing=_NOT_CONNECTED)
        own = sequence_dense.own_token_grads(dense, mine)
        gathered = sequence_dense.layer_norm_grads_gathered(dense, w1, units)
        for got, want, wrong, name in ((gln_w, own["ln_w"], gathered[0], "ln.weight.grad"),
                                       (gln_b, own["ln_b"], gathered[1], "ln.bias.grad")):
            _check(rank, got, want, f"{name} (the dense LayerNorm gradient over this rank's "
                   f"tokens only)", missing=_NOT_CONNECTED,
                   suspects=[(wrong, sequence_dense.LAYERNORM_GATHERED)])



# -- VocabParallelEmbedding ----------------------------------------------------------------------
def _emb_case():
    table, g = tensors.f32((VOCAB, EMB), (2, 4, EMB), seed=81)
    ids = trusted.asarray([[4, 0, 3, 2], [1, 4, 0, 0]])       # both ranks own some; repeats
    return table, ids, g


def _emb_masters(table):
    return [tensors.noisy_master(table, *balanced(VOCAB, RANKS)[r], 0, 801 + r)
            for r in range(RANKS)]


def _embedding(VocabParallelEmbedding, masters, ids, g):
    rank = get_rank()
    emb = VocabParallelEmbedding(VOCAB, EMB, master_weight=tensor(masters[rank]))
    y = emb(tensor(ids))
    backprop(y, g, f"VocabParallelEmbedding({VOCAB}, {EMB})")
    return as_numpy(emb.weight), as_numpy(y), as_numpy(emb.weight.grad)


_EMB_REPLY = replies.ranks(RANKS, replies.tensors(".weight", "the embeddings", ".weight.grad"))


def _emb_run(VocabParallelEmbedding):
    table, ids, g = _emb_case()
    per_rank = run_on_ranks(_embedding, RANKS, VocabParallelEmbedding, _emb_masters(table),
                            ids, g, timeout=TIMEOUT, reply=_EMB_REPLY)
    return per_rank, (table, ids, g)


@torch_check
def embedding_forward(VocabParallelEmbedding):
    """2 ranks, a (5, 3) table as rows 0-2 and 3-4: .weight holds this rank's rows, and the
    output equals table[token_ids] on every rank."""
    per_rank, (table, ids, g) = _emb_run(VocabParallelEmbedding)
    dense, _ = sequence_dense.embedding(table, ids, g)
    for rank, (weight, y, _) in enumerate(per_rank):
        mine = _rows(VOCAB, rank)
        _check(rank, weight, table[mine], f".weight (rows {mine.start}..{mine.stop - 1} of "
               f"master_weight)", shapes=[(table.shape, "the whole table: keep this rank's "
                                                        "rows only")])
        _check(rank, y, dense, "the embeddings (table[token_ids])", suspects=[
            (sequence_dense.embedding_unmasked(table, ids, RANKS), sequence_dense.EMB_NOT_MASKED)])



@torch_check
def embedding_backward(VocabParallelEmbedding):
    """2 ranks: .weight.grad is this rank's rows of the dense table gradient (the upstream
    gradients of the tokens it owns, summed per row; zero for the rows no token uses)."""
    per_rank, (table, ids, g) = _emb_run(VocabParallelEmbedding)
    _, grad = sequence_dense.embedding(table, ids, g)
    for rank, (*_, got) in enumerate(per_rank):
        mine = _rows(VOCAB, rank)
        _check(rank, got, grad[mine], f".weight.grad (rows {mine.start}..{mine.stop - 1} of the "
               f"dense table gradient)", missing=_NOT_CONNECTED, suspects=[
                   (sequence_dense.embedding_grad_leak(grad[mine], ids, g, mine.start, mine.stop),
                    sequence_dense.EMB_GRAD_LEAK)])



def _bad_ids(VocabParallelEmbedding, cases):
    emb = VocabParallelEmbedding(VOCAB, EMB)
    outcomes = []
    for ids in cases:
        try:
            emb(tensor(ids))
            outcomes.append(None)
        except Exception as exc:  # noqa: BLE001 (the kind of exception is what is checked)
            outcomes.append((type(exc).__name__, str(exc)))
    return outcomes


@torch_check
def embedding_bad_ids(VocabParallelEmbedding):
    """1 rank: a token id outside [0, V) is a ValueError (no rank owns it: it would silently
    embed as zeros)."""
    cases = [trusted.asarray([0, VOCAB]), trusted.asarray([-1, 2])]
    outcomes = run_on_ranks(_bad_ids, 1, VocabParallelEmbedding, cases, timeout=TIMEOUT,
                            reply=replies.ranks(1, replies.outcomes(len(cases))))[0]
    for ids, outcome in zip(cases, outcomes):
        name = f"VocabParallelEmbedding({VOCAB}, {EMB}) on token ids {ids.tolist()}"
        if outcome is None:
            fail(f"{name} was accepted: an id outside [0, {VOCAB}) must raise ValueError")
        kind, text = outcome
        if kind != "ValueError":
            fail(f"{name} raised {kind}({text!r}): it should raise ValueError")


# -- vocab_parallel_cross_entropy -----------------------------------------------------------------
def _ce_case(scale=3.0, shift=0.0, seed=91):
    z, g = tensors.f32((3, VOCAB), (3,), seed=seed)
    target = trusted.asarray([4, 0, 2])                     # owned by rank 1, rank 0, rank 0
    return (z * scale + shift).astype(trusted.float32), target, g


def _cross_entropy(vocab_parallel_cross_entropy, z, target, g):
    rank = get_rank()
    z_r = tensor(z[:, _rows(VOCAB, rank)], requires_grad=True)
    loss = vocab_parallel_cross_entropy(z_r, tensor(target), VOCAB)
    backprop(loss, g, "vocab_parallel_cross_entropy")
    return as_numpy(loss), as_numpy(z_r.grad)


_CE_REPLY = replies.ranks(RANKS, replies.tensors("the loss", "the logits shard's .grad"))


def _ce_run(vocab_parallel_cross_entropy, case):
    z, target, g = case
    per_rank = run_on_ranks(_cross_entropy, RANKS, vocab_parallel_cross_entropy, z, target, g,
                            timeout=TIMEOUT, reply=_CE_REPLY)
    return per_rank, sequence_dense.cross_entropy(z, target, g)


@torch_check
def ce_forward(vocab_parallel_cross_entropy):
    """2 ranks, logits (3, 5) as columns 0-2 and 3-4: the per-token loss equals the dense
    cross-entropy on every rank."""
    per_rank, (loss, _) = _ce_run(vocab_parallel_cross_entropy, _ce_case())
    for rank, (got, _) in enumerate(per_rank):
        _check(rank, got, loss, "the per-token loss (log sum_v exp(z_v) - z_target)")


@torch_check
def ce_backward(vocab_parallel_cross_entropy):
    """2 ranks: the gradient of this rank's logits shard is its columns of the dense one,
    softmax(z) - onehot(target), times the loss's upstream gradient."""
    per_rank, (_, grad) = _ce_run(vocab_parallel_cross_entropy, _ce_case())
    for rank, (_, got) in enumerate(per_rank):
        mine = _rows(VOCAB, rank)
        _check(rank, got, grad[:, mine], f"the gradient of this rank's logits (columns "
               f"{mine.start}..{mine.stop - 1} of the dense one)", missing=_NOT_CONNECTED)


@torch_check
def ce_large_logits(vocab_parallel_cross_entropy):
    """2 ranks, logits around 1e4 spread over +-3e4: no overflow, the exact loss and gradient
    (every rank subtracts the same max first)."""
    per_rank, (loss, grad) = _ce_run(vocab_parallel_cross_entropy,
                                     _ce_case(scale=1e4, shift=1e4, seed=93))
    for rank, (got, got_grad) in enumerate(per_rank):
        mine = _rows(VOCAB, rank)
        if got is not None and not bool((abs(got) < float("inf")).all()):
            fail(f"{verdict.where(rank, RANKS)}: the loss of logits ~1e4 is {verdict.show(got)}: "
                 f"exp overflowed; subtract the largest logit of ALL ranks (an all-reduce MAX) "
                 f"before exp")
        _check(rank, got, loss, "the per-token loss of logits ~1e4")
        _check(rank, got_grad, grad[:, mine], "the logits' gradient for logits ~1e4",
               missing=_NOT_CONNECTED)


make_checks_read_only(__name__)
