"""Example students for the tp_sequence assignment (sequence parallelism, the vocabulary-parallel
embedding and cross-entropy).

Each entry is a `Submission`: the solution cells it fills in (every other solution cell gets
the instructor's answer) and the exact set of graded test cells that must lose points; every
other graded cell must keep full marks. Verified in process (tests/test_catalogue.py, against
assignments/tp_sequence/grades.json) and in the merged nbgrader course (tests/test_course_cycle.py).

REFERENCE   the instructor's solutions: full marks.
UNMODIFIED  the release as handed out: zero on every graded test.
STUDENTS    classic mistakes (each losing on the tests that name it) and valid alternative
            styles (full marks).
"""
from __future__ import annotations

from tpcourse.submissions import Submission

SEQUENCE = "tp_sequence"

# All graded test cells of layer_sp, of the embedding and of the cross-entropy (for readers,
# and for the mistakes that lose nearly all of them).
SP_TESTS = frozenset({
    "test_sp_small", "test_sp_matches_dense", "test_sp_uneven_sequence", "test_sp_input_dims",
    "test_sp_biases_and_activation", "test_sp_layernorm_on_shard",
    "test_sp_one_gather_one_reduce_scatter", "test_sp_reduce_scatter_inputs",
    "test_sp_comm_bytes", "test_sp_inputs_unmodified", "test_sp_dtype", "test_sp_bad_args"})
EMBEDDING_TESTS = frozenset({
    "test_embedding_small", "test_embedding_matches_dense", "test_embedding_uneven_vocab",
    "test_embedding_one_all_reduce", "test_embedding_masked_inputs",
    "test_embedding_inputs_unmodified", "test_embedding_dtype", "test_embedding_bad_args"})
CE_TESTS = frozenset({
    "test_ce_small", "test_ce_matches_dense", "test_ce_uneven_vocab", "test_ce_large_logits",
    "test_ce_three_all_reduces", "test_ce_token_sized_collectives", "test_ce_reduce_inputs",
    "test_ce_inputs_unmodified", "test_ce_dtype", "test_ce_bad_args"})


def _sequence(student, why, loses=(), **answers):
    return Submission(student, SEQUENCE, {SEQUENCE: answers}, frozenset(loses), why)


# The argument checks a careful student writes, kept out of the mistakes' way: each mistake
# below differs from a correct answer only where it says.
_SP_CHECKS = '''
    if not isinstance(x_shards, (list, tuple)) or not x_shards:
        raise ValueError("x_shards: one array per rank")
    x_shards = [np.asarray(x_r) for x_r in x_shards]
    p, h = len(x_shards), x_shards[0].shape[-1]
    if x_shards[0].ndim < 2 or any(x_r.shape[1:] != x_shards[0].shape[1:] for x_r in x_shards):
        raise ValueError("shards must be (s_r, ..., h) alike")
    lengths = [len(x_r) for x_r in x_shards]
    if lengths != [t.stop - t.start for t in shard_slices(sum(lengths), p)]:
        raise ValueError("shards are not the balanced split")
    if np.shape(ln_weight) != (h,) or np.shape(ln_bias) != (h,) or np.ndim(W1) != 2 \\
            or np.shape(W1)[1] != h or np.shape(W2) != (h, np.shape(W1)[0]):
        raise ValueError("weights do not fit")
    if b1 is not None and np.shape(b1) != (np.shape(W1)[0],) or \\
            b2 is not None and np.shape(b2) != (h,):
        raise ValueError("biases do not fit")'''

_SP_SIGNATURE = "def layer_sp(x_shards, ln_weight, ln_bias, W1, W2, b1=None, b2=None, " \
                "activation=relu, eps=1e-5):"


def _layer_sp(gather, combine, finish=None):
    """A layer_sp answer: the checks above, then `gather` (u from x_shards), the column and
    row layers, then `combine` (z_shards from partials) and `finish` (y_shards)."""
    finish = finish or '''
    return [x_r + z_r + (0 if b2 is None else b2) for x_r, z_r in zip(x_shards, z_shards)]'''
    return f'''
{_SP_SIGNATURE}{_SP_CHECKS}{gather}
    partials = []
    for units in shard_slices(np.shape(W1)[0], p):
        a_r = u @ W1[units].T + (0 if b1 is None else b1[units])
        partials.append(activation(a_r) @ W2[:, units].T){combine}{finish}
'''


