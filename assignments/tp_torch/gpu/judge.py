"""tp_torch's units, the grader side: every verdict on what the ranks reported of the student's
ColumnParallelLinear, RowParallelLinear and ParallelMLP (gpu/observe.py), against the dense
float64 reference of the unit's data (gpu/data.py), through tpgrade.verdict, as gpu_runner.judge
says. numpy only.
"""
from __future__ import annotations

from gpu_runner import records
from gpu_runner.data import shard
from gpu_runner.judge import (NOT_CONNECTED, counts, first, float64_verdicts, raised,
                              shape_pattern)
from tpgrade import tensors
from tpgrade.verdict import mismatch
from tpgrade.cases import balanced

from . import data

_NO_GROUP = [("the process group", r"process.?group|init_process_group|initiali[sz]")]


def errors_nopg(view):
    for layer in ("column", "row"):
        view.each(f"errors.no_group_{layer}", lambda r, layer=layer: raised(
            view.obs(r, f"no_group_{layer}"), ("RuntimeError", "ValueError"), _NO_GROUP))


def errors_shape(view):
    (i, o), (ri, ro) = data.COLUMN_DIMS, data.ROW_DIMS
    view.each("errors.bad_shape_column", lambda r: raised(
        view.obs(r, "bad_shape_column"), ("ValueError",), shape_pattern((o, i), (o + 2, i))))
    view.each("errors.bad_shape_row", lambda r: raised(
        view.obs(r, "bad_shape_row"), ("ValueError",), shape_pattern((ro, ri), (ro, ri + 2))))


# -- shards -------------------------------------------------------------------------------------
def _shard_of(case, rank, size, rows=None):
    """(this rank's master_weight, its true shard, the shard bounds)."""
    master = case.master(rank, size, rows)
    bounds = balanced(master.shape[case.axis], size)
    lo, hi = bounds[rank]
    return master, (master[lo:hi] if case.axis == 0 else master[:, lo:hi]), bounds


def _shards_verdict(view, rank, case, key, bias_shape, rows=None):
    names = "rows" if case.axis == 0 else "columns"
    master, mine, bounds = _shard_of(case, rank, view.size, rows)
    weight = view.tensor(rank, key, "weight")
    text = mismatch(weight, mine, f".weight (this rank's {names} of master_weight)",
                    shapes=[(master.shape, f"the whole master_weight: keep this rank's "
                                           f"{names} only")],
                      suspects=tensors.other_shards(master, bounds, rank, case.axis, names))
    if text:
        return text
    bias_rec = view.obs(rank, key).get("bias")
    bias = records.tensor(bias_rec)
    if bias is None or not bias_rec.get("parameter"):
        return ".bias is not an nn.Parameter"
    if bias.shape != bias_shape:
        return f".bias has shape {bias.shape}, expected {bias_shape}"
    return tensors.zero_init(bias, ".bias")


def _default_verdict(view, rank, weight_shape, bias_shape):
    for name, shape in (("weight", weight_shape), ("bias", bias_shape)):
        rec = view.obs(rank, "default").get(name)
        got = records.tensor(rec)
        if got is None or not rec.get("parameter") or got.shape != shape:
            return (f".{name} without master_weight: "
                    f"{'None' if got is None else got.shape}, expected an nn.Parameter {shape}")
    return ""


def shards(view, kind):
    case = data.column(view.seed) if kind == "column" else data.row(view.seed)
    o, i = case.w.shape

    def local(rank, n):
        lo, hi = shard(n, rank, view.size)
        return hi - lo

    if kind == "column":
        view.each("column.shards", lambda r: _shards_verdict(view, r, case, "shards",
                                                             (local(r, o),)))
        view.each("column.default_init", lambda r: _default_verdict(
            view, r, (local(r, o), i), (local(r, o),)))
        view.each("column.no_bias", lambda r: "" if view.obs(r, "no_bias").get("bias") is None
                  else "bias=False left a bias")
        if view.size >= 2:
            small = view.size - 1
            view.each("column.empty_shard", lambda r: _shards_verdict(
                view, r, case, "empty", (local(r, small),), rows=small))
    else:
        view.each("row.shards", lambda r: _shards_verdict(view, r, case, "shards", (o,)))
        view.each("row.default_init", lambda r: _default_verdict(view, r, (o, local(r, i)),
                                                                 (o,)))


