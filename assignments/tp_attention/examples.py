"""Example students for the tp_attention assignment (numpy, simulated ranks).

Same form as tp_linear's examples: each entry is a `Submission` naming the solution cells it fills
in (every other solution cell gets the instructor's answer) and the exact set of graded test
cells that must lose points; every other graded cell must keep full marks.

REFERENCE   the instructor's solutions: full marks.
UNMODIFIED  the release as handed out: zero on every graded test.
STUDENTS    classic mistakes (each losing the tests that name it, and the tests downstream
            that use the broken function) and valid alternative styles (full marks).
"""
from __future__ import annotations

from tpcourse.submissions import Submission

ATTENTION = "tp_attention"


def _student(student, why, loses=(), **answers):
    return Submission(student, ATTENTION, {ATTENTION: answers}, frozenset(loses), why)


# Graded cells that call attention_tp / transformer_layer_tp with values checked: a mistake in
# attention_tp loses its own tests and these layer tests, which use it.
LAYER_VALUES = {"test_layer_small", "test_layer_matches_dense", "test_layer_causal",
                "test_layer_uneven"}

# The argument checks a careful student writes (kept out of the mistakes' way).
_ATTENTION_DEF = '''
def attention_tp(x, Wq, Wk, Wv, Wo, num_heads, num_ranks, num_kv_heads=None, bo=None,
                 causal=False):
    x, Wq, Wk, Wv, Wo = (np.asarray(a) for a in (x, Wq, Wk, Wv, Wo))
    H = num_heads
    G = H if num_kv_heads is None else num_kv_heads
    kv = kv_head_ranges(H, G, num_ranks)
    if x.ndim < 2 or Wq.ndim != 2 or Wq.shape[1] != x.shape[-1] or Wq.shape[0] % H or not len(Wq):
        raise ValueError(f"bad x {x.shape} or Wq {Wq.shape}")
    d = Wq.shape[0] // H
    if Wk.shape != (G * d, x.shape[-1]) or Wv.shape != Wk.shape:
        raise ValueError(f"bad Wk {Wk.shape} or Wv {Wv.shape}")
    if Wo.ndim != 2 or Wo.shape[1] != H * d:
        raise ValueError(f"bad Wo {Wo.shape}")
    if bo is not None and np.shape(bo) != (Wo.shape[0],):
        raise ValueError(f"bad bo {np.shape(bo)}")'''

# One rank's heads, as in the reference (used by the mistakes that are elsewhere).
_RANK_HEADS = '''
        rows, kv_rows = slice(heads.start * d, heads.stop * d), slice(ka * d, kz * d)
        q = split_heads(x @ Wq[rows].T, d)
        k = split_heads(x @ Wk[kv_rows].T, d)
        v = split_heads(x @ Wv[kv_rows].T, d)
        reads = [j // (H // G) - ka for j in range(heads.start, heads.stop)]
        o = attention_heads(q, k[..., reads, :, :], v[..., reads, :, :], causal)'''

# ... and the end of attention_tp: the rank's partial, the one all-reduce, bo once.
_REDUCE_ONCE = '''        partials.append(merge_heads(o) @ Wo[:, rows].T)
    y = all_reduce(partials)
    return y if bo is None else y + bo
'''

_HEADS_DEF = '''
def attention_heads(q, k, v, causal=False):
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if q.ndim < 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape, got {q.shape}, {k.shape}, {v.shape}")
    d = q.shape[-1]
    future = np.arange(q.shape[-2])[None, :] > np.arange(q.shape[-2])[:, None]'''

_LAYER_DEF = '''
LAYER_KEYS = ("ln1_w", "ln1_b", "Wq", "Wk", "Wv", "Wo", "bo", "ln2_w", "ln2_b", "W1", "b1",
              "W2", "b2")


def transformer_layer_tp(x, params, num_heads, num_ranks, num_kv_heads=None, causal=False,
                         eps=1e-5, activation=relu):
    P = {key: np.asarray(params[key]) for key in LAYER_KEYS}
    x = np.asarray(x)
    for key in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "bo", "b2"):
        if P[key].shape != x.shape[-1:]:
            raise ValueError(f"bad {key}")
    W1, b1, W2 = P["W1"], P["b1"], P["W2"]
    if P["Wo"].shape[0] != x.shape[-1] or W2.shape != (x.shape[-1], W1.shape[0]):
        raise ValueError("Wo, W1 and W2 do not fit hidden")'''

