"""tp_torch_sequence's units, the rank side: build the student's sequence-parallel mappings,
LayerSP, VocabParallelEmbedding and vocab_parallel_cross_entropy from the unit's data
(gpu/data.py), run them forward and backward, and REPORT outputs, gradients, parameters,
exceptions and collective traces (gpu_runner.collective_trace) as data. Nothing here decides a
grade: gpu/judge.py does, in the grader process. The phases and the helpers are
gpu_runner.observe's.
"""
from __future__ import annotations

import torch

from gpu_runner import observe as runner_observe
from gpu_runner.collective_trace import CollectiveTrace
from gpu_runner.plan import handlers
from gpu_runner.records import encode_param, encode_tensor

from . import data
from . import plan

_MAPPINGS = {"gather": "gather_from_sequence_parallel_region",
             "reduce_scatter": "reduce_scatter_to_sequence_parallel_region",
             "scatter": "scatter_to_sequence_parallel_region"}


def _traced(ctx, key, fn):
    """fn(), the collectives it ran reported as `key`."""
    with CollectiveTrace(ctx.size) as trace:
        value = fn()
    ctx.report(key, trace.record())
    return value


def _backward(ctx, y, upstream, key=None, dtype=None):
    """In a phase: sum(y * upstream).backward() (traced as `key` when given)."""
    def run():
        if not runner_observe.shaped(y, upstream.shape).requires_grad:
            raise ValueError("the output is not connected to the input in autograd (a "
                             "collective without its autograd twin?): no gradient can flow")
        loss = (y * ctx.tensor(upstream, dtype)).sum()
        return _traced(ctx, key, loss.backward) if key else loss.backward()
    ctx.phase(run)


# -- the sequence-parallel mappings -------------------------------------------------------------
def _mapping_io(which, case, s, rank, size):
    """(this rank's input, the upstream gradient of its output) for a sequence of s tokens."""
    mine = data.rows(s, rank, size)
    if which == "gather":          # own tokens in; upstream: this rank's term, all tokens
        return case.x[:s][mine], case.per_rank(rank, size, salt=5)[:s]
    if which == "reduce_scatter":  # a partial sum of all tokens in; upstream: own rows
        return case.per_rank(rank, size, salt=6)[:s], case.g[:s][mine]
    return case.x[:s], case.g[:s][mine]


def seqmap(ctx, which):
    """One mapping forward, on 7 tokens (traced) and on 3; then both backward."""
    fn = getattr(ctx.m, _MAPPINGS[which])
    case = data.mappings(ctx.seed)
    runs = []
    for tag, s in (("", data.SEQ), ("_short", data.SHORT_SEQ)):
        x, up = _mapping_io(which, case, s, ctx.rank, ctx.size)
        xs = ctx.phase(lambda x=x: ctx.tensor(x, requires_grad=True))

        def forward(xs=xs, s=s):
            return fn(xs, s, group=ctx.group) if which == "gather" else fn(xs, group=ctx.group)
        if not tag:
            y = ctx.observe("y", lambda f=forward: _traced(ctx, "counts.forward", f))
        else:
            y = ctx.observe(f"y{tag}", forward)
        runs.append((tag, xs, y, up))
    for tag, xs, y, up in runs:
        _backward(ctx, y, up, None if tag else "counts.backward")
        ctx.observe(f"gx{tag}", lambda xs=xs: xs.grad)


# -- LayerSP ---------------------------------------------------------------------------------
def _sp_maker(ctx):
    """A function building the student's LayerSP with this rank's master weights and the
    case's LayerNorm and biases, as the group's ranks hold them."""
    case = data.block(ctx.seed)
    h, f = data.SP_DIMS
    units = data.rows(f, ctx.rank, ctx.size)
    w1, w2 = case.masters(ctx.rank, ctx.size)

    def make():
        layer = ctx.build(ctx.m.LayerSP, h, f, bias=True, w1=runner_observe.cpu(w1),
                          w2=runner_observe.cpu(w2),
                          activation=runner_observe.MLP_ACTIVATION, eps=data.EPS)
        for param, value in ((layer.ln.weight, case.ln_w), (layer.ln.bias, case.ln_b),
                             (layer.fc1.bias, case.b1[units]), (layer.fc2.bias, case.b2)):
            runner_observe.set_param(param, ctx.tensor(value))
        return layer
    return make, case


