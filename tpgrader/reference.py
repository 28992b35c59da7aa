"""Before any student: the source's own solutions, judged as a submission is.

Each source notebook of the assignment (solution cells as the instructor wrote them, test
cells with their hidden parts) goes through the autograde pipeline's judge (JudgedExecute:
the sandbox, the course's limits, the same checks), here and now. A test cell short of full
marks means the grader cannot grade here (a broken environment, a sandbox that hides what the
checks need, limits too tight for this machine, checks out of step with the notebook): nobody
is graded, the command exits 2 naming the cells. The gpu_* cells have the gpu_runner's own
guard (gpu_runner.reference).

Where it runs:
- `nbgrader autograde`: nbgrader's own pre-convert hook (`c.Autograde.pre_convert_hook`, set by
  tpgrader.configure) runs before each student is touched; the check runs at the first one.
- `python -m tpcourse.grade_class`: ClassGrader.run, before its workers start.

A pass is remembered in <course>/.tpgrader/reference/<assignment>.json under a key of what it
depends on (the source notebooks, the grading code, Python and the course's limits and sandbox
settings), so that it costs one judged notebook per assignment and change (a few seconds), and
each grader process looks it up once.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from tpjudge.cells import grade_id, is_test, read

# The packages whose code decides a test cell's verdict.
_CODE = ("tpgrade", "tpjudge", "tpsandbox", "tpsim", "tpgrader")
# The settings that can change a verdict (Sandbox.hide_paths: a shard's folders, not verdicts).
_SETTINGS = ("Judge", "TimeLimits", "Sandbox", "JudgedExecute")
_checked: dict[str, str] = {}     # assignment -> key, in this process


class ReferenceFails(RuntimeError):
    """The source's own solutions lose points here: the grader cannot grade."""


def check(config, assignment: str, log=None) -> None:
    """Raise ReferenceFails unless the source's solutions of `assignment` score full marks on
    every test cell, judged with `config` (the course's nbgrader config)."""
    from nbgrader.coursedir import CourseDirectory
    coursedir = CourseDirectory(config=config)
    source = Path(coursedir.format_path(coursedir.source_directory, ".", assignment))
    notebooks = sorted(p for p in source.glob("*.ipynb") if any(is_test(c) for c in
                                                                 read(p).cells))
    if not notebooks:
        return
    key = cache_key(notebooks, config)
    if _checked.get(assignment) == key:
        return
    record = Path(coursedir.root) / ".tpgrader" / "reference" / f"{assignment}.json"
    try:
        if json.loads(record.read_text()).get("key") == key:
            _checked[assignment] = key
            return
    except (OSError, ValueError, AttributeError):
        pass
    failed = {}
    for path in notebooks:
        failed.update({f"{path.stem}:{gid}": why for gid, why in judged(config, path).items()})
    if failed:
        shown = "; ".join(f"{cell} ({why[:300]})" for cell, why in list(failed.items())[:5])
        raise ReferenceFails(
            f"the reference solution (source/{assignment}) fails {len(failed)} test cell(s) "
            f"here: {shown}. The grader cannot grade here: nothing graded")
    _replace(record, json.dumps({"key": key, "notebooks": [p.name for p in notebooks]}))
    _checked[assignment] = key
    if log is not None:
        log(f"tpgrader: reference solution of {assignment}: full marks on every test cell")


def judged(config, path: Path) -> dict[str, str]:
    """{grade_id: what its outputs say} of the test cells of source notebook `path` that lose
    points when its own solutions are judged."""
    from nbgrader.utils import determine_grade
    from tpjudge.local import with_answers
    from .preprocessors.judged_execute import JudgedExecute
    nb = with_answers(read(path))
    verdicts = JudgedExecute(config=config).verdicts_of(nb, str(path.parent))
    failed = {}
    for index, cell in enumerate(nb.cells):
        if not is_test(cell):
            continue
        cell.outputs = verdicts.get(index, [])
        score, points = determine_grade(cell)
        if score is None or score < points:
            failed[grade_id(cell)] = "; ".join(
                f"{o.ename}: {o.evalue}" if o.output_type == "error" else str(o.get("text", ""))
                for o in cell.outputs if o.output_type in ("error", "stream")
                and (o.output_type == "error" or o.name == "stderr")) or "no points"
    return failed


def cache_key(notebooks, config) -> str:
    """A digest of everything the reference's verdicts depend on."""
    h = hashlib.sha256()

    def add(*parts):
        for part in parts:
            h.update(part if isinstance(part, bytes) else str(part).encode())
            h.update(b"\0")
    for path in notebooks:
        add(path.name, path.read_bytes())
    base = Path(__file__).resolve().parents[1]
    for package in _CODE:
        for path in sorted((base / package).rglob("*.py")):
            add(path.relative_to(base), path.read_bytes())
    add(sys.version, sys.executable, config.get("Execute", {}).get("timeout"))
    for section in _SETTINGS:
        values = {k: v for k, v in dict(config.get(section, {})).items() if k != "hide_paths"}
        add(section, json.dumps(values, sort_keys=True, default=str))
    return h.hexdigest()


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` at once (graders running side by side read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def autograde_hook(assignment=None, student=None, notebooks=()):
    """nbgrader's pre-convert hook under `nbgrader autograde`: the reference check, before the
    first student is touched. A failure ends the command (exit 2) with the cells named: a
    SystemExit, which nbgrader does not catch per student. Outside the nbgrader command (the
    class grader's workers, which have checked already) it does nothing."""
    from traitlets.config import Application
    if not Application.initialized():
        return
    app = Application.instance()
    name = Path(notebooks[0]).parent.name if notebooks else assignment
    try:
        check(app.config, name, log=app.log.info)
    except ReferenceFails as exc:
        app.log.error("%s", exc)
        print(f"tpgrader: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as exc:  # noqa: BLE001 - nbgrader would swallow it and grade on
        app.log.error("the reference check could not run: %r", exc)
        print(f"tpgrader: the reference check of {name} could not run: "
              f"{type(exc).__name__}: {exc}. Nothing graded", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