# --------------------------------------------------------------------------- mistakes

WRONG_SCALING = _student(
    "wrong_scaling", "divides the scores by head_dim instead of sqrt(head_dim)",
    {"test_heads_small", "test_heads_matches_dense", "test_heads_scaling", "test_heads_causal",
     "test_attention_small", "test_attention_matches_dense",
     "test_attention_uneven_heads", "test_attention_shapes", "test_attention_causal",
     "test_attention_gqa", "test_attention_kv_replicated", "test_attention_bias_once",
     "test_attention_bias_after_reduce", "test_attention_reduce_inputs", "test_attention_dtype",
     "test_layer_reduce_inputs"} | LAYER_VALUES,
    sol_attention_heads=f'''{_HEADS_DEF}
    scores = q @ k.swapaxes(-1, -2) / d                  # should be / sqrt(d)
    if causal:
        scores = np.where(future, -np.inf, scores)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True) @ v
''')

SOFTMAX_OVER_HEADS = _student(
    "softmax_over_heads", "normalizes the attention weights over the heads axis, the sharded one",
    WRONG_SCALING.loses | {"test_heads_stable"},
    sol_attention_heads=f'''{_HEADS_DEF}
    scores = q @ k.swapaxes(-1, -2) * d ** -0.5
    if causal:
        scores = np.where(future, -1e9, scores)
    weights = np.exp(scores - scores.max(axis=-3, keepdims=True))
    return weights / weights.sum(axis=-3, keepdims=True) @ v      # over heads, not keys
''')

MASK_AFTER_SOFTMAX = _student(
    "mask_after_softmax", "zeroes the future's weights after the softmax (rows no longer sum to 1)",
    {"test_heads_causal", "test_attention_causal", "test_layer_causal"},
    sol_attention_heads=f'''{_HEADS_DEF}
    scores = q @ k.swapaxes(-1, -2) * d ** -0.5
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    if causal:
        weights = np.where(future, 0.0, weights)          # too late: not renormalized
    return weights @ v
''')

KV_NOT_REPLICATED = _student(
    "kv_not_replicated", "splits the KV heads evenly on their own instead of following the "
    "query heads: ranks beyond num_kv_heads get no KV head",
    {"test_kv_ranges_small", "test_kv_ranges_replicated", "test_qkv_shard_kv_replicated",
     "test_attention_kv_replicated"},
    sol_kv_head_ranges='''
def kv_head_ranges(num_heads, num_kv_heads, num_ranks):
    for value in (num_heads, num_kv_heads):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"head counts must be ints >= 1, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError("num_kv_heads must divide num_heads")
    return [(s.start, s.stop) for s in shard_slices(num_kv_heads, num_ranks)]
''')

QKV_THIRDS = _student(
    "qkv_thirds", "splits the fused [q; k; v] weight into contiguous row blocks (thirds for "
    "3 ranks), as a plain ColumnParallelLinear would",
    {"test_qkv_shard_small", "test_qkv_shard_blocks", "test_qkv_shard_uneven_heads",
     "test_qkv_shard_gqa", "test_qkv_shard_kv_replicated"},
    sol_qkv_shard='''
def qkv_shard(W_qkv, num_heads, num_kv_heads, num_ranks, rank):
    W_qkv = np.asarray(W_qkv)
    kv_head_ranges(num_heads, num_kv_heads, num_ranks)            # validates the counts
    if not isinstance(rank, int) or not 0 <= rank < num_ranks:
        raise ValueError(f"bad rank {rank!r}")
    if W_qkv.ndim != 2 or W_qkv.shape[0] % (num_heads + 2 * num_kv_heads):
        raise ValueError(f"bad W_qkv {W_qkv.shape}")
    return W_qkv[shard_slices(W_qkv.shape[0], num_ranks)[rank]]  # contiguous rows
''')

