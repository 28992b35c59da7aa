"""The source notebooks as text, for review: assignments/<name>/notebook.pct.py.

    python -m tpcourse.release          (or `make release`: writes them with the release)

A notebook's JSON buries a one-line change in metadata and escaped strings; a reviewer reads the
percent-format copy instead (jupytext's `# %%` cells, nbgrader's metadata on each cell's header
line, markdown as comments). The .ipynb in source/ stays the one truth (nbgrader reads it, and
its cell ids and checksums make the release byte-stable); the copy is generated from it and
tests/test_release.py fails when a copy is stale, so a diff of the copy is the diff of the
notebook.

Why here and by this name: the copy holds every solution and hidden test, so it must not sit in
source/<name>/ (nbgrader would release it to students) nor be readable in the sandbox:
`notebook` is one of tpsandbox's private names (Sandbox.private_packages,
"assignments.*.notebook"), and the dot in `notebook.pct` keeps it from being a module that a
test or tool would import and run.
"""
from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat

import assignments

NAME = "notebook.pct.py"
FORMAT = "py:percent"


def text_of(notebook: Path) -> str:
    """The percent-format text of a notebook."""
    return jupytext.writes(nbformat.read(notebook, as_version=4), fmt=FORMAT)


def copies() -> dict[Path, Path]:
    """{source notebook: its review copy} for every assignment."""
    return {a.notebook: a.folder / NAME for a in assignments.discover()}


def _stale() -> dict[Path, str]:
    """{review copy: the text it should hold} for the copies missing or not matching their
    notebook (each notebook converted once)."""
    wanted = {copy: text_of(notebook) for notebook, copy in copies().items()}
    return {copy: text for copy, text in wanted.items()
            if not copy.is_file() or copy.read_text() != text}


def stale() -> list[Path]:
    """The review copies missing or not matching their notebook."""
    return list(_stale())


def write() -> list[Path]:
    """Rewrite the stale copies; returns them."""
    changed = _stale()
    for copy, text in changed.items():
        copy.write_text(text)
    return list(changed)
