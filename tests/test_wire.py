"""Reading what a student's process sends is bounded in time and memory (tpjudge.wire, the
judge's receive in tpjudge.session, and the gpu_runner's rank records).

Time is asserted as work, never as a wall-clock figure: the decoder's own counts (values
decoded, bytes copied out of buffers) must stay linear in the frame's size, an attack must be
refused before its costly part (the count at which it stopped), and no accepted dict may hold
int keys that share a hash (the one structure whose cost grows faster than its bytes).
Memory is asserted with tracemalloc (deterministic: the allocations depend on the input only).
A few tests also run under a wall-clock guard 100-1000 times what they need, so that a
regression fails them instead of hanging the suite. The fuzz tests are derandomized, with a
fixed number of examples: the same frames on every run.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import socket
import struct
import threading
import time
import tracemalloc
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import wire_frames as frames
from tpjudge import session, wire
from tpjudge.errors import StudentGone
from tpjudge.settings import Judge

FUZZ = settings(derandomize=True, max_examples=150, deadline=None, database=None,
                print_blob=False, suppress_health_check=list(HealthCheck))
LIMITS = wire.Limits()


@contextlib.contextmanager
def wall_guard(seconds):
    """Fail (instead of hanging the suite) when the body runs past `seconds`: a backstop
    hundreds of times what the body needs, not a timing assertion."""
    def expire(*_):
        raise AssertionError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def decode_counted(frame, limits=LIMITS, deadline=None):
    """(the value or the ProtocolError, the decoder that read it or None), asserting what every
    read of a frame must keep to: only ProtocolError, and work linear in the frame's size."""
    made = []

    class Counting(wire._Decoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    with mock.patch.object(wire, "_Decoder", Counting):
        try:
            outcome = wire.decode(frame, limits, deadline)
        except wire.ProtocolError as exc:
            outcome = exc
    decoder = made[0] if made else None
    if decoder is not None:
        header = len(frame) - sum(map(len, decoder.buffers))
        # each value takes at least 5 bytes of header (["n"]); each buffer is copied once
        assert decoder.items <= min(header // 4 + 1, limits.max_items + 1)
        assert decoder.copied <= len(frame)
    if not isinstance(outcome, wire.ProtocolError):
        _assert_cheap_to_hold(outcome)
    return outcome, decoder


def _assert_cheap_to_hold(value, depth=0):
    """No dict whose int keys pile up on one hash; no more Opaque types than the limit."""
    assert depth <= wire.MAX_DEPTH + 1
    if type(value) in (list, tuple):
        for v in value:
            _assert_cheap_to_hold(v, depth + 1)
    elif type(value) is dict:
        hashes = [hash(k) for k in value if type(k) is int]
        assert max((hashes.count(h) for h in set(hashes)), default=0) <= 10
        for v in value.values():
            _assert_cheap_to_hold(v, depth + 1)


def peak_memory(fn):
    """Bytes allocated at the peak of fn() (numpy's buffers included)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with contextlib.suppress(wire.ProtocolError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- each attack, refused where it starts to cost (each of these decodes on the old wire) ------
@pytest.mark.parametrize("attack, n, says, stopped_within", [
    ("int-key-collisions", 6_000, "int within 64 bits", 20),
    ("repeated-keys", 2_000, "a dict key that repeats", 30),
    ("shared-buffer", 2_000, "used twice", 10),
    ("unused-buffers", 100, "a buffer that no value uses", 1),
    ("opaque-names", 5_000, "more than 64 types", 70),
    ("float-string", 100_000, "malformed value of tag 'f'", 1),
    ("shaped-scalars", 10, "a numpy scalar with a shape", 1),
])
def test_an_attack_is_refused_before_its_cost(attack, n, says, stopped_within):
    outcome, decoder = decode_counted(frames.frame(*frames.ATTACKS[attack](n)))
    assert isinstance(outcome, wire.ProtocolError) and says in str(outcome)
    assert decoder.items <= stopped_within


@pytest.mark.parametrize("attack, n, says", [
    ("big-int-strings", 100, "a header of 430"),      # 430 KB of 4300-digit ints
    ("empty-lists", 40_000, "a header of 360"),       # 40,000 lists, 8 MB once decoded
    ("json-big-numbers", 1, "a number too long"),
])
def test_a_header_is_capped_and_its_numbers_are_short(attack, n, says):
    outcome, _ = decode_counted(frames.frame(*frames.ATTACKS[attack](n)))
    assert isinstance(outcome, wire.ProtocolError) and says in str(outcome)


@pytest.mark.parametrize("dtype, shape, size", [
    ("|V0", [2**62], 0), ("<U0", [10**9], 0), ("|S0", [3], 0), ("|O8", [1], 8),  # no such dtype
    ("<f8", [2**63, 0], 0), ("<f8", [-1], 0), ("<f8", [True], 8), ("<f8", [1.0], 8),
    ("<f8", [1] * 33, 8), ("<f8", [0, 2**62, 2**62], 0), ("<f8", [2**40, 2**40], 0),
    ("<f8", [3], 16),
])
def test_an_array_is_never_larger_than_its_buffer(dtype, shape, size):
    outcome, _ = decode_counted(frames.frame(["a", dtype, shape, 0], [bytes(size)]))
    assert isinstance(outcome, wire.ProtocolError)


def test_the_number_of_values_is_capped():
    limits = wire.Limits(max_items=1000)
    outcome, decoder = decode_counted(frames.frame(*frames.many_values(5000)), limits)
    assert "more than 1000 values" in str(outcome) and decoder.items == 1001
    outcome, _ = decode_counted(frames.frame(*frames.unused_buffers(1001)), limits)
    assert "1001 buffers, over the limit" in str(outcome)


def test_a_frame_shared_buffer_costs_one_copy_not_one_per_array():
    """2,000 arrays on one 64 KiB buffer were 128 MiB in the grader; now one copy at most."""
    frame = frames.frame(*frames.shared_buffer(2000))
    assert peak_memory(lambda: wire.decode(frame)) < 4 * len(frame) + (1 << 20)


def test_opaque_types_do_not_pile_up_in_the_judge():
    before = set(wire.Opaque._classes)
    for batch in range(40):       # a class of students, each with its own type names
        names = [["x", f"T{batch}_{i}"] for i in range(wire.MAX_TYPE_NAMES)]
        wire.decode(frames.frame(["l", names]))
    assert len(wire.Opaque._classes) <= wire.Opaque._MAX_CLASSES
    assert type(wire.decode(frames.frame(["x", "Linear"]))).__name__ == "Linear"
    wire.Opaque._classes = {k: v for k, v in wire.Opaque._classes.items() if k in before}


def test_decoding_stops_at_its_deadline():
    frame = frames.frame(*frames.many_values(40_000))
    outcome, decoder = decode_counted(frame, deadline=time.monotonic() - 1)
    assert "within the time limit" in str(outcome) and decoder.items == 0
    deadline = time.monotonic() + 3600
    with mock.patch.object(wire.time, "monotonic", side_effect=[0.0, 0.0] + [1e9] * 10):
        outcome, decoder = decode_counted(frame, deadline=deadline)
    assert "within the time limit" in str(outcome) and decoder.items == wire._CHECK_EVERY


def test_what_the_sender_refuses_is_what_the_receiver_would():
    """A value over the limits fails to send, with the reason, on the sending side."""
    limits = wire.Limits(max_bytes=1 << 16, max_header=1 << 12, max_items=500)
    for value, says in [(np.zeros(10_000), "over the limit of 0.0625 MiB"),
                        ([1.25e-300] * 400, "structure ("), (list(range(600)), "more than 500"),
                        ({2**64: 1}, "keys must be str or int within 64 bits"),
                        ({(0, 1): 1}, "a dict key of type tuple"), (10**5000, "digits"),
                        ([type(f"T{i}", (), {})() for i in range(65)], "more than 64 types")]:
        with pytest.raises(wire.ProtocolError, match=re.escape(says)):
            wire.encode(value, limits=limits)
    assert wire.decode(wire.encode("é" * 100 + "\ud800"), LIMITS) == "é" * 100 + "\ud800"


# -- the judge's receive: bounded by the call's deadline ---------------------------------------
def test_a_trickling_sender_cannot_stretch_a_wait():
    """One byte every 50 ms of a 364-byte frame: a 0.5 s wait ends at 0.5 s (each read used
    to get the whole wait again, so the frame kept it going for 18 s)."""
    data = frames.frame(["l", [["s", "x" * 60]] * 5])
    assert len(data) == 364
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle():
        for byte in data:
            if stop.wait(0.05):
                return
            with contextlib.suppress(OSError):
                a.send(bytes([byte]))
    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        with wall_guard(60), pytest.raises(TimeoutError):
            wire.Channel(b).receive(timeout=0.5)
    finally:
        stop.set()
        sender.join()
        a.close()
        b.close()


def test_a_frame_cut_by_a_timeout_is_resumed():
    data = wire.encode({"op": "result", "value": np.arange(100.0)})
    a, b = socket.socketpair()
    with a, b:
        channel = wire.Channel(b)
        a.sendall(data[:40])
        with pytest.raises(TimeoutError):
            channel.receive(timeout=0.05)
        a.sendall(data[40:])
        got = channel.receive(timeout=5)
    assert got["op"] == "result" and np.array_equal(got["value"], np.arange(100.0))


def test_a_reply_that_came_in_time_is_taken_however_late_the_judge_reads_it():
    data = wire.encode({"op": "result", "value": np.arange(1000.0)})
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        got = wire.Channel(b).receive(deadline=time.monotonic() - 10, decode_within=5)
    assert np.array_equal(got["value"], np.arange(1000.0))


def test_a_frame_over_the_header_limit_is_refused_unread():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("!4sII", wire.MAGIC, 1 << 30, 0))
        with pytest.raises(wire.ProtocolError, match="a header of 1073741824 bytes, over"):
            wire.Channel(b).receive(timeout=5)


def test_a_send_waits_for_its_own_timeout_whatever_the_last_receive_left():
    a, b = socket.socketpair()
    with a, b:
        channel = wire.Channel(b)
        with pytest.raises(TimeoutError):
            channel.receive(deadline=time.monotonic() - 1)     # leaves the socket non-blocking
        got = []
        reader = threading.Thread(target=lambda: (time.sleep(0.3),
                                                  got.append(wire.Channel(a).receive(timeout=30))))
        reader.start()
        channel.send({"x": np.zeros(1 << 20)}, timeout=30)     # 8 MiB: waits for the reader
        reader.join()
        assert got[0]["x"].shape == (1 << 20,)
        with pytest.raises(TimeoutError):                      # nobody reads: it gives up
            channel.send({"x": np.zeros(1 << 20)}, timeout=0.2)


# -- a student's process that sends them --------------------------------------------------------
@pytest.fixture(scope="module")
def forger(tmp_path_factory):
    """A student's process whose code writes frames of its own onto the judge's socket."""
    def start(timeout=10):
        started = session.start(str(tmp_path_factory.mktemp("forger")),
                                Judge(timeout=timeout, interrupt_grace=0.5))
        _run(started, "import os, sys, time\n"
                      "def send(frame):\n    os.write(int(sys.argv[1]), frame.tobytes())\n"
                      "    time.sleep(30)\n"
                      "def trickle(frame):\n    for b in frame.tobytes():\n"
                      "        os.write(int(sys.argv[1]), bytes([b]))\n"
                      "        try:\n            time.sleep(0.2)\n"
                      "        except KeyboardInterrupt:\n            pass\n")
        return started
    return start


def _run(student, code, name="cell"):
    with student.cell_limit(name):
        return student.run_cell(name, code)


@pytest.mark.parametrize("attack, n, says", [
    ("int-key-collisions", 6_000, "a dict key that is not a str or an int within 64 bits"),
    ("int-key-collisions", 200_000, "bytes, over the limit of 262144"),
    ("shared-buffer", 5_000, "a buffer index out of range or used twice"),
    ("empty-lists", 1_000_000, "a header of 9000007 bytes, over the limit of 262144"),
])
def test_a_forged_reply_fails_that_student_with_the_reason(forger, attack, n, says):
    """On the old wire the first two held the judge for seconds and for hours (6,000 and
    200,000 keys that share a hash), the third took 320 MiB of the grader's memory, the last
    about 1 GiB."""
    student = forger()
    frame = frames.frame(*frames.ATTACKS[attack](n))
    try:
        with wall_guard(120), pytest.raises(StudentGone) as caught, student.cell_limit("test"):
            session.StudentObject(student, "send")(np.frombuffer(frame, np.uint8))
        assert "stopped in test: the reply was not valid data: " in str(caught.value)
        assert says in str(caught.value)
        with pytest.raises(StudentGone, match="not valid data"), student.cell_limit("next"):
            session.StudentObject(student, "send")(np.zeros(0, np.uint8))
    finally:
        student.close()


@pytest.mark.slow                  # waits out a limit
def test_a_trickled_reply_ends_at_the_cell_limit_and_its_grace(forger):
    """A frame that says 100 KB of header follows, then a byte every 0.2 s, interrupts
    ignored: the wait ends at the cell's limit (1 s) plus its grace (0.5 s), not when the
    sender stops (200 s here; each read used to get the cell's whole limit again)."""
    student = forger(timeout=1)
    head = struct.pack("!4sII", wire.MAGIC, 100_000, 0)
    try:
        with wall_guard(60), pytest.raises(StudentGone, match="did not stop within 0.5 s"), \
                student.cell_limit("test"):
            session.StudentObject(student, "trickle")(np.frombuffer(head + b"[" * 1000, np.uint8))
    finally:
        student.close()


# -- fuzz: random, mutated and adversarial frames ---------------------------------------------
_DTYPES = [np.dtype(d) for d in sorted(wire.DTYPES)]
_keys = st.one_of(st.text(max_size=80), st.integers(-2**63 + 1, 2**63 - 1))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=100),
    st.text(st.characters(codec=None, categories=["Cs", "Lo", "So"]), max_size=80),
    hnp.arrays(st.sampled_from(_DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                          max_side=4)),
    st.sampled_from(_DTYPES).map(lambda d: np.zeros((), d)[()]))
values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.lists(inner, max_size=6).map(tuple),
    st.dictionaries(_keys, inner, max_size=6)), max_leaves=30)


