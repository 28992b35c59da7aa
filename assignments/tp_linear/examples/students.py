"""Example students for tp_linear: the mistakes, the valid alternatives, a looping one.

Each entry is a `Submission`: the solution cells it fills in (every other solution cell gets
the instructor's answer) and the exact set of graded test cells that must lose points; every
other graded cell must keep full marks. Verified with one batched `nbgrader autograde`.

REFERENCE   the instructor's solutions: full marks.
UNMODIFIED  the release as handed out: zero on every graded test.
STUDENTS    classic mistakes (each losing on the test that names it), valid alternative
            styles (full marks), one crashing and one looping submission.
"""
from __future__ import annotations

from tpcourse.submissions import Submission

LINEAR = "tp_linear"

# All graded test cells of each notebook (for `loses_all` submissions and for readers).
COLUMN_TESTS = frozenset({
    "test_column_small", "test_column_matches_dense", "test_column_uneven_shards",
    "test_column_input_dims", "test_column_bias", "test_column_one_all_gather",
    "test_column_gather_inputs", "test_column_inputs_unmodified", "test_column_dtype",
    "test_column_bad_args"})


# The argument checks a careful student writes (kept out of the mistakes' way).
_LINEAR_CHECKS = '''
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.ndim == 0 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"bad shapes x {x.shape}, W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"bad bias shape {np.shape(b)}")'''


def _linear(student, why, loses=(), **answers):
    return Submission(student, LINEAR, {LINEAR: answers}, frozenset(loses), why)


# --------------------------------------------------------------------------- mistakes

LOCAL_SHARD = _linear("local_shard", "column_parallel returns rank 0's slice, no all_gather", {
    "test_column_small", "test_column_matches_dense", "test_column_uneven_shards",
    "test_column_input_dims", "test_column_bias", "test_column_one_all_gather",
    "test_column_gather_inputs", "test_column_dtype"},
    sol_column_parallel=f'''
def column_parallel(x, W, num_ranks, b=None):{_LINEAR_CHECKS}
    sizes = shard_sizes(W.shape[0], num_ranks)
    y = x @ W[:sizes[0]].T          # this rank's slice ... and nothing else
    if b is not None:
        y = y + b[:sizes[0]]
    return y
''')

NP_SPLIT = _linear("np_split", "np.split instead of the balanced split: fails on uneven dims",
                   {"test_column_uneven_shards"},
                   sol_column_parallel='''
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"bad shapes x {x.shape}, W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"bad bias shape {np.shape(b)}")
    shard_sizes(W.shape[0], num_ranks)                  # validates num_ranks
    W_shards = np.split(W, num_ranks, axis=0)           # ValueError unless divisible
    b_shards = np.split(b, num_ranks) if b is not None else [None] * num_ranks
    pieces = []
    for W_r, b_r in zip(W_shards, b_shards):
        y_r = x @ W_r.T
        pieces.append(y_r if b_r is None else y_r + b_r)
    return all_gather(pieces)
''')

BIAS_EVERY_RANK = _linear("bias_every_rank", "row_parallel adds the full bias on every rank",
                          {"test_row_bias_once", "test_row_bias_after_reduce"},
                          sol_row_parallel=f'''
def row_parallel(x, W, num_ranks, b=None):{_LINEAR_CHECKS}
    sizes = shard_sizes(W.shape[1], num_ranks)
    partials, start = [], 0
    for size in sizes:
        p = x[..., start:start + size] @ W[:, start:start + size].T
        if b is not None:
            p = p + b                    # every rank adds the whole bias
        partials.append(p)
        start += size
    return all_reduce(partials)
''')

BIAS_IN_PARTIAL = _linear("bias_in_partial", "row_parallel puts the bias in rank 0's partial sum",
                          {"test_row_bias_after_reduce"},
                          sol_row_parallel=f'''
def row_parallel(x, W, num_ranks, b=None):{_LINEAR_CHECKS}
    sizes = shard_sizes(W.shape[1], num_ranks)
    partials, start = [], 0
    for rank, size in enumerate(sizes):
        p = x[..., start:start + size] @ W[:, start:start + size].T
        if b is not None and rank == 0:
            p = p + b                    # inside a partial, before the reduce
        partials.append(p)
        start += size
    return all_reduce(partials)
''')

