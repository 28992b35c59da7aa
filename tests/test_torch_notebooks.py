"""The torch notebooks (every torch assignment of the registry) through the real nbgrader cycle,
in one temporary course.

One course for the module: `nbgrader generate_assignment` of all of them, then one batched
`nbgrader autograde` of, per assignment, the instructor's solution, the unmodified release, two
catalogued students whose notebook tests fail and one forger (an in-process attack on the
checks). The in-notebook tests (run on 2 gloo ranks, judged in the grader) must give each the
test-cell grades its catalogue's table records (assignments/<name>/grades.json, graded by the
same judge in-process: test_catalogue.py), and leave the gpu_* task cells to the gpu_runner
(ungraded by autograde, worth their fixed points in the gradebook, where the gpu_runner's scores
land and `nbgrader export` counts them). What each mistake's message says is tested in-process
in the assignment's own tests.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.nbgrader

import assignments  # noqa: E402
from tpcourse import REPO  # noqa: E402
from tpcourse.catalogue import examples, gpu_report, recorded  # noqa: E402
from tpcourse.submissions import Submission, build, read  # noqa: E402
from tpjudge.cells import gpu_cells, graded_tests, reference_answers  # noqa: E402

TORCH = [a.name for a in assignments.discover() if a.has_gpu]
_SLOW = ("deadlock", "loop", "crash", "exit")     # faults: their timeouts are tested elsewhere


def _source(name):
    return read(assignments.get(name).notebook)


def _mistakes(name):
    """The first two catalogued students whose notebook tests fail (faults aside)."""
    lost = recorded(name)["lost"]
    return [s for s in examples(name).ALL
            if any(g.startswith("test_") for g in lost.get(s.student, ()))
            and not s.loses_all and not any(w in s.student for w in _SLOW)][:2]


def _students(name):
    forgers = getattr(examples(name), "FORGERS", ())
    return ([Submission("reference", name),
             Submission("unmodified", name, unanswered=frozenset({name}), loses_all=True)]
            + _mistakes(name) + [f.submission(reference_answers(_source(name)))
                                 for f in forgers[:1]])


CASES = [(name, sub) for name in TORCH for sub in _students(name)]


@pytest.fixture(scope="module")
def course(make_course):
    course = make_course("torch_notebooks", TORCH)
    course.generate("*")                        # every assignment, one nbgrader call
    for name, sub in CASES:
        course.place_submission(sub.student, name,
                                build(sub, course.root / "source", course.root / "release"))
    course.autograde("*")  # one batched call for every student of every assignment
    return course


def _scores(course, name, student):
    return course.scores(name, student)[name]


def _expected(name, sub):
    """The test cells `sub` must lose: all for the release, else what its table records."""
    tests = graded_tests(_source(name))
    if sub.loses_all:
        return set(tests)
    if sub.student == "reference":
        return set()
    return {g for g in recorded(name)["lost"][sub.student] if g in tests}


def test_every_torch_assignment_is_exercised_with_mistakes_and_a_forger():
    for name in TORCH:
        assert len(_mistakes(name)) == 2, name
    assert any(getattr(examples(n), "FORGERS", ()) for n in TORCH)


@pytest.mark.parametrize("name, sub", CASES, ids=lambda v: getattr(v, "student", v))
def test_autograde_gives_the_test_cells_the_catalogue_records(course, name, sub):
    got = _scores(course, name, sub.student)
    lost = {gid for gid, points in graded_tests(_source(name)).items() if got[gid][0] < points}
    assert lost == _expected(name, sub), sub.why


@pytest.mark.parametrize("name", TORCH)
def test_gpu_cells_are_left_to_the_gpu_runner(course, name):
    from nbgrader.api import Gradebook
    cells, tests = gpu_cells(_source(name)), graded_tests(_source(name))
    got = _scores(course, name, "reference")
    assert {gid: got[gid][1] for gid in cells} == cells
    with Gradebook(course.db_url) as gb:
        notebook = gb.find_notebook(name, name)
        assert {c.name: c.max_score for c in notebook.task_cells} == cells
        for gid in cells:
            grade = gb.find_grade(gid, name, name, "reference")
            assert grade.auto_score is None and grade.manual_score is None \
                and grade.needs_manual_grade
        total = gb.find_submission_notebook(name, name, "reference").max_score
        assert total == sum(tests.values()) + sum(cells.values())


def test_gpu_scores_land_in_the_gradebook(course):
    """The gpu_runner's report of a mistake (ranks forked here, world sizes 1 and 2) written into
    the gradebook by the grader's own command (--load-reports): its gpu_* cells get the report's
    scores and comments."""
    from nbgrader.api import Gradebook
    name, sub = next((n, s) for n, s in CASES if s in _mistakes(n) and s.loses)
    rep = gpu_report(sub, (1, 2), course.root / "forked")
    folder = course.root / "gpu_reports" / name / sub.student
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(rep))
    proc = subprocess.run([sys.executable, "-m", "gpu_runner.grade", name, "--load-reports",
                           "--student", sub.student, "--course-root", str(course.root)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = _scores(course, name, sub.student)
    cells = gpu_cells(_source(name))
    assert {gid: got[gid] for gid in cells} == {
        gid: (cell["score"], cell["points"]) for gid, cell in rep["cells"].items()}
    lost = sorted(g for g in sub.loses if g in cells)
    assert lost and got[lost[0]][0] < cells[lost[0]]
    with Gradebook(course.db_url) as gb:
        comment = gb.find_comment(lost[0], name, name, sub.student).manual_comment
    assert comment == rep["cells"][lost[0]]["comment"] and "Failed:" in comment


def test_gpu_scores_are_counted_by_the_export(course):
    """What `python -m gpu_runner.grade NAME` writes (gpu_runner.gradebook, by grade_id) is
    counted by `nbgrader export` with the notebook's tests."""
    from gpu_runner.gradebook import write_scores
    name = TORCH[-1]
    cells = gpu_cells(_source(name))
    write_scores(course.db_url, name, name, "reference",
                 {gid: (points, "gpu_runner: all checks passed") for gid, points in cells.items()})
    got = _scores(course, name, "reference")
    assert all(got[gid] == (p, p) for gid, p in cells.items())
    with open(course.export()) as f:
        rows = [r for r in csv.DictReader(f)
                if r["student_id"] == "reference" and r["assignment"] == name]
    total = sum(graded_tests(_source(name)).values()) + sum(cells.values())
    assert float(rows[0]["score"]) == pytest.approx(total) == float(rows[0]["max_score"])
