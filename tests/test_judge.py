"""The judge's machinery in-process (tpjudge): the wire format, a student's process and its
faults, and a notebook judged with the checks on this side. Fast: one student process per test,
no nbgrader; the sandboxed path is covered by the nbgrader tests (test_course_cycle,
test_hostile) and one smoke test here."""
from __future__ import annotations

import os
import pickle
import signal
import socket
import struct

import numpy as np
import pytest

import tpsim
from tpgrade import verdict
from tpjudge import local, session, wire
from tpjudge.errors import CellTimeout, StudentGone
from tpjudge.settings import Judge


# -- the wire ---------------------------------------------------------------------------------
def _through(value, **kwargs):
    return wire.decode(wire.encode(value, **kwargs))


def test_data_crosses_with_its_types():
    sent = {"none": None, "flags": [True, False], "ints": (0, -3, 2**80), "floats": [1.5, -0.0],
            "text": "rank 0", "nested": [[1, (2, [3.0])]], 7: "int key",
            "f32": np.float32(2.5), "i64": np.int64(-4), "b": np.bool_(True),
            "array": np.arange(12.0).reshape(3, 4)[:, ::2], "empty": np.zeros((0, 3), np.int32)}
    got = _through(sent)
    assert got.keys() == sent.keys()
    for key in ("none", "flags", "ints", "floats", "text", "nested", 7):
        assert got[key] == sent[key] and type(got[key]) is type(sent[key])
    for key in ("f32", "i64", "b"):
        assert type(got[key]) is type(sent[key]) and got[key] == sent[key]
    for key in ("array", "empty"):
        assert got[key].dtype == sent[key].dtype and np.array_equal(got[key], sent[key])
        assert got[key].flags.writeable
    nan, inf = _through([float("nan"), float("-inf")])
    assert nan != nan and inf == float("-inf")


def test_anything_else_crosses_as_its_type_name_only():
    class ColumnParallelLinear:
        def __reduce__(self):               # were it pickled, this would run
            raise AssertionError("pickled")
    got = _through([ColumnParallelLinear(), np.array(["a"], dtype=object), b"raw"])
    assert [type(g).__name__ for g in got] == ["ColumnParallelLinear", "ndarray", "bytes"]
    assert all(isinstance(g, wire.Opaque) for g in got)
    assert not isinstance(got[1], np.ndarray)


def test_callables_cross_as_numbered_callbacks_only_when_allowed():
    callbacks = []
    got = _through([abs, np.tanh], callbacks=callbacks)
    assert callbacks == [abs, np.tanh] and [c.number for c in got] == [0, 1]
    assert isinstance(_through(abs), wire.Opaque)


@pytest.mark.parametrize("frame", [
    b"", b"TPJ1", pickle.dumps(os.system), b"XXXX" + bytes(8),
    wire._HEAD.pack(wire.MAGIC, 2, 0) + b"{}",                    # not of the grammar
    wire._HEAD.pack(wire.MAGIC, 9, 0) + b'["q", 1]x',             # unknown tag, extra bytes
    wire._HEAD.pack(wire.MAGIC, 5, 0) + b'["i"]',                 # missing payload
    wire._HEAD.pack(wire.MAGIC, 19, 1) + struct.pack("!Q", 3) + b'["a","|O8",[1],0]abc',
    wire._HEAD.pack(wire.MAGIC, 19, 1) + struct.pack("!Q", 3) + b'["a","<f8",[1],0]abc',
], ids=["empty", "magic-only", "a-pickle", "bad-magic", "dict-header", "unknown-tag",
        "missing-payload", "object-dtype", "short-array"])
def test_malformed_frames_are_refused(frame):
    with pytest.raises(wire.ProtocolError):
        wire.decode(frame)


def test_nesting_and_size_are_bounded():
    deep = []
    for _ in range(wire.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(wire.ProtocolError):
        wire.encode(deep)
    header = ('["l",[' * 200 + '["n"]' + ']]' * 200).encode()
    with pytest.raises(wire.ProtocolError):
        wire.decode(wire._HEAD.pack(wire.MAGIC, len(header), 0) + header)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wire._HEAD.pack(wire.MAGIC, 2**31, 0))     # claims 2 GiB: refused unread
        with pytest.raises(wire.ProtocolError, match="over the limit"):
            wire.Channel(b, max_bytes=1 << 20).receive(timeout=5)


# -- a student's process ------------------------------------------------------------------------
@pytest.fixture
def student(tmp_path):
    settings = Judge(timeout=3, interrupt_grace=1.0)
    started = session.start(str(tmp_path), settings)
    yield started
    started.close()


def _run(student, code, name="cell"):
    with student.cell_limit(name):
        return student.run_cell(name, code)


def _fn(student, name):
    return session.StudentObject(student, name)


