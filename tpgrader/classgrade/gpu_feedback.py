"""Put each student's gpu_runner report into their feedback, after `nbgrader generate_feedback`.

    python -m tpgrader.classgrade.gpu_feedback ASSIGNMENT [--course-root .] [--reports DIR]

`python -m gpu_runner.grade` writes <reports>/<student>/report.json and timing.png (the
compute-vs-communication plot) next to the course, not in it. For every student who has both a
report and a feedback folder, this copies them into feedback/<student>/<assignment>/gpu_report/
and shows the plot and the runner's summary at the top of the notebook's feedback page, inside
the HTML itself (nbgrader's release_feedback and fetch_feedback carry the notebook's .html file
only). Running it again replaces what it added. `python -m tpcourse.grade_class` runs it after
generate_feedback; after a stock `nbgrader generate_feedback`, run it yourself.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import re
import shutil
import sys
from pathlib import Path

from tpjudge.student_text import plain

BEGIN, END = "<!-- tp:gpu-report -->", "<!-- /tp:gpu-report -->"
_SECTION = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
FILES = ("report.json", "timing.png")


def attach(root, assignment: str, reports=None, students=None) -> list[str]:
    """Attach the reports; returns the students whose feedback got one."""
    root = Path(root)
    reports = Path(reports or root / "gpu_reports" / assignment)
    done = []
    for folder in sorted(p for p in reports.glob("*") if (p / "report.json").is_file()):
        student = folder.name
        feedback = root / "feedback" / student / assignment
        if (students and student not in students) or not feedback.is_dir():
            continue
        report = json.loads((folder / "report.json").read_text())
        dest = feedback / "gpu_report"
        dest.mkdir(exist_ok=True)
        for name in FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, dest / name)
        page = feedback / f"{report.get('notebook', assignment)}.html"
        if page.is_file():
            page.write_text(with_section(page.read_text(), section(report, folder / "timing.png")))
        done.append(student)
    return done


def section(report: dict, plot: Path) -> str:
    """The HTML shown at the top of the feedback page. Every value is shown as text (a fault's
    reason can quote what a rank raised): plain (tpjudge.student_text), then escaped."""
    sizes = ", ".join(_text(s) for s in report.get("world_sizes", []))
    head = (f"Graded on real ranks by the gpu_runner ({_text(report.get('backend'))}, "
            f"world sizes {sizes}): {_number(report.get('score', 0))} / "
            f"{_number(report.get('max_score', 0))}."
            f" The whole report is in gpu_report/report.json next to this page.")
    faults = [_text(f"{f.get('unit')}: {f.get('reason')}") for f in report.get("faults", [])]
    parts = [BEGIN, '<div class="tp-gpu-report">', "<h5>Real ranks: compute vs communication</h5>",
             f"<p>{head}</p>"]
    if faults:
        parts.append("<p>Faults:</p><ul>" + "".join(f"<li>{f}</li>" for f in faults) + "</ul>")
    if plot.is_file():
        data = base64.b64encode(plot.read_bytes()).decode()
        parts.append(f'<img alt="compute and communication time per layer and world size" '
                     f'src="data:image/png;base64,{data}">')
    parts += ["</div>", END]
    return "\n".join(parts)


def _text(value) -> str:
    return html.escape(plain(value))


def _number(value) -> str:
    return f"{value:g}" if type(value) in (int, float) else _text(value)


def with_section(page: str, new: str) -> str:
    """The page with its report section (the tp_feedback template's marker) replaced; a page
    without the marker gets it before </body>."""
    if _SECTION.search(page):
        return _SECTION.sub(lambda _: new, page, count=1)
    return page.replace("</body>", new + "\n</body>", 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tpgrader.classgrade.gpu_feedback",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("assignment")
    ap.add_argument("--course-root", default=".")
    ap.add_argument("--reports", default=None,
                    help="the gpu_runner's report folder (default <root>/gpu_reports/<assignment>)")
    ap.add_argument("--student", action="append", default=[], help="only this student (repeatable)")
    args = ap.parse_args(argv)
    done = attach(args.course_root, args.assignment, args.reports, set(args.student) or None)
    print(f"gpu reports attached to the feedback of {len(done)} student(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