def _same(a, b):
    if isinstance(a, np.ndarray) or isinstance(a, np.generic):
        return type(a) is type(b) and a.dtype == b.dtype and a.shape == np.shape(b) \
            and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@FUZZ
@given(values)
def test_fuzz_every_value_crosses_whole_or_is_refused_on_sending(value):
    try:
        frame = wire.encode(value)
    except wire.ProtocolError:
        return
    got, _ = decode_counted(frame)
    assert _same(value, got)


@FUZZ
@given(values, st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "digits"]),
                                  st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
                        min_size=1, max_size=4))
def test_fuzz_a_mutated_real_frame_is_refused_or_decoded(value, mutations):
    try:
        frame = bytearray(wire.encode(value))
    except wire.ProtocolError:
        return
    for op, at, data in mutations:
        at %= len(frame) + 1
        if op == "flip":
            frame[at:at + len(data)] = bytes(x ^ y for x, y in zip(frame[at:], data))
        elif op == "cut":
            del frame[at:]
        elif op == "insert":
            frame[at:at] = data
        else:       # a number in the header made long
            frame[at:at] = b"9" * (40 * len(data))
    decode_counted(bytes(frame))


_tags = st.sampled_from(sorted(wire._ARITY) + ["q", ""])
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
              st.text(max_size=20), _tags),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.tuples(_tags, inner),
                            st.tuples(_tags, inner, inner, inner),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=25)


