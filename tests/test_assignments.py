"""The registry of assignments (assignments/__init__.py): every folder is found, in course order,
with its metadata and parts; it matches source/ and release/; a broken folder is refused with a
message; and what the sandbox shows student code of it (its checks and units, not its example
students, tests or benchmarks)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import assignments
from tpsandbox.command import public_paths
from tpsandbox.settings import Sandbox


def test_every_folder_is_an_assignment_in_course_order():
    found = assignments.discover()
    assert [a.order for a in found] == sorted(a.order for a in found)
    assert [a.name for a in found] == assignments.names()
    assert {a.kind for a in found} == {"numpy", "torch"}
    for a in found:
        assert assignments.get(a.name) is a and a.title and a.package == f"assignments.{a.name}"
        assert a.notebook.is_file(), a.name
        assert a.has_gpu == (a.kind == "torch") == (a.gpu is not None), a.name
        assert a.load("checks").__name__ == a.checks
        assert assignments.owner(f"{a.checks}.anything") is a
    assert assignments.owner("tpgrade.tensors") is None
    with pytest.raises(KeyError, match="no assignment 'nope'"):
        assignments.get("nope")


def test_the_registry_matches_source_and_release():
    for tree in ("source", "release"):
        folders = sorted(p.name for p in (assignments.REPO / tree).iterdir()
                         if p.is_dir() and any(p.glob("*.ipynb")))
        assert folders == sorted(assignments.names()), tree


def test_the_registry_imports_nothing_of_the_course():
    """Every layer may use it: it reads the metadata without importing the assignments."""
    code = ("import sys, assignments; assignments.discover(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('assignments', "
            "'tpsim', 'tpgrade', 'tpjudge', 'tpsandbox', 'tpgrader', 'gpu_runner', 'tpcourse')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['assignments']"


def _registry_copy(tmp_path, name, metadata):
    """A copy of the registry with one folder `name` holding `metadata` as its __init__.py."""
    root = tmp_path / "assignments"
    root.mkdir()
    shutil.copy(assignments.HERE / "__init__.py", root / "__init__.py")
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(metadata)
    return tmp_path


@pytest.mark.parametrize("metadata, says", [
    ('ORDER = 1\nTITLE = "x"\n', "does not set KIND"),
    ('ORDER = 1\nTITLE = "x"\nKIND = "jax"\n', "KIND is 'jax'"),
])
def test_a_broken_folder_is_refused_with_a_message(tmp_path, metadata, says):
    root = _registry_copy(tmp_path, "hw1", metadata)
    proc = subprocess.run([sys.executable, "-c", "import assignments; assignments.discover()"],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode != 0 and says in proc.stderr


def test_the_sandbox_shows_an_assignments_checks_and_units_not_its_examples(tmp_path):
    package = tmp_path / "assignments"
    for rel in ("__init__.py", "hw1/__init__.py", "hw1/checks.py", "hw1/examples.py",
                "hw1/grades.json", "hw1/__pycache__/checks.cpython-311.pyc",
                "hw1/__pycache__/examples.cpython-311.pyc", "hw1/gpu/plan.py",
                "hw1/tests/test_hw1.py", "hw2/__init__.py", "hw2/examples/__init__.py",
                "hw2/examples/students.py", "hw2/bench/bench.py", "hw2/notebook.pct.py"):
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text("")
    shown = {p[len(str(package)) + 1:] for p in
             public_paths("assignments", str(package), Sandbox().private_packages)}
    assert shown == {"__init__.py", "hw1/__init__.py", "hw1/checks.py", "hw1/grades.json",
                     "hw1/__pycache__/checks.cpython-311.pyc", "hw1/gpu", "hw2/__init__.py"}
    assert public_paths("tpgrade", "/x/tpgrade", Sandbox().private_packages) == ["/x/tpgrade"]