def test_collectives_are_carried_out_and_recorded_on_the_judges_side(student):
    _run(student, "import numpy as np, tpsim\nfrom tpsim import all_gather\n"
                  "def f(x):\n    return all_gather([x, 2 * x])\n"
                  "def sneaky():\n    return len(tpsim._open_recordings), type(all_gather).__name__")
    x = np.ones((2, 1))
    with tpsim.recording() as calls, student.cell_limit("test"):
        y = _fn(student, "f")(x)
        seen_there = _fn(student, "sneaky")()
    assert np.array_equal(y, np.array([[1.0, 2.0], [1.0, 2.0]]))
    assert [c.op for c in calls] == ["all_gather"]
    assert np.array_equal(calls[0].inputs[1], 2 * x)
    assert seen_there == (0, "function")   # the student's process has no recording to forge


def test_the_students_exceptions_keep_their_builtin_type(student):
    _run(student, "class MyError(ValueError):\n    pass\n"
                  "def bad(kind):\n"
                  "    if kind == 'mine':\n        raise MyError('mine')\n"
                  "    if kind == 'exit':\n        raise SystemExit(2)\n"
                  "    raise NotImplementedError()\n")
    with student.cell_limit("test"):
        with pytest.raises(ValueError, match="mine") as caught:
            _fn(student, "bad")("mine")
        assert type(caught.value).__name__ == "MyError"
        assert any("<cell>" in line for line in caught.value.student_traceback)
        with pytest.raises(NotImplementedError):
            _fn(student, "bad")("todo")
        with pytest.raises(Exception) as caught:       # never a SystemExit in the judge
            _fn(student, "bad")("exit")
        assert type(caught.value).__name__ == "SystemExit"
        assert not isinstance(caught.value, SystemExit)


def test_changes_in_place_come_back_and_callbacks_run_here(student):
    _run(student, "def scale(x, act):\n    x *= 2\n    x.shape = (-1,)\n    return act(x)\n")
    seen = []

    def activation(h):
        seen.append(h.copy())
        return h + 1
    x = np.ones((2, 2))
    with student.cell_limit("test"):
        y = _fn(student, "scale")(x, activation)
    assert x.shape == (4,) and np.array_equal(x, 2 * np.ones(4))
    assert np.array_equal(y, 3 * np.ones(4)) and len(seen) == 1


@pytest.mark.slow                  # waits out a limit
def test_a_loop_is_interrupted_and_the_process_goes_on(student):
    with pytest.raises(CellTimeout):
        _run(student, "while True:\n    pass\n", "loop")
    assert _run(student, "x = 1") is None
    with student.cell_limit("test"):
        assert student.lookup("x") == ("value", 1)


@pytest.mark.slow                  # waits out a limit
def test_a_grader_that_ignores_sigint_still_interrupts_a_loop(tmp_path):
    # A grader started as a background job of a script ignores SIGINT, and its children
    # inherit that; the interrupt must still reach the student's loop.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        deaf_parent = session.start(str(tmp_path), Judge(timeout=3, interrupt_grace=2))
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        with pytest.raises(CellTimeout):
            _run(deaf_parent, "while True:\n    pass\n", "loop")
        assert _run(deaf_parent, "x = 1") is None
    finally:
        deaf_parent.close()


def test_an_interrupt_that_arrives_after_its_cell_never_reaches_the_next(student):
    # What a loaded grader runs into: the limit passes just as a cell finishes, so the
    # interrupt reaches the process after the cell's answer; the next cell must not get it.
    assert _run(student, "x = 0") is None
    student._interrupt()
    assert _run(student, "import time\ntime.sleep(0.5)\nx = 1", "next") is None
    with student.cell_limit("test"):
        assert student.lookup("x") == ("value", 1)


@pytest.mark.slow                  # waits out a limit
def test_code_that_ignores_the_interrupt_is_killed_and_later_requests_say_why(student):
    with pytest.raises(StudentGone, match="did not stop"):
        _run(student, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                      "while True:\n    pass\n", "deaf")
    with pytest.raises(StudentGone, match="deaf"):
        _run(student, "x = 1")


@pytest.mark.slow                  # waits out a limit
def test_two_cells_in_a_row_past_the_limit_stop_the_process(student):
    for name in ("first", "second"):
        with pytest.raises(CellTimeout):
            _run(student, "while True:\n    pass\n", name)
    with pytest.raises(StudentGone, match="two cells in a row"):
        _run(student, "x = 1")


def test_an_exit_is_reported_with_its_status(student):
    with pytest.raises(StudentGone, match="exit status 3"):
        _run(student, "import os\nos._exit(3)", "leaver")


def test_garbage_on_the_wire_ends_that_student_not_the_judge(student):
    with pytest.raises(StudentGone, match="not a judge message"):
        _run(student, "import os, sys\nos.write(int(sys.argv[1]), b'GET / HTTP/1.0' * 100)\n"
                      "import time\ntime.sleep(5)", "garbage")


