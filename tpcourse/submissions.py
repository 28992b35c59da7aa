"""Build student submissions from the course notebooks.

A submission is the release notebook (what a student receives) with some solution cells
filled in. Cells are addressed by their nbgrader `grade_id`, so an example student is just a
mapping {grade_id: code}; every solution cell it does not name gets the instructor's answer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from tpjudge.cells import grade_id, is_solution, read, reference_answers  # noqa: F401

from . import REPO


@dataclass(frozen=True)
class Submission:
    """One example student's work on one assignment.

    answers: notebook stem -> {solution grade_id -> code}; unnamed cells get the reference answer.
    unanswered: notebook stems left exactly as released (no solution cell filled in).
    loses: grade_ids of test cells that must score below their maximum (all others full marks,
           unless `loses_all` is set, for submissions that break the whole notebook).
    """
    student: str
    assignment: str
    answers: dict = field(default_factory=dict)
    loses: frozenset = frozenset()
    why: str = ""
    unanswered: frozenset = frozenset()
    loses_all: bool = False


def edited(answers: dict[str, str], **changes) -> dict[str, str]:
    """A copy of `answers` ({grade_id: code}) with some cells' code edited: {grade_id: [(old,
    new), ...]}, each `old` found exactly once (a wrong student written as an edit of a
    catalogue's reference)."""
    answers = dict(answers)
    for cell, edits in changes.items():
        for old, new in edits:
            if answers[cell].count(old) != 1:
                raise ValueError(f"{cell}: {old!r} is not once in the reference")
            answers[cell] = answers[cell].replace(old, new)
    return answers


def fill(release_nb, answers: dict[str, str]):
    """A copy of `release_nb` with the named solution cells replaced by `answers`."""
    nb = copy.deepcopy(release_nb)
    wanted = dict(answers)
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in wanted and is_solution(cell):
            cell.source = wanted.pop(gid)
    if wanted:
        raise KeyError(f"no solution cell with grade_id {sorted(wanted)}")
    return nb


def build(sub: Submission, source_dir: Path | None = None, release_dir: Path | None = None):
    """{notebook filename: notebook} for a submission, starting from the release notebooks."""
    source_dir = Path(source_dir or REPO / "source") / sub.assignment
    release_dir = Path(release_dir or REPO / "release") / sub.assignment
    notebooks = {}
    for rel_path in sorted(release_dir.glob("*.ipynb")):
        stem = rel_path.stem
        if stem in sub.unanswered:
            notebooks[rel_path.name] = read(rel_path)
            continue
        answers = reference_answers(read(source_dir / rel_path.name))
        answers.update(sub.answers.get(stem, {}))
        notebooks[rel_path.name] = fill(read(rel_path), answers)
    unknown = set(sub.answers) - {Path(n).stem for n in notebooks}
    if unknown:
        raise KeyError(f"{sub.student}: no notebook named {sorted(unknown)} in {release_dir}")
    return notebooks
