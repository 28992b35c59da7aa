"""Grade an assignment's submissions on real ranks and record the scores in nbgrader.

    python -m gpu_runner.grade ASSIGNMENT                    # every student in submitted/
    python -m gpu_runner.grade ASSIGNMENT --student alice    # one student
    python -m gpu_runner.grade ASSIGNMENT --shard 0/8 --no-gradebook   # one of 8 parallel jobs
    python -m gpu_runner.grade ASSIGNMENT --load-reports     # write finished reports to the db

ASSIGNMENT is one of the course's torch assignments (assignments/<name>/gpu holds its units).

For each student: extract the solution cells of the submitted notebook into a module, run
one torchrun launch for all world sizes (relaunching only after a fault), score the gpu_*
cells, write <reports>/<student>/report.json and timing.png, and set the cells' scores and
comments in the gradebook (after `nbgrader autograde`, before `nbgrader export` /
`generate_feedback`). One student's failure never stops the others.

The world sizes are the course's (`c.GpuRunner.world_sizes` in nbgrader_config.py, default
1-4), the same on every machine; the backend follows gpu_runner.machine's rules. Before any
student, the source notebook's own solution is graded the same way (gpu_runner.reference):
short of full marks, nobody is graded (exit 2).

Every torchrun job runs in the grading sandbox (tpsandbox: bubblewrap, an unprivileged
uid, no network but loopback, resource limits, the course hidden), configured by the course's
nbgrader_config.py (`c.Sandbox.*`) like the notebook kernels. Where the sandbox cannot run,
nothing is graded (exit 2, with the reason and the fix) unless that file says
`c.Sandbox.enabled = False`.

Exit status: 0 everyone graded; 1 some student could not be graded (no submission, not
autograded, an environment failure during their launch); 2 nothing graded (the grader cannot
do its job here: the sandbox, the backend, or the reference short of full marks).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

import assignments

from . import extract, gradebook, machine, reference, report
from .launch import Config, grade_module, job_environment
from .plan import make_plan
from .versions import warn_if_untested
from .settings import course_world_sizes

FLAGS_ENV = "GPU_RUNNER_FLAGS"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gpu_runner.grade",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("assignment")
    ap.add_argument("--student", action="append", default=[],
                    help="grade only this student (repeatable); default: all submissions")
    ap.add_argument("--course-root", default=".", help="nbgrader course root (default: .)")
    ap.add_argument("--db-url", default=None,
                    help="gradebook URL (default: sqlite:///<course-root>/gradebook.db)")
    ap.add_argument("--reports", default=None,
                    help="report folder (default: <course-root>/gpu_reports/<assignment>)")
    ap.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                    help="auto: NCCL with one rank per GPU when there are at least "
                         "max(world sizes) GPUs, else gloo")
    ap.add_argument("--world-sizes", default=None,
                    help="override the course's c.GpuRunner.world_sizes (experiments only: "
                         "grades then differ from the course's), e.g. 1,2")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="CPU time one torchrun launch's processes may use together, seconds "
                         "(with a wall-clock backstop c.TimeLimits.wall_factor times longer)")
    ap.add_argument("--pg-timeout", type=float, default=60.0,
                    help="process-group timeout: a collective waiting longer fails (deadlock)")
    ap.add_argument("--step-timeout", type=float, default=0.0,
                    help="a test using more CPU time on a rank is killed (loop); default 2 x "
                         "--pg-timeout")
    ap.add_argument("--max-launches", type=int, default=4,
                    help="launches per submission, the first plus relaunches after faults")
    ap.add_argument("--shard", default=None, help="I/N: grade every N-th student from the I-th")
    ap.add_argument("--no-timing", action="store_true", help="skip the compute/comm timing")
    ap.add_argument("--no-gradebook", action="store_true",
                    help="write the reports only (parallel shards); then --load-reports")
    ap.add_argument("--load-reports", action="store_true",
                    help="run nothing: write the existing reports' scores into the gradebook")
    if argv is None:
        argv = sys.argv[1:]
    # Defaults from the environment, for callers that pass no flags (grade_class): e.g.
    # GPU_RUNNER_FLAGS="--world-sizes 1,2 --timeout 600". The command line wins.
    return ap.parse_args(shlex.split(os.environ.get(FLAGS_ENV, "")) + list(argv))


def world_sizes(root: Path, override: str | None) -> tuple[int, ...]:
    """The course's world sizes, or the --world-sizes override (with a warning)."""
    course = course_world_sizes(root)
    if not override:
        return course
    try:
        sizes = tuple(sorted({int(s) for s in override.split(",")}))
    except ValueError:
        raise machine.Refused(f"--world-sizes {override!r}: expected e.g. 1,2,3,4") from None
    if not sizes or min(sizes) < 1:
        raise machine.Refused(f"--world-sizes {override!r}: sizes must be positive")
    if sizes != course:
        print(f"gpu_runner: WARNING: --world-sizes {','.join(map(str, sizes))} overrides the "
              f"course's c.GpuRunner.world_sizes = {list(course)}: these grades differ from the "
              f"course's", file=sys.stderr, flush=True)
    return sizes


