"""Checks for the tp_sequence notebook's vocabulary-parallel embedding and cross-entropy.

vocab_parallel_embedding(token_ids, table, num_ranks): rank r holds the rows balanced(V, p)[r]
of the table (V, h), looks up the tokens it owns, zeros the rest; one all_reduce (sum) of
(..., h) gives every rank table[token_ids]. Ids outside [0, V) raise ValueError.

vocab_parallel_cross_entropy(logit_shards, target): logit_shards[r] (..., V_r) is rank r's
slice of the vocabulary (in rank order), target (...) the right token of each position; the
per-token loss log(sum_v exp(z_v)) - z_target, computed stably as m + log(sum exp(z - m)) -
z_target with m the largest logit of all ranks. Exactly three all_reduces, each carrying one
number per token: the MAX of the ranks' maxima (all_reduce(..., op="max")), the SUM of the
ranks' sums of exp(z_r - m), the SUM of the target logit (0 on the ranks that do not own it).
"""
from __future__ import annotations

import numpy as _np

from tpgrade import _trusted as trusted
from tpgrade._harness import check, make_read_only
from tpgrade._layers import (RANKS, call, expect_bad_args, expect_counts, expect_inputs_unchanged,
                             expect_output, expect_pieces, last_call, pieces_match, record,
                             with_dtype)
from tpgrade.cases import arrays, balanced, f64
from tpgrade.verdict import fail

# Captured at import like tpgrade._trusted (tpgrade imports this module in the notebook's
# read-only setup cell, before any student code runs); _trusted has no log.
_log = _np.log


def _ids(seed, shape, vocab):
    return trusted.default_rng(seed).integers(0, vocab, size=shape)


def _owned(ids, start, stop):
    """Which positions hold a token of the rows [start, stop), as 0/1 floats."""
    return ((ids >= start) & (ids < stop)).astype(trusted.float64)


# --------------------------------------------------------------------------- embedding


def _embedding_name(ids, table, p):
    return f"vocab_parallel_embedding(token_ids {ids.shape}, table {table.shape}, num_ranks={p})"


def _lookup(embed, ids, table, p):
    """The student's embeddings; an IndexError is the classic missing offset, named."""
    name = _embedding_name(ids, table, p)
    try:
        return call(embed, name, (ids, table, p)), name
    except IndexError as exc:
        fail(f"{name} raised IndexError ({exc}): rank r's shard holds the global rows "
             f"start_r, start_r + 1, ... at local rows 0, 1, ...: look up id - start_r")


def _embedding_case(embed, ids, table, p, dtype=trusted.float64):
    got, name = _lookup(embed, ids, table, p)
    rows = f64(table)[ids]
    unmasked = 0.0
    for start, stop in balanced(table.shape[0], p):   # each rank's clipped lookup, not zeroed
        if stop > start:
            local = (ids - start).clip(0, stop - start - 1)
            unmasked = unmasked + f64(table)[start:stop][local]
    explanations = [(unmasked, "the lookups were not masked: a rank's rows for tokens it does "
                     "not own must be zeros before the all-reduce, or every rank adds one")]
    hints = [(ids.shape + (z - a,), "a slice of the hidden size? The table is split by rows "
              "(the vocabulary); every rank's output has all h features")
             for a, z in balanced(table.shape[1], p) if z - a != table.shape[1]]
    expect_output(got, rows, abs(rows), dtype, name, hints, explanations)
    return got, name


@check
def embedding_small(vocab_parallel_embedding):
    """2 ranks, table (6, 3): rank 0 holds rows 0-2, rank 1 rows 3-5; token_ids (4,)."""
    (table,) = arrays(701, (6, 3))
    _embedding_case(vocab_parallel_embedding, trusted.asarray([5, 0, 3, 2]), table, 2)


@check
def embedding_matches_dense(vocab_parallel_embedding):
    for i, p in enumerate(RANKS):
        (table,) = arrays(710 + i, (32, 5))
        _embedding_case(vocab_parallel_embedding, _ids(710 + i, (3, 7), 32), table, p)
    (table,) = arrays(719, (16, 4))
    _embedding_case(vocab_parallel_embedding, _ids(719, (2, 2, 3), 16), table, 4)


@check
def embedding_uneven_vocab(vocab_parallel_embedding):
    """V not divisible by p (the first V % p ranks hold one more row), and empty shards."""
    for i, (vocab, p) in enumerate([(7, 2), (7, 4), (10, 3), (3, 8), (5, 8)]):
        (table,) = arrays(720 + i, (vocab, 4))
        ids = _ids(720 + i, (12,), vocab)
        ids[:vocab] = trusted.arange(vocab)                    # every row is looked up
        _embedding_case(vocab_parallel_embedding, ids, table, p)


