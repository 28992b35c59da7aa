"""`python -m tpcourse.grade_class`: a whole class graded in parallel with one gradebook
writer gets exactly the grades of a sequential stock `nbgrader autograde` (sqlite and
Postgres), skips what is unchanged, regrades what changed, and exits non-zero only when the
grader itself fails (issue 4)."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest

from tpgrader.classgrade import ClassGrader, GraderError
from tpsandbox import problem
from tpcourse.submissions import Submission, build

pytestmark = [pytest.mark.nbgrader,
              pytest.mark.skipif(problem() != "", reason=problem() or "sandbox available")]

import assignments
from tpcourse.catalogue import examples, students

# Exercised on the assignment whose examples hold the hostile students (their HOSTILE).
A = next(a for a in assignments.names() if getattr(examples(a), "HOSTILE", ()))
CONFIG = "from tpgrader import configure\nconfigure(c)\nc.Execute.timeout = 15\n"
CLASS = [s for s in students(A) if s.student in
         ("reference", "unmodified", "np_split", "bias_in_partial", "column_all_reduce",
          "alt_loops")]
STAMP = "2026-11-20 10:00:00.000000 UTC"


def _fill(course, subs):
    course.generate(A)
    for sub in subs:
        course.place_submission(sub.student, A, build(sub), timestamp=STAMP)


def _all_scores(course, students):
    return {s: course.scores(A, s) for s in students}


def _csv(path):
    with open(path) as f:
        return sorted(tuple(row.items()) for row in csv.DictReader(f))


@pytest.fixture(scope="module")
def filled(make_course, tmp_path_factory):
    """The class handed in to three identical courses, none graded yet."""
    ours = make_course("class_parallel", assignments=[A], extra_config=CONFIG)
    stock = make_course("class_stock", assignments=[A], extra_config=CONFIG)
    _fill(ours, CLASS)
    _fill(stock, CLASS)
    return ours, stock, ours.copy(tmp_path_factory.mktemp("class_shards") / "course")


@pytest.fixture(scope="module")
def graded(filled):
    """The same class graded twice: by grade_class (2 workers) and by stock nbgrader."""
    ours, stock, _ = filled
    outcomes = ClassGrader(ours.root, A, workers=2, progress=False).run()
    stock.nbgrader("autograde", A)   # sequential, one notebook at a time
    stock.export()
    return ours, stock, outcomes


def test_grades_identical_to_sequential_stock_autograde(graded):
    ours, stock, outcomes = graded
    students = [s.student for s in CLASS]
    assert [o.student for o in outcomes] == sorted(students)
    assert all(o.status == "graded" for o in outcomes)
    assert _all_scores(ours, students) == _all_scores(stock, students)
    assert _csv(ours.root / "grades.csv") == _csv(stock.root / "grades.csv")


def test_each_student_loses_exactly_its_mistakes(graded):
    ours, _, _ = graded
    for sub in CLASS:
        [(_, grades)] = ours.scores(A, sub.student).items()
        lost = {g for g, (score, top) in grades.items() if score < top}
        assert lost == (set(grades) if sub.unanswered else set(sub.loses)), sub.student


def test_feedback_written_for_every_student(graded):
    ours, _, _ = graded
    for sub in CLASS:
        assert ours.feedback_html(A, sub.student), sub.student


def _cli(course, *args):
    return subprocess.run([sys.executable, "-m", "tpcourse.grade_class", A, "--no-progress",
                           f"--root={course.root}", *args], capture_output=True, text=True,
                          timeout=900)


def test_rerun_skips_unchanged_and_regrades_changed(graded):
    ours, _, _ = graded
    before = _all_scores(ours, [s.student for s in CLASS])
    proc = _cli(ours)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 graded, 6 unchanged" in proc.stdout
    # np_split hands in a corrected notebook: only it is regraded, now with full marks
    ours.place_submission("np_split", A, build(Submission("np_split", A)),
                          timestamp="2026-11-21 10:00:00.000000 UTC")
    proc = _cli(ours)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 graded, 5 unchanged" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("np_split "))
    assert line.split()[1:6] == ["graded", "27", "/", "27", "0"], line
    after = _all_scores(ours, [s.student for s in CLASS])
    assert all(after[s] == before[s] for s in before if s != "np_split")
    [(_, grades)] = after["np_split"].items()
    assert all(score == top for score, top in grades.values())


def test_exit_status_two_when_the_grader_cannot_run(graded):
    ours, _, _ = graded
    proc = _cli(ours, "--student=nobody")
    assert proc.returncode == 2 and "no submission" in proc.stderr
    cfg = ours.root / "nbgrader_config.py"
    original = cfg.read_text()
    try:
        cfg.write_text(original + "\nc.Sandbox.bwrap = '/nonexistent/bwrap'\n")
        proc = _cli(ours)
        assert proc.returncode == 2 and "c.Sandbox.enabled = False" in proc.stderr
    finally:
        cfg.write_text(original)


# -- Postgres as the gradebook, through nbgrader's db_url ----------------------------------

def _pg_bin(name):
    found = shutil.which(name)
    if found:
        return found
    for version in ("17", "16", "15", "14", "13"):
        path = f"/usr/lib/postgresql/{version}/bin/{name}"
        if os.path.exists(path):
            return path
    return None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway cluster on a unix socket, run as an unprivileged user."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl and os.path.exists(os.path.realpath(initdb))):
        pytest.skip("PostgreSQL server binaries not installed (.ci/setup-system.sh)")
    import pwd
    import tempfile
    from pathlib import Path
    base = Path(tempfile.mkdtemp(prefix="tp-pg-"))   # not under pytest's root-only 0700 tmp
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    user = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        nobody = pwd.getpwnam("nobody")
        user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        for path in (base, sock):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    subprocess.run(user + [initdb, "-D", str(data), "-U", "grader", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(user + [pg_ctl, "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                           f"-k {sock} -c listen_addresses='' -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        import psycopg2
        con = psycopg2.connect(dbname="postgres", user="grader", host=str(sock))
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE gradebook")
        con.close()
        yield f"postgresql+psycopg2://grader@/gradebook?host={sock}"
    finally:
        subprocess.run(user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_gradebook_gives_the_same_grades(graded, postgres, make_course):
    _, stock, _ = graded
    subs = [s for s in CLASS if s.student in ("reference", "np_split", "bias_in_partial")]
    pg = make_course("class_pg", assignments=[A],
                     extra_config=CONFIG + f"c.CourseDirectory.db_url = {postgres!r}\n")
    _fill(pg, subs)
    outcomes = ClassGrader(pg.root, A, workers=2, progress=False).run()
    assert [o.status for o in outcomes] == ["graded"] * 3
    from nbgrader.api import Gradebook
    with Gradebook(postgres, "tp101") as gb:
        got = {s.student: {nb.name: {g.name: (float(g.score), float(g.max_score))
                                     for g in nb.grades} for nb in gb.find_submission(A, s.student).notebooks}
               for s in subs}
    assert got == {s.student: stock.scores(A, s.student) for s in subs}
    assert not (pg.root / "gradebook.db").exists()  # nothing went to sqlite behind our back


# -- scale-out: shards into folders of their own, one merge --------------------------------

SHARDED = [s for s in CLASS if s.student in ("reference", "np_split", "bias_in_partial")]


def _graded_rows(course):
    from sqlalchemy import create_engine, text
    engine = create_engine(course.db_url)
    try:
        with engine.connect() as con:
            return sorted(con.execute(text("SELECT student, digest, graded_at FROM "
                                           "tpcourse_graded WHERE stage = 'autograde'")).all())
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def sharded(filled):
    """SHARDED graded as 2 concurrent shards (`--shard I/2`) of one course, then merged."""
    course = filled[2]
    for sub in CLASS:
        if sub not in SHARDED:
            shutil.rmtree(course.root / "submitted" / sub.student)
    gradebook = (course.root / "gradebook.db").read_bytes()
    dirs = [course.root.parent / f"shard-{i}" for i in range(2)]
    shards = [subprocess.Popen([sys.executable, "-m", "tpcourse.grade_class", A, "--no-progress",
                                f"--root={course.root}", "--workers=1", f"--shard={i}/2",
                                f"--shard-dir={d}"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
              for i, d in enumerate(dirs)]
    outs = [p.communicate(timeout=900)[0] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], outs
    untouched = (course.root / "gradebook.db").read_bytes() == gradebook
    merged = ClassGrader(course.root, A, progress=False).merge(dirs)   # CLI: tests/test_slurm.py
    return course, dirs, outs, untouched, merged


def test_shards_write_only_their_folders_and_the_merge_equals_one_run(graded, sharded):
    _, stock, _ = graded
    course, dirs, outs, untouched, merged = sharded
    assert untouched, "a shard wrote the course gradebook"
    assert "2 submissions: 2 graded" in outs[0] and "1 submissions: 1 graded" in outs[1], outs
    assert {p.name for p in (dirs[0] / "autograded").iterdir()} == {"bias_in_partial",
                                                                    "reference"}
    assert sorted((o.student, o.status) for o in merged) == sorted(
        (s.student, "graded") for s in SHARDED)
    students = [s.student for s in SHARDED]
    assert _all_scores(course, students) == _all_scores(stock, students)
    stock_rows = [r for r in _csv(stock.root / "grades.csv") if dict(r)["student_id"] in students]
    assert _csv(course.root / "grades.csv") == stock_rows
    for s in students:
        assert course.feedback_html(A, s), s


def test_merging_again_changes_nothing(sharded):
    course, dirs, _, _, _ = sharded
    rows, scores = _graded_rows(course), _all_scores(course, [s.student for s in SHARDED])
    outcomes = ClassGrader(course.root, A, progress=False, feedback=False,
                           export=False).merge(dirs[::-1])
    assert sorted(o.status for o in outcomes) == ["unchanged"] * 3
    assert _graded_rows(course) == rows    # digests and grading times as they were: not twice
    assert _all_scores(course, [s.student for s in SHARDED]) == scores


def test_a_newer_shard_replaces_the_older_grade_and_keeps_manual_grades(sharded):
    from nbgrader.api import Gradebook
    course, dirs, _, _, _ = sharded
    with Gradebook(course.db_url, "tp101") as gb:     # the instructor's partial credit
        grade = gb.find_grade("test_column_uneven_shards", A, A, "np_split")
        grade.manual_score = 1.5
        gb.db.commit()
    ours = next(s for s in SHARDED if s.student == "np_split")
    course.place_submission("np_split", A, build(Submission("np_split", A)),
                            timestamp="2026-11-21 10:00:00.000000 UTC")   # fixed, handed in again
    newer = course.root.parent / "shard-late"
    ClassGrader(course.root, A, workers=1, progress=False, shard=(0, 1), shard_dir=newer).run()
    assert {p.name for p in (newer / "autograded").iterdir()} == {"np_split"}  # others unchanged
    before = dict((s, (d, at)) for s, d, at in _graded_rows(course))
    outcomes = ClassGrader(course.root, A, progress=False, feedback=False,
                           export=False).merge([newer, *dirs])
    assert {o.student: o.status for o in outcomes} == {
        "np_split": "graded", "reference": "unchanged", "bias_in_partial": "unchanged"}
    after = dict((s, (d, at)) for s, d, at in _graded_rows(course))
    assert after["np_split"][0] != before["np_split"][0] and after["np_split"][1] > before["np_split"][1]
    assert all(after[s] == before[s] for s in after if s != "np_split")
    [(_, grades)] = course.scores(A, "np_split").items()
    assert ours.loses == {"test_column_uneven_shards"}    # what the old submission lost
    assert all(score == top for g, (score, top) in grades.items() if g not in ours.loses)
    with Gradebook(course.db_url, "tp101") as gb:
        grade = gb.find_grade("test_column_uneven_shards", A, A, "np_split")
        assert grade.manual_score == 1.5 and grade.auto_score == grade.max_score
    with pytest.raises(GraderError, match="nothing merged: .*no-such-shard is not a shard"):
        ClassGrader(course.root, A, progress=False).merge([dirs[0], course.root / "no-such-shard"])
