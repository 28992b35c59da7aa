"""Speed-ups inside a grading worker that leave every grade exactly as nbgrader computes it.

A profile of nbgrader's autograde of one notebook (grader side) shows three costs that a
long-lived worker need not pay again for each student:

- nbgrader opens a new `Gradebook` (a new SQLAlchemy engine) about nine times per notebook,
  so every ORM query is compiled afresh each time: the worker keeps one engine per database
  URL, with its statement cache (the worker always grades into the same private file);
- `jsonschema.validate`, which nbgrader calls on each cell's metadata, re-checks the schema and
  builds a new validator per cell: the worker checks the schema once and keeps the validator
  (the same validator class, the same errors raised);
- each commit to the worker's private sqlite file waits for the disk: that file is scratch
  (the single writer commits the result durably to the course gradebook), so it is written
  without fsync.

`install()` applies them to the worker process only; the writer and stock `nbgrader` are
untouched.
"""
from __future__ import annotations

from sqlalchemy import event

_ENGINES: dict = {}


def install() -> None:
    import nbgrader.api
    import nbgrader.nbgraderformat.common as common
    nbgrader.api.create_engine = _cached_engine
    common.jsonschema = _CachedJsonschema(common.jsonschema)


def forget(db_url: str) -> None:
    """Close pooled connections to `db_url` (before its file is replaced); the statement
    cache stays."""
    engine = _ENGINES.get(db_url)
    if engine is not None:
        engine.dispose()


def _cached_engine(url, **kwargs):
    from sqlalchemy import create_engine
    key = str(url)
    if key not in _ENGINES:
        engine = create_engine(url, **kwargs)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _scratch_pragmas)
        _ENGINES[key] = engine
    return _ENGINES[key]


def _scratch_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous = OFF")
    cursor.execute("PRAGMA journal_mode = MEMORY")
    cursor.close()


class _CachedJsonschema:
    """Stands in for the `jsonschema` module in nbgrader's metadata checks."""

    def __init__(self, module):
        self._module = module
        self._validators: dict = {}

    def __getattr__(self, name):
        return getattr(self._module, name)

    def validate(self, instance, schema):
        """jsonschema.validate(instance, schema), with the schema checked once."""
        entry = self._validators.get(id(schema))
        if entry is None or entry[0] is not schema:
            cls = self._module.validators.validator_for(schema)
            cls.check_schema(schema)
            entry = self._validators[id(schema)] = (schema, cls(schema))
        error = self._module.exceptions.best_match(entry[1].iter_errors(instance))
        if error is not None:
            raise error
