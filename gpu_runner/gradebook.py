"""Write the gpu_runner's scores into nbgrader's gradebook, through nbgrader's own API.

The gpu_* cells are nbgrader task cells (markdown, task=true, points set, grade=false):
`nbgrader generate_assignment` registers them, `nbgrader autograde` creates an empty Grade and
Comment for each (it cannot score a task cell), and here each gets a manual score and the
runner's explanation as the manual comment, with needs_manual_grade cleared. nbgrader's
`export` sums Grade.score over grade and task cells, and `generate_feedback` (GetGrades) puts
each task cell's score and comment into the feedback, so both pick the scores up. A later
`nbgrader autograde` leaves manual scores of task cells alone.
"""
from __future__ import annotations

import os
import shutil
import sys


class NotAutograded(RuntimeError):
    """The submission is not in the gradebook yet (run `nbgrader autograde` first)."""


def _alembic_on_path():
    """nbgrader's Gradebook runs the `alembic` script by name: find it next to this
    interpreter even when its environment is not activated."""
    if shutil.which("alembic") is None:
        os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable),
                                              os.environ.get("PATH", "")])


def write_scores(db_url: str, assignment: str, notebook: str, student: str,
                 cells: dict[str, tuple[float, str]]) -> None:
    from nbgrader.api import Gradebook, MissingEntry

    _alembic_on_path()
    with Gradebook(db_url) as gb:
        try:
            gb.find_submission_notebook(notebook, assignment, student)
        except MissingEntry as exc:
            raise NotAutograded(f"{student} has no autograded {assignment}/{notebook} in "
                                f"{db_url}: run `nbgrader autograde {assignment}` first") from exc
        for grade_id, (score, comment) in cells.items():
            grade = gb.find_grade(grade_id, notebook, assignment, student)
            grade.manual_score = float(score)
            grade.needs_manual_grade = False
            gb.find_comment(grade_id, notebook, assignment, student).manual_comment = comment
        gb.db.commit()
