"""The torch notebooks (tp_torch, tp_torch_sequence, tp_torch_attention) through the real
nbgrader cycle, in one temporary course.

One course for the module: `nbgrader generate_assignment` of all three, then one batched
`nbgrader autograde` of the reference solution, the unmodified release and a few classic
mistakes of each. The in-notebook tests (run on 2 gloo ranks, judged in the grader) must give
the reference full marks, point at the mistakes, and leave the gpu_* task cells to the
gpu_runner (ungraded by autograde, worth their fixed points in the gradebook, where the
gpu_runner's scores land and `nbgrader export` counts them).
"""
from __future__ import annotations

import re

import nbformat
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.nbgrader

from test_torch_checks import BIAS_EVERY_RANK, BIAS_ONES, NO_F, REBIND, answers_with  # noqa: E402
from tpcourse import REPO  # noqa: E402
from tpcourse.examples import torch_attention_students as attn  # noqa: E402
from tpcourse.examples import torch_sequence_students as seq  # noqa: E402
from tpcourse.submissions import (build, fill, grade_id, is_solution, read,  # noqa: E402
                                  reference_answers)

ASSIGNMENT = "tp_torch"
SOURCE = REPO / "source" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
GPU_CELLS = {"gpu_column_shards": 2, "gpu_column_forward": 3, "gpu_column_backward": 3,
             "gpu_row_shards": 2, "gpu_row_forward": 3, "gpu_row_backward": 3,
             "gpu_mlp_forward": 2, "gpu_mlp_backward": 2, "gpu_collective_counts": 3, "gpu_errors": 1}
SOLUTIONS = {"sol_mappings", "sol_column_layer", "sol_row_layer", "sol_parallel_mlp"}

# Classic mistakes, as edits of the reference answer: (cell, old, new, test cells that must fail,
# a phrase the failing test's message must contain).
MISTAKES = {
    "no_f": ("sol_column_layer",
             "F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)",
             "F.linear(x, self.weight, self.bias)",
             {"test_column_backward", "test_mlp_backward"}, "copy_to_tp_region"),
    "bias_every_rank": ("sol_row_layer",
                        "y = reduce_from_tp_region(F.linear(x, self.weight), self.group)",
                        "y = reduce_from_tp_region(F.linear(x, self.weight, self.bias), self.group)\n"
                        "        return y",
                        {"test_row_forward", "test_mlp_forward"}, "bias added on every rank"),
    "local_shard": ("sol_column_layer", "if self.gather_output:", "if False:",
                    {"test_column_forward", "test_column_backward"}, "only the local shard returned"),
}

# Three mistakes, plus a solution cell that rebinds torch.allclose, torch.equal, torch.testing,
# Tensor.__eq__, the notebook's run_on_ranks and dist.all_reduce (tests/test_torch_checks.py):
# it must lose exactly the mistakes' tests, as it would without the rebinding.
REBINDER = (answers_with(BIAS_ONES, NO_F, BIAS_EVERY_RANK, extra={"sol_mappings": REBIND}),
            {"test_column_shards", "test_column_backward", "test_mlp_backward", "test_row_forward",
             "test_mlp_forward"})


def source_nb():
    return read(SOURCE)


def graded_tests(nb):
    meta = {grade_id(c): c.metadata["nbgrader"] for c in nb.cells if "nbgrader" in c.metadata}
    return {gid: m["points"] for gid, m in meta.items() if m.get("grade") and not m.get("solution")}


def mistake_answers(name):
    cell, old, new, _, _ = MISTAKES[name]
    answers = reference_answers(source_nb())
    assert answers[cell].count(old) == 1, f"{name}: the reference no longer contains {old!r}"
    return {cell: answers[cell].replace(old, new)}


