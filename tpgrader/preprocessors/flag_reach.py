"""Flag, for the instructor, solution cells whose code reaches for the grader (tpjudge.reach).

Runs after SaveAutoGrades: the flag becomes the cell's automatic comment in the gradebook,
which the formgrader shows in the cell's comment box and `nbgrader generate_feedback` under
the cell. It changes no score (the verdicts are decided apart from the student's code).
"""
from __future__ import annotations

from nbgrader.api import Gradebook
from nbgrader.preprocessors import NbGraderPreprocessor

from tpjudge import reach
from tpjudge.cells import grade_id, is_solution


class FlagReach(NbGraderPreprocessor):

    def preprocess(self, nb, resources):
        found = {grade_id(cell): reach.scan(cell.source) for cell in nb.cells
                 if cell.cell_type == "code" and is_solution(cell) and grade_id(cell)}
        found = {gid: findings for gid, findings in found.items() if findings}
        if not found:
            return nb, resources
        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            for gid, findings in found.items():
                comment = gb.find_comment(gid, info["notebook"], info["assignment"],
                                          info["student"])
                comment.auto_comment = reach.comment(findings)
                self.log.warning("%s: %s", gid, comment.auto_comment)
            gb.db.commit()
        return nb, resources
