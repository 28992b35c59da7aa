"""tp_torch's checks: every graded cell of the notebook is a one-line call into them.

The checks give the reference solution full marks and the release stubs nothing, name the
classic mistakes, and keep their verdicts when a solution cell rebinds torch's comparison
helpers (torch.allclose, torch.equal, torch.testing, Tensor.__eq__...), F.gelu, the notebook's
`run_on_ranks`, or torch.distributed's collectives. Fast: the notebook's graded path runs in this
process (tpgrade.offline) on gloo ranks; the real nbgrader cycle is tests/test_torch_notebooks.py.
"""
from __future__ import annotations

import copy
import inspect
import re
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.distributed.distributed_c10d as c10d  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.testing  # noqa: E402

import assignments  # noqa: E402
import assignments.tp_torch  # noqa: E402
import tpsim.ranks  # noqa: E402
from assignments.tp_torch import checks as check  # noqa: E402  (captures torch first)
from tpcourse.submissions import grade_id, read, reference_answers  # noqa: E402
from tpgrade import offline  # noqa: E402
from tpgrade.verdict import CheckFailed  # noqa: E402

SOURCE = assignments.get("tp_torch").notebook
SOLUTIONS = ("sol_mappings", "sol_column_layer", "sol_row_layer", "sol_parallel_mlp")

# What a solution cell may append to its answer to fool the checks: every comparison helper
# says "equal", the notebook's run_on_ranks runs nothing (with inline tests, `for rank, ... in
# run_on_ranks(...)` would then assert nothing), and dist.all_reduce is a fake that does not
# communicate (right only if every rank held the same tensor).
REBIND = """
import torch, torch.testing, torch.nn.functional as F, torch.distributed as dist
import tpsim.ranks
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
torch.isclose = lambda a, b, *r, **k: torch.ones(a.shape, dtype=torch.bool)
torch.testing.assert_close = lambda *a, **k: None
torch.count_nonzero = lambda *a, **k: torch.tensor(0)
torch.Tensor.__eq__ = lambda self, other: True
torch.Tensor.__ne__ = lambda self, other: False
torch.Tensor.allclose = lambda self, *a, **k: True
torch.Tensor.equal = lambda self, *a, **k: True
def run_on_ranks(fn, world_size, *args, **kwargs):
    return []
tpsim.ranks.run_on_ranks = run_on_ranks
def _no_communication(tensor, *args, **kwargs):
    tensor.mul_(dist.get_world_size())
dist.all_reduce = _no_communication
"""

# Edits of the reference answers: (cell, old, new).
BIAS_ONES = ("sol_column_layer", "self.bias = nn.Parameter(torch.zeros(stop - start,",
             "self.bias = nn.Parameter(torch.ones(stop - start,")
NO_F = ("sol_column_layer", "F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)",
        "F.linear(x, self.weight, self.bias)")
LOCAL_SHARD = ("sol_column_layer", "if self.gather_output:", "if False:")
BIAS_EVERY_RANK = ("sol_row_layer", "y = reduce_from_tp_region(F.linear(x, self.weight), self.group)",
                   "y = reduce_from_tp_region(F.linear(x, self.weight, self.bias), self.group)\n"
                   "        return y")
RELU = ("sol_parallel_mlp", "activation=F.gelu", "activation=F.relu")
# The whole layer on every rank, from the rank's master_weight (right shapes, one gather).
KEEP_MASTER = ("sol_column_layer", "self.weight = nn.Parameter(weight[start:stop].clone())",
               "self.weight = nn.Parameter(weight[start:stop].clone())\n"
               "        self.register_buffer('master', weight.clone())")
DENSE = ("sol_column_layer", "y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)",
         "full = F.linear(x, self.master) + gather_from_tp_region(self.bias, "
         "self.out_features, self.group)\n"
         "        if self.gather_output:\n"
         "            return full\n"
         "        rank, p = tp_rank_and_size(self.group)\n"
         "        start, stop = shard_range(self.out_features, rank, p)\n"
         "        y = full[..., start:stop]")
NO_PG_CHECK = ("sol_mappings", "if not (dist.is_available() and dist.is_initialized()):", "if False:")
ONE_RANK_WITHOUT_PG = ("sol_mappings", "return dist.get_rank(group), dist.get_world_size(group)",
                       "return (dist.get_rank(group), dist.get_world_size(group)) "
                       "if dist.is_initialized() else (0, 1)")


