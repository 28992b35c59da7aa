"""The course's assignments: one folder each, found here. No other code names an assignment.

    import assignments
    assignments.names()              # every assignment's name, in course order
    a = assignments.get(name)
    a.kind, a.title, a.has_gpu       # "torch", "...", True
    a.load("checks")                 # the module the notebook's test cells call
    a.load("gpu.plan")               # its gpu_runner units (torch assignments)

A folder `assignments/<name>/` (nbgrader's notebook stays at `source/<name>/<name>.ipynb`)
holds everything specific to that assignment:

    __init__.py    its metadata, declarative: ORDER, TITLE, KIND ("numpy" | "torch"), and
                   optionally SETTINGS (a dict); it imports nothing
    checks.py      what the notebook's test cells call (`from assignments.<name> import checks
                   as check`), or a `checks/` package of one module per exercise
    dense.py       (optional) the dense float64 reference of its layers, when its checks and
                   its gpu_runner units share it
    examples.py    its example students (instructor tooling, hidden from students' code):
                   REFERENCE, UNMODIFIED and STUDENTS (tpcourse.submissions.Submission, each
                   with the grade cells it must lose), FORGERS, HOSTILE and DEMO when it has
                   them; or an `examples/` package
    gpu/           (torch assignments) the gpu_runner's units: plan.py (layers, steps,
                   sub-checks and their gpu_* cells), data.py (test data from a seed),
                   observe.py (the rank side), judge.py (the grader side)
    grades.json    the grade table of its catalogue (tpcourse.catalogue)

This module is the bottom layer's: standard library only, it imports no course package, so
every layer may use it. A part's module (checks, gpu, examples) is imported only when asked for.
"""
from __future__ import annotations

import functools
import importlib
import keyword
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KINDS = ("numpy", "torch")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Assignment:
    name: str
    title: str
    kind: str                      # "numpy" | "torch"
    order: int                     # its place in the course
    settings: dict = field(default_factory=dict, compare=False)

    @property
    def package(self) -> str:
        """Its Python package: "assignments.<name>"."""
        return f"{__name__}.{self.name}"

    @property
    def folder(self) -> Path:
        return HERE / self.name

    @property
    def notebook(self) -> Path:
        """The source notebook (nbgrader's place for it)."""
        return REPO / "source" / self.name / f"{self.name}.ipynb"

    @property
    def has_gpu(self) -> bool:
        """Graded in part by the gpu_runner (a gpu/ folder of units)."""
        return (self.folder / "gpu").is_dir()

    @property
    def checks(self) -> str:
        return f"{self.package}.checks"

    @property
    def gpu(self) -> str | None:
        return f"{self.package}.gpu" if self.has_gpu else None

    @property
    def examples(self) -> str:
        return f"{self.package}.examples"

    @property
    def grades(self) -> Path:
        """Its catalogue's recorded grade table."""
        return self.folder / "grades.json"

    def load(self, part: str) -> ModuleType:
        """The module of one of its parts: "checks", "examples", "gpu.plan", ..."""
        return importlib.import_module(f"{self.package}.{part}")


def valid_name(name: str) -> bool:
    """Whether `name` can be an assignment's folder: a lowercase identifier, not a keyword (it
    is a package name: `from assignments.<name> import checks`)."""
    return bool(_NAME.fullmatch(name)) and not keyword.iskeyword(name)


def read_folder(folder: Path) -> Assignment:
    """An assignment's metadata, read from its __init__.py without importing it (declarative:
    simple assignments of literals only)."""
    import ast
    values = {}
    tree = ast.parse((folder / "__init__.py").read_text(), str(folder / "__init__.py"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
            values[node.targets[0].id] = ast.literal_eval(node.value)
    missing = {"ORDER", "TITLE", "KIND"} - set(values)
    if missing:
        raise ValueError(f"{folder / '__init__.py'} does not set {', '.join(sorted(missing))}")
    if values["KIND"] not in KINDS:
        raise ValueError(f"{folder / '__init__.py'}: KIND is {values['KIND']!r}, not one of "
                         f"{', '.join(KINDS)}")
    return Assignment(folder.name, values["TITLE"], values["KIND"], values["ORDER"],
                      dict(values.get("SETTINGS", {})))


@functools.lru_cache(maxsize=None)
def _all() -> tuple[Assignment, ...]:
    found = [read_folder(d) for d in sorted(HERE.iterdir())
             if d.is_dir() and valid_name(d.name) and (d / "__init__.py").is_file()]
    orders = [a.order for a in found]
    clash = sorted({o for o in orders if orders.count(o) > 1})
    if clash:
        raise ValueError(f"assignments share an ORDER: {clash}")
    return tuple(sorted(found, key=lambda a: a.order))


def discover() -> list[Assignment]:
    """Every assignment, in course order."""
    return list(_all())


def names() -> list[str]:
    return [a.name for a in _all()]


def get(name: str) -> Assignment:
    for a in _all():
        if a.name == name:
            return a
    raise KeyError(f"no assignment {name!r} (assignments/: {', '.join(names())})")


def owner(module: str) -> Assignment | None:
    """The assignment a module name ("assignments.<name>.checks") belongs to, if any."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != __name__:
        return None
    return next((a for a in _all() if a.name == parts[1]), None)
