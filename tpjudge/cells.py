"""Reading a course notebook's nbgrader metadata: which cell is what, and the student's program.

The one place that knows how nbgrader marks cells (`cell.metadata.nbgrader`): solution cells
(`solution`), graded test cells (`grade` on a code cell), task cells (`task`, the gpu_runner's
`gpu_*`), and the read-only cells the course gives (`locked`: the setup cell, helpers); and the
course's own kind, the self-check cells (no nbgrader role, a call of `tpgrade.selfcheck.run`).
The judge, the gpu_runner, the release tooling and the tests all read notebooks through it.
"""
from __future__ import annotations

import ast
import builtins
import re

import nbformat

_MARKER = re.compile(r"^\s*### (BEGIN|END) SOLUTION\s*$")
_SOLUTION = re.compile(r"^([ \t]*)### BEGIN SOLUTION[^\n]*\n.*?^[ \t]*### END SOLUTION[^\n]*$",
                       re.M | re.S)
_MAGIC = re.compile(r"^(\s*)([%!].*)$")
_SELF_CHECK = re.compile(r"^tpgrade\.selfcheck\.run\(", re.M)


def read(path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def grade_id(cell) -> str | None:
    return meta(cell).get("grade_id")


def is_solution(cell) -> bool:
    return bool(meta(cell).get("solution"))


def is_test(cell) -> bool:
    """An autograded test cell: code, graded, not a solution."""
    m = meta(cell)
    return cell.cell_type == "code" and bool(m.get("grade")) and not m.get("solution")


def is_given(cell) -> bool:
    """Code the course gives, read-only (setup, helpers): locked, neither graded nor a solution."""
    m = meta(cell)
    return (cell.cell_type == "code" and bool(m.get("locked")) and not m.get("grade")
            and not m.get("solution"))


def is_self_check(cell) -> bool:
    """A self-check cell (tpgrade.selfcheck): a code cell with no nbgrader role whose code calls
    `tpgrade.selfcheck.run(...)`. `nbgrader generate_assignment` writes its checks into it
    (tpgrader.preprocessors.self_check); grading never runs it."""
    m = meta(cell)
    return (cell.cell_type == "code" and not any(m.get(k) for k in ("grade", "solution",
                                                                   "locked", "task"))
            and bool(_SELF_CHECK.search(cell.source)))


def points(cell) -> float:
    return float(meta(cell).get("points", 0))


def graded_tests(nb) -> dict[str, float]:
    """{grade_id: points} of the autograded test cells, in notebook order."""
    return {grade_id(c): points(c) for c in nb.cells if is_test(c)}


def solution_ids(nb) -> list[str]:
    return [grade_id(c) for c in nb.cells
            if c.cell_type == "code" and is_solution(c) and grade_id(c)]


def gpu_cells(nb) -> dict[str, float]:
    """{grade_id: points} of the cells the gpu_runner scores (grade_id "gpu_*")."""
    return {grade_id(c): points(c) for c in nb.cells
            if str(grade_id(c) or "").startswith("gpu_")
            and (meta(c).get("task") or meta(c).get("grade"))}


def given_sources(nb) -> list[str]:
    return [c.source for c in nb.cells if is_given(c)]


def strip_markers(source: str) -> str:
    """A solution cell's code as a student would type it (the instructor's answer)."""
    return "\n".join(line for line in source.splitlines() if not _MARKER.match(line))


def stub(source: str) -> str:
    """A solution cell as the release shows it (nbgrader's ClearSolutions, in short)."""
    return _SOLUTION.sub(lambda m: f"{m.group(1)}# YOUR CODE HERE\n{m.group(1)}"
                         "raise NotImplementedError()", source)


def reference_answers(source_nb) -> dict[str, str]:
    """{solution grade_id: the instructor's answer} of a source notebook."""
    return {grade_id(c): strip_markers(c.source) for c in source_nb.cells
            if c.cell_type == "code" and is_solution(c)}


def program(source_nb, submitted_nb) -> tuple[list[tuple[str, str]], list[str]]:
    """The student's program: [(name, code)] in the source's order, the given cells taken from
    the SOURCE (a student cannot change what is imported) and the solution cells from the
    submission, matched by grade_id; and the solution grade_ids missing from the submission.
    Test cells, demos and anything else a student typed are left out."""
    submitted = {grade_id(c): c for c in submitted_nb.cells if is_solution(c) and grade_id(c)}
    parts, missing = [], []
    for index, cell in enumerate(source_nb.cells):
        if is_given(cell):
            parts.append((grade_id(cell) or f"cell-{index}", cell.source))
        elif cell.cell_type == "code" and is_solution(cell):
            gid = grade_id(cell)
            if gid in submitted:
                parts.append((gid, submitted[gid].source))
            else:
                missing.append(gid)
    return parts, missing


def as_module(parts: list[tuple[str, str]]) -> str:
    """The program as one Python module, IPython magics and shell escapes commented out."""
    return without_magics("\n\n\n".join(f"# --- {name} ---\n{code}" for name, code in parts)) + "\n"


def without_magics(code: str) -> str:
    """IPython magics and shell escapes commented out: plain Python runs the rest."""
    return "\n".join(_MAGIC.sub(r"\1# \2", line) for line in code.splitlines())


def bound_names(node) -> list[str]:
    """The names one statement binds at its own level (imports, assignments)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    targets = node.targets if isinstance(node, ast.Assign) else \
        [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def defined_names(code: str) -> list[str]:
    """The names a cell's code defines at top level (functions, classes, assignments,
    imports), in order; [] when it does not parse."""
    try:
        tree = ast.parse(without_magics(code))
    except SyntaxError:
        return []
    names = []
    for node in tree.body:
        found = [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.ClassDef)) else bound_names(node)
        names += [n for n in found if n not in names]
    return names


def free_names(code: str) -> set[str]:
    """The names a cell reads without binding them, built-ins excepted: for a test cell, the
    student's functions it calls."""
    tree = ast.parse(without_magics(code))
    loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    bound = {name for node in ast.walk(tree) for name in bound_names(node)}
    return loads - bound - set(dir(builtins))