@FUZZ
@given(_json, st.lists(st.binary(max_size=64), max_size=4),
       st.sampled_from([wire.MAGIC, b"TPJ1", b"XXXX"]))
def test_fuzz_a_random_header_and_buffers_are_refused_or_decoded(tree, buffers, magic):
    decode_counted(frames.frame(tree, buffers, magic))


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_random_bytes_are_refused(data, with_magic):
    decode_counted((wire.MAGIC if with_magic else b"") + data)


@settings(FUZZ, max_examples=60)
@given(st.sampled_from(sorted(frames.ATTACKS)), st.integers(1, 3000))
def test_fuzz_each_attack_at_any_scale_stays_linear_in_memory(attack, n):
    frame = frames.frame(*frames.ATTACKS[attack](n))
    decode_counted(frame)
    assert peak_memory(lambda: wire.decode(frame)) < 32 * len(frame) + (1 << 20)


# -- the gpu_runner's rank records: the same rule ------------------------------------------------
_END = {"event": "end", "unit": "row.forward@1", "status": "ok", "error": "", "fault": None,
        "fault_kind": None, "obs": {}}


def _rank_file(tmp_path, lines):
    from gpu_runner import launch
    out = tmp_path / "launch0"
    launch.job_dir(out).mkdir(parents=True)
    (launch.job_dir(out) / "rank0.jsonl").write_text("".join(line + "\n" for line in lines))
    return out


