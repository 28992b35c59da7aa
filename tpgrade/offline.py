"""Run a course notebook's code cells in this process, without nbgrader or a kernel.

For the repository's fast tests (and an instructor's quick look): which graded test cells
fail for the reference solutions, the release stubs, or an example student's answers. The
real grading always goes through `nbgrader autograde` (see tpcourse.cycle).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy
import numpy.testing

from tpjudge.cells import meta, stub, strip_markers

from . import _harness


@dataclass
class Run:
    failed: dict = field(default_factory=dict)     # graded grade_id -> error text
    errors: dict = field(default_factory=dict)     # other cells' grade_id/index -> error text
    graded: list = field(default_factory=list)     # every graded grade_id, in order
    namespace: dict = field(default_factory=dict)


def run(nb, answers: dict | None = None, release: bool = False) -> Run:
    """Execute `nb` (an nbformat notebook) cell by cell in a fresh namespace.

    answers: {solution grade_id: code} replacing those cells; release: stub every solution
    cell. numpy's and tpsim's module attributes are restored afterwards, so a notebook that
    rebinds np.allclose or tpsim.all_reduce does not leak into the next run.
    """
    saved = [(mod, dict(vars(mod))) for mod in (numpy, numpy.testing)]
    _harness.restore_tpsim()
    result = Run(namespace={"__name__": "__main__"})
    try:
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            m = meta(cell)
            gid = m.get("grade_id") or f"cell-{index}"
            source = cell.source
            if m.get("solution"):
                if answers and gid in answers:
                    source = answers[gid]
                elif release:
                    source = stub(source)
                else:
                    source = strip_markers(source)
            if m.get("grade"):
                result.graded.append(gid)
            error = _execute(source, gid, result.namespace)
            if error:
                (result.failed if m.get("grade") else result.errors)[gid] = error
    finally:
        for mod, attrs in saved:
            for name in set(vars(mod)) - set(attrs):
                delattr(mod, name)
            for name, value in attrs.items():
                if vars(mod).get(name) is not value:
                    setattr(mod, name, value)
        _harness.restore_tpsim()
    return result


def _execute(source, name, namespace):
    """None if the cell ran cleanly, else the error (stderr output counts, as in nbgrader)."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            exec(compile(source, f"<{name}>", "exec"), namespace)  # noqa: S102 - course code
    except Exception as exc:  # noqa: BLE001 - a failing cell is the result
        return f"{type(exc).__name__}: {exc}"
    if err.getvalue():
        return f"wrote to stderr: {err.getvalue()[:500]}"
    return None