HEADS_SPLIT_INSIDE = _student(
    "heads_split_inside", "gives every rank a slice of every head's features (a head split "
    "across ranks, softmax of partial scores)",
    {"test_attention_small", "test_attention_matches_dense", "test_attention_uneven_heads",
     "test_attention_shapes", "test_attention_causal", "test_attention_gqa",
     "test_attention_kv_replicated", "test_attention_bias_once",
     "test_attention_bias_after_reduce", "test_attention_reduce_inputs", "test_attention_dtype",
     "test_layer_reduce_inputs"} | LAYER_VALUES,
    sol_attention_tp=f'''{_ATTENTION_DEF}
    reads = [j // (H // G) for j in range(H)]
    q = split_heads(x @ Wq.T, d)                                  # every head on every rank
    k = split_heads(x @ Wk.T, d)[..., reads, :, :]
    v = split_heads(x @ Wv.T, d)[..., reads, :, :]
    partials = []
    for dims in shard_slices(d, num_ranks):                       # rank r: features `dims`
        cols = [h * d + i for h in range(H) for i in range(dims.start, dims.stop)]
        if not cols:
            partials.append(np.zeros(x.shape[:-1] + Wo.shape[:1], dtype=x.dtype))
            continue
        o = attention_heads(q[..., dims], k[..., dims], v[..., dims], causal)
        partials.append(merge_heads(o) @ Wo[:, cols].T)
    y = all_reduce(partials)
    return y if bo is None else y + bo
''')

QKV_ALL_REDUCE = _student(
    "qkv_all_reduce", "makes Q, K and V row-parallel with an all-reduce each before attention",
    {"test_attention_one_all_reduce", "test_layer_two_all_reduces"},
    sol_attention_tp=f'''{_ATTENTION_DEF}
    cols = shard_slices(x.shape[-1], num_ranks)                   # split the input features
    q, k, v = (all_reduce([x[..., c] @ W[:, c].T for c in cols]) for W in (Wq, Wk, Wv))
    partials = []
    for heads, (ka, kz) in zip(shard_slices(H, num_ranks), kv):
        rows = slice(heads.start * d, heads.stop * d)
        reads = [j // (H // G) - ka for j in range(heads.start, heads.stop)]
        k_r = split_heads(k[..., ka * d:kz * d], d)[..., reads, :, :]
        v_r = split_heads(v[..., ka * d:kz * d], d)[..., reads, :, :]
        o = attention_heads(split_heads(q[..., rows], d), k_r, v_r, causal)
{_REDUCE_ONCE}''')

BIAS_EVERY_RANK = _student(
    "output_bias_every_rank", "adds the output bias bo to every rank's partial before the "
    "all-reduce",
    {"test_attention_bias_once", "test_attention_bias_after_reduce",
     "test_layer_reduce_inputs"} | LAYER_VALUES,
    sol_attention_tp=f'''{_ATTENTION_DEF}
    partials = []
    for heads, (ka, kz) in zip(shard_slices(H, num_ranks), kv):{_RANK_HEADS}
        partial = merge_heads(o) @ Wo[:, rows].T
        partials.append(partial if bo is None else partial + bo)   # on every rank
    return all_reduce(partials)
''')

EMPTY_RANK_SKIPPED = _student(
    "empty_rank_skipped", "ranks without heads do not take part in the all-reduce",
    {"test_attention_reduce_inputs"},
    sol_attention_tp=f'''{_ATTENTION_DEF}
    partials = []
    for heads, (ka, kz) in zip(shard_slices(H, num_ranks), kv):
        if heads.stop == heads.start:
            continue                                              # "nothing to contribute"
{_RANK_HEADS.strip(chr(10))}
{_REDUCE_ONCE}''')

KV_TILE = _student(
    "kv_tile", "pairs a rank's query heads with its KV heads cyclically (np.tile), not in "
    "groups of num_heads // num_kv_heads (np.repeat)",
    {"test_attention_gqa"},
    sol_attention_tp=f'''{_ATTENTION_DEF}
    partials = []
    for heads, (ka, kz) in zip(shard_slices(H, num_ranks), kv):
        rows, kv_rows = slice(heads.start * d, heads.stop * d), slice(ka * d, kz * d)
        q = split_heads(x @ Wq[rows].T, d)
        k = split_heads(x @ Wk[kv_rows].T, d)
        v = split_heads(x @ Wv[kv_rows].T, d)
        reads = [i % (kz - ka) for i in range(heads.stop - heads.start)]   # tiles the groups
        o = attention_heads(q, k[..., reads, :, :], v[..., reads, :, :], causal)
{_REDUCE_ONCE}''')

