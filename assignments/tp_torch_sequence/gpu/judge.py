"""tp_torch_sequence's units, the grader side: every verdict, from what the ranks reported,
against the assignment's dense float64 references (dense.py) recomputed here from its data's
seeds (gpu/data.py), through tpgrade.verdict (the notebook's verdict core: tolerance, shape
rule, messages). numpy only.

The collectives are judged from each rank's trace (gpu_runner.collective_trace): the KIND and
number of every collective the code asked for (plus any the backend ran that no call explains),
and for the cross-entropy the size of every one.
"""
from __future__ import annotations

from collections import Counter

from assignments.tp_torch_sequence import dense as sequence_dense
from gpu_runner import judge as runner_judge
from gpu_runner import records
from gpu_runner.plan import handlers
from tpgrade import tensors
from tpgrade.verdict import mismatch

from . import data
from . import plan

_MAPPING_NAMES = {"gather": "gather_from_sequence_parallel_region",
                  "reduce_scatter": "reduce_scatter_to_sequence_parallel_region",
                  "scatter": "scatter_to_sequence_parallel_region"}


# -- reading a trace ----------------------------------------------------------------------------
def trace(rec) -> dict:
    """A rank's collective trace, validated: {"ops": {kind: n}, "events": [[kind, numel]],
    "world_size": p}. Raises records.Malformed."""
    if not (isinstance(rec, dict) and isinstance(rec.get("events"), list)
            and isinstance(rec.get("world_size"), int)):
        raise records.Malformed("a collective trace is not {ops, events, world_size}")
    ops = records.counts(rec.get("ops"))
    events = rec["events"]
    if not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
               and isinstance(e[1], int) and not isinstance(e[1], bool) for e in events):
        raise records.Malformed("a collective event is not [kind, numel]")
    return {"ops": ops, "events": events, "world_size": rec["world_size"]}


def trace_counts(rec) -> dict[str, int]:
    """{kind: n}: the collectives asked for (the dispatcher's ops), plus the backend events no
    op explains: an event of kind k is explained by an op of kind k, and on gloo up to
    world-size "allreduce" events by one reduce-scatter (gloo runs it as all-reduces)."""
    t = trace(rec)
    budget = Counter(t["ops"])
    budget["allreduce"] += t["ops"].get("reducescatter", 0) * t["world_size"]
    found = Counter(t["ops"])
    for k, _ in t["events"]:
        if budget[k] > 0:
            budget[k] -= 1
        else:
            found[k] += 1
    return {k: n for k, n in found.items() if n}


def _describe(counts):
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no collectives"


_HINTS = (
    (("allreduce", "reducescatter"), "an all-reduce where a reduce-scatter belongs (then a "
                                     "slice: twice the data)"),
    (("allgather", "allreduce"), "the logits (or lookups) all-gathered: only one number per "
                                 "token may travel"),
)


def _traced_counts(view, name, key, expected):
    """The kinds and numbers of the collectives in `key`'s trace, at world size >= 2."""
    if view.size < 2:
        return

    def verdict(rank):
        got = trace_counts(view.obs(rank, key))
        if got == expected:
            return ""
        hint = next((why for (ran, want), why in _HINTS if ran in got and want in expected
                     and ran not in expected), "")
        return (f"ran {_describe(got)}, expected {_describe(expected)}"
                + (f": {hint}" if hint else ""))
    view.each(name, verdict)


# -- the sequence-parallel mappings -------------------------------------------------------------
def _mapping_want(which, case, s, rank, size):
    """(the output, the input's gradient) rank `rank` must report, s tokens."""
    mine = data.rows(s, rank, size)
    if which == "gather":
        ups = sum(case.per_rank(r, size, salt=5)[:s].astype("float64") for r in range(size))
        return case.x[:s], ups[mine]
    if which == "reduce_scatter":
        parts = sum(case.per_rank(r, size, salt=6)[:s].astype("float64") for r in range(size))
        return parts[mine], case.g[:s]
    return case.x[:s][mine], case.g[:s]


def _mapping_shapes(which, case, s, rank, size):
    """Wrong output shapes a known mistake produces."""
    mine = data.rows(s, rank, size)
    own, h = mine.stop - mine.start, case.x.shape[-1]
    wrong_axis = (s, data.BATCH, data.rows(h, rank, size).stop - data.rows(h, rank, size).start)
    if which == "reduce_scatter" and size > 1:
        return [(wrong_axis, "reduce-scattered along the last (hidden) dim: sequence "
                             "parallelism splits the sequence, dim 0"),
                ((s, data.BATCH, h), "every token returned (an all-reduce): keep this rank's "
                                  "rows of the sum")]
    if which == "gather" and size > 1:
        return [((own, data.BATCH, h), "only this rank's tokens returned")]
    return []