# -- the linear layers --------------------------------------------------------------------------
def _linear(view, kind):
    case = data.column(view.seed) if kind == "column" else data.row(view.seed)
    dx, dw, db = tensors.linear_grads(case.x, case.w, case.g)
    return case, tensors.linear(case.x, case.w, case.b), dx, dw, db


def _bounds(view, case, rank):
    return shard(case.split, rank, view.size)


def column_forward(view):
    case, dense, *_ = _linear(view, "column")

    def forward(rank):
        lo, hi = _bounds(view, case, rank)
        return mismatch(view.tensor(rank, "y"), dense, "the output (gather_output=True)",
                        shapes=[tensors.local_shard((data.BATCH, hi - lo))],
                        suspects=[(tensors.linear(case.x, case.master(rank, view.size), case.b),
                                   tensors.DENSE_ON_RANK)])
    view.each("column.forward", forward)

    def forward_nd(rank):
        width = _bounds(view, case, rank)[1] - _bounds(view, case, rank)[0]
        return first(
            mismatch(view.tensor(rank, "y1"), tensors.linear(case.x[0], case.w, case.b),
                     "the output for a 1-D input", shapes=[tensors.local_shard((width,))]),
            mismatch(view.tensor(rank, "y3"), tensors.linear(case.x3, case.w, case.b),
                     "the output for a 3-D input",
                     shapes=[tensors.local_shard((*case.x3.shape[:-1], width))]))
    view.each("column.forward_nd", forward_nd)
    counts(view, "counts.column_gather", "counts", {"allgather": 1})


def _own_term(view, case, rank):
    """This rank's term of dL/dx in a column layer: g's columns of its shard @ its rows of W."""
    lo, hi = _bounds(view, case, rank)
    return tensors.own_term_only(case.g[:, lo:hi].astype("float64") @ case.w[lo:hi])


def column_backward(view):
    case, _, dx, dw, db = _linear(view, "column")

    def rows(rank):
        return slice(*_bounds(view, case, rank))
    view.each("column.grad_weight", lambda r: mismatch(
        view.tensor(r, "gw"), dw[rows(r)], ".weight.grad (this rank's rows of the dense weight "
        "gradient)", missing=NOT_CONNECTED))
    view.each("column.grad_bias", lambda r: mismatch(
        view.tensor(r, "gb"), db[rows(r)], ".bias.grad (this rank's slice of the dense bias "
        "gradient)", missing=NOT_CONNECTED))
    view.each("column.grad_input", lambda r: mismatch(
        view.tensor(r, "gx"), dx, "dL/dx", missing=NOT_CONNECTED,
        suspects=[_own_term(view, case, r)]))


def column_local(view):
    case, dense, dx, _, _ = _linear(view, "column")
    view.each("column.forward_local", lambda r: mismatch(
        view.tensor(r, "y"), dense[:, slice(*_bounds(view, case, r))],
        "the output with gather_output=False (this rank's columns of the dense output)"))
    view.each("column.grad_input_local", lambda r: mismatch(
        view.tensor(r, "gx"), dx, "dL/dx with gather_output=False", missing=NOT_CONNECTED,
        suspects=[_own_term(view, case, r)]))
    counts(view, "counts.column_forward", "counts.forward", {})
    counts(view, "counts.column_backward", "counts.backward", {"allreduce": 1})


def row_forward(view):
    case, dense, *_ = _linear(view, "row")
    view.each("row.forward", lambda r: mismatch(
        view.tensor(r, "y"), dense, "the output (input_is_parallel=True)",
        suspects=[tensors.bias_every_rank(dense, case.b, view.size)]))
    counts(view, "counts.row_forward", "counts", {"allreduce": 1})