LAYER_EXTRA_ALL_REDUCE = _student(
    "layer_extra_all_reduce", "makes the MLP's W1 row-parallel too: a third all-reduce",
    {"test_layer_two_all_reduces"},
    sol_transformer_layer_tp=f'''{_LAYER_DEF}
    h = x + attention_tp(layer_norm(x, P["ln1_w"], P["ln1_b"], eps), P["Wq"], P["Wk"],
                         P["Wv"], P["Wo"], num_heads, num_ranks, num_kv_heads, bo=P["bo"],
                         causal=causal)
    a = layer_norm(h, P["ln2_w"], P["ln2_b"], eps)
    u = all_reduce([a[..., c] @ W1[:, c].T for c in shard_slices(a.shape[-1], num_ranks)])
    z = activation(u + b1)
    y = all_reduce([z[..., s] @ W2[:, s].T for s in shard_slices(len(b1), num_ranks)])
    return h + y + P["b2"]
''')

LAYER_NORM_ON_PARTIALS = _student(
    "layer_norm_on_partials", "skips attention's all-reduce and applies LN2 to each rank's "
    "partial sum (one all-reduce in all)",
    {"test_layer_small", "test_layer_matches_dense", "test_layer_causal", "test_layer_uneven",
     "test_layer_two_all_reduces", "test_layer_reduce_inputs"},
    sol_transformer_layer_tp=f'''{_LAYER_DEF}
    H = num_heads
    G = H if num_kv_heads is None else num_kv_heads
    d = P["Wq"].shape[0] // H
    Wq, Wk, Wv = P["Wq"], P["Wk"], P["Wv"]
    x_in, x = x, layer_norm(x, P["ln1_w"], P["ln1_b"], eps)      # x: LN1's output
    units = shard_slices(W1.shape[0], num_ranks)
    outs = []
    for r, (heads, (ka, kz)) in enumerate(zip(shard_slices(H, num_ranks),
                                              kv_head_ranges(H, G, num_ranks))):{_RANK_HEADS}
        p_r = merge_heads(o) @ P["Wo"][:, rows].T                  # not reduced ...
        m = layer_norm(x_in + p_r + P["bo"], P["ln2_w"], P["ln2_b"], eps)   # ... but normalized
        outs.append(p_r + activation(m @ W1[units[r]].T + b1[units[r]]) @ W2[:, units[r]].T)
    return x_in + all_reduce(outs) + P["bo"] + P["b2"]
''')

RESIDUAL_EVERY_RANK = _student(
    "residual_every_rank", "adds the residual h inside every rank's MLP partial",
    {"test_layer_small", "test_layer_matches_dense", "test_layer_causal", "test_layer_uneven",
     "test_layer_reduce_inputs"},
    sol_transformer_layer_tp=f'''{_LAYER_DEF}
    h = x + attention_tp(layer_norm(x, P["ln1_w"], P["ln1_b"], eps), P["Wq"], P["Wk"],
                         P["Wv"], P["Wo"], num_heads, num_ranks, num_kv_heads, bo=P["bo"],
                         causal=causal)
    a = layer_norm(h, P["ln2_w"], P["ln2_b"], eps)
    partials = [h + activation(a @ W1[s].T + b1[s]) @ W2[:, s].T   # h on every rank
                for s in shard_slices(W1.shape[0], num_ranks)]
    return all_reduce(partials) + P["b2"]
''')

PARAMS_SCALED_IN_PLACE = _student(
    "layer_params_scaled_in_place", "right values, but doubles the caller's params['Wq'] in "
    "place after using it (a 'cache' of a pre-scaled weight): the caller's model changes",
    {"test_layer_inputs_unmodified"},
    sol_transformer_layer_tp=f'''{_LAYER_DEF}
    h = x + attention_tp(layer_norm(x, P["ln1_w"], P["ln1_b"], eps), P["Wq"], P["Wk"],
                         P["Wv"], P["Wo"], num_heads, num_ranks, num_kv_heads, bo=P["bo"],
                         causal=causal)
    a = layer_norm(h, P["ln2_w"], P["ln2_b"], eps)
    y = all_reduce([activation(a @ W1[s].T + b1[s]) @ W2[:, s].T
                    for s in shard_slices(W1.shape[0], num_ranks)])
    params["Wq"] *= 2
    return h + y + P["b2"]
''')

