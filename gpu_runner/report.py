"""From unit results to cell scores, comments and the per-student JSON report.

Score of a gpu_* cell = points * (its sub-checks passed / its sub-checks planned). A
sub-check is one check of one unit at one world size ("column.forward@3"); plan.CHECKS and
plan.cell_of say which cell it counts towards. Sub-checks of a unit that faulted, was skipped
after a fault or never ran count as failed, with the reason as their detail.

The comment of a cell (the gradebook's, shown in the feedback) lists every failed check with
its diagnosis, once per check with the world sizes it failed at; it names nothing the student
cannot see (no grader paths: those stay in the report's "launches"). A diagnosis can quote what
a rank raised (the student's text): each is one line of plain text (tpjudge.student_text), so
the comment, markdown in the feedback and the formgrader, stays one list item per check.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tpjudge.student_text import one_line

from . import machine
from .plan import planned_checks


DETAIL_LIMIT = 1000     # characters of one failed check's diagnosis in a comment


def build(student, assignment, notebook, cells, plan, results, launches, cfg, seconds) -> dict:
    planned = planned_checks(plan)
    checks = {}
    for u in plan:
        r = results[u.id]
        for name, (ok, detail) in r.checks.items():
            checks[f"{name}@{u.size}"] = {"ok": ok, "detail": detail, "cell": planned[f"{name}@{u.size}"],
                                          "status": r.status}
    report_cells = {}
    for gid, points in cells.items():
        ids = [c for c, cell in planned.items() if cell == gid]
        passed = [c for c in ids if checks[c]["ok"]]
        # a cell none of whose checks apply at the course's sizes (the collective counts at
        # world size 1) has nothing a submission can lose: its points are everyone's
        score = round(points * len(passed) / len(ids), 3) if ids else float(points)
        report_cells[gid] = {"score": score, "points": points, "passed": len(passed),
                             "total": len(ids),
                             "comment": _comment(gid, ids, checks, cfg)}
    faults = [{"unit": r.unit.id, "status": r.status, "reason": r.reason}
              for r in results.values() if r.status in ("fault", "not_run")]
    skipped = [r.unit.id for r in results.values() if r.status == "skipped"]
    return {
        "student": student, "assignment": assignment, "notebook": notebook,
        "backend": cfg.backend, "world_sizes": sorted(cfg.sizes),
        "sandboxed": cfg.wrap is not None,
        "score": round(sum(c["score"] for c in report_cells.values()), 3),
        "max_score": sum(c["points"] for c in report_cells.values()),
        "seconds": round(seconds, 2), "launches": launches,
        "untested": machine.untested(cfg.backend),
        "environment_dropped": machine.job_env(dict(os.environ), cfg.backend)[1],
        "cells": report_cells, "faults": faults, "skipped_after_fault": skipped,
        "timing": _timing(results), "checks": checks,
    }


def _comment(gid, ids, checks, cfg) -> str:
    if not ids:
        return (f"gpu_runner ({cfg.backend}, world sizes {', '.join(map(str, sorted(cfg.sizes)))}"
                f"): nothing of this cell is checked at these world sizes (it needs 2 or more)")
    failed = [c for c in ids if not checks[c]["ok"]]
    head = (f"gpu_runner ({cfg.backend}, world sizes {', '.join(map(str, sorted(cfg.sizes)))}): "
            f"{len(ids) - len(failed)}/{len(ids)} checks passed.")
    if not failed:
        return head
    by_check: dict[str, list[str]] = {}
    for c in failed:
        by_check.setdefault(c.split("@")[0], []).append(c)
    lines = []
    for name, ids_ in by_check.items():
        sizes = ", ".join(c.split("@")[1] for c in ids_)
        lines.append(f"- {name} (world size{'s' if len(ids_) > 1 else ''} {sizes}): "
                     f"{one_line(checks[ids_[0]]['detail'], DETAIL_LIMIT)}")
    return head + " Failed:\n" + "\n".join(lines)


def _timing(results) -> dict:
    """{layer: {world size: {"compute_ms", "comm_ms", "total_ms"}}} (mean over the ranks)."""
    out = {}
    for r in results.values():
        if r.unit.kind == "timing" and r.timing:
            out.setdefault(r.unit.step, {})[str(r.unit.size)] = {
                k: round(v, 3) for k, v in r.timing.items()}
    return out


def write(report: dict, folder: Path) -> Path:
    """report.json (and timing.png when there are timings) in `folder`."""
    from .timing import plot
    folder.mkdir(parents=True, exist_ok=True)
    if report["timing"]:
        plot(report["timing"], folder / "timing.png",
             f"{report['student']}: compute vs collectives ({report['backend']})")
        report["timing_plot"] = str(folder / "timing.png")
    path = folder / "report.json"
    path.write_text(json.dumps(report, indent=1, sort_keys=False))
    return path


def scores(report: dict) -> dict[str, tuple[float, str]]:
    """{grade_id: (score, comment)} for the gradebook."""
    return {gid: (c["score"], c["comment"]) for gid, c in report["cells"].items()}
