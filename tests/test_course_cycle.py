"""The real nbgrader cycle on the numpy assignments (the registry's), in one temporary course for
the module.

generate_assignment, then per assignment the reference, the unmodified release, the first two
catalogued mistakes, the first valid alternative, and the looping and crashing students, in ONE
`nbgrader autograde` call (sandboxed, judged), then generate_feedback and export. The first
reference student goes through the real exchange (release, fetch, submit, collect); the rest
are placed where `collect` puts them. Every other catalogued student is graded by the same
judge in-process (tests/test_catalogue.py): what only nbgrader can show is shown here.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re

import nbformat

import pytest

import assignments
from tpcourse.catalogue import as_list, examples, is_looping
from tpcourse.demo import failed, gradebook_scores
from tpcourse.submissions import build, grade_id, is_solution, read
from tpjudge.cells import is_self_check

ASSIGNMENTS = [a.name for a in assignments.discover() if a.kind == "numpy"]
REFERENCE, UNMODIFIED, CATALOGUE = ([s for a in ASSIGNMENTS for s in as_list(getattr(examples(a),
                                                                                      group))]
                                    for group in ("REFERENCE", "UNMODIFIED", "STUDENTS"))


def _representatives(students):
    """Per assignment: the first two mistakes and the first valid alternative; every fault."""
    picked = []
    for assignment in ASSIGNMENTS:
        mine = [s for s in students if s.assignment == assignment]
        wrong = [s for s in mine if (s.loses or s.loses_all) and not is_fault(s)]
        picked += wrong[:2] + [s for s in mine if not (s.loses or s.loses_all)][:1]
    return picked + [s for s in students if is_fault(s)]


def is_fault(sub):
    return bool(sub.loses or sub.loses_all) and (is_looping(sub) or "crash" in sub.student)


STUDENTS = _representatives(CATALOGUE)
WRONG = [s for s in STUDENTS if s.loses or s.loses_all]
VALID = [s for s in STUDENTS if not (s.loses or s.loses_all)]
LOOPING = [s for s in WRONG if is_looping(s)]

pytestmark = pytest.mark.nbgrader


def _id(sub):
    return f"{sub.assignment}-{sub.student}"


@contextlib.contextmanager
def _home(folder):
    """A user's home (and so Jupyter's data dir, nbgrader's default cache) in `folder`."""
    saved = dict(os.environ)
    os.environ["HOME"] = str(folder)
    for key in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "JUPYTER_DATA_DIR"):
        os.environ.pop(key, None)
    try:
        yield folder
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def graded(make_course, tmp_path_factory):
    """The course after the full cycle: {'course', 'scores': {(assignment, student): grades},
    'tests': {assignment: {test grade_id: points}}, 'csv': rows of `nbgrader export`,
    'home': the home the exchange steps ran with}."""
    course = make_course("cycle", assignments=list(ASSIGNMENTS))
    everyone = REFERENCE + UNMODIFIED + STUDENTS
    keys = [(s.assignment, s.student) for s in everyone]
    assert len(set(keys)) == len(keys), "two catalogue entries share an (assignment, student)"
    # nbgrader's start-up dominates small commands: one call per step for both assignments
    # ("*" is nbgrader's own assignment glob); only the exchange steps go one by one.
    with _home(tmp_path_factory.mktemp("home")) as home:   # the user's home stays untouched
        course.generate("*")
        source, release = course.root / "source", course.root / "release"
        via_exchange = REFERENCE[0]
        course.release(via_exchange.assignment)
        course.submit_as(via_exchange.student, via_exchange.assignment,
                         build(via_exchange, source, release))
        course.collect(via_exchange.assignment)
        for sub in everyone:
            if sub != via_exchange:
                course.place_submission(sub.student, sub.assignment, build(sub, source, release))
        course.autograde("*")  # every student of every assignment in one call
        course.generate_feedback("*")
    scores, tests = {}, {}
    for assignment in ASSIGNMENTS:
        for student, grades in gradebook_scores(course, assignment).items():
            scores[assignment, student] = grades
        tests[assignment] = _test_cells(source / assignment)
    with open(course.export()) as f:
        rows = list(csv.DictReader(f))
    return {"course": course, "scores": scores, "tests": tests, "csv": rows, "home": home}


