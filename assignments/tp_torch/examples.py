"""Example submissions for `tp_torch`, graded by the gpu_runner (tests, demo, benchmark).

Each student is a `tpcourse.submissions.Submission` whose answers replace the solution cells
of the tp_torch notebook. `loses` names the gpu_* task cells (scored by the gpu_runner) that
must come out below their maximum; every other gpu_* cell must keep full marks. What the
notebook's own tests make of each is recorded with the rest in assignments/tp_torch/grades.json.

The wrong solutions are written against the catalogue's own reference implementation
(`MEGATRON`, below) and replace all four solution cells, so they do not depend on how the
instructor's reference in the source notebook is written. `torch_reference` itself names no
cell: it is the instructor's own solution from source/tp_torch.

REFERENCE      the instructor's solution
STUDENTS       a valid alternative (MEGATRON), the mistakes (WRONG), the device mistakes
               (DEVICE), faults (FAULTS) and attacks on the gpu_runner's ranks (RANK_ATTACKS)
FORGERS        in-process attacks on the notebook's own checks (tpcourse.forgery)
DEMO           the students `make demo` grades on real ranks (with a "reference" of its own)
GPU_CHECK      the two students `make gpu-check` grades on a GPU runner (tpcourse.gpu_check)
"""
from __future__ import annotations

from tpcourse.forgery import QUIET_FAIL, Forger
from tpcourse.submissions import Submission, edited

ASSIGNMENT = "tp_torch"
NOTEBOOK = "tp_torch"
SOLUTION_IDS = ("sol_mappings", "sol_column_layer", "sol_row_layer", "sol_parallel_mlp")
GPU_CELLS = {
    "gpu_column_shards": 2, "gpu_column_forward": 3, "gpu_column_backward": 3,
    "gpu_row_shards": 2, "gpu_row_forward": 3, "gpu_row_backward": 3,
    "gpu_mlp_forward": 2, "gpu_mlp_backward": 2, "gpu_collective_counts": 3, "gpu_errors": 1,
}

# ---------------------------------------------------------------------------------------------
# The catalogue's reference implementation (Megatron-style), one string per solution cell.
MAPPINGS = '''
import torch
import torch.distributed as dist


def shard_range(n, rank, world_size):
    """[start, stop) of `rank`'s part of n items: numpy.array_split's balanced split."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def tp_world(group=None):
    """(world size, rank) in `group`; a clear error when there is no process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed has no process group: call "
                           "dist.init_process_group() (or run on ranks) first")
    return dist.get_world_size(group), dist.get_rank(group)


def _gather_last(x, n, group):
    """All-gather the last dim of uneven shards: pad to the largest shard, then trim."""
    p, _ = tp_world(group)
    width = -(-n // p)
    padded = x.new_zeros(*x.shape[:-1], width)
    padded[..., :x.shape[-1]] = x
    parts = [torch.empty_like(padded) for _ in range(p)]
    dist.all_gather(parts, padded, group=group)
    sizes = [b - a for a, b in (shard_range(n, r, p) for r in range(p))]
    return torch.cat([part[..., :size] for part, size in zip(parts, sizes)], dim=-1)


class _CopyToTP(torch.autograd.Function):          # f: identity fwd, all-reduce bwd
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):      # g: all-reduce fwd, identity bwd
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):      # all-gather fwd, own slice bwd
    @staticmethod
    def forward(ctx, x, n, group):
        ctx.n, ctx.group = n, group
        return _gather_last(x.contiguous(), n, group)

    @staticmethod
    def backward(ctx, grad):
        p, r = tp_world(ctx.group)
        a, b = shard_range(ctx.n, r, p)
        return grad[..., a:b].contiguous(), None, None


class _ScatterToTP(torch.autograd.Function):       # own slice fwd, all-gather bwd
    @staticmethod
    def forward(ctx, x, group):
        p, r = tp_world(group)
        ctx.n, ctx.group = x.shape[-1], group
        a, b = shard_range(ctx.n, r, p)
        return x[..., a:b].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad.contiguous(), ctx.n, ctx.group), None


def copy_to_tp_region(x, group=None):
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x, group=None):
    return _ReduceFromTP.apply(x, group)


def gather_from_tp_region(x, n, group=None):
    return _GatherFromTP.apply(x, n, group)


def scatter_to_tp_region(x, group=None):
    return _ScatterToTP.apply(x, group)
'''