# tp_cost: one student text, each mistake a changed line.
_COST = '''
def tp_cost(config):
    c = dict(config)
    for key in CONFIG_INTS:
        if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
            raise ValueError(f"{key} must be an int >= 1")
    if c["link_bytes_per_s"] <= 0 or c["flops_per_s"] <= 0:
        raise ValueError("rates must be positive")
    L, h, H, G, t = c["layers"], c["hidden"], c["heads"], c["kv_heads"], c["tp"]
    if h % H:
        raise ValueError("head size is not an integer")
    if H % G or H % t or c["ffn"] % t or (G % t and t % G):
        raise ValueError("heads, kv_heads, ffn and tp do not divide")
    d, T, b, s = h // H, c["batch"] * c["seq"], c["batch"], c["seq"]
    H_r, G_r, f_r = H // t, (G // t if G >= t else 1), c["ffn"] // t
    allreduces = 0 if t == 1 else L * (4 if c["backward"] else 2)
    nbytes = allreduces * 2 * (t - 1) / t * T * h * c["dtype_bytes"]
    flops = L * (2 * T * h * (H_r + 2 * G_r) * d + 4 * b * H_r * s * s * d
                 + 2 * T * H_r * d * h + 4 * T * h * f_r)
    flops *= 3 if c["backward"] else 1
    comm, compute = nbytes / c["link_bytes_per_s"], flops / c["flops_per_s"]
    return dict(allreduces=allreduces, bytes_per_rank=nbytes, flops_per_rank=flops,
                comm_seconds=comm, compute_seconds=compute, comm_to_compute=comm / compute)
'''


def _cost(student, why, loses, old, new):
    assert old in _COST, old
    return _student(student, why, loses, sol_tp_cost="CONFIG_INTS = ('layers', 'hidden', "
                    "'heads', 'kv_heads', 'ffn', 'seq', 'batch', 'tp', 'dtype_bytes')\n"
                    + _COST.replace(old, new))


COST_NO_RING_FACTOR = _cost(
    "cost_no_ring_factor", "counts N * dtype_bytes per all-reduce, without the ring's "
    "2 (tp - 1) / tp", {"test_cost_example", "test_cost_bytes", "test_cost_time_ratio"},
    "allreduces * 2 * (t - 1) / t * T", "allreduces * T")
COST_KV_NOT_REPLICATED = _cost(
    "cost_kv_not_replicated", "takes kv_heads / tp KV heads per rank even when kv_heads < tp "
    "(a fraction of a head)", {"test_cost_flops"}, "(G // t if G >= t else 1)", "G / t")
COST_BACKWARD_2X = _cost(
    "cost_backward_2x", "counts forward + backward as 2x the forward FLOPs", {"test_cost_flops"},
    "flops *= 3 if", "flops *= 2 if")
COST_NO_HEAD_CHECK = _cost(
    "cost_no_head_check", "accepts hidden 4096 with 12 heads (head size 341.33)",
    {"test_cost_bad_config"}, '''    if h % H:
        raise ValueError("head size is not an integer")
''', "")

# --------------------------------------------------------------------------- valid alternatives

