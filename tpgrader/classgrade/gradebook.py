"""The class grader's dealings with nbgrader's gradebook (sqlite or Postgres via `db_url`).

Workers never touch the course gradebook: each grades one submission against a private
sqlite copy of the assignment's definition (the seed). The main process is the only writer:
it copies the worker's automatic grades into the course gradebook and, in the same
transaction, records a digest of what was graded (table `tpcourse_graded`). A kill at any
moment therefore leaves either the old grade with the old digest or the new grade with the
new digest, never a half-written or doubled one.
"""
from __future__ import annotations

import datetime as dt
import os
import signal
from contextlib import contextmanager

from sqlalchemy import Column, DateTime, MetaData, String, Table, create_engine, select

# Rows a worker needs to autograde: the assignment's definition and the roster.
_DEFINITION_TABLES = ("assignment", "notebook", "base_cell", "grade_cells", "solution_cells",
                      "task_cells", "source_cell", "student")

_meta = MetaData()
GRADED = Table(
    "tpcourse_graded", _meta,
    Column("assignment", String(128), primary_key=True),
    Column("student", String(128), primary_key=True),
    Column("stage", String(16), primary_key=True),   # "autograde" or "gpu"
    Column("digest", String(64), nullable=False),
    Column("graded_at", DateTime(), nullable=False),
)


# Fault injection for tests/test_resume.py: with TPCOURSE_TEST_KILL_IN_COMMIT=n, the n-th
# write_result of a process SIGKILLs that process once everything is flushed to the database,
# just before the commit (the worst moment for the single writer to die).
KILL_IN_COMMIT_ENV = "TPCOURSE_TEST_KILL_IN_COMMIT"
_writes = 0


def _fault_before_commit() -> None:
    global _writes
    _writes += 1
    target = os.environ.get(KILL_IN_COMMIT_ENV, "")
    if target.isdigit() and _writes == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def gradebook(db_url: str, course_id: str):
    from nbgrader.api import Gradebook
    gb = Gradebook(db_url, course_id)
    try:
        yield gb
    finally:
        gb.close()


def ensure_tables(db_url: str, course_id: str) -> None:
    with gradebook(db_url, course_id) as gb:
        _meta.create_all(gb.engine)


def recorded(db_url: str, course_id: str, assignment: str, stage="autograde") -> dict[str, str]:
    """{student: digest} of the submissions whose grades are in the gradebook."""
    return {s: digest for s, (digest, _) in records(db_url, course_id, assignment, stage).items()}


def records(db_url: str, course_id: str, assignment: str,
            stage="autograde") -> dict[str, tuple[str, dt.datetime]]:
    """{student: (digest, graded_at)}; empty where nothing was ever recorded (reading only:
    a shard reads the course gradebook this way and must not write it)."""
    from sqlalchemy import inspect
    with gradebook(db_url, course_id) as gb:
        if not inspect(gb.engine).has_table(GRADED.name):
            return {}
        rows = gb.db.execute(select(GRADED.c.student, GRADED.c.digest, GRADED.c.graded_at)
                             .where(GRADED.c.assignment == assignment,
                                    GRADED.c.stage == stage)).all()
        return {student: (digest, at) for student, digest, at in rows}


def hash_tree(h, base) -> None:
    """Feed every file under `base` (relative name and bytes, in a fixed order) to hash `h`:
    a digest of what a grade depends on."""
    from pathlib import Path
    base = Path(base)
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")


def has_gpu_cells(db_url: str, course_id: str, assignment: str) -> bool:
    """The gpu_runner owns the cells named gpu_* (task cells it scores); an assignment with
    any goes to it after autograde."""
    from nbgrader.api import MissingEntry
    with gradebook(db_url, course_id) as gb:
        try:
            a = gb.find_assignment(assignment)
        except MissingEntry:
            return False
        return any(cell.name.startswith("gpu_") for nb in a.notebooks
                   for cell in list(nb.grade_cells) + list(nb.task_cells))