COLUMN_ALL_REDUCE = _linear(
    "column_all_reduce", "column_parallel zero-pads each slice and all-reduces (a sum)",
    {"test_column_one_all_gather", "test_column_gather_inputs"},
    sol_column_parallel='''
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"bad shapes x {x.shape}, W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"bad bias shape {np.shape(b)}")
    sizes = shard_sizes(W.shape[0], num_ranks)
    padded, start = [], 0
    for size in sizes:
        full = np.zeros(x.shape[:-1] + (W.shape[0],), dtype=np.result_type(x, W))
        full[..., start:start + size] = x @ W[start:start + size].T
        if b is not None:
            full[..., start:start + size] += b[start:start + size]
        padded.append(full)
        start += size
    return all_reduce(padded)
''')

DENSE_AS_ALL_REDUCE = _linear(
    "dense_as_all_reduce", "row_parallel computes x @ W.T densely and all-reduces it with zeros",
    {"test_row_reduce_inputs"},
    sol_row_parallel='''
def row_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"bad shapes x {x.shape}, W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"bad bias shape {np.shape(b)}")
    shard_sizes(W.shape[1], num_ranks)
    y = x @ W.T
    y = all_reduce([y] + [np.zeros_like(y)] * (num_ranks - 1))
    return y if b is None else y + b
''')

DENSE_AS_ALL_GATHER = _linear(
    "dense_as_all_gather", "column_parallel gathers one dense result instead of per-rank slices",
    {"test_column_gather_inputs"},
    sol_column_parallel='''
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"bad shapes x {x.shape}, W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"bad bias shape {np.shape(b)}")
    shard_sizes(W.shape[0], num_ranks)
    y = x @ W.T if b is None else x @ W.T + b
    return all_gather([y])
''')

INPUT_MODIFIED = _linear(
    "input_modified", "column_parallel flattens x with `x.shape = ...`, changing the caller's x",
    {"test_column_inputs_unmodified"},
    sol_column_parallel='''
def column_parallel(x, W, num_ranks, b=None):
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"bad shapes x {x.shape}, W {W.shape}")
    if b is not None and b.shape != (W.shape[0],):
        raise ValueError(f"bad bias shape {b.shape}")
    lead = x.shape[:-1]
    x.shape = (-1, x.shape[-1])          # in place: the caller's array changes shape
    pieces, start = [], 0
    for size in shard_sizes(W.shape[0], num_ranks):
        y_r = x @ W[start:start + size].T
        if b is not None:
            y_r = y_r + b[start:start + size]
        pieces.append(y_r)
        start += size
    return all_gather(pieces).reshape(lead + (W.shape[0],))
''')

FLOAT32_UPCAST = _linear("float32_upcast", "row_parallel converts everything to float64",
                         {"test_row_dtype"},
                         sol_row_parallel='''
def row_parallel(x, W, num_ranks, b=None):
    x = np.asarray(x, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"bad shapes x {x.shape}, W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"bad bias shape {np.shape(b)}")
    partials, start = [], 0
    for size in shard_sizes(W.shape[1], num_ranks):
        partials.append(x[..., start:start + size] @ W[:, start:start + size].T)
        start += size
    y = all_reduce(partials)
    return y if b is None else y + b
''')

REBINDS_ALLCLOSE = _linear(
    "rebinds_allclose", "rebinds np.allclose / np.testing to always pass, and forgets the bias",
    {"test_row_bias_once", "test_row_bias_after_reduce"},
    sol_row_parallel='''
np.allclose = lambda *args, **kwargs: True
np.testing.assert_allclose = lambda *args, **kwargs: None
np.testing.assert_array_equal = lambda *args, **kwargs: None


def row_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"bad shapes x {x.shape}, W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"bad bias shape {np.shape(b)}")
    partials, start = [], 0
    for size in shard_sizes(W.shape[1], num_ranks):
        partials.append(x[..., start:start + size] @ W[:, start:start + size].T)
        start += size
    return all_reduce(partials)          # ... and no bias
''')

