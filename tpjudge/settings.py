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