_GATHER_NORMED = '''
    u = all_gather([layer_norm(x_r, ln_weight, ln_bias, eps) for x_r in x_shards], axis=0)'''
_SCATTER = '''
    z_shards = reduce_scatter(partials, axis=0)'''

_EMBEDDING_CHECKS = '''
    token_ids, table = np.asarray(token_ids), np.asarray(table)
    if table.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError("table (V, h) and integer token ids, please")
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= len(table)):
        raise ValueError(f"token ids outside [0, {len(table)})")'''

_CE_CHECKS = '''
    if not isinstance(logit_shards, (list, tuple)) or not logit_shards:
        raise ValueError("logit_shards: one array per rank")
    logit_shards, target = [np.asarray(z_r) for z_r in logit_shards], np.asarray(target)
    if not np.issubdtype(target.dtype, np.integer) or \\
            any(z_r.shape[:-1] != target.shape or z_r.ndim != target.ndim + 1 for z_r in logit_shards):
        raise ValueError("shards (..., V_r) with integer target (...), please")
    widths = [z_r.shape[-1] for z_r in logit_shards]
    if target.size and (target.min() < 0 or target.max() >= sum(widths)):
        raise ValueError("target outside the vocabulary")'''

# The target logit, each rank its own (0 where another rank owns the target).
_PICK = '''
    picked, start = [], 0
    for z_r in logit_shards:
        owned = (target >= start) & (target < start + z_r.shape[-1])
        t_r = np.zeros(target.shape, dtype=z_r.dtype)
        t_r[owned] = z_r[owned, target[owned] - start]
        picked.append(t_r)
        start += z_r.shape[-1]'''

# --------------------------------------------------------------------------- mistakes: layer_sp

SP_SCATTER_LAST_AXIS = _sequence(
    "sp_scatter_last_axis", "reduce_scatter with tpsim's default axis=-1: splits the hidden "
    "features, not the sequence", SP_TESTS - {"test_sp_bad_args"},
    sol_layer_sp=_layer_sp(_GATHER_NORMED, '''
    z_shards = reduce_scatter(partials)          # axis=-1: the hidden axis'''))

SP_LAYERNORM_AFTER_GATHER = _sequence(
    "sp_layernorm_after_gather", "gathers the raw tokens and normalizes the gathered (s, b, h) "
    "on every rank", {"test_sp_layernorm_on_shard"},
    sol_layer_sp=_layer_sp('''
    u = layer_norm(all_gather(x_shards, axis=0), ln_weight, ln_bias, eps)   # all s tokens''',
                           _SCATTER))

SP_ALL_REDUCE_THEN_SLICE = _sequence(
    "sp_all_reduce_then_slice", "all-reduces the partial sums, then keeps its own tokens: "
    "1.5x the traffic", {"test_sp_one_gather_one_reduce_scatter",
                         "test_sp_reduce_scatter_inputs", "test_sp_comm_bytes"},
    sol_layer_sp=_layer_sp(_GATHER_NORMED, '''
    z = all_reduce(partials)
    z_shards = [z[tokens] for tokens in shard_slices(len(z), p)]'''))

SP_BIAS_IN_PARTIALS = _sequence(
    "sp_bias_in_partials", "adds b2 to every rank's partial sum before the reduce_scatter",
    {"test_sp_biases_and_activation"},
    sol_layer_sp=_layer_sp(_GATHER_NORMED, '''
    if b2 is not None:
        partials = [p_r + b2 for p_r in partials]        # counted once per rank
    z_shards = reduce_scatter(partials, axis=0)''', '''
    return [x_r + z_r for x_r, z_r in zip(x_shards, z_shards)]'''))

# --------------------------------------------------------------------------- mistakes: embedding

EMBEDDING_NOT_MASKED = _sequence(
    "embedding_not_masked", "clips every id into its own rows and never zeros the ids it does "
    "not own", {"test_embedding_small", "test_embedding_matches_dense",
                "test_embedding_uneven_vocab", "test_embedding_masked_inputs",
                "test_embedding_dtype"},
    sol_vocab_parallel_embedding=f'''
def vocab_parallel_embedding(token_ids, table, num_ranks):{_EMBEDDING_CHECKS}
    lookups = []
    for rows in shard_slices(len(table), num_ranks):
        table_r = table[rows]
        if len(table_r) == 0:
            lookups.append(np.zeros(token_ids.shape + table.shape[1:], dtype=table.dtype))
            continue
        local = np.clip(token_ids - rows.start, 0, len(table_r) - 1)   # in range, not masked
        lookups.append(table_r[local])
    return all_reduce(lookups)
''')

