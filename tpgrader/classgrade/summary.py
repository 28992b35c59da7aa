"""The per-student table printed at the end of a class run."""
from __future__ import annotations


def counts(outcome) -> tuple[float, float, int]:
    """(score, max score, number of grade cells below full marks) over all notebooks."""
    score = maximum = 0.0
    failed = 0
    for grades in outcome.scores.values():
        for got, top in grades.values():
            score += got or 0.0
            maximum += top or 0.0
            failed += int((got or 0.0) < (top or 0.0))
    return score, maximum, failed


def table(outcomes) -> str:
    width = max([len("student")] + [len(o.student) for o in outcomes])
    lines = [f"{'student':<{width}}  {'status':<9}  {'score':>13}  {'failed tests':>12}  "
             f"{'flagged':<7}  error"]
    for o in outcomes:
        score, top, failed = counts(o)
        shown = f"{score:g} / {top:g}" if o.scores else "-"
        err = o.error.splitlines()[0][:70] if o.error else ""
        # cells whose code reaches for the grader: for the instructor to review (no points lost)
        flag = f"{len(o.flagged)} cell" + ("s" if len(o.flagged) > 1 else "") if o.flagged else ""
        lines.append(f"{o.student:<{width}}  {o.status:<9}  {shown:>13}  {failed:>12}  "
                     f"{flag:<7}  {err}")
    graded = sum(o.status == "graded" for o in outcomes)
    same = sum(o.status == "unchanged" for o in outcomes)
    errors = sum(o.status == "error" for o in outcomes)
    flagged = sum(bool(o.flagged) for o in outcomes)
    lines.append(f"{len(outcomes)} submissions: {graded} graded, {same} unchanged since the last "
                 f"run, {errors} could not be graded, {flagged} flagged for review (their "
                 f"cells' comments say why)")
    return "\n".join(lines)
