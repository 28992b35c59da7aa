"""The tp_torch reference solution (the source notebook's solution cells) on real gloo ranks.

The solution cells are executed after the notebook's setup cell in a fresh namespace, exactly
as a student's cells run, and the layers are checked against dense torch in float64 at world
sizes 1-4: shards, forward, gradients of weights, bias and input, uneven and empty shards,
`gather_output=False`, `input_is_parallel=False`, a sub-group passed as `group=`, the number of
collectives per forward and backward, and the errors. The gpu_runner grades students against
this same reference, so what is pinned here is what students are graded on.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import assignments  # noqa: E402
from tpcourse.submissions import grade_id, read, reference_answers  # noqa: E402
from tpsim.ranks import run_on_ranks  # noqa: E402

NOTEBOOK = assignments.get("tp_torch").notebook
SOLUTIONS = ("sol_mappings", "sol_column_layer", "sol_row_layer", "sol_parallel_mlp")
WORLD_SIZES = (1, 2, 3, 4)
TOL = 1e-10  # float64 throughout


def load_reference(path=NOTEBOOK) -> dict:
    """The namespace a student's kernel has after the setup cell and the reference solutions."""
    nb = read(path)
    setup = next(cell.source for cell in nb.cells if grade_id(cell) == "setup")
    answers = reference_answers(nb)
    namespace = {"__name__": "tp_torch_reference"}
    exec(compile(setup, "<setup>", "exec"), namespace)
    for gid in SOLUTIONS:
        exec(compile(answers[gid], f"<{gid}>", "exec"), namespace)
    return namespace


REF = load_reference()


def split(n, rank, p):
    """numpy's balanced split, independent of the notebook's shard_range."""
    sizes = [len(part) for part in np.array_split(np.arange(n), p)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def err(a, b):
    if a is None:
        return float("inf")
    if a.shape != b.shape:
        return float("inf")
    return (a - b).abs().max().item() if a.numel() else 0.0


def dense_grads(fn, upstream, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    (y * upstream).sum().backward()
    return y.detach(), [t.grad for t in leaves]


# -- what each rank runs -------------------------------------------------------------------------
def column_case(in_f, out_f, lead, gather_output=True, bias=True, group_ranks=None):
    group = dist.new_group(group_ranks) if group_ranks else None
    if group_ranks and dist.get_rank() not in group_ranks:
        return None
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(0)
    w, b, x, dy = rand(gen, out_f, in_f), rand(gen, out_f), rand(gen, *lead, in_f), rand(gen, *lead, out_f)
    mine = split(out_f, rank, p)
    y_dense, (dx, dw, db) = dense_grads(lambda a, w_, b_: F.linear(a, w_, b_ if bias else None), dy, x, w, b)
    layer = REF["ColumnParallelLinear"](in_f, out_f, bias=bias, master_weight=w,
                                        gather_output=gather_output, group=group)
    out = {"weight": err(layer.weight.detach(), w[mine]),
           "bias_zero": layer.bias is None if not bias else bool((layer.bias == 0).all())}
    if bias:
        with torch.no_grad():
            layer.bias.copy_(b[mine])
    x_mine = x.clone().requires_grad_()
    y = layer(x_mine)
    upstream = dy if gather_output else dy[..., mine]
    (y * upstream).sum().backward()
    out.update(output=err(y, y_dense if gather_output else y_dense[..., mine]), dx=err(x_mine.grad, dx),
               dw=err(layer.weight.grad, dw[mine]), db=err(layer.bias.grad, db[mine]) if bias else 0.0,
               plain=type(y) is torch.Tensor)
    return out


def row_case(in_f, out_f, lead, input_is_parallel=True, bias=True):
    rank, p = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1)
    w, b, x, dy = rand(gen, out_f, in_f), rand(gen, out_f), rand(gen, *lead, in_f), rand(gen, *lead, out_f)
    mine = split(in_f, rank, p)
    y_dense, (dx, dw, db) = dense_grads(lambda a, w_, b_: F.linear(a, w_, b_ if bias else None), dy, x, w, b)
    layer = REF["RowParallelLinear"](in_f, out_f, bias=bias, master_weight=w, input_is_parallel=input_is_parallel)
    out = {"weight": err(layer.weight.detach(), w[:, mine]),
           "bias_zero": layer.bias is None if not bias else bool((layer.bias == 0).all())}
    if bias:
        with torch.no_grad():
            layer.bias.copy_(b)
    x_in = (x[..., mine] if input_is_parallel else x).clone().requires_grad_()
    y = layer(x_in)
    (y * dy).sum().backward()
    out.update(output=err(y, y_dense), dx=err(x_in.grad, dx[..., mine] if input_is_parallel else dx),
               dw=err(layer.weight.grad, dw[:, mine]), db=err(layer.bias.grad, db) if bias else 0.0,
               plain=type(y) is torch.Tensor)
    return out


def dense_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def mlp_case(hidden, ffn, lead):
    rank, p = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(2)
    w1, b1, w2, b2 = rand(gen, ffn, hidden), rand(gen, ffn), rand(gen, hidden, ffn), rand(gen, hidden)
    x, dy = rand(gen, *lead, hidden), rand(gen, *lead, hidden)
    mine = split(ffn, rank, p)
    y_dense, (dx, dw1, db1, dw2, db2) = dense_grads(dense_mlp, dy, x, w1, b1, w2, b2)
    mlp = REF["ParallelMLP"](hidden, ffn, w1=w1, w2=w2)
    with torch.no_grad():
        mlp.fc1.bias.copy_(b1[mine])
        mlp.fc2.bias.copy_(b2)
    x_mine = x.clone().requires_grad_()
    y = mlp(x_mine)
    (y * dy).sum().backward()
    return {"output": err(y, y_dense), "dx": err(x_mine.grad, dx),
            "dw1": err(mlp.fc1.weight.grad, dw1[mine]), "db1": err(mlp.fc1.bias.grad, db1[mine]),
            "dw2": err(mlp.fc2.weight.grad, dw2[:, mine]), "db2": err(mlp.fc2.bias.grad, db2)}


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
               "gather", "scatter", "send", "recv", "isend", "irecv")