ALT_EINSUM = _student(
    "alt_einsum", "einsum everywhere, np.triu mask, math.ceil ranges, index-array shards", (),
    sol_attention_heads='''
import math


def attention_heads(q, k, v, causal=False):
    q, k, v = map(np.asarray, (q, k, v))
    if q.ndim < 3 or not q.shape == k.shape == v.shape:
        raise ValueError("q, k and v must have one shape (..., n, seq, d)")
    scores = np.einsum("...qd,...kd->...qk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores + np.triu(np.full(scores.shape[-2:], -np.inf, dtype=scores.dtype), k=1)
    scores = scores - scores.max(axis=-1, keepdims=True)
    w = np.exp(scores)
    return np.einsum("...qk,...kd->...qd", w / w.sum(axis=-1, keepdims=True), v)
''', sol_kv_head_ranges='''
def kv_head_ranges(num_heads, num_kv_heads, num_ranks):
    if type(num_heads) is not int or type(num_kv_heads) is not int:
        raise ValueError("head counts must be ints")
    if min(num_heads, num_kv_heads) < 1 or num_heads % num_kv_heads:
        raise ValueError("need num_kv_heads >= 1 dividing num_heads >= 1")
    g = num_heads // num_kv_heads
    return [(s.start // g, math.ceil(s.stop / g)) if s.stop > s.start else (0, 0)
            for s in shard_slices(num_heads, num_ranks)]
''', sol_qkv_shard='''
def qkv_shard(W_qkv, num_heads, num_kv_heads, num_ranks, rank):
    W_qkv = np.asarray(W_qkv)
    ranges = kv_head_ranges(num_heads, num_kv_heads, num_ranks)
    if W_qkv.ndim != 2 or W_qkv.shape[0] % (num_heads + 2 * num_kv_heads) \\
            or rank not in range(num_ranks):
        raise ValueError("bad W_qkv or rank")
    d = W_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    kv = range(*ranges[rank])
    heads = (list(range(num_heads)[shard_slices(num_heads, num_ranks)[rank]])
             + [num_heads + g for g in kv] + [num_heads + num_kv_heads + g for g in kv])
    rows = np.array([h * d + i for h in heads for i in range(d)], dtype=int)
    return W_qkv[rows]
''', sol_attention_tp='''
def attention_tp(x, Wq, Wk, Wv, Wo, num_heads, num_ranks, num_kv_heads=None, bo=None,
                 causal=False):
    x = np.asarray(x)
    H, G = num_heads, num_kv_heads or num_heads
    ranges = kv_head_ranges(H, G, num_ranks)
    if x.ndim < 2 or Wq.ndim != 2 or Wq.shape[1] != x.shape[-1] or not len(Wq) or len(Wq) % H:
        raise ValueError("x (..., seq, hidden) and Wq (H * d, hidden) do not fit")
    d = len(Wq) // H
    if Wk.shape != (G * d, x.shape[-1]) or Wv.shape != Wk.shape or Wo.shape[1:] != (H * d,):
        raise ValueError("Wk, Wv or Wo do not fit")
    if bo is not None and bo.shape != Wo.shape[:1]:
        raise ValueError("bo does not fit Wo")
    lead = x.shape[:-1]

    def heads_of(W, first, last):          # (..., n, seq, d) for heads first..last-1
        t = np.einsum("...i,oi->...o", x, W[first * d:last * d])
        return np.moveaxis(t.reshape(lead + (last - first, d)), -2, -3)

    partials = []
    for s, (ka, kz) in zip(shard_slices(H, num_ranks), ranges):
        group = [j // (H // G) - ka for j in range(s.start, s.stop)]
        o = attention_heads(heads_of(Wq, s.start, s.stop),
                            np.take(heads_of(Wk, ka, kz), group, axis=-3),
                            np.take(heads_of(Wv, ka, kz), group, axis=-3), causal)
        partials.append(np.einsum("...nsd,ond->...so", o,
                                  Wo[:, s.start * d:s.stop * d].reshape(len(Wo), -1, d)))
    y = all_reduce(partials)
    return y + bo if bo is not None else y
''', sol_tp_cost='''
CONFIG_INTS = ("layers", "hidden", "heads", "kv_heads", "ffn", "seq", "batch", "tp",
               "dtype_bytes")


def _matmul(m, k, n):
    return 2 * m * k * n


def tp_cost(config):
    if any(type(config[k]) is not int or config[k] < 1 for k in CONFIG_INTS):
        raise ValueError("every count must be a positive int")
    if min(config["link_bytes_per_s"], config["flops_per_s"]) <= 0:
        raise ValueError("rates must be positive")
    L, h, H, G, f, s, b, t, nb = (config[k] for k in CONFIG_INTS)
    ok = h % H == 0 and H % G == 0 and H % t == 0 and f % t == 0 and (G % t == 0 or t % G == 0)
    if not ok:
        raise ValueError("no engine runs this configuration")
    d, tok = h // H, b * s
    hr, gr = H // t, max(G // t, 1)
    per_layer = (_matmul(tok, h, (hr + 2 * gr) * d) + 2 * b * hr * _matmul(s, d, s)
                 + _matmul(tok, hr * d, h) + 2 * _matmul(tok, h, f // t))
    n_ar = 0 if t == 1 else 2 * L * (1 + config["backward"])
    out = {"allreduces": n_ar,
           "bytes_per_rank": n_ar * (2 * (t - 1) / t) * tok * h * nb,
           "flops_per_rank": L * per_layer * (1 + 2 * config["backward"])}
    out["comm_seconds"] = out["bytes_per_rank"] / config["link_bytes_per_s"]
    out["compute_seconds"] = out["flops_per_rank"] / config["flops_per_s"]
    out["comm_to_compute"] = out["comm_seconds"] / out["compute_seconds"]
    return out
''')

