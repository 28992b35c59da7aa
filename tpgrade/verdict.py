"""The verdict core: one tolerance rule and one message format for every check.

Every check of every notebook (numpy and torch, in the grader's process under the judge) and
every gpu_runner judge (assignments/<name>/gpu/judge.py, on what torchrun ranks reported) decides
with this module. numpy only: nothing here imports torch, so the judging side needs none.

The tolerance, one family: `got` matches `want` when, elementwise,

    |got - want| <= atol + rtol * scale

with (atol, rtol) for the dtype the student's code computed in (float32 is what the layers run
in; float64 runs check that nothing on the way dropped to float32), and `scale` either

- |want| (torch.allclose's rule; `VALUES`), where the reference is a value; or
- the sum of |terms| of each output element (`TERMS`), where the reference computed it (the
  numpy layers: |x| @ |W|.T + |b|, ...): a bound that does not shrink when terms cancel.

NaN and inf never match.

The message, one format: "<what>: <what is wrong>; probably <the mistake>". The last part is a
diagnosis, when the numbers (or the shape) are what a known mistake produces ("probably only the
local shard returned: ..."), so a failed check says what is wrong and what the mistake probably
is. Callers prefix a rank's verdict with `where(rank, size)`, so a message names the world size
and the rank, and never a file the student cannot see.
"""
from __future__ import annotations

from typing import NamedTuple

from . import _trusted as trusted

_TINY = 1e-30


class CheckFailed(AssertionError):
    """A check found a mistake; the message says which one."""


def fail(message):
    raise CheckFailed(message)


# -- the tolerance ----------------------------------------------------------------------------
class Tolerance(NamedTuple):
    atol: float
    rtol: float

    def allowed(self, terms: bool) -> str:
        if terms:
            return f"{self.rtol:g} x the sum of |terms|"
        return f"{self.atol:g} + {self.rtol:g} x |dense|"


# scale = |want|
VALUES = {"float32": Tolerance(1e-5, 1e-5), "float64": Tolerance(1e-10, 1e-10)}
# scale = the sum of |terms| (atol: what keeps an all-zero scale from dividing by zero)
TERMS = {"float32": Tolerance(1e-5 * _TINY, 1e-5), "float64": Tolerance(1e-12 * _TINY, 1e-12)}


def tolerance(dtype, terms=False) -> Tolerance:
    """The (atol, rtol) of `dtype` ("float32", np.float32, ...) for a value or a terms scale."""
    return (TERMS if terms else VALUES)[trusted.dtype(dtype).name]


def _excess(got, want, tol, scale):
    """max over the elements of |got - want| - (atol + rtol * scale); inf for NaN and inf."""
    if not got.size:
        return -1.0
    diff = abs(got.astype(trusted.float64) - want)
    bound = tol.atol + tol.rtol * (abs(want) if scale is None else scale)
    over = diff - bound
    if not bool((over == over).all()) or not bool((diff <= 1e300).all()):
        return float("inf")
    return float(over.max())


def close(got, want, dtype="float32", scale=None) -> bool:
    """Same shape, every element within the tolerance of `dtype`; `scale`: the sum of |terms| of
    each element (TERMS), or None for |want| (VALUES)."""
    if got is None or got.shape != want.shape:
        return False
    return _excess(got, want, tolerance(dtype, scale is not None), scale) <= 0


def equal(got, want) -> bool:
    """torch.equal: same shape, same values."""
    return got is not None and got.shape == want.shape and bool((got == want).all())


def deviation(got, want) -> float:
    """max |got - want| (inf for another shape, NaN when a value is NaN)."""
    if got.shape != want.shape:
        return float("inf")
    if not got.size:
        return 0.0
    diff = abs(got.astype(trusted.float64) - want)
    return float(diff.max()) if bool((diff == diff).all()) else float("nan")


# -- the message ------------------------------------------------------------------------------
def says(what, problem, why="") -> str:
    """The one message format: "<what>: <problem>; probably <why>"."""
    return f"{what}: {problem}" + (f"; probably {why}" if why else "")


def where(rank, size) -> str:
    return f"rank {rank} of {size}"


def show(a):
    """Values for a message, on one line."""
    return None if a is None else a.tolist()


def shape(a):
    return None if a is None else a.shape


def mismatch(got, want, what, *, dtype="float32", scale=None, shapes=(), suspects=(),
             missing="") -> str:
    """"" when `got` matches `want`; else what is wrong with `what`, in the one format, with the
    mistake a known wrong answer explains. shapes: (shape, why) pairs, wrong shapes a known
    mistake produces; suspects: (array, why) pairs, the values a known mistake produces (one
    that matches `want` too is ignored); missing: why `got` may be None; scale: the sum of
    |terms| of each element (TERMS), or None for |want| (VALUES)."""
    if got is None:
        return says(what, "is None", missing)
    if got.shape != want.shape:
        why = next((text for wrong, text in shapes if tuple(wrong) == got.shape), "")
        return says(what, f"expected shape {tuple(want.shape)}, got {got.shape}", why)
    if close(got, want, dtype, scale):
        return ""
    why = next((text for wrong, text in suspects
                if close(got, wrong, dtype, scale) and not close(want, wrong, dtype, scale)), "")
    allowed = tolerance(dtype, scale is not None).allowed(scale is not None)
    return says(what, f"values differ from the dense result by up to "
                      f"{deviation(got, want):.3g} (allowed: {allowed})", why)


