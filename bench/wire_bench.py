"""What reading a student's reply costs the judge, before and after the wire's limits, one run.

    python bench/wire_bench.py [--before e945ffc] [--limit 120]

1. The attacks (tests/wire_frames.py): each hostile frame at growing scales, decoded by the
   wire of --before (tpjudge/wire.py as it was at that commit, read with git) and by this one,
   each decode in a fresh process: its CPU seconds and the growth of its peak memory (RSS).
   The ratio is before / after at the largest scale run; where the cost grows faster than the
   frame, the exponent fitted over the scales gives what the old caps allowed one message.
   A decode still running after --limit seconds is stopped and shown as "> limit".
2. The worst frames within this wire's limits (tpjudge.wire.Limits()): CPU seconds and memory.
3. A typical reply (shaped like the largest of the course's catalogue, a run_on_ranks result:
   6 arrays, 20 values; 15 KB here, 23 KB there), a small one, and the judge's "exec" request
   (a cell of 8.7 KB): encode + decode CPU time before and after, in one process, the best of 5
   runs, ratio after / before. The catalogue's seven references exchange ~400 messages per
   notebook.
CPU seconds (getrusage) are what the decode itself used; on a shared machine they move less
than wall time, but still read them as ratios from one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]   # run from a plain checkout too

import numpy as np  # noqa: E402

import wire_frames as frames  # noqa: E402
from tpjudge import wire  # noqa: E402

OLD_MAGIC = b"TPJ1"
# (attack, scales for the old wire, what the old caps allowed: the largest n of one message)
ATTACKS = [
    ("int-key-collisions", (2000, 4000, 8000, 16000), 499_999),    # 1,000,000 values
    ("big-int-strings", (250, 1000, 4000), 62_000),                 # 256 MiB of header
    ("json-big-numbers", (250, 1000, 4000), 67_000),
    ("empty-lists", (100_000, 400_000, 1_600_000), 29_000_000),
    ("shared-buffer", (250, 1000, 4000), 999_999),
    ("opaque-names", (2000, 8000, 32000), 999_999),
    ("repeated-keys", (2000, 8000, 32000), 95_000),
    ("unused-buffers", (1000, 4000, 16000), 100_000),
]

# A fresh process: load a wire (this one, or a file), build the frame, decode it, report.
_RUN = r"""
import json, resource, sys, importlib.util
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import wire_frames as frames
path, attack, n, magic = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5].encode()
if path == "this":
    from tpjudge import wire as codec
else:
    spec = importlib.util.spec_from_file_location("old_wire", path)
    codec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codec)
build = frames.ATTACKS.get(attack) or getattr(frames, attack.replace("-", "_"), None)
if build is None:
    sys.path.insert(0, sys.argv[1] + "/bench")
    import wire_bench
    build = wire_bench.WITHIN[attack]
frame = frames.frame(*build(n), magic=magic)
def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_maxrss * 1024
cpu, rss = usage()
try:
    codec.decode(frame)
    outcome = "decoded"
except codec.ProtocolError as exc:
    outcome = "refused: " + str(exc)[:60]
