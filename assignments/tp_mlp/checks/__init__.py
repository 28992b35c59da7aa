"""The tp_mlp notebook's checks, one module per exercise: `mlp` (mlp_tp) and `comm` (the
communication count). A test cell: `from assignments.tp_mlp.checks import mlp as check`."""
from tpgrade._harness import make_checks_read_only

from . import comm, mlp  # noqa: F401  (both loaded, and locked, before any student code)

make_checks_read_only(__name__)
