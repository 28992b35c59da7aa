"""Comparing a student's output with the dense computation, and saying what went wrong."""
from __future__ import annotations

from . import _trusted as T

# Allowed error, relative to sum(|terms|) of each output element (a bound that does not
# depend on cancellation): float64 to ~1e-12, float32 to its own precision.
RTOL = {T.dtype(T.float64): 1e-12, T.dtype(T.float32): 1e-5}
_TINY = 1e-30


class CheckFailed(AssertionError):
    """A check found a mistake; the message says which one."""


def fail(message):
    raise CheckFailed(message)


def expect_array(got, name):
    if not isinstance(got, T.ndarray):
        fail(f"{name} returned {type(got).__name__}, expected a numpy array")
    return got


def expect_shape(got, shape, name, hints=()):
    """`hints`: (shape, explanation) pairs for wrong shapes a known mistake produces."""
    if got.shape != tuple(shape):
        why = next((text for wrong, text in hints if got.shape == tuple(wrong)), "")
        fail(f"{name}: expected shape {tuple(shape)}, got {got.shape}" + (f": {why}" if why else ""))


def rel_error(got, want, scale):
    """max |got - want| / scale, elementwise scale; NaN and inf count as infinitely wrong."""
    if got.size == 0:
        return 0.0
    err = abs(got.astype(T.float64) - want) / (scale + _TINY)
    bad = ~(err <= 1e300)          # NaN / inf
    if bad.any():
        return float("inf")
    return float(err.max())


def is_close(got, want, scale, dtype):
    return got.shape == want.shape and rel_error(got, want, scale) <= RTOL[T.dtype(dtype)]


def expect_close(got, want, scale, dtype, name, explanations=()):
    """Values must match `want` (float64) to the precision of `dtype`.

    `explanations`: (array, text) pairs: the output a known mistake produces, and what to say.
    """
    err = rel_error(got, want, scale)
    if err <= RTOL[T.dtype(dtype)]:
        return
    why = next((text for wrong, text in explanations
                if wrong.shape == got.shape and is_close(got, wrong, scale, dtype)), "")
    fail(f"{name}: values differ from the dense result (relative error {err:.2e}, "
         f"allowed {RTOL[T.dtype(dtype)]:.0e})" + (f": {why}" if why else ""))


def expect_number(got, want, name, hint="", rtol=1e-9):
    """A counted or computed quantity (all-reduces, bytes, FLOPs, seconds): a real number
    equal to `want` up to `rtol` (relative, or absolute below 1)."""
    if isinstance(got, bool) or not isinstance(got, (int, float)) and not hasattr(got, "__float__"):
        fail(f"{name} returned {type(got).__name__}, expected a number")
    value = float(got)
    if not abs(value - want) <= rtol * max(1.0, abs(want)):
        fail(f"{name}: expected {want:g}, got {value:g}" + (f": {hint}" if hint else ""))


def expect_dtype(got, dtype, name):
    if got.dtype != T.dtype(dtype):
        fail(f"{name}: inputs were {T.dtype(dtype)} but the output is {got.dtype}: keep the "
             f"input dtype (a float64 literal, np.zeros without dtype=, or an explicit "
             f"astype upcasts)")


def expect_unchanged(before, after, what, name):
    if (before.shape != after.shape or before.dtype != after.dtype
            or not bool((before == after).all())):
        fail(f"{name} modified its input {what} in place (shape {before.shape} -> {after.shape}); "
             f"inputs must be left as they were: work on new arrays")


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
