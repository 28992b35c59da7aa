"""A grading worker: autogrades one submission at a time with nbgrader's own Autograde
converter (the same pipeline, preprocessors and config as `nbgrader autograde`), into a
staging folder and a private sqlite gradebook, and reports back to the single writer.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

from tpconfig import load_config
from tpsandbox.lifetime import die_with_parent
from tpsandbox.settings import UID_ENV


def serve(index: int, root: str, parent_pid: int, tasks, results, uid_base: int | None,
          log_dir: str, hide=()) -> None:
    """Worker process main loop: take (assignment, student, stage_dir) tasks until None.
    `hide`: folders the student's code must not see besides the course's (a shard's)."""
    die_with_parent(parent_pid)  # a SIGKILLed grader cannot clean up
    if uid_base is not None:
        os.environ[UID_ENV] = str(uid_base + index)  # per-worker uid: independent process limits
    os.chdir(root)
    log_path = Path(log_dir) / f"worker-{index}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)  # kernels and nbgrader write here, not over the progress bar
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    config = load_config(root)
    if hide:
        config.Sandbox.hide_paths = [*config.Sandbox.get("hide_paths", []), *hide]
    from . import speedups
    speedups.install()
    while True:
        task = tasks.get()
        if task is None:
            return
        assignment, student, stage = task
        results.put(("start", index, student, None))
        db = Path(stage).parent / f"worker-{index}.db"  # one file: its engine is reused
        results.put(("done", index, student,
                     grade_one(config, root, assignment, student, stage, db)))


def grade_one(config, root: str, assignment: str, student: str, stage: str, db: Path) -> dict:
    """Autograde `student` into `stage` (its notebooks) and a private gradebook `db` (a fresh
    copy of the seed); {'ok': bool, 'error': str, 'result': what autograde recorded}."""
    from nbgrader.converters import Autograde
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config
    from . import gradebook as gbk
    from . import speedups

    stage_dir = Path(stage)
    db = Path(db)
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    db_url = f"sqlite:///{db}"
    speedups.forget(db_url)
    shutil.copyfile(stage_dir.parent / "seed.db", f"{db}.new")
    os.replace(f"{db}.new", db)  # a new file: no connection of the last student's survives
    cfg = Config(config)
    cfg.CourseDirectory.db_url = db_url
    # Every cell has run when the kernel is shut down: killing it at once changes no output
    # and saves the seconds a graceful exit of a sandboxed kernel can take.
    cfg.Execute.shutdown_kernel = "immediate"
    cfg.CourseDirectory.autograded_directory = str(stage_dir / "autograded")
    cfg.CourseDirectory.assignment_id = assignment
    cfg.CourseDirectory.student_id = student
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    converter = None
    try:
        coursedir = CourseDirectory(config=cfg)
        converter = Autograde(coursedir=coursedir, config=cfg)
        converter.force = True
        converter.log.addHandler(handler)
        converter.start()
        ok = (stage_dir / "autograded" / student / assignment).is_dir()
        error = "" if ok else "nbgrader produced no autograded notebook"
    except BaseException as err:  # nbgrader reports per-student failures by raising
        if isinstance(err, KeyboardInterrupt):
            raise
        ok, error = False, f"{type(err).__name__}: {err}"
        buf.write(traceback.format_exc())
    finally:
        if converter is not None:
            converter.log.removeHandler(handler)
        os.chdir(root)
    log = buf.getvalue()
    if not ok:
        error = error + "\n" + "\n".join(line for line in log.splitlines()
                                         if "ERROR" in line or "Error" in line)[-2000:]
    sys.stdout.write(log)
    result = None
    if ok:
        try:
            result = gbk.read_result(db_url, coursedir.course_id, assignment, student)
        except Exception as err:
            ok, error = False, f"reading the worker's gradebook: {type(err).__name__}: {err}"
    return {"ok": ok, "error": error.strip(), "result": result}
