"""One verdict layer for tensors: the tolerance, the shape rule, the messages and the diagnoses.

Both places that judge a tensor-parallel layer use it: the torch notebooks' checks
(assignments/<name>/checks.py, in the grader's process) and the gpu_runner's judges
(assignments/<name>/gpu/judge.py, in the grader process, on what torchrun ranks reported). numpy float64 only: nothing here imports
torch, so the judging side needs none.

A value is judged against the dense reference (float64, computed here by hand):
`mismatch(got, want, what, ...)` is "" when it matches, else ONE sentence saying what is wrong
and, when the numbers match a known mistake, which one ("only the local shard returned", "the
bias added on every rank before the all-reduce", "only this rank's term of dL/dx", "another
rank's shard"...). Callers prefix it with `where(rank, size)`, so every message names the world
size and the rank, and never a file the student cannot see.
"""
from __future__ import annotations

from . import _trusted as T
from .cases import arrays
from .compare import fail

# got matches want when |got - want| <= ATOL + RTOL * |want| elementwise (torch.allclose's rule;
# NaN never matches), with (ATOL, RTOL) for the dtype the layer computed in: float32 is what the
# layers run in; float64 runs check that nothing on the way dropped to float32.
TOLERANCE = {"float32": (1e-5, 1e-5), "float64": (1e-10, 1e-10)}


def where(rank, size):
    return f"rank {rank} of {size}"


# -- comparing ----------------------------------------------------------------------------------
def close(got, want, dtype="float32"):
    """Same shape, and every element within the tolerance of `dtype`."""
    if got is None or got.shape != want.shape:
        return False
    atol, rtol = TOLERANCE[dtype]
    return bool((abs(got - want) <= atol + rtol * abs(want)).all())


def equal(got, want):
    """torch.equal: same shape, same values."""
    return got is not None and got.shape == want.shape and bool((got == want).all())


def max_diff(got, want):
    if got.shape != want.shape:
        return float("inf")
    if not got.size:
        return 0.0
    diff = abs(got - want)
    return float(diff.max()) if bool((diff == diff).all()) else float("nan")


def shape(a):
    return None if a is None else a.shape


def show(a):
    """Values for a message, on one line."""
    return None if a is None else a.tolist()


def mismatch(got, want, what, *, dtype="float32", shapes=(), suspects=(), missing=""):
    """"" when `got` matches `want`; else what is wrong with `what`, and why if a known mistake
    explains it. shapes: (shape, why) pairs, wrong shapes a known mistake produces; suspects:
    (array, why) pairs, the values a known mistake produces (one equal to `want` is ignored);
    missing: why `got` may be None."""
    if got is None:
        return f"{what} is None" + (f": {missing}" if missing else "")
    if got.shape != want.shape:
        why = next((text for wrong, text in shapes if tuple(wrong) == got.shape), "")
        return f"{what} has shape {got.shape}, expected {want.shape}" + (f": {why}" if why else "")
    if close(got, want, dtype):
        return ""
    why = next((text for wrong, text in suspects
                if close(got, wrong, dtype) and not close(want, wrong, dtype)), "")
    return (f"{what} differs from the dense result by up to {max_diff(got, want):.3g}"
            + (f": {why}" if why else ""))


def zero_init(got, what):
    """A freshly built bias must be zero."""
    if got is None or not bool((got == 0).all()):
        return f"{what} must start at zero, got {show(got)}"
    return ""


# -- diagnoses: what a known mistake produces ----------------------------------------------------
LOCAL_SHARD = ("only the local shard returned: with gather_output=True every rank returns the "
               "full output (gather_from_tp_region)")


def local_shard(local_shape):
    """The shape of a column layer's output when it forgets to gather."""
    return tuple(local_shape), LOCAL_SHARD


def bias_every_rank(dense, bias, size):
    """A row layer that adds its bias before the all-reduce: the bias counted `size` times."""
    return (dense + (size - 1) * bias,
            f"the bias added on every rank before the all-reduce (counted {size} times); add it "
            f"once, after the reduce")


def bias_grad_rank0_only(bias_grad):
    """A row layer that adds its bias on rank 0 only, before the reduce: the other ranks' copy of
    the bias is not in the graph, so its gradient stays zero (or None)."""
    return (bias_grad * 0,
            "no bias gradient on this rank: the bias was added on rank 0 only, before the reduce, "
            "so the other ranks' bias never gets one; add it on every rank, after the reduce")


def own_term_only(term, through="the input must go through copy_to_tp_region (f)"):
    """The input gradient of a layer without f: this rank's term of the sum over ranks."""
    return term, (f"only this rank's term of dL/dx: {through}, whose backward all-reduces the "
                  f"gradient")


