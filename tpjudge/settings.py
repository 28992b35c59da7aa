"""The judge's knobs, set from nbgrader_config.py as `c.Judge.<name> = value`."""
from __future__ import annotations

from traitlets import Bool, Float, Integer
from traitlets.config import Configurable

from tpsandbox import cputime


class Judge(Configurable):
    """How the verdicts of the test cells are decided under `nbgrader autograde`."""

    enabled = Bool(True, help=(
        "Decide every test cell in the grader's own process, calling the student's functions "
        "in a sandboxed process of their own (tpjudge). False runs the test cells in the "
        "student's kernel, where code in a solution cell can reach the checks (unsafe; for "
        "comparisons only).")).tag(config=True)
    timeout = Integer(0, help="Seconds of CPU time each cell's student code may use in the "
                      "judge's student process (its whole process tree: the ranks it forks "
                      "too), with the stops of c.TimeLimits (computing nothing, the wall-clock "
                      "backstop); 0: the same as c.Execute.timeout.").tag(config=True)
    rerun_timeouts = Bool(True, help=(
        "Judge once more, in a fresh student process after the notebook's other tests, each "
        "test that timed out on the clock alone (the wall-clock backstop, or computing "
        "nothing) or was never judged because the process had been killed after timeouts. "
        "A test past its CPU-time limit is not rerun: CPU time does not depend on load."
    )).tag(config=True)
    interrupt_grace = Float(cputime.INTERRUPT_GRACE, help="After an interrupt, the student's "
                            "process is killed when it has not answered once it has used this "
                            "many seconds of CPU time, or computed nothing for as long."
                            ).tag(config=True)
    startup_timeout = Integer(120, help="Seconds of CPU time the student's process may take to "
                              "start.").tag(config=True)
    max_message_mb = Integer(256, help="Largest message the student's process may send, MiB."
                             ).tag(config=True)
    max_output_bytes = Integer(200_000, help="Output of the student's code kept per test cell."
                               ).tag(config=True)