EMBEDDING_NOT_SHIFTED = _sequence(
    "embedding_not_shifted", "masks the ids it does not own but indexes its shard with the "
    "global id (no - start_r)", EMBEDDING_TESTS - {"test_embedding_bad_args"},
    sol_vocab_parallel_embedding=f'''
def vocab_parallel_embedding(token_ids, table, num_ranks):{_EMBEDDING_CHECKS}
    lookups = []
    for rows in shard_slices(len(table), num_ranks):
        owned = (token_ids >= rows.start) & (token_ids < rows.stop)
        lookup = np.zeros(token_ids.shape + table.shape[1:], dtype=table.dtype)
        lookup[owned] = table[rows][token_ids[owned]]          # global id as a local row
        lookups.append(lookup)
    return all_reduce(lookups)
''')

EMBEDDING_NO_RANGE_CHECK = _sequence(
    "embedding_no_range_check", "ids outside [0, V) silently give zero vectors",
    {"test_embedding_bad_args"},
    sol_vocab_parallel_embedding='''
def vocab_parallel_embedding(token_ids, table, num_ranks):
    token_ids, table = np.asarray(token_ids), np.asarray(table)
    if table.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError("table (V, h) and integer token ids, please")
    lookups = []
    for rows in shard_slices(len(table), num_ranks):
        owned = (token_ids >= rows.start) & (token_ids < rows.stop)
        lookup = np.zeros(token_ids.shape + table.shape[1:], dtype=table.dtype)
        lookup[owned] = table[rows][token_ids[owned] - rows.start]
        lookups.append(lookup)
    return all_reduce(lookups)
''')

# --------------------------------------------------------------------------- mistakes: loss

CE_NO_MAX = _sequence(
    "ce_no_max", "sums exp(z) without subtracting the max: overflows for large logits",
    {"test_ce_large_logits", "test_ce_three_all_reduces", "test_ce_reduce_inputs"},
    sol_vocab_parallel_cross_entropy=f'''
def vocab_parallel_cross_entropy(logit_shards, target):{_CE_CHECKS}{_PICK}
    e = all_reduce([np.exp(z_r).sum(axis=-1) for z_r in logit_shards])
    return np.log(e) - all_reduce(picked)
''')

CE_GATHERS_LOGITS = _sequence(
    "ce_gathers_logits", "all-gathers the logits over the vocabulary and computes the loss "
    "densely", {"test_ce_three_all_reduces", "test_ce_token_sized_collectives",
                "test_ce_reduce_inputs"},
    sol_vocab_parallel_cross_entropy=f'''
def vocab_parallel_cross_entropy(logit_shards, target):{_CE_CHECKS}
    z = all_gather(logit_shards, axis=-1)                     # (..., V) on every rank
    m = z.max(axis=-1)
    z_t = np.take_along_axis(z, target[..., None], axis=-1)[..., 0]
    return m + np.log(np.exp(z - m[..., None]).sum(axis=-1)) - z_t
''')

CE_OWN_MAX = _sequence(
    "ce_own_max", "each rank shifts its exponentials by its own max: the sums do not add up",
    {"test_ce_small", "test_ce_matches_dense", "test_ce_uneven_vocab", "test_ce_large_logits",
     "test_ce_reduce_inputs", "test_ce_dtype"},
    sol_vocab_parallel_cross_entropy=f'''
def vocab_parallel_cross_entropy(logit_shards, target):{_CE_CHECKS}{_PICK}
    own = [z_r.max(axis=-1, initial=-np.inf) for z_r in logit_shards]
    m = all_reduce(own, op="max")
    e = all_reduce([np.exp(z_r - m_r[..., None]).sum(axis=-1)      # its own max, not m
                    for z_r, m_r in zip(logit_shards, own)])
    return m + np.log(e) - all_reduce(picked)
''')

