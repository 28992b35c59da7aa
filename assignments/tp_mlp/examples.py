"""Example students for tp_mlp: the MLP's mistakes, a valid alternative, a crashing one.

Each entry is a `Submission`: the solution cells it fills in (every other solution cell gets
the instructor's answer) and the exact set of graded test cells that must lose points; every
other graded cell must keep full marks (assignments/tp_mlp/grades.json records them).

REFERENCE   the instructor's solutions: full marks.
UNMODIFIED  the release as handed out: zero on every graded test.
STUDENTS    classic mistakes (each losing on the test that names it), a valid alternative
            style (full marks), one crashing submission.
DEMO        the students `make demo` grades (with a "reference" of its own).
"""
from __future__ import annotations

from tpcourse.submissions import Submission

MLP = "tp_mlp"


def _mlp(student, why, loses=(), **answers):
    return Submission(student, MLP, {MLP: answers}, frozenset(loses), why)


# --------------------------------------------------------------------------- mistakes

_MLP_CHECKS = '''
    x, W1, W2 = np.asarray(x), np.asarray(W1), np.asarray(W2)
    if W1.ndim != 2 or W2.ndim != 2 or x.shape[-1] != W1.shape[1] or W2.shape[1] != W1.shape[0]:
        raise ValueError(f"bad shapes x {x.shape}, W1 {W1.shape}, W2 {W2.shape}")
    if b1 is not None and np.shape(b1) != (W1.shape[0],):
        raise ValueError("bad b1")
    if b2 is not None and np.shape(b2) != (W2.shape[0],):
        raise ValueError("bad b2")'''

MLP_TWO_ALL_REDUCES = _mlp(
    "mlp_two_all_reduces", "W1 row-parallel with its own all-reduce, then W2 row-parallel",
    {"test_mlp_one_all_reduce"},
    sol_mlp_tp=f'''
def mlp_tp(x, W1, W2, num_ranks, b1=None, b2=None, activation=relu):{_MLP_CHECKS}
    # layer 1 split over the input features: partial sums -> all-reduce
    h = all_reduce([x[..., s] @ W1[:, s].T for s in shard_slices(W1.shape[1], num_ranks)])
    if b1 is not None:
        h = h + b1
    a = activation(h)
    y = all_reduce([a[..., s] @ W2[:, s].T for s in shard_slices(W2.shape[1], num_ranks)])
    return y if b2 is None else y + b2
''')

MLP_GATHER_BEFORE_ACTIVATION = _mlp(
    "mlp_gather_before_activation", "all-gathers the hidden layer, then splits it again for W2",
    {"test_mlp_one_all_reduce"},
    sol_mlp_tp=f'''
def mlp_tp(x, W1, W2, num_ranks, b1=None, b2=None, activation=relu):{_MLP_CHECKS}
    slices = shard_slices(W1.shape[0], num_ranks)
    h = all_gather([x @ W1[s].T + (b1[s] if b1 is not None else 0) for s in slices])
    a = activation(h)
    y = all_reduce([a[..., s] @ W2[:, s].T for s in slices])
    return y if b2 is None else y + b2
''')

MLP_ACTIVATION_AFTER_REDUCE = _mlp(
    "mlp_activation_after_reduce", "applies the activation to the all-reduced output",
    {"test_mlp_small", "test_mlp_matches_dense", "test_mlp_uneven_shards", "test_mlp_input_dims",
     "test_mlp_biases", "test_mlp_activation", "test_mlp_reduce_inputs", "test_mlp_dtype"},
    sol_mlp_tp=f'''
def mlp_tp(x, W1, W2, num_ranks, b1=None, b2=None, activation=relu):{_MLP_CHECKS}
    partials = []
    for s in shard_slices(W1.shape[0], num_ranks):
        h_r = x @ W1[s].T
        if b1 is not None:
            h_r = h_r + b1[s]
        partials.append(h_r @ W2[:, s].T)
    y = activation(all_reduce(partials))      # too late: relu(a + b) != relu(a) + relu(b)
    return y if b2 is None else y + b2
''')

