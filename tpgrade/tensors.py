"""What the torch layers' verdicts know: the diagnoses of known mistakes, the test data, the
dense float64 references and the device rules' messages.

Both places that judge a tensor-parallel layer use it with the verdict core (tpgrade.verdict:
the tolerance, the message format, `mismatch`): the torch notebooks' checks
(assignments/<name>/checks.py, in the grader's process) and the gpu_runner's judges
(assignments/<name>/gpu/judge.py, in the grader process, on what torchrun ranks reported).
numpy float64 only: nothing here imports torch, so the judging side needs none.

A diagnosis is an (array, why) pair, the values a known mistake produces and what it is, for
`verdict.mismatch(..., suspects=...)` ("only the local shard returned", "the bias added on every
rank before the all-reduce", "only this rank's term of dL/dx", "another rank's shard"...): a
failed verdict then says what the mistake probably is.
"""
from __future__ import annotations

from . import _trusted as trusted
from .cases import arrays
from .verdict import close, says, show


def zero_init(got, what):
    """A freshly built bias must be zero."""
    if got is None or not bool((got == 0).all()):
        return says(what, f"must start at zero, got {show(got)}",
                    "it was left uninitialised (torch.empty) or initialised at random; "
                    "a new bias is torch.zeros")
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


# -- test data ----------------------------------------------------------------------------------
def f32(*shapes, seed):
    """float32 random normal test data."""
    return arrays(seed, *shapes, dtype=trusted.float32)


def master(rows, cols):
    """0, 1, 2, ... as a (rows, cols) float32 weight: every shard is recognisable."""
    return trusted.arange(rows * cols, dtype=trusted.float32).reshape(rows, cols)


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
    y = x.astype(trusted.float64) @ w.astype(trusted.float64).T
    return y if b is None else y + b


def linear_grads(x, w, dy):
    """dL/dx, dL/dW, dL/db of L = sum(F.linear(x, W, b) * dy), x of shape (batch, in)."""
    dy = dy.astype(trusted.float64)
    return dy @ w.astype(trusted.float64), dy.T @ x.astype(trusted.float64), dy.sum(axis=0)


def gelu(h):
    """F.gelu (exact, erf form) of h, and its derivative."""
    cdf = trusted.asarray([0.5 * (1.0 + trusted.erf(v / 2 ** 0.5)) for v in h.ravel().tolist()],
                          dtype=trusted.float64).reshape(h.shape)
    pdf = trusted.exp(-0.5 * h * h) / (2 * 3.141592653589793) ** 0.5
    return h * cdf, cdf + h * pdf


def dense_mlp(x, w1, b1, w2, b2, dy):
    """y = F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2) and the gradients of L = sum(y * dy):
    {"y", "dx", "dw1", "db1", "dw2", "db2", "dh"} (dh: dL/d(fc1's output), for diagnoses)."""
    x, w1, w2, dy = (a.astype(trusted.float64) for a in (x, w1, w2, dy))
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

make_read_only(__name__)   # `tensors.other_shards = lambda *a, **k: []` in a solution cell raises
