"""The grader side of tp_torch_attention's units: verdicts on what the ranks reported
(gpu/observe.py), against the assignment's float64 references (dense.py), through
tpgrade.verdict, as gpu_runner.judge says. numpy only.

The TP overhead measurement (overhead.measure) is judged on three properties, each a sub-check
of gpu_timing, with the amounts of gpu/data.py:
- result: a dict {n: (compute_ms, comm_ms)} with the sizes asked for, positive numbers;
- agrees: the student's function runs between runs of the grader's own measurement of the same
  procedure (g s g s ... g, in the same launch); for every size and quantity, at least one of the
  student's runs (each a median of repeats) lies within [min / 3, max x 3] of the two grader runs
  around it. Load comes in bursts that can slow any one run several times over; a student off
  by a constant factor (seconds for milliseconds, a total for a median) is off in every pair,
  while a burst would have to hit every pair (bench/overhead_agreement_bench.py measures it);
- barrier: with the group's last rank slowed after every matmul, the other ranks' all-reduces
  do not include the wait (below SKEW_MS / 2) in one of PROBE_RUNS runs: the clock started
  after a barrier;
- warmup: with the first calls of each shape slowed, the medians do not include them (below
  COLD_MS / 2) in one of PROBE_RUNS runs: untimed warm-up rounds came first.
"""
from __future__ import annotations

import math

from assignments.tp_torch_attention import dense as attention_dense
from gpu_runner import records
from gpu_runner.judge import NOT_CONNECTED, Absent, counts, first, float64_verdicts
from gpu_runner.plan import handlers
from tpgrade import tensors
from tpgrade.verdict import mismatch
from tpgrade.cases import balanced

from . import data
from . import plan


def _grad(view, rank, key, want, what, **diagnoses):
    return mismatch(view.tensor(rank, "grads", key), want, what, missing=NOT_CONNECTED,
                    **diagnoses)


# -- ParallelAttention ------------------------------------------------------------------------------
def _partial_only(case, rank, size):
    """The output of a rank whose partial sums never reached the all-reduce (plus the bias)."""
    own = attention_dense.own_heads(case.x, case.P, case.heads, case.kv, rank, size, case.causal).y
    return (own + case.P["bo"], "this rank's heads only: the output projection's partial sums "
                                "must be summed over the ranks (reduce_from_tp_region)")


def _forward_suspects(view, case, dense, rank):
    found = [tensors.bias_every_rank(dense, case.P["bo"], view.size), _partial_only(case, rank,
                                                                                    view.size)]
    if case.causal:
        P, args = case.P, (case.x, case.P["wq"], case.P["wk"], case.P["wv"], case.P["wo"],
                           case.heads, case.kv)
        found += [(attention_dense.attention(*args, False, P["bo"]).y,
                   "no causal mask: query i must not "
                   "see keys j > i"),
                  (attention_dense.attention(*args, True, P["bo"], mask_after=True).y,
                   "the mask was applied "
                   "after the softmax: mask the scores with -inf before it, so that each row's "
                   "weights sum to 1")]
    return found


def attention_forward(view):
    for i, (name, case) in enumerate(zip(("attention.forward", "attention.forward_causal"),
                                         data.attention_cases(view.seed, "forward"))):
        dense = case.attention().y
        what = (f"the output ({case.heads} heads, {case.kv} KV heads"
                f"{', causal' if case.causal else ''})")
        view.each(name, lambda r, i=i, case=case, dense=dense, what=what: mismatch(
            view.tensor(r, f"y{i}"), dense, what,
            suspects=_forward_suspects(view, case, dense, r)))
    counts(view, "counts.attention_forward", "counts0", {"allreduce": 1})


def _attention_grads(view, rank, ref, proj_bias_key="proj_b", prefix=""):
    """qkv.weight, proj.weight and proj.bias gradients of one rank."""
    return (_grad(view, rank, "qkv", ref.qkv_rows(rank, view.size),
                  f"{prefix}qkv.weight.grad (this rank's heads' rows of the dense gradient; for a "
                  f"KV head replicated on several ranks, the share of this rank's query heads)"),
            first(_grad(view, rank, "proj_w", ref.proj_columns(rank, view.size),
                         f"{prefix}proj.weight.grad (this rank's heads' columns of the dense "
                         f"gradient)"),
                   _grad(view, rank, proj_bias_key, ref.dbo, f"{prefix}proj.bias.grad",
                         suspects=[tensors.bias_grad_rank0_only(ref.dbo)])))


