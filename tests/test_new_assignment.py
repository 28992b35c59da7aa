"""`make new-assignment NAME=...` (tpcourse.new_assignment): adding an assignment is adding a
folder and a notebook, shown end to end.

Fast: the scaffold refuses a bad or taken name with one line and writes nothing; the template
is no assignment of this course; scaffolded into a copy of the registry, it is found there.

Slow (one course for the module): in a temporary copy of the course (its git-tracked files),
the scaffold writes the new folder and notebook and nothing else; `nbgrader generate_assignment`
releases it; stock `nbgrader autograde` (the course's nbgrader_config.py: judge and sandbox)
gives the instructor's solution, submitted as a student's, full marks, and the gpu_runner (gloo,
CPU) its gpu_* cell; a student with one mistake (shards of in_features // num_ranks) loses the
hidden test and the gpu_* cell it breaks, and keeps the visible test.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import assignments
from tpcourse import REPO
from tpcourse.cycle import Course
from tpcourse.demo import gradebook_scores
from tpcourse.new_assignment import PLACEHOLDER, TEMPLATE, Refused, main, refusal, scaffold
from tpcourse.release import source_assignments
from tpcourse.submissions import Submission, build, grade_id, read

NAME = "hw_scaffolded"


# -- fast --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, says", [
    ("Bad-Name", "not a valid assignment name"), ("1st", "not a valid assignment name"),
    ("class", "not a valid assignment name"), ("", "not a valid assignment name"),
    (assignments.names()[0], "the course already has an assignment"),
])
def test_a_bad_or_taken_name_is_refused_in_one_line(name, says, capsys, tmp_path):
    assert says in refusal(name)
    before = sorted(p.relative_to(REPO) for p in (REPO / "assignments").iterdir())
    assert main([name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("new-assignment: ") and says in err and err.count("\n") == 1
    assert sorted(p.relative_to(REPO) for p in (REPO / "assignments").iterdir()) == before
    with pytest.raises(Refused):
        scaffold(name, tmp_path if name != assignments.names()[0] else REPO)
    assert not any(tmp_path.iterdir())


def test_the_template_is_no_assignment_of_this_course():
    assert not any(PLACEHOLDER in name for name in assignments.names())
    assert PLACEHOLDER not in source_assignments()
    assert (TEMPLATE / "source" / PLACEHOLDER / f"{PLACEHOLDER}.ipynb").is_file()


def test_the_scaffold_is_found_by_the_registry_in_a_copy(tmp_path):
    """Into a copy of the registry holding one assignment: the new folder is discovered after it
    (the next ORDER), as a torch assignment with its parts; the make target calls the module."""
    (tmp_path / "assignments" / "hw1").mkdir(parents=True)
    (tmp_path / "assignments" / "__init__.py").write_text((assignments.HERE / "__init__.py")
                                                          .read_text())
    (tmp_path / "assignments" / "hw1" / "__init__.py").write_text(
        'ORDER = 4\nTITLE = "x"\nKIND = "numpy"\n')
    written = scaffold(NAME, tmp_path)
    assert tmp_path / "source" / NAME / f"{NAME}.ipynb" in written
    assert not [p for p in written if PLACEHOLDER in p.read_text() + str(p)]
    code = ("import assignments as r; a = r.get(%r); "
            "print(r.names(), a.order, a.kind, a.has_gpu, a.notebook.is_file())" % NAME)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["['hw1',", f"'{NAME}']", "5", "torch", "True", "True"]
    with pytest.raises(Refused, match="already has"):
        scaffold(NAME, tmp_path)
    dry = subprocess.run(["make", "-n", "new-assignment", f"NAME={NAME}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert f"-m tpcourse.new_assignment {NAME}" in dry


# -- slow: the whole cycle in a copy of the course ----------------------------------------------
def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class CopiedCourse(Course):
    """A course whose root is a copy of the checkout: its commands import the copy's packages
    (PYTHONPATH), where the new assignment is."""

    def env(self) -> dict:
        return {**super().env(), "PYTHONPATH": str(self.root)}


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    copy = tmp_path_factory.mktemp("new-assignment") / "course"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            (copy / rel).write_bytes((REPO / rel).read_bytes())
    before = _digests(copy)
    made = subprocess.run([sys.executable, "-m", "tpcourse.new_assignment", NAME], cwd=copy,
                          capture_output=True, text=True,      # no __pycache__: only its files
                          env={"PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"})
    assert made.returncode == 0, made.stderr
    after = _digests(copy)

    course = CopiedCourse(copy, copy / "exchange")
    # The copy is not the installed (editable) package the sandbox shows student code; a real
    # course adds its folder inside that one. Show the copy's assignments/ (read-only) instead.
    with open(copy / "nbgrader_config.py", "a") as config:
        config.write(f"\nc.Execute.timeout = 10\n"
                     f"c.Sandbox.readonly_paths = [{str(copy / 'assignments')!r}]\n")
    course.generate(NAME)
    students = {"reference": Submission("reference", NAME),
                "even_split": _example(copy, "even_split")}
    for student, sub in students.items():
        course.place_submission(student, NAME, build(sub, copy / "source", copy / "release"))
    course.autograde(NAME)
    gpu = subprocess.run([sys.executable, "-m", "gpu_runner.grade", NAME, "--course-root",
                          str(copy), "--backend", "gloo", "--pg-timeout", "5", "--no-timing"],
                         cwd=copy, capture_output=True, text=True, env=course.env(),
                         timeout=900)
    assert gpu.returncode == 0, gpu.stdout[-3000:] + gpu.stderr[-3000:]
    return {"copy": copy, "before": before, "after": after, "scaffold": made.stdout,
            "scores": gradebook_scores(course, NAME), "gpu": gpu.stdout}


def _example(copy: Path, student: str) -> Submission:
    """The scaffolded assignment's example student (its examples.py, read from the copy)."""
    code = (f"import json; from assignments.{NAME}.examples import BY_NAME; s = BY_NAME[{student!r}];"
            f" print(json.dumps([s.answers, sorted(s.loses)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(copy)}).stdout
    answers, loses = json.loads(out)
    return Submission(student, NAME, answers, frozenset(loses))


@pytest.mark.slow
@pytest.mark.nbgrader
def test_only_the_new_folder_and_notebook_appear(cycle):
    before, after = cycle["before"], cycle["after"]
    assert {k: v for k, v in after.items() if k in before} == before   # nothing changed
    added = sorted(set(after) - set(before))
    template = sorted(str(p.relative_to(TEMPLATE)).replace(PLACEHOLDER, NAME)
                      for p in TEMPLATE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert added == template
    notebook = f"source/{NAME}/{NAME}.ipynb"
    assert notebook in added
    assert all(a.startswith(f"assignments/{NAME}/") for a in added if a != notebook)


@pytest.mark.slow
@pytest.mark.nbgrader
def test_the_release_holds_no_solution_and_no_hidden_test(cycle):
    """(The self-check cell lists the hidden tests' calls: the course's c.SelfCheck.hidden_tests
    policy, README "Self-check cells".)"""
    release = read(cycle["copy"] / "release" / NAME / f"{NAME}.ipynb")
    cells = {grade_id(c): c.source for c in release.cells if grade_id(c)}
    assert "check.row_matmul_small(row_matmul)" in cells["test_row_matmul_small"]
    assert "row_matmul_uneven" not in cells["test_row_matmul_uneven"]
    text = "".join(c.source for c in release.cells)
    for secret in ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS", "np.array_split(np.arange(W.shape[1])",
                   "dist.all_reduce(y, group=self.group)"):
        assert secret not in text, secret


@pytest.mark.slow
@pytest.mark.nbgrader
def test_the_instructors_solution_gets_full_marks_from_autograde_and_the_gpu_runner(cycle):
    grades = cycle["scores"]["reference"]
    assert set(grades) == {"test_row_matmul_small", "test_row_matmul_uneven",
                           "gpu_matmul_forward"}
    assert all(score == points for score, points in grades.values()), grades
    assert "reference solution: full marks" in cycle["gpu"]


@pytest.mark.slow
@pytest.mark.nbgrader
def test_a_mistake_loses_the_hidden_test_and_the_gpu_cell_it_breaks(cycle):
    grades = cycle["scores"]["even_split"]
    lost = {gid for gid, (score, points) in grades.items() if score < points}
    assert lost == {"test_row_matmul_uneven", "gpu_matmul_forward"}, grades
    assert grades["test_row_matmul_small"] == (1.0, 1.0)      # the visible test passes
    report = json.loads((cycle["copy"] / "gpu_reports" / NAME / "even_split" / "report.json")
                        .read_text())
    assert report["checks"]["matmul.forward@1"]["ok"]
    assert not report["checks"]["matmul.forward@3"]["ok"]