def count_calls(kind):
    """Collectives per forward and per backward (torch.distributed's functions, wrapped in this rank)."""
    counts = Counter()
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        setattr(dist, name, counted)
    p = dist.get_world_size()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    make = {
        "column": lambda: REF["ColumnParallelLinear"](8, 6, master_weight=torch.randn(6, 8, dtype=torch.float64)),
        "column_local": lambda: REF["ColumnParallelLinear"](8, 6, gather_output=False,
                                                            master_weight=torch.randn(6, 8, dtype=torch.float64)),
        "row": lambda: REF["RowParallelLinear"](8, 6, master_weight=torch.randn(6, 8, dtype=torch.float64)),
        "row_full_input": lambda: REF["RowParallelLinear"](8, 6, input_is_parallel=False,
                                                           master_weight=torch.randn(6, 8, dtype=torch.float64)),
        "mlp": lambda: REF["ParallelMLP"](8, 12, w1=torch.randn(12, 8, dtype=torch.float64),
                                          w2=torch.randn(8, 12, dtype=torch.float64)),
    }[kind]
    layer = make()
    if kind == "row":
        x = x[..., split(8, dist.get_rank(), p)].detach().requires_grad_()
    counts.clear()
    y = layer(x)
    forward = dict(counts)
    counts.clear()
    y.sum().backward()
    return forward, dict(counts)


# -- the tests ---------------------------------------------------------------------------------------
def assert_close(per_rank, keys=("weight", "output", "dx", "dw", "db")):
    for rank, result in enumerate(per_rank):
        if result is None:
            continue
        for key in keys:
            assert result[key] < TOL, f"rank {rank}: {key} differs from dense by {result[key]}"
        if "bias_zero" in result:
            assert result["bias_zero"], f"rank {rank}: bias not zero-initialised (or present with bias=False)"
        if "plain" in result:
            assert result["plain"], f"rank {rank}: forward returned {type(result)}, not a plain tensor"


@pytest.mark.parametrize("p", WORLD_SIZES)
@pytest.mark.parametrize("in_f, out_f, lead", [(5, 7, (4,)), (6, 2, (2, 3)), (3, 4, ())])
def test_column_matches_dense(p, in_f, out_f, lead):
    assert_close(run_on_ranks(column_case, p, in_f, out_f, lead))


