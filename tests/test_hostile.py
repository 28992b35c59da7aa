"""Hostile and broken submissions, graded together with ordinary students in one class run
(issue 4): each hostile student loses exactly the affected points with the reason in its
feedback, every other student gets the grade they get alone, and the batch completes.

The forgers (the assignment's FORGERS, tpcourse.forgery: in-process attacks on the checks, each
with a wrong answer) are in the same run, through the sandboxed judge: each loses exactly what its wrong
answer loses, and is flagged in the gradebook, the feedback and the class table."""
from __future__ import annotations

import contextlib
import socket

import pytest

from tpgrader.classgrade import ClassGrader
from tpgrader.classgrade.summary import table
from tpcourse.catalogue import recorded
from tpjudge import reach
from tpjudge.cells import read, reference_answers
from tpsandbox import problem
from tpcourse.submissions import build

import assignments
from tpcourse.catalogue import examples, students

# Exercised on the assignment whose examples hold the hostile students (their HOSTILE).
A = next(a for a in assignments.names() if getattr(examples(a), "HOSTILE", ()))
H = examples(A).hostile

pytestmark = [pytest.mark.nbgrader,
              pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")]

# 6 CPU seconds per cell (the limits count CPU time, so load does not eat into them): room for
# importing torch and starting two gloo ranks, and still a real timeout. The loops, the deaf
# loop (two timeouts) and the deadlock cost the batch a few multiples of it.
CONFIG = "from tpgrader import configure\nconfigure(c)\nc.Execute.timeout = 6\n"
ORDINARY = [s for s in students(A) if s.student in
            ("reference", "local_shard", "bias_every_rank", "alt_einsum")]
# In this (sandboxed, nbgrader) run: a planted module, a trace hook, a forged collective log.
# All forgers are judged in-process in test_judge_catalogue.
FORGERS = [f for f in examples(A).FORGERS if f.student in ("f_planted_module", "f_trace_hook",
                                                 "f_forged_log")]


@pytest.fixture(scope="module")
def batch(make_course):
    course = make_course("hostile", assignments=[A], extra_config=CONFIG)
    course.generate(A)
    for h in H.HOSTILE:
        course.place_submission(h.student, A, H.notebooks(h))
    for sub in ORDINARY:
        course.place_submission(sub.student, A, build(sub))
    reference = reference_answers(read(course.root / "source" / A / f"{A}.ipynb"))
    for f in FORGERS:
        course.place_submission(f.student, A, build(f.submission(reference)))
    with _listening_on_loopback(H.GRADER_PORT):   # what h_network must not reach
        outcomes = ClassGrader(course.root, A, progress=False).run()
    return course, {o.student: o for o in outcomes}


@contextlib.contextmanager
def _listening_on_loopback(port):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    try:
        yield
    finally:
        server.close()


def test_the_batch_completes_with_every_student_graded(batch):
    course, outcomes = batch
    assert len(H.HOSTILE) >= 15
    assert {s: o.status for s, o in outcomes.items()} == {s: "graded" for s in outcomes}
    assert (course.root / "grades.csv").read_text().count("\n") == len(outcomes) + 1


@pytest.mark.parametrize("hostile", H.HOSTILE, ids=lambda h: h.student)
def test_hostile_student_loses_the_affected_points_with_a_reason(batch, hostile):
    course, _ = batch
    [(nb, grades)] = course.scores(A, hostile.student).items()
    lose, keep = H.expected_losers(hostile, {g: m for g, (_, m) in grades.items()})
    lost = {g for g, (score, top) in grades.items() if score < top}
    assert lose <= lost, f"{hostile.why}: should lose {sorted(lose - lost)}"
    assert not (keep & lost), f"{hostile.why}: should keep {sorted(keep & lost)}"
    html = "".join(course.feedback_html(A, hostile.student).values())
    assert H.reason_found(hostile, html), f"no /{hostile.reason}/ in the feedback"


@pytest.mark.parametrize("sub", ORDINARY, ids=lambda s: s.student)
def test_ordinary_student_gets_the_grade_it_gets_alone(batch, sub):
    """The catalogue's expectations are what a stock `nbgrader autograde` gives each alone."""
    course, _ = batch
    [(nb, grades)] = course.scores(A, sub.student).items()
    lost = {g for g, (score, top) in grades.items() if score < top}
    assert lost == set(sub.loses)


def test_no_hostile_student_reached_the_gradebook_or_the_hidden_tests(batch):
    course, outcomes = batch
    from nbgrader.api import Gradebook
    with Gradebook(course.db_url) as gb:
        assert len(gb.find_assignment(A).submissions) == len(outcomes)
        for sub in gb.find_assignment(A).submissions:
            assert all((g.score or 0) <= g.max_score for nb in sub.notebooks for g in nb.grades)
    html = "".join(course.feedback_html(A, "h_read_source").values())
    assert html.count("blocked: [Errno 2]") == 2 and "BEGIN SOLUTION" not in html


@pytest.mark.parametrize("f", FORGERS, ids=lambda f: f.student)
def test_forger_loses_what_its_wrong_answer_loses_and_is_flagged(batch, f):
    course, outcomes = batch
    wrong_answer = set(recorded(A)["lost"][f"{f.student}_control"])   # test_catalogue.py
    [(nb, grades)] = course.scores(A, f.student).items()
    assert {g for g, (score, top) in grades.items() if score < top} == wrong_answer, f.why
    assert outcomes[f.student].flagged == [f.cell]
    html = "".join(course.feedback_html(A, f.student).values())
    assert reach.PREFIX in html


def test_only_the_forgers_and_the_reaching_hostile_students_are_flagged(batch):
    _, outcomes = batch
    flagged = {s for s, o in outcomes.items() if o.flagged}
    assert {f.student for f in FORGERS} <= flagged
    assert not flagged & {s.student for s in ORDINARY}
    assert flagged - {f.student for f in FORGERS} == {
        h.student for h in H.HOSTILE if reach.scan(h.attack)}
    # ... and the one that rewrote the test cells, for those cells (nbgrader restored them)
    changed = {s for s, o in outcomes.items() if o.changed_tests}
    assert changed == {h.student for h in H.HOSTILE if h.tamper}
    assert f"{len(flagged | changed)} flagged for review" in table(list(outcomes.values()))