def _test_cells(folder):
    """{grade_id: points} of the autograded test cells in an assignment's source notebooks."""
    cells = {}
    for path in sorted(folder.glob("*.ipynb")):
        for cell in read(path).cells:
            meta = cell.get("metadata", {}).get("nbgrader", {})
            if meta.get("grade") and not is_solution(cell) and cell.cell_type == "code":
                cells[grade_id(cell)] = float(meta["points"])
    return cells


def _grades(graded, sub):
    key = (sub.assignment, sub.student)
    assert key in graded["scores"], f"{sub.student} was not graded for {sub.assignment}"
    grades = graded["scores"][key]
    missing = set(graded["tests"][sub.assignment]) - set(grades)
    assert not missing, f"{sub.student}: no grade recorded for {sorted(missing)}"
    return grades


def test_catalogue_is_complete():
    assert {s.assignment for s in REFERENCE} == set(ASSIGNMENTS)
    assert {s.assignment for s in UNMODIFIED} == set(ASSIGNMENTS)
    assert len([s for s in CATALOGUE if s.loses or s.loses_all]) >= 12
    assert {s.assignment for s in VALID} == set(ASSIGNMENTS) and LOOPING
    assert {s.assignment for s in WRONG} == set(ASSIGNMENTS) and len(WRONG) >= 2 * len(ASSIGNMENTS)


@pytest.mark.parametrize("sub", REFERENCE, ids=_id)
def test_reference_solution_gets_full_marks(graded, sub):
    grades = _grades(graded, sub)
    assert not failed(grades), f"reference loses points on {failed(grades)}"
    assert sum(top for _, top in grades.values()) > 0


@pytest.mark.parametrize("sub", UNMODIFIED, ids=_id)
def test_unmodified_release_scores_zero(graded, sub):
    grades = _grades(graded, sub)
    scored = {gid: s for gid, (s, _) in grades.items() if s != 0}
    assert not scored, f"the unmodified release scores points on {scored}"


@pytest.mark.parametrize("sub", WRONG, ids=_id)
def test_mistake_loses_points_exactly_where_named(graded, sub):
    grades = _grades(graded, sub)
    tests = graded["tests"][sub.assignment]
    unknown = set(sub.loses) - set(tests)
    assert not unknown, f"catalogue names grade_ids that are not test cells: {sorted(unknown)}"
    lost = set(failed(grades))
    if sub.loses_all:
        assert lost >= set(tests), f"kept full marks on {sorted(set(tests) - lost)} ({sub.why})"
    else:
        assert lost == set(sub.loses), (
            f"{sub.student} ({sub.why}): expected to lose {sorted(sub.loses)}, lost {sorted(lost)}")


@pytest.mark.parametrize("sub", VALID, ids=_id)
def test_valid_alternative_gets_full_marks(graded, sub):
    grades = _grades(graded, sub)
    assert not failed(grades), f"{sub.student} ({sub.why}) loses points on {failed(grades)}"


@pytest.mark.parametrize("sub", LOOPING, ids=_id)
def test_infinite_loop_times_out_and_scores_zero_there(graded, sub):
    grades = _grades(graded, sub)
    assert sub.loses, "the looping entry should name the tests its loop affects"
    assert all(grades[gid][0] == 0 for gid in sub.loses), {g: grades[g] for g in sub.loses}
    # The timeout is nbgrader's own (the cell gets a CellTimeoutError), and nobody else's
    # notebook ran into it.
    timed_out = {s: _timed_out_cells(graded["course"], assignment, s)
                 for assignment, s in graded["scores"] if assignment == sub.assignment}
    assert timed_out.pop(sub.student), "no cell of the looping notebook timed out"
    assert not any(timed_out.values()), {s: c for s, c in timed_out.items() if c}
    # Everyone else in the same autograde call was graded (the other tests check their marks).
    others = [k for k in graded["scores"] if k[0] == sub.assignment and k[1] != sub.student]
    assert len(others) == sum(1 for s in REFERENCE + UNMODIFIED + STUDENTS
                              if s.assignment == sub.assignment) - 1


def _timed_out_cells(course, assignment, student):
    cells = []
    for path in (course.root / "autograded" / student / assignment).glob("*.ipynb"):
        for cell in read(path).cells:
            if any(o.get("ename") == "CellTimeoutError" for o in cell.get("outputs", [])):
                cells.append(grade_id(cell))
    return cells


