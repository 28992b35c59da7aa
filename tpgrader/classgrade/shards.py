"""Scale-out: shards of a class graded on many machines, merged by one writer.

`grade_class ASSIGNMENT --shard I/N --shard-dir DIR` grades students I, I+N, I+2N, ... (sorted
by id) into DIR only, never the course gradebook: DIR/gradebook.db (a private sqlite gradebook
seeded with the assignment's definition, holding the grades and, in the same transaction,
the digest and time of each, as the course gradebook does) and DIR/autograded/ (the
notebooks). `grade_class ASSIGNMENT --merge DIR...` is then the course gradebook's one writer:
for each student, the newest grade over the shards is copied in, with its digest and grading
time, in one transaction, unless the course already holds a grade at least as new. Merging
twice therefore changes nothing, a student graded again in a later shard replaces the older
grade, and manual grades are never touched.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Column, MetaData, String, Table, select

from . import gradebook as gbk

_meta = MetaData()
# What a shard gradebook was made for: a merge refuses one of another course, assignment or
# assignment source (its grades would belong to a different set of tests).
SHARD = Table(
    "tpcourse_shard", _meta,
    Column("assignment", String(128), primary_key=True),
    Column("course_id", String(128), nullable=False),
    Column("source_digest", String(64), nullable=False),
)


def parse(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: I must be in 0..N-1")
    return index, count


def pick(students: list[str], index: int, count: int) -> list[str]:
    """The shard's students: every `count`-th of the sorted list, from the `index`-th (the
    rule gpu_runner's --shard follows too)."""
    return sorted(students)[index::count]


def source_digest(root: Path, assignment: str) -> str:
    h = hashlib.sha256()
    gbk.hash_tree(h, Path(root) / "source" / assignment)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardDir:
    """One shard's output folder (hidden from the student code it grades)."""
    path: Path

    @property
    def db(self) -> Path:
        return self.path / "gradebook.db"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    @property
    def autograded(self) -> Path:
        return self.path / "autograded"

    @property
    def stage(self) -> Path:
        return self.path / "stage"


def prepare(shard: ShardDir, course_url: str, course_id: str, assignment: str,
            digest: str) -> None:
    """A shard gradebook for this assignment source, kept when it is one already (a shard
    run again resumes), made afresh from the course's definition rows otherwise."""
    if shard.db.exists() and _made_for(shard, course_id, assignment) == digest:
        return
    shard.path.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(shard.autograded, ignore_errors=True)
    new = shard.path / "gradebook.db.new"
    new.unlink(missing_ok=True)
    gbk.make_seed(course_url, course_id, str(new))
    url = f"sqlite:///{new}"
    with gbk.gradebook(url, course_id) as gb:
        _meta.create_all(gb.engine)
        gbk.GRADED.metadata.create_all(gb.engine)
        gb.db.execute(SHARD.insert().values(assignment=assignment, course_id=course_id,
                                            source_digest=digest))
        gb.db.commit()
    os.replace(new, shard.db)


def _made_for(shard: ShardDir, course_id: str, assignment: str) -> str | None:
    """The source digest the shard gradebook was made for (None: not this course's)."""
    from sqlalchemy import create_engine, inspect
    engine = create_engine(shard.url)
    try:
        if not inspect(engine).has_table(SHARD.name):
            return None
        with engine.connect() as con:
            row = con.execute(select(SHARD.c.course_id, SHARD.c.source_digest)
                              .where(SHARD.c.assignment == assignment)).first()
    finally:
        engine.dispose()
    return row.source_digest if row is not None and row.course_id == course_id else None


def check(shards: list[ShardDir], course_id: str, assignment: str, digest: str) -> None:
    """Refuse (ValueError naming it) a folder that is not a shard of this assignment's
    current source."""
    for shard in shards:
        if not shard.db.is_file():
            raise ValueError(f"{shard.path} is not a shard folder (no gradebook.db)")
        made = _made_for(shard, course_id, assignment)
        if made is None:
            raise ValueError(f"{shard.path} holds no grades of {assignment} in course "
                             f"{course_id}")
        if made != digest:
            raise ValueError(f"{shard.path} was graded against another source of "
                             f"{assignment} (source/{assignment} changed since): grade "
                             "that shard again")


def newest(shards: list[ShardDir], course_id: str, assignment: str) -> dict:
    """{student: (shard, digest, graded_at)}: each student's newest grade over the shards."""
    best = {}
    for shard in shards:
        for student, (digest, at) in gbk.records(shard.url, course_id, assignment).items():
            if student not in best or at > best[student][2]:
                best[student] = (shard, digest, at)
    return best


def copy_notebooks(source: Path, dest: Path) -> None:
    """Replace `dest` with a copy of `source` (the shard keeps its own: merging again, or
    after a kill, finds it intact)."""
    tmp = dest.with_name(dest.name + ".merging")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