def make_seed(db_url: str, course_id: str, seed_path: str) -> None:
    """A fresh sqlite gradebook holding only the definition rows, for workers to copy."""
    from sqlalchemy import text
    from nbgrader.api import Base
    seed_url = f"sqlite:///{seed_path}"
    src, dst = create_engine(db_url), create_engine(seed_url)
    try:
        Base.metadata.create_all(dst)
        with src.connect() as s, dst.begin() as d:
            # The course gradebook's alembic stamp is copied: a fresh Gradebook() would ask the
            # `alembic heads` script for it, which costs several CPU-seconds.
            version = s.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
            d.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            d.execute(text("INSERT INTO alembic_version VALUES (:v)"), {"v": version})
            for table in Base.metadata.sorted_tables:
                if table.name in _DEFINITION_TABLES:
                    rows = [dict(r._mapping) for r in s.execute(table.select())]
                    if rows:
                        d.execute(table.insert(), rows)
    finally:
        src.dispose()
        dst.dispose()


def read_result(worker_url: str, course_id: str, assignment: str, student: str) -> dict:
    """What autograde wrote for one submission: the fields nbgrader's SaveAutoGrades and
    AssignLatePenalties set (manual grades stay the instructor's)."""
    with gradebook(worker_url, course_id) as gb:
        sub = gb.find_submission(assignment, student)
        return {
            "timestamp": sub.timestamp,
            "notebooks": {nb.name: {
                "late_submission_penalty": nb.late_submission_penalty,
                "grades": {g.name: (g.auto_score, g.needs_manual_grade, g.max_score)
                           for g in nb.grades},
                "comments": {c.name: c.auto_comment for c in nb.comments},
            } for nb in sub.notebooks},
        }


def write_result(gb, assignment: str, student: str, result: dict, digest: str,
                 stage="autograde", graded_at: dt.datetime | None = None) -> None:
    """Copy `result` into the course gradebook and record `digest` (and `graded_at`, default
    now): one transaction."""
    from nbgrader.api import Student
    db = gb.db
    try:
        if db.get(Student, student) is None:
            db.add(Student(id=student))
            db.flush()
        sub = _submission(gb, assignment, student)
        sub.timestamp = result["timestamp"]
        for nb in sub.notebooks:
            got = result["notebooks"].get(nb.name)
            if got is None:
                continue
            nb.late_submission_penalty = got["late_submission_penalty"]
            for g in nb.grades:
                if g.name in got["grades"]:
                    g.auto_score, g.needs_manual_grade, _ = got["grades"][g.name]
            for c in nb.comments:
                if c.name in got["comments"]:
                    c.auto_comment = got["comments"][c.name]
        _record(db, assignment, student, stage, digest, graded_at)
        db.flush()
        _fault_before_commit()
        db.commit()
    except BaseException:
        db.rollback()
        raise


def record_only(gb, assignment: str, student: str, digest: str, stage: str) -> None:
    try:
        _record(gb.db, assignment, student, stage, digest)
        gb.db.commit()
    except BaseException:
        gb.db.rollback()
        raise


def _record(db, assignment, student, stage, digest, graded_at=None):
    key = (GRADED.c.assignment == assignment) & (GRADED.c.student == student) & (GRADED.c.stage == stage)
    db.execute(GRADED.delete().where(key))
    db.execute(GRADED.insert().values(assignment=assignment, student=student, stage=stage,
                                      digest=digest, graded_at=graded_at or dt.datetime.utcnow()))


def _submission(gb, assignment, student):
    """The student's submission, created (uncommitted) with nbgrader's structure if new."""
    from nbgrader.api import Comment, Grade, MissingEntry, SubmittedAssignment, SubmittedNotebook
    try:
        return gb.find_submission(assignment, student)
    except MissingEntry:
        pass
    with gb.db.no_autoflush:  # mirrors Gradebook.add_submission, minus its commit
        sub = SubmittedAssignment(assignment=gb.find_assignment(assignment),
                                  student=gb.find_student(student))
        for notebook in sub.assignment.notebooks:
            nb = SubmittedNotebook(notebook=notebook, assignment=sub)
            for cell in notebook.grade_cells:
                Grade(cell_id=cell.id, notebook=nb)
            for cell in notebook.solution_cells:
                Comment(cell_id=cell.id, notebook=nb)
            for cell in notebook.task_cells:
                Comment(cell_id=cell.id, notebook=nb)
                Grade(cell_id=cell.id, notebook=nb)
        gb.db.add(sub)  # last: adding the parent cascades to the notebooks, grades, comments
    gb.db.flush()
    return sub
