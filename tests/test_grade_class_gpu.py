"""grade_class's gpu stage: `ClassGrader` on a torch assignment hands the gpu_* task cells to the
gpu_runner (sandboxed torchrun jobs on CPU/gloo ranks), the scores land in the gradebook and
the export, and a rerun skips the students whose submission did not change -- SLOW (three
class runs, three torchrun launches, about two minutes). Then the same class graded by the
shipped Slurm files on a one-node test cluster gets the same gradebook (about a minute more).

The course grades world sizes 1 and 2 only (c.GpuRunner.world_sizes in its nbgrader_config.py),
and the runner gets its other flags from GPU_RUNNER_FLAGS (grade_class passes none): no timing,
to keep the launches short. The reference solution is graded by the first runner call only.
"""
from __future__ import annotations

import csv
import json
import sys

import pytest

from gpu_runner.grade import FLAGS_ENV
from tpgrader.classgrade import ClassGrader
import assignments
from tpcourse import REPO
from tpcourse.catalogue import examples
from tpsandbox import problem
from tpcourse.submissions import build

pytestmark = [pytest.mark.nbgrader,
              pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")]

# Exercised on the course's first torch assignment (the registry's).
A = next(a.name for a in assignments.discover() if a.has_gpu)
cat = examples(A)
REF, WRONG = "torch_reference", "torch_local_shard"
RUNNER_FLAGS = "--no-timing --pg-timeout 10 --timeout 300"
GPU_TOTAL = sum(cat.GPU_CELLS.values())


def _report_times(course):
    return {s: (course.root / "gpu_reports" / A / s / "report.json").stat().st_mtime_ns
            for s in (REF, WRONG)}


def _csv(course):
    with open(course.root / "grades.csv") as f:
        return {row["student_id"]: row for row in csv.DictReader(f) if row["assignment"] == A}


def _run(course):
    outcomes = ClassGrader(course.root, A, progress=False, feedback=False).run()
    return {o.student: o for o in outcomes}


@pytest.fixture(scope="module")
def handed_in(make_course, tmp_path_factory):
    """Two submissions, in the course graded on one machine and in an identical copy."""
    course = make_course("class_gpu", [A], extra_config="c.GpuRunner.world_sizes = [1, 2]\n")
    course.generate(A)
    for name in (REF, WRONG):
        course.place_submission(name, A, build(cat.BY_NAME[name]))
    return course, course.copy(tmp_path_factory.mktemp("class_gpu_slurm") / "course")


@pytest.fixture(scope="module")
def runs(handed_in):
    course, _ = handed_in
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FLAGS_ENV, RUNNER_FLAGS)
        first = _run(course)
        state = {"first": (first, {s: course.scores(A, s) for s in first}, _csv(course),
                           _report_times(course))}
        second = _run(course)
        state["second"] = (second, None, None, _report_times(course))
        # the wrong student fixes the bug and hands in again
        course.place_submission(WRONG, A, build(cat.BY_NAME[REF]))
        third = _run(course)
        state["third"] = (third, {s: course.scores(A, s) for s in third}, _csv(course),
                          _report_times(course))
    return course, state


def _gpu(scores):
    return {gid: sc for gid, sc in scores[A].items() if gid.startswith("gpu_")}


def test_gpu_cells_are_scored_in_the_gradebook(runs):
    _, state = runs
    outcomes, scores, _, _ = state["first"]
    assert {s: o.status for s, o in outcomes.items()} == {REF: "graded", WRONG: "graded"}, \
        {s: o.error for s, o in outcomes.items()}
    ref = _gpu(scores[REF])
    assert set(ref) == set(cat.GPU_CELLS)
    assert ref == {gid: (float(p), float(p)) for gid, p in cat.GPU_CELLS.items()}
    wrong = _gpu(scores[WRONG])
    lost = {gid for gid, (score, points) in wrong.items() if score < points}
    assert lost == set(cat.BY_NAME[WRONG].loses)
    assert all(score == points for gid, (score, points) in wrong.items() if gid not in lost)
    # the outcome carries them too
    assert _gpu(outcomes[REF].scores) == ref


def test_the_jobs_ran_in_the_sandbox(runs):
    course, _ = runs
    for student in (REF, WRONG):
        report = json.loads((course.root / "gpu_reports" / A / student / "report.json").read_text())
        assert report["sandboxed"] and report["world_sizes"] == [1, 2], student