def backend_and_sizes(root: Path, backend: str, override: str | None):
    """(backend, world sizes): the sizes are the course's whatever the machine; the backend is
    NCCL only where there is one GPU per rank of the largest size."""
    sizes = world_sizes(root, override)
    gpus = 0 if backend == "gloo" else machine.gpu_count()   # gloo: no need to import torch
    return machine.choose_backend(backend, sizes, gpus), sizes


def source_notebook(root: Path, assignment: str) -> Path:
    for path in sorted((root / "source" / assignment).glob("*.ipynb")):
        if extract.gpu_cells(extract.read(path)):
            return path
    raise SystemExit(f"no notebook with gpu_* cells in {root / 'source' / assignment}")


class SandboxRefused(RuntimeError):
    """The sandbox cannot run here and the course has not opted out: grade nobody."""


def confinement(root: Path, reports: Path, db_url: str, backend: str):
    """The `Config.wrap` for this course: its nbgrader_config.py's sandbox (c.Sandbox.*),
    or None when that file disables it. Raises SandboxRefused when it is on but cannot run."""
    from tpconfig import load_config
    from tpsandbox import Sandbox, for_torchrun, problem
    from tpsandbox.command import public_paths
    from tpsandbox.kernel import course_paths
    config = load_config(str(root))
    sandbox = Sandbox(config=config)
    if not sandbox.enabled:
        print("gpu_runner: WARNING: the sandbox is disabled (c.Sandbox.enabled = False in "
              f"{root / 'nbgrader_config.py'}): student code runs with the grader's rights",
              file=sys.stderr, flush=True)
        return None
    why = problem(sandbox)
    if why:
        raise SandboxRefused(why)
    hidden = [str(root), str(reports), *course_paths(config)]
    if db_url.startswith("sqlite:///"):
        hidden.append(os.path.dirname(db_url[len("sqlite:///"):]))
    # what the job imports: the harness, the assignment's units (not its example students) and
    # the notebook's helpers, wherever they are installed
    readonly = [str(Path(__file__).resolve().parent)]
    for package in ("tpgrade", "tpsim", "assignments"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            readonly += public_paths(package, folder, sandbox.private_packages)
    gpu = backend == "nccl" or bool(glob.glob("/dev/nvidia[0-9]*"))
    return for_torchrun(str(root), gpu=gpu, readonly=readonly, hidden=hidden, config=config)


def wall_factor(root: Path) -> float:
    """c.TimeLimits.wall_factor of the course: the wall-clock backstops of units and launches."""
    from tpconfig import load_config
    from tpsandbox import TimeLimits
    return TimeLimits(config=load_config(str(root))).wall_factor


def students(root: Path, assignment: str, wanted, shard) -> list[str]:
    names = wanted or sorted(p.parent.name for p in (root / "submitted").glob(f"*/{assignment}")
                             if p.is_dir())
    if shard:
        i, n = (int(x) for x in shard.split("/"))
        names = names[i::n]
    return names


def grade_student(student, args, root, src_path, cfg, reports) -> dict:
    source_nb = extract.read(src_path)
    folder = reports / student
    sub_path = root / "submitted" / student / args.assignment / src_path.name
    if not sub_path.exists():
        raise FileNotFoundError(f"no submission {sub_path}")
    module = folder / "solution.py"
    missing = extract.write_module(source_nb, extract.read(sub_path), module)
    plan = make_plan(args.assignment, cfg.sizes, timing=not args.no_timing,
                     cells=extract.gpu_cells(source_nb))
    rep = grade_module(student, module, folder, plan, cfg, args.assignment, src_path.stem,
                       extract.gpu_cells(source_nb))
    rep["missing_cells"] = missing
    report.write(rep, folder)
    return rep


def _uid_per_shard(root: Path, shard: int) -> None:
    """Shards sharing a machine get sandbox uids of their own (per-uid process limits stay
    independent): the configured uid plus 100 + the shard index."""
    from tpconfig import load_config
    from tpsandbox import UID_ENV, Sandbox
    base = Sandbox(config=load_config(str(root))).effective_uid()
    os.environ[UID_ENV] = str(base + 100 + shard)


def set_up(args, root, reports, db_url, src_path, names) -> Config:
    """The run's configuration, the machine's notes, and the reference graded first; raises
    machine.Refused when the grader cannot grade here."""
    backend, sizes = backend_and_sizes(root, args.backend, args.world_sizes)
    if args.shard:
        _uid_per_shard(root, int(args.shard.split("/")[0]))
    try:
        wrap = confinement(root, reports, db_url, backend)
    except SandboxRefused as exc:
        raise machine.Refused(str(exc)) from exc
    cfg = Config(sizes=sizes, backend=backend, pg_timeout=args.pg_timeout,
                 step_timeout=args.step_timeout, launch_timeout=args.timeout,
                 wall_factor=wall_factor(root), max_launches=args.max_launches, wrap=wrap)
    print(f"gpu_runner: {len(names)} submission(s) of {args.assignment}, backend {backend}, "
          f"world sizes {','.join(map(str, sizes))}, "
          f"{'sandboxed' if wrap else 'NOT sandboxed'}", flush=True)
    dropped = job_environment(backend)[1]
    if dropped:
        print(f"gpu_runner: site network settings not passed to the jobs (the sandbox has only "
              f"its loopback): {', '.join(dropped)}", flush=True)
    for item in machine.untested(backend):
        print(f"gpu_runner: untested on this machine: {item}", flush=True)
    if names:
        reference.check(src_path, root, reports, cfg, args.assignment)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.assignment not in [a.name for a in assignments.discover() if a.has_gpu]:
        print(f"gpu_runner: {args.assignment!r} is not one of the course's torch assignments "
              f"({', '.join(a.name for a in assignments.discover() if a.has_gpu)})",
              file=sys.stderr, flush=True)
        return 2
    warn_if_untested()
    root = Path(args.course_root).resolve()
    db_url = args.db_url or f"sqlite:///{root / 'gradebook.db'}"
    reports = Path(args.reports or root / "gpu_reports" / args.assignment).resolve()
    src_path = source_notebook(root, args.assignment)
    names = students(root, args.assignment, args.student, args.shard)
    failures = 0
    cfg = None
    if not args.load_reports:
        try:
            cfg = set_up(args, root, reports, db_url, src_path, names)
        except machine.Refused as exc:
            print(f"gpu_runner: nothing graded. {exc}", file=sys.stderr, flush=True)
            return 2
    for student in names:
        try:
            if args.load_reports:
                rep = json.loads((reports / student / "report.json").read_text())
            else:
                rep = grade_student(student, args, root, src_path, cfg, reports)
            if not args.no_gradebook:
                gradebook.write_scores(db_url, args.assignment, rep["notebook"], student,
                                       report.scores(rep))
            faults = "; ".join(f["unit"] for f in rep["faults"])
            print(f"{student}: {rep['score']:g}/{rep['max_score']:g} in {rep['seconds']:.1f}s, "
                  f"{len(rep['launches'])} launch(es)" + (f", faults: {faults}" if faults else ""),
                  flush=True)
        except Exception as exc:  # one bad submission never stops the class
            failures += 1
            print(f"{student}: NOT GRADED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
