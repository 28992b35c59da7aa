"""The judge's knobs, set from nbgrader_config.py as `c.Judge.<name> = value`."""
from __future__ import annotations

from traitlets import Bool, Float, Integer
from traitlets.config import Configurable


class Judge(Configurable):
    """How the verdicts of the test cells are decided under `nbgrader autograde`."""

    enabled = Bool(True, help=(
        "Decide every test cell in the grader's own process, calling the student's functions "
        "in a sandboxed process of their own (tpjudge). False runs the test cells in the "
        "student's kernel, where code in a solution cell can reach the checks (unsafe; for "
        "comparisons only).")).tag(config=True)
    timeout = Integer(0, help="Seconds each cell's student code may run in the judge's student "
                      "process; 0: the same as c.Execute.timeout.").tag(config=True)
    interrupt_grace = Float(5.0, help="Seconds the student's code has to stop after an "
                            "interrupt before its process is killed.").tag(config=True)
    startup_timeout = Integer(120, help="Seconds the student's process may take to start."
                              ).tag(config=True)
    max_message_mb = Integer(256, help="Largest message the student's process may send, MiB."
                             ).tag(config=True)
    max_output_bytes = Integer(200_000, help="Output of the student's code kept per test cell."
                               ).tag(config=True)