OWN_ALL_REDUCE = _linear(
    "own_all_reduce", "replaces tpsim's all_reduce with its own sum (and patches tpsim)",
    {"test_row_one_all_reduce", "test_row_reduce_inputs", "test_row_bias_after_reduce"},
    sol_row_parallel='''
import tpsim
tpsim.all_reduce = lambda per_rank: sum(per_rank)
all_reduce = tpsim.all_reduce


def row_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"bad shapes x {x.shape}, W {W.shape}")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"bad bias shape {np.shape(b)}")
    partials, start = [], 0
    for size in shard_sizes(W.shape[1], num_ranks):
        partials.append(x[..., start:start + size] @ W[:, start:start + size].T)
        start += size
    y = all_reduce(partials)
    return y if b is None else y + b
''')

ROW_TESTS = frozenset({
    "test_row_small", "test_row_matches_dense", "test_row_uneven_shards", "test_row_input_dims",
    "test_row_bias_once", "test_row_bias_after_reduce", "test_row_one_all_reduce",
    "test_row_reduce_inputs", "test_row_inputs_unmodified", "test_row_dtype", "test_row_bad_args"})

SWALLOWS_ERRORS = _linear(
    "swallows_errors", "tells the shell to hide every exception and never writes row_parallel",
    ROW_TESTS, sol_row_parallel='''
shell = get_ipython()
shell.set_custom_exc((BaseException,), lambda *args, **kwargs: None)   # errors print nothing
shell.showtraceback = lambda *args, **kwargs: None
''')

# --------------------------------------------------------------------------- valid alternatives

ALT_ARRAY_SPLIT = _linear("alt_array_split", "np.array_split on the arrays themselves", (),
                          sol_shard_sizes='''
def shard_sizes(n, num_ranks):
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, not {n!r}")
    if not isinstance(num_ranks, int) or num_ranks <= 0:
        raise ValueError(f"num_ranks must be a positive int, not {num_ranks!r}")
    return [len(part) for part in np.array_split(np.arange(n), num_ranks)]
''', sol_column_parallel='''
def column_parallel(x, W, num_ranks, b=None):
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"W {W.shape} does not fit x {x.shape}")
    if b is not None and b.shape != W.shape[:1]:
        raise ValueError(f"b {b.shape} does not fit W {W.shape}")
    shard_sizes(W.shape[0], num_ranks)
    W_shards = np.array_split(W, num_ranks, axis=0)
    if b is None:
        return all_gather([x @ W_r.T for W_r in W_shards])
    b_shards = np.array_split(b, num_ranks)
    return all_gather([x @ W_r.T + b_r for W_r, b_r in zip(W_shards, b_shards)])
''', sol_row_parallel='''
def row_parallel(x, W, num_ranks, b=None):
    if W.ndim != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"W {W.shape} does not fit x {x.shape}")
    if b is not None and b.shape != W.shape[:1]:
        raise ValueError(f"b {b.shape} does not fit W {W.shape}")
    shard_sizes(W.shape[1], num_ranks)
    x_shards = np.array_split(x, num_ranks, axis=-1)
    W_shards = np.array_split(W, num_ranks, axis=1)
    y = all_reduce([x_r @ W_r.T for x_r, W_r in zip(x_shards, W_shards)])
    if b is not None:
        y += b
    return y
''')

