"""Every assignment's example catalogue, graded in-process, and its recorded grade table.

    python -m tpcourse.catalogue                 # grade every catalogue, compare with the tables
    python -m tpcourse.catalogue --write         # grade and (re)write the tables
    python -m tpcourse.catalogue --write NAME    # one assignment

An assignment's catalogue is its examples (assignments/<name>/examples.py): the reference, the
unmodified release, the mistakes and valid alternatives (REFERENCE, UNMODIFIED, STUDENTS), the
forgers and their wrong answers alone (`_control`) (FORGERS) and the hostile students that can
be graded outside the sandbox (HOSTILE). Each is graded by the fastest paths that decide grades
as the real grader does: the notebook's test cells by the judge (tpjudge.local: the student's
code in a process of its own, the verdicts in this one), the gpu_* cells by the gpu_runner's
own units and judge on forked gloo ranks (gpu_runner.forked), at the course's world sizes. The
table of an assignment (its grades.json) records, for every student, each graded cell that
scored below its points, with its score: what "nothing changes for users" is checked against
(tests/test_catalogue.py). Units whose verdicts depend on the machine's load (a plan's
LOAD_DEPENDENT) are left out: their cells are in no table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import assignments as registry
from tpjudge import local
from tpjudge.cells import gpu_cells, graded_tests, read, reference_answers

from .submissions import Submission, build

# The course's world sizes for gpu_* cells (nbgrader_config.py: c.GpuRunner.world_sizes).
WORLD_SIZES = (1, 2, 3, 4)
# Seconds a cell's student code may run in the judge's student process, and the grace after an
# interrupt: short for the numpy notebooks (a looping student costs two timeouts), the torch
# notebooks' checks start gloo ranks.
JUDGE_LIMITS = {"numpy": (5, 2), "torch": (60, 5)}
PG_TIMEOUT = 10.0          # a collective waiting longer fails (the deadlocking students)
# A student whose code never ends (a loop, a deadlock) loses the same cells under any limit
# that its other cells fit in; at the limits above it cost most of the catalogue's time, so it
# is graded with these: the judge's (timeout, grace), and the gpu units' collective wait and
# CPU seconds per unit (the rest of its cells, which end, use a fraction of them).
NEVER_ENDS_LIMITS = {"numpy": (2, 1), "torch": (8, 2)}
NEVER_ENDS_GPU = {"pg_timeout": 3.0, "step_timeout": 6.0}


def as_list(entries) -> list:
    """REFERENCE / UNMODIFIED may be one Submission or a list of them."""
    return [entries] if isinstance(entries, Submission) else list(entries)


def is_looping(sub: Submission) -> bool:
    """A student whose code never ends (graded by timeouts; no in-process run can)."""
    return "loop" in sub.student


def never_ends(sub: Submission) -> bool:
    """A student graded by the limits (a loop, or collectives that wait forever)."""
    return is_looping(sub) or "deadlock" in sub.student


def is_crashing(sub: Submission) -> bool:
    return "crash" in sub.student


def examples(assignment: str) -> ModuleType:
    """The assignment's examples module (assignments/<name>/examples.py)."""
    return registry.get(assignment).load("examples")


def source(assignment: str):
    return read(registry.get(assignment).notebook)


def students(assignment: str) -> list[Submission]:
    """The assignment's reference, unmodified release and other example students."""
    cat = examples(assignment)
    return as_list(cat.REFERENCE) + as_list(cat.UNMODIFIED) + as_list(cat.STUDENTS)


def everyone(assignment: str) -> list[Submission]:
    """Every student its table records: students(), the forgers and their wrong answers alone,
    the hostile students that can be graded in-process."""
    cat = examples(assignment)
    found = students(assignment)
    forgers = getattr(cat, "FORGERS", ())
    if forgers:
        reference = reference_answers(source(assignment))
        found += [f.submission(reference, control) for f in forgers for control in (False, True)]
    found += [h.submission() for h in getattr(cat, "HOSTILE", ()) if not h.sandbox_only]
    names = [s.student for s in found]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"{assignment}: example students named twice: {duplicated}")
    return found


def _plan(assignment: str, source_nb):
    from gpu_runner.plan import make_plan, plan_of
    units = make_plan(assignment, WORLD_SIZES, False, gpu_cells(source_nb))
    return units, getattr(plan_of(assignment), "LOAD_DEPENDENT", set())


def load_dependent_cells(assignment: str, source_nb=None) -> set[str]:
    """The gpu_* cells of the plan's LOAD_DEPENDENT units (in no table)."""
    if not registry.get(assignment).has_gpu:
        return set()
    from gpu_runner.plan import cell_of
    units, load_dependent = _plan(assignment, source_nb or source(assignment))
    return {cell_of(assignment, name) for u in units if (u.kind, u.step) in load_dependent
            for name in u.checks()}


def cells(assignment: str) -> dict[str, float]:
    """{grade_id: points} of every graded cell the table records: the test cells, then the
    gpu_* cells (but those of LOAD_DEPENDENT units)."""
    nb = source(assignment)
    skipped = load_dependent_cells(assignment, nb)
    return {**graded_tests(nb), **{gid: points for gid, points in gpu_cells(nb).items()
                                   if gid not in skipped}}


