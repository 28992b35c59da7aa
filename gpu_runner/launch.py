"""Grade one extracted submission: torchrun launches (one, unless a fault forces a relaunch)
and the reading of what the ranks recorded.

One launch runs every unit of the plan at every world size. When a unit faults (a deadlock, a
crash, a rank that left, a loop), the job ends; the units that finished keep their results,
the faulty unit and the units it makes pointless (plan.skipped_by_fault) score 0 with the
reason, and the rest run in a relaunch, at most `max_launches` launches in all.

Layout of one launch, <workdir>/launch<N>/: torchrun.log and supervisor.json (the grader's)
and ranks/, the job's working folder, where each rank appends its records. With a
confinement (`Config.wrap`, the grading sandbox) the job can write nothing but ranks/ and
reads the submission from a copy there; the grader then reads ranks/ without following links,
at most records.MAX_BYTES_PER_RANK per rank, parsed within records' limits (a record that
breaks them fails the units its rank left unfinished), and judges what the ranks observed
here, in its own process (gpu_runner.judge).

A launch whose process groups could not be set up (or that never started) says nothing about
the student: `EnvironmentFailure`, the student is not graded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpsim import cputime

from . import machine, records, report
from .judge import judge
from .plan import Unit, skipped_by_fault
from .records import MAX_BYTES_PER_RANK, MAX_TEXT

_LOG_TAIL = 1 << 20     # of torchrun.log, read for its failure summary (ranks print there too)

_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")


@dataclass
class Config:
    sizes: tuple = (1, 2, 3, 4)
    backend: str = "gloo"
    pg_timeout: float = 60.0        # a collective waiting longer than this fails (deadlock)
    # CPU seconds (tpsim.cputime), each with a wall-clock backstop wall_factor times longer:
    step_timeout: float = 0.0       # a unit using more on a rank is killed (loop); 0: 2 * pg
    launch_timeout: float = 900.0   # the whole launch, its processes together
    wall_factor: float = cputime.WALL_FACTOR
    max_launches: int = 4
    env: dict = field(default_factory=dict)
    # wrap(torchrun_argv, job_dir, env) -> argv: the confinement (tpsandbox.for_torchrun)
    # the job runs in. It must leave job_dir writable (the records, a copy of the module) and
    # pass `env` (PYTHONPATH, NCCL_*, ...) to the job; None runs torchrun as the grader.
    wrap: object = None

    @property
    def world(self) -> int:
        return max(self.sizes)

    @property
    def unit_timeout(self) -> float:
        return self.step_timeout or 2 * self.pg_timeout


class EnvironmentFailure(RuntimeError):
    """The launch could not set up its process groups or never started: nothing of the
    student's ran, so nothing can be scored (the student is reported as not graded)."""


@dataclass
class UnitResult:
    unit: Unit
    checks: dict            # name -> (ok, detail), merged over the unit's ranks
    status: str             # ok | failed | fault | skipped | not_run
    reason: str = ""
    timing: dict | None = None


def run_submission(module: Path, workdir: Path, plan: list[Unit], cfg: Config):
    """-> ({unit id: UnitResult}, [launch summaries])."""
    results: dict[str, UnitResult] = {}
    launches = []
    while len(launches) < cfg.max_launches:
        todo = [u for u in plan if u.id not in results]
        if not todo:
            break
        out = Path(workdir) / f"launch{len(launches)}"
        out.mkdir(parents=True, exist_ok=True)
        sup = _launch(module, out, todo, cfg, len(launches))
        records = _read_records(out)
        summary = {"units": len(todo), **sup}
        launches.append(summary)
        progress = _interpret(records, todo, cfg, sup, (out / "torchrun.log"), results)
        summary["completed"] = progress
        if progress == 0:
            break
    for u in plan:
        if u.id not in results:
            why = (f"not run: gave up after {len(launches)} launches" if launches
                   and len(launches) >= cfg.max_launches else "not run: the launch failed")
            results[u.id] = _failed(u, "not_run", why + _launch_hint(launches))
    return results, launches


def _launch_hint(launches):
    """Why the last launch gave no result, in words a student can use (no grader paths)."""
    if not launches or launches[-1].get("completed"):
        return ""
    last = launches[-1]
    return f" (torchrun exit {last['rc']}{_limit_reached(last)})"


def _limit_reached(sup) -> str:
    """", the launch's time limit reached (it ...)", or "" when it was not."""
    if not sup.get("timed_out"):
        return ""
    return ", the launch's time limit reached" + (f" (it {sup['why']})" if sup.get("why") else "")


def grade_module(name, module: Path, folder: Path, plan, cfg, assignment, notebook, cells):
    """Grade one extracted module (a student's, or the source's own solution): its launches,
    then its report (the caller writes it). Raises EnvironmentFailure."""
    start = time.monotonic()
    results, launches = run_submission(module, folder / "runs", plan, cfg)
    return report.build(name, assignment, notebook, cells, plan, results, launches, cfg,
                        time.monotonic() - start)


