"""The rank side of tp_torch_attention's units: the student's ParallelAttention and
ParallelTransformerLayer built from this rank's master weights (gpu/data.py), run forward and
backward, and its measure_overhead next to the grader's own measurement (gpu/overhead.py). As
in gpu_runner.observe, nothing here decides a grade: it reports data, gpu/judge.py judges it in
the grader process.
"""
from __future__ import annotations

import contextlib

from gpu_runner.observe import Ctx, counted, cpu, float64_run, set_param, shaped
from gpu_runner.plan import handlers
from gpu_runner.records import encode_tensor

from . import data
from . import overhead, plan


def _attention(ctx: Ctx, case: data.Case):
    """The student's ParallelAttention with this rank's master weights, the output bias set."""
    m = case.masters(ctx.rank, ctx.size)
    attn = ctx.build(ctx.m.ParallelAttention, data.SHAPE[-1], case.heads, case.kv, True,
                     *(cpu(m[k]) for k in ("wq", "wk", "wv", "wo")), causal=case.causal)
    set_param(attn.proj.bias, ctx.tensor(case.P["bo"]))
    return attn


def _layer(ctx: Ctx, case: data.Case):
    """The student's ParallelTransformerLayer, its biases and LayerNorms set to the case's."""
    m, P = case.masters(ctx.rank, ctx.size), case.P
    layer = ctx.build(ctx.m.ParallelTransformerLayer, data.SHAPE[-1], case.heads, data.FFN, case.kv,
                      True, *(cpu(m[k]) for k in ("wq", "wk", "wv", "wo", "w1", "w2")),
                      causal=case.causal)
    lo, hi = ctx.shard(data.FFN)
    for param, value in ((layer.ln1.weight, P["ln1_w"]), (layer.ln1.bias, P["ln1_b"]),
                         (layer.ln2.weight, P["ln2_w"]), (layer.ln2.bias, P["ln2_b"]),
                         (layer.attn.proj.bias, P["bo"]), (layer.mlp.fc1.bias, P["b1"][lo:hi]),
                         (layer.mlp.fc2.bias, P["b2"])):
        set_param(param, ctx.tensor(value))
    return layer


def _backward(ctx: Ctx, module, case):
    """Forward and backward of L = sum(y * g) with the collectives of the backward counted;
    reports dL/dx as "gx"."""
    xs = ctx.tensor(case.x, requires_grad=True)
    y = ctx.phase(lambda: shaped(module(xs), case.g.shape))
    ctx.phase(lambda: counted(ctx, "counts", lambda: (y * ctx.tensor(case.g)).sum().backward()))
    ctx.observe("gx", lambda: xs.grad)


def attention_forward(ctx: Ctx):
    for i, case in enumerate(data.attention_cases(ctx.seed, "forward")):
        attn = ctx.phase(lambda: _attention(ctx, case))
        x = ctx.tensor(case.x)
        ctx.observe(f"y{i}", lambda: counted(ctx, f"counts{i}", lambda: attn(x)))


def attention_backward(ctx: Ctx):
    case = data.attention_cases(ctx.seed, "backward")[0]
    attn = ctx.phase(lambda: _attention(ctx, case))
    _backward(ctx, attn, case)
    ctx.report("grads", ctx.phase(lambda: {
        "qkv": encode_tensor(attn.qkv.weight.grad), "proj_w": encode_tensor(attn.proj.weight.grad),
        "proj_b": encode_tensor(attn.proj.bias.grad)}))


def attention_float64(ctx: Ctx):
    """The device rules (observe.float64_run): the causal mask and the KV head index made on the
    input's device, in its dtype."""
    case = data.attention_cases(ctx.seed, "float64")[0]
    float64_run(ctx, ctx.phase(lambda: _attention(ctx, case)), case.x, case.g)


def layer_forward(ctx: Ctx):
    case = data.layer_case(ctx.seed)
    layer = ctx.phase(lambda: _layer(ctx, case))
    x = ctx.tensor(case.x)
    ctx.observe("y", lambda: counted(ctx, "counts", lambda: layer(x)))


_LAYER_GRADS = {"ln1_w": "ln1.weight", "ln1_b": "ln1.bias", "ln2_w": "ln2.weight",
                "ln2_b": "ln2.bias", "qkv": "attn.qkv.weight", "proj_w": "attn.proj.weight",
                "proj_b": "attn.proj.bias", "fc1_w": "mlp.fc1.weight", "fc1_b": "mlp.fc1.bias",
                "fc2_w": "mlp.fc2.weight", "fc2_b": "mlp.fc2.bias"}


def layer_backward(ctx: Ctx):
    case = data.layer_case(ctx.seed)
    layer = ctx.phase(lambda: _layer(ctx, case))
    _backward(ctx, layer, case)
    ctx.report("grads", ctx.phase(lambda: {
        key: encode_tensor(layer.get_parameter(name).grad) for key, name in _LAYER_GRADS.items()}))


def overhead_measure(ctx: Ctx):
    """The student's measure_overhead, AGREE_RUNS times between the grader's own measurements
    (the same arguments), then PROBE_RUNS times under each probe (gpu_runner.overhead.Probe):
    the group's last rank slowed after every matmul, and the first calls of each shape slowed
    on every rank."""
    kind = "cuda" if ctx.device.type == "cuda" else "cpu"
    args, probe = data.MEASURE[kind], data.probe_args(kind)
    ctx.report("device", kind)

    def grader():
        return overhead.encode(overhead.measure(group=ctx.group, device=ctx.device, **args))

    def student(mode=None, **kwargs):
        fn = ctx.m.measure_overhead
        with mode if mode is not None else contextlib.nullcontext():
            result = fn(list(kwargs["sizes"]), kwargs["tokens"], kwargs["repeats"],
                        kwargs["warmup"], group=ctx.group, device=ctx.device)
        return overhead.encode(result)

    ours, theirs = [ctx.phase(grader)], []
    for _ in range(data.AGREE_RUNS):
        theirs.append(ctx.phase(lambda: student(**args)))
        ours.append(ctx.phase(grader))
    ctx.report("grader", ours)
    ctx.report("student", theirs)
    slow = ctx.rank == ctx.size - 1
    ctx.report("skew", [ctx.phase(lambda: student(
        overhead.Probe(slow_ms=data.SKEW_MS if slow else 0.0), **probe))
        for _ in range(data.PROBE_RUNS)])
    ctx.report("cold", [ctx.phase(lambda: student(
        overhead.Probe(cold_calls=data.COLD_CALLS, cold_ms=data.COLD_MS), **probe))
        for _ in range(data.PROBE_RUNS)])


UNITS = handlers(globals(), plan)
