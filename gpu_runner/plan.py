"""What one launch checks: test units, the sub-checks each one reports, and their grade cells.

A unit is one self-contained step of one layer at one world size ("row.forward@3"); it runs
on the ranks of a group of that size and reports named sub-checks. A gpu_* cell scores
points * (its sub-checks passed / its sub-checks planned), so a unit that never ran (a fault)
counts as failed, never as absent.

Order: per layer, its shards at every size first (cheap, in before any fault), then its other
steps size by size. After a fault in unit U, the units of U's layer at world sizes >= U's are
skipped (a deadlocking forward would deadlock again there); everything else runs in a
relaunch, so a layer that faults at size 2 costs no relaunch when it is the last layer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from . import plan_sequence

STEPS = {
    "errors": ("nopg", "shape"),
    "column": ("shards", "forward", "backward", "local", "float64"),
    "row": ("shards", "forward", "backward", "full", "float64"),
    "mlp": ("forward", "backward", "float64"),
    **plan_sequence.STEPS,
}
TIMED_LAYERS = ("column", "row", "mlp")

# Sub-checks per (layer, step). A trailing "*" marks a check made at world size >= 2 only
# (collective counts: at size 1 a layer may rightly skip its collectives; empty shards).
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
    **plan_sequence.CHECKS,
}


@dataclass(frozen=True)
class Unit:
    kind: str     # errors | column | row | mlp | attention | layer | overhead | timing
    step: str     # see STEPS; for timing: the layer timed
    size: int     # world size of the group it runs on

    @property
    def id(self) -> str:
        return f"{self.kind}.{self.step}@{self.size}"

    @classmethod
    def parse(cls, text: str) -> "Unit":
        name, size = text.split("@")
        kind, step = name.split(".")
        return cls(kind, step, int(size))

    @property
    def graded(self) -> bool:
        return self.kind != "timing"

    def checks(self) -> tuple[str, ...]:
        """Sub-check names (without the "@size") this unit must report."""
        if not self.graded:
            return ()
        names = CHECKS[(self.kind, self.step)]
        return tuple(n.rstrip("*") for n in names if not n.endswith("*") or self.size >= 2)

    def members(self, world: int) -> range:
        """Global ranks of the unit's group: the LAST `size` ranks, so that a group rank differs
        from the global rank and code that ignores `group=` gets caught."""
        return range(world - self.size, world)


# The layers, in the order their units run (a new torch assignment's layers are appended here,
# with their STEPS, CHECKS and cells).
LAYERS = ("column", "row", "mlp") + plan_sequence.LAYERS
# Check families whose cell several assignments share (each notebook has its own
# gpu_collective_counts): they do not make a layer one of a notebook's own (make_plan).
SHARED_FAMILIES = ("counts",)
# A family's cell where cell_of's naming rule does not give it.
FAMILY_CELLS: dict[str, str] = {}
# The world sizes a layer runs at, from the course's (default: all of them).
AT_SIZES: dict = {}

# tp_torch_attention: ParallelAttention, ParallelTransformerLayer, the TP overhead measurement
ATTENTION_LAYERS = ("attention", "layer", "overhead")
STEPS.update(attention=("forward", "backward", "float64"), layer=("forward", "backward"),
             overhead=("measure",))
CHECKS.update({
    ("attention", "forward"): ("attention.forward", "attention.forward_causal",
                               "counts.attention_forward*"),
    ("attention", "backward"): ("attention.grad_input", "attention.grad_qkv",
                                "attention.grad_proj", "counts.attention_backward*"),
    ("attention", "float64"): ("attention.forward_float64", "attention.grad_float64"),
    ("layer", "forward"): ("layer.forward", "counts.layer_forward*"),
    ("layer", "backward"): ("layer.grad_input", "layer.grad_norms", "layer.grad_attention",
                            "layer.grad_mlp", "counts.layer_backward*"),
    # measured next to the grader's own measurement, on the smallest group with communication
    ("overhead", "measure"): ("overhead.result", "overhead.agrees", "overhead.barrier",
                              "overhead.warmup"),
})
LAYERS += ATTENTION_LAYERS
FAMILY_CELLS["overhead"] = "gpu_timing"
AT_SIZES["overhead"] = lambda sizes: [s for s in sizes if s >= 2][:1]


def handlers(namespace: dict, layers) -> dict:
    """The (layer, step) -> function table of one side for `layers` (observe_*: the rank's,
    judge_*: the grader's), by name: `<layer>_<step>`, or `<layer>(x, which=step)` where one
    function serves every step of its layer (seqmap)."""
    return {(layer, step): namespace.get(f"{layer}_{step}")
            or functools.partial(namespace[layer], which=step)
            for layer in layers for step in STEPS[layer]}


def make_plan(sizes, timing: bool = True, cells=None) -> list[Unit]:
    """Every unit at every world size of its layer (AT_SIZES); with `cells` (the grade_ids of a
    notebook's gpu_* cells), only the units of the assignment's own layers: those with a check,
    other than a shared family's (SHARED_FAMILIES), counting towards one of them."""
    sizes = sorted(set(sizes))
    world = sizes[-1]
    units = [Unit("errors", step, world) for step in STEPS["errors"]]
    for kind in LAYERS:
        steps, at = STEPS[kind], AT_SIZES.get(kind, list)(sizes)
        if steps[0] == "shards":    # cheap and independent: in before any fault can happen
            units += [Unit(kind, "shards", p) for p in at]
            steps = steps[1:]
        units += [Unit(kind, step, p) for p in at for step in steps]
    if cells is not None:           # the layers with a check of their own in one of `cells`
        own = {u.kind for u in units for n in CHECKS[(u.kind, u.step)]
               if n.split(".")[0] not in SHARED_FAMILIES and cell_of(n) in cells}
        units = [u for u in units if u.kind in own]
    if timing:
        layers = {u.kind for u in units}
        units += [Unit("timing", layer, p) for layer in TIMED_LAYERS if layer in layers
                  for p in sizes]
    return units


def skipped_by_fault(fault: Unit, pending: list[Unit], kind: str = "comm") -> list[Unit]:
    """Units not to retry after `fault`: the same layer (its checks or its timing) at the same
    or larger world sizes (a deadlocking forward would deadlock again there). After a sticky
    CUDA error (kind "cuda": the rank's CUDA context was unusable) none: the relaunch gets a
    fresh context, and only the unit that caused it loses its points."""
    if kind == "cuda":
        return []
    layer = fault.step if fault.kind == "timing" else fault.kind
    return [u for u in pending if u != fault and u.size >= fault.size
            and layer in (u.kind, u.step if u.kind == "timing" else None)]


def cell_of(check: str) -> str:
    """The gpu_* grade cell a sub-check counts towards."""
    if plan_sequence.cell_of(check):
        return plan_sequence.cell_of(check)
    family, name = check.split("@")[0].split(".")
    if family in FAMILY_CELLS:
        return FAMILY_CELLS[family]
    if family == "errors":
        return "gpu_errors"
    if family == "counts":
        return "gpu_collective_counts"
    if name in ("shards", "default_init", "no_bias", "empty_shard"):
        return f"gpu_{family}_shards"
    if name.startswith("forward"):
        return f"gpu_{family}_forward"
    return f"gpu_{family}_backward"


def planned_checks(plan: list[Unit]) -> dict[str, str]:
    """{"column.forward@3": "gpu_column_forward", ...} for every graded unit of the plan."""
    return {f"{name}@{u.size}": cell_of(name) for u in plan for name in u.checks()}
