"""Turn a submitted notebook into an importable module of the student's solution.

Which cells: the SOURCE notebook decides. Its setup cell(s) (locked code cells whose grade_id
starts with "setup" or "import"; failing that, its first code cell) are taken from the source,
so a student cannot change what is imported; then, in source order, the submitted notebook's
cells carrying the grade_ids of the source's solution cells. Test cells, demos and anything
else a student typed are left out. IPython magics and shell escapes are commented out.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

_MAGIC = re.compile(r"^(\s*)([%!].*)$")


def _meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def read(path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def setup_cells(source_nb) -> list[str]:
    code = [c for c in source_nb.cells if c.cell_type == "code"]
    named = [c for c in code if _meta(c).get("locked") and not _meta(c).get("grade")
             and not _meta(c).get("solution")
             and str(_meta(c).get("grade_id", "")).startswith(("setup", "import"))]
    return [c.source for c in (named or code[:1])]


def solution_ids(source_nb) -> list[str]:
    return [_meta(c)["grade_id"] for c in source_nb.cells
            if c.cell_type == "code" and _meta(c).get("solution") and _meta(c).get("grade_id")]


def gpu_cells(source_nb) -> dict[str, float]:
    """{grade_id: points} of the cells the gpu_runner scores (grade_id "gpu_*")."""
    return {_meta(c)["grade_id"]: float(_meta(c).get("points", 0)) for c in source_nb.cells
            if str(_meta(c).get("grade_id", "")).startswith("gpu_")
            and (_meta(c).get("task") or _meta(c).get("grade"))}


def module_source(source_nb, submitted_nb) -> tuple[str, list[str]]:
    """(python source, grade_ids missing from the submission)."""
    by_id = {_meta(c).get("grade_id"): c for c in submitted_nb.cells if _meta(c).get("grade_id")}
    parts = ["# setup (from the source notebook)\n" + "\n\n".join(setup_cells(source_nb))]
    missing = []
    for gid in solution_ids(source_nb):
        cell = by_id.get(gid)
        if cell is None:
            missing.append(gid)
            continue
        parts.append(f"# --- {gid} (submitted) ---\n{cell.source}")
    text = "\n\n\n".join(parts)
    return "\n".join(_MAGIC.sub(r"\1# \2", line) for line in text.splitlines()) + "\n", missing


def write_module(source_nb, submitted_nb, dest: Path) -> list[str]:
    """Write the solution module to `dest`; returns the solution grade_ids not found."""
    text, missing = module_source(source_nb, submitted_nb)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return missing
