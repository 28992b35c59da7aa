"""Regenerate the committed `release/` folder from `source/` with nbgrader itself.

    python -m tpcourse.release          (or `make release`)

It also rewrites the source notebooks' review copies (tpcourse.review_copy).

Every assignment in source/ goes through the real `nbgrader generate_assignment` in a
temporary course; the release folders it writes replace the repository's release/<assignment>/.
nbgrader's output depends only on the source notebooks (cell ids and checksums come from the
source), so a re-run on unchanged sources writes byte-identical files, and
tests/test_release.py can regenerate into a temporary folder and compare.
"""
from __future__ import annotations

import ast
import shutil
import sys
import tempfile
from pathlib import Path

from tpjudge.cells import (bound_names, free_names, is_given, is_solution, is_test, strip_markers,
                          without_magics)

from . import REPO, review_copy
from .cycle import Course


def source_assignments(repo: Path | None = None) -> list[str]:
    """Assignments with at least one notebook in source/."""
    source = Path(repo or REPO) / "source"
    return sorted(p.name for p in source.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))


def generate_release(dest: Path, repo: Path | None = None) -> list[str]:
    """Run `nbgrader generate_assignment` on every assignment of `repo`/source in a throwaway
    course and copy each generated release/<assignment>/ into `dest`/<assignment>/."""
    repo = Path(repo or REPO)
    names = source_assignments(repo)
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="tp-release-") as tmp:
        course = Course.create(Path(tmp) / "course")
        shutil.rmtree(course.root / "source", ignore_errors=True)  # take `repo`'s sources
        for name in names:
            shutil.copytree(repo / "source" / name, course.root / "source" / name)
        # One nbgrader process for all assignments (its start-up dominates the run time).
        course.nbgrader("generate_assignment", "*", "--force")
        for name in names:
            generated = course.root / "release" / name
            if not any(generated.glob("*.ipynb")):
                raise RuntimeError(f"nbgrader wrote no release notebook for {name}")
            shutil.rmtree(dest / name, ignore_errors=True)
            shutil.copytree(generated, dest / name, ignore=_volatile)
    return names


def release_files(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} for every file under a release folder (for comparisons)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and not _is_volatile(p)}


def stale_assignments(repo: Path | None = None) -> list[str]:
    """Folders in release/ with no matching assignment in source/."""
    repo = Path(repo or REPO)
    release = repo / "release"
    if not release.is_dir():
        return []
    wanted = set(source_assignments(repo))
    return sorted(p.name for p in release.iterdir() if p.is_dir() and p.name not in wanted)


def unstated(source_nb, release_nb) -> list[str]:
    """What a student who follows the release cannot know: a name the source's test cells call
    (hidden tests included) that no released cell defines, and a function or method the
    release defines with another signature than the source's. [] when the release states all."""
    released = _definitions(release_nb, lambda cell: cell.source)
    source = _definitions(source_nb, lambda cell: strip_markers(cell.source))
    problems = [f"{name}: called by a test cell, defined by no cell of the release"
                for name in sorted(_called_by_tests(source_nb)) if name not in released]
    problems += [f"{name}: the release says ({released[name]}), the source ({signature})"
                 for name, signature in sorted(source.items())
                 if name in released and released[name] != signature]
    return problems


def _definitions(nb, code_of) -> dict[str, str | None]:
    """{name: signature} of what the notebook's given and solution cells define at top level
    (classes' methods as Class.method; names bound otherwise: None)."""
    found = {}
    for cell in nb.cells:
        if not (cell.cell_type == "code" and (is_given(cell) or is_solution(cell))):
            continue
        try:
            tree = ast.parse(without_magics(code_of(cell)))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[node.name] = ast.unparse(node.args)
            elif isinstance(node, ast.ClassDef):
                found[node.name] = None
                found.update({f"{node.name}.{item.name}": ast.unparse(item.args)
                              for item in node.body if isinstance(item, ast.FunctionDef)})
            else:
                found.update({name: None for name in bound_names(node)})
    return found


def _called_by_tests(nb) -> set[str]:
    """Names the test cells read without binding them (the student's functions)."""
    return set().union(*(free_names(cell.source) for cell in nb.cells if is_test(cell)))


def _is_volatile(path: Path) -> bool:
    return any(part in {".ipynb_checkpoints", "__pycache__"} for part in path.parts)


def _volatile(_folder, names):
    return [n for n in names if n in {".ipynb_checkpoints", "__pycache__"}]


def main(argv=None) -> int:
    repo = REPO
    names = generate_release(repo / "release", repo)
    for name in stale_assignments(repo):
        shutil.rmtree(repo / "release" / name)
        print(f"removed release/{name} (no longer in source/)")
    for name in names:
        files = ", ".join(sorted(release_files(repo / "release" / name)))
        print(f"release/{name}: {files}")
    for copy in review_copy.write():
        print(f"rewrote {copy.relative_to(repo)} (the source notebook's review copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