# What a confined job gets from the launch's environment (a sandbox starts from an empty one):
# these names, the NCCL_*/TORCH_NCCL_*/GLOO_* settings machine.job_env leaves, and Config.env.
_JOB_ENV = ("PYTHONPATH", "LD_LIBRARY_PATH", "OMP_NUM_THREADS")
_JOB_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_")


def job_pythonpath() -> str:
    """A job's PYTHONPATH: this checkout first (the ranks import gpu_runner), then ours."""
    return os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                         os.environ.get("PYTHONPATH")]))


def job_environment(backend) -> tuple[dict, list[str]]:
    """(the environment of a launch, the site variables dropped from it): machine.job_env's
    rules, one BLAS thread per rank, and this checkout on PYTHONPATH."""
    env, dropped = machine.job_env(dict(os.environ), backend)
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": job_pythonpath()}, dropped


def confined_env(env: dict) -> dict:
    """What a confined job gets of `env` (the sandbox starts from an empty environment)."""
    return {k: v for k, v in env.items() if k in _JOB_ENV or k.startswith(_JOB_PREFIXES)}


def job_dir(out) -> Path:
    """The working folder of the ranks of the launch in `out`, where they write their records."""
    return Path(out) / "ranks"


def _launch(module, out, todo, cfg, index):
    """One supervised torchrun job; returns the supervisor's result plus the log path."""
    job = job_dir(out)
    job.mkdir(parents=True, exist_ok=True)
    if cfg.wrap is not None:      # a confined job reads nothing of the grader's but its folder
        module = Path(shutil.copyfile(module, job / "solution.py"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                # the rendezvous by address: no lookup of the host name (in a sandbox it
                # resolves only through the sandbox's /etc/hosts; an unresolvable one makes
                # every rank retry for as long as the launch may last)
                "--local-addr=127.0.0.1",
                "--nnodes=1", f"--nproc-per-node={cfg.world}", "--max-restarts=0",
                "-m", "gpu_runner.worker", "--assignment", todo[0].assignment,
                "--module", str(module), "--out", str(job),
                "--units", ",".join(u.id for u in todo),
                "--sizes", ",".join(map(str, sorted(cfg.sizes))),
                "--backend", cfg.backend, "--pg-timeout", str(cfg.pg_timeout),
                "--step-timeout", str(cfg.unit_timeout), "--wall-factor", str(cfg.wall_factor),
                "--launch", str(index)]
    env = {**job_environment(cfg.backend)[0], **cfg.env}
    if cfg.wrap is not None:
        torchrun = cfg.wrap(torchrun, job, {**confined_env(env), **cfg.env})
    # The grader's files sit next to ranks/, out of the job's reach (a confined job could
    # otherwise plant a link where the supervisor writes its result).
    result_file = out / "supervisor.json"
    cmd = [sys.executable, "-m", "gpu_runner.supervise", "--timeout", str(cfg.launch_timeout),
           "--wall-factor", str(cfg.wall_factor), "--result", str(result_file), "--", *torchrun]
    log = out / "torchrun.log"
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(job),
                       timeout=cfg.launch_timeout * cfg.wall_factor + 60)
    sup = json.loads(result_file.read_text())
    return {"rc": sup["rc"], "timed_out": sup["timed_out"], "why": sup.get("why", ""),
            "seconds": round(sup["seconds"], 2), "killed": len(sup["killed"]), "log": str(log)}


def _read_records(out):
    """{rank: [records]} from ranks/rank<R>.jsonl: regular files only, never through a link
    (the job owns the folder), at most MAX_BYTES_PER_RANK each (a line cut there is dropped),
    parsed by records.parse."""
    texts = {}
    for path in job_dir(out).glob("rank*.jsonl"):
        try:
            rank = int(path.stem[4:])
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (ValueError, OSError):
            continue
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            texts[rank] = f.read(MAX_BYTES_PER_RANK).decode("utf-8", errors="replace")
    return records.parse(texts)