@check
def embedding_one_all_reduce(vocab_parallel_embedding):
    advice = {("all_reduce", 0): "each rank holds only the rows of its own tokens: one "
              "all_reduce (sum) of the masked lookups gives every rank all of them",
              ("all_reduce", "more"): "one all_reduce, of the masked lookups",
              ("all_gather", "more"): "the masked lookups all have the full shape (..., h) and "
              "are zero where the rank does not own the token: they are summed, not gathered"}
    for i, p in enumerate((1, 2, 3, 4)):
        (table,) = arrays(730 + i, (10, 4))
        ids = _ids(730 + i, (2, 5), 10)
        with record() as calls:
            _, name = _lookup(vocab_parallel_embedding, ids, table, p)
        expect_counts(calls, p, {"all_reduce": 1, "all_gather": 0, "reduce_scatter": 0}, name,
                      advice)


@check
def embedding_masked_inputs(vocab_parallel_embedding):
    """Rank r's input to the all_reduce: table[ids] where it owns the id, zeros elsewhere."""
    for i, (vocab, p) in enumerate([(12, 2), (12, 3), (10, 4), (7, 3)]):
        (table,) = arrays(740 + i, (vocab, 4))
        ids = _ids(740 + i, (3, 5), vocab)
        with record() as calls:
            _, name = _lookup(vocab_parallel_embedding, ids, table, p)
        reduce = last_call(calls, "all_reduce", name)
        rows = f64(table)[ids]
        bounds = balanced(vocab, p)
        expected = [rows * _owned(ids, a, z)[..., None] for a, z in bounds]
        for r, (piece, (a, z)) in enumerate(zip(reduce.inputs, bounds)):
            if piece.size == rows.size:
                foreign = abs(f64(piece).reshape(rows.shape)) * (1 - _owned(ids, a, z))[..., None]
                if foreign.max() > 0:
                    fail(f"{name}: rank {r}'s input to all_reduce has non-zero rows for tokens "
                         f"it does not own (ids outside [{a}, {z})): zero them before the "
                         f"all-reduce (Megatron: output_parallel[input_mask, :] = 0.0), or the "
                         f"sum adds a wrong row for every such token")
        expect_pieces(reduce, expected, [abs(e) for e in expected], trusted.float64, name,
                      "masked lookup: table[ids] for the ids it owns, zeros elsewhere")


@check
def embedding_inputs_unmodified(vocab_parallel_embedding):
    for i, p in enumerate((1, 3)):
        (table,) = arrays(750 + i, (9, 4))
        ids = _ids(750 + i, (2, 6), 9)
        expect_inputs_unchanged(vocab_parallel_embedding, _embedding_name(ids, table, p),
                                (ids, table, p), {},
                                ("token_ids", "table", "num_ranks"))


@check
def embedding_dtype(vocab_parallel_embedding):
    for i, p in enumerate((1, 2, 4)):
        (table,) = arrays(760 + i, (11, 6), dtype=trusted.float32)
        got, name = _embedding_case(vocab_parallel_embedding, _ids(760 + i, (4, 3), 11), table,
                                    p, dtype=trusted.float32)
        with_dtype(got, trusted.float32, name)


@check
def embedding_bad_args(vocab_parallel_embedding):
    (table,) = arrays(770, (6, 3))
    ids = trusted.asarray([0, 5, 2])
    expect_bad_args(vocab_parallel_embedding, "vocab_parallel_embedding", [
        (" with token id 6 for a vocabulary of 6", (trusted.asarray([0, 6, 2]), table, 2), {}),
        (" with token id -1", (trusted.asarray([0, -1, 2]), table, 2), {}),
        (" with token id 100 and one rank", (trusted.asarray([[100]]), table, 1), {}),
        (" with float token ids", (trusted.asarray([0.0, 1.0]), table, 2), {}),
        (" with a 1-D table", (ids, table[:, 0], 2), {}),
        (" with num_ranks=0", (ids, table, 0), {}), (" with num_ranks=2.5", (ids, table, 2.5), {}),
        (" with num_ranks='2'", (ids, table, "2"), {}),
    ])


# --------------------------------------------------------------------------- cross-entropy


def _pick(z, target):
    """z[..., target] for every position (the target's logit)."""
    flat = z.reshape(-1, z.shape[-1])
    return flat[trusted.arange(flat.shape[0]), target.reshape(-1)].reshape(target.shape)


def _dense_ce(logits, target):
    """Per-token loss in float64 (stable: the max subtracted), its error scale, and the max."""
    z = f64(logits)
    m = z.max(axis=-1)
    log_sum = _log(trusted.exp(z - m[..., None]).sum(axis=-1))
    z_t = _pick(z, target)
    return m + log_sum - z_t, abs(m) + log_sum + abs(z_t), m