CE_EQUAL_OFFSETS = _sequence(
    "ce_equal_offsets", "takes rank r's first vocabulary id as r * V_r (Megatron's equal "
    "partitions): wrong when the vocabulary does not divide", {"test_ce_uneven_vocab"},
    sol_vocab_parallel_cross_entropy=f'''
def vocab_parallel_cross_entropy(logit_shards, target):{_CE_CHECKS}
    m = all_reduce([z_r.max(axis=-1, initial=-np.inf) for z_r in logit_shards], op="max")
    e = all_reduce([np.exp(z_r - m[..., None]).sum(axis=-1) for z_r in logit_shards])
    picked = []
    for rank, z_r in enumerate(logit_shards):
        start = rank * z_r.shape[-1]                          # only right for equal widths
        owned = (target >= start) & (target < start + z_r.shape[-1])
        t_r = np.zeros(target.shape, dtype=z_r.dtype)
        t_r[owned] = z_r[owned, target[owned] - start]
        picked.append(t_r)
    return m + np.log(e) - all_reduce(picked)
''')

CE_IN_PLACE = _sequence(
    "ce_in_place", "subtracts the max in place (as Megatron does), changing the caller's "
    "logits", {"test_ce_inputs_unmodified"},
    sol_vocab_parallel_cross_entropy=f'''
def vocab_parallel_cross_entropy(logit_shards, target):{_CE_CHECKS.replace(
        "logit_shards, target = [np.asarray(z_r) for z_r in logit_shards], np.asarray(target)",
        "target = np.asarray(target)")}
    m = all_reduce([z_r.max(axis=-1, initial=-np.inf) for z_r in logit_shards], op="max")
    for z_r in logit_shards:
        z_r -= m[..., None]                                   # the caller's arrays
{_PICK.strip(chr(10))}
    e = all_reduce([np.exp(z_r).sum(axis=-1) for z_r in logit_shards])
    return np.log(e) - all_reduce(picked)
''')

# --------------------------------------------------------------------------- valid alternatives

ALT_SP = _sequence(
    "alt_sp", "LayerNorm inline with np.var, negative axes, einsum, offsets by np.cumsum", (),
    sol_layer_sp='''
def layer_sp(x_shards, ln_weight, ln_bias, W1, W2, b1=None, b2=None, activation=relu, eps=1e-5):
    if type(x_shards) not in (list, tuple) or len(x_shards) < 1:
        raise ValueError("need a list of shards")
    x_shards = list(map(np.asarray, x_shards))
    first = x_shards[0]
    if first.ndim < 2 or {x_r.shape[1:] for x_r in x_shards} != {first.shape[1:]}:
        raise ValueError("shards (s_r, ..., h) must agree on (..., h)")
    s = sum(x_r.shape[0] for x_r in x_shards)
    p = len(x_shards)
    if any(x_r.shape[0] != s // p + (r < s % p) for r, x_r in enumerate(x_shards)):
        raise ValueError("not the balanced split")
    h, f = first.shape[-1], np.shape(W1)[0]
    shapes = {"ln_weight": (np.shape(ln_weight), (h,)), "ln_bias": (np.shape(ln_bias), (h,)),
              "W1": (np.shape(W1), (f, h)), "W2": (np.shape(W2), (h, f))}
    if b1 is not None:
        shapes["b1"] = (np.shape(b1), (f,))
    if b2 is not None:
        shapes["b2"] = (np.shape(b2), (h,))
    for name, (got, want) in shapes.items():
        if got != want:
            raise ValueError(f"{name} is {got}, expected {want}")
    normed = [(x_r - x_r.mean(-1, keepdims=True)) / np.sqrt(x_r.var(-1, keepdims=True) + eps)
              * ln_weight + ln_bias for x_r in x_shards]
    u = all_gather(normed, axis=-first.ndim)                 # axis 0, counted from the end
    edges = np.cumsum([0] + [t.stop - t.start for t in shard_slices(f, p)])
    partials = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        a_r = np.einsum("...h,fh->...f", u, W1[lo:hi])
        if b1 is not None:
            a_r = a_r + b1[lo:hi]
        partials.append(np.einsum("...f,hf->...h", activation(a_r), W2[:, lo:hi]))
    out = reduce_scatter(partials, axis=-first.ndim)
    if b2 is not None:
        out = [z_r + b2 for z_r in out]
    return [x_r + z_r for x_r, z_r in zip(x_shards, out)]
''')