def test_a_message_over_the_limit_is_refused(tmp_path):
    """The student's process applies the judge's limits to what it sends: a value over them
    fails that call, with the reason, and the process goes on (tests/test_wire.py: a frame
    forged past them ends it)."""
    big = session.start(str(tmp_path), Judge(timeout=10, max_message_mb=1))
    try:
        _run(big, "import numpy as np\ndef huge():\n    return np.zeros(1 << 20)\n"
                  "def small():\n    return np.zeros(4)\n")
        with pytest.raises(RuntimeError, match="over the limit of 1 MiB") as caught, \
                big.cell_limit("test"):
            _fn(big, "huge")()
        assert type(caught.value).__name__ == "ProtocolError"
        with big.cell_limit("next"):
            assert np.array_equal(_fn(big, "small")(), np.zeros(4))
    finally:
        big.close()


def test_what_the_student_prints_goes_to_its_test_cell(student):
    from tpjudge import notebook
    _run(student, "import sys\ndef noisy():\n    print('hello')\n"
                  "    print('careful', file=sys.stderr)\n    return 1\n")
    outputs = notebook.run_test(student, "assert noisy() == 1\nundefined_name", "test_x")
    kinds = [(o.output_type, o.get("name")) for o in outputs]
    assert kinds == [("stream", "stdout"), ("stream", "stderr"), ("error", None)]
    assert "hello" in outputs[0].text and "careful" in outputs[1].text
    assert outputs[2].ename == "NameError" and "undefined_name" in outputs[2].evalue
    assert outputs[2].traceback[-1].startswith("NameError:")


# -- whole notebooks ------------------------------------------------------------------------------
def test_the_sandboxed_student_process_sees_only_its_own_folder(tmp_path):
    from tpsandbox import problem, wrap
    if problem():
        pytest.skip(problem())
    secret = tmp_path / "course"
    secret.mkdir()
    (secret / "gradebook.db").write_text("secret")
    work = tmp_path / "work"
    work.mkdir()

    def confine(argv):
        return wrap(argv, workdir=str(work), scratch=str(work), hidden=[str(secret)])
    student = session.start(str(work), Judge(timeout=20), wrap=confine, scratch=work)
    try:
        _run(student, "import os\nuid = os.getuid()\n"
                      f"seen = os.listdir({str(secret)!r})\n")
        with student.cell_limit("test"):
            assert student.lookup("seen") == ("value", [])
            assert student.lookup("uid")[1] != 0 or os.geteuid() != 0
    finally:
        student.close()


def test_a_forged_exception_is_kept_within_bounds():
    """A reply may describe an exception of any size the wire allows: the judge keeps a
    bounded message and traceback, and a bounded set of classes made for student names."""
    from tpjudge import errors
    exc = errors.rebuild({"ename": "ValueError", "evalue": "x" * 10**6,
                          "traceback": ["y" * 10**5] * 10**4})
    assert isinstance(exc, ValueError)
    assert len(str(exc)) < errors.MAX_MESSAGE + 100 and "more characters" in str(exc)
    most, width = errors.MAX_TRACEBACK
    assert len(exc.student_traceback) == most
    assert all(len(line) < width + 100 for line in exc.student_traceback)
    before = len(errors._CLASSES)
    names = [errors.rebuild({"ename": f"Mine{i}", "bases": ["KeyError"]})
             for i in range(errors.MAX_CLASSES + 50)]
    assert len(errors._CLASSES) <= max(before, errors.MAX_CLASSES)
    assert all(isinstance(e, KeyError) and type(e).__name__ == f"Mine{i}"
               for i, e in enumerate(names))
    assert type(errors.rebuild({"ename": "Mine0", "bases": ["KeyError"]})) is type(names[0])


def test_changes_in_place_inside_dicts_and_to_size_or_dtype_come_back(student):
    """A layer that scales params["Wq"] in place, a function that resizes x or reinterprets
    its dtype: the caller's objects here change as the student's did, so an
    `*_inputs_unmodified` check (tpgrade.verdict.changed) sees it."""
    _run(student, "def f(params, x, y):\n"
                  "    params['Wq'] *= 2\n    params['nested'][0][:] = 7\n"
                  "    x.resize((3,), refcheck=False)\n    y.dtype = 'float32'\n")
    params = {"Wq": np.ones((2, 2)), "nested": [np.zeros(2)], "n": 1}
    x, y = np.arange(2.0), np.zeros(2)
    before = verdict.snapshot((params, x, y))
    with student.cell_limit("test"):
        _fn(student, "f")(params, x, y)
    assert np.array_equal(params["Wq"], 2 * np.ones((2, 2)))
    assert np.array_equal(params["nested"][0], [7.0, 7.0])
    assert x.shape == (3,) and np.array_equal(x, [0.0, 1.0, 0.0])
    assert y.dtype == np.float32 and y.shape == (4,)
    said = verdict.changed(before, (params, x, y), "the arguments")
    assert "['Wq'] holds other values" in said
