"""The checks' shared core: what every assignment's check module is built on.

The checks themselves live with their notebooks, `assignments/<name>/checks.py`; a test cell is
a short call::

    from assignments.<name> import checks as check      # in a test cell
    check.column_matches_dense(column_parallel)

This package holds what they share: the verdict core (`verdict`: one tolerance rule family
and one message format for every check, numpy and torch), what the torch checks expect back
from the ranks, validated whole before any comparison (`replies`), the torch layers'
diagnoses, test data and references (`tensors`), the test data (`cases`), the dense float64
reference math (`dense`; `_attention_dense` adds error scales), the harness every check runs
in (`_harness`, `_layers`, `_trusted`, `_torch_trusted`), the self-check cells' runner
(`selfcheck`) and an in-process runner of a notebook for tests (`offline`). Each check raises
an AssertionError whose message names the mistake ("expected shape (3, 6), got (3, 3);
probably only the local shard was returned") and prints nothing on success. In a notebook the message shows alone, wrapped (_harness.show_verdicts),
and `tpgrade.selfcheck.run` (the self-check cells) runs every check of an exercise, hidden
tests included, and reports.

Where the checks run, and what that protects
--------------------------------------------
Under `nbgrader autograde` the test cells do not run in the student's kernel: the judge
(tpjudge, plugged in by tpgrader) runs them in the grader's own process, where no student code
ever runs, and calls the student's functions in a separate sandboxed process, getting back data
only. That is what makes a grade trustworthy: nothing a solution cell does to this package, to
numpy, to sys.modules, the import system, code objects, frames or the shell can reach a verdict.

In a student's own notebook (the visible tests, `nbgrader validate`) the checks run in-process,
so a few defences remain for honest mistakes there: numpy functions are captured at import
(`tpgrade._trusted`), tpsim is restored before every check (`_harness.restore_tpsim`), the check
modules are read-only, and the shell's error reporting is reset. They raise the bar; they are
not a security boundary (tests/test_judge_catalogue.py shows 14 attacks getting through them).
"""
from . import _trusted  # noqa: F401  (first: capture numpy before anything else runs)
from . import _harness, verdict  # noqa: F401
from . import selfcheck  # noqa: F401  (the notebooks' self-check cells: tpgrade.selfcheck.run)

# In a notebook a failed check shows its verdict, whole and wrapped, not the checks' frames.
_harness.show_verdicts(verdict.CheckFailed)

__all__ = ["selfcheck", "verdict"]

# Last: `tpgrade.verdict = fake` in a solution cell would otherwise swap every verdict at once.
_harness.make_read_only(__name__)
