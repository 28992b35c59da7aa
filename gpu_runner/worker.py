"""The torchrun entry point: one process per rank, all units of a submission in one launch.

    python -m torch.distributed.run --standalone --nproc-per-node W -m gpu_runner.worker \
        --assignment NAME --module solution.py --out DIR --units column.forward@2,... \
        --sizes 1,2,3,4

Every rank appends JSON lines to DIR/rank<R>.jsonl, flushed as it goes, so whatever happens
to the job the launcher knows which units finished: "start" and "end" per unit (with what the
unit observed, the assignment's gpu/observe.py: data only, judged in the grader by its
gpu/judge.py), "watchdog" when a unit ran past --step-timeout of CPU time (then the rank
exits), "abort" when the group gave up after a collective failed, "env_error" when the process
groups could not be set up, "bye" on a clean exit.

Order: the rank's GPU is selected (NCCL), the process groups are created and warmed up (one
collective each), and only then is the student's module imported: a set-up that hangs or fails
is the environment's, reported as such (the student is not graded), never charged to the
student. The plan's UNGROUPED units (the checks of "no process group") run on every rank with
the default group hidden (observe.no_default_group).

Groups: the default group has all W ranks; world size p < W runs on a sub-group of the last p
ranks (dist.new_group, created once by every rank in the same order). Each size also gets a
gloo control group, used only by the harness to agree on phases and faults, so the student's
(possibly broken) collectives never share a sequence number with the harness's.
"""
from __future__ import annotations

import argparse
import contextlib
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

import assignments
from tpsim import cputime

from . import counting, machine, observe, timing
from .data import seed_of
from .plan import Unit, plan_of

EXIT_ABORT, EXIT_WATCHDOG, EXIT_ENV = 3, 4, 5


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
    """Kills this rank when a unit runs too long (a loop with no collective to time out): past
    `seconds` of this rank's CPU time (its process and what it forks: tpsim.cputime, so a
    busy machine does not make a correct unit late), or `wall_factor` times as long on the
    clock. The set-up (the environment's, before any student code) is timed on the clock."""

    def __init__(self, seconds, rec, wall_factor=cputime.WALL_FACTOR):
        super().__init__(daemon=True)
        self.seconds, self.rec, self.wall_factor = seconds, rec, wall_factor
        self.meter = cputime.Meter(os.getpid())
        self.unit, self.limit, self.clock = None, seconds, None
        self.lock = threading.Lock()

    def arm(self, unit, seconds=None, on_the_clock=False):
        with self.lock:
            self.limit = seconds or self.seconds
            self.unit = unit
            self.clock = cputime.Limit(self.meter, self.limit, stall=0,
                                       wall_factor=1.0 if on_the_clock else self.wall_factor)

    def disarm(self):
        with self.lock:
            self.unit, self.clock = None, None

    def run(self):
        while True:
            with self.lock:
                clock, unit, limit = self.clock, self.unit, self.limit
            if clock is None:
                time.sleep(0.2)
                continue
            time.sleep(clock.interval())
            why = clock.check()
            with self.lock:
                late = why is not None and clock is self.clock
            if late:
                self.rec.write(event="watchdog", unit=unit, seconds=limit, why=why.text)
                os._exit(EXIT_WATCHDOG)