def _own_upstream(case, s, rank, size):
    """The gradient of a gather whose backward keeps this rank's rows of its own upstream
    (a split, not a reduce-scatter)."""
    return case.per_rank(rank, size, salt=5)[:s][data.rows(s, rank, size)]


def seqmap(view, which):
    case = data.mappings(view.seed)
    fn = _MAPPING_NAMES[which]
    for tag, s in (("", data.SEQ), ("_short", data.SHORT_SEQ)):
        def forward(rank, s=s, tag=tag):
            want, _ = _mapping_want(which, case, s, rank, view.size)
            return mismatch(view.tensor(rank, f"y{tag}"), want, f"{fn}'s output ({s} tokens)",
                            shapes=_mapping_shapes(which, case, s, rank, view.size))

        def backward(rank, s=s, tag=tag):
            _, want = _mapping_want(which, case, s, rank, view.size)
            suspects = [(_own_upstream(case, s, rank, view.size),
                         "only this rank's upstream gradient: the gather's backward must "
                         "reduce-scatter (sum over the ranks)")] if which == "gather" else []
            return mismatch(view.tensor(rank, f"gx{tag}"), want,
                            f"the input's gradient through {fn} ({s} tokens)",
                            missing=f"{runner_judge.NOT_CONNECTED} (a collective without its "
                                    f"autograd twin?)", suspects=suspects)
        view.each(f"seqmap.{which}_forward", forward)
        view.each(f"seqmap.{which}_backward", backward)
    expected = {"gather": ({"allgather": 1}, {"reducescatter": 1}),
                "reduce_scatter": ({"reducescatter": 1}, {"allgather": 1}),
                "scatter": ({}, {"allgather": 1})}[which]
    for key, want in zip(("counts.forward", "counts.backward"), expected):
        _traced_counts(view, f"seqcounts.{which}", key, want)


# -- LayerSP ---------------------------------------------------------------------------------
def _block(view):
    case = data.block(view.seed)
    return case, sequence_dense.sp_block(case.x, case.ln_w, case.ln_b, case.w1, case.b1, case.w2,
                                         case.b2,
                                         case.g, data.EPS)


def sp_forward(view):
    case, dense = _block(view)
    view.each("sp.forward", lambda r: mismatch(
        view.tensor(r, "y"), dense["y"][data.rows(data.SEQ, r, view.size)],
        "LayerSP's output (this rank's tokens of the dense block)",
        shapes=[((data.SEQ, data.BATCH, data.SP_DIMS[0]),
                 "every token returned: each rank keeps its "
                                                 "own tokens")],
        suspects=[(dense["y"][data.rows(data.SEQ, r, view.size)] + (view.size - 1) * case.b2,
                   "fc2's bias counted on every rank before the reduce-scatter")]))
    _traced_counts(view, "seqcounts.sp_forward", "counts", {"allgather": 1, "reducescatter": 1})


def sp_backward(view):
    case, dense = _block(view)
    size = view.size

    def grad(rank, key, want, what):
        return mismatch(view.tensor(rank, "grads", key), want, what,
                        missing=runner_judge.NOT_CONNECTED)

    def units(rank):
        return data.rows(data.SP_DIMS[1], rank, size)

    def tokens(rank):
        return data.rows(data.SEQ, rank, size)
    view.each("sp.grad_input", lambda r: mismatch(
        view.tensor(r, "gx"), dense["dx"][tokens(r)], "dL/dx of this rank's tokens",
        missing=runner_judge.NOT_CONNECTED,
        suspects=[(sequence_dense.mlp_input_grad_twice(dense, tokens(r), size),
                   f"the MLP's part counted {size} times: fc1 called as a layer after the "
                   f"gather (its f all-reduces what the reduce-scatter sums again)")]))
    view.each("sp.grad_weights", lambda r: runner_judge.first(
        grad(r, "w1", dense["dw1"][units(r)], "fc1.weight.grad (its rows of the dense one)"),
        grad(r, "w2", dense["dw2"][:, units(r)], "fc2.weight.grad (its columns of the dense "
                                                 "one)")))
    view.each("sp.grad_biases", lambda r: runner_judge.first(
        grad(r, "b1", dense["db1"][units(r)], "fc1.bias.grad (its slice of the dense one)"),
        grad(r, "b2", sequence_dense.own_token_grads(dense, tokens(r))["b2"],
             "fc2.bias.grad (the dense one over this rank's own tokens)")))

    def layernorm(rank):
        own = sequence_dense.own_token_grads(dense, tokens(rank))
        gathered = sequence_dense.layer_norm_grads_gathered(dense, case.w1, units(rank))
        return runner_judge.first(*(mismatch(view.tensor(rank, "grads", key), own[key],
                                              f"{name} (over this rank's own tokens)",
                                              missing=runner_judge.NOT_CONNECTED,
                                              suspects=[(wrong, sequence_dense.LAYERNORM_GATHERED)])
                          for key, wrong, name in (("ln_w", gathered[0], "ln.weight.grad"),
                                                   ("ln_b", gathered[1], "ln.bias.grad"))))
    view.each("sp.grad_layernorm", layernorm)
    _traced_counts(view, "seqcounts.sp_backward", "counts", {"allgather": 1, "reducescatter": 1})


