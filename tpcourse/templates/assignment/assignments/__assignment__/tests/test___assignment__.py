"""__assignment__'s own tests, in-process: its checks pass the instructor's answer and fail a
mistake with a message that names it; its gpu_runner units judge the reference right and a
missing all-reduce wrong on forked gloo ranks (world sizes 1-3). The whole catalogue against
grades.json is tests/test_catalogue.py's."""
from __future__ import annotations

import pytest

from assignments.__assignment__ import checks, examples
from tpcourse.catalogue import gpu_report, source
from tpcourse.submissions import Submission
from tpjudge.cells import reference_answers
from tpgrade.verdict import CheckFailed

SOURCE = source(examples.ASSIGNMENT)


def _define(code: str, name: str):
    import numpy as np
    from tpsim import all_reduce
    namespace = {"np": np, "all_reduce": all_reduce}
    exec(code, namespace)
    return namespace[name]


def test_the_checks_pass_the_reference_and_name_a_mistake():
    reference = _define(reference_answers(SOURCE)["sol_row_matmul"], "row_matmul")
    checks.row_matmul_small(reference)
    checks.row_matmul_uneven(reference)
    wrong = _define(examples.PARTIAL_ONLY, "row_matmul")
    with pytest.raises(CheckFailed, match="partial sum"):
        checks.row_matmul_small(wrong)


def test_the_gpu_units_judge_on_forked_ranks(tmp_path):
    for student, lost in (("reference", set()), ("torch_no_all_reduce", {"gpu_matmul_forward"})):
        sub = examples.BY_NAME[student]
        assert isinstance(sub, Submission)
        report = gpu_report(sub, (1, 2, 3), tmp_path / student)
        failed = {cell for cell, c in report["cells"].items() if c["score"] < c["points"]}
        assert failed == lost, report["cells"]