COLUMN = '''
import torch.nn as nn
import torch.nn.functional as F


def master_or_default(master_weight, shape, seed):
    """The full weight: the given one (shape-checked) or a seeded nn.Linear-style init."""
    if master_weight is None:
        gen = torch.Generator().manual_seed(seed)
        bound = shape[1] ** -0.5
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    if tuple(master_weight.shape) != tuple(shape):
        raise ValueError(f"master_weight has shape {tuple(master_weight.shape)}, "
                         f"expected {tuple(shape)} (out_features, in_features)")
    return master_weight


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, master_weight=None, *,
                 gather_output=True, group=None):
        super().__init__()
        p, r = tp_world(group)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.group = gather_output, group
        full = master_or_default(master_weight, (out_features, in_features), seed=0)
        a, b = shard_range(out_features, r, p)
        self.weight = nn.Parameter(full[a:b].detach().clone())
        if bias:
            self.bias = nn.Parameter(torch.zeros(b - a, dtype=full.dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)
        return gather_from_tp_region(y, self.out_features, self.group) if self.gather_output else y
'''

ROW = '''
class RowParallelLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, master_weight=None, *,
                 input_is_parallel=True, group=None):
        super().__init__()
        p, r = tp_world(group)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.group = input_is_parallel, group
        full = master_or_default(master_weight, (out_features, in_features), seed=1)
        a, b = shard_range(in_features, r, p)
        self.weight = nn.Parameter(full[:, a:b].detach().clone())
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=full.dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias
'''

MLP = '''
class ParallelMLP(nn.Module):
    def __init__(self, hidden, ffn_hidden, bias=True, w1=None, w2=None, *,
                 activation=F.gelu, group=None):
        super().__init__()
        self.fc1 = ColumnParallelLinear(hidden, ffn_hidden, bias, w1, gather_output=False,
                                        group=group)
        self.fc2 = RowParallelLinear(ffn_hidden, hidden, bias, w2, input_is_parallel=True,
                                     group=group)
        self.activation = activation

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))
'''

MEGATRON = {"sol_mappings": MAPPINGS, "sol_column_layer": COLUMN,
            "sol_row_layer": ROW, "sol_parallel_mlp": MLP}


def _with(**changes):
    """The catalogue reference with some cells' code edited: {cell: [(old, new), ...]}."""
    return edited(MEGATRON, **changes)


def _student(name, answers, loses, why):
    return Submission(name, ASSIGNMENT, answers={NOTEBOOK: answers} if answers else {},
                      loses=frozenset(loses), why=why)


# ---------------------------------------------------------------------------------------------
# Full marks.
VALID = [
    _student("torch_reference", None, (), "the instructor's solution from source/tp_torch"),
    _student("torch_megatron", MEGATRON, (), "the catalogue's own Megatron-style solution"),
]