@pytest.mark.parametrize("sub", [s for s in WRONG if not s.loses_all][:1] + REFERENCE[:1], ids=_id)
def test_feedback_html_names_each_test_and_its_score(graded, sub):
    pages = graded["course"].feedback_html(sub.assignment, sub.student)
    assert pages, f"no feedback HTML for {sub.student}"
    html = "".join(pages.values())
    shown = {gid: (float(s), float(m)) for gid, s, m in re.findall(
        r"Grade cell: <code>(\w+)</code>\s*</span>\s*<span class=\"pull-right\">\s*Score: ([\d.]+) / ([\d.]+)",
        html)}
    grades = _grades(graded, sub)
    for gid in graded["tests"][sub.assignment]:
        assert gid in shown, f"feedback does not show test {gid}"
        assert shown[gid] == grades[gid]
    for gid in sub.loses:  # the failed tests are named with their lost points
        assert shown[gid][0] < shown[gid][1]
    # The summary at the top names every check (not "Test cell") and gives each failed one's
    # explanation: the verdict the judge wrote, whole.
    summary = html[:html.index('id="notebook"')]
    assert ">Test cell<" not in summary
    assert all(f"<code>{gid}</code>" in summary for gid in graded["tests"][sub.assignment])
    explained = dict(re.findall(r'data-grade-id="(\w+)">.*?<div class="tp-explanation">(.*?)</div>',
                                summary, re.S))
    assert set(explained) == set(sub.loses)
    for gid, text in explained.items():
        assert _unescape(text) == _verdict(graded["course"], sub, gid)


def _unescape(text):
    import html
    return html.unescape(text).strip()


def _verdict(course, sub, gid):
    path = next((course.root / "autograded" / sub.student / sub.assignment).glob("*.ipynb"))
    [cell] = [c for c in read(path).cells if grade_id(c) == gid]
    return "\n".join(f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error")


def test_the_cycle_writes_nothing_outside_the_course(graded):
    """The cycle (generate, release, fetch, submit, collect, autograde, feedback: what the demo
    runs) ran with a home of its own, and left it empty: nbgrader's cache (by default in the
    user's Jupyter data dir, where example students would pile up in a real user's Assignments
    tab) is in the course root, with Jupyter's, IPython's and matplotlib's per-user folders."""
    assert [p for p in graded["home"].rglob("*")] == []
    student = graded["course"].student_home(REFERENCE[0].student)
    assert any((student / ".nbgrader_cache").rglob("*"))


def test_grading_never_runs_the_self_check_cells(graded):
    course = graded["course"]
    for sub in REFERENCE:
        path = course.root / "autograded" / sub.student / sub.assignment / f"{sub.assignment}.ipynb"
        cells = [c for c in read(path).cells if is_self_check(c)]
        assert cells and all(not c.outputs for c in cells), sub.assignment


def test_export_has_a_row_per_submission_with_its_total(graded):
    rows = {(r["assignment"], r["student_id"]): r for r in graded["csv"]}
    for (assignment, student), grades in graded["scores"].items():
        row = rows[assignment, student]
        assert float(row["raw_score"]) == pytest.approx(sum(s for s, _ in grades.values()))
        assert float(row["max_score"]) == pytest.approx(sum(m for _, m in grades.values()))
        assert float(row["max_score"]) >= sum(graded["tests"][assignment].values())


def test_nbgrader_validate_still_runs_the_visible_tests_in_the_students_kernel(graded, tmp_path):
    """The judge changes grading only: a student's own Validate runs the visible checks in
    their notebook, with the checks' messages."""
    course = graded["course"]
    source, release = course.root / "source", course.root / "release"
    said = {}
    for sub in (REFERENCE[0], next(s for s in WRONG if s.student == "local_shard")):
        folder = tmp_path / sub.student
        folder.mkdir()
        [(name, nb)] = [(n, nb) for n, nb in build(sub, source, release).items()]
        nbformat.write(nb, str(folder / name))
        proc = course.nbgrader("validate", folder / name, cwd=folder, check=False)
        said[sub.student] = proc.stdout + proc.stderr
    assert "Success! Your notebook passes all the tests." in said[REFERENCE[0].student]
    assert "VALIDATION FAILED" in said["local_shard"]
    # (Validate cuts long lines at nbgrader's Validator.width, 90 columns)
    assert "CheckFailed: column_parallel(x (3, 4), W (6, 4), num_ranks=2): expected shape" in \
        said["local_shard"]
