"""The per-student table printed at the end of a class run. A student's name and an error's
text are shown plain (tpjudge.student_text): no escape sequence reaches the terminal."""
from __future__ import annotations

from tpjudge.student_text import one_line, plain


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


def _cells(names) -> str:
    return f"{len(names)} cell" + ("s" if len(names) > 1 else "") if names else ""


def table(outcomes) -> str:
    names = {id(o): one_line(o.student, 60) for o in outcomes}
    width = max([len("student")] + [len(n) for n in names.values()])
    lines = [f"{'student':<{width}}  {'status':<9}  {'score':>13}  {'failed tests':>12}  "
             f"{'flagged':<8}  {'tests changed':<13}  error"]
    for o in outcomes:
        score, top, failed = counts(o)
        shown = f"{score:g} / {top:g}" if o.scores else "-"
        status = "timed out" if o.timed_out else o.status
        err = one_line((plain(o.error).strip().splitlines() or [""])[0], 70) if o.error else (
            f"grading budget used up: {', '.join(o.timed_out)}" if o.timed_out else "")
        # flagged: cells whose code reaches for the grader; tests changed: test cells missing
        # from the submission or changed in it (put back and judged). No points lost by either.
        lines.append(f"{names[id(o)]:<{width}}  {status:<9}  {shown:>13}  {failed:>12}  "
                     f"{_cells(o.flagged):<8}  {_cells(o.changed_tests):<13}  {err}")
    graded = sum(o.status == "graded" for o in outcomes)
    same = sum(o.status == "unchanged" for o in outcomes)
    errors = sum(o.status == "error" for o in outcomes)
    timed_out = sum(bool(o.timed_out) for o in outcomes)
    flagged = sum(bool(o.flagged or o.changed_tests) for o in outcomes)
    lines.append(f"{len(outcomes)} submissions: {graded} graded, {same} unchanged since the last "
                 f"run, {errors} could not be graded, {timed_out} timed out (their grading "
                 f"budget used up), {flagged} flagged for review (their cells' comments say why)")
    return "\n".join(lines)