def other_shards(master, bounds, rank, axis, names="rows"):
    """(array, why) for every other shard of `master` along `axis` of the same width as this
    rank's, and for the offsets that ignore the remainder (start = rank * (n // p))."""
    lo, hi = bounds[rank]
    n, p = master.shape[axis], len(bounds)
    starts = {r: a for r, (a, b) in enumerate(bounds) if r != rank and b - a == hi - lo}
    found = [(a, f"{names} {a}..{a + hi - lo - 1} of master_weight, rank {r}'s shard, instead of "
                 f"{lo}..{hi - 1}: wrong shard for the rank (the group rank of `group`)")
             for r, a in starts.items()]
    naive = rank * (n // p)
    if naive != lo and naive + hi - lo <= n:
        found.append((naive, f"{names} {naive}..{naive + hi - lo - 1} of master_weight instead of "
                             f"{lo}..{hi - 1}: the shard offsets ignore the remainder (the first "
                             f"n % p ranks get one more)"))
    take = (lambda a: master[a:a + hi - lo]) if axis == 0 else (lambda a: master[:, a:a + hi - lo])
    return [(take(a), why) for a, why in found]


DENSE_ON_RANK = ("computed from the whole master_weight on this rank: only this rank's shard of "
                 "it is the layer's weight (the rest differs on every rank); compute this rank's "
                 "shard only, then gather")


# -- a rank's returned values in the notebook (tpgrade._torch_trusted.as_numpy) ------------------
def array(value, rank, what):
    """A rank's returned value as a float64 array; None stays None; a description of something
    that was not a tensor fails the check."""
    if value is None:
        return None
    if isinstance(value, str):
        fail(f"rank {rank}: {what} is {value}, expected a torch.Tensor")
    if type(value) is not T.ndarray:
        fail(f"rank {rank}: {what} did not come back as a tensor")
    return value.astype(T.float64)


# -- test data ----------------------------------------------------------------------------------
def f32(*shapes, seed):
    """float32 random normal test data."""
    return arrays(seed, *shapes, dtype=T.float32)


def master(rows, cols):
    """0, 1, 2, ... as a (rows, cols) float32 weight: every shard is recognisable."""
    return T.arange(rows * cols, dtype=T.float32).reshape(rows, cols)


def noisy_master(weight, lo, hi, axis, seed):
    """`weight` inside [lo, hi) along `axis` (rows: 0, columns: 1), seeded noise outside it: the
    master_weight one rank gets. Each rank is given its own (another seed, another shard), so a
    rank that computes more than its shard from it gets a wrong answer."""
    noisy = arrays(seed, weight.shape, dtype=weight.dtype)[0]
    index = (slice(lo, hi),) if axis == 0 else (slice(None), slice(lo, hi))
    noisy[index] = weight[index]
    return noisy


# -- dense references (float64) -----------------------------------------------------------------
def linear(x, w, b=None):
    """F.linear(x, W, b)."""
    y = x.astype(T.float64) @ w.astype(T.float64).T
    return y if b is None else y + b


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
    """y = F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2) and the gradients of L = sum(y * dy):
    {"y", "dx", "dw1", "db1", "dw2", "db2", "dh"} (dh: dL/d(fc1's output), for diagnoses)."""
    x, w1, w2, dy = (a.astype(T.float64) for a in (x, w1, w2, dy))
    h = x @ w1.T + b1
    act, slope = gelu(h)
    dh = (dy @ w2) * slope
    return {"y": act @ w2.T + b2, "dx": dh @ w1, "dw1": dh.T @ x, "db1": dh.sum(axis=0),
            "dw2": dy.T @ act, "db2": dy.sum(axis=0), "dh": dh}


# -- the device and dtype rules (gpu_runner: float64 runs with meta as the default device) -----
def wrong_device(device, input_device, what):
    return (f"{what} is on {device}, the input on {input_device}: a tensor created without "
            f"device= on the way (torch.zeros(shape), torch.empty(shape)...); create it from the "
            f"input: x.new_zeros(...), torch.empty_like(x), torch.zeros(..., device=x.device, "
            f"dtype=x.dtype)")


def wrong_dtype(dtype, what):
    return (f"{what} is {dtype} for a float64 input: a tensor created without dtype= (float32 by "
            f"default) on the way; give it the input's dtype (x.new_zeros, dtype=x.dtype)")


def float32_on_the_way(got, want):
    """A float64 run whose values match only to float32 precision (a suspect for mismatch)."""
    return (got if got is not None and close(got, want) else want,
            "right only to float32 precision: a tensor created without dtype= (float32 by "
            "default) on the way rounds the values; give it the input's dtype (x.new_zeros, "
            "dtype=x.dtype)")


def not_moved(names):
    return (f"tensor attribute{'s' if len(names) > 1 else ''} {', '.join(names)}: neither a "
            f"parameter nor a buffer, so .to(device) and .to(dtype) leave it behind (on the CPU, "
            f"in float32); make it an nn.Parameter or a buffer (register_buffer), or create it "
            f"in forward from the input")


from ._harness import make_read_only  # noqa: E402

make_read_only(__name__)   # `tensors.mismatch = lambda *a, **k: ""` in a solution cell raises