# Wrong solutions: (name, edits, cells that must lose points, why).
WRONG = [
    _student("torch_local_shard", _with(sol_column_layer=[(
        "return gather_from_tp_region(y, self.out_features, self.group) if self.gather_output else y",
        "return y")]),
        ("gpu_column_forward", "gpu_column_backward", "gpu_collective_counts"),
        "ColumnParallelLinear returns the local shard even when gather_output=True "
        "(and so never all-gathers)"),
    _student("torch_bias_every_rank", _with(sol_row_layer=[
        ("y = reduce_from_tp_region(F.linear(x, self.weight), self.group)\n"
         "        return y if self.bias is None else y + self.bias",
         "return reduce_from_tp_region(F.linear(x, self.weight, self.bias), self.group)")]),
        ("gpu_row_forward", "gpu_mlp_forward"),
        "RowParallelLinear adds the bias on every rank before the all-reduce (bias counted p times)"),
    _student("torch_plain_collectives", _with(sol_mappings=[
        ("def copy_to_tp_region(x, group=None):\n    return _CopyToTP.apply(x, group)",
         "def copy_to_tp_region(x, group=None):\n    return x"),
        ("def reduce_from_tp_region(x, group=None):\n    return _ReduceFromTP.apply(x, group)",
         "def reduce_from_tp_region(x, group=None):\n    x = x.clone()\n"
         "    dist.all_reduce(x, group=group)\n    return x"),
        ("def scatter_to_tp_region(x, group=None):\n    return _ScatterToTP.apply(x, group)",
         "def scatter_to_tp_region(x, group=None):\n    p, r = tp_world(group)\n"
         "    a, b = shard_range(x.shape[-1], r, p)\n    return x[..., a:b]")]),
        ("gpu_column_backward", "gpu_row_backward", "gpu_mlp_backward", "gpu_collective_counts"),
        "plain collectives with no autograd-aware conjugate: input gradients miss the "
        "backward all-reduce / all-gather"),
    _student("torch_allreduce_in_column", _with(sol_mappings=[
        ("def copy_to_tp_region(x, group=None):\n    return _CopyToTP.apply(x, group)",
         "def copy_to_tp_region(x, group=None):\n    return _ReduceFromTP.apply(x, group)")]),
        ("gpu_column_forward", "gpu_column_backward", "gpu_mlp_forward", "gpu_mlp_backward",
         "gpu_collective_counts"),
        "the column layer all-reduces its input in forward (f and g swapped)"),
    _student("torch_two_allreduces_mlp", _with(sol_parallel_mlp=[(
        "return self.fc2(self.activation(self.fc1(x)))",
        "y = self.fc2(self.activation(self.fc1(x)))\n"
        "        check = y.detach().clone()\n"
        "        dist.all_reduce(check, group=self.fc2.group)   # leftover sanity check\n"
        "        return y")]),
        ("gpu_collective_counts",),
        "a second (debugging) all-reduce in ParallelMLP.forward: right numbers, twice the traffic"),
    _student("torch_gather_scatter_mlp", _with(sol_parallel_mlp=[
        ("gather_output=False,", "gather_output=True,"),
        ("input_is_parallel=True,", "input_is_parallel=False,")]),
        ("gpu_collective_counts",),
        "ParallelMLP gathers the hidden activations and scatters them again: right numbers, "
        "an all-gather per pass where none is needed"),
    _student("torch_wrong_shard", _with(sol_mappings=[(
        "start = rank * base + min(rank, extra)", "start = rank * base")]),
        ("gpu_column_shards", "gpu_column_forward", "gpu_column_backward", "gpu_row_shards",
         "gpu_row_forward", "gpu_row_backward", "gpu_mlp_forward", "gpu_mlp_backward"),
        "shard offsets ignore the remainder: uneven splits give ranks the wrong rows/columns"),
    _student("torch_no_shape_check", _with(sol_column_layer=[(
        "    if tuple(master_weight.shape) != tuple(shape):\n        raise ValueError",
        "    if False:\n        raise ValueError")]),
        ("gpu_errors",),
        "no shape check: a master_weight of the wrong shape is silently sliced"),
    # Right shapes, right collective count (the bias gather), and the dense answer wherever
    # every rank holds the same master_weight. The gpu_runner gives each rank its own: the true
    # weight inside its shard, noise outside, so computing more than the shard shows.
    _student("torch_dense_each_rank", _with(sol_column_layer=[
        ("        self.weight = nn.Parameter(full[a:b].detach().clone())\n",
         "        self.weight = nn.Parameter(full[a:b].detach().clone())\n"
         "        self.register_buffer(\"full_weight\", full.detach().clone())\n"),
        ("        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)\n"
         "        return gather_from_tp_region(y, self.out_features, self.group) "
         "if self.gather_output else y",
         "        y = F.linear(x, self.full_weight)            # the whole layer, on every rank\n"
         "        if self.bias is not None:\n"
         "            y = y + gather_from_tp_region(self.bias, self.out_features, self.group)\n"
         "        if self.gather_output:\n"
         "            return y\n"
         "        p, r = tp_world(self.group)\n"
         "        a, b = shard_range(self.out_features, r, p)\n"
         "        return y[..., a:b]")]),
        ("gpu_column_forward", "gpu_column_backward", "gpu_mlp_backward",
         "gpu_collective_counts"),
        "ColumnParallelLinear computes y = x @ master_weight.T, the whole layer, on every rank "
        "(and gathers the bias): right shapes, wrong numbers once ranks hold different "
        "master weights"),
]

