"""One-way layers and one folder per assignment, enforced.

- The import-linter contracts in pyproject.toml (`lint-imports`) hold: the course's packages
  bottom to top (student runtime and sandbox, judge, checks, grader, instructor tooling),
  each assignment's parts in their layers, shared machinery naming no assignment; and they can
  fail (a tree of stand-in packages that breaks each kind of contract).
- Every module of the course's packages imports alone, in an interpreter where no other course
  module was imported (a cycle or a hidden dependency on import order fails here).
- No code file outside an assignment's own folders (assignments/<name>/, source/<name>/,
  release/<name>/) names an assignment: everything else finds them through the registry.
"""
from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import assignments

REPO = assignments.REPO
PACKAGES = ["assignments", "tpsim", "tpsandbox", "tpconfig", "tpjudge", "tpgrade", "tpgrader",
            "gpu_runner", "tpcourse"]


def _lint(cwd=REPO, pythonpath=None):
    env = None
    if pythonpath:
        import os
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"),
                           "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_contracts_hold():
    proc = _lint()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", proc.stdout)


def test_the_layers_contracts_can_fail(tmp_path):
    """Stand-ins for every package, with one import of each forbidden kind: a lower package
    importing a higher one, an assignment's checks importing its examples, shared machinery
    importing an assignment's units, the registry importing a course package."""
    files = {f"{p}/__init__.py": "" for p in PACKAGES}
    files.update({
        "assignments/hw1/__init__.py": "", "assignments/hw1/examples.py": "",
        "assignments/hw1/checks.py": "import assignments.hw1.examples\n",
        "assignments/hw1/gpu/__init__.py": "", "assignments/hw1/gpu/plan.py": "",
        "assignments/hw1/dense.py": "",
        "tpsim/__init__.py": "import tpjudge\n",
        "gpu_runner/__init__.py": "import assignments.hw1.gpu.plan\n",
        "assignments/__init__.py": "import tpgrade\n",
    })
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    proc = _lint(cwd=tmp_path, pythonpath=tmp_path)
    assert proc.returncode != 0
    broken = re.search(r"Contracts: (\d+) kept, (\d+) broken", proc.stdout)
    assert broken and int(broken.group(2)) >= 4, proc.stdout[-3000:]
    for importer in ("tpsim -> tpjudge", "assignments.hw1.checks -> assignments.hw1.examples",
                     "gpu_runner -> assignments.hw1.gpu.plan", "assignments -> tpgrade"):
        assert importer in proc.stdout, importer


def course_modules() -> list[str]:
    """Every module of the course's packages (not the assignments' tests or benchmarks, which
    are no modules: no __init__.py)."""
    found = []
    for package in PACKAGES:
        found.append(package)
        path = [str(REPO / package)]
        found += [m.name for m in pkgutil.walk_packages(path, prefix=f"{package}.")]
    return sorted(found)


# Each import runs in a child forked from a parent that has imported the third-party packages
# the course uses (torch, nbgrader, ...) and no course module: as a fresh interpreter would see
# the course, in a fraction of the time.
_FORK_IMPORTS = r'''
import importlib, json, os, sys, traceback
for heavy in ("numpy", "torch", "torch.distributed", "nbformat", "nbconvert", "traitlets",
              "nbgrader.api", "nbgrader.preprocessors", "matplotlib", "psutil", "jupyter_client"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
course = set(json.loads(sys.argv[1]))
assert not [m for m in sys.modules if m.split(".")[0] in course], "a course module came along"
failed = {}
for name in json.loads(sys.argv[2]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc()[-1500:].encode())
            code = 1
        os._exit(code)
    os.close(write)
    message = b""
    while chunk := os.read(read, 65536):
        message += chunk
    os.close(read)
    if os.waitpid(pid, 0)[1] != 0:
        failed[name] = message.decode(errors="replace") or "the import killed its process"
print(json.dumps(failed))
'''


@pytest.mark.slow                  # an interpreter per module
def test_every_module_imports_alone():
    modules = course_modules()
    assert len(modules) >= 100
    proc = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, json.dumps(PACKAGES),
                           json.dumps(modules)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"{m}:\n{why}" for m, why in failed.items())


@pytest.mark.slow                  # an interpreter per module
def test_an_import_that_fails_alone_is_caught(tmp_path):
    """The check above can fail: a module that imports a half-initialised one (a cycle)."""
    (tmp_path / "cyc").mkdir()
    (tmp_path / "cyc" / "__init__.py").write_text("")
    (tmp_path / "cyc" / "a.py").write_text("from . import b\nX = 1\n")
    (tmp_path / "cyc" / "b.py").write_text("from . import a\nY = a.X\n")
    proc = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, json.dumps(["cyc"]),
                           json.dumps(["cyc.a", "cyc.b"])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(failed) == {"cyc.a"} and "partially initialized" in failed["cyc.a"]


# -- one folder per assignment ---------------------------------------------------------------------
_CODE = re.compile(r"\.(py|sh|sbatch|ya?ml|toml|cfg|ini|j2|css|txt)$|(^|/)(Makefile|conftest)")


def _code_files():
    """The repository's code files (docs, READMEs, notebooks and recorded data are not)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    own = tuple(f"{tree}/{name}/" for tree in ("assignments", "source", "release")
                for name in assignments.names())
    return [f for f in listed if _CODE.search(f) and not f.startswith(own)
            and (REPO / f).is_file()]


def named_assignments(files) -> dict[str, list[str]]:
    names = re.compile(r"\b(%s)\b" % "|".join(map(re.escape, assignments.names())))
    found = {}
    for rel in files:
        hits = sorted(set(names.findall((REPO / rel).read_text(errors="replace"))))
        if hits:
            found[rel] = hits
    return found


def test_no_code_file_outside_its_folders_names_an_assignment():
    files = _code_files()
    assert {"gpu_runner/plan.py", "tests/test_layers.py", "assignments/__init__.py"} <= set(files)
    assert named_assignments(files) == {}


def test_a_name_outside_the_folders_is_caught(tmp_path, monkeypatch):
    """The check above can fail."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    name = assignments.names()[0]
    (tmp_path / "x.py").write_text(f"A = {name!r}\n")
    (tmp_path / "y.py").write_text(f"A = '{name}_v2'\n")     # another word: not a name
    assert named_assignments(["x.py", "y.py"]) == {"x.py": [name]}