def _interpret(rank_records, todo, cfg, sup, log, results) -> int:
    """Fill `results` from one launch's records; returns how many units got a result. Raises
    EnvironmentFailure when the launch never got as far as the student's code."""
    world = cfg.world
    ends, starts, watchdog, rejected = {}, {}, {}, {}
    import_errors, env_errors = [], []
    for rank, rows in rank_records.items():
        for row in rows:
            ev, unit = row.get("event"), row.get("unit")
            if ev == "rejected":
                rejected.setdefault(rank, str(row.get("why", ""))[:MAX_TEXT])
            elif ev == "start" and isinstance(unit, str):
                starts.setdefault(unit, set()).add(rank)
            elif ev == "end" and isinstance(unit, str):
                ends.setdefault(unit, {})[rank] = row
            elif ev == "watchdog":
                watchdog[rank] = row
            elif ev == "import_error":
                import_errors.append(str(row.get("error", ""))[:500])
            elif ev == "env_error":
                env_errors.append(f"rank {rank}: {str(row.get('error', ''))[:500]}")
    for w in watchdog.values():
        if w.get("unit") == "setup":
            env_errors.append(f"setting up the process groups took over {w.get('seconds')}s")
    if env_errors or not rank_records:
        why = env_errors[0] if env_errors else (
            f"no rank started (torchrun exit {sup['rc']}{_limit_reached(sup)})")
        raise EnvironmentFailure(f"the process groups could not be set up, before any student "
                                 f"code ran: {why}; see {log}")
    if not import_errors and any(w.get("unit") == "import" for w in watchdog.values()):
        import_errors = [f"still importing after {cfg.unit_timeout:.0f}s"]
    if import_errors:
        for u in todo:
            results[u.id] = _failed(u, "failed",
                                    f"the solution cells fail on import: {import_errors[0]}")
        return len(todo)

    before = len(results)
    for u in todo:
        members = list(u.members(world))
        got = ends.get(u.id, {})
        if all(r in got for r in members) and not any(got[r].get("fault") for r in members):
            results[u.id] = _merge(u, {r - members[0]: got[r] for r in members})
            continue
        if not starts.get(u.id) and not any(w.get("unit") == u.id for w in watchdog.values()):
            continue   # never reached (an earlier fault ended the launch)
        reason = _fault_reason(u, members, got, starts.get(u.id, set()), watchdog, rejected,
                               sup, log)
        results[u.id] = _failed(u, "fault", reason)
        kind = next((got[r].get("fault_kind") for r in members
                     if r in got and got[r].get("fault")), None)
        for other in skipped_by_fault(u, [t for t in todo if t.id not in results], kind):
            results[other.id] = _failed(other, "skipped",
                                        f"not run after the fault in {u.id}")
        break
    return len(results) - before


_SOURCE_LOCATION = re.compile(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


def _fault_reason(u, members, got, started, watchdog, rejected, sup, log):
    """One line: what happened on which ranks (group ranks), the same story told once."""
    by_story: dict[str, list[int]] = {}
    exits = _exit_codes(log)
    for r in members:
        story = None
        if r in got and got[r].get("fault"):
            story = (f"a sticky CUDA error, the rank was relaunched: {_short(got[r]['fault'])}"
                     if got[r].get("fault_kind") == "cuda" else
                     f"collective failed: {_short(got[r]['fault'])}")
        elif r in started and r not in got and r in rejected:
            story = f"its report was not valid data ({rejected[r]})"
        elif watchdog.get(r, {}).get("unit") == u.id:
            late = str(watchdog[r].get("why") or f"ran past {watchdog[r]['seconds']:.0f}s")
            story = f"still running: it {late} (an infinite loop or a hang), killed"
        elif r in started and r not in got:
            code = exits.get(r)
            if code is not None and code < 0:
                story = f"died of signal {_signal_name(-code)}"
            elif code is not None:
                story = f"exited with code {code} in the middle of the test"
            elif not sup["timed_out"]:
                story = "left in the middle of the test (os._exit / sys.exit?)"
        if story:
            by_story.setdefault(story, []).append(r - members[0])
    reasons = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} of {u.size}: {story}"
               for story, rs in by_story.items()]
    if sup["timed_out"]:
        reasons.append(f"{_limit_reached(sup)[2:]}; every worker was killed")
    return "; ".join(reasons) or "the job ended during this test"


def _short(fault: str) -> str:
    """A backend's error in one sentence, with what it most likely means (the regular
    expression reads a bounded prefix: on a long text its backtracking is quadratic)."""
    text = _SOURCE_LOCATION.sub("", fault[:MAX_TEXT * 4])
    text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return f"{text} (deadlock? a collective not called on every rank)"
    if "connection closed" in low or "connection reset" in low or "broken pipe" in low:
        return f"{text} (a peer rank left or crashed)"
    return text


def _exit_codes(log):
    """{global rank: exit code} from torchrun's failure summary (ChildFailedError)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - _LOG_TAIL, 0))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return {}
    codes = {}
    for rank, code in _FAILURE.findall(text):
        codes.setdefault(int(rank), int(code))
    return codes


def _signal_name(num):
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def _merge(u: Unit, ends: dict) -> UnitResult:
    """A unit's result from its ranks' "end" records (group rank -> record): the verdicts are
    the judge's; the ranks only reported what they observed."""
    checks = judge(u, ends) if u.graded else {}
    statuses = {row.get("status") for row in ends.values()}
    errors = [row["error"] for row in ends.values() if isinstance(row.get("error"), str)
              and row["error"]]
    return UnitResult(u, checks, "ok" if statuses == {"ok"} else "failed",
                      errors[0] if errors else "", _timing(u, ends))


def _timing(u: Unit, ends: dict) -> dict | None:
    """The mean over the ranks of their measured times (ungraded: as the ranks say)."""
    keys = ("total_ms", "comm_ms", "compute_ms")
    rows = [row.get("timing") for row in ends.values()]
    if u.kind != "timing" or not all(isinstance(t, dict) and all(
            isinstance(t.get(k), (int, float)) for k in keys) for t in rows):
        return None
    return {k: sum(t[k] for t in rows) / len(rows) for k in keys}


def _failed(u: Unit, status: str, reason: str) -> UnitResult:
    return UnitResult(u, {name: (False, reason) for name in u.checks()}, status, reason)