ALT_LOOPS = _student(
    "alt_loops", "one head at a time, loops over leading dims, KV ranges from a set", (),
    sol_attention_heads='''
def attention_heads(q, k, v, causal=False):
    if q.ndim < 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError("q, k, v: one shape (..., n, seq, d) of at least 3 dims")
    out = np.empty_like(q)
    seq, d = q.shape[-2:]
    for idx in np.ndindex(*q.shape[:-2]):                # every (batch..., head)
        s = q[idx] @ k[idx].T / d ** 0.5                  # (seq, seq)
        for i in range(seq):
            row = s[i, : i + 1] if causal else s[i]       # the keys query i may see
            w = np.exp(row - row.max())
            out[idx][i] = (w / w.sum()) @ v[idx][: len(row)]
    return out
''', sol_kv_head_ranges='''
def kv_head_ranges(num_heads, num_kv_heads, num_ranks):
    for n in (num_heads, num_kv_heads):
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError("head counts must be positive ints")
    if num_heads % num_kv_heads != 0:
        raise ValueError("num_kv_heads must divide num_heads")
    out = []
    for s in shard_slices(num_heads, num_ranks):
        used = sorted({j // (num_heads // num_kv_heads) for j in range(s.start, s.stop)})
        out.append((used[0], used[-1] + 1) if used else (num_kv_heads, num_kv_heads))
    return out
''', sol_qkv_shard='''
def qkv_shard(W_qkv, num_heads, num_kv_heads, num_ranks, rank):
    ranges = kv_head_ranges(num_heads, num_kv_heads, num_ranks)
    if not isinstance(rank, int) or rank < 0 or rank >= num_ranks:
        raise ValueError("rank out of range")
    if np.ndim(W_qkv) != 2 or len(W_qkv) % (num_heads + 2 * num_kv_heads) != 0:
        raise ValueError("W_qkv rows are not (num_heads + 2 * num_kv_heads) * head_dim")
    d = len(W_qkv) // (num_heads + 2 * num_kv_heads)
    q_block = W_qkv[: num_heads * d]
    k_block = W_qkv[num_heads * d: (num_heads + num_kv_heads) * d]
    v_block = W_qkv[(num_heads + num_kv_heads) * d:]
    q = shard_slices(num_heads, num_ranks)[rank]
    ka, kz = ranges[rank]
    return np.vstack([q_block[q.start * d: q.stop * d], k_block[ka * d: kz * d],
                      v_block[ka * d: kz * d]])
''', sol_attention_tp='''
def attention_tp(x, Wq, Wk, Wv, Wo, num_heads, num_ranks, num_kv_heads=None, bo=None,
                 causal=False):
    G = num_heads if num_kv_heads is None else num_kv_heads
    kv_head_ranges(num_heads, G, num_ranks)
    if x.ndim < 2 or Wq.ndim != 2 or Wq.shape[1] != x.shape[-1] or Wq.shape[0] % num_heads \\
            or Wq.shape[0] == 0:
        raise ValueError("x and Wq do not fit")
    d = Wq.shape[0] // num_heads
    if Wk.shape != (G * d, x.shape[-1]) or Wv.shape != Wk.shape or Wo.ndim != 2 \\
            or Wo.shape[1] != num_heads * d or (bo is not None and bo.shape != (Wo.shape[0],)):
        raise ValueError("Wk, Wv, Wo or bo do not fit")
    partials = []
    for heads in shard_slices(num_heads, num_ranks):
        partial = np.zeros(x.shape[:-1] + (Wo.shape[0],), dtype=np.result_type(x, Wq))
        for h in range(heads.start, heads.stop):          # this rank's heads, one by one
            g = h // (num_heads // G)
            q = (x @ Wq[h * d:(h + 1) * d].T)[..., None, :, :]
            k = (x @ Wk[g * d:(g + 1) * d].T)[..., None, :, :]
            v = (x @ Wv[g * d:(g + 1) * d].T)[..., None, :, :]
            o = attention_heads(q, k, v, causal)[..., 0, :, :]
            partial = partial + o @ Wo[:, h * d:(h + 1) * d].T
        partials.append(partial)
    y = all_reduce(partials)
    if bo is not None:
        y = y + bo
    return y
''')

