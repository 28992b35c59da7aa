"""What a rank reports, as JSON data, and how the grader reads it back.

A rank writes one JSON line per event (gpu_runner.worker); in an "end" record, `obs` holds
what the unit observed: tensors as {"shape", "dtype", "device", "data"} (values as a flat list
of numbers, at most MAX_ELEMENTS of them), exceptions as {"types", "message"}, counts as
{kind: n}. Data only: nothing is pickled or evaluated.

The student's code runs in the rank and can write anything into that file, so the grader reads
it as it reads the judge's wire (tpjudge.wire): in time and memory linear in a capped size. It
reads at most MAX_BYTES_PER_RANK of each rank's file, parses each line of at most MAX_LINE
characters with wire.load_json (no long numbers, no NaN), and builds at most
MAX_VALUES_PER_LAUNCH values from one launch's files (JSON can build ~25 bytes of objects per
byte: this keeps a launch's records to tens of MB). `parse` turns a line that breaks a rule, or
whose fields are not of the types the grader reads, into a "rejected" record saying why: the
units that rank left without an end record fail with that reason, never the grader. Every value
a check uses is decoded through `tensor()` / `outcome()`, which reject anything malformed with
`Malformed` (a failed check).

`encode_*` run in the rank (duck-typed on torch tensors: this module imports no torch).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from tpjudge import wire

MAX_ELEMENTS = 4096               # the checks' tensors have at most a few dozen
# The three torch references at world size 4 (tests/forked_runner.py): the largest rank file
# is 134 KB, the longest line 18 KB, one launch's files hold at most 22,000 values.
MAX_BYTES_PER_RANK = 2 * 1024 * 1024
MAX_LINE = 512 * 1024
MAX_VALUES_PER_LAUNCH = 500_000
MAX_TEXT = 500
DTYPES = {"float16", "bfloat16", "float32", "float64", "int32", "int64", "bool", "uint8", "int8",
          "int16", "complex64", "complex128"}


class Malformed(ValueError):
    """A record that is not what a rank of this harness writes."""


# -- rank side ------------------------------------------------------------------------------------
def encode_tensor(t) -> dict | None:
    """A tensor's shape, dtype, device and (up to MAX_ELEMENTS) values; None stays None; anything
    else becomes {"type": its class name}."""
    if t is None:
        return None
    if not all(hasattr(t, a) for a in ("shape", "dtype", "device", "detach")):
        return {"type": type(t).__name__}
    rec = {"shape": [int(n) for n in t.shape], "dtype": str(t.dtype).replace("torch.", ""),
           "device": str(t.device), "data": None}
    if t.device.type != "meta" and math.prod(rec["shape"]) <= MAX_ELEMENTS:
        rec["data"] = [_number(v) for v in t.detach().cpu().double().flatten().tolist()]
    return rec


def encode_param(p) -> dict | None:
    """A layer's attribute (.weight, .bias): the tensor, and whether it is an nn.Parameter."""
    rec = encode_tensor(p)
    if isinstance(rec, dict) and "shape" in rec:
        rec["parameter"] = type(p).__name__ == "Parameter" or any(
            c.__name__ == "Parameter" for c in type(p).__mro__)
    return rec


