"""tp_torch's units (gpu_runner.plan says what each table means): the layers' errors, the column
and row layers, the MLP; each layer's shards, forward, backward, and its float64 run."""
from __future__ import annotations

from gpu_runner.plan import naming_rule

LAYERS = ("errors", "column", "row", "mlp")
STEPS = {
    "errors": ("nopg", "shape"),
    "column": ("shards", "forward", "backward", "local", "float64"),
    "row": ("shards", "forward", "backward", "full", "float64"),
    "mlp": ("forward", "backward", "float64"),
}
CHECKS = {
    ("errors", "nopg"): ("errors.no_group_column", "errors.no_group_row"),
    ("errors", "shape"): ("errors.bad_shape_column", "errors.bad_shape_row"),
    ("column", "shards"): ("column.shards", "column.default_init", "column.no_bias",
                           "column.empty_shard*"),
    ("column", "forward"): ("column.forward", "column.forward_nd", "counts.column_gather*"),
    ("column", "backward"): ("column.grad_weight", "column.grad_bias", "column.grad_input"),
    ("column", "local"): ("column.forward_local", "column.grad_input_local",
                          "counts.column_forward*", "counts.column_backward*"),
    ("column", "float64"): ("column.forward_float64", "column.grad_float64"),
    ("row", "shards"): ("row.shards", "row.default_init"),
    ("row", "forward"): ("row.forward", "counts.row_forward*"),
    ("row", "backward"): ("row.grad_weight", "row.grad_bias", "row.grad_input",
                          "counts.row_backward*"),
    ("row", "full"): ("row.forward_full", "row.grad_input_full"),
    ("row", "float64"): ("row.forward_float64", "row.grad_float64"),
    ("mlp", "forward"): ("mlp.forward", "counts.mlp_forward*"),
    ("mlp", "backward"): ("mlp.grad_weights", "mlp.grad_biases", "mlp.grad_input",
                          "counts.mlp_backward*"),
    # the device and dtype rules: a float64 run with meta as the default device (observe.float64)
    ("mlp", "float64"): ("mlp.forward_float64", "mlp.grad_float64"),
}
TIMED_LAYERS = ("column", "row", "mlp")
# The errors a layer raises are checked once, on every rank of the whole world.
AT_SIZES = {"errors": lambda sizes: sizes[-1:]}
# Constructing a layer with no process group at all: on every rank, the default group hidden.
UNGROUPED = {("errors", "nopg")}


def cell_of(check: str) -> str:
    return naming_rule(check)
