"""Test cells a submission deleted or changed: put back, and said so.

Runs in `nbgrader autograde`'s sanitizing pass, just before nbgrader's OverwriteCells (which
restores a locked cell's source and points from the gradebook, but only for the cells it finds:
a deleted test cell would score 0 and appear nowhere in the feedback, so the feedback's count
of failed checks and the gradebook's disagreed). Here, against the gradebook:
- a test cell missing from the submission (deleted, or its nbgrader metadata removed) is put
  back, after the cell it follows in the source notebook (at the end when the source is not
  at hand), so that it is judged like any other;
- a test cell whose code, points or flags differ from what was released is noted (nbgrader
  then restores it).
Both are recorded in the notebook's metadata (nb.metadata["tpgrader"]["changed_tests"]:
{grade_id: "missing" | "changed"}), from which Flags writes the gradebook comment, the
class table its column, and the feedback its note.
"""
from __future__ import annotations

import os

from nbformat.notebooknode import NotebookNode
from nbformat.v4 import new_code_cell
from nbgrader.api import Gradebook, MissingEntry
from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor

from tpjudge.cells import grade_id, is_test, meta, read

MISSING, CHANGED = "missing", "changed"


class CheckTestCells(NbGraderPreprocessor):

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            try:
                source = gb.find_notebook(info["notebook"], info["assignment"])
            except MissingEntry:
                return nb, resources
            released = {c.name: (c.source, c.cell_type, c.locked) for c in source.source_cells}
            tests = {c.name: float(c.max_score) for c in source.grade_cells
                     if c.cell_type == "code" and c.name in released}
            solutions = {c.name for c in source.solution_cells}
        tests = {name: points for name, points in tests.items() if name not in solutions}
        found = {grade_id(c): c for c in nb.cells if grade_id(c)}
        changes = {}
        for name, points in tests.items():
            cell = found.get(name)
            if cell is None:
                changes[name] = MISSING
            elif not is_test(cell):        # its grade flag taken away: a test again
                cell.metadata.nbgrader.update(grade=True, solution=False, points=points)
                changes[name] = CHANGED
            elif (cell.source.strip() != self._as_released(released[name][0]).strip()
                  or float(meta(cell).get("points") or 0) != points
                  or bool(meta(cell).get("locked")) != released[name][2]):
                changes[name] = CHANGED
        missing = [name for name, change in changes.items() if change == MISSING]
        if missing:
            self._put_back(nb, missing, released, tests, resources)
        if changes:
            nb.metadata.setdefault("tpgrader", {})["changed_tests"] = changes
            self.log.warning("test cells missing or changed in the submission: %s", changes)
        return nb, resources

    def _as_released(self, source: str) -> str:
        """A test cell's source as the release has it: without its hidden tests."""
        cell = NotebookNode(cell_type="code", source=source, metadata={})
        ClearHiddenTests(parent=self)._remove_hidden_test_region(cell)
        return cell.source

    def _put_back(self, nb, missing, released, tests, resources) -> None:
        order = self._source_order(resources) or []
        for name in sorted(missing, key=lambda n: order.index(n) if n in order else len(order)):
            source, _, locked = released[name]
            cell = new_code_cell(source, metadata={
                "deletable": False, "editable": False, "nbgrader": {
                    "grade": True, "solution": False, "locked": locked, "grade_id": name,
                    "points": tests[name], "schema_version": 3}})
            nb.cells.insert(_position(nb, order, name), cell)

    def _source_order(self, resources) -> list[str] | None:
        """The grade_ids of the source notebook, in order (None when it is not at hand)."""
        from nbgrader.coursedir import CourseDirectory
        info = resources["nbgrader"]
        try:
            coursedir = CourseDirectory(config=self.config)
            path = os.path.join(coursedir.format_path(coursedir.source_directory, ".",
                                                      info["assignment"]),
                                f"{info['notebook']}.ipynb")
            return [grade_id(c) for c in read(path).cells if grade_id(c)]
        except (OSError, ValueError):
            return None


def _position(nb, order, name) -> int:
    """Where a missing cell goes: after the nearest cell before it in the source that the
    submission has; before the nearest one after it; else at the end."""
    present = {grade_id(c): i for i, c in enumerate(nb.cells) if grade_id(c)}
    if name in order:
        at = order.index(name)
        for before in reversed(order[:at]):
            if before in present:
                return present[before] + 1
        for after in order[at + 1:]:
            if after in present:
                return present[after]
    return len(nb.cells)
