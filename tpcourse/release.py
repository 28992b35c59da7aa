"""Regenerate the committed `release/` folder from `source/` with nbgrader itself.

    python -m tpcourse.release          (or `make release`)

Every assignment in source/ goes through the real `nbgrader generate_assignment` in a
temporary course; the release folders it writes replace the repository's release/<assignment>/.
nbgrader's output depends only on the source notebooks (cell ids and checksums come from the
source), so a re-run on unchanged sources writes byte-identical files, and
tests/test_release.py can regenerate into a temporary folder and compare.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from . import REPO
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