def expect(text):
    """Fail with `text` unless it is empty (a verdict of mismatch and its kind)."""
    if text:
        fail(text)


# -- the numpy checks' verdicts ---------------------------------------------------------------
def expect_array(got, name):
    if not isinstance(got, trusted.ndarray):
        fail(says(name, f"returned {type(got).__name__}, expected a numpy array"))
    return got


def expect_output(got, want, scale, dtype, name, shape_hints=(), explanations=()):
    """An ndarray of want's shape, with its values to the precision of `dtype` (TERMS)."""
    expect(mismatch(expect_array(got, name), want, name, dtype=dtype, scale=scale,
                    shapes=shape_hints, suspects=explanations))


def expect_number(got, want, name, hint="", rtol=1e-9):
    """A counted or computed quantity (all-reduces, bytes, FLOPs, seconds): a real number
    equal to `want` up to `rtol` (relative, or absolute below 1)."""
    if isinstance(got, bool) or not isinstance(got, (int, float)) and not hasattr(got, "__float__"):
        fail(says(name, f"returned {type(got).__name__}, expected a number"))
    value = float(got)
    if not abs(value - want) <= rtol * max(1.0, abs(want)):
        fail(says(name, f"expected {want:g}, got {value:g}", hint))


def expect_dtype(got, dtype, name):
    if got.dtype != trusted.dtype(dtype):
        fail(says(name, f"inputs were {trusted.dtype(dtype)} but the output is {got.dtype}",
                  "an upcast on the way (a float64 literal, np.zeros without dtype=, or an "
                  "explicit astype): keep the input dtype"))


def expect_value_error(call, description, name):
    """`call()` must raise ValueError."""
    try:
        result = call()
    except ValueError:
        return
    except Exception as exc:  # noqa: BLE001 - any other exception is the finding
        fail(f"{name}{description} raised {type(exc).__name__} ({exc}); "
             f"expected ValueError with a message saying what is wrong")
    fail(f"{name}{description} returned {type(result).__name__} instead of raising ValueError")


# -- in-place changes -------------------------------------------------------------------------
def snapshot(value, depth=0):
    """A deep copy of an argument as sent: arrays copied, lists, tuples and dicts rebuilt."""
    if isinstance(value, trusted.ndarray):
        return value.copy()
    if depth > 64:
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return {k: snapshot(v, depth + 1) for k, v in value.items()}
    return value


_PLAIN = (bool, int, float, complex, str, bytes, type(None), trusted.generic)


def changed(before, after, label, depth=0) -> str:
    """"" when `after` is `before` as it was sent, whole (every array of it, at any depth of
    lists, tuples and dicts: shape, dtype and every value); else what changed."""
    if isinstance(before, trusted.ndarray):
        if not isinstance(after, trusted.ndarray):
            return f"{label} was replaced by a {type(after).__name__}"
        if after.shape != before.shape:
            return f"{label} changed shape {before.shape} -> {after.shape}"
        if after.dtype != before.dtype:
            return f"{label} changed dtype {before.dtype} -> {after.dtype}"
        same = (after == before) | ((after != after) & (before != before))
        return "" if bool(same.all()) else f"{label} holds other values"
    if isinstance(before, (list, tuple, dict)):
        if type(after) is not type(before):
            return f"{label} was replaced by a {type(after).__name__}"
        if len(after) != len(before):
            return f"{label} changed length {len(before)} -> {len(after)}"
        if depth > 64:
            return ""
        if isinstance(before, dict):
            if set(after) != set(before):
                return (f"{label} changed keys {sorted(map(str, before))} -> "
                        f"{sorted(map(str, after))}")
            pairs = [(f"{label}[{k!r}]", before[k], after[k]) for k in before]
        else:
            pairs = [(f"{label}[{i}]", b, a) for i, (b, a) in enumerate(zip(before, after))]
        return next((text for text in (changed(b, a, lbl, depth + 1) for lbl, b, a in pairs)
                     if text), "")
    if not isinstance(before, _PLAIN):
        return ""         # a function passed in (an activation): not data, nothing to compare
    if type(after) is not type(before) or not after == before:
        return f"{label} changed {before!r} -> {after!r}"[:200]
    return ""


def expect_unchanged(before, after, label, name):
    """The argument `label` of `name` as it was sent (snapshot), whole; any difference fails."""
    text = changed(before, after, label)
    if text:
        fail(says(name, f"modified its input in place ({text}); inputs must be left as they "
                        f"were: work on new arrays"))


from ._harness import make_read_only  # noqa: E402

make_read_only(__name__)   # `verdict.mismatch = lambda *a, **k: ""` in a solution cell raises
