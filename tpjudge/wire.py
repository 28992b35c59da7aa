"""What crosses between the judge and a student's process: data, and nothing that runs.

A message is a value of this small grammar, framed as a JSON header plus raw byte buffers (one
per array and per long string), read with `json` and `numpy.frombuffer` only: never unpickled,
never evaluated.

    None, bool, int, float, str, list, tuple, dict (str keys, int keys within 64 bits)
    numpy arrays and scalars of numeric or bool dtype (the bytes, the dtype, the shape)
    Tensor     a torch tensor, as its numpy values (torch is never needed to read it)
    Opaque     any other object, as its type's name only ("a ColumnParallelLinear")
    Ref        a name in the student's program            ("column_parallel")
    Harness    a function of the course's own packages  ("assignments.<name>.checks:_rank_fn")
    Callback   a function that stays on the sending side, called back by number

Reading a message is bounded in time and memory by design, its cost linear in a capped size:
- `Limits` cap a frame's bytes, its JSON header's bytes and its number of values (the judge's
  settings, c.Judge.max_message_mb, max_header_kb, max_items), each checked from a frame's first
  bytes, before the rest is read;
- nothing in the grammar costs more than its bytes: long strings travel as buffers (the header
  holds structure only, and JSON builds at most ~25 bytes of objects per byte of it), a number in
  the header has at most 32 characters, an int at most MAX_DIGITS digits (int(str) costs the
  square of its length), int dict keys stay within 64 bits (hash(k) is k mod 2**61-1, so larger
  keys can all collide, and a dict of colliding keys costs the square of their number to
  build), a key appears once, each buffer is used by exactly one value (one buffer shared by
  many arrays would multiply memory), an array's bytes are its buffer's;
- given a deadline (the judge's: a reply has the call's grace period to be decoded, as the
  student's code has it to stop after an interrupt), decoding stops there: a backstop for a
  loaded machine or raised limits, since the worst frame within the default limits decodes in
  under a tenth of a second (bench/wire_bench.py).
Receiving is bounded by the caller's deadline too: every read waits only for the time left,
and past it takes only what has already arrived, so a sender that trickles bytes cannot
stretch a wait; a frame cut by the deadline is resumed by the next receive.
What breaks a rule is a ProtocolError. The sending side applies the same limits, so a value
over them fails to send (an error the student's code sees) and never reaches the other side.
"""
from __future__ import annotations

import dataclasses
import json
import math
import socket
import struct
import time

import numpy as np

MAGIC = b"TPJ2"                    # TPJ1 carried every string in the header
_HEAD = struct.Struct("!4sII")     # magic, header length, number of buffers; then their lengths
MAX_DEPTH = 64                     # nesting of lists, tuples and dicts
MAX_DIGITS = 4300                  # of an int (Python's default limit, whatever the process sets)
MAX_NDIM = 32                      # dimensions of an array
MAX_TYPE_NAMES = 64                # distinct names of Opaque objects in one message
INLINE_CHARS = 64                  # a longer string travels as a buffer (UTF-8)
_KEY_INT = 2**63                   # |an int dict key|, an array dimension: below this
_NUMBER_CHARS = 32                 # of a JSON number in a header (a size, an index, a float)
_CHECK_EVERY = 1024                # values decoded between two looks at the deadline
# numeric and bool dtypes only: an object array would need pickle to travel
DTYPES = frozenset(np.dtype(t).str for t in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128"))


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much one message may hold (tpjudge.settings.Judge: max_message_mb, max_header_kb,
    max_items). The judge passes its limits to the student's process, so both ends refuse the
    same messages."""

    max_bytes: int = 16 << 20      # the whole frame: arrays, long strings, header
    max_header: int = 256 << 10    # its JSON header: structure, numbers, short strings
    max_items: int = 100_000       # values: each number, string, array, list or dict entry

    def argument(self) -> str:
        return f"{self.max_bytes},{self.max_header},{self.max_items}"

    @classmethod
    def parse(cls, text: str) -> "Limits":
        return cls(*(int(n) for n in text.split(",")))


class ProtocolError(RuntimeError):
    """A message that is not of the grammar, over the limits, cut off, or too slow to read."""


class Opaque:
    """An object that could not travel as data: only its type's name did."""

    _classes: dict = {}
    _MAX_CLASSES = 1024      # the judge outlives many students: their names do not pile up

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self):
        return f"<a {self.type_name}>"

    @classmethod
    def of(cls, type_name: str) -> "Opaque":
        """An instance whose type is named like the original, so that messages which say
        `type(x).__name__` read as before ("returned Tensor, expected a numpy array")."""
        name = type_name if type_name.isidentifier() else "object"
        if name not in cls._classes:
            if len(cls._classes) >= cls._MAX_CLASSES:
                cls._classes.clear()
            cls._classes[name] = type(name, (cls,), {})
        return cls._classes[name](type_name)