# --------------------------------------------------------------------------- valid alternatives

ALT_MLP = _mlp("alt_mlp", "MLP via einsum over precomputed shards; comm counts via a table", (),
               sol_mlp_tp='''
def mlp_tp(x, W1, W2, num_ranks, b1=None, b2=None, activation=relu):
    x, W1, W2 = np.asarray(x), np.asarray(W1), np.asarray(W2)
    if x.ndim < 1 or W1.shape[1:] != x.shape[-1:] or W2.ndim != 2 or W2.shape[1] != W1.shape[0]:
        raise ValueError(f"x {x.shape}, W1 {W1.shape}, W2 {W2.shape} do not fit together")
    for name, b, n in (("b1", b1, W1.shape[0]), ("b2", b2, W2.shape[0])):
        if b is not None and np.shape(b) != (n,):
            raise ValueError(f"{name} should have shape ({n},), not {np.shape(b)}")
    shards = [(W1[s], W2[:, s], None if b1 is None else b1[s])
              for s in shard_slices(W1.shape[0], num_ranks)]
    partials = []
    for W1_r, W2_r, b1_r in shards:
        h_r = np.einsum("...d,hd->...h", x, W1_r)
        partials.append(np.einsum("...h,oh->...o", activation(h_r if b1_r is None else h_r + b1_r), W2_r))
    y = all_reduce(partials)
    return y if b2 is None else y + b2
''', sol_comm_counts='''
def allreduces_per_layer(tp, backward=False):
    if type(tp) is not int or tp < 1:
        raise ValueError("tp must be a positive int")
    per_pass = {False: 2, True: 4}[bool(backward)]
    return per_pass * (tp > 1)


def ring_allreduce_bytes(num_elements, num_ranks, bytes_per_elem=2):
    if type(num_ranks) is not int or num_ranks < 1:
        raise ValueError("num_ranks must be a positive int")
    if num_elements < 0 or bytes_per_elem < 1:
        raise ValueError("sizes must be non-negative and bytes_per_elem >= 1")
    reduce_scatter = (num_ranks - 1) * num_elements / num_ranks
    all_gather_ = (num_ranks - 1) * num_elements / num_ranks
    return (reduce_scatter + all_gather_) * bytes_per_elem


def layer_allreduce_bytes(batch, seq, hidden, tp, bytes_per_elem=2, backward=False):
    if min(batch, seq, hidden) < 0:
        raise ValueError("batch, seq and hidden must be >= 0")
    n = allreduces_per_layer(tp, backward)
    return n * ring_allreduce_bytes(batch * seq * hidden, tp, bytes_per_elem)
''')

# --------------------------------------------------------------------------- broken runs

CRASHING = Submission(
    "crashing", MLP,
    {MLP: {"sol_mlp_tp": "from my_tp_helpers import mlp_tp   # a file never submitted\n",
           "sol_comm_counts": "from my_tp_helpers import (allreduces_per_layer, ring_allreduce_bytes,\n"
                              "                           layer_allreduce_bytes)\n"}},
    why="imports its answers from a helper module it never submitted: every test errors",
    loses_all=True)

# --------------------------------------------------------------------------- lists

REFERENCE = [Submission("reference", MLP, why="the instructor's solutions")]
UNMODIFIED = [Submission("unmodified", MLP, why="the release as handed out",
                         unanswered=frozenset({MLP}), loses_all=True)]

MISTAKES = [MLP_TWO_ALL_REDUCES, MLP_GATHER_BEFORE_ACTIVATION, MLP_ACTIVATION_AFTER_REDUCE]
VALID = [ALT_MLP]
STUDENTS = MISTAKES + VALID + [CRASHING]
ALL = REFERENCE + UNMODIFIED + STUDENTS
DEMO = ("mlp_two_all_reduces", "crashing")