def load_module(path):
    spec = importlib.util.spec_from_file_location("student_solution", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["student_solution"] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assignment", required=True, help="whose units (assignments/<name>/gpu)")
    ap.add_argument("--module", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--units", required=True, help="comma-separated unit ids to run")
    ap.add_argument("--sizes", required=True, help="all world sizes of the plan (groups)")
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--pg-timeout", type=float, default=60.0)
    ap.add_argument("--step-timeout", type=float, default=120.0,
                    help="CPU seconds a unit may use on one rank (Watchdog)")
    ap.add_argument("--wall-factor", type=float, default=cputime.WALL_FACTOR,
                    help="a unit's wall-clock backstop, in multiples of --step-timeout")
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
    units = [Unit.parse(u, args.assignment) for u in args.units.split(",") if u]
    watchdog = Watchdog(args.step_timeout, rec, args.wall_factor)
    watchdog.start()

    device = torch.device("cpu")
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)          # before any student code
        device = torch.device("cuda", local_rank)
        counting.use_dispatch(True)
    # the process groups' own timeouts bound their set-up; this only catches a hang beyond them
    watchdog.arm("setup", max(args.step_timeout, 3 * args.pg_timeout + 60), on_the_clock=True)
    try:
        groups = set_up_groups(args, rank, world, device, local_rank)
    except BaseException as exc:  # noqa: BLE001 - the environment, not the student
        rec.write(event="env_error", error=observe.describe(exc),
                  traceback=traceback.format_exc()[-4000:])
        finish(rec, EXIT_ENV)
    watchdog.disarm()

    # the assignment's units, imported before the student's module could plant fakes of them
    own = assignments.get(args.assignment).load("gpu.observe")
    ungrouped = getattr(plan_of(args.assignment), "UNGROUPED", ())
    watchdog.arm("import")
    try:
        module = load_module(args.module)
    except BaseException as exc:  # noqa: BLE001 - anything the solution cells do on import
        rec.write(event="import_error", error=observe.describe(exc),
                  traceback=traceback.format_exc()[-4000:])
        finish(rec, 0)
    watchdog.disarm()

    control_all = groups[world][1]
    # NCCL accepts an uneven all_gather that gloo refuses: the ranks refuse it the same way
    strict = observe.EqualAllGather if args.backend == "nccl" else contextlib.nullcontext
    for unit in units:
        members = unit.members(world)
        fault = None
        seed = seed_of(unit)
        if (unit.kind, unit.step) in ungrouped:    # every rank, the default group hidden
            fault = run_unit(unit, observe.Ctx(module, None, 1, 0, device, None, seed), rec,
                             watchdog, own)
        elif rank in members:
            group, control = groups[unit.size]
            ctx = observe.Ctx(module, group, unit.size, rank - members.start, device, control,
                              seed)
            with strict() if unit.graded else contextlib.nullcontext():
                fault = run_unit(unit, ctx, rec, watchdog, own)
        else:
            rec.write(event="idle", unit=unit.id)
        try:
            faults = [None] * world
            dist.all_gather_object(faults, fault, group=control_all)
        except Exception as exc:  # a rank is gone or stuck: nothing more can run here
            rec.write(event="abort", unit=unit.id,
                      reason=f"control sync: {observe.describe(exc)}")
            finish(rec, EXIT_ABORT)
        if any(faults):
            rec.write(event="abort", unit=unit.id,
                      reason=next(f"rank {r}: {f}" for r, f in enumerate(faults) if f))
            finish(rec, EXIT_ABORT)
    finish(rec, 0)


def set_up_groups(args, rank, world, device, local_rank):
    """{size: (the student's group (None: the default one), the harness's gloo control group)},
    every one warmed up, before the student's module exists."""
    timeout = datetime.timedelta(seconds=args.pg_timeout)
    control_timeout = datetime.timedelta(seconds=3 * args.pg_timeout)
    dist.init_process_group(args.backend, timeout=timeout,
                            **machine.init_options(args.backend, local_rank))
    groups = {world: (None, dist.new_group(backend="gloo", timeout=control_timeout))}
    for p in sorted(int(s) for s in args.sizes.split(",")):
        if p < world:
            ranks = list(range(world - p, world))
            groups[p] = (dist.new_group(ranks, timeout=timeout),
                         dist.new_group(ranks, backend="gloo", timeout=control_timeout))
    warm_up(groups, rank, world, device)
    return groups


def warm_up(groups, rank, world, device):
    """One all-reduce on every group this rank belongs to, and a barrier on its control group:
    a communicator that cannot be set up fails here, charged to the environment."""
    for size, (group, control) in sorted(groups.items()):
        if rank < world - size:
            continue
        t = torch.ones(1, device=device)
        dist.all_reduce(t, group=group)
        if t.item() != size:
            raise RuntimeError(f"warm-up all-reduce over {size} ranks gave {t.item()}")
        dist.barrier(group=control)


def run_unit(unit: Unit, ctx, rec, watchdog, own):
    """Run one unit on this rank (`own`: its assignment's gpu/observe.py) and record what it
    observed; returns a fault description or None."""
    rec.write(event="start", unit=unit.id)
    watchdog.arm(unit.id)
    status, error, extra = "ok", "", {}
    try:
        if unit.kind == "timing":
            extra["timing"] = ctx.phase(lambda: timing.measure(
                ctx, lambda dims: own.timed_layer(ctx, unit.step, dims)))
        else:
            own.UNITS[(unit.kind, unit.step)](ctx)
    except observe.PhaseFailed as exc:
        status, error = "failed", str(exc)
    except Exception as exc:  # the harness itself on bad student objects: a failed unit
        status, error = "failed", observe.describe(exc)
        ctx.note_fault(exc)
    watchdog.disarm()
    kind, fault = ctx.fault or (None, None)
    if fault is not None:
        status = f"{kind}_fault"
    rec.write(event="end", unit=unit.id, status=status, error=error, fault=fault,
              fault_kind=kind, obs=ctx.obs, **extra)
    return fault


def finish(rec, code):
    rec.write(event="bye", code=code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # no destroy_process_group: with a broken peer it can hang


if __name__ == "__main__":
    main()
