"""Grading helpers for the tensor-parallelism notebooks: one importable place for every check.

Test cells are short calls, e.g.::

    import tpgrade.linear as check
    check.column_matches_dense(column_parallel)

Each check raises an AssertionError whose message names the mistake ("expected shape (3, 6),
got (3, 3): only the local shard was returned?") and prints nothing on success.

Threat model (what the checks defend against, and what they do not)
--------------------------------------------------------------------
The notebook imports tpgrade in a read-only setup cell, which nbgrader restores before
autograding, so tpgrade is imported before any student code runs. Then:

* numpy functions are captured at import (`tpgrade._trusted`), and the checks otherwise use
  ndarray methods and operators. A solution cell that rebinds `np.allclose`,
  `np.testing.assert_allclose`, `np.asarray`... cannot change a verdict.
* tpsim's functions, their code objects and defaults, and its module state are captured at
  import; every check first puts them back (`_harness.restore_tpsim`) and records collectives
  through the genuine recorder. A notebook that replaces `tpsim.all_reduce`, or binds its own
  `all_reduce = lambda parts: ...`, makes no genuine recorded call, so the counting and
  per-rank-input checks fail; outputs are always compared with a float64 dense computation.
* Checks never read the notebook's globals: test cells import the check module afresh
  (`import tpgrade.linear as check`) and pass the student's function in.
* The check modules are read-only (`check.column_small = lambda f: None` raises).
* A shell that was told to swallow exceptions (`set_custom_exc`, a replaced `showtraceback`)
  is reset at the start of every check, so a failing check still shows as an error.

In-process grading cannot stop a determined attacker: code in a solution cell runs in the
same interpreter and could patch tpgrade's own internals, Python builtins, `sys.modules`, or
forge entries in tpsim's recorder while a check runs. The checks' source is also readable
(it is installed with the course); only the hidden test *cells* are hidden. Isolation from
OS-level attacks (reading other students' files, the gradebook) is the grading sandbox's job
(issue 4), not this module's.
"""
from . import _trusted  # noqa: F401  (first: capture numpy before anything else runs)
from . import _harness, attention, comm, compare, cost, linear, mlp  # noqa: F401

__all__ = ["attention", "comm", "compare", "cost", "linear", "mlp"]

# Last: `tpgrade.linear = fake` in a solution cell would otherwise swap every check at once.
_harness.make_read_only(__name__)
