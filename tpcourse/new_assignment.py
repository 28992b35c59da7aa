"""Scaffold a new assignment from the template: `make new-assignment NAME=...`.

    python -m tpcourse.new_assignment NAME

Copies the template (tpcourse/templates/assignment/, a course tree holding one small, complete
assignment) into the course: assignments/NAME/ (its metadata, checks, gpu_runner units,
example students, grade table and tests) and source/NAME/NAME.ipynb (the instructor's
notebook: solutions and hidden tests included), with the template's placeholder name replaced
by NAME and its ORDER set to the course's last one plus one. Nothing else is written: the
registry (assignments/__init__.py) finds the folder. The template is outside source/ and
assignments/, so it is no assignment of the course itself. docs/adding-an-assignment.md says
what to do next.

A NAME that cannot be an assignment, or that the course already uses, is refused with one
line (exit 2) and nothing is written.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import assignments as registry

from . import REPO

TEMPLATE = Path(__file__).resolve().parent / "templates" / "assignment"
PLACEHOLDER = "__assignment__"      # the template assignment's name, in paths and in text
ORDER_PLACEHOLDER = "__order__"
# What the scaffold writes, relative to the course root ({name} filled in).
WRITES = ("assignments/{name}", "source/{name}")


class Refused(Exception):
    """The name cannot be used; the message says why, in one line."""


def refusal(name: str, root: Path = REPO) -> str:
    """Why `name` cannot be a new assignment of the course at `root` ("" when it can)."""
    if not registry.valid_name(name):
        return (f"{name!r} is not a valid assignment name: use lowercase letters, digits and "
                f"underscores, starting with a letter (it becomes the package "
                f"assignments.<name>), and no Python keyword")
    taken = [rel.format(name=name) for rel in (*WRITES, "release/{name}")
             if (root / rel.format(name=name)).exists()]
    if taken:
        return (f"the course already has an assignment {name!r}: {', '.join(taken)} "
                f"{'exists' if len(taken) == 1 else 'exist'}")
    return ""


def next_order(root: Path = REPO) -> int:
    """One more than the largest ORDER of the course's assignments."""
    folders = [d for d in sorted((root / "assignments").iterdir())
               if d.is_dir() and registry.valid_name(d.name) and (d / "__init__.py").is_file()]
    return max((registry.read_folder(d).order for d in folders), default=0) + 1


def scaffold(name: str, root: Path = REPO) -> list[Path]:
    """Write the new assignment's folder and notebook into the course at `root`; returns the
    files written. Raises Refused (nothing written) for a name that cannot be used."""
    root = Path(root)
    why = refusal(name, root)
    if why:
        raise Refused(why)
    order = str(next_order(root))
    written = []
    for src in sorted(TEMPLATE.rglob("*")):
        if not src.is_file() or "__pycache__" in src.parts:
            continue
        dest = root / str(src.relative_to(TEMPLATE)).replace(PLACEHOLDER, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text().replace(PLACEHOLDER, name).replace(ORDER_PLACEHOLDER, order)
        dest.write_text(text)
        shutil.copymode(src, dest)
        written.append(dest)
    return written


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m tpcourse.new_assignment NAME   (or: make new-assignment "
              "NAME=...)", file=sys.stderr)
        return 2
    try:
        written = scaffold(args[0])
    except Refused as exc:
        print(f"new-assignment: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path.relative_to(REPO))
    print(f"new-assignment: {args[0]} scaffolded; next steps: docs/adding-an-assignment.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