# Device mistakes (the notebook's device rules). The gpu_runner's float64 runs, with meta as
# the default device, catch the first two on any machine; the third only shows on NCCL (gloo
# runs collectives on CPU tensors): on a CPU machine it gets full marks, and the runner's report
# lists that case as untested there. `loses` is what each loses where it is caught.
DEVICE = [
    _student("torch_device_new_tensor", _with(sol_mappings=[(
        "padded = x.new_zeros(*x.shape[:-1], width)",
        "padded = torch.zeros(*x.shape[:-1], width)   # no device=, no dtype=")]),
        ("gpu_column_forward", "gpu_column_backward", "gpu_row_backward"),
        "the all-gather's padding buffer is created without device= and dtype= (on the CPU, "
        "float32): on a GPU the gather mixes devices"),
    _student("torch_device_plain_attribute", _with(sol_column_layer=[
        ("        self.weight = nn.Parameter(full[a:b].detach().clone())\n",
         "        self.weight = nn.Parameter(full[a:b].detach().clone())\n"
         "        self.rows = full[a:b].detach().clone()   # a plain tensor: .to() leaves it\n"),
        ("F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)",
         "F.linear(copy_to_tp_region(x, self.group), self.rows, self.bias)")]),
        ("gpu_column_forward", "gpu_column_backward", "gpu_mlp_forward", "gpu_mlp_backward"),
        "ColumnParallelLinear computes with a plain tensor attribute, not its parameter: "
        ".to(device) leaves it on the CPU (and .weight never gets a gradient)"),
    _student("torch_device_cpu_collective", _with(sol_mappings=[(
        "        x = x.contiguous().clone()\n        dist.all_reduce(x, group=group)\n"
        "        return x\n",
        "        y = x.detach().cpu().clone()        # the collective on a CPU copy\n"
        "        dist.all_reduce(y, group=group)\n"
        "        return y.to(x.device)\n")]),
        ("gpu_row_forward", "gpu_row_backward", "gpu_mlp_forward", "gpu_mlp_backward",
         "gpu_collective_counts"),
        "reduce_from_tp_region all-reduces a CPU copy of the tensor: NCCL refuses CPU tensors "
        "(gloo does not, so only a GPU machine catches it)"),
]
CAUGHT_ON_CPU = ("torch_device_new_tensor", "torch_device_plain_attribute")

# Faulty submissions: each must be caught within the time bound, score 0 on the affected
# cells with the reason in the report, and leave the other cells (and students) graded.
FAULTS = [
    _student("torch_deadlock", _with(sol_parallel_mlp=[(
        "return self.fc2(self.activation(self.fc1(x)))",
        "if dist.get_rank(self.fc2.group) == 0:   # a collective on one rank only\n"
        "            dist.barrier(group=self.fc2.group)\n"
        "        return self.fc2(self.activation(self.fc1(x)))")]),
        ("gpu_mlp_forward", "gpu_mlp_backward", "gpu_collective_counts"),
        "deadlock: a barrier on rank 0 only in ParallelMLP.forward"),
    _student("torch_crash", _with(sol_row_layer=[(
        "    def forward(self, x):\n",
        "    def forward(self, x):\n"
        "        if dist.get_world_size(self.group) > 1 and dist.get_rank(self.group) == 1:\n"
        "            import os, signal\n"
        "            os.kill(os.getpid(), signal.SIGSEGV)   # a hard crash\n")]),
        ("gpu_row_forward", "gpu_row_backward", "gpu_mlp_forward", "gpu_mlp_backward",
         "gpu_collective_counts"),
        "crash: rank 1 dies of SIGSEGV in RowParallelLinear.forward"),
    _student("torch_os_exit", _with(sol_column_layer=[(
        "        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)\n",
        "        if dist.get_world_size(self.group) > 1 and dist.get_rank(self.group) == 1:\n"
        "            import os\n"
        "            os._exit(0)   # leaves quietly, with a success code\n"
        "        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)\n")]),
        ("gpu_column_forward", "gpu_column_backward", "gpu_mlp_forward", "gpu_mlp_backward",
         "gpu_collective_counts"),
        "os._exit(0) on rank 1 in ColumnParallelLinear.forward"),
    _student("torch_infinite_loop", _with(sol_parallel_mlp=[(
        "return self.fc2(self.activation(self.fc1(x)))",
        "while dist.get_world_size(self.fc2.group) > 1:   # loops forever on every rank\n"
        "            pass\n"
        "        return self.fc2(self.activation(self.fc1(x)))")]),
        ("gpu_mlp_forward", "gpu_mlp_backward", "gpu_collective_counts"),
        "infinite loop in ParallelMLP.forward on every rank (no collective to time out)"),
]