def row_backward(view):
    case, _, dx, dw, db = _linear(view, "row")

    def cols(rank):
        return slice(*_bounds(view, case, rank))
    rank0_only = tensors.bias_grad_rank0_only(db)
    view.each("row.grad_weight", lambda r: mismatch(
        view.tensor(r, "gw"), dw[:, cols(r)], ".weight.grad (this rank's columns of the dense "
        "weight gradient)", missing=NOT_CONNECTED))
    view.each("row.grad_bias", lambda r: mismatch(
        view.tensor(r, "gb"), db, ".bias.grad", missing=rank0_only[1], suspects=[rank0_only]))
    view.each("row.grad_input", lambda r: mismatch(
        view.tensor(r, "gx"), dx[:, cols(r)], "dL/dx of this rank's input slice",
        missing=NOT_CONNECTED))
    counts(view, "counts.row_backward", "counts", {})


def row_full(view):
    case, dense, dx, _, _ = _linear(view, "row")
    view.each("row.forward_full", lambda r: mismatch(
        view.tensor(r, "y"), dense, "the output with input_is_parallel=False",
        suspects=[tensors.bias_every_rank(dense, case.b, view.size)]))
    view.each("row.grad_input_full", lambda r: mismatch(
        view.tensor(r, "gx"), dx, "dL/dx of the full input (input_is_parallel=False)",
        missing=NOT_CONNECTED))


# -- MLP ----------------------------------------------------------------------------------------
def _mlp(view):
    case = data.mlp(view.seed)
    return case, tensors.dense_mlp(case.x, case.fc1.w, case.fc1.b, case.fc2.w, case.fc2.b, case.g)


def mlp_forward(view):
    case, dense = _mlp(view)
    view.each("mlp.forward", lambda r: mismatch(
        view.tensor(r, "y"), dense["y"], "the MLP's output",
        suspects=[tensors.bias_every_rank(dense["y"], case.fc2.b, view.size)]))
    counts(view, "counts.mlp_forward", "counts", {"allreduce": 1})


def mlp_backward(view):
    case, dense = _mlp(view)

    def part(rank):
        return slice(*shard(data.MLP_DIMS[1], rank, view.size))

    def grad(rank, key, want, what):
        return mismatch(view.tensor(rank, "grads", key), want, what, missing=NOT_CONNECTED)
    view.each("mlp.grad_weights", lambda r: first(
        grad(r, "w1", dense["dw1"][part(r)], "fc1's weight gradient (its rows of the dense one)"),
        grad(r, "w2", dense["dw2"][:, part(r)],
             "fc2's weight gradient (its columns of the dense one)")))
    view.each("mlp.grad_biases", lambda r: first(
        grad(r, "b1", dense["db1"][part(r)], "fc1's bias gradient (its slice of the dense one)"),
        grad(r, "b2", dense["db2"], "fc2's bias gradient")))
    view.each("mlp.grad_input", lambda r: mismatch(
        view.tensor(r, "gx"), dense["dx"], "dL/dx of the MLP", missing=NOT_CONNECTED,
        suspects=[tensors.own_term_only(dense["dh"][:, part(r)] @ case.fc1.w[part(r)],
                                        "fc1's input must go through copy_to_tp_region (f)")]))
    counts(view, "counts.mlp_backward", "counts", {"allreduce": 1})


def float64(view, kind):
    """The float64 run (observe.float64): the row layer took the full input."""
    if kind == "mlp":
        case, dense = _mlp(view)
        y, dx = dense["y"], dense["dx"]
    else:
        case, y, dx, _, _ = _linear(view, kind)
    float64_verdicts(view, kind, y, dx)


JUDGES = {
    ("errors", "nopg"): errors_nopg, ("errors", "shape"): errors_shape,
    ("column", "shards"): lambda v: shards(v, "column"), ("column", "forward"): column_forward,
    ("column", "backward"): column_backward, ("column", "local"): column_local,
    ("column", "float64"): lambda v: float64(v, "column"),
    ("row", "shards"): lambda v: shards(v, "row"), ("row", "forward"): row_forward,
    ("row", "backward"): row_backward, ("row", "full"): row_full,
    ("row", "float64"): lambda v: float64(v, "row"),
    ("mlp", "forward"): mlp_forward, ("mlp", "backward"): mlp_backward,
    ("mlp", "float64"): lambda v: float64(v, "mlp"),
}
