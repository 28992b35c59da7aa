"""Run a function on N CPU ranks with a real torch.distributed process group (gloo).

Used from inside the torch notebooks (their "try it yourself" cells and autograded test
cells) and from the test suite, so that tensor-parallel layers can be exercised on a laptop
with no GPU:

    from tpsim.ranks import run_on_ranks
    outputs = run_on_ranks(my_function, 2, some_arg)   # [result on rank 0, result on rank 1]

How it works, and why:
- The ranks are forked from the calling process (start method "fork"), so functions and
  classes defined in a notebook are available in the ranks without being importable.
- Every rank joins a fresh process group on a free TCP port of 127.0.0.1, with a
  process-group timeout, and sets torch to one thread (the ranks share a few cores).
- A rank's return value comes back through a pipe (tensors are detached copies). What it
  prints to stdout is replayed in the caller, prefixed with the rank; its stderr (gloo's
  C++ warnings among it) is kept and only shown when something goes wrong, so a successful
  test cell writes nothing to stderr.
- A rank that raises makes the call raise `RankError` in the caller, with the rank number
  and the rank's traceback; the other ranks are killed at once (they may be stuck in a
  collective waiting for the failed one).
- A rank that has finished waits for the others before leaving the process group, so a
  collective called on some ranks only (a deadlock) hangs the ranks that called it. `timeout`
  is counted in the CPU time each rank uses (tpsim.cputime; the ranks together may use
  world_size times it: a busy machine makes them take longer, not time out): ranks past it,
  ranks that compute nothing for min(timeout, 10) s (a deadlock: they all wait), or ranks
  still running after WALL_FACTOR * timeout on the clock are killed, and `TimeoutError` names
  the ranks that did not finish and why.
"""
from __future__ import annotations

import datetime
import faulthandler
import io
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import tempfile
import traceback
import warnings
from multiprocessing.connection import wait

from tpsim import cputime

__all__ = ["run_on_ranks", "RankError"]

# A rank's process group outlives the caller's wall-clock backstop by this much, so a deadlock
# is reported by the caller (TimeoutError naming the stuck ranks) rather than by gloo; the
# group timeout is only the backstop that frees ranks if the caller itself is gone.
_PG_GRACE_S = 30.0
# Ranks that compute nothing this long (at most) are waiting for each other: a deadlock.
_STALL_S = 10.0


class RankError(RuntimeError):
    """A rank raised (or died). `.rank`, `.exc_type` (name), `.rank_traceback`, `.original`
    (the exception object when it could be sent back, else None) and `.rank_stderr`."""

    def __init__(self, message, rank, exc_type, rank_traceback, original=None, rank_stderr=""):
        super().__init__(message)
        self.rank = rank
        self.exc_type = exc_type
        self.rank_traceback = rank_traceback
        self.original = original
        self.rank_stderr = rank_stderr


