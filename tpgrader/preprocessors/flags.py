"""Flags for the instructor, written into the gradebook's automatic comments.

Runs after SaveAutoGrades (which sets each solution cell's automatic comment, e.g. "No
response."); each flag is a paragraph of its own, added to that comment, so the formgrader shows
it in the cell's comment box and `nbgrader generate_feedback` under the cell. No flag changes a
score (the verdicts are decided apart from the student's code):
- a solution cell whose code reaches for the grader (tpjudge.reach): on that cell;
- a test cell missing from the submission or changed in it (CheckTestCells, before nbgrader
  put it back): on the solution cell before it (test cells have no comment in nbgrader);
- a notebook whose grading budget ran out (JudgedExecute): on its first solution cell.
"""
from __future__ import annotations

import re

from nbgrader.api import Gradebook
from nbgrader.preprocessors import NbGraderPreprocessor

from tpjudge import reach
from tpjudge.cells import grade_id, is_solution

from .check_tests import MISSING

TESTS = "Test cell changed in the submission"
TIMED_OUT = "Grading timed out"
CHANGED_TEST = re.compile(re.escape(TESTS) + r": (\w+) was")   # the grade_id in a flag


def flags(nb) -> dict[str, list[str]]:
    """{solution grade_id: its flags (paragraphs)} for a graded notebook."""
    found: dict[str, list[str]] = {}
    solutions = [(i, grade_id(c)) for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and is_solution(c) and grade_id(c)]
    if not solutions:
        return found
    for index, gid in solutions:
        findings = reach.scan(nb.cells[index].source)
        if findings:
            found.setdefault(gid, []).append(reach.comment(findings))
    marks = nb.metadata.get("tpgrader", {})
    where = {grade_id(c): i for i, c in enumerate(nb.cells) if grade_id(c)}
    for test, change in sorted((marks.get("changed_tests") or {}).items()):
        at = where.get(test, len(nb.cells))
        before = [gid for i, gid in solutions if i < at] or [solutions[0][1]]
        found.setdefault(before[-1], []).append(
            f"{TESTS}: {test} was missing from it (deleted?); the grader put it back and "
            "judged it as usual." if change == MISSING else
            f"{TESTS}: {test} was changed in it; the grader judged the released test.")
    if marks.get("timed_out"):
        found.setdefault(solutions[0][1], []).append(
            f"{TIMED_OUT}: this notebook's student code {marks['timed_out']}; nothing more of it "
            "was run, and the tests it had not reached score 0 (their outputs say so).")
    return found


class Flags(NbGraderPreprocessor):

    def preprocess(self, nb, resources):
        found = flags(nb)
        if not found:
            return nb, resources
        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            for gid, paragraphs in found.items():
                comment = gb.find_comment(gid, info["notebook"], info["assignment"],
                                          info["student"])
                comment.auto_comment = "\n\n".join([*filter(None, [comment.auto_comment]),
                                                    *paragraphs])
                self.log.warning("%s: %s", gid, " ".join(paragraphs))
            gb.db.commit()
        return nb, resources
