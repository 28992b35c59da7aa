"""tp_linear's example students (instructor tooling: hidden from students' code).

REFERENCE   the instructor's solutions: full marks.
UNMODIFIED  the release as handed out: zero on every graded test.
STUDENTS    classic mistakes, valid alternative styles, a looping submission (`students`).
FORGERS     in-process attacks on the checks, each with a wrong answer (`forgers`).
HOSTILE     attacks on the grader and its sandbox (`hostile`).
DEMO        the students `make demo` grades (with a "reference" of its own).
"""
from .forgers import FORGERS  # noqa: F401
from .hostile import HOSTILE  # noqa: F401
from .students import ALL, COLUMN_TESTS, REFERENCE, ROW_TESTS, STUDENTS, UNMODIFIED  # noqa: F401

DEMO = ("local_shard", "bias_every_rank", "float32_upcast")
