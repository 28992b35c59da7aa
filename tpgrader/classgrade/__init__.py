"""Grading a whole class at once: `python -m tpcourse.grade_class ASSIGNMENT`.

Submissions are autograded in parallel worker processes (one sandboxed kernel each) by
nbgrader's own Autograde converter, so grades are those of a sequential `nbgrader autograde`;
the main process is the gradebook's only writer and records, with each grade, a digest of
what it graded, which makes a killed run resumable.
"""
from .run import ClassGrader, GraderError, Outcome

__all__ = ["ClassGrader", "GraderError", "Outcome"]