@pytest.mark.parametrize("p", (2, 3))
def test_column_local_output_and_no_bias(p):
    assert_close(run_on_ranks(column_case, p, 5, 7, (4,), False))
    assert_close(run_on_ranks(column_case, p, 5, 7, (4,), True, False))


@pytest.mark.parametrize("p", WORLD_SIZES)
@pytest.mark.parametrize("in_f, out_f, lead", [(7, 5, (4,)), (2, 6, (2, 3)), (4, 3, ())])
def test_row_matches_dense(p, in_f, out_f, lead):
    assert_close(run_on_ranks(row_case, p, in_f, out_f, lead))


@pytest.mark.parametrize("p", (1, 3, 4))
def test_row_full_input_and_no_bias(p):
    assert_close(run_on_ranks(row_case, p, 7, 5, (4,), False))
    assert_close(run_on_ranks(row_case, p, 7, 5, (4,), True, False))


@pytest.mark.parametrize("p", WORLD_SIZES)
@pytest.mark.parametrize("hidden, ffn", [(6, 10), (5, 3)])
def test_mlp_matches_dense(p, hidden, ffn):
    assert_close(run_on_ranks(mlp_case, p, hidden, ffn, (2, 3)),
                 keys=("output", "dx", "dw1", "db1", "dw2", "db2"))


def test_sub_group_uses_the_group_rank():
    """Ranks 1 and 2 of 3 form the group: global rank 1 must hold the group's first shard."""
    results = run_on_ranks(column_case, 3, 5, 7, (4,), True, True, [1, 2])
    assert results[0] is None
    assert_close(results)


EXPECTED_COUNTS = {  # (forward, backward) collectives of the reference, input requiring grad
    "column": ({"all_gather": 1}, {"all_reduce": 1}),
    "column_local": ({}, {"all_reduce": 1}),
    "row": ({"all_reduce": 1}, {}),
    "row_full_input": ({"all_reduce": 1}, {"all_gather": 1}),
    "mlp": ({"all_reduce": 1}, {"all_reduce": 1}),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_COUNTS))
@pytest.mark.parametrize("p", (1, 3))
def test_collective_counts(kind, p):
    for rank, counts in enumerate(run_on_ranks(count_calls, p, kind)):
        assert counts == EXPECTED_COUNTS[kind], f"rank {rank}: (forward, backward) collectives {counts}"


def test_default_init_is_the_same_full_matrix_at_every_world_size():
    def shards():
        return (REF["ColumnParallelLinear"](5, 7).weight, REF["RowParallelLinear"](7, 5).weight)
    full_col, full_row = run_on_ranks(shards, 1)[0]
    assert full_col.shape == (7, 5) and full_row.shape == (5, 7)
    assert full_col.abs().max() <= 1 / 5 ** 0.5  # nn.Linear's default range
    per_rank = run_on_ranks(shards, 3)
    assert torch.equal(torch.cat([c for c, _ in per_rank], 0), full_col)
    assert torch.equal(torch.cat([r for _, r in per_rank], 1), full_row)


def test_shard_range_is_numpys_balanced_split():
    for n in range(0, 12):
        for p in range(1, 6):
            for rank in range(p):
                want = split(n, rank, p)
                assert tuple(REF["shard_range"](n, rank, p)) == (want.start, want.stop), (n, rank, p)


def test_no_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    for make in (lambda: REF["ColumnParallelLinear"](4, 6), lambda: REF["RowParallelLinear"](4, 6),
                 lambda: REF["ParallelMLP"](4, 6)):
        with pytest.raises(RuntimeError, match="process group"):
            make()


def test_bad_master_weight_shape_is_a_value_error():
    def build():
        messages = []
        for make in (lambda: REF["ColumnParallelLinear"](4, 6, master_weight=torch.zeros(4, 6)),
                     lambda: REF["RowParallelLinear"](4, 6, master_weight=torch.zeros(6, 5)),
                     lambda: REF["ParallelMLP"](4, 6, w1=torch.zeros(4, 6))):
            try:
                make()
                messages.append(None)
            except ValueError as exc:
                messages.append(str(exc))
        return messages
    col, row, mlp = run_on_ranks(build, 2)[1]
    assert "(6, 4)" in col and "(4, 6)" in col
    assert "(6, 4)" in row and "(6, 5)" in row
    assert "(6, 4)" in mlp and "(4, 6)" in mlp
