"""The grading worker's speed-ups (tpgrader.classgrade.speedups) keep nbgrader's verdicts.

The end-to-end proof is tests/test_grade_class.py (a parallel run grades exactly like a
sequential `nbgrader autograde`); these tests pin each speed-up on its own.
"""
from __future__ import annotations

import copy
import sqlite3

import jsonschema
import pytest
from nbgrader.nbgraderformat import MetadataValidator

from tpgrader.classgrade import speedups


def _cells():
    good = {"grade": True, "grade_id": "t1", "locked": True, "points": 2, "schema_version": 3,
            "solution": False, "task": False}
    bad_points = dict(good, points="two")
    not_bool = dict(good, locked="yes")
    extra = dict(good, grade_id=7)
    return [good, bad_points, not_bool, extra]


def _outcome(validate, instance, schema):
    try:
        validate(instance, schema)
    except jsonschema.ValidationError as err:
        return ("invalid", err.message, list(err.path))
    return ("valid",)


def test_cached_validate_gives_jsonschema_verdicts():
    schema = MetadataValidator().schema
    cached = speedups._CachedJsonschema(jsonschema)
    outcomes = [_outcome(cached.validate, c, schema) for c in _cells()]
    assert outcomes == [_outcome(jsonschema.validate, c, schema) for c in _cells()]
    assert [o[0] for o in outcomes] == ["valid", "invalid", "invalid", "invalid"]
    assert len(cached._validators) == 1  # the schema was checked and compiled once


def test_cached_validate_follows_a_new_schema_object():
    schema = MetadataValidator().schema
    cached = speedups._CachedJsonschema(jsonschema)
    cell = _cells()[0]
    assert _outcome(cached.validate, cell, schema) == ("valid",)
    stricter = copy.deepcopy(schema)
    stricter["properties"]["points"] = {"type": "string"}  # a different schema object
    assert _outcome(cached.validate, cell, stricter)[0] == "invalid"


def test_cached_validate_rejects_a_broken_schema():
    cached = speedups._CachedJsonschema(jsonschema)
    with pytest.raises(jsonschema.SchemaError):
        cached.validate({}, {"type": 12})


def test_engine_is_reused_and_scratch_db_skips_fsync(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    first, second = speedups._cached_engine(url), speedups._cached_engine(url)
    assert first is second
    with first.connect() as conn:
        sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    assert sync == 0  # OFF: the worker's private file is scratch
    speedups.forget(url)
    other = speedups._cached_engine(f"sqlite:///{tmp_path / 'other.db'}")
    assert other is not first


def test_course_gradebook_connections_keep_fsync(tmp_path):
    """Only engines made through the worker's cache get the scratch pragmas."""
    db = tmp_path / "gradebook.db"
    sqlite3.connect(db).close()
    from sqlalchemy import create_engine
    with create_engine(f"sqlite:///{db}").connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL, sqlite's default
