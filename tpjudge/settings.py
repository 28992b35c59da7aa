"""The judge's knobs, set from nbgrader_config.py as `c.Judge.<name> = value`."""
from __future__ import annotations

from traitlets import Bool, Float, Integer
from traitlets.config import Configurable

from tpsim import cputime


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
        "test that timed out on the clock alone (the wall-clock backstop, which load may "
        "explain) or was never judged because tests before it timed out and the process was "
        "killed. A test past its CPU-time limit, or that computed nothing, is not rerun: "
        "neither depends on load.")).tag(config=True)
    interrupt_grace = Float(cputime.INTERRUPT_GRACE, help="After an interrupt, the student's "
                            "process is killed when it has not answered once it has used this "
                            "many seconds of CPU time, or computed nothing for as long."
                            ).tag(config=True)
    startup_timeout = Integer(120, help="Seconds of CPU time the student's process may take to "
                              "start.").tag(config=True)
    # The limits of one message between the judge and the student's process (tpjudge.wire):
    # each side refuses to send what is over them (a failed call, whose message the student
    # sees) and to read it (a reply over them is a forged one: that student's process ends).
    # The largest message of the course's catalogue is 23 KB, 1.4 KB of header, 86 values
    # (700, 180 and 1000 times less than the defaults); a reply within the defaults costs the
    # grader at most ~70 MB while it is decoded (a 16 MiB text whose characters take 4 bytes
    # each) and ~0.05 s of CPU (bench/wire_bench.py).
    max_message_mb = Integer(16, min=1, help=(
        "Largest message between the judge and the student's process, MiB: the arrays, the "
        "text (output, messages) and the structure of one reply, e.g. one float64 array of up "
        "to 2 million values. A reply may take up to about 4 times this in the grader's "
        "memory while it is decoded.")).tag(config=True)
    max_header_kb = Integer(256, min=1, help=(
        "Largest structure of one message, KiB: its lists, dicts, Python numbers and short "
        "strings (arrays and long strings do not count), e.g. a list of about 10,000 Python "
        "floats. Decoding it may take up to about 20 times this in the grader's memory."
        )).tag(config=True)
    max_items = Integer(100_000, min=1, help=(
        "Most values in one message: each number, string, array, list and dict entry counts "
        "one.")).tag(config=True)
    max_output_bytes = Integer(200_000, help="Output of the student's code kept per test cell."
                               ).tag(config=True)