ALT_FUSED = _student(
    "alt_fused", "attention_tp built on qkv_shard: one fused GEMM per rank, then split, as vLLM",
    (), sol_attention_tp='''
def attention_tp(x, Wq, Wk, Wv, Wo, num_heads, num_ranks, num_kv_heads=None, bo=None,
                 causal=False):
    x, Wq, Wk, Wv, Wo = map(np.asarray, (x, Wq, Wk, Wv, Wo))
    H = num_heads
    G = H if num_kv_heads is None else num_kv_heads
    kv = kv_head_ranges(H, G, num_ranks)
    if x.ndim < 2 or Wq.ndim != 2 or Wq.shape[1] != x.shape[-1] or not len(Wq) or len(Wq) % H:
        raise ValueError("x and Wq do not fit")
    d = len(Wq) // H
    if Wk.shape != (G * d, x.shape[-1]) or Wv.shape != Wk.shape or Wo.ndim != 2 \\
            or Wo.shape[1] != H * d:
        raise ValueError("Wk, Wv or Wo do not fit")
    if bo is not None and np.shape(bo) != Wo.shape[:1]:
        raise ValueError("bo does not fit")
    W_qkv = np.concatenate([Wq, Wk, Wv])                    # QKVParallelLinear's full weight
    partials = []
    for rank, (heads, (ka, kz)) in enumerate(zip(shard_slices(H, num_ranks), kv)):
        n_q, n_kv = heads.stop - heads.start, kz - ka
        qkv = x @ qkv_shard(W_qkv, H, G, num_ranks, rank).T  # one GEMM for q, k and v
        q, k, v = np.split(qkv, [n_q * d, (n_q + n_kv) * d], axis=-1)
        reads = [j // (H // G) - ka for j in range(heads.start, heads.stop)]
        o = attention_heads(split_heads(q, d), split_heads(k, d)[..., reads, :, :],
                            split_heads(v, d)[..., reads, :, :], causal)
        partials.append(merge_heads(o) @ Wo[:, heads.start * d:heads.stop * d].T)
    out = all_reduce(partials)
    return out if bo is None else out + bo
''', sol_transformer_layer_tp='''
LAYER_KEYS = ("ln1_w", "ln1_b", "Wq", "Wk", "Wv", "Wo", "bo", "ln2_w", "ln2_b", "W1", "b1",
              "W2", "b2")


def transformer_layer_tp(x, params, num_heads, num_ranks, num_kv_heads=None, causal=False,
                         eps=1e-5, activation=relu):
    if set(LAYER_KEYS) - set(params):
        raise ValueError("params lacks some keys")
    p = {key: np.asarray(value) for key, value in params.items()}
    n = x.shape[-1]
    if any(p[key].shape != (n,) for key in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "bo", "b2")):
        raise ValueError("LayerNorm weights and the biases bo, b2 must be (hidden,)")
    if p["Wo"].shape[0] != n or p["W1"].shape[1:] != (n,) or p["W2"].shape != (n, len(p["W1"])) \\
            or p["b1"].shape != (len(p["W1"]),):
        raise ValueError("Wo, W1, b1 or W2 do not fit hidden")
    attn = attention_tp(layer_norm(x, p["ln1_w"], p["ln1_b"], eps), p["Wq"], p["Wk"], p["Wv"],
                        p["Wo"], num_heads, num_ranks, num_kv_heads, p["bo"], causal)
    h = attn + x
    a = layer_norm(h, p["ln2_w"], p["ln2_b"], eps)
    mlp = all_reduce([activation(a @ p["W1"][s].T + p["b1"][s]) @ p["W2"][:, s].T
                      for s in shard_slices(len(p["W1"]), num_ranks)])
    return mlp + p["b2"] + h
''')

# --------------------------------------------------------------------------- lists

REFERENCE = [Submission("reference", ATTENTION, why="the instructor's solutions")]
UNMODIFIED = [Submission("unmodified", ATTENTION, why="the release as handed out",
                         unanswered=frozenset({ATTENTION}), loses_all=True)]

MISTAKES = [WRONG_SCALING, SOFTMAX_OVER_HEADS, MASK_AFTER_SOFTMAX, KV_NOT_REPLICATED, QKV_THIRDS,
            HEADS_SPLIT_INSIDE, QKV_ALL_REDUCE, BIAS_EVERY_RANK, EMPTY_RANK_SKIPPED, KV_TILE,
            LAYER_EXTRA_ALL_REDUCE, LAYER_NORM_ON_PARTIALS, RESIDUAL_EVERY_RANK,
            PARAMS_SCALED_IN_PLACE,
            COST_NO_RING_FACTOR, COST_KV_NOT_REPLICATED, COST_BACKWARD_2X, COST_NO_HEAD_CHECK]
VALID = [ALT_EINSUM, ALT_LOOPS, ALT_FUSED]
STUDENTS = MISTAKES + VALID
ALL = REFERENCE + UNMODIFIED + STUDENTS
DEMO = ("qkv_thirds", "output_bias_every_rank")