ALT_VOCAB = _sequence(
    "alt_vocab", "one-hot matmul embedding; Megatron-style loss (target after the max, "
    "keepdims pieces, empty slices by hand)", (),
    sol_vocab_parallel_embedding='''
def vocab_parallel_embedding(token_ids, table, num_ranks):
    ids = np.asarray(token_ids)
    if np.ndim(table) != 2:
        raise ValueError("table must be 2-D (V, h)")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, not {ids.dtype}")
    if ((ids < 0) | (ids >= len(table))).any():
        raise ValueError(f"every token id must be in [0, {len(table)})")
    results = []
    for rows in shard_slices(len(table), num_ranks):
        local = ids - rows.start
        owned = (local >= 0) & (local < rows.stop - rows.start)
        one_hot = (local[..., None] == np.arange(rows.stop - rows.start)) & owned[..., None]
        results.append(one_hot.astype(table.dtype) @ table[rows])   # zero rows where not owned
    return all_reduce(results)
''',
    sol_vocab_parallel_cross_entropy='''
def vocab_parallel_cross_entropy(logit_shards, target):
    if not isinstance(logit_shards, list) and not isinstance(logit_shards, tuple):
        raise ValueError("logit_shards must be a list of per-rank logits")
    if len(logit_shards) == 0:
        raise ValueError("no ranks")
    target = np.asarray(target)
    if target.dtype.kind not in "iu":
        raise ValueError("target ids must be integers")
    for z_r in logit_shards:
        if np.shape(z_r)[:-1] != target.shape or np.ndim(z_r) != target.ndim + 1:
            raise ValueError("each shard must be target.shape + (V_r,)")
    vocab = sum(np.shape(z_r)[-1] for z_r in logit_shards)
    if ((target < 0) | (target >= vocab)).any():
        raise ValueError(f"targets must lie in [0, {vocab})")
    maxima = []
    for z_r in logit_shards:
        if np.shape(z_r)[-1] == 0:                    # no vocabulary on this rank
            maxima.append(np.full(target.shape + (1,), -np.inf, dtype=np.asarray(z_r).dtype))
        else:
            maxima.append(np.max(z_r, axis=-1, keepdims=True))
    m = all_reduce(maxima, op="max")                  # (..., 1)
    shifted = [z_r - m for z_r in logit_shards]       # new arrays: the inputs stay as they were
    predicted, offset = [], 0
    for z_r in shifted:
        width = z_r.shape[-1]
        mask = (target < offset) | (target >= offset + width)
        local = np.where(mask, 0, target - offset)
        if width:
            p_r = np.take_along_axis(z_r, local[..., None], axis=-1)
        else:
            p_r = np.zeros(target.shape + (1,), dtype=z_r.dtype)
        p_r[mask] = 0                                 # Megatron's predicted_logits[target_mask] = 0
        predicted.append(p_r)
        offset += width
    predicted = all_reduce(predicted)                 # z_t - m, (..., 1)
    sum_exp = all_reduce([np.exp(z_r).sum(axis=-1, keepdims=True) for z_r in shifted])
    return (np.log(sum_exp) - predicted)[..., 0]
''')

# --------------------------------------------------------------------------- lists

REFERENCE = [Submission("reference", SEQUENCE, why="the instructor's solutions")]
UNMODIFIED = [Submission("unmodified", SEQUENCE, why="the release as handed out",
                         unanswered=frozenset({SEQUENCE}), loses_all=True)]

MISTAKES = [SP_SCATTER_LAST_AXIS, SP_LAYERNORM_AFTER_GATHER, SP_ALL_REDUCE_THEN_SLICE,
            SP_BIAS_IN_PARTIALS, EMBEDDING_NOT_MASKED, EMBEDDING_NOT_SHIFTED,
            EMBEDDING_NO_RANGE_CHECK, CE_NO_MAX, CE_GATHERS_LOGITS, CE_OWN_MAX,
            CE_EQUAL_OFFSETS, CE_IN_PLACE]
VALID = [ALT_SP, ALT_VOCAB]
STUDENTS = MISTAKES + VALID
ALL = REFERENCE + UNMODIFIED + STUDENTS
DEMO = ("ce_gathers_logits",)
