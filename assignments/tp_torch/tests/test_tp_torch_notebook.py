"""The tp_torch notebook itself: its cells' grade ids and points, its setup cell's imports, and
a release (the committed one, nbgrader's output: tests/test_release.py) with stubs and no
solution line. Its grading through nbgrader: tests/test_torch_notebooks.py."""
from __future__ import annotations

import re

import nbformat

import assignments
from assignments.tp_torch import examples as cat
from tpjudge.cells import grade_id, graded_tests, is_solution, read, reference_answers

A = assignments.get("tp_torch")
SOLUTIONS = set(cat.SOLUTION_IDS)


def source_nb():
    return read(A.notebook)


def test_source_cells_have_the_fixed_grade_ids_and_points():
    nb = source_nb()
    meta = {grade_id(c): (c.cell_type, c.metadata["nbgrader"]) for c in nb.cells
            if "nbgrader" in c.metadata}
    for gid, points in cat.GPU_CELLS.items():
        kind, m = meta[gid]
        assert kind == "markdown" and m["task"] and m["locked"] and not m["grade"] \
            and m["points"] == points, gid
    assert {gid for gid, (_, m) in meta.items() if m.get("solution")} == SOLUTIONS
    kind, setup = meta["setup"]
    assert kind == "code" and setup["locked"] and not setup["grade"] and not setup["solution"]
    assert all(points == 1 for points in graded_tests(nb).values())
    assert len(graded_tests(nb)) >= 10


def test_setup_cell_imports():
    setup = next(c.source for c in source_nb().cells if grade_id(c) == "setup")
    for line in ("import torch", "import torch.distributed as dist", "import torch.nn as nn",
                 "import torch.nn.functional as F", "import math",
                 "from tpsim.ranks import run_on_ranks"):
        assert re.search(rf"^{re.escape(line)}$", setup, re.M), line
    # the checks capture what they rely on before any answer runs (tpgrade._torch_trusted)
    assert re.search(r"^import assignments\.tp_torch\.checks\b", setup, re.M)


def test_release_has_stubs_and_no_solutions():
    release = read(assignments.REPO / "release" / A.name / f"{A.name}.ipynb")
    text = nbformat.writes(release)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    stubs = {grade_id(c): c.source for c in release.cells if is_solution(c)}
    assert set(stubs) == SOLUTIONS
    assert all("raise NotImplementedError()" in src for src in stubs.values())
    # no line that exists only in the reference answers survives
    skeleton = "\n".join(stubs.values())
    for gid, answer in reference_answers(source_nb()).items():
        private = [ln.strip() for ln in answer.splitlines()
                   if ln.strip() and ln.strip() not in skeleton]
        assert private, gid
        leaked = [ln for ln in private if ln in text and len(ln) > 25]
        assert not leaked, f"{gid}: reference lines in the release: {leaked}"