def answers_with(*edits, extra=None):
    """The reference answers with `edits` applied; extra: {cell: code appended to it}."""
    answers = reference_answers(read(SOURCE))
    for cell, old, new in edits:
        assert answers[cell].count(old) == 1, f"the reference no longer contains {old!r}"
        answers[cell] = answers[cell].replace(old, new)
    for cell, code in (extra or {}).items():
        answers[cell] += "\n" + code
    return answers


def graded_path(nb):
    """The notebook without its ungraded demo cells (the try-it-yourself and timing runs)."""
    nb = copy.deepcopy(nb)
    nb.cells = [c for c in nb.cells if c.cell_type != "code" or grade_id(c)]
    return nb


def namespace(*edits):
    """What a kernel holds after the setup cell and the (edited) solution cells."""
    nb = read(SOURCE)
    setup = next(c.source for c in nb.cells if grade_id(c) == "setup")
    answers = answers_with(*edits)
    ns = {"__name__": "__main__"}
    for name, code in [("setup", setup)] + [(gid, answers[gid]) for gid in SOLUTIONS]:
        exec(compile(code, f"<{name}>", "exec"), ns)  # noqa: S102 (course code)
    return ns


@pytest.fixture
def restore_torch():
    """Put back whatever a notebook rebound in torch (offline runs share this process)."""
    modules = (torch, torch.testing, F, dist, c10d, tpsim.ranks)
    saved = [(m, dict(vars(m))) for m in modules]
    tensor_attrs = dict(vars(torch.Tensor))
    yield
    for module, attrs in saved:
        for name, value in attrs.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    for name in set(vars(torch.Tensor)) - set(tensor_attrs):
        delattr(torch.Tensor, name)
    for name, value in tensor_attrs.items():
        if vars(torch.Tensor).get(name) is not value:
            setattr(torch.Tensor, name, value)


def failed(answers=None, release=False):
    run = offline.run(graded_path(read(SOURCE)), answers=answers, release=release)
    assert not run.errors, run.errors
    return run


GRADED = [grade_id(c) for c in read(SOURCE).cells
          if c.metadata.get("nbgrader", {}).get("grade") and c.cell_type == "code"]