def encode_outcome(exc: BaseException | None) -> dict | None:
    """What a call raised: its class and base classes by name, and its message."""
    if exc is None:
        return None
    return {"types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)[:MAX_TEXT]}


def _number(v):
    """JSON has no NaN or infinity: they travel as strings."""
    return v if math.isfinite(v) else repr(v)


# -- grader side ----------------------------------------------------------------------------------
# The fields the grader reads from each kind of record, and their types (absent reads as None).
_TEXT = (str, type(None))
_FIELDS = {"end": {"status": _TEXT, "error": _TEXT, "fault": _TEXT, "fault_kind": _TEXT},
           "watchdog": {"seconds": (int, float), "why": _TEXT}}


def parse(texts: dict) -> dict:
    """{rank: [records]} from {rank: the text of its file, as read}; a line that breaks a
    rule is a record {"event": "rejected", "why": ...}, a last line without its newline (cut by
    a kill or by the size cap) is dropped."""
    budget = [MAX_VALUES_PER_LAUNCH]
    parsed = {}
    for rank in sorted(texts):
        lines = texts[rank].split("\n")[:-1]
        parsed[rank] = [_record(line, budget) for line in lines if line.strip()]
    return parsed


def _record(line: str, budget: list) -> dict:
    try:
        if len(line) > MAX_LINE:
            raise Malformed(f"a record of {len(line)} characters, over the limit of {MAX_LINE}")
        rec = wire.load_json(line)
        budget[0] -= _values(rec, budget[0])
        return _checked(rec)
    except (Malformed, wire.ProtocolError) as exc:
        return {"event": "rejected", "why": str(exc)[:MAX_TEXT]}


def _values(tree, limit: int) -> int:
    """How many values `tree` holds (each list or dict entry counts); Malformed past `limit`."""
    stack, count = [tree], 0
    while stack:
        value = stack.pop()
        count += 1
        if type(value) is list:
            stack.extend(value)
        elif type(value) is dict:
            stack.extend(value.values())
        if count + len(stack) > limit:
            raise Malformed(f"the ranks' records hold over {MAX_VALUES_PER_LAUNCH} values")
    return count


def _checked(rec):
    """`rec` if it is a record whose fields the grader reads have their types."""
    if not (isinstance(rec, dict) and isinstance(rec.get("event"), str)):
        raise Malformed("a record that is not {event: ...}")
    if not isinstance(rec.get("unit"), (str, type(None))):
        raise Malformed("a record whose unit is not a name")
    for name, types in _FIELDS.get(rec["event"], {}).items():
        if not isinstance(rec.get(name), types) or isinstance(rec.get(name), bool):
            raise Malformed(f"a {rec['event']} record whose {name} is "
                            f"{type(rec.get(name)).__name__}")
    return rec


def tensor(rec) -> np.ndarray | None:
    """A tensor record back as a float64 array (None stays None). Raises Malformed."""
    if rec is None:
        return None
    if not isinstance(rec, dict):
        raise Malformed(f"a tensor record is a {type(rec).__name__}")
    if "type" in rec and "shape" not in rec:
        raise Malformed(f"a {str(rec['type'])[:60]}, expected a torch.Tensor")
    shape, data = rec.get("shape"), rec.get("data")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n for n in shape)):
        raise Malformed("the tensor's shape is not a list of sizes")
    if rec.get("dtype") not in DTYPES or not isinstance(rec.get("device"), str):
        raise Malformed("the tensor's dtype or device is not one torch has")
    size = math.prod(shape)
    if data is None:     # a meta tensor, or one too large to report: its shape only
        if size <= MAX_ELEMENTS and not rec["device"].startswith("meta"):
            raise Malformed("the tensor's values are missing")
        return np.broadcast_to(np.float64(np.nan), tuple(shape))   # never matches a value
    if not isinstance(data, list) or len(data) != size:
        raise Malformed(f"the tensor's values do not fill its shape {tuple(shape)}")
    return np.asarray([_value(v) for v in data], dtype=np.float64).reshape(shape)


def _value(v):
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, str)):
        raise Malformed("a tensor value is not a number")
    if isinstance(v, str):
        if v not in ("nan", "inf", "-inf"):
            raise Malformed("a tensor value is not a number")
        return float(v)
    return float(v)


def meta(rec) -> tuple[str, str]:
    """(dtype, device) of a tensor record (validated by `tensor` first)."""
    return rec["dtype"], rec["device"]


def outcome(rec) -> tuple[list[str], str] | None:
    """(class names, message) of what a call raised, None when it raised nothing."""
    if rec is None:
        return None
    if not (isinstance(rec, dict) and isinstance(rec.get("types"), list)
            and all(isinstance(t, str) for t in rec["types"])
            and isinstance(rec.get("message"), str)):
        raise Malformed("an exception record is not {types, message}")
    return rec["types"], rec["message"][:MAX_TEXT]


def counts(rec) -> dict[str, int]:
    """{collective kind: n} (non-zero only)."""
    if not (isinstance(rec, dict) and all(
            isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0
            for k, n in rec.items())):
        raise Malformed("a collective count is not {kind: n}")
    return {k: n for k, n in rec.items() if n}