def _float64(view, family, y, dx, what):
    """gpu_runner.judge's float64 verdicts on gpu/observe.py's _float64_run's reports."""
    view.each(f"{family}.forward_float64", lambda r: runner_judge.float64_output_verdict(
        view, r, y(r), f"the float64 {what}"))
    view.each(f"{family}.grad_float64", lambda r: runner_judge.float64_verdict(
        view, r, "gx", dx(r), "the gradient of a float64 run"))


def sp_float64(view):
    _, dense = _block(view)

    def tokens(rank):
        return data.rows(data.SEQ, rank, view.size)
    _float64(view, "sp", lambda r: dense["y"][tokens(r)], lambda r: dense["dx"][tokens(r)],
             "output")


# -- VocabParallelEmbedding -------------------------------------------------------------------
def _emb_weight(view, rank, key, table, master, what):
    lo, hi = data.balanced(len(table), view.size)[rank]
    rec = view.obs(rank, key)
    got = records.tensor(rec)
    text = mismatch(got, master[lo:hi], what,
                    shapes=[(master.shape, "the whole table: keep this rank's rows only")],
                    suspects=tensors.other_shards(master, data.balanced(len(table), view.size),
                                                  rank,
                                            0, "rows"))
    if not text and not rec.get("parameter"):
        return ".weight is not an nn.Parameter"
    return text


def emb_shards(view):
    case = data.embedding(view.seed)
    view.each("emb.shards", lambda r: _emb_weight(
        view, r, "shards", case.table, case.master(r, view.size),
        ".weight (this rank's rows of master_weight)"))

    def default(rank):
        lo, hi = data.balanced(data.VOCAB, view.size)[rank]
        rec = view.obs(rank, "default")
        got = records.tensor(rec)
        if got is None or not rec.get("parameter") or got.shape != (hi - lo, data.EMB_DIM):
            return (f".weight without master_weight: {None if got is None else got.shape}, "
                    f"expected an nn.Parameter {(hi - lo, data.EMB_DIM)}")
        return ""
    view.each("emb.default_init", default)
    if view.size >= 2:
        small = data.embedding(view.seed, data.SMALL_VOCAB)
        view.each("emb.empty_shard", lambda r: _emb_weight(
            view, r, "empty", small.table, small.master(r, view.size),
            f".weight of a vocabulary of {data.SMALL_VOCAB} (this rank's rows; maybe none)"))


def emb_forward(view):
    for tag, vocab, name in (("", data.VOCAB, "emb.forward"),
                             ("_small", data.SMALL_VOCAB, "emb.forward_small_vocab")):
        case = data.embedding(view.seed, vocab)
        dense, _ = sequence_dense.embedding(case.table, case.ids, case.g)
        view.each(name, lambda r, tag=tag, vocab=vocab, case=case, dense=dense: mismatch(
            view.tensor(r, f"y{tag}"), dense, f"the embeddings (table[token_ids], V = {vocab})",
            suspects=[(sequence_dense.embedding_unmasked(case.table, case.ids, view.size),
                       sequence_dense.EMB_NOT_MASKED),
                      (sequence_dense.embedding_with_starts(case.table, case.ids, view.size, [
                          r * (hi - lo) for r, (lo, hi) in enumerate(
                              data.balanced(vocab, view.size))]),
                       sequence_dense.EVEN_SPLIT_OFFSET)]))
    _traced_counts(view, "seqcounts.emb_forward", "counts", {"allreduce": 1})