# tp_torch_sequence: its reference and a mistake the notebook's tests name (its release scoring
# zero, and the other mistakes: tests/test_torch_sequence.py, in-process).
SEQUENCE = seq.ASSIGNMENT
SEQUENCE_STUDENTS = ("tseq_reference", "tseq_layernorm_gathered")
# tp_torch_attention: the reference and a mistake (the release at zero and every catalogued
# student: test_torch_attention.py, in-process)
ATTN_STUDENTS = [attn.REFERENCE, attn.BY_NAME["tattn_bias_every_rank"]]


@pytest.fixture(scope="module")
def course(make_course):
    course = make_course("tp_torch_course", [ASSIGNMENT, SEQUENCE, attn.ASSIGNMENT])
    course.generate("*")                        # every assignment, one nbgrader call
    for sub in ATTN_STUDENTS:
        course.place_submission(sub.student, attn.ASSIGNMENT,
                                build(sub, course.root / "source", course.root / "release"))
    release = read(course.root / "release" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb")
    reference = reference_answers(source_nb())
    name = f"{ASSIGNMENT}.ipynb"
    course.place_submission("reference", ASSIGNMENT, {name: fill(release, reference)})
    course.place_submission("unmodified", ASSIGNMENT, {name: release})
    for student in MISTAKES:
        answers = {**reference, **mistake_answers(student)}
        course.place_submission(student, ASSIGNMENT, {name: fill(release, answers)})
    course.place_submission("rebinder", ASSIGNMENT, {name: fill(release, REBINDER[0])})
    for student in SEQUENCE_STUDENTS:
        course.place_submission(student, SEQUENCE, build(seq.BY_NAME[student]))
    course.autograde("*")  # one batched call for every student of every assignment
    return course


def scores(course, student):
    return course.scores(ASSIGNMENT, student)[ASSIGNMENT]


# -- the source notebook itself ---------------------------------------------------------------------
def test_source_cells_have_the_fixed_grade_ids_and_points():
    nb = source_nb()
    meta = {grade_id(c): (c.cell_type, c.metadata["nbgrader"]) for c in nb.cells if "nbgrader" in c.metadata}
    for gid, points in GPU_CELLS.items():
        kind, m = meta[gid]
        assert kind == "markdown" and m["task"] and m["locked"] and not m["grade"] and m["points"] == points, gid
    assert {gid for gid, (_, m) in meta.items() if m.get("solution")} == SOLUTIONS
    kind, setup = meta["setup"]
    assert kind == "code" and setup["locked"] and not setup["grade"] and not setup["solution"]
    assert all(points == 1 for points in graded_tests(nb).values())
    assert len(graded_tests(nb)) >= 10


def test_setup_cell_imports():
    setup = next(c.source for c in source_nb().cells if grade_id(c) == "setup")
    for line in ("import torch", "import torch.distributed as dist", "import torch.nn as nn",
                 "import torch.nn.functional as F", "import math",
                 "from tpgrade.torch_ranks import run_on_ranks"):
        assert re.search(rf"^{re.escape(line)}$", setup, re.M), line
    # the checks capture what they rely on before any answer runs (tpgrade._torch_trusted)
    assert re.search(r"^import tpgrade\.torch_checks\b", setup, re.M)


# -- generate_assignment ------------------------------------------------------------------------------
def test_release_has_stubs_and_no_solutions(course):
    release = read(course.root / "release" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb")
    text = nbformat.writes(release)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    stubs = {grade_id(c): c.source for c in release.cells if is_solution(c)}
    assert set(stubs) == SOLUTIONS
    assert all("raise NotImplementedError()" in src for src in stubs.values())
    # no line that exists only in the reference answers survives
    skeleton = "\n".join(stubs.values())
    for gid, answer in reference_answers(source_nb()).items():
        private = [ln.strip() for ln in answer.splitlines() if ln.strip() and ln.strip() not in skeleton]
        assert private, gid
        leaked = [ln for ln in private if ln in text and len(ln) > 25]
        assert not leaked, f"{gid}: reference lines in the release: {leaked}"


# -- autograde ----------------------------------------------------------------------------------------
def test_reference_gets_every_notebook_test(course):
    got = scores(course, "reference")
    for gid, points in graded_tests(source_nb()).items():
        assert got[gid] == (points, points), gid


def test_gpu_cells_are_left_to_the_gpu_runner(course):
    from nbgrader.api import Gradebook
    got = scores(course, "reference")
    assert {gid: got[gid][1] for gid in GPU_CELLS} == GPU_CELLS
    with Gradebook(course.db_url) as gb:
        notebook = gb.find_notebook(ASSIGNMENT, ASSIGNMENT)
        assert {c.name: c.max_score for c in notebook.task_cells} == GPU_CELLS
        for gid in GPU_CELLS:
            grade = gb.find_grade(gid, ASSIGNMENT, ASSIGNMENT, "reference")
            assert grade.auto_score is None and grade.manual_score is None and grade.needs_manual_grade
        total = gb.find_submission_notebook(ASSIGNMENT, ASSIGNMENT, "reference").max_score
        assert total == sum(graded_tests(source_nb()).values()) + sum(GPU_CELLS.values())


def test_unmodified_release_scores_zero(course):
    got = scores(course, "unmodified")
    assert all(got[gid][0] == 0 for gid in graded_tests(source_nb()))


@pytest.mark.parametrize("student", sorted(MISTAKES))
def test_mistakes_lose_exactly_their_tests(course, student):
    got = scores(course, student)
    lost = {gid for gid, points in graded_tests(source_nb()).items() if got[gid][0] < points}
    assert lost == MISTAKES[student][3]


@pytest.mark.parametrize("student", sorted(MISTAKES))
def test_failing_tests_say_what_is_wrong(course, student):
    graded = read(course.root / "autograded" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb")
    messages = {grade_id(c): " ".join(o.get("evalue", "") for o in c.outputs if o.output_type == "error")
                for c in graded.cells if c.cell_type == "code"}
    phrase = MISTAKES[student][4]
    assert any(phrase in messages[gid] for gid in MISTAKES[student][3]), {
        gid: messages[gid] for gid in MISTAKES[student][3]}


def test_rebinding_torch_helpers_earns_nothing(course):
    got = scores(course, "rebinder")
    lost = {gid for gid, points in graded_tests(source_nb()).items() if got[gid][0] < points}
    assert lost == REBINDER[1]


# -- tp_torch_sequence ------------------------------------------------------------------------------
def sequence_scores(course, student):
    return course.scores(SEQUENCE, student)[SEQUENCE]


def sequence_tests():
    return graded_tests(read(REPO / "source" / SEQUENCE / f"{SEQUENCE}.ipynb"))


def test_sequence_reference_passes_and_its_gpu_cells_wait_for_the_gpu_runner(course):
    from nbgrader.api import Gradebook
    got = sequence_scores(course, "tseq_reference")
    for gid, points in sequence_tests().items():
        assert got[gid] == (points, points), gid
    with Gradebook(course.db_url) as gb:
        notebook = gb.find_notebook(SEQUENCE, SEQUENCE)
        assert {c.name: c.max_score for c in notebook.task_cells} == seq.GPU_CELLS
        for gid in seq.GPU_CELLS:
            grade = gb.find_grade(gid, SEQUENCE, SEQUENCE, "tseq_reference")
            assert grade.auto_score is None and grade.needs_manual_grade
        total = gb.find_submission_notebook(SEQUENCE, SEQUENCE, "tseq_reference").max_score
        assert total == sum(sequence_tests().values()) + sum(seq.GPU_CELLS.values())


def test_sequence_mistake_loses_exactly_its_tests_and_says_why(course):
    got = sequence_scores(course, "tseq_layernorm_gathered")
    lost = {gid for gid, points in sequence_tests().items() if got[gid][0] < points}
    assert lost == seq.NOTEBOOK_LOSES["tseq_layernorm_gathered"]
    graded = read(course.root / "autograded" / "tseq_layernorm_gathered" / SEQUENCE /
                  f"{SEQUENCE}.ipynb")
    [cell] = [c for c in graded.cells if grade_id(c) == "test_layer_sp_backward"]
    assert "LayerNorm ran on the gathered tensor" in " ".join(
        o.get("evalue", "") for o in cell.outputs if o.output_type == "error")


def test_sequence_gpu_scores_land_in_the_gradebook(course):
    """The gpu_runner's report for tp_torch_sequence (ranks forked here, world sizes 1 and 2)
    written into the gradebook by the grader's own command (--load-reports): its gpu_* cells
    get the report's scores and comments."""
    import json
    import subprocess
    import sys

    import forked_runner
    student = "tseq_layernorm_gathered"
    rep = forked_runner.grade(seq.BY_NAME[student], (1, 2), course.root / "forked")
    folder = course.root / "gpu_reports" / SEQUENCE / student
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(rep))
    proc = subprocess.run([sys.executable, "-m", "gpu_runner.grade", SEQUENCE, "--load-reports",
                           "--student", student, "--course-root", str(course.root)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = sequence_scores(course, student)
    assert {gid: got[gid] for gid in seq.GPU_CELLS} == {
        gid: (cell["score"], cell["points"]) for gid, cell in rep["cells"].items()}
    assert got["gpu_sp_backward"][0] < seq.GPU_CELLS["gpu_sp_backward"]
    from nbgrader.api import Gradebook
    with Gradebook(course.db_url) as gb:
        comment = gb.find_comment("gpu_sp_backward", SEQUENCE, SEQUENCE, student).manual_comment
    assert comment == rep["cells"]["gpu_sp_backward"]["comment"]
    assert "LayerNorm ran on the gathered tensor" in comment


# -- tp_torch_attention -------------------------------------------------------------------------------
def _attn_scores(course, student):
    return course.scores(attn.ASSIGNMENT, student)[attn.NOTEBOOK]


def test_attention_notebook_tests_name_the_mistake_and_gpu_cells_wait(course):
    tests = graded_tests(read(attn.SOURCE))
    for sub in ATTN_STUDENTS:
        got = _attn_scores(course, sub.student)
        lost = {gid for gid, points in tests.items() if got[gid][0] < points}
        assert lost == (set(tests) if sub.loses_all else
                        {g for g in sub.loses if g.startswith("test_")}), sub.student
        assert {gid: got[gid][1] for gid in attn.GPU_CELLS} == attn.GPU_CELLS
    graded = read(course.root / "autograded" / "tattn_bias_every_rank" / attn.ASSIGNMENT /
                  f"{attn.NOTEBOOK}.ipynb")
    [cell] = [c for c in graded.cells if grade_id(c) == "test_attention_forward"]
    assert "bias added on every rank before the all-reduce" in str(cell.outputs)


def test_attention_gpu_scores_land_in_the_gradebook_and_the_export(course):
    """What `python -m gpu_runner.grade tp_torch_attention` writes (gpu_runner.gradebook, by
    grade_id) is counted by `nbgrader export` with the notebook's tests."""
    import csv

    from gpu_runner.gradebook import write_scores
    student = attn.REFERENCE.student
    write_scores(course.db_url, attn.ASSIGNMENT, attn.NOTEBOOK, student,
                 {gid: (points, "gpu_runner: all checks passed") for gid, points in
                  attn.GPU_CELLS.items()})
    got = _attn_scores(course, student)
    assert all(got[gid] == (p, p) for gid, p in attn.GPU_CELLS.items())
    rows = [r for r in csv.DictReader(open(course.export()))
            if r["student_id"] == student and r["assignment"] == attn.ASSIGNMENT]
    total = sum(graded_tests(read(attn.SOURCE)).values()) + sum(attn.GPU_CELLS.values())
    assert float(rows[0]["score"]) == pytest.approx(total) == float(rows[0]["max_score"])