def _logits(seed, lead, vocab, scale=3.0, shift=0.0, dtype=None):
    (z,) = arrays(seed, tuple(lead) + (vocab,), dtype=dtype)
    z = z * scale + shift
    return z.astype(dtype) if dtype is not None else z, _ids(seed, tuple(lead), vocab)


def _split(z, p):
    return [z[..., a:b].copy() for a, b in balanced(z.shape[-1], p)]


def _ce_name(z, target, p):
    sizes = [b - a for a, b in balanced(z.shape[-1], p)]
    return (f"vocab_parallel_cross_entropy(logit_shards: {p} rank(s) of logits {z.shape}, "
            f"vocabulary {sizes}, target {target.shape})")


def _ce_case(ce, z, target, p, dtype=trusted.float64):
    name = _ce_name(z, target, p)
    got = call(ce, name, (_split(z, p), target))
    want, scale, _ = _dense_ce(z, target)
    if got.shape == want.shape and not bool((abs(f64(got)) <= 1e300).all()):
        fail(f"{name}: the loss is not finite (inf or nan) for logits up to "
             f"{float(abs(f64(z)).max()):.3g}: exp overflowed? Subtract m, the largest logit of "
             f"all ranks (all_reduce of each rank's max with op=\"max\"), before exp")
    hints = [((), "a single number: the loss is per token (shape target.shape); the mean is "
              "taken later"),
             (target.shape + (1,), "keepdims left a trailing axis: return shape target.shape")]
    explanations = [(want + _pick(f64(z), target), "the target logit was not subtracted: "
                     "loss = log(sum exp(z)) - z[target]")]
    expect_output(got, want, scale, dtype, name, hints, explanations)
    return got, name


def _ce_recorded(ce, z, target, p):
    name = _ce_name(z, target, p)
    with record() as calls:
        call(ce, name, (_split(z, p), target))
    return calls, name


@check
def ce_small(vocab_parallel_cross_entropy):
    """2 ranks, logits (3, 6): rank 0 holds vocabulary ids 0-2, rank 1 ids 3-5."""
    z, target = _logits(801, (3,), 6)
    _ce_case(vocab_parallel_cross_entropy, z, target, 2)


@check
def ce_matches_dense(vocab_parallel_cross_entropy):
    for i, p in enumerate(RANKS):
        z, target = _logits(810 + i, (2, 3), 24)
        _ce_case(vocab_parallel_cross_entropy, z, target, p)
    for i, lead in enumerate([(5,), (2, 2, 2)]):
        z, target = _logits(818 + i, lead, 8)
        _ce_case(vocab_parallel_cross_entropy, z, target, 2)


@check
def ce_uneven_vocab(vocab_parallel_cross_entropy):
    """V not divisible by p (offsets from the shards' widths), and ranks with no vocabulary."""
    for i, (vocab, p) in enumerate([(7, 2), (7, 4), (10, 3), (11, 4), (3, 4), (5, 8)]):
        z, target = _logits(820 + i, (4, 3), vocab)
        target.reshape(-1)[:vocab] = trusted.arange(vocab)      # every position of the vocabulary
        _ce_case(vocab_parallel_cross_entropy, z, target, p)


@check
def ce_large_logits(vocab_parallel_cross_entropy):
    """Logits around 1e4, and spread over +-3e4: exp(1e4) overflows even float64."""
    for i, p in enumerate((1, 2, 4)):
        z, target = _logits(830 + i, (2, 5), 12, scale=1.0, shift=1e4)
        _ce_case(vocab_parallel_cross_entropy, z, target, p)
        z, target = _logits(835 + i, (2, 5), 12, scale=1e4)
        _ce_case(vocab_parallel_cross_entropy, z, target, p)


@check
def ce_three_all_reduces(vocab_parallel_cross_entropy):
    advice = {("all_gather", "more"): "gathering logits moves the vocabulary: each rank "
              "reduces its own slice to one number per token (max, sum of exp, target logit) "
              "and only those travel, in all-reduces",
              ("all_reduce", "fewer"): "three all-reduces: the max (op=\"max\"), the sum of "
              "exp(z - max), the target logit",
              ("all_reduce", "more"): "three all-reduces: the max (op=\"max\"), the sum of "
              "exp(z - max), the target logit"}
    for i, p in enumerate((2, 3, 4)):
        z, target = _logits(840 + i, (2, 3), 12)
        calls, name = _ce_recorded(vocab_parallel_cross_entropy, z, target, p)
        expect_counts(calls, p, {"all_reduce": 3, "all_gather": 0, "reduce_scatter": 0}, name,
                      advice)
        ops = sorted(c.reduce_op for c in calls if c.op == "all_reduce")
        if ops != ["max", "sum", "sum"]:
            fail(f"{name}: its all_reduces reduce with {ops}, expected one op=\"max\" (the "
                 f"largest logit of all ranks: every rank must subtract the same m, so that "
                 f"their sums of exp(z - m) add up) and two sums")


