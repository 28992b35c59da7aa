"""Grade an assignment's submissions on real ranks and record the scores in nbgrader.

    python -m gpu_runner.grade tp_torch                      # every student in submitted/
    python -m gpu_runner.grade tp_torch --student alice      # one student
    python -m gpu_runner.grade tp_torch --shard 0/8 --no-gradebook   # one of 8 parallel jobs
    python -m gpu_runner.grade tp_torch --load-reports       # write finished reports to the db

For each student: extract the solution cells of the submitted notebook into a module, run
one torchrun launch for all world sizes (relaunching only after a fault), score the gpu_*
cells, write <reports>/<student>/report.json and timing.png, and set the cells' scores and
comments in the gradebook (after `nbgrader autograde`, before `nbgrader export` /
`generate_feedback`). One student's failure never stops the others.

Every torchrun job runs in the grading sandbox (tpsandbox: bubblewrap, an unprivileged
uid, no network but loopback, resource limits, the course hidden), configured by the course's
nbgrader_config.py (`c.Sandbox.*`) like the notebook kernels. Where the sandbox cannot run,
nothing is graded (exit 2, with the reason and the fix) unless that file says
`c.Sandbox.enabled = False`.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import extract, gradebook, report
from .launch import Config, job_pythonpath, run_submission
from .plan import make_plan
from .versions import warn_if_untested

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
                    help="auto: NCCL with one rank per GPU when there are enough GPUs, else gloo")
    ap.add_argument("--world-sizes", default=None,
                    help="comma-separated, e.g. 1,2,3,4 (default: 1-4 on CPU, 1-#GPUs on NCCL)")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="wall-clock limit of one torchrun launch, seconds")
    ap.add_argument("--pg-timeout", type=float, default=60.0,
                    help="process-group timeout: a collective waiting longer fails (deadlock)")
    ap.add_argument("--step-timeout", type=float, default=0.0,
                    help="a test running longer is killed (loop); default 2 x --pg-timeout")
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


def _gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:       # a broken CUDA set-up: grade on CPU
        return 0


def backend_and_sizes(backend: str, sizes: str | None):
    gpus = 0 if backend == "gloo" else _gpu_count()    # gloo: no need to import torch here
    wanted = [int(s) for s in sizes.split(",")] if sizes else None
    if backend == "auto":
        need = max(wanted) if wanted else 2
        backend = "nccl" if gpus >= need else "gloo"
    if wanted is None:
        wanted = list(range(1, gpus + 1)) if backend == "nccl" else [1, 2, 3, 4]
    if backend == "nccl" and max(wanted) > gpus:
        raise SystemExit(f"nccl needs one GPU per rank: world size {max(wanted)} > {gpus} GPUs")
    return backend, tuple(sorted(set(wanted)))


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
    from tpgrader import load_config
    from tpsandbox import Sandbox, for_torchrun, problem
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
    # what the job imports: the harness and the notebook's helpers, wherever they are installed
    readonly = [str(Path(__file__).resolve().parent)]
    spec = importlib.util.find_spec("tpgrade")
    readonly += list(spec.submodule_search_locations or []) if spec else []
    gpu = backend == "nccl" or bool(glob.glob("/dev/nvidia[0-9]*"))
    return for_torchrun(str(root), gpu=gpu, readonly=readonly, hidden=hidden, config=config)


def preflight(src_path: Path, wrap=None, scratch: Path | None = None) -> None:
    """Run the source notebook's setup cell once, alone (in the sandbox, when there is one):
    if it fails here, every submission would fail on import through no fault of its own, so
    grade nobody and say why."""
    code = "\n\n".join(extract.setup_cells(extract.read(src_path)))
    env = {**os.environ, "PYTHONPATH": job_pythonpath()}
    argv, where = [sys.executable, "-c", code], "outside the notebook"
    if wrap is not None:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        argv, where = wrap(argv, scratch, {"PYTHONPATH": env["PYTHONPATH"]}), "in the sandbox"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300,
                              cwd=str(scratch) if wrap is not None else None)
    finally:
        if wrap is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_runner: the setup cell of {src_path} fails {where}; "
                         f"nothing graded:\n{proc.stderr[-2000:]}")


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
    plan = make_plan(cfg.sizes, timing=not args.no_timing)
    start = time.monotonic()
    results, launches = run_submission(module, folder / "runs", plan, cfg)
    rep = report.build(student, args.assignment, src_path.stem, extract.gpu_cells(source_nb),
                       plan, results, launches, cfg, time.monotonic() - start)
    rep["missing_cells"] = missing
    report.write(rep, folder)
    return rep


def _uid_per_shard(root: Path, shard: int) -> None:
    """Shards sharing a machine get sandbox uids of their own (per-uid process limits stay
    independent): the configured uid plus 100 + the shard index."""
    from tpgrader import load_config
    from tpsandbox import UID_ENV, Sandbox
    base = Sandbox(config=load_config(str(root))).effective_uid()
    os.environ[UID_ENV] = str(base + 100 + shard)


def main(argv=None) -> int:
    args = parse_args(argv)
    warn_if_untested()
    root = Path(args.course_root).resolve()
    db_url = args.db_url or f"sqlite:///{root / 'gradebook.db'}"
    reports = Path(args.reports or root / "gpu_reports" / args.assignment).resolve()
    src_path = source_notebook(root, args.assignment)
    names = students(root, args.assignment, args.student, args.shard)
    failures = 0
    cfg = None
    if not args.load_reports:
        backend, sizes = backend_and_sizes(args.backend, args.world_sizes)
        if args.shard:
            _uid_per_shard(root, int(args.shard.split("/")[0]))
        try:
            wrap = confinement(root, reports, db_url, backend)
        except SandboxRefused as exc:
            print(f"gpu_runner: nothing graded. {exc}", file=sys.stderr, flush=True)
            return 2
        if names:
            # a folder of this process's own: shards on many machines share the reports folder
            preflight(src_path, wrap, reports / f".preflight-{os.uname().nodename}-{os.getpid()}")
        cfg = Config(sizes=sizes, backend=backend, pg_timeout=args.pg_timeout,
                     step_timeout=args.step_timeout, wall_timeout=args.timeout,
                     max_launches=args.max_launches, wrap=wrap)
        print(f"gpu_runner: {len(names)} submission(s) of {args.assignment}, backend {backend}, "
              f"world sizes {','.join(map(str, sizes))}, "
              f"{'sandboxed' if wrap else 'NOT sandboxed'}", flush=True)
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