def _sp_input(ctx, case, dtype=None):
    return ctx.tensor(case.x[data.rows(data.SEQ, ctx.rank, ctx.size)], dtype, requires_grad=True)


def sp_forward(ctx):
    make, case = _sp_maker(ctx)
    layer = ctx.phase(make)
    x = ctx.tensor(case.x[data.rows(data.SEQ, ctx.rank, ctx.size)])
    ctx.observe("y", lambda: _traced(ctx, "counts", lambda: layer(x, data.SEQ)))


def sp_backward(ctx):
    make, case = _sp_maker(ctx)
    layer, xs = ctx.phase(lambda: (make(), _sp_input(ctx, case)))
    y = ctx.phase(lambda: layer(xs, data.SEQ))
    _backward(ctx, y, case.g[data.rows(data.SEQ, ctx.rank, ctx.size)], "counts")
    ctx.observe("gx", lambda: xs.grad)
    ctx.report("grads", ctx.phase(lambda: {
        name: encode_tensor(getattr(getattr(layer, part), attr).grad)
        for name, part, attr in (("w1", "fc1", "weight"), ("b1", "fc1", "bias"),
                                 ("w2", "fc2", "weight"), ("b2", "fc2", "bias"),
                                 ("ln_w", "ln", "weight"), ("ln_b", "ln", "bias"))}))


def _float64_run(ctx, module, run, upstream):
    """gpu_runner.observe.float64's device and dtype rules for any module: moved with
    .to(torch.float64), run with meta as the default device; reports "plain", "input_device",
    "y" and "gx" (the input's gradient, or the module's weight's when `run` returns no input)."""
    ctx.phase(lambda: module.to(torch.float64))
    ctx.report("plain", ctx.phase(lambda: runner_observe.plain_tensors(module)))

    def forward():
        with torch.device("meta"):
            return run()
    y, grad_of = ctx.phase(forward)
    ctx.report("input_device", str(grad_of.device))
    y = ctx.observe("y", lambda: y)
    _backward(ctx, y, upstream, dtype=torch.float64)
    ctx.observe("gx", lambda: grad_of.grad)


def sp_float64(ctx):
    make, case = _sp_maker(ctx)
    layer = ctx.phase(make)
    xs = _sp_input(ctx, case, torch.float64)
    _float64_run(ctx, layer, lambda: (layer(xs, data.SEQ), xs),
                 case.g[data.rows(data.SEQ, ctx.rank, ctx.size)])


# -- VocabParallelEmbedding -------------------------------------------------------------------
def _emb(ctx, case, **kw):
    return ctx.build(ctx.m.VocabParallelEmbedding, len(case.table), data.EMB_DIM,
                     master_weight=runner_observe.cpu(case.master(ctx.rank, ctx.size)), **kw)


def emb_shards(ctx):
    """The rows of a layer built from this rank's master_weight, the default init's shapes, and
    (at world size >= 2) a vocabulary smaller than the group: a rank with no rows."""
    case = data.embedding(ctx.seed)
    layer = ctx.phase(lambda: _emb(ctx, case))
    ctx.report("shards", ctx.phase(lambda: encode_param(layer.weight)))
    layer = ctx.phase(lambda: ctx.build(ctx.m.VocabParallelEmbedding, data.VOCAB, data.EMB_DIM))
    ctx.report("default", ctx.phase(lambda: encode_param(layer.weight)))
    if ctx.size >= 2:
        small = data.embedding(ctx.seed, vocab=data.SMALL_VOCAB)
        layer = ctx.phase(lambda: _emb(ctx, small))
        ctx.report("empty", ctx.phase(lambda: encode_param(layer.weight)))


