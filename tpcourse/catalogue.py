"""Every assignment's example catalogue, graded in-process, and its recorded grade table.

    python -m tpcourse.catalogue                 # grade every catalogue, compare with the tables
    python -m tpcourse.catalogue --write         # grade and (re)write the tables
    python -m tpcourse.catalogue --write tp_mlp  # one assignment

A catalogue is every example student of one assignment: the reference, the unmodified release,
the mistakes and valid alternatives, the forgers (and their wrong answers alone, `_control`)
and the hostile students that can be graded outside the sandbox. Each is graded by the fastest
paths that decide grades as the real grader does: the notebook's test cells by the judge
(tpjudge.local: the student's code in a process of its own, the verdicts in this one), the
gpu_* cells by the gpu_runner's own units and judge on forked gloo ranks (gpu_runner.forked),
at the course's world sizes. The table of an assignment records, for every student, each graded
cell that scored below its points, with its score: what "nothing changes for users" is checked
against (tests/test_catalogue.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tpjudge import local
from tpjudge.cells import gpu_cells, graded_tests, read, reference_answers

from . import ASSIGNMENTS, REPO
from .submissions import Submission, build

# The course's world sizes for gpu_* cells (nbgrader_config.py: c.GpuRunner.world_sizes).
WORLD_SIZES = (1, 2, 3, 4)
# Seconds a cell's student code may run in the judge's student process, and the grace after an
# interrupt: short for the numpy notebooks (a looping student costs two timeouts), the torch
# notebooks' checks start gloo ranks.
JUDGE_LIMITS = {"numpy": (5, 2), "torch": (60, 5)}
PG_TIMEOUT = 10.0          # a collective waiting longer fails (the deadlocking students)
# Units whose verdicts depend on the machine's load (a timing measured against the grader's
# own): graded by their own tests, never pinned in a table. Their cells are left out of it.
LOAD_DEPENDENT = {("overhead", "measure")}


def source(assignment: str):
    return read(REPO / "source" / assignment / f"{assignment}.ipynb")


def table_path(assignment: str) -> Path:
    return REPO / "assignments" / assignment / "grades.json"


def kind(assignment: str) -> str:
    return "torch" if gpu_cells(source(assignment)) else "numpy"


def students(assignment: str) -> list[Submission]:
    """Every example student of `assignment`, each once, in catalogue order."""
    from tpcourse.demo import as_list
    from tpcourse.examples import (attention_students, forgers, hostile_students,
                                   numpy_students, sequence_students, torch_attention_students,
                                   torch_sequence_students, torch_students)
    found = []
    for cat in (numpy_students, sequence_students, attention_students):
        found += as_list(cat.REFERENCE) + as_list(cat.UNMODIFIED) + as_list(cat.STUDENTS)
    found += torch_students.ALL + torch_sequence_students.ALL + torch_attention_students.ALL
    for f in forgers.FORGERS:
        reference = reference_answers(source(f.assignment))
        found += [forgers.submission(f, reference), forgers.submission(f, reference, True)]
    found += [hostile_students.submission(h) for h in hostile_students.HOSTILE
              if not h.sandbox_only]
    mine = [s for s in found if s.assignment == assignment]
    names = [s.student for s in mine]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"{assignment}: example students named twice: {duplicated}")
    return mine


def cells(assignment: str) -> dict[str, float]:
    """{grade_id: points} of every graded cell the table records: the test cells, then the
    gpu_* cells (but those of LOAD_DEPENDENT units)."""
    nb = source(assignment)
    return {**graded_tests(nb), **{gid: points for gid, points in gpu_cells(nb).items()
                                   if gid not in load_dependent_cells(nb)}}


def _steps(source_nb) -> set:
    from gpu_runner.plan import make_plan
    return {(u.kind, u.step) for u in make_plan(WORLD_SIZES, False, gpu_cells(source_nb))}


def load_dependent_cells(source_nb) -> set[str]:
    """The gpu_* cells of the LOAD_DEPENDENT units (in no table)."""
    from gpu_runner.plan import cell_of, make_plan
    if not gpu_cells(source_nb):
        return set()
    return {cell_of(name) for u in make_plan(WORLD_SIZES, False, gpu_cells(source_nb))
            if (u.kind, u.step) in LOAD_DEPENDENT for name in u.checks()}


def grade(sub: Submission, source_nb=None) -> dict[str, float]:
    """{grade_id: score} of the graded cells `sub` scores below their points."""
    from gpu_runner import forked
    source_nb = source_nb or source(sub.assignment)
    stem = sub.assignment
    timeout, grace = JUDGE_LIMITS["torch" if gpu_cells(source_nb) else "numpy"]
    nb = local.with_answers(source_nb, sub.answers.get(stem, {}), release=stem in sub.unanswered)
    lost = {gid: 0.0 for gid in local.judge(nb, timeout=timeout, interrupt_grace=grace).failed}
    if gpu_cells(source_nb):
        with tempfile.TemporaryDirectory(prefix="tpcourse-catalogue-") as tmp:
            rep = forked.grade(sub.student, sub.assignment, source_nb,
                               build(sub)[f"{stem}.ipynb"], WORLD_SIZES, Path(tmp), PG_TIMEOUT,
                               _steps(source_nb) - LOAD_DEPENDENT, max_launches=4)
        skipped = load_dependent_cells(source_nb)
        lost.update({gid: c["score"] for gid, c in rep["cells"].items()
                     if c["score"] < c["points"] and gid not in skipped})
    return dict(sorted(lost.items()))


def table(assignment: str, log=None) -> dict:
    """The grade table of `assignment`'s catalogue, graded now."""
    source_nb = source(assignment)
    lost = {}
    for sub in students(assignment):
        start = time.perf_counter()
        lost[sub.student] = grade(sub, source_nb)
        if log:
            log(f"{assignment} {sub.student} ({time.perf_counter() - start:.0f} s): "
                f"{', '.join(lost[sub.student]) or 'full marks'}")
    timeout, grace = JUDGE_LIMITS[kind(assignment)]
    how = {"judge_timeout": timeout, "interrupt_grace": grace}
    if kind(assignment) == "torch":
        how.update(world_sizes=list(WORLD_SIZES), pg_timeout=PG_TIMEOUT,
                   not_recorded=sorted(load_dependent_cells(source_nb)))
    return {"assignment": assignment, "graded_with": how, "cells": cells(assignment),
            "lost": lost}


def recorded(assignment: str) -> dict:
    return json.loads(table_path(assignment).read_text())


def write(assignment: str, log=None) -> Path:
    path = table_path(assignment)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(table(assignment, log)))
    return path


def dumps(tab: dict) -> str:
    """The table as JSON, one line per cell and per student (reviewable diffs)."""
    def block(mapping):
        return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}"
                                   for k, v in mapping.items()) + "\n }"
    return ("{\n" + f' "assignment": {json.dumps(tab["assignment"])},\n'
            f' "graded_with": {json.dumps(tab["graded_with"])},\n'
            f' "cells": {block(tab["cells"])},\n "lost": {block(tab["lost"])}\n}}\n')


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
    parser.add_argument("assignments", nargs="*", default=list(ASSIGNMENTS))
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