def run_on_ranks(fn, world_size, *args, timeout=60, backend="gloo"):
    """Call `fn(*args)` on `world_size` forked ranks, each in a process group; return the
    list of per-rank return values (index = rank). Inside `fn`, use `dist.get_rank()`.

    Raises RankError when a rank raises or dies, TimeoutError when not every rank has
    finished within `timeout` seconds of CPU time per rank, or when the ranks wait for each
    other (all ranks are killed in both cases). `backend` is
    "gloo" (CPU) by default; with "nccl" rank r uses GPU r, and the caller must not have
    touched CUDA itself (a forked child cannot use a CUDA context it inherited)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    ctx = mp.get_context("fork")
    port = _free_port()
    ranks = []
    try:
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, daemon=True,
                               args=(child_end, fn, args, rank, world_size, port, backend, timeout))
            with warnings.catch_warnings():  # Python >= 3.12 warns about fork with threads
                warnings.simplefilter("ignore", DeprecationWarning)
                proc.start()
            child_end.close()
            ranks.append((proc, parent_end))
        results = _collect(ranks, timeout)
        for _, conn in ranks:  # every rank is done: let them leave the group together
            _send_quietly(conn, "go")
        for proc, _ in ranks:
            proc.join(timeout=10)
        return results
    finally:
        _kill_all(ranks)


# -- the caller's side ----------------------------------------------------------------------
def _collect(ranks, timeout):
    """Per-rank results in rank order; raises on the first failure or past the limits."""
    meter = cputime.Meter(*(proc.pid for proc, _ in ranks))     # the ranks, and their children
    limit = cputime.Limit(meter, timeout * len(ranks), stall=min(timeout, _STALL_S),
                          wall_factor=cputime.WALL_FACTOR / len(ranks))
    limit.waiting()
    results, stdout = {}, {}
    pending = {conn: rank for rank, (_, conn) in enumerate(ranks)}
    sentinels = {proc.sentinel: rank for rank, (proc, _) in enumerate(ranks)}
    while pending:
        ready = wait(list(pending) + list(sentinels), timeout=limit.interval())
        if not ready:
            why = limit.check()
            if why is None:
                continue
            _replay_stdout(stdout)
            _raise_timeout(sorted(pending.values()), sorted(results), len(ranks), why, timeout)
        for obj in ready:
            if obj in pending:
                rank = pending.pop(obj)
                try:
                    reply = pickle.loads(obj.recv_bytes())
                except (EOFError, OSError):
                    reply = ("died", None, "")
                except Exception as exc:  # noqa: BLE001 (a result the caller cannot unpickle)
                    reply = ("error", (type(exc).__name__, f"cannot unpickle the result: {exc}",
                                       "", None, ""), "")
                _handle_reply(rank, reply, results, stdout, ranks)
            elif obj in sentinels:
                rank = sentinels.pop(obj)
                conn = ranks[rank][1]
                if conn in pending and not conn.poll():  # exited without a word
                    pending.pop(conn)
                    _handle_reply(rank, ("died", None, ""), results, stdout, ranks)
    _replay_stdout(stdout)
    return [results[r] for r in range(len(ranks))]


def _handle_reply(rank, reply, results, stdout, ranks):
    kind, payload, out = reply[0], reply[1], reply[2]
    stdout[rank] = out
    if kind == "ok":
        results[rank] = payload
        return
    _replay_stdout(stdout)
    if kind == "died":
        proc = ranks[rank][0]
        proc.join(timeout=1)
        raise RankError(f"rank {rank} of {len(ranks)} exited (code {proc.exitcode}) without "
                        f"returning a result", rank, "exit", "")
    exc_type, message, tb, original, err = payload
    detail = f"\n--- stderr of rank {rank} ---\n{err.rstrip()}" if err.strip() else ""
    raise RankError(f"rank {rank} of {len(ranks)} raised {exc_type}: {message}\n"
                    f"--- traceback on rank {rank} ---\n{tb.rstrip()}{detail}",
                    rank, exc_type, tb, original, err)


def _raise_timeout(stuck, done, world_size, why, timeout):
    hint = ("a collective called on some ranks only (a deadlock: every rank must make the "
            "same collective calls in the same order), or a rank that never returns")
    if why.kind == "cpu":
        hint = "an infinite loop, or far more work than the layer needs"
    finished = f"; ranks {done} finished" if done else ""
    raise TimeoutError(f"ranks {stuck} of {world_size} did not finish: the ranks {why.text} "
                       f"(each may use {timeout} s){finished}. Likely {hint}. All ranks were "
                       "killed.")


def _replay_stdout(stdout):
    for rank in sorted(stdout):
        for line in stdout.pop(rank).splitlines():
            print(f"[rank {rank}] {line}")


def _kill_all(ranks):
    for proc, conn in ranks:
        if proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.join(timeout=5)
        conn.close()


def _send_quietly(conn, msg):
    try:
        conn.send(msg)
    except (BrokenPipeError, OSError):
        pass


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a rank's side --------------------------------------------------------------------------
def _rank_main(conn, fn, args, rank, world_size, port, backend, timeout):
    """Body of a forked rank. Never returns: os._exit keeps the caller's atexit handlers
    (a Jupyter kernel's, pytest's) from running in the child."""
    _die_with_parent()
    out_buf, err_file = _capture_output()
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        if backend == "nccl":  # one GPU per rank (the caller must not have initialised CUDA)
            torch.cuda.set_device(rank % torch.cuda.device_count())
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        pg_timeout = cputime.WALL_FACTOR * timeout + _PG_GRACE_S
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        reply = ("ok", _detached(fn(*args)))
    except BaseException as exc:  # noqa: BLE001 (everything goes back to the caller)
        reply = ("error", _describe(exc, err_file))
    out = out_buf.getvalue()
    try:
        blob = pickle.dumps((*reply, out))
    except Exception as exc:  # noqa: BLE001 (an unpicklable return value)
        blob = pickle.dumps(("error", _describe(exc, err_file), out))
    try:
        conn.send_bytes(blob)
        if reply[0] == "ok":
            conn.recv()  # wait for "go": the others may still need this rank in a collective
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    finally:
        os._exit(0)


def _describe(exc, err_file):
    frames = exc.__traceback__
    if frames is not None and frames.tb_next is not None:
        frames = frames.tb_next  # drop this module's own frame: start at the user's code
    tb = "".join(traceback.format_exception(type(exc), exc, frames))
    try:
        pickle.loads(pickle.dumps(exc))
        original = exc
    except Exception:  # noqa: BLE001
        original = None
    return type(exc).__name__, str(exc), tb, original, _read(err_file)


def _capture_output():
    """Send this rank's prints to a buffer and its stderr (Python and C++) to a file."""
    err_file = tempfile.TemporaryFile(mode="w+")
    os.dup2(err_file.fileno(), 2)
    if faulthandler.is_enabled():  # the caller's (pytest's) holds its own copy of the old stderr
        faulthandler.enable(file=err_file)  # a crashing rank's dump joins what the rank said
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # C-level stdout: nothing of value, keep it off the caller's
    os.close(devnull)
    out_buf = io.StringIO()
    sys.stdout = out_buf
    sys.stderr = err_file
    return out_buf, err_file


def _read(err_file):
    try:
        err_file.flush()
        err_file.seek(0)
        return err_file.read()[-8000:]
    except Exception:  # noqa: BLE001
        return ""


def _die_with_parent():
    """Ask Linux to kill this rank if the caller dies (no orphaned ranks)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 (not Linux: the pipe's EOF still ends the rank)
        pass


def _detached(obj):
    """Tensors as plain detached copies (a tensor with autograd history cannot be pickled)."""
    try:
        import torch
    except ImportError:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _detached(v) for k, v in obj.items()}
    return obj