def emb_backward(view):
    case = data.embedding(view.seed)
    _, grad = sequence_dense.embedding(case.table, case.ids, case.g)

    def verdict(rank):
        lo, hi = data.balanced(data.VOCAB, view.size)[rank]
        return mismatch(view.tensor(rank, "gw"), grad[lo:hi], ".weight.grad (this rank's rows "
                        "of the dense table gradient)", missing=runner_judge.NOT_CONNECTED,
                        suspects=[
                            (sequence_dense.embedding_grad_leak(grad[lo:hi], case.ids, case.g,
                                                                lo, hi),
                             sequence_dense.EMB_GRAD_LEAK)])
    view.each("emb.grad_weight", verdict)
    _traced_counts(view, "seqcounts.emb_backward", "counts", {})


def emb_float64(view):
    case = data.embedding(view.seed)
    dense, grad = sequence_dense.embedding(case.table, case.ids, case.g)
    _float64(view, "emb", lambda r: dense,
             lambda r: grad[slice(*data.balanced(data.VOCAB, view.size)[r])], "embeddings")


def emb_errors(view):
    def bad_ids(rank):
        for key, bad in (("too_large", data.VOCAB), ("negative", -1)):
            text = runner_judge.raised(view.obs(rank, key), ("ValueError",))
            if text:
                return f"token id {bad} (V = {data.VOCAB}): {text}"
        return ""
    view.each("emb.bad_ids", bad_ids)
    view.each("emb.bad_shape", lambda r: runner_judge.raised(
        view.obs(r, "bad_shape"), ("ValueError",),
        runner_judge.shape_pattern((data.VOCAB, data.EMB_DIM), (data.VOCAB + 2, data.EMB_DIM))))


# -- vocab_parallel_cross_entropy -------------------------------------------------------------
def _ce(case):
    return sequence_dense.cross_entropy(case.z, case.target, case.g)


def _columns(view, rank, vocab=data.VOCAB):
    return slice(*data.balanced(vocab, view.size)[rank])


def ce_forward(view):
    for key, vocab, name in (("y", data.VOCAB, "ce.forward"),
                             ("y_small", data.SMALL_VOCAB, "ce.forward_small_vocab")):
        loss, _ = _ce(data.logits(view.seed, vocab))
        view.each(name, lambda r, key=key, loss=loss, vocab=vocab: mismatch(
            view.tensor(r, key), loss, f"the per-token loss (V = {vocab})"))
    _traced_counts(view, "seqcounts.ce_forward", "counts", {"allreduce": 3})
    if view.size < 2:
        return
    tokens = data.SEQ * data.BATCH

    def sizes(rank):
        sent = [n for _, n in trace(view.obs(rank, "counts"))["events"]]
        big = [n for n in sent if n != tokens]
        return "" if not big else (
            f"collectives of {big} elements, expected {tokens} (one number per token): "
            f"{'the logits travelled' if max(big) > tokens else 'not one number per token'}")
    view.each("seqcounts.ce_sizes", sizes)


def ce_backward(view):
    _, grad = _ce(data.logits(view.seed))
    view.each("ce.grad_logits", lambda r: mismatch(
        view.tensor(r, "gz"), grad[..., _columns(view, r)], "the gradient of this rank's logits",
        missing=runner_judge.NOT_CONNECTED))
    _traced_counts(view, "seqcounts.ce_backward", "counts", {})


def ce_stable(view):
    loss, grad = _ce(data.large_logits(view.seed))

    def forward(rank):
        got = view.tensor(rank, "y")
        if got is not None and got.shape == loss.shape and not (abs(got) < float("inf")).all():
            return ("the loss of logits ~1e4 is not finite: exp overflowed; subtract the "
                    "largest logit of ALL ranks (an all-reduce MAX) before exp")
        return mismatch(got, loss, "the per-token loss of logits ~1e4")
    view.each("ce.large_logits", forward)
    view.each("ce.grad_large_logits", lambda r: mismatch(
        view.tensor(r, "gz"), grad[..., _columns(view, r)],
        "the logits' gradient for logits ~1e4", missing=runner_judge.NOT_CONNECTED))


def ce_float64(view):
    loss, grad = _ce(data.logits(view.seed))
    _float64(view, "ce", lambda r: loss, lambda r: grad[..., _columns(view, r)], "loss")


JUDGES = handlers(globals(), plan)