class Tensor(Opaque):
    """A torch tensor that travelled as its values (`.values`, a numpy array). It is not an
    ndarray (a numpy check still rejects it), but a 0-d one reads as a number."""

    def __init__(self, values):
        super().__init__("Tensor")
        self.values = values

    def __index__(self):
        return int(self.values.__index__()) if self.values.ndim == 0 else \
            self.values.__index__()

    def __float__(self):
        return float(self.values)

    def __int__(self):
        return int(self.values)

    @property
    def shape(self):
        return self.values.shape


class Ref:
    """A name in the student's program (looked up on the student's side)."""

    def __init__(self, name: str):
        self.name = name


class Harness:
    """A module-level function of the course's packages, by "module:qualname" (imported on the
    student's side, from the course's packages only)."""

    def __init__(self, target):
        self.path = target if isinstance(target, str) else \
            f"{target.__module__}:{target.__qualname__}"


class Callback:
    """A function kept by the side that sent it, called back by its number."""

    def __init__(self, number: int):
        self.number = number


def substitute(value, replace, depth=0):
    """`value` with every Ref, Harness and Callback inside (lists, tuples, dicts) replaced by
    `replace(obj)`."""
    if isinstance(value, (Ref, Harness, Callback)):
        return replace(value)
    if depth < MAX_DEPTH and type(value) in (list, tuple):
        return type(value)(substitute(v, replace, depth + 1) for v in value)
    if depth < MAX_DEPTH and type(value) is dict:
        return {k: substitute(v, replace, depth + 1) for k, v in value.items()}
    return value


# -- encoding ---------------------------------------------------------------------------------
_MAX_BITS = int(MAX_DIGITS * math.log2(10))