# -- the notebook's graded cells ------------------------------------------------------------------
def test_graded_cells_are_one_line_calls_into_torch_checks():
    nb = read(SOURCE)
    called = []
    for cell in nb.cells:
        if cell.cell_type != "code" or grade_id(cell) not in GRADED:
            continue
        lines = [ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")]
        assert lines[0] == "from assignments.tp_torch import checks as check", grade_id(cell)
        assert len(lines) == 2 and re.fullmatch(r"check\.\w+\([\w, ]*\)", lines[1]), cell.source
        called.append(lines[1].split("(")[0][len("check."):])
    public = [name for name, f in vars(check).items()
              if inspect.isfunction(f) and not name.startswith("_") and f.__module__ == check.__name__]
    assert sorted(called) == sorted(public) and len(called) == len(GRADED) == 13
    setup = next(c.source for c in nb.cells if grade_id(c) == "setup")
    assert re.search(r"^import assignments\.tp_torch\.checks\b", setup, re.M)  # before any answer


def test_reference_passes_every_check_and_the_release_none():
    assert failed().failed == {}
    run = failed(release=True)
    assert set(run.failed) == set(GRADED), run.failed
    assert all(re.search("NotImplementedError|not implemented", text) for text in run.failed.values())


# -- mistakes are named ---------------------------------------------------------------------------
@pytest.mark.parametrize("edit, check_name, phrase", [
    (LOCAL_SHARD, "column_forward", r"expected shape \(5, 6\).*only the local shard returned"),
    (NO_F, "column_backward", "must go through copy_to_tp_region"),
    (BIAS_ONES, "column_shards", "must start at zero"),
    (BIAS_EVERY_RANK, "row_forward", "bias added on every rank before the all-reduce"),
    (RELU, "mlp_forward", r"ParallelMLP.s output.*values differ from the dense result"),
    (NO_F, "mlp_backward", "fc1's input must go through copy_to_tp_region"),
], ids=["local_shard", "no_f", "bias_ones", "bias_every_rank", "relu", "no_f_mlp"])
def test_mistakes_are_named(edit, check_name, phrase):
    ns = namespace(edit)
    layer = {"column": "ColumnParallelLinear", "row": "RowParallelLinear", "mlp": "ParallelMLP"}
    with pytest.raises(CheckFailed, match=phrase):
        getattr(check, check_name)(ns[layer[check_name.split("_")[0]]])


def test_the_whole_layer_on_every_rank_is_named():
    """Each rank gets its own master_weight (the real rows in its shard, noise elsewhere), so a
    layer computed whole on every rank is wrong, and the check says why."""
    ns = namespace(KEEP_MASTER, DENSE)
    with pytest.raises(CheckFailed, match="computed from the whole master_weight on this rank"):
        check.column_forward(ns["ColumnParallelLinear"])


def test_no_process_group_check_wants_the_error():
    ns = namespace(NO_PG_CHECK, ONE_RANK_WITHOUT_PG)
    with pytest.raises(CheckFailed, match="was built with no process group initialised"):
        check.errors_no_process_group(ns["ColumnParallelLinear"], ns["RowParallelLinear"])


def test_a_rank_error_names_the_rank_and_the_shape():
    ns = namespace(LOCAL_SHARD)
    shapes = r"rank [01] of 2 raised ValueError.*shape \(5, 3\), expected \(5, 6\)"
    with pytest.raises(tpsim.ranks.RankError, match=shapes):
        check.column_backward(ns["ColumnParallelLinear"])


def test_shard_range_values_must_really_be_ints():
    class Liar(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__

    reference = namespace()["shard_range"]
    check.shard_range(lambda n, r, p: [torch.tensor(v) for v in reference(n, r, p)])  # ints: fine
    with pytest.raises(CheckFailed, match="shard_range"):
        check.shard_range(lambda n, r, p: (Liar(0), Liar(0)))
    with pytest.raises(CheckFailed, match="shard_range"):
        check.shard_range(lambda n, r, p: [0.0, float(n)])


# -- rebinding what the checks might use ----------------------------------------------------------
def test_rebinding_submission_loses_exactly_its_mistakes(restore_torch):
    answers = answers_with(BIAS_ONES, NO_F, BIAS_EVERY_RANK, extra={"sol_mappings": REBIND})
    run = failed(answers)
    assert torch.allclose(torch.zeros(1), torch.ones(1)), "the rebinding was not in effect"
    assert set(run.failed) == {"test_column_shards", "test_column_backward", "test_mlp_backward",
                               "test_row_forward", "test_mlp_forward"}, run.failed
    # the fake all_reduce was put back before the ranks ran: the mappings pass
    assert dist.all_reduce is c10d.all_reduce


def test_gelu_rebound_to_relu_does_not_hide_a_relu_mlp(restore_torch):
    answers = answers_with(RELU, extra={"sol_parallel_mlp": "F.gelu = F.relu"})
    assert set(failed(answers).failed) == {"test_mlp_forward", "test_mlp_backward"}


def test_fake_collectives_are_replaced_by_the_genuine_ones(restore_torch):
    genuine = (dist.all_reduce, dist.all_gather, c10d.all_reduce)
    ns = namespace()
    dist.all_reduce = lambda tensor, *a, **k: tensor.mul_(dist.get_world_size())  # no talking
    dist.all_gather = lambda parts, tensor, *a, **k: [p.copy_(tensor) for p in parts]
    c10d.all_reduce = lambda *a, **k: None
    check.mappings_f_and_g(ns["copy_to_tp_region"], ns["reduce_from_tp_region"])
    check.mappings_gather_scatter(ns["gather_from_tp_region"], ns["scatter_to_tp_region"])
    assert (dist.all_reduce, dist.all_gather, c10d.all_reduce) == genuine


def test_checks_module_and_package_cannot_be_replaced():
    with pytest.raises(AttributeError, match="read-only"):
        check.column_forward = lambda cls: None
    with pytest.raises(AttributeError, match="read-only"):
        assignments.tp_torch.checks = None     # `from assignments.tp_torch import checks as check`
    assignments.tp_torch.checks = sys.modules["assignments.tp_torch.checks"]   # importlib may
    assert assignments.tp_torch.checks is check                                # set it again
