"""`python -m tpcourse.grade_class ASSIGNMENT [--student S ...] [--workers N] [--force]`

Grades every submission of ASSIGNMENT in the course directory (default: the current one):
sandboxed autograde in parallel, the gpu_runner for gpu_* cells, feedback, export to
grades.csv; then prints a per-student table. Exit status: 0 when the grader did its job (even
if students' code failed), 1 when some submission could not be graded, 2 when the grader
could not run at all (e.g. no sandbox). Run it again after a crash or kill: it grades only
what is missing or changed.

Scale-out, on as many machines as there are shards (sharing the course folder), then once:

  python -m tpcourse.grade_class ASSIGNMENT --shard I/N --shard-dir DIR_I   # autograde only
  python -m tpcourse.grade_class ASSIGNMENT --merge DIR_0 DIR_1 ...         # the one writer

A shard grades students I, I+N, ... into DIR_I (a private gradebook and the notebooks), never
the course gradebook; the merge writes each student's newest grade into it, then feedback and
export. Merging again changes nothing. gpu_* cells: gpu_runner's --shard, then --load-reports.
"""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tpcourse.grade_class", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("assignment")
    ap.add_argument("--root", default=".", help="course directory (holds nbgrader_config.py)")
    ap.add_argument("--student", action="append", default=[], help="only this student (repeatable)")
    ap.add_argument("--workers", type=int, default=0, help="parallel notebooks (default: cores)")
    ap.add_argument("--force", action="store_true", help="regrade even unchanged submissions")
    ap.add_argument("--no-gpu", action="store_true", help="skip the gpu_runner stage")
    ap.add_argument("--no-feedback", action="store_true")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--shard", metavar="I/N", help="grade only students I, I+N, ... (sorted), "
                    "autograde only, into --shard-dir and not the course gradebook")
    ap.add_argument("--shard-dir", metavar="DIR", help="the shard's own folder: a private "
                    "gradebook (DIR/gradebook.db) and the autograded notebooks")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="write these shard folders' "
                    "grades into the course gradebook (then feedback and export)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)

    from tpgrader.classgrade import ClassGrader, GraderError
    from tpgrader.classgrade.shards import parse
    from tpgrader.classgrade.summary import table
    shard = None
    if args.merge and (args.shard or args.shard_dir):
        ap.error("--merge runs on its own, after the shards")
    if args.shard or args.shard_dir:
        if not (args.shard and args.shard_dir):
            ap.error("--shard and --shard-dir go together")
        try:
            shard = parse(args.shard)
        except ValueError as err:
            ap.error(str(err))
    try:
        grader = ClassGrader(args.root, args.assignment, workers=args.workers,
                             students=tuple(args.student), force=args.force,
                             gpu="skip" if args.no_gpu else "auto", feedback=not args.no_feedback,
                             export=not args.no_export, progress=not args.no_progress,
                             shard=shard, shard_dir=args.shard_dir)
        outcomes = grader.merge(args.merge) if args.merge else grader.run()
    except GraderError as err:
        print(f"grade_class: {err}", file=sys.stderr)
        return 2
    print(table(outcomes))
    return 1 if any(o.status == "error" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