class _Encoder:
    """A value as a header tree plus buffers, refusing (ProtocolError) what the other side's
    decoder would refuse, before the message is sent."""

    def __init__(self, limits, callbacks=None, opaque=None):
        self.limits = limits
        self.buffers: list[bytes] = []
        self.size = self.items = 0
        self.names: set[str] = set()
        self.callbacks = callbacks      # list to register callables in (None: not allowed)
        self.opaque = opaque            # fn(obj, encoder) -> tree or None (torch tensors)

    def buffer(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limits.max_bytes:
            raise ProtocolError(f"a message over the limit of {_mib(self.limits.max_bytes)}")
        self.buffers.append(data)
        return len(self.buffers) - 1

    def array(self, tag, a):
        return [tag, a.dtype.str, list(a.shape), self.buffer(a.tobytes(order="C"))]

    def value(self, obj, depth=0):
        self.items += 1
        if depth > MAX_DEPTH:
            raise ProtocolError("value nested too deeply")
        if self.items > self.limits.max_items:
            raise ProtocolError(f"a message of more than {self.limits.max_items} values, over "
                                f"the limit (send many numbers as one numpy array)")
        if obj is None:
            return ["n"]
        if isinstance(obj, bool):
            return ["b", obj]
        if isinstance(obj, int) and type(obj).__module__ == "builtins":
            if abs(obj).bit_length() > _MAX_BITS:
                raise ProtocolError(f"an int of more than {MAX_DIGITS} digits")
            return ["i", str(obj)]
        if isinstance(obj, float) and type(obj).__module__ == "builtins":
            return ["f", obj if math.isfinite(obj) else repr(obj)]
        if isinstance(obj, str):
            return ["s", obj] if len(obj) <= INLINE_CHARS else \
                ["S", self.buffer(obj.encode("utf-8", "surrogatepass"))]
        if isinstance(obj, np.ndarray) and obj.dtype.str in DTYPES:
            return self.array("a", obj)
        if isinstance(obj, np.generic) and obj.dtype.str in DTYPES:
            return self.array("g", np.asarray(obj))
        if type(obj) in (list, tuple):
            return ["l" if type(obj) is list else "t", [self.value(v, depth + 1) for v in obj]]
        if type(obj) is dict:
            return ["d", [[self.value(_key(k), depth + 1), self.value(v, depth + 1)]
                          for k, v in obj.items()]]
        if isinstance(obj, Ref):
            return ["r", obj.name]
        if isinstance(obj, Harness):
            return ["h", obj.path]
        special = self.opaque(obj, self) if self.opaque is not None else None
        if special is not None:
            return special
        if callable(obj) and self.callbacks is not None:
            self.callbacks.append(obj)
            return ["c", len(self.callbacks) - 1]
        name = type(obj).__name__[:200]
        self.names.add(name)
        if len(self.names) > MAX_TYPE_NAMES:
            raise ProtocolError(f"objects of more than {MAX_TYPE_NAMES} types in one message")
        return ["x", name]


def _key(k):
    """A dict key that travels: str, or int within 64 bits (see the module's docstring)."""
    if isinstance(k, str) or (type(k) is int and -_KEY_INT < k < _KEY_INT):
        return k
    raise ProtocolError(f"a dict key of type {type(k).__name__}"
                        f"{' beyond 64 bits' if type(k) is int else ''}: keys must be str or "
                        f"int within 64 bits")


_DEFAULT = Limits()
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def encode(message, callbacks=None, opaque=None, limits=None) -> bytes:
    """One framed message. `callbacks`: a list that callables are appended to (their index
    travels); `opaque(obj, encoder)`: a tree for objects this side knows better, e.g.
    `encoder.array("T", values)` for a torch tensor. Raises ProtocolError for a message over
    `limits` (default: Limits())."""
    limits = limits or _DEFAULT
    enc = _Encoder(limits, callbacks, opaque)
    header = _dumps(enc.value(message)).encode()
    if len(header) > limits.max_header:
        raise ProtocolError(f"a message whose structure ({len(header)} bytes) is over the limit "
                            f"of {limits.max_header >> 10} KiB (send many numbers as one numpy "
                            f"array)")
    sizes = struct.pack(f"!{len(enc.buffers)}Q", *map(len, enc.buffers))
    return b"".join([_HEAD.pack(MAGIC, len(header), len(enc.buffers)), sizes, header,
                     *enc.buffers])


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


# -- decoding ---------------------------------------------------------------------------------
_ARITY = {"n": 0, "b": 1, "i": 1, "f": 1, "s": 1, "S": 1, "a": 3, "g": 3, "T": 3, "l": 1,
          "t": 1, "d": 1, "x": 1, "r": 1, "h": 1, "c": 1}
_NONFINITE = frozenset({"nan", "inf", "-inf"})


class _Decoder:
    """The values of one header tree. Counts what it does (`items`, `copied` bytes), so a test
    can see that the work stays linear in the frame's size."""

    def __init__(self, buffers, limits, deadline=None):
        self.buffers, self.limits, self.deadline = buffers, limits, deadline
        self.used = bytearray(len(buffers))
        self.items = self.copied = 0
        self.names: set[str] = set()

    def value(self, tree, depth=0):
        self.items += 1
        if self.items > self.limits.max_items:
            raise ProtocolError(f"more than {self.limits.max_items} values, over the limit")
        if depth > MAX_DEPTH:
            raise ProtocolError(f"values nested more than {MAX_DEPTH} deep")
        if self.items % _CHECK_EVERY == 0:
            self.check_time()
        if type(tree) is not list or not tree or type(tree[0]) is not str \
                or len(tree) != _ARITY.get(tree[0], -1) + 1:
            raise ProtocolError("malformed value")
        tag, rest = tree[0], tree[1:]
        try:
            return self._tagged(tag, rest, depth)
        except (TypeError, ValueError, IndexError, OverflowError) as exc:
            raise ProtocolError(f"malformed {tag!r} value: {exc}") from None

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ProtocolError("it could not be read within the time limit")

    def finish(self) -> None:
        if self.used.count(0):
            raise ProtocolError("a buffer that no value uses")

    def buffer(self, index) -> memoryview:
        if type(index) is not int or not 0 <= index < len(self.buffers) or self.used[index]:
            raise ProtocolError("a buffer index out of range or used twice")
        self.used[index] = 1
        self.copied += len(self.buffers[index])
        return self.buffers[index]

    def array(self, dtype, shape, index):
        if type(dtype) is not str or dtype not in DTYPES or type(shape) is not list \
                or len(shape) > MAX_NDIM \
                or not all(type(n) is int and 0 <= n < _KEY_INT for n in shape):
            raise ProtocolError("malformed array")
        data, dt = self.buffer(index), np.dtype(dtype)
        if len(data) != math.prod(shape) * dt.itemsize:
            raise ProtocolError("array size does not match its shape")
        return np.frombuffer(data, dtype=dt).reshape(shape).copy()

    def _tagged(self, tag, rest, depth):
        if tag == "n":
            return None
        kind = type(rest[0])
        if tag == "b" and kind is bool:
            return rest[0]
        if tag == "i" and kind is str and len(rest[0]) <= MAX_DIGITS + 1:
            return int(rest[0])
        if tag == "f" and (kind in (float, int) or kind is str and rest[0] in _NONFINITE):
            return float(rest[0])
        if tag == "s" and kind is str:
            return rest[0]
        if tag == "S":
            return str(self.buffer(rest[0]), "utf-8", "surrogatepass")
        if tag == "a":
            return self.array(*rest)
        if tag == "g":
            scalar = self.array(*rest)
            if scalar.ndim:
                raise ProtocolError("a numpy scalar with a shape")
            return scalar[()]
        if tag in ("l", "t") and kind is list:
            items = [self.value(v, depth + 1) for v in rest[0]]
            return items if tag == "l" else tuple(items)
        if tag == "d" and kind is list:
            return self.dict(rest[0], depth)
        if tag == "T":
            return Tensor(self.array(*rest))
        if tag == "x" and kind is str:
            return self.opaque(rest[0][:200])
        if tag in ("r", "h") and kind is str:
            return (Ref if tag == "r" else Harness)(rest[0])
        if tag == "c" and kind is int:
            return Callback(rest[0])
        raise ProtocolError(f"malformed value of tag {tag!r}")

    def dict(self, pairs, depth):
        out = {}
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise ProtocolError("malformed dict entry")
            key = self.value(pair[0], depth + 1)
            if not (type(key) is str or type(key) is int and -_KEY_INT < key < _KEY_INT):
                raise ProtocolError("a dict key that is not a str or an int within 64 bits")
            if key in out:
                raise ProtocolError("a dict key that repeats")
            out[key] = self.value(pair[1], depth + 1)
        return out

    def opaque(self, name: str) -> Opaque:
        self.names.add(name)
        if len(self.names) > MAX_TYPE_NAMES:
            raise ProtocolError(f"objects of more than {MAX_TYPE_NAMES} types")
        return Opaque.of(name)


def _json_number(kind):
    def parse(text: str):
        if len(text) > _NUMBER_CHARS:
            raise ProtocolError("a number too long for a size, an index or a float")
        return kind(text)
    return parse


def _no_constant(name: str):
    raise ProtocolError(f"a {name} literal (this data sends non-finite floats as text)")


_JSON = json.JSONDecoder(parse_int=_json_number(int), parse_float=_json_number(float),
                        parse_constant=_no_constant)


def load_json(text: str):
    """JSON text as Python data, refusing (ProtocolError) what JSON allows but data of this
    course never holds and what would cost more than its length to build: numbers of more than
    32 characters (an int's digits cost their square), NaN and Infinity, nesting deeper than
    the interpreter allows. Time and memory are linear in the text's length (at most ~25 bytes
    of objects per byte: the caller caps the length)."""
    try:
        return _JSON.decode(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"unreadable JSON: {str(exc)[:200]}") from None


def _head(data, limits) -> tuple[int, int]:
    """(header length, number of buffers) from a frame's first bytes, within `limits`."""
    try:
        magic, header_len, count = _HEAD.unpack_from(data, 0)
    except struct.error:
        raise ProtocolError("cut-off frame") from None
    if magic != MAGIC:
        raise ProtocolError("not a judge message")
    if header_len > limits.max_header:
        raise ProtocolError(f"a header of {header_len} bytes, over the limit of "
                            f"{limits.max_header}")
    if count > limits.max_items:
        raise ProtocolError(f"{count} buffers, over the limit of {limits.max_items} values")
    return header_len, count


def _sizes(data, header_len, count, limits) -> tuple[tuple[int, ...], int]:
    """(each buffer's length, the whole frame's length) from its first bytes, within `limits`."""
    try:
        lens = struct.unpack_from(f"!{count}Q", data, _HEAD.size)
    except struct.error:
        raise ProtocolError("cut-off frame") from None
    total = _HEAD.size + 8 * count + header_len + sum(lens)
    if total > limits.max_bytes:
        raise ProtocolError(f"a message of {total} bytes, over the limit of {limits.max_bytes}")
    return lens, total


def decode(frame, limits=None, deadline=None):
    """The message in one frame (bytes or bytearray, as `Channel` reads it), within `limits`
    (default: Limits()); past `deadline` (time.monotonic()), a ProtocolError."""
    value, _ = _decode(frame, limits or _DEFAULT, deadline)
    return value


def _decode(frame, limits, deadline):
    view = memoryview(frame)
    header_len, count = _head(view, limits)
    lens, total = _sizes(view, header_len, count, limits)
    if total != len(view):
        raise ProtocolError("frame length does not add up")
    offset = _HEAD.size + 8 * count
    header = bytes(view[offset:offset + header_len])
    offset += header_len
    buffers = []
    for n in lens:
        buffers.append(view[offset:offset + n])
        offset += n
    try:
        header = header.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("a header that is not ASCII JSON") from None
    decoder = _Decoder(buffers, limits, deadline)
    decoder.check_time()
    tree = load_json(header)
    decoder.check_time()
    value = decoder.value(tree)
    decoder.finish()
    return value, decoder


class Channel:
    """Framed messages over a connected socket, each within `limits` (`max_bytes`: a shorthand
    for limits' max_bytes)."""

    def __init__(self, sock, max_bytes=None, opaque=None, limits=None):
        self.sock, self.opaque = sock, opaque
        self.limits = limits or _DEFAULT
        if max_bytes is not None:
            self.limits = dataclasses.replace(self.limits, max_bytes=max_bytes)
        self._frame = bytearray()      # what has come of the next frame

    def send(self, message, callbacks=None, timeout=None) -> None:
        """Send one message (ProtocolError if it is over the limits: nothing is sent); an
        OSError (socket.timeout) when the other side has not taken it within `timeout`."""
        frame = encode(message, callbacks, self.opaque, self.limits)
        self.sock.settimeout(timeout)
        self.sock.sendall(frame)

    def receive(self, timeout=None, deadline=None, decode_within=None):
        """The next message. Waits until `deadline` (time.monotonic()), or for `timeout` seconds,
        or (neither) for ever; then TimeoutError, keeping what came of a frame for the next
        call (past the deadline it still takes what has already arrived). EOFError when the
        other side has gone; ProtocolError for anything that is not a message within the
        limits, as soon as a frame's first bytes say so, or whose decoding takes more than
        `decode_within` seconds (None: no limit)."""
        if timeout is not None:
            deadline = time.monotonic() + timeout
        try:
            frame = self._read_frame(deadline)
        except socket.timeout:
            raise TimeoutError from None
        except ProtocolError:
            self._frame = bytearray()
            raise
        except (ConnectionError, OSError) as exc:
            raise EOFError(str(exc)) from None
        return decode(frame, self.limits,
                      None if decode_within is None else time.monotonic() + decode_within)

    def _read_frame(self, deadline) -> bytearray:
        self._fill(_HEAD.size, deadline)
        header_len, count = _head(self._frame, self.limits)
        self._fill(_HEAD.size + 8 * count, deadline)
        _, total = _sizes(self._frame, header_len, count, self.limits)
        self._fill(total, deadline)
        frame, self._frame = self._frame, bytearray()
        return frame

    def _fill(self, n: int, deadline) -> None:
        """Receive until the frame so far has `n` bytes. Past the deadline, only what has
        already arrived is taken: a sender that trickles bytes cannot stretch a wait."""
        while len(self._frame) < n:
            self.sock.settimeout(None if deadline is None else
                                 max(deadline - time.monotonic(), 0.0))
            try:
                chunk = self.sock.recv(min(n - len(self._frame), 1 << 20))
            except BlockingIOError:
                raise TimeoutError from None
            if not chunk:
                raise EOFError("the other side closed the connection")
            self._frame += chunk