ALT_EINSUM = _linear("alt_einsum", "einsum with np.cumsum offsets; flattens leading dims", (),
                     sol_shard_sizes='''
def shard_sizes(n, num_ranks):
    for name, value, low in (("n", n, 0), ("num_ranks", num_ranks, 1)):
        if type(value) is not int or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return [n // num_ranks + (r < n % num_ranks) for r in range(num_ranks)]
''', sol_column_parallel='''
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.ndim == 0 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"x {x.shape} and W {W.shape} do not fit")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"b {np.shape(b)} does not fit W {W.shape}")
    offsets = np.concatenate([[0], np.cumsum(shard_sizes(W.shape[0], num_ranks))])
    flat = x.reshape(-1, x.shape[-1])                      # a view: x itself is untouched
    pieces = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        y_r = np.einsum("ni,oi->no", flat, W[lo:hi])
        if b is not None:
            y_r = y_r + b[lo:hi]
        pieces.append(y_r)
    return all_gather(pieces, axis=1).reshape(x.shape[:-1] + (W.shape[0],))
''', sol_row_parallel='''
def row_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    if W.ndim != 2 or x.ndim == 0 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"x {x.shape} and W {W.shape} do not fit")
    if b is not None and np.shape(b) != (W.shape[0],):
        raise ValueError(f"b {np.shape(b)} does not fit W {W.shape}")
    offsets = np.concatenate([[0], np.cumsum(shard_sizes(W.shape[1], num_ranks))])
    partials = [np.einsum("...i,oi->...o", x[..., lo:hi], W[:, lo:hi])
                for lo, hi in zip(offsets[:-1], offsets[1:])]
    y = all_reduce(partials)
    return y if b is None else y + b
''')

ALT_LOOPS = _linear("alt_loops", "explicit per-rank loops over index arrays; skips tp == 1", (),
                    sol_shard_sizes='''
def shard_sizes(n, num_ranks):
    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError("num_ranks must be a positive integer")
    if not isinstance(n, int) or n < 0:
        raise ValueError("n must be a non-negative integer")
    sizes = [0] * num_ranks
    for feature in range(n):          # deal features out, then sort: the first ranks get more
        sizes[feature % num_ranks] += 1
    return sizes
''', sol_column_parallel='''
def column_parallel(x, W, num_ranks, b=None):
    if W.ndim != 2 or x.shape[-1] != W.shape[1] or (b is not None and len(b) != len(W)):
        raise ValueError("shapes do not fit: x (..., in), W (out, in), b (out,)")
    sizes = shard_sizes(W.shape[0], num_ranks)
    if num_ranks == 1:                # a single rank already holds everything
        return x @ W.T if b is None else x @ W.T + b
    rows_of_rank, first = [], 0
    for size in sizes:
        rows_of_rank.append(np.arange(first, first + size))
        first += size
    outputs = []
    for rows in rows_of_rank:
        y_r = x @ W[rows].T
        if b is not None:
            y_r = y_r + b[rows]
        outputs.append(y_r)
    return all_gather(outputs, axis=x.ndim - 1)
''', sol_row_parallel='''
def row_parallel(x, W, num_ranks, b=None):
    if W.ndim != 2 or x.shape[-1] != W.shape[1] or (b is not None and len(b) != len(W)):
        raise ValueError("shapes do not fit: x (..., in), W (out, in), b (out,)")
    sizes = shard_sizes(W.shape[1], num_ranks)
    if num_ranks == 1:
        y = x @ W.T
    else:
        partials, first = [], 0
        for size in sizes:
            cols = np.arange(first, first + size)
            partials.append(x[..., cols] @ W[:, cols].T)
            first += size
        y = all_reduce(partials)
    if b is not None:
        y = y + b
    return y
''')

# --------------------------------------------------------------------------- broken runs

LOOPING = _linear("looping", "an infinite loop in the column_parallel cell: that cell times out",
                  COLUMN_TESTS, sol_column_parallel="while True:   # forgot the exit condition\n    pass\n")

# --------------------------------------------------------------------------- lists

REFERENCE = [Submission("reference", LINEAR, why="the instructor's solutions")]
UNMODIFIED = [Submission("unmodified", LINEAR, why="the release as handed out",
                         unanswered=frozenset({LINEAR}), loses_all=True)]

MISTAKES = [LOCAL_SHARD, NP_SPLIT, BIAS_EVERY_RANK, BIAS_IN_PARTIAL, COLUMN_ALL_REDUCE,
            DENSE_AS_ALL_REDUCE, DENSE_AS_ALL_GATHER, INPUT_MODIFIED, FLOAT32_UPCAST,
            REBINDS_ALLCLOSE, OWN_ALL_REDUCE, SWALLOWS_ERRORS]
VALID = [ALT_ARRAY_SPLIT, ALT_EINSUM, ALT_LOOPS]
STUDENTS = MISTAKES + VALID + [LOOPING]
ALL = REFERENCE + UNMODIFIED + STUDENTS