def test_export_includes_the_gpu_points(runs):
    _, state = runs
    _, scores, grades, _ = state["first"]
    for student in (REF, WRONG):
        total = sum(score for score, _ in scores[student][A].values())
        assert float(grades[student]["score"]) == pytest.approx(total, abs=1e-3)
        assert float(grades[student]["max_score"]) == pytest.approx(
            sum(points for _, points in scores[student][A].values()))
    # full marks for the reference only because the gpu cells were scored
    assert float(grades[REF]["score"]) == pytest.approx(float(grades[REF]["max_score"]))
    gpu_lost = sum(points - score for score, points in _gpu(scores[WRONG]).values())
    assert gpu_lost > 0
    assert float(grades[REF]["score"]) - float(grades[WRONG]["score"]) >= gpu_lost - 1e-3


def test_rerun_skips_the_gpu_stage_for_unchanged_students(runs):
    _, state = runs
    outcomes, _, _, times = state["second"]
    assert {s: o.status for s, o in outcomes.items()} == {REF: "unchanged", WRONG: "unchanged"}
    assert times == state["first"][3]               # no launch, no new report


def test_changed_submission_is_graded_again_on_ranks(runs):
    _, state = runs
    outcomes, scores, grades, times = state["third"]
    assert {s: o.status for s, o in outcomes.items()} == {REF: "unchanged", WRONG: "graded"}
    assert times[REF] == state["first"][3][REF]
    assert times[WRONG] != state["first"][3][WRONG]
    assert _gpu(scores[WRONG]) == {gid: (float(p), float(p)) for gid, p in cat.GPU_CELLS.items()}
    assert float(grades[WRONG]["score"]) == pytest.approx(float(grades[WRONG]["max_score"]))


# -- the same class on Slurm: the shipped sbatch files, as they are --------------------------

SLURM = REPO / "gpu_runner" / "slurm"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from slurm_cluster import Cluster, SlurmUnavailable
    try:
        cluster = Cluster(tmp_path_factory.mktemp("slurm"))
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(str(err))
    yield cluster
    cluster.stop()


def test_slurm_arrays_then_one_merge_give_the_one_machine_gradebook(runs, handed_in, cluster):
    """autograde_array.sbatch and grade_array.sbatch as arrays of 2 tasks (each a shard of the
    class), then finish.sbatch (merge, --load-reports, feedback, export) once both are done:
    every score and the export equal the single-machine grade_class run's."""
    _, state = runs
    _, course = handed_in
    _, scores, grades, _ = state["first"]
    jobs = cluster.base / "jobs"
    jobs.mkdir()
    env = {"COURSE_ROOT": str(course.root), "ASSIGNMENT": A, "PYTHON": sys.executable,
           FLAGS_ENV: RUNNER_FLAGS}
    auto = cluster.sbatch(SLURM / "autograde_array.sbatch", "--array=0-1", cwd=jobs, env=env)
    gpu = cluster.sbatch(SLURM / "grade_array.sbatch", "--array=0-1", cwd=jobs, env=env)
    finish = cluster.sbatch(SLURM / "finish.sbatch", f"--dependency=afterany:{auto}:{gpu}",
                            cwd=jobs, env=env)
    states = {name: cluster.wait(job, 600) for name, job in
              (("autograde", auto), ("gpu", gpu), ("finish", finish))}
    logs = "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted(jobs.glob("*.log")))
    assert states == {"autograde": {"0": "COMPLETED 0:0", "1": "COMPLETED 0:0"},
                      "gpu": {"0": "COMPLETED 0:0", "1": "COMPLETED 0:0"},
                      "finish": {finish: "COMPLETED 0:0"}}, logs
    shards = course.root / ".grade_class" / "shards" / A
    assert {p.name: [s.name for s in (p / "autograded").iterdir()] for p in shards.iterdir()} \
        == {"0-of-2": [WRONG], "1-of-2": [REF]}      # one each: sorted ids, I, I+2, ...
    assert {s: course.scores(A, s) for s in (REF, WRONG)} == scores
    assert _csv(course) == grades
    for s in (REF, WRONG):
        assert course.feedback_html(A, s), s
