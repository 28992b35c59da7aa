"""The tp_sequence notebook's checks, one module per exercise: `sequence` (layer_sp) and `vocab`
(the vocabulary-parallel embedding and cross-entropy). A test cell:
`from assignments.tp_sequence.checks import vocab as check`."""
from tpgrade._harness import make_checks_read_only

from . import sequence, vocab  # noqa: F401  (both loaded, and locked, before any student code)

make_checks_read_only(__name__)