cpu2, rss2 = usage()
print(json.dumps({"cpu": cpu2 - cpu, "mem": rss2 - rss, "bytes": len(frame), "outcome": outcome}))
"""


def run_one(codec_path, attack, n, magic, limit):
    argv = [sys.executable, "-c", _RUN, str(REPO), codec_path, attack, str(n), magic.decode()]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"cpu": math.inf, "mem": math.nan, "bytes": math.nan, "outcome": "stopped"}
    if done.returncode:
        return {"cpu": math.nan, "mem": math.nan, "bytes": math.nan,
                "outcome": f"crashed: {done.stderr.strip().splitlines()[-1][:60]}"}
    return json.loads(done.stdout)


def _mb(n):
    return "   n/a" if math.isnan(n) else f"{n / 2**20:6.1f}"


def _s(t, limit):
    return f"> {limit:.0f}" if math.isinf(t) else f"{t:8.3f}"


def bench_attacks(old_path, limit):
    print("1. attacks: CPU seconds and memory (MB) of one decode, old wire -> this wire")
    print(f"{'attack':20} {'n':>9} {'frame MB':>8} {'old s':>8} {'old MB':>6} {'new s':>8} "
          f"{'new MB':>6}  old / new     this wire")
    for attack, scales, cap_n in ATTACKS:
        points = []
        for n in scales:
            old = run_one(old_path, attack, n, OLD_MAGIC, limit)
            new = run_one("this", attack, n, wire.MAGIC, limit)
            ratio = old["cpu"] / max(new["cpu"], 1e-3)
            print(f"{attack:20} {n:9} {_mb(new['bytes']):>8} {_s(old['cpu'], limit)} "
                  f"{_mb(old['mem'])} {_s(new['cpu'], limit)} {_mb(new['mem'])}  "
                  f"{ratio:8.0f}x cpu  {new['outcome']}")
            points.append((n, old["cpu"], old["mem"]))
            if math.isinf(old["cpu"]):
                break
        _extrapolate(attack, points, cap_n)


def _extrapolate(attack, points, cap_n):
    """What the old caps allowed: the cost fitted as c * n**k over the last two scales."""
    done = [(n, t, m) for n, t, m in points if math.isfinite(t) and t > 0.02]
    if len(done) < 2:
        return
    (n1, t1, m1), (n2, t2, m2) = done[-2], done[-1]
    k = math.log(t2 / t1) / math.log(n2 / n1)
    at_cap = t2 * (cap_n / n2) ** k
    mem = m2 * cap_n / n2 if m2 > 2**20 else math.nan
    print(f"{'':20} cost ~ n^{k:.1f}: one message at the old caps (n = {cap_n:,}) "
          f"~ {at_cap / 60:,.1f} min CPU" + (f", ~ {mem / 2**30:,.1f} GiB" if mem == mem else ""))


# Frames within this wire's limits, each at the edge of one of them (not attacks: the most a
# reply that the judge accepts can cost).
def _at_header_cap(tree_of, unit_bytes):
    return lambda n: tree_of(wire.Limits().max_header // unit_bytes - 2)


WITHIN = {
    "empty-lists-at-cap": _at_header_cap(frames.empty_lists, 9),
    "nones-at-cap": _at_header_cap(frames.many_values, 6),
    "big-ints-at-cap": _at_header_cap(frames.big_int_strings, 4307),
    "int-keys-at-cap": lambda n: (["d", [[["i", str(k)], ["n"]] for k in range(7000)]], []),
    "array-at-cap": lambda n: (["a", "<f8", [(16 << 20) // 8 - 8], 0], [bytes((16 << 20) - 64)]),
    "astral-text-at-cap": lambda n: (["S", 0], ["\U0001F600".encode() + b"a" * ((16 << 20)
                                                                             - 100)]),
    "arrays-at-cap": lambda n: (["l", [["a", "<f8", [0], i] for i in range(10_000)]],
                                [b""] * 10_000),
}


def bench_within(limit):
    print(f"\n2. the most a reply within this wire's limits costs ({wire.Limits()})")
    for name in WITHIN:
        got = run_one("this", name, 0, wire.MAGIC, limit)
        print(f"{name:20} frame {_mb(got['bytes'])} MB: {got['cpu']:.3f} s CPU, "
              f"{_mb(got['mem'])} MB  ({got['outcome']})")


def typical_messages():
    """Shaped like the catalogue's largest reply (a run_on_ranks result), a small one, and the
    judge's largest request (a cell's source)."""
    rng = np.random.default_rng(0)
    ranks = [(rng.standard_normal((4, 60)).astype(np.float32), rng.standard_normal((60, 8)),
              float(r)) for r in range(3)]
    return {"ranks result (15 KB)": {"op": "result", "value": ranks, "args": [], "kwargs": {},
                                     "out": "", "err": ""},
            "small result": {"op": "result", "value": np.ones((3, 4)), "args": [np.ones(3)],
                             "kwargs": {}, "out": "", "err": ""},
            "exec request (8.7 KB)": {"op": "exec", "name": "sol_column_parallel",
                                      "code": "x = 1  # " + "a" * 8700}}


def bench_typical(old):
    print("\n3. a typical message: encode + decode, microseconds (old -> this wire)")
    for name, message in typical_messages().items():
        times = {}
        for label, codec in (("old", old), ("new", wire)):
            frame = codec.encode(message)
            reps = max(200, int(0.3 / _once(codec, message)))
            best = min(_timed(codec, message, reps) for _ in range(5))
            times[label] = (best * 1e6, len(frame))
        print(f"{name:24} old {times['old'][0]:8.1f} us ({times['old'][1]} B)   "
              f"new {times['new'][0]:8.1f} us ({times['new'][1]} B)   "
              f"new / old {times['new'][0] / times['old'][0]:.2f}")


def _once(codec, message):
    start = time.perf_counter()
    codec.decode(codec.encode(message))
    return max(time.perf_counter() - start, 1e-6)


def _timed(codec, message, reps):
    start = time.process_time()
    for _ in range(reps):
        codec.decode(codec.encode(message))
    return (time.process_time() - start) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="e945ffc",
                    help="commit whose tpjudge/wire.py is the old wire (default: e945ffc, the "
                         "last before the limits)")
    ap.add_argument("--limit", type=float, default=120.0,
                    help="seconds after which one decode is stopped (default 120)")
    args = ap.parse_args(argv)
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{args.before}:tpjudge/wire.py"],
                            capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "old_wire.py"
        old_path.write_text(source)
        spec = importlib.util.spec_from_file_location("old_wire", old_path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        bench_attacks(str(old_path), args.limit)
        bench_within(args.limit)
        bench_typical(old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
