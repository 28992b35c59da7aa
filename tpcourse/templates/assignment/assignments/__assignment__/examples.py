"""Example students for the __assignment__ assignment (tests, `python -m tpcourse.catalogue`).

Each is a `tpcourse.submissions.Submission` naming the solution cells it fills in (every other
solution cell gets the instructor's answer) and the exact set of graded cells, test cells and
gpu_* cells, that must lose points; every other graded cell keeps full marks. Their grades are
recorded in grades.json (`python -m tpcourse.catalogue --write __assignment__`).

REFERENCE   the instructor's solutions: full marks.
UNMODIFIED  the release as handed out: zero on every graded cell.
STUDENTS    classic mistakes, each losing the cells that name it.
DEMO        the students `make demo` and the course's torchrun tests grade (their gpu_* cells).
"""
from __future__ import annotations

from tpcourse.submissions import Submission

ASSIGNMENT = "__assignment__"
GPU_CELLS = {"gpu_matmul_forward": 2}
EVERY_CELL = frozenset({"test_row_matmul_small", "test_row_matmul_uneven", *GPU_CELLS})

PARTIAL_ONLY = '''
def row_matmul(x, W, num_ranks):
    x, W = np.asarray(x), np.asarray(W)
    columns = np.array_split(np.arange(W.shape[1]), num_ranks)
    partials = [x[..., cols] @ W[:, cols].T for cols in columns]
    return partials[0]
'''

# The shard size in_features // num_ranks: right when the split is even (the visible test),
# wrong when it is not (the hidden test, and the gpu_runner's 7 features over 2-4 ranks).
EVEN_SPLIT_NUMPY = '''
def row_matmul(x, W, num_ranks):
    x, W = np.asarray(x), np.asarray(W)
    size = W.shape[1] // num_ranks
    partials = [x[..., r * size:(r + 1) * size] @ W[:, r * size:(r + 1) * size].T
                for r in range(num_ranks)]
    return all_reduce(partials)
'''
EVEN_SPLIT_TORCH = '''
class RowParallelMatmul(nn.Module):
    def __init__(self, in_features, out_features, master_weight, *, group=None):
        super().__init__()
        self.group = group
        rank, size = dist.get_rank(group), in_features // dist.get_world_size(group)
        self.weight = nn.Parameter(master_weight[:, rank * size:(rank + 1) * size].clone())

    def forward(self, x):
        y = x @ self.weight.T
        dist.all_reduce(y, group=self.group)
        return y
'''

NO_ALL_REDUCE = '''
class RowParallelMatmul(nn.Module):
    def __init__(self, in_features, out_features, master_weight, *, group=None):
        super().__init__()
        rank, p = dist.get_rank(group), dist.get_world_size(group)
        cols = np.array_split(np.arange(in_features), p)[rank]
        self.weight = nn.Parameter(master_weight[:, cols].clone())

    def forward(self, x):
        return x @ self.weight.T
'''


def _student(student, why, loses, **answers):
    return Submission(student, ASSIGNMENT, {ASSIGNMENT: answers}, frozenset(loses), why)


REFERENCE = [Submission("reference", ASSIGNMENT, why="the instructor's solutions")]
UNMODIFIED = [Submission("unmodified", ASSIGNMENT, loses=EVERY_CELL, loses_all=True,
                         why="the release as handed out", unanswered=frozenset({ASSIGNMENT}))]
STUDENTS = [
    _student("partial_only", "returns rank 0's partial sum, no all_reduce",
             {"test_row_matmul_small", "test_row_matmul_uneven"},
             sol_row_matmul=PARTIAL_ONLY),
    _student("even_split", "shards of in_features // num_ranks: uneven splits lose columns",
             {"test_row_matmul_uneven", "gpu_matmul_forward"},
             sol_row_matmul=EVEN_SPLIT_NUMPY, sol_row_parallel_matmul=EVEN_SPLIT_TORCH),
    _student("torch_no_all_reduce", "each rank returns its partial sum",
             {"gpu_matmul_forward"}, sol_row_parallel_matmul=NO_ALL_REDUCE),
]
ALL = REFERENCE + UNMODIFIED + STUDENTS
BY_NAME = {s.student: s for s in ALL}
DEMO = ("even_split",)
