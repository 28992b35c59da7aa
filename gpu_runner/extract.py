"""Turn a submitted notebook into an importable module of the student's solution.

Which cells: the SOURCE notebook decides (tpjudge.cells.program): its given cells (setup,
helpers) from the source, so a student cannot change what is imported, then, in source order,
the submitted notebook's cells carrying the grade_ids of the source's solution cells. Test
cells, demos and anything else a student typed are left out. IPython magics and shell escapes
are commented out.
"""
from __future__ import annotations

from pathlib import Path

from tpjudge.cells import gpu_cells, given_sources, read, solution_ids  # noqa: F401
from tpjudge.cells import as_module, program


def setup_cells(source_nb) -> list[str]:
    """The code the course gives (run alone by the preflight)."""
    return given_sources(source_nb)


def module_source(source_nb, submitted_nb) -> tuple[str, list[str]]:
    """(python source, grade_ids missing from the submission)."""
    parts, missing = program(source_nb, submitted_nb)
    return as_module(parts), missing


def write_module(source_nb, submitted_nb, dest: Path) -> list[str]:
    """Write the solution module to `dest`; returns the solution grade_ids not found."""
    text, missing = module_source(source_nb, submitted_nb)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return missing