# Hostile submissions, each with a WRONG answer: an attack on the verdicts of the old design
# (decided in the ranks) that must gain nothing now that the grader judges what the ranks
# report. Each loses exactly the cells of its wrong answer, except the forged counts (below).
_REBIND = """

import torch.testing
torch.allclose = lambda *args, **kwargs: True
torch.Tensor.allclose = lambda self, *args, **kwargs: True
torch.equal = lambda *args, **kwargs: True
torch.Tensor.equal = lambda self, *args, **kwargs: True
torch.isclose = lambda a, b, *args, **kwargs: torch.ones(a.shape, dtype=torch.bool)
torch.testing.assert_close = lambda *args, **kwargs: None
print("ATTACK in place: torch.allclose is", torch.allclose(torch.zeros(1), torch.ones(1)))
"""

_PATCH_HARNESS = """

import importlib, sys


def _passes(*args, **kwargs):
    return (True, "")


for _name in ("gpu_runner.observe", "gpu_runner.judge", "gpu_runner.records",
              "assignments.tp_torch.gpu.observe", "assignments.tp_torch.gpu.judge",
              "tpgrade.verdict", "tpgrade.tensors"):
    try:
        importlib.import_module(_name)
    except Exception:
        pass
_patched = []
for _name, _module in list(sys.modules.items()):
    if _name.startswith(("gpu_runner", "tpgrade", "assignments")):
        for _attr in ("close", "counts_ok", "mismatch", "compare", "check", "judge", "counts"):
            if hasattr(_module, _attr):
                try:
                    setattr(_module, _attr, _passes)
                    _patched.append(f"{_name}.{_attr}")
                except Exception:
                    pass
print("ATTACK in place: patched", " ".join(sorted(_patched)))
"""

_FORGE_RECORDS = """

import sys
from assignments.tp_torch.gpu.plan import CHECKS as _CHECKS

_ALL = {name.rstrip("*"): [True, ""] for names in _CHECKS.values() for name in names}
for _module in list(sys.modules.values()):
    _Recorder = vars(_module).get("Recorder")
    if isinstance(_Recorder, type) and hasattr(_Recorder, "write"):
        def _forged(self, _write=_Recorder.write, **record):
            if record.get("event") == "end":       # every check passed, nothing went wrong
                record.update(status="ok", error="", fault=None, checks=dict(_ALL))
            return _write(self, **record)
        _Recorder.write = _forged
        print("ATTACK in place: forging", _Recorder.__module__, "Recorder.write")
"""

_FORGE_COUNTS = """

import gpu_runner.counting as _counting

_exit = _counting.CollectiveCounter.__exit__


def _at_most_one(self, *exc):
    result = _exit(self, *exc)
    for _kind in list(self.counts):
        self.counts[_kind] = min(self.counts[_kind], 1)    # two all-reduces read as one
    return result


_counting.CollectiveCounter.__exit__ = _at_most_one
print("ATTACK in place: the collective counter reports at most one of each kind")
"""


def _hostile(name, wrong, attack, why, also=None, loses=None):
    """`wrong`'s answers (and the cell `also` = (student, cell) takes from another wrong
    student), with `attack` run at import, from the end of the mappings cell."""
    answers = dict(BY_NAME[wrong].answers[NOTEBOOK])
    if also:
        answers[also[1]] = BY_NAME[also[0]].answers[NOTEBOOK][also[1]]
    answers["sol_mappings"] += attack
    return _student(name, answers, BY_NAME[wrong].loses if loses is None else loses, why)


