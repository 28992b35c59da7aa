"""Before any student: the source notebook's own solution, graded like a student.

The reference (the source's solution cells, `tpjudge.cells.program(source, source)`) runs with
the chosen backend and world sizes, in the sandbox, through the same launches and judge as the
students. Anything short of full marks means the grader cannot grade here (a broken
environment, a sandbox that hides what the job needs, a backend that does not work, checks out
of step with the notebook): nobody is graded, the command exits 2 with the failing check and
the launch's log. A passing result is remembered in <reports>/.reference/passed.json under a
key of everything it depends on (the source notebook, the course config, the runner's code,
Python and torch, the backend, sizes, limits and the jobs' environment), so that graders run
one student at a time (grade_class) pay for it once.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import assignments

from . import extract, report
from .launch import EnvironmentFailure, confined_env, grade_module, job_environment
from .machine import Refused
from .plan import make_plan

NAME = "(reference)"
_CODE = ("gpu_runner", "tpgrade", "tpsandbox", "tpjudge")


def check(src_path: Path, root: Path, reports: Path, cfg, assignment: str, log=print) -> dict:
    """The reference's report (full marks); raises Refused otherwise."""
    folder = reports / ".reference"
    passed = folder / "passed.json"
    key = cache_key(src_path, root, cfg, assignment)
    try:
        if json.loads(passed.read_text()).get("key") == key:
            log(f"gpu_runner: reference solution: full marks (checked before, {passed})")
            return json.loads((folder / "report.json").read_text())
    except (OSError, ValueError, AttributeError):
        pass
    source_nb = extract.read(src_path)
    folder.mkdir(parents=True, exist_ok=True)
    # a folder of this run's own: shards of one class (Slurm, Kubernetes) may share `reports`
    run = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    extract.write_module(source_nb, source_nb, run / "solution.py")
    plan = make_plan(assignment, cfg.sizes, timing=False, cells=extract.gpu_cells(source_nb))
    try:
        rep = grade_module(NAME, run / "solution.py", run, plan, cfg, assignment,
                           src_path.stem, extract.gpu_cells(source_nb))
    except EnvironmentFailure as exc:
        raise Refused(f"the reference solution of {src_path} could not be graded: {exc}; "
                      f"nothing graded") from exc
    report.write(rep, run)
    if rep["score"] < rep["max_score"]:
        raise Refused(failure(rep, src_path, cfg))
    _replace(folder / "report.json", json.dumps(rep, indent=1))
    _replace(passed, json.dumps({"key": key, "score": rep["score"], "run": str(run)}))
    log(f"gpu_runner: reference solution: full marks ({rep['seconds']:.1f}s)")
    return rep


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` at once (concurrent graders read it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def failure(rep: dict, src_path, cfg) -> str:
    """What stops the run: the first failing check, its detail, and where the log is."""
    bad = [(name, c["detail"]) for name, c in rep["checks"].items() if not c["ok"]]
    name, detail = bad[0]
    logs = ", ".join(launch["log"] for launch in rep["launches"])
    return (f"the reference solution of {src_path} scores {rep['score']:g}/{rep['max_score']:g} "
            f"({cfg.backend}, world sizes {','.join(map(str, cfg.sizes))}): {len(bad)} check(s) "
            f"fail, first {name}: {detail}; log: {logs}. The grader cannot grade here; nothing "
            f"graded")


def cache_key(src_path: Path, root: Path, cfg, assignment: str) -> str:
    """A digest of everything the reference's result depends on."""
    h = hashlib.sha256()

    def add(*parts):
        for part in parts:
            h.update(part if isinstance(part, bytes) else str(part).encode())
            h.update(b"\0")
    add(Path(src_path).read_bytes())
    config = Path(root) / "nbgrader_config.py"
    add(config.read_bytes() if config.exists() else b"")
    for package in _CODE:
        base = Path(__file__).resolve().parents[1] / package
        for path in sorted(base.glob("*.py")):
            add(path.name, path.read_bytes())
    folder = assignments.get(assignment).folder       # its units, checks and dense references
    for path in sorted([*folder.glob("*.py"), *folder.glob("gpu/*.py")]):
        if path.stem != "examples":
            add(path.relative_to(folder).as_posix(), path.read_bytes())
    add(sys.version, sys.executable, _version("torch"), _version("nbgrader"))
    add(cfg.backend, cfg.sizes, cfg.pg_timeout, cfg.unit_timeout, cfg.launch_timeout,
        cfg.wall_factor, cfg.max_launches, cfg.wrap is not None, sorted(cfg.env.items()))
    add(sorted(confined_env(job_environment(cfg.backend)[0]).items()))
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""
