"""torch as it was when a torch notebook's read-only setup cell imported its checks.

Where each part of a torch check runs, and why that is enough:

* The verdict (expected values, comparisons, messages) is computed in the grading process with
  numpy (`tpgrade._trusted`) from test data made with numpy, never with torch. A notebook may
  rebind torch.allclose, torch.equal, torch.testing.*, F.linear, Tensor methods and dunders
  (`torch.Tensor.__eq__`, `.shape`, `.abs`...) or push a TorchFunctionMode: none of that
  reaches a comparison.
* torch runs only inside the ranks (forked by tpsim.ranks), to run the student's
  layers and turn what they return into numpy arrays with the TensorBase methods captured here
  (the C type is immutable, so these cannot be swapped). Whatever a notebook does to torch can
  change only the student's own numbers there, and the right numbers are what a correct
  solution produces anyway. (That the numbers come from tensor-parallel code, with the right
  collectives, is checked by the gpu_runner, not by the notebook's cells.)
* Before each check, `restore()` puts back the genuine torch.distributed functions and
  tpsim.ranks, so the ranks start from real collectives and the real rank machinery,
  whatever the notebook rebound (`dist.all_reduce = fake`, `torch_ranks._collect = ...`).
  The checks call the `run_on_ranks` captured here, never the notebook's name for it.
* Under `nbgrader autograde` none of this is needed: the judge (tpjudge) runs the checks in the
  grader's process, where no student code runs, and the ranks in the student's own process.
"""
import functools

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from tpsim import ranks as torch_ranks

from ._harness import Genuine, check

TIMEOUT = 20           # seconds per run_on_ranks call: a deadlock is reported well within a cell

_TB = torch._C.TensorBase
_detach, _cpu, _double, _numpy = _TB.detach, _TB.cpu, _TB.double, _TB.numpy
_requires_grad, _mul, _sum = _TB.requires_grad_, _TB.mul, _TB.sum
_needs_grad = _TB.requires_grad.__get__
_from_numpy = torch.from_numpy
no_grad = torch.no_grad
_backward = torch.autograd.backward
get_rank = dist.get_rank
is_initialized = dist.is_initialized
_run_on_ranks = torch_ranks.run_on_ranks

# The functions a layer or the rank machinery calls; not the module's state (the process-group
# registry changes legitimately), so names only.
_DIST_NAMES = (
    "is_available", "is_initialized", "init_process_group", "destroy_process_group", "new_group",
    "get_rank", "get_world_size", "barrier", "all_reduce", "all_gather", "all_gather_into_tensor",
    "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all",
    "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv")
_GENUINE = (Genuine(dist, _DIST_NAMES), Genuine(c10d, _DIST_NAMES), Genuine(torch_ranks))


def run_on_ranks(fn, world_size, *args, reply, **kwargs):
    """torch_ranks.run_on_ranks, as captured, and its result checked whole against `reply`
    (tpgrade.replies: the number of ranks, each rank's values, their kinds) before any check
    reads it. Under the judge (tpjudge), where the student's layers are stand-ins for code in
    another process, the ranks are forked in that process and only their data comes back, as
    that process sends it: the reply is what makes it safe to read."""
    remote = next((a.__tpjudge_remote__ for a in args if hasattr(a, "__tpjudge_remote__")), None)
    if remote is not None:
        return reply.check(remote.run_on_ranks(fn, world_size, *args, **kwargs))
    return reply.check(_run_on_ranks(fn, world_size, *args, **kwargs))


def restore():
    """Undo what a notebook did to torch.distributed's functions and to tpsim.ranks."""
    for module in _GENUINE:
        module.restore()


def torch_check(func):
    """A public check of a torch notebook: first put back the genuine torch.distributed and rank
    machinery (restore), then run as every check runs (tpgrade._harness.check)."""
    @functools.wraps(func)
    def restored(*args, **kwargs):
        restore()
        return func(*args, **kwargs)
    return check(restored)


# -- used inside the ranks ------------------------------------------------------------------
def tensor(array, requires_grad=False):
    """A torch tensor holding a copy of a numpy array (the test data is made with numpy)."""
    t = _from_numpy(array.copy())
    return _requires_grad(t) if requires_grad else t


def as_numpy(value):
    """What a rank sends back for a tensor: its values as a float64 ndarray. None stays None;
    anything else becomes a short description (a str) for the check's message."""
    if value is None:
        return None
    if _TB not in type(value).__mro__:
        return f"a {type(value).__name__}"
    try:
        return _numpy(_double(_cpu(_detach(value))))
    except Exception as exc:  # noqa: BLE001 (e.g. a meta tensor: say so in the message)
        return f"a tensor that cannot be read ({type(exc).__name__}: {exc})"


def backprop(output, upstream, what):
    """Backward of sum(output * upstream) (upstream: a numpy array); a clear error when the
    output is not a tensor of the upstream's shape (the ranks' checks could not go on)."""
    values = as_numpy(output)
    if values is None or isinstance(values, str):
        raise TypeError(f"{what} returned {values}, expected a torch.Tensor")
    if values.shape != upstream.shape:
        raise ValueError(f"{what} returned shape {values.shape}, expected {upstream.shape}: "
                         f"its gradients cannot be checked")
    if not _needs_grad(output):
        raise ValueError(f"{what} returned a tensor that is not connected to its input in "
                         f"autograd (a collective without its autograd twin?): its gradients "
                         f"cannot be checked")
    _backward([_sum(_mul(output, tensor(upstream)))])