BY_NAME = {s.student: s for s in VALID + WRONG + FAULTS + DEVICE}
RANK_ATTACKS = [
    _hostile("torch_h_rebind_allclose", "torch_allreduce_in_column", _REBIND,
             "f and g swapped, and torch.allclose / torch.equal / torch.isclose / "
             "torch.testing.assert_close rebound to say 'equal' in the solution module"),
    _hostile("torch_h_patch_harness", "torch_local_shard", _PATCH_HARNESS,
             "the local shard returned, and every verdict function of the harness loaded in the "
             "rank (gpu_runner's and the assignment's observe/judge, tpgrade.verdict) patched "
             "to pass"),
    _hostile("torch_h_forge_records", "torch_plain_collectives", _FORGE_RECORDS,
             "plain collectives, and the rank's recorder patched to write every check as "
             "passed"),
    # What forging can gain: the counts are measured in the rank (the profiler runs in its
    # process), so capping them hides the MLP's second all-reduce and WINS
    # gpu_collective_counts; the numbers are judged in the grader, so the bias added on every
    # rank still loses gpu_row_forward and gpu_mlp_forward.
    _hostile("torch_h_forge_counts", "torch_two_allreduces_mlp", _FORGE_COUNTS,
             "a second all-reduce in ParallelMLP and the bias added on every rank, with the "
             "collective counter patched to report at most one collective of each kind",
             also=("torch_bias_every_rank", "sol_row_layer"),
             loses=BY_NAME["torch_bias_every_rank"].loses),
]
# what torch_h_forge_counts wins by forging (the plain torch_two_allreduces_mlp loses it)
FORGED_COUNTS_GAIN = {"torch_h_forge_counts": frozenset({"gpu_collective_counts"})}

REFERENCE = VALID[:1]
UNMODIFIED: list = []
STUDENTS = VALID[1:] + WRONG + FAULTS + DEVICE + RANK_ATTACKS
ALL = REFERENCE + STUDENTS
BY_NAME = {s.student: s for s in ALL}
DEMO = ()
GPU_CHECK = ("torch_device_new_tensor", "torch_device_cpu_collective")


# In-process attacks on the notebook's own (2-rank) checks, from `sol_mappings`, with the row
# layer adding its bias on every rank before the all-reduce (wrong values, right shapes).
BIAS_EVERY_RANK = ("y = reduce_from_tp_region(F.linear(x, self.weight), self.group)",
                   "y = reduce_from_tp_region(F.linear(x, self.weight, self.bias), self.group)\n"
                   "        return y")


def _forger(student, why, attack, shell_only=False):
    return Forger(student, ASSIGNMENT, why, "sol_mappings", attack, None, None, shell_only,
                  edits=(("sol_row_layer", *BIAS_EVERY_RANK),))


FORGERS = [
    _forger("f_torch_comparisons", "rebinds torch.allclose / torch.equal and the checks' own "
            "comparison helpers to always agree", '''
import types, torch
import tpgrade.verdict as _verdict
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
for _name, _agree in (("close", lambda *a, **k: True), ("equal", lambda *a, **k: True),
                      ("mismatch", lambda *a, **k: "")):
    types.ModuleType.__setattr__(_verdict, _name, _agree)   # past its read-only guard
'''),
    _forger("f_torch_planted", "plants no-op torch checks in sys.modules and the package", '''
import sys, types, assignments.tp_torch
class _Anything:
    def __getattr__(self, name):
        return _Anything()
    def __call__(self, *args, **kwargs):
        return None
_fake = types.ModuleType("assignments.tp_torch.checks")
_fake.__getattr__ = lambda name: _Anything()
sys.modules["assignments.tp_torch.checks"] = _fake
assignments.tp_torch.__dict__["checks"] = _fake
'''),
    _forger("f_torch_gc", "empties every check's `fail` found through the garbage collector",
            QUIET_FAIL),
]