def attention_backward(view):
    case = data.attention_cases(view.seed, "backward")[0]
    ref = case.attention(upstream=True)
    view.each("attention.grad_input", lambda r: mismatch(
        view.tensor(r, "gx"), ref.dx, "dL/dx", missing=NOT_CONNECTED,
        suspects=[tensors.own_term_only(attention_dense.own_heads(case.x, case.P, case.heads,
                                                                  case.kv, r, view.size,
                                                                  case.causal, case.g).dx,
                                  "the QKV projection's input must go through copy_to_tp_region "
                                  "(f)")]))
    view.each("attention.grad_qkv", lambda r: _attention_grads(view, r, ref)[0])
    view.each("attention.grad_proj", lambda r: _attention_grads(view, r, ref)[1])
    counts(view, "counts.attention_backward", "counts", {"allreduce": 1})


def attention_float64(view):
    case = data.attention_cases(view.seed, "float64")[0]
    ref = case.attention(upstream=True)
    float64_verdicts(view, "attention", ref.y, ref.dx)


# -- ParallelTransformerLayer -----------------------------------------------------------------------
def layer_forward(view):
    case = data.layer_case(view.seed)
    dense = case.layer().y
    view.each("layer.forward", lambda r: mismatch(
        view.tensor(r, "y"), dense, "the layer's output (h = x + attn(ln1(x)), "
                                    "y = h + mlp(ln2(h)))",
        suspects=[tensors.bias_every_rank(dense, case.P["b2"], view.size)]))     # fc2's bias
    counts(view, "counts.layer_forward", "counts", {"allreduce": 2})


def layer_backward(view):
    case = data.layer_case(view.seed)
    ref = case.layer(upstream=True)
    p = ref.params

    def part(rank):
        return slice(*balanced(data.FFN, view.size)[rank])

    view.each("layer.grad_input", lambda r: mismatch(view.tensor(r, "gx"), ref.dx, "dL/dx",
                                                     missing=NOT_CONNECTED))
    view.each("layer.grad_norms", lambda r: first(*(
        _grad(view, r, key, p[key], f"{name}.grad (LayerNorm is replicated: the full gradient "
                                    f"on every rank)")
        for key, name in (("ln1_w", "ln1.weight"), ("ln1_b", "ln1.bias"),
                          ("ln2_w", "ln2.weight"), ("ln2_b", "ln2.bias")))))
    view.each("layer.grad_attention", lambda r: first(
        *_attention_grads(view, r, ref.attention, prefix="attn.")))
    view.each("layer.grad_mlp", lambda r: first(
        _grad(view, r, "fc1_w", p["w1"][part(r)], "mlp.fc1.weight.grad (its rows)"),
        _grad(view, r, "fc1_b", p["b1"][part(r)], "mlp.fc1.bias.grad (its slice)"),
        _grad(view, r, "fc2_w", p["w2"][:, part(r)], "mlp.fc2.weight.grad (its columns)"),
        _grad(view, r, "fc2_b", p["b2"], "mlp.fc2.bias.grad")))
    counts(view, "counts.layer_backward", "counts", {"allreduce": 2})


# -- the TP overhead measurement ----------------------------------------------------------------------
def _table(rec, sizes):
    """A reported measure_overhead result as {n: (compute_ms, comm_ms)}; raises ValueError with
    what is wrong with it."""
    if isinstance(rec, dict):
        raise ValueError(f"measure_overhead returned a {str(rec.get('type'))[:60]}, expected a "
                         f"dict {{n: (compute_ms, comm_ms)}}")
    if not isinstance(rec, list):
        raise records.Malformed("a timing record is not a list")
    got = {}
    for row in rec:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], int)):
            raise ValueError("measure_overhead's values must be pairs (compute_ms, comm_ms)")
        n, *pair = row
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and 0 < v < math.inf for v in pair):
            raise ValueError(f"measure_overhead(...)[{n}] = {tuple(pair)}: two positive numbers "
                             f"expected, milliseconds")
        got[n] = tuple(float(v) for v in pair)
    if sorted(got) != sorted(sizes):
        raise ValueError(f"measure_overhead returned the sizes {sorted(got)}, asked for "
                         f"{sorted(sizes)}")
    return got


