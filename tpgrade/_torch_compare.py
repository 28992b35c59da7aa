"""What the tp_torch checks compare with, and how: numpy only (see tpgrade._torch_trusted).

The test data is float32 (what torch.randn gives) made with numpy's generator; the dense
references (F.linear, the gelu MLP and their gradients) are computed here by hand in float64;
"close" is torch.allclose's rule (atol = rtol = 1e-5) applied to numpy arrays.
"""
from __future__ import annotations

from . import _trusted as T
from .cases import arrays
from .compare import fail

ATOL = RTOL = 1e-5     # torch.allclose(got, want, atol=1e-5) on float32 results


def array(value, rank, what):
    """A rank's returned value (tpgrade._torch_trusted.as_numpy) as a float64 array; None stays
    None; a description of something that was not a tensor fails the check."""
    if value is None:
        return None
    if isinstance(value, str):
        fail(f"rank {rank}: {what} is {value}, expected a torch.Tensor")
    if type(value) is not T.ndarray:
        fail(f"rank {rank}: {what} did not come back as a tensor")
    return value.astype(T.float64)


def equal(got, want):
    """torch.equal: same shape, same values."""
    return got is not None and got.shape == want.shape and bool((got == want).all())


def close(got, want):
    """torch.allclose(got, want, atol=1e-5): |got - want| <= atol + rtol * |want|; NaN fails."""
    if got is None or got.shape != want.shape:
        return False
    return bool((abs(got - want) <= ATOL + RTOL * abs(want)).all())


def max_diff(got, want):
    if got.shape != want.shape:
        return float("inf")
    return float(abs(got - want).max()) if got.size else 0.0


def shape(a):
    return None if a is None else a.shape


def show(a):
    """Values for a message, on one line."""
    return None if a is None else a.tolist()


def f32(*shapes, seed):
    """float32 random normal test data."""
    return arrays(seed, *shapes, dtype=T.float32)


def master(rows, cols):
    """0, 1, 2, ... as a (rows, cols) float32 weight: every shard is recognisable."""
    return T.arange(rows * cols, dtype=T.float32).reshape(rows, cols)


# -- dense references (float64) ---------------------------------------------------------------
def linear(x, w, b):
    """F.linear(x, W, b)."""
    return x.astype(T.float64) @ w.astype(T.float64).T + b


def linear_grads(x, w, dy):
    """dL/dx, dL/dW, dL/db of L = sum(F.linear(x, W, b) * dy), x of shape (batch, in)."""
    dy = dy.astype(T.float64)
    return dy @ w.astype(T.float64), dy.T @ x.astype(T.float64), dy.sum(axis=0)


def gelu(h):
    """F.gelu (exact, erf form) of h, and its derivative."""
    cdf = T.asarray([0.5 * (1.0 + T.erf(v / 2 ** 0.5)) for v in h.ravel().tolist()],
                    dtype=T.float64).reshape(h.shape)
    pdf = T.exp(-0.5 * h * h) / (2 * 3.141592653589793) ** 0.5
    return h * cdf, cdf + h * pdf


def dense_mlp(x, w1, b1, w2, b2, dy):
    """The output y = F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2) and the gradients of
    L = sum(y * dy) for x, W1 and W2."""
    x, w1, w2, dy = (a.astype(T.float64) for a in (x, w1, w2, dy))
    h = x @ w1.T + b1
    act, slope = gelu(h)
    dh = (dy @ w2) * slope
    return act @ w2.T + b2, dh @ w1, dh.T @ x, dy.T @ act
