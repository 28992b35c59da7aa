"""What crosses between the judge and a student's process: data, and nothing that runs.

A message is a value of this small grammar, framed as a JSON header plus raw byte buffers (one
per array), read with `json` and `numpy.frombuffer` only: never unpickled, never evaluated.

    None, bool, int, float, str, list, tuple, dict (str/int keys)
    numpy arrays and scalars of numeric or bool dtype (the bytes, the dtype, the shape)
    Tensor     a torch tensor, as its numpy values (torch is never needed to read it)
    Opaque     any other object, as its type's name only ("a ColumnParallelLinear")
    Ref        a name in the student's program            ("column_parallel")
    Harness    a function of the course's own packages  ("assignments.<name>.checks:_rank_fn")
    Callback   a function that stays on the sending side, called back by number

Every message is bounded: its size (`max_bytes`), its nesting, its number of items.
"""
from __future__ import annotations

import json
import math
import socket
import struct

import numpy as np

MAGIC = b"TPJ1"
_HEAD = struct.Struct("!4sII")     # magic, header length, number of buffers
_LEN = struct.Struct("!Q")
MAX_BYTES = 256 * 2**20
MAX_DEPTH = 64
MAX_ITEMS = 1_000_000
# numeric and bool dtypes only: an object array would need pickle to travel
DTYPES = frozenset(np.dtype(t).str for t in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128"))


class ProtocolError(RuntimeError):
    """A message that is not of the grammar, too big, or cut off."""


class Opaque:
    """An object that could not travel as data: only its type's name did."""

    _classes: dict = {}

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
class _Encoder:
    def __init__(self, callbacks=None, opaque=None):
        self.buffers: list[bytes] = []
        self.size = 0
        self.callbacks = callbacks      # list to register callables in (None: not allowed)
        self.opaque = opaque            # fn(obj, encoder) -> tree or None (torch tensors)

    def buffer(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > MAX_BYTES:
            raise ProtocolError(f"message over {MAX_BYTES >> 20} MiB")
        self.buffers.append(data)
        return len(self.buffers) - 1

    def array(self, tag, a):
        return [tag, a.dtype.str, list(a.shape), self.buffer(a.tobytes(order="C"))]

    def value(self, obj, depth=0):
        if depth > MAX_DEPTH:
            raise ProtocolError("value nested too deeply")
        if obj is None:
            return ["n"]
        if isinstance(obj, bool):
            return ["b", obj]
        if isinstance(obj, int) and type(obj).__module__ == "builtins":
            return ["i", str(obj)]
        if isinstance(obj, float) and type(obj).__module__ == "builtins":
            return ["f", obj if math.isfinite(obj) else repr(obj)]
        if isinstance(obj, str):
            return ["s", obj]
        if isinstance(obj, np.ndarray) and obj.dtype.str in DTYPES:
            return self.array("a", obj)
        if isinstance(obj, np.generic) and obj.dtype.str in DTYPES:
            return self.array("g", np.asarray(obj))
        if type(obj) in (list, tuple):
            return ["l" if type(obj) is list else "t", [self.value(v, depth + 1) for v in obj]]
        if type(obj) is dict:
            return ["d", [[self.value(k, depth + 1), self.value(v, depth + 1)]
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
        return ["x", type(obj).__name__]


def encode(message, callbacks=None, opaque=None) -> bytes:
    """One framed message. `callbacks`: a list that callables are appended to (their index
    travels); `opaque(obj, encoder)`: a tree for objects this side knows better, e.g.
    `encoder.array("T", values)` for a torch tensor."""
    enc = _Encoder(callbacks, opaque)
    header = json.dumps(enc.value(message), separators=(",", ":")).encode()
    if len(header) > MAX_BYTES:
        raise ProtocolError("message header too large")
    lens = b"".join(_LEN.pack(len(b)) for b in enc.buffers)
    return _HEAD.pack(MAGIC, len(header), len(enc.buffers)) + lens + header + b"".join(enc.buffers)


# -- decoding ---------------------------------------------------------------------------------
class _Decoder:
    def __init__(self, buffers):
        self.buffers = buffers
        self.items = 0

    def array(self, dtype, shape, index):
        if dtype not in DTYPES or not isinstance(shape, list) or len(shape) > 32 \
                or not all(type(n) is int and n >= 0 for n in shape) \
                or type(index) is not int or not 0 <= index < len(self.buffers):
            raise ProtocolError("malformed array")
        dt = np.dtype(dtype)
        data = self.buffers[index]
        if len(data) != math.prod(shape) * dt.itemsize:
            raise ProtocolError("array size does not match its shape")
        return np.frombuffer(data, dtype=dt).reshape(shape).copy()

    def value(self, tree, depth=0):
        self.items += 1
        if depth > MAX_DEPTH or self.items > MAX_ITEMS:
            raise ProtocolError("value nested too deeply or too large")
        if not isinstance(tree, list) or not tree or not isinstance(tree[0], str):
            raise ProtocolError("malformed value")
        tag, rest = tree[0], tree[1:]
        try:
            return self._tagged(tag, rest, depth)
        except (TypeError, ValueError, IndexError, OverflowError) as exc:
            raise ProtocolError(f"malformed {tag!r} value: {exc}") from None

    def _tagged(self, tag, rest, depth):
        if tag == "n":
            return None
        if tag == "b" and type(rest[0]) is bool:
            return rest[0]
        if tag == "i" and type(rest[0]) is str and len(rest[0]) <= 4300:
            return int(rest[0])
        if tag == "f" and type(rest[0]) in (float, int, str):
            return float(rest[0])
        if tag == "s" and type(rest[0]) is str:
            return rest[0]
        if tag == "a":
            return self.array(*rest)
        if tag == "g":
            return self.array(*rest)[()]
        if tag in ("l", "t") and type(rest[0]) is list:
            items = [self.value(v, depth + 1) for v in rest[0]]
            return items if tag == "l" else tuple(items)
        if tag == "d" and type(rest[0]) is list:
            out = {}
            for pair in rest[0]:
                key = self.value(pair[0], depth + 1)
                if type(key) not in (str, int):
                    raise ProtocolError("dict keys must be str or int")
                out[key] = self.value(pair[1], depth + 1)
            return out
        if tag == "T":
            return Tensor(self.array(*rest))
        if tag == "x" and type(rest[0]) is str:
            return Opaque.of(rest[0][:200])
        if tag in ("r", "h") and type(rest[0]) is str:
            return (Ref if tag == "r" else Harness)(rest[0])
        if tag == "c" and type(rest[0]) is int:
            return Callback(rest[0])
        raise ProtocolError(f"unknown or malformed value tag {tag!r}")


def decode(frame: bytes):
    """The message in one frame (as read by `read_frame`)."""
    try:
        magic, header_len, count = _HEAD.unpack_from(frame, 0)
    except struct.error:
        raise ProtocolError("cut-off frame") from None
    if magic != MAGIC:
        raise ProtocolError("not a judge message")
    offset = _HEAD.size
    lens = [_LEN.unpack_from(frame, offset + 8 * i)[0] for i in range(count)]
    offset += 8 * count
    header = frame[offset:offset + header_len]
    offset += header_len
    buffers = []
    for n in lens:
        buffers.append(frame[offset:offset + n])
        offset += n
    if offset != len(frame):
        raise ProtocolError("frame length does not add up")
    try:
        tree = json.loads(header)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"unreadable header: {exc}") from None
    return _Decoder(buffers).value(tree)


def read_frame(read_exact, max_bytes=MAX_BYTES) -> bytes:
    """One whole frame from `read_exact(n)` (which returns exactly n bytes or raises EOFError),
    refusing frames over `max_bytes` before reading them."""
    head = read_exact(_HEAD.size)
    magic, header_len, count = _HEAD.unpack(head)
    if magic != MAGIC or count > 100_000:
        raise ProtocolError("not a judge message")
    lens_raw = read_exact(8 * count)
    total = header_len + sum(_LEN.unpack_from(lens_raw, 8 * i)[0] for i in range(count))
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes, over the limit of {max_bytes}")
    return head + lens_raw + read_exact(total)


class Channel:
    """Framed messages over a connected socket, each bounded by `max_bytes`."""

    def __init__(self, sock, max_bytes=MAX_BYTES, opaque=None):
        self.sock, self.max_bytes, self.opaque = sock, max_bytes, opaque

    def send(self, message, callbacks=None) -> None:
        self.sock.sendall(encode(message, callbacks, self.opaque))

    def receive(self, timeout=None):
        """The next message; raises TimeoutError after `timeout` seconds (None: wait), EOFError
        when the other side has gone, ProtocolError for anything that is not a message."""
        self.sock.settimeout(timeout)
        try:
            frame = read_frame(self._read_exact, self.max_bytes)
        except socket.timeout:
            raise TimeoutError from None
        except (ConnectionError, OSError) as exc:
            raise EOFError(str(exc)) from None
        except struct.error:
            raise ProtocolError("cut-off frame") from None
        return decode(frame)

    def _read_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError("the other side closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
