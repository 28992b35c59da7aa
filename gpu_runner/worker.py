"""The torchrun entry point: one process per rank, all units of a submission in one launch.

    python -m torch.distributed.run --standalone --nproc-per-node W -m gpu_runner.worker \
        --module solution.py --out DIR --units column.forward@2,... --sizes 1,2,3,4

Every rank appends JSON lines to DIR/rank<R>.jsonl, flushed as it goes, so whatever happens
to the job the launcher knows which units finished: "start" and "end" per unit (with its
sub-check results), "watchdog" when a unit ran past --step-timeout (then the rank exits),
"abort" when the group gave up after a collective failed, "bye" on a clean exit.

Groups: the default group has all W ranks; world size p < W runs on a sub-group of the last p
ranks (dist.new_group, created once by every rank in the same order). Each size also gets a
gloo control group, used only by the harness to agree on phases and faults, so the student's
(possibly broken) collectives never share a sequence number with the harness's.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from . import checks, counting, timing
from .plan import Unit

EXIT_ABORT, EXIT_WATCHDOG = 3, 4


class Recorder:
    def __init__(self, path, launch):
        self.file = open(path, "a", buffering=1)
        self.launch = launch
        self.lock = threading.Lock()

    def write(self, **record):
        with self.lock:
            self.file.write(json.dumps({"launch": self.launch, "t": time.time(), **record}) + "\n")
            self.file.flush()


class Watchdog(threading.Thread):
    """Kills this rank when a unit runs too long (a loop with no collective to time out)."""

    def __init__(self, seconds, rec):
        super().__init__(daemon=True)
        self.seconds, self.rec = seconds, rec
        self.unit, self.deadline = None, None
        self.lock = threading.Lock()

    def arm(self, unit):
        with self.lock:
            self.unit, self.deadline = unit, time.monotonic() + self.seconds

    def disarm(self):
        with self.lock:
            self.unit, self.deadline = None, None

    def run(self):
        while True:
            time.sleep(0.2)
            with self.lock:
                late = self.deadline is not None and time.monotonic() > self.deadline
                unit = self.unit
            if late:
                self.rec.write(event="watchdog", unit=unit, seconds=self.seconds)
                os._exit(EXIT_WATCHDOG)


def load_module(path):
    spec = importlib.util.spec_from_file_location("student_solution", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["student_solution"] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--units", required=True, help="comma-separated unit ids to run")
    ap.add_argument("--sizes", required=True, help="all world sizes of the plan (groups)")
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--pg-timeout", type=float, default=60.0)
    ap.add_argument("--step-timeout", type=float, default=120.0)
    ap.add_argument("--launch", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    torch.set_num_threads(1)      # W ranks share the machine's cores
    rec = Recorder(os.path.join(args.out, f"rank{rank}.jsonl"), args.launch)
    rec.write(event="hello", pid=os.getpid(), uid=os.getuid(), rank=rank, world=world,
              sandboxed=os.environ.get("TPCOURSE_SANDBOXED") == "1")
    units = [Unit.parse(u) for u in args.units.split(",") if u]
    watchdog = Watchdog(args.step_timeout, rec)
    watchdog.start()

    watchdog.arm("import")
    try:
        module = load_module(args.module)
    except BaseException as exc:  # noqa: BLE001 - anything the solution cells do on import
        rec.write(event="import_error", error=checks.describe(exc),
                  traceback=traceback.format_exc()[-4000:])
        finish(rec, 0)
    watchdog.disarm()

    for unit in [u for u in units if u.step == "nopg"]:
        run_unit(unit, checks.Ctx(module, None, 1, 0, torch.device("cpu"), None, 1), rec, watchdog)

    device = torch.device("cpu")
    if args.backend == "nccl":
        # a timed-out collective raises in this rank (recorded as a fault) instead of NCCL's
        # watchdog aborting the process
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        counting.use_dispatch(True)
    timeout = datetime.timedelta(seconds=args.pg_timeout)
    control_timeout = datetime.timedelta(seconds=3 * args.pg_timeout)
    if dist.is_initialized():      # a solution that "helpfully" initialised it itself
        dist.destroy_process_group()
    dist.init_process_group(args.backend, timeout=timeout)
    groups = {world: (None, dist.new_group(backend="gloo", timeout=control_timeout))}
    for p in sorted(int(s) for s in args.sizes.split(",")):
        if p < world:
            ranks = list(range(world - p, world))
            groups[p] = (dist.new_group(ranks, timeout=timeout),
                         dist.new_group(ranks, backend="gloo", timeout=control_timeout))
    control_all = groups[world][1]

    for unit in units:
        if unit.step == "nopg":
            continue
        members = unit.members(world)
        fault = None
        if rank in members:
            group, control = groups[unit.size]
            ctx = checks.Ctx(module, group, unit.size, rank - members.start, device, control,
                             seed=hash_unit(unit))
            fault = run_unit(unit, ctx, rec, watchdog)
        else:
            rec.write(event="idle", unit=unit.id)
        try:
            faults = [None] * world
            dist.all_gather_object(faults, fault, group=control_all)
        except Exception as exc:  # a rank is gone or stuck: nothing more can run here
            rec.write(event="abort", unit=unit.id, reason=f"control sync: {checks.describe(exc)}")
            finish(rec, EXIT_ABORT)
        if any(faults):
            rec.write(event="abort", unit=unit.id,
                      reason=next(f"rank {r}: {f}" for r, f in enumerate(faults) if f))
            finish(rec, EXIT_ABORT)
    finish(rec, 0)


def hash_unit(unit: Unit) -> int:
    """Same data on every rank and in every relaunch: a seed from the unit's name."""
    return sum(ord(c) * (i + 1) for i, c in enumerate(f"{unit.kind}.{unit.step}")) % 100_000


def run_unit(unit: Unit, ctx, rec, watchdog):
    """Run one unit on this rank and record it; returns a fault description or None."""
    rec.write(event="start", unit=unit.id)
    watchdog.arm(unit.id)
    status, error, extra = "ok", "", {}
    try:
        if unit.kind == "timing":
            extra["timing"] = ctx.phase(lambda: timing.measure(ctx, unit.step))
        else:
            checks.UNITS[(unit.kind, unit.step)](ctx)
    except checks.PhaseFailed as exc:
        status, error = "failed", str(exc)
    except Exception as exc:  # the harness itself on bad student objects: a failed unit
        status, error = "failed", checks.describe(exc)
        if checks.is_comm_error(exc):
            ctx.comm_error = exc
    watchdog.disarm()
    fault = None
    if ctx.comm_error is not None:
        status, fault = "comm_fault", checks.describe(ctx.comm_error)
    results = {name: ctx.results.get(name, (False, error or "not reached"))
               for name in unit.checks()}
    rec.write(event="end", unit=unit.id, status=status, error=error, fault=fault,
              checks=results, **extra)
    return fault


def finish(rec, code):
    rec.write(event="bye", code=code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # no destroy_process_group: with a broken peer it can hang


if __name__ == "__main__":
    main()