@check
def ce_token_sized_collectives(vocab_parallel_cross_entropy):
    """Every collective carries one number per token from each rank, never vocabulary-sized
    data (the logits are the largest activation of the model)."""
    for i, p in enumerate((2, 3, 4)):
        z, target = _logits(850 + i, (2, 3), 12)
        calls, name = _ce_recorded(vocab_parallel_cross_entropy, z, target, p)
        for c in calls:
            for r, piece in enumerate(c.inputs):
                if piece.size != target.size:
                    fail(f"{name}: rank {r} passed {piece.size} numbers (shape {piece.shape}) "
                         f"to {c.op}; one number per token ({target.size}) is all that needs to "
                         f"travel: each rank reduces its own vocabulary slice first (a gathered "
                         f"or padded vocabulary moves V numbers per token)")


@check
def ce_reduce_inputs(vocab_parallel_cross_entropy):
    """Rank r contributes its max logit, its sum of exp(z_r - m) (m: the max of all ranks), and
    its target logit (z_t or z_t - m where it owns the target, 0 elsewhere)."""
    for i, (vocab, p) in enumerate([(12, 2), (12, 3), (12, 4), (9, 3)]):
        z, target = _logits(860 + i, (2, 3), vocab)
        calls, name = _ce_recorded(vocab_parallel_cross_entropy, z, target, p)
        _, _, m = _dense_ce(z, target)
        bounds = balanced(vocab, p)
        shards = [f64(z_r) for z_r in _split(z, p)]
        maxima = [z_r.max(axis=-1) for z_r in shards]
        maxes = [c for c in calls if c.op == "all_reduce" and c.reduce_op == "max"]
        if not maxes:
            fail(f"{name} made no all_reduce with op=\"max\": the largest logit of all ranks "
                 f"comes from all_reduce(each rank's max, op=\"max\")")
        expect_pieces(maxes[-1], maxima, [abs(v) for v in maxima], trusted.float64, name,
                      "largest logit per token (..., ) of its own vocabulary slice")
        sums = [c for c in calls if c.op == "all_reduce" and c.reduce_op == "sum"]
        exp_sums = [trusted.exp(z_r - m[..., None]).sum(axis=-1) for z_r in shards]
        if not any(pieces_match(c, exp_sums, exp_sums, trusted.float64) for c in sums):
            fail(f"{name}: no all_reduce (sum) carried each rank's sum of exp(z_r - m), with m "
                 f"the max of ALL ranks (a rank's own max gives sums that do not add up)")
        z_t = _pick(f64(z), target)
        owned = [_owned(target, a, b) for a, b in bounds]
        picked = [z_t * o for o in owned]
        shifted = [(z_t - m) * o for o in owned]
        scales = [(abs(z_t) + abs(m)) for _ in owned]
        if not any(pieces_match(c, picked, scales, trusted.float64, alternatives=shifted)
                   for c in sums):
            fail(f"{name}: no all_reduce (sum) carried the target logits: the rank that owns "
                 f"target t (start_r <= t < stop_r) contributes z_r[t - start_r] (or that minus "
                 f"m), every other rank 0")


@check
def ce_inputs_unmodified(vocab_parallel_cross_entropy):
    for i, p in enumerate((1, 3)):
        z, target = _logits(870 + i, (2, 4), 9)
        expect_inputs_unchanged(vocab_parallel_cross_entropy, _ce_name(z, target, p),
                                (_split(z, p), target), {}, ("logit_shards", "target"))


@check
def ce_dtype(vocab_parallel_cross_entropy):
    for i, p in enumerate((1, 2, 4)):
        z, target = _logits(880 + i, (3, 4), 12, dtype=trusted.float32)
        got, name = _ce_case(vocab_parallel_cross_entropy, z, target, p, dtype=trusted.float32)
        with_dtype(got, trusted.float32, name)


@check
def ce_bad_args(vocab_parallel_cross_entropy):
    z, target = _logits(890, (3,), 6)
    shards = _split(z, 2)
    expect_bad_args(vocab_parallel_cross_entropy, "vocab_parallel_cross_entropy", [
        (" with target 6 for a vocabulary of 6", (shards, trusted.asarray([0, 6, 1])), {}),
        (" with target -1", (shards, trusted.asarray([0, -1, 1])), {}),
        (" with float targets", (shards, target.astype(trusted.float64)), {}),
        (" with target (2,) for logits (3, 6)", (shards, target[:2]), {}),
        (" with shards of different leading shapes", ([shards[0], shards[1][:2]], target), {}),
        (" with an empty list of shards", ([], target), {}),
        (" with the logits as one array instead of a list of shards", (z, target), {}),
    ])


make_read_only(__name__)
