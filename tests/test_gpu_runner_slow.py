"""gpu_runner end to end on CPU/gloo ranks -- SLOW (torchrun launches, a few minutes).

One course for the module, with every torch assignment of the registry. The first one in depth:
generate it, place its catalogue's submissions, autograde two of them, run
`python -m gpu_runner.grade` (gradebook for the autograded two, reports only for the rest), then
`nbgrader export` and `generate_feedback`. Every other one: its source's own solution graded
first (the reference: full marks, one launch) and the students its examples' DEMO names, each
losing exactly its gpu_* cells. Every submission is one torchrun
launch for world sizes 1-4, plus a relaunch only where a fault forces one; the first grader
call first grades the source's own solution (the reference), the second finds it done. This is
the path CI runs (no GPU there); on a GPU machine the same command picks NCCL.

The rank attacks (its RANK_ATTACKS) each carry one of the wrong answers: they stand in for
those wrong students in this batch (an attack can only raise a grade, so losing exactly the
wrong answer's cells shows both that the answer is caught and that the attack gained nothing).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import psutil
import pytest

import assignments
from tpcourse import REPO
from tpcourse.catalogue import examples, recorded
from tpcourse.submissions import build

pytestmark = [pytest.mark.nbgrader]

TORCH = [a.name for a in assignments.discover() if a.has_gpu]
ASSIGNMENT, OTHERS = TORCH[0], TORCH[1:]
cat = examples(ASSIGNMENT)
IN_GRADEBOOK = ["torch_reference", "torch_bias_every_rank"]
HOSTILE = [s.student for s in cat.RANK_ATTACKS]
# The wrong answers are graded by the hostile students that carry them (torch_local_shard,
# torch_plain_collectives, torch_allreduce_in_column...); every other wrong student of the
# catalogue is graded on forked ranks by the same worker and judge (test_catalogue.py), so
# torchrun launches are spent on what only they show.
FAULTS = [s.student for s in cat.FAULTS]
PG_TIMEOUT, WALL = 5, 180
FLAGS = ["--pg-timeout", str(PG_TIMEOUT), "--timeout", str(WALL), "--backend", "gloo"]


def _grade(root, students, *extra, assignment=ASSIGNMENT):
    cmd = [sys.executable, "-m", "gpu_runner.grade", assignment, "--course-root", str(root),
           *FLAGS, *extra]
    for s in students:
        cmd += ["--student", s]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def course(make_course):
    course = make_course("gpu_runner", TORCH, extra_config="")
    course.generate(ASSIGNMENT)
    for name in IN_GRADEBOOK:
        course.place_submission(name, ASSIGNMENT, build(cat.BY_NAME[name]))
    course.autograde(ASSIGNMENT)              # one nbgrader call; the others need no gradebook
    for name in HOSTILE + FAULTS:
        course.place_submission(name, ASSIGNMENT, build(cat.BY_NAME[name]))
    with_db = _grade(course.root, IN_GRADEBOOK)
    assert with_db.returncode == 0, with_db.stdout + with_db.stderr
    rest = _grade(course.root, HOSTILE + FAULTS, "--no-gradebook", "--no-timing")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    course.grader_output = (with_db.stdout, rest.stdout)
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


def test_the_reference_is_graded_first_and_once(course):
    first, second = course.grader_output
    assert "reference solution: full marks (" in first
    assert "reference solution: full marks (checked before" in second
    ref = json.loads((course.root / "gpu_reports" / ASSIGNMENT / ".reference" / "report.json")
                     .read_text())
    assert ref["score"] == ref["max_score"] and ref["world_sizes"] == [1, 2, 3, 4]
    assert ref["sandboxed"] and ref["untested"]         # gloo: what it cannot check is named


@pytest.mark.parametrize("student", ["torch_bias_every_rank"] + HOSTILE)
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
    ("torch_infinite_loop", "still running: it used more than"),
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


def _log(course, student):
    return "".join(p.read_text(errors="replace") for p in sorted(
        (course.root / "gpu_reports" / ASSIGNMENT / student / "runs").glob("launch*/torchrun.log")))


def test_attacks_on_the_ranks_verdicts_no_longer_work(course):
    """Each attack ran in the ranks (it says so in the job's log) and changed nothing: the
    verdicts are made in the grader, from data, with its own torch-free comparisons."""
    assert "ATTACK in place: torch.allclose is True" in _log(course, "torch_h_rebind_allclose")
    patched = _log(course, "torch_h_patch_harness")
    assert "ATTACK in place: patched" in patched and "gpu_runner.judge.judge" in patched
    assert "Recorder.write" in _log(course, "torch_h_forge_records")
    forged = [json.loads(line) for path in (course.root / "gpu_reports" / ASSIGNMENT /
                                            "torch_h_forge_records" / "runs").rglob("rank*.jsonl")
              for line in path.read_text().splitlines() if '"checks"' in line]
    assert forged and all(all(ok for ok, _ in row["checks"].values()) for row in forged)
    rep = _report(course, "torch_h_forge_records")
    assert not rep["checks"]["column.grad_input@2"]["ok"]      # the forged "passed" is ignored


def test_forged_counts_gain_the_counts_cell_and_nothing_else(course):
    """The counts are measured in the rank, so a rank can forge them: capping them hides the
    second all-reduce (gpu_collective_counts, which the same answer loses without the attack);
    the wrong bias still loses its cells, judged in the grader."""
    forged = _report(course, "torch_h_forge_counts")
    honest = recorded(ASSIGNMENT)["lost"]["torch_two_allreduces_mlp"]  # forked ranks
    assert "gpu_collective_counts" in honest
    assert _lost(forged) == set(cat.BY_NAME["torch_bias_every_rank"].loses)
    assert cat.FORGED_COUNTS_GAIN["torch_h_forge_counts"] == {"gpu_collective_counts"}
    assert "at most one" in _log(course, "torch_h_forge_counts")


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
        scores = course.scores(ASSIGNMENT, student)[ASSIGNMENT]
        for gid, cell in rep["cells"].items():
            assert scores[gid] == pytest.approx((cell["score"], cell["points"])), gid
    grades = {row["student_id"]: row for row in csv.DictReader(open(course.export()))}
    for student in IN_GRADEBOOK:
        scores = course.scores(ASSIGNMENT, student)[ASSIGNMENT]
        assert float(grades[student]["score"]) == pytest.approx(
            sum(s for s, _ in scores.values()), abs=1e-3)
        assert float(grades[student]["max_score"]) == pytest.approx(
            sum(m for _, m in scores.values()))
    ref, bias = (float(grades[s]["score"]) for s in IN_GRADEBOOK)
    lost = sum(c["points"] - c["score"] for c in _report(course, IN_GRADEBOOK[1])["cells"].values())
    assert lost > 0 and ref - bias >= lost - 1e-3        # the gpu points are in the total
    course.generate_feedback(ASSIGNMENT)
    html = course.feedback_html(ASSIGNMENT, "torch_bias_every_rank")[f"{ASSIGNMENT}.html"]
    assert "gpu_runner (gloo, world sizes 1, 2, 3, 4)" in html
    # every failed check with its diagnosis, the world size and the rank; no grader paths
    assert "row.forward (world sizes 2, 3, 4): rank 0 of 2: the output" in html
    assert "bias added on every rank before the all-reduce" in html
    assert "see the gpu_runner report" not in html and str(course.root) not in html



# -- every other torch assignment: its reference graded first, then its demo students ----------
# (their scores reaching the gradebook: test_torch_notebooks.py, with --load-reports; every
# student of every catalogue on forked ranks: test_catalogue.py)
@pytest.fixture(scope="module")
def others(course):
    """`python -m gpu_runner.grade NAME` (reports only) for each: the source's own solution
    first (it must get full marks), then the students its examples' DEMO names, one torchrun
    launch each."""
    reports = {}
    for name in OTHERS:
        by_name = {s.student: s for s in examples(name).ALL}
        for student in examples(name).DEMO:
            course.place_submission(student, name, build(by_name[student]))
        run = _grade(course.root, examples(name).DEMO, "--no-gradebook", "--no-timing",
                     "--step-timeout", "60",      # a timing unit takes seconds on a loaded box
                     assignment=name)
        assert run.returncode == 0, run.stdout + run.stderr
        reports[name] = course.root / "gpu_reports" / name
    return reports


@pytest.mark.parametrize("name", OTHERS)
def test_the_reference_gets_full_marks_in_the_sandbox_in_one_launch(others, name):
    ref = json.loads((others[name] / ".reference" / "report.json").read_text())
    assert ref["score"] == ref["max_score"] == sum(examples(name).GPU_CELLS.values())
    assert ref["world_sizes"] == [1, 2, 3, 4] and ref["sandboxed"] and ref["backend"] == "gloo"
    assert set(ref["cells"]) == set(examples(name).GPU_CELLS)
    assert len(ref["launches"]) == 1 and not ref["faults"]


@pytest.mark.parametrize("name, student", [(n, s) for n in OTHERS for s in examples(n).DEMO])
def test_a_demo_student_loses_exactly_its_cells_under_torchrun(others, name, student):
    rep = json.loads((others[name] / student / "report.json").read_text())
    sub = next(s for s in examples(name).ALL if s.student == student)
    assert _lost(rep) == set(sub.loses) & set(examples(name).GPU_CELLS), {
        g: c["comment"] for g, c in rep["cells"].items()}
    assert not rep["faults"] and len(rep["launches"]) == 1
