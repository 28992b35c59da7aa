"""The whole nbgrader grading cycle on the embedded defaults, with a handful of example students.

    python -m tpcourse.demo            (or `make demo`)

In demo_output/course (wiped first): sqlite gradebook, `nbgrader generate_assignment`,
`release_assignment`, every student fetches and submits through the exchange, `collect`,
`autograde`, `generate_feedback`, `export`. Prints one row per student and assignment and writes
demo_output/grades.csv and the feedback HTML under demo_output/course/feedback/. Everything it
writes stays in demo_output/ (the exchange, the students' folders and nbgrader caches): no
example student shows up in your own Jupyter's Assignments tab.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import assignments as registry

from . import REPO
from .catalogue import as_list, examples
from .cycle import Course
from .cycle import ensure_tools_on_path
from .submissions import Submission, build

OUTPUT = REPO / "demo_output"


# -- the catalogue ------------------------------------------------------------------------------
def numpy_assignments() -> list[str]:
    """The assignments graded by nbgrader alone, in course order."""
    return [a.name for a in registry.discover() if a.kind == "numpy"]


def demo_students() -> list[Submission]:
    """Per numpy assignment: the reference and the students its examples' DEMO names."""
    picked = []
    for name in numpy_assignments():
        cat = examples(name)
        by_name = {s.student: s for s in as_list(cat.REFERENCE) + as_list(cat.STUDENTS)}
        picked += as_list(cat.REFERENCE) + [by_name[student] for student in cat.DEMO]
    return picked


def example_name(student: str) -> tuple[str, str]:
    """(first, last) for the gradebook: "Example", and the student id in words."""
    return "Example", student.replace("_", " ").title()


# -- reading results ----------------------------------------------------------------------------
def gradebook_scores(course: Course, assignment: str) -> dict[str, dict[str, tuple[float, float]]]:
    """{student: {grade_id: (score, max)}} for every submission, in one gradebook session
    (opening nbgrader's Gradebook costs about a second, so not once per student)."""
    from nbgrader.api import Gradebook
    ensure_tools_on_path()
    result = {}
    with Gradebook(course.db_url) as gb:
        for sub in gb.assignment_submissions(assignment):
            grades = {}
            for nb in sub.notebooks:
                for g in nb.grades:
                    if g.name in grades:
                        raise ValueError(f"grade_id {g.name} in two notebooks of {assignment}")
                    grades[g.name] = (float(g.score or 0), float(g.max_score))
            result[sub.student.id] = grades
    return result


def failed(grades: dict[str, tuple[float, float]]) -> list[str]:
    return sorted(gid for gid, (score, top) in grades.items() if score < top)


# -- the cycle ----------------------------------------------------------------------------------
def run(output: Path = OUTPUT, students: list[Submission] | None = None, log=print) -> dict:
    students = demo_students() if students is None else students
    shutil.rmtree(output, ignore_errors=True)
    course = Course.create(output / "course")
    results = {}
    for assignment in [a for a in numpy_assignments() if (course.root / "source" / a).is_dir()]:
        subs = [s for s in students if s.assignment == assignment]
        t0 = time.perf_counter()
        course.generate(assignment)
        course.release(assignment)
        for sub in subs:  # fetch + submit through the exchange, as a student does
            course.submit_as(sub.student, assignment, build(sub, course.root / "source",
                                                            course.root / "release"))
        course.collect(assignment)
        course.name_students({s.student: example_name(s.student) for s in subs})
        course.autograde(assignment)  # one call grades every collected submission
        course.generate_feedback(assignment)
        results[assignment] = gradebook_scores(course, assignment)
        log(f"{assignment}: {len(subs)} students graded in {time.perf_counter() - t0:.0f} s")
    for assignment in gpu_assignments():
        if grade_with_gpu_runner(course, assignment, log):
            results[assignment] = gradebook_scores(course, assignment)
    csv = course.export(output / "grades.csv")
    return {"course": course, "results": results, "csv": csv}


def gpu_assignments() -> list[str]:
    """The assignments with gpu_* cells (graded by gpu_runner), in course order."""
    return [a.name for a in registry.discover() if a.has_gpu]


def grade_with_gpu_runner(course: Course, assignment: str, log=print) -> bool:
    """HOOK: the layers of an assignment with gpu_* cells run on real ranks under torchrun,
    which nbgrader cannot do; the gpu_runner package grades them and writes the scores into this
    course's gradebook. The reference is graded, and the students its examples' DEMO names."""
    if importlib.util.find_spec("gpu_runner") is None or \
            importlib.util.find_spec("gpu_runner.grade") is None:
        log(f"{assignment}: gpu_runner.grade not importable yet, skipped")
        return False
    course.generate(assignment)
    course.release(assignment)
    cat = examples(assignment)
    by_name = {s.student: s for s in as_list(cat.REFERENCE) + as_list(cat.STUDENTS)}
    students = [Submission("reference", assignment)] + [by_name[name] for name in cat.DEMO]
    for sub in students:
        course.submit_as(sub.student, assignment,
                         build(sub, course.root / "source", course.root / "release"))
    course.collect(assignment)
    course.name_students({"reference": example_name("reference")})
    course.autograde(assignment)
    proc = subprocess.run([sys.executable, "-m", "gpu_runner.grade", assignment,
                           "--course-root", str(course.root)], capture_output=True, text=True,
                          env=course.env())
    if proc.returncode != 0:
        log(f"{assignment}: gpu_runner.grade exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        return False
    course.generate_feedback(assignment)
    from tpgrader.classgrade.gpu_feedback import attach
    attach(course.root, assignment)   # the runner's report and plot, into the feedback folder
    log(f"{assignment}: {len(students)} students graded by gpu_runner")
    return True


def table(results: dict) -> str:
    rows = [("student", "assignment", "score", "failed tests")]
    for assignment, by_student in results.items():
        for student, grades in sorted(by_student.items()):
            score = sum(s for s, _ in grades.values())
            top = sum(m for _, m in grades.values())
            lost = failed(grades)
            shown = f"all {len(lost)} tests" if lost and len(lost) == len(grades) else \
                ", ".join(lost) or "-"
            rows.append((student, assignment, f"{score:g} / {top:g}", shown))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.insert(1, "-" * (sum(widths) + 6 + len(rows[0][3])))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="wiped and recreated")
    args = parser.parse_args(argv)
    out = run(args.output.resolve())
    print()
    print(table(out["results"]))
    print()
    print(f"grades (nbgrader export): {out['csv']}")
    print(f"feedback HTML:            {out['course'].root / 'feedback'}/<student>/<assignment>/")
    print(f"gradebook:                {out['course'].root / 'gradebook.db'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
