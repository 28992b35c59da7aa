"""gpu_runner end to end on CPU/gloo ranks -- SLOW (torchrun launches, a few minutes).

One course for the module: generate tp_torch, place the catalogue's submissions, autograde two
of them, run `python -m gpu_runner.grade` (gradebook for the autograded two, reports only for
the rest), then `nbgrader export` and `generate_feedback`. Every submission is one torchrun
launch for world sizes 1-4, plus a relaunch only where a fault forces one. This is the path CI
runs (no GPU there); on a GPU machine the same command picks NCCL.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import psutil
import pytest

from tpcourse import REPO
from tpcourse.examples import torch_students as cat
from tpcourse.submissions import build

pytestmark = [pytest.mark.nbgrader]

ASSIGNMENT = "tp_torch"
IN_GRADEBOOK = ["torch_reference", "torch_bias_every_rank"]
REQUIRED_WRONG = ["torch_local_shard", "torch_plain_collectives", "torch_allreduce_in_column",
                  "torch_two_allreduces_mlp", "torch_wrong_shard", "torch_no_shape_check"]
FAULTS = [s.student for s in cat.FAULTS]
PG_TIMEOUT, WALL = 5, 180
FLAGS = ["--pg-timeout", str(PG_TIMEOUT), "--timeout", str(WALL), "--backend", "gloo"]


def _grade(root, students, *extra):
    cmd = [sys.executable, "-m", "gpu_runner.grade", ASSIGNMENT, "--course-root", str(root),
           *FLAGS, *extra]
    for s in students:
        cmd += ["--student", s]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def course(make_course):
    course = make_course("gpu_runner", [ASSIGNMENT], extra_config="")
    course.generate(ASSIGNMENT)
    for name in IN_GRADEBOOK:
        course.place_submission(name, ASSIGNMENT, build(cat.BY_NAME[name]))
    course.autograde(ASSIGNMENT)              # one nbgrader call; the others need no gradebook
    for name in REQUIRED_WRONG + FAULTS:
        course.place_submission(name, ASSIGNMENT, build(cat.BY_NAME[name]))
    with_db = _grade(course.root, IN_GRADEBOOK)
    assert with_db.returncode == 0, with_db.stdout + with_db.stderr
    rest = _grade(course.root, REQUIRED_WRONG + FAULTS, "--no-gradebook", "--no-timing")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    course.grader_output = with_db.stdout + rest.stdout
    return course


def _report(course, student):
    return json.loads((course.root / "gpu_reports" / ASSIGNMENT / student / "report.json")
                      .read_text())


def _lost(report):
    return {gid for gid, c in report["cells"].items() if c["score"] < c["points"]}


def test_reference_gets_full_marks_at_world_sizes_1_to_4(course):
    rep = _report(course, "torch_reference")
    assert rep["world_sizes"] == [1, 2, 3, 4] and rep["backend"] == "gloo"
    assert rep["score"] == rep["max_score"] == sum(cat.GPU_CELLS.values())
    bad = {k: v["detail"] for k, v in rep["checks"].items() if not v["ok"]}
    assert not bad
    assert {k.split("@")[1] for k in rep["checks"]} == {"1", "2", "3", "4"}
    assert len(rep["launches"]) == 1 and not rep["faults"]     # one launch, all sizes
    for layer in ("column", "row", "mlp"):
        assert set(rep["timing"][layer]) == {"1", "2", "3", "4"}
        assert all(t["comm_ms"] >= 0 and t["compute_ms"] >= 0
                   for t in rep["timing"][layer].values())
    assert (course.root / "gpu_reports" / ASSIGNMENT / "torch_reference" / "timing.png") \
        .read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("student", ["torch_bias_every_rank"] + REQUIRED_WRONG)
def test_wrong_solution_loses_points_on_the_right_cells(course, student):
    rep = _report(course, student)
    sub = cat.BY_NAME[student]
    assert _lost(rep) == set(sub.loses), (sub.why, {g: c["comment"] for g, c in
                                                    rep["cells"].items() if g in _lost(rep)})
    assert not rep["faults"] and len(rep["launches"]) == 1


@pytest.mark.parametrize("student,says", [
    ("torch_deadlock", "collective failed"),
    ("torch_crash", "SIGSEGV"),
    ("torch_os_exit", "os._exit"),
    ("torch_infinite_loop", "still running after"),
])
def test_faulty_submission_is_caught_in_bounded_time(course, student, says):
    rep = _report(course, student)
    sub = cat.BY_NAME[student]
    assert rep["faults"], "no fault recorded"
    assert any(says in f["reason"] for f in rep["faults"]), rep["faults"]
    # caught by the process-group timeout / watchdog / exit, not by the wall-clock limit
    assert not any(launch["timed_out"] for launch in rep["launches"])
    assert all(launch["seconds"] < WALL for launch in rep["launches"])
    # the affected cells score below full, everything else is still graded in full
    assert _lost(rep) == set(sub.loses), {g: c["comment"] for g, c in rep["cells"].items()}
    reason = rep["faults"][0]["reason"]
    assert any(c["detail"] == reason and not c["ok"] for c in rep["checks"].values())


def test_no_worker_outlives_its_launch(course):
    """Nothing of this module's launches runs on: no process names this course (the ranks, in
    the sandbox, run its copied solution), and no process tagged by a supervisor outlives it.
    Launches of other test files may be running at the same time, under their supervisors."""
    leftovers = []
    for proc in psutil.process_iter(["uids", "cmdline"]):
        try:
            ours = str(course.root) in " ".join(proc.info["cmdline"] or [])
            tagged = proc.info["uids"].real == os.getuid() and "GPU_RUNNER_JOB" in proc.environ()
            supervised = any("gpu_runner.supervise" in " ".join(p.cmdline()) for p in proc.parents())
            if ours or (tagged and not supervised):
                leftovers.append((proc.pid, proc.info["cmdline"]))
        except (psutil.Error, AttributeError):
            continue
    assert not leftovers


def test_scores_are_in_the_gradebook_export_and_feedback(course):
    for student in IN_GRADEBOOK:
        rep = _report(course, student)
        scores = course.scores(ASSIGNMENT, student)["tp_torch"]
        for gid, cell in rep["cells"].items():
            assert scores[gid] == pytest.approx((cell["score"], cell["points"])), gid
    grades = {row["student_id"]: row for row in csv.DictReader(open(course.export()))}
    for student in IN_GRADEBOOK:
        scores = course.scores(ASSIGNMENT, student)["tp_torch"]
        assert float(grades[student]["score"]) == pytest.approx(
            sum(s for s, _ in scores.values()), abs=1e-3)
        assert float(grades[student]["max_score"]) == pytest.approx(
            sum(m for _, m in scores.values()))
    ref, bias = (float(grades[s]["score"]) for s in IN_GRADEBOOK)
    lost = sum(c["points"] - c["score"] for c in _report(course, IN_GRADEBOOK[1])["cells"].values())
    assert lost > 0 and ref - bias >= lost - 1e-3        # the gpu points are in the total
    course.generate_feedback(ASSIGNMENT)
    html = course.feedback_html(ASSIGNMENT, "torch_bias_every_rank")["tp_torch.html"]
    assert "gpu_runner (gloo, world sizes 1, 2, 3, 4)" in html
    assert "row.forward@2" in html                       # the reason, in the feedback