def emb_forward(ctx):
    for tag, vocab in (("", data.VOCAB), ("_small", data.SMALL_VOCAB)):
        case = data.embedding(ctx.seed, vocab)
        layer = ctx.phase(lambda case=case: _emb(ctx, case))
        ids = ctx.tensor(case.ids)
        run = (lambda f: _traced(ctx, "counts", f)) if not tag else (lambda f: f())
        ctx.observe(f"y{tag}", lambda layer=layer, ids=ids, run=run: run(lambda: layer(ids)))


def emb_backward(ctx):
    case = data.embedding(ctx.seed)
    layer = ctx.phase(lambda: _emb(ctx, case))
    y = ctx.phase(lambda: layer(ctx.tensor(case.ids)))
    _backward(ctx, y, case.g, "counts")
    ctx.observe("gw", lambda: layer.weight.grad)


def emb_float64(ctx):
    case = data.embedding(ctx.seed)
    layer = ctx.phase(lambda: _emb(ctx, case))
    ids = ctx.tensor(case.ids)
    _float64_run(ctx, layer, lambda: (layer(ids), layer.weight), case.g)


def emb_errors(ctx):
    """Ids outside [0, V) (too large, negative); a master_weight with 2 rows too many."""
    case = data.embedding(ctx.seed)
    layer = ctx.phase(lambda: _emb(ctx, case))
    for key, bad in (("too_large", data.VOCAB), ("negative", -1)):
        ids = case.ids.copy()
        ids[0, 0] = bad
        ctx.report(key, ctx.phase(
            lambda ids=ids: runner_observe.outcome(lambda: layer(ctx.tensor(ids)))))
    wrong = torch.zeros(data.VOCAB + 2, data.EMB_DIM)
    ctx.report("bad_shape", ctx.phase(lambda: runner_observe.outcome(lambda: ctx.build(
        ctx.m.VocabParallelEmbedding, data.VOCAB, data.EMB_DIM, master_weight=wrong))))


# -- vocab_parallel_cross_entropy -------------------------------------------------------------
def _loss(ctx, case, vocab, dtype=None, requires_grad=False):
    """(this rank's logits shard, a function computing the student's loss on it)."""
    z = ctx.tensor(case.z[..., data.rows(vocab, ctx.rank, ctx.size)], dtype,
                   requires_grad=requires_grad)
    target = ctx.tensor(case.target)
    return z, lambda: ctx.m.vocab_parallel_cross_entropy(z, target, vocab, group=ctx.group)


def ce_forward(ctx):
    _, loss = _loss(ctx, data.logits(ctx.seed), data.VOCAB)
    ctx.observe("y", lambda: _traced(ctx, "counts", loss))
    _, loss = _loss(ctx, data.logits(ctx.seed, data.SMALL_VOCAB), data.SMALL_VOCAB)
    ctx.observe("y_small", loss)


def _ce_backward(ctx, case, key=None):
    z, loss = _loss(ctx, case, data.VOCAB, requires_grad=True)
    y = ctx.phase(loss)
    _backward(ctx, y, case.g, key)
    return y, z


def ce_backward(ctx):
    _, z = _ce_backward(ctx, data.logits(ctx.seed), "counts")
    ctx.observe("gz", lambda: z.grad)


def ce_stable(ctx):
    y, z = _ce_backward(ctx, data.large_logits(ctx.seed))
    ctx.observe("y", lambda: y)
    ctx.observe("gz", lambda: z.grad)


def ce_float64(ctx):
    case = data.logits(ctx.seed)
    z, loss = _loss(ctx, case, data.VOCAB, torch.float64, requires_grad=True)
    _float64_run(ctx, torch.nn.Module(), lambda: (loss(), z), case.g)


UNITS = handlers(globals(), plan)