@pytest.mark.parametrize("line, says", [
    ('{"event": "end", "n": ' + "7" * 5000 + "}", "a number too long"),
    ("[" * 100_000 + "]" * 100_000, "unreadable JSON"),
    ('{"event": "end", "x": NaN}', "a NaN literal"),
    (json.dumps({"event": "x", "pad": "y" * (600 << 10)}), "over the limit of 524288"),
    (json.dumps({**_END, "status": ["ok"]}), "whose status is list"),
    (json.dumps({"event": "watchdog", "unit": "u", "seconds": "60"}), "whose seconds is str"),
    (json.dumps({"event": "start", "unit": {"id": 1}}), "unit is not a name"),
], ids=["long-int", "deep", "nan", "long-line", "status-list", "seconds-str", "unit-dict"])
def test_a_malformed_record_is_rejected_not_a_crash(tmp_path, line, says):
    """The first two crashed the grader's reading of the records (ValueError, RecursionError),
    the two after the last fault path and the merge (a str formatted as a number, a list
    hashed)."""
    from gpu_runner import launch
    rows = launch._read_records(_rank_file(tmp_path, [json.dumps(_END), line]))[0]
    assert rows[0] == _END and rows[1]["event"] == "rejected" and says in rows[1]["why"]


def test_a_rejected_end_record_fails_its_unit_with_the_reason(tmp_path):
    import assignments
    from gpu_runner import launch
    from gpu_runner.plan import make_plan
    torch_assignment = next(a.name for a in assignments.discover() if a.has_gpu)
    unit = next(u for u in make_plan(torch_assignment, [1], timing=False) if u.checks())
    out = _rank_file(tmp_path, [json.dumps({"event": "start", "unit": unit.id}),
                                json.dumps({**_END, "status": {"forged": True}})])
    results = {}
    launch._interpret(launch._read_records(out), [unit], launch.Config(sizes=(1,)),
                      {"rc": 0, "timed_out": False}, out / "torchrun.log", results)
    result = results[unit.id]
    assert result.status == "fault" and all(not ok for ok, _ in result.checks.values())
    assert "rank 0 of 1: its report was not valid data (a end record whose status is dict)" \
        in result.reason


def test_the_records_of_a_launch_hold_a_bounded_number_of_values(tmp_path, monkeypatch):
    from gpu_runner import launch, records
    monkeypatch.setattr(records, "MAX_VALUES_PER_LAUNCH", 10_000)
    lines = [json.dumps(_END), json.dumps({"event": "x", "a": [[]] * 9_000}),
             json.dumps({"event": "x", "b": [[]] * 9_000})]
    rows = launch._read_records(_rank_file(tmp_path, lines))[0]
    assert [r["event"] for r in rows] == ["end", "x", "rejected"]
    assert "over 10000 values" in rows[2]["why"]


def test_a_fault_text_cannot_make_the_grader_backtrack():
    """launch._short's expression backtracks quadratically on '[.' repeated (about 5 minutes
    for 200 KB): it reads a bounded prefix."""
    from gpu_runner import launch
    with wall_guard(30):
        assert launch._short("[." * 100_000).startswith("[.[.")
