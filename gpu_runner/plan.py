"""What one launch checks: test units, the sub-checks each one reports, and their grade cells.

A unit is one self-contained step of one layer of one assignment at one world size
("row.forward@3"); it runs on the ranks of a group of that size and reports named
sub-checks. A gpu_* cell scores points * (its sub-checks passed / its sub-checks planned), so a
unit that never ran (a fault) counts as failed, never as absent.

An assignment declares its units in `assignments/<name>/gpu/plan.py`:

    LAYERS        its layers, in the order their units run
    STEPS         {layer: (step, ...)}
    CHECKS        {(layer, step): (sub-check, ...)}; a trailing "*" marks a check made at world
                  size >= 2 only (collective counts: at size 1 a layer may rightly skip its
                  collectives; empty shards)
    cell_of       cell_of(sub-check) -> the gpu_* cell it counts towards (naming_rule below
                  gives the usual one)
    TIMED_LAYERS  (optional) layers whose compute and communication are timed (ungraded)
    AT_SIZES      (optional) {layer: sizes -> the world sizes it runs at} (default: all)
    UNGROUPED     (optional) {(layer, step)}: run on every rank alone, with no process group

Its tables are its own, looked up by assignment (plan_of): two assignments' layers, steps and
seeds (gpu_runner.data.seed_of) cannot collide.

Order: per layer, its shards at every size first (cheap, in before any fault), then its other
steps size by size. After a fault in unit U, the units of U's layer at world sizes >= U's are
skipped (a deadlocking forward would deadlock again there); everything else runs in a
relaunch, so a layer that faults at size 2 costs no relaunch when it is the last layer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import assignments


def plan_of(assignment: str) -> ModuleType:
    """The assignment's gpu/plan.py."""
    return assignments.get(assignment).load("gpu.plan")


@dataclass(frozen=True)
class Unit:
    assignment: str
    kind: str     # one of the assignment's layers, or "timing"
    step: str     # see its STEPS; for timing: the layer timed
    size: int     # world size of the group it runs on

    @property
    def id(self) -> str:
        """Its name within its assignment's plan (the records' and the reports')."""
        return f"{self.kind}.{self.step}@{self.size}"

    @classmethod
    def parse(cls, text: str, assignment: str) -> "Unit":
        name, size = text.split("@")
        kind, step = name.split(".")
        return cls(assignment, kind, step, int(size))

    @property
    def graded(self) -> bool:
        return self.kind != "timing"

    def checks(self) -> tuple[str, ...]:
        """Sub-check names (without the "@size") this unit must report."""
        if not self.graded:
            return ()
        names = plan_of(self.assignment).CHECKS[(self.kind, self.step)]
        return tuple(n.rstrip("*") for n in names if not n.endswith("*") or self.size >= 2)

    def members(self, world: int) -> range:
        """Global ranks of the unit's group: the LAST `size` ranks, so that a group rank differs
        from the global rank and code that ignores `group=` gets caught."""
        return range(world - self.size, world)


def naming_rule(check: str, family_cells=None) -> str:
    """The usual gpu_* cell of a sub-check ("column.forward_nd@3"): its family's entry in
    `family_cells`, else gpu_errors (errors.*), gpu_collective_counts (counts.*),
    gpu_<family>_shards (shards, default_init, no_bias, empty_shard),
    gpu_<family>_forward (forward*), gpu_<family>_backward (the rest)."""
    family, name = check.split("@")[0].rstrip("*").split(".")
    if family_cells and family in family_cells:
        return family_cells[family]
    if family == "errors":
        return "gpu_errors"
    if family == "counts":
        return "gpu_collective_counts"
    if name in ("shards", "default_init", "no_bias", "empty_shard"):
        return f"gpu_{family}_shards"
    if name.startswith("forward"):
        return f"gpu_{family}_forward"
    return f"gpu_{family}_backward"


def handlers(namespace: dict, own_plan: ModuleType) -> dict:
    """The (layer, step) -> function table of one side of an assignment's units (its
    gpu/observe.py: the rank's, its gpu/judge.py: the grader's), by name: `<layer>_<step>`, or
    `<layer>(x, which=step)` where one function serves every step of its layer."""
    return {(layer, step): namespace.get(f"{layer}_{step}")
            or functools.partial(namespace[layer], which=step)
            for layer in own_plan.LAYERS for step in own_plan.STEPS[layer]}


def make_plan(assignment: str, sizes, timing: bool = True, cells=None) -> list[Unit]:
    """Every unit of the assignment at every world size of its layer (AT_SIZES); with `cells`
    (the grade_ids of the notebook's gpu_* cells), only the layers with a check counting
    towards one of them."""
    own = plan_of(assignment)
    sizes = sorted(set(sizes))
    at_sizes = getattr(own, "AT_SIZES", {})
    units = []
    for kind in own.LAYERS:
        steps, at = own.STEPS[kind], at_sizes.get(kind, list)(sizes)
        if steps[0] == "shards":    # cheap and independent: in before any fault can happen
            units += [Unit(assignment, kind, "shards", p) for p in at]
            steps = steps[1:]
        units += [Unit(assignment, kind, step, p) for p in at for step in steps]
    if cells is not None:
        wanted = {kind for (kind, step), names in own.CHECKS.items()
                  if any(own.cell_of(n) in cells for n in names)}
        units = [u for u in units if u.kind in wanted]
    if timing:
        layers = {u.kind for u in units}
        units += [Unit(assignment, "timing", layer, p)
                  for layer in getattr(own, "TIMED_LAYERS", ()) if layer in layers
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


def cell_of(assignment: str, check: str) -> str:
    """The gpu_* grade cell a sub-check of the assignment counts towards."""
    return plan_of(assignment).cell_of(check)


def planned_checks(plan: list[Unit]) -> dict[str, str]:
    """{"column.forward@3": "gpu_column_forward", ...} for every graded unit of the plan."""
    return {f"{name}@{u.size}": cell_of(u.assignment, name) for u in plan for name in u.checks()}