def _checked(verdict):
    """A verdict whose ValueError is its text (a result that cannot be read fails the check)."""
    def run(rank):
        try:
            return verdict(rank)
        except ValueError as exc:
            if isinstance(exc, records.Malformed):
                raise
            return str(exc)
    return run


_WHAT = ("compute", "all-reduce")


def _agrees(view, rank, sizes):
    runs = [_table(rec, sizes) for rec in view.obs(rank, "student")]
    ours = [_table(rec, sizes) for rec in view.obs(rank, "grader")]
    if not runs or len(ours) != len(runs) + 1:
        raise records.Malformed("the timing runs are not interleaved with the grader's")
    for n in sizes:
        for i, what in enumerate(_WHAT):
            pairs = [(run[n][i], ours[k][n][i], ours[k + 1][n][i]) for k, run in enumerate(runs)]
            if not any(min(a, b) / data.AGREE_FACTOR <= mine <= max(a, b) * data.AGREE_FACTOR
                       for mine, a, b in pairs):
                theirs = [t for _, a, b in pairs for t in (a, b)]
                return (f"the {what} time at n={n}: your {len(runs)} runs measured "
                        f"{min(p[0] for p in pairs):.3g}-{max(p[0] for p in pairs):.3g} ms, the "
                        f"grader's same procedure, run before and after each of them, "
                        f"{min(theirs):.3g}-{max(theirs):.3g} ms: none within "
                        f"{data.AGREE_FACTOR:g}x of the runs around it (milliseconds per matmul / "
                        f"per all-reduce, the median of the repeats)")
    return ""


def _probed(view, rank, key, probe):
    """The (compute_ms, comm_ms) of each run of the student's function under a probe."""
    runs = view.obs(rank, key)
    if not isinstance(runs, list) or len(runs) != data.PROBE_RUNS:
        raise records.Malformed(f"the {key} runs")
    n = probe["sizes"][0]
    return [_table(rec, probe["sizes"])[n] for rec in runs]


def _barrier(view, rank, probe):
    if rank == view.size - 1:
        return ""                         # the slow rank itself
    comm = min(c for _, c in _probed(view, rank, "skew", probe))
    if comm < data.SKEW_MS / 2:
        return ""
    return (f"with rank {view.size - 1} of {view.size} made {data.SKEW_MS:g} ms slower after each "
            f"matmul, this rank's all-reduce took {comm:.3g} ms (median; the better of "
            f"{data.PROBE_RUNS} runs): its clock started "
            f"before the slow rank arrived, so it timed the wait; call dist.barrier(group=group) "
            f"before each timed region")


def _warmup(view, rank, probe):
    compute, comm = min(_probed(view, rank, "cold", probe), key=max)
    if max(compute, comm) < data.COLD_MS / 2:
        return ""
    return (f"with the first {data.COLD_CALLS} calls of each matmul and all-reduce shape made "
            f"{data.COLD_MS:g} ms slower (first calls are slow on a GPU), your medians with "
            f"warmup={probe['warmup']}, repeats={probe['repeats']} were {compute:.3g} ms "
            f"(compute) and {comm:.3g} ms (all-reduce; the better of {data.PROBE_RUNS} runs): "
            f"run `warmup` untimed rounds of both "
            f"before timing")


def overhead_measure(view):
    try:
        kind = "cuda" if view.obs(0, "device") == "cuda" else "cpu"
    except Absent:
        kind = "cpu"                      # nothing reported: every check fails anyway
    sizes, probe = data.MEASURE[kind]["sizes"], data.probe_args(kind)

    def result(rank):
        for rec in view.obs(rank, "student"):
            _table(rec, sizes)
        return ""
    view.each("overhead.result", _checked(result))
    view.each("overhead.agrees", _checked(lambda r: _agrees(view, r, sizes)))
    view.each("overhead.barrier", _checked(lambda r: _barrier(view, r, probe)))
    view.each("overhead.warmup", _checked(lambda r: _warmup(view, r, probe)))


JUDGES = handlers(globals(), plan)
