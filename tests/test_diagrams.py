"""The notebooks' text diagrams fit 80 columns: they render whole in JupyterLab at 1366 px (with
the file browser open) and in the feedback and formgrader pages, which do not wrap them."""
from __future__ import annotations

import pytest
from wcwidth import wcswidth

from tpcourse import REPO
from tpcourse.release import source_assignments
from tpjudge.cells import read

COLUMNS = 80
NOTEBOOKS = [f"{folder}/{a}/{a}.ipynb" for a in source_assignments()
             for folder in ("source", "release")]


def diagram_lines(markdown: str):
    """(line number, line) of a markdown cell's code blocks: fenced (```) or indented (four
    spaces after a blank line), where diagrams and formulas are drawn."""
    fenced, indented, previous_blank = False, False, True
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indented = not fenced and line.startswith("    ") and (indented or previous_blank)
        if fenced or indented:
            yield number, line
        previous_blank = not line.strip()


def too_wide(nb) -> list[str]:
    return [f"cell {i}, line {n}: {wcswidth(line)} columns: {line.strip()[:50]}"
            for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
            for n, line in diagram_lines(cell.source) if wcswidth(line) > COLUMNS]


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_every_text_diagram_fits_80_columns(path):
    assert too_wide(read(REPO / path)) == [], path


def test_the_check_catches_a_wide_diagram_and_ignores_prose():
    from nbformat.v4 import new_markdown_cell, new_notebook
    wide = "─" * 81
    nb = new_notebook(cells=[new_markdown_cell(f"{'word ' * 30}\n\n```\n{wide}\n```\n\n    {wide}")])
    assert [p.split(":")[0] for p in too_wide(nb)] == ["cell 0, line 4", "cell 0, line 7"]