def gpu_report(sub: Submission, sizes, tmp: Path, pg_timeout=PG_TIMEOUT, steps=None,
               max_launches=1, source_nb=None, step_timeout=0.0) -> dict:
    """The gpu_runner's report of `sub` graded at `sizes` on forked gloo ranks
    (gpu_runner.forked): the units of its gpu_* cells, or of the (layer, step)s `steps`;
    `max_launches`: launches in all, a fault ending one; `step_timeout`: CPU seconds per unit
    (0: the runner's default, twice `pg_timeout`)."""
    from gpu_runner import forked
    name = sub.assignment
    return forked.grade(sub.student, name, source_nb or source(name),
                        build(sub)[f"{name}.ipynb"], sizes, Path(tmp), pg_timeout, steps,
                        max_launches, step_timeout)


def grade(sub: Submission, source_nb=None) -> dict[str, float]:
    """{grade_id: score} of the graded cells `sub` scores below their points."""
    a = registry.get(sub.assignment)
    source_nb = source_nb or source(a.name)
    endless = never_ends(sub)
    timeout, grace = (NEVER_ENDS_LIMITS if endless else JUDGE_LIMITS)[a.kind]
    nb = local.with_answers(source_nb, sub.answers.get(a.name, {}),
                            release=a.name in sub.unanswered)
    lost = {gid: 0.0 for gid in local.judge(nb, timeout=timeout, interrupt_grace=grace).failed}
    if a.has_gpu:
        units, load_dependent = _plan(a.name, source_nb)
        steps = {(u.kind, u.step) for u in units} - set(load_dependent)
        with tempfile.TemporaryDirectory(prefix="tpcourse-catalogue-") as tmp:
            rep = gpu_report(sub, WORLD_SIZES, tmp, steps=steps, max_launches=4,
                             source_nb=source_nb, **(NEVER_ENDS_GPU if endless else {}))
        skipped = load_dependent_cells(a.name, source_nb)
        lost.update({gid: c["score"] for gid, c in rep["cells"].items()
                     if c["score"] < c["points"] and gid not in skipped})
    return dict(sorted(lost.items()))


def table(assignment: str, log=None) -> dict:
    """The grade table of `assignment`'s catalogue, graded now."""
    a = registry.get(assignment)
    source_nb = source(assignment)
    lost = {}
    for sub in everyone(assignment):
        start = time.perf_counter()
        lost[sub.student] = grade(sub, source_nb)
        if log:
            log(f"{assignment} {sub.student} ({time.perf_counter() - start:.0f} s): "
                f"{', '.join(lost[sub.student]) or 'full marks'}")
    timeout, grace = JUDGE_LIMITS[a.kind]
    how = {"judge_timeout": timeout, "interrupt_grace": grace,
           "never_ends": dict(zip(("judge_timeout", "interrupt_grace"),
                                  NEVER_ENDS_LIMITS[a.kind]))}
    if a.has_gpu:
        how["never_ends"].update(NEVER_ENDS_GPU)
        how.update(world_sizes=list(WORLD_SIZES), pg_timeout=PG_TIMEOUT,
                   not_recorded=sorted(load_dependent_cells(assignment, source_nb)))
    return {"assignment": assignment, "graded_with": how, "cells": cells(assignment),
            "lost": lost}


def recorded(assignment: str) -> dict:
    return json.loads(registry.get(assignment).grades.read_text())


def dumps(tab: dict) -> str:
    """The table as JSON, one line per cell and per student (reviewable diffs)."""
    def block(mapping):
        return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}"
                                   for k, v in mapping.items()) + "\n }"
    return ("{\n" + f' "assignment": {json.dumps(tab["assignment"])},\n'
            f' "graded_with": {json.dumps(tab["graded_with"])},\n'
            f' "cells": {block(tab["cells"])},\n "lost": {block(tab["lost"])}\n}}\n')


def write(assignment: str, log=None) -> Path:
    path = registry.get(assignment).grades
    path.write_text(dumps(table(assignment, log)))
    return path


def differences(assignment: str, log=None) -> list[str]:
    """What grading the catalogue now gives that its recorded table does not say."""
    old, new = recorded(assignment), table(assignment, log)
    diffs = [f"cells: {old['cells']} -> {new['cells']}"] if old["cells"] != new["cells"] else []
    for student in sorted(set(old["lost"]) | set(new["lost"])):
        was, now = old["lost"].get(student), new["lost"].get(student)
        if was != now:
            diffs.append(f"{student}: recorded {was}, now {now}")
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("assignments", nargs="*", default=registry.names())
    parser.add_argument("--write", action="store_true", help="rewrite the tables")
    args = parser.parse_args(argv)
    status = 0
    for assignment in args.assignments:
        if args.write:
            print(f"wrote {write(assignment, print)}")
            continue
        diffs = differences(assignment, print)
        status |= bool(diffs)
        print(f"{assignment}: " + ("as recorded" if not diffs else "\n  ".join(
            ["DIFFERS from the table"] + diffs)))
    return status


if __name__ == "__main__":
    sys.exit(main())
