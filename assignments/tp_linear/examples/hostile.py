"""Hostile and broken submissions: what the class grader and its sandbox must survive.

Each entry attacks the grader from the `column_parallel` solution cell of tp_linear (the code
runs, then the instructor's answer would follow): hang, exit, kill, grab memory, fork,
flood, rebind what tests use, tamper with test cells, read the hidden tests or `source/`,
write the gradebook, open the network, deadlock or crash torch ranks.

effect says which grade cells must lose points, the rest keeping full marks:
  "cell"  exactly the column_parallel tests (the cell failed; everything else runs),
  "dies"  the column and row tests (the kernel is gone; later cells are not run),
  "none"  nothing (the attack is harmless to the grade),
  "some"  at least `must_lose` (and never the shard_sizes tests before the attack).
reason is a regular expression the student's feedback must match.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from tpcourse import REPO
from tpcourse.submissions import Submission, build, read, reference_answers
from tpjudge.cells import is_test, meta

ASSIGNMENT = "tp_linear"
TARGET = "sol_column_parallel"

# Twice the default address-space limit (c.Sandbox.memory_mb = 4096).
_TWICE_LIMIT = 2 * 4096 * 2**20

# A plausible wrong answer (right shape, wrong values) for the attacks that try to fool tests.
_ZEROS = '''
def column_parallel(x, W, num_ranks, b=None):
    x, W = np.asarray(x), np.asarray(W)
    return np.zeros(x.shape[:-1] + (W.shape[0],), dtype=x.dtype)
'''


@dataclass(frozen=True)
class Hostile:
    student: str
    why: str
    attack: str                 # runs first in the column_parallel cell
    effect: str                 # cell | dies | none | some
    reason: str                 # regex over the feedback HTML
    answer: str | None = None   # replaces the reference answer after the attack
    must_lose: frozenset = frozenset()
    tamper: bool = False        # also rewrite every test cell (nbgrader must restore them)
    slow: bool = False          # costs one or two cell timeouts
    sandbox_only: bool = False  # kills, exhausts or reaches the grading machine: graded only
                                # in the sandbox, never in-process (tpcourse.catalogue)

    def submission(self, source_dir=None) -> Submission:
        return submission(self, source_dir)


# A port on the grader's own loopback where the hostile tests run a listener. Only loopback:
# no test ever aims at an address off this machine.
GRADER_PORT = 29917

HOSTILE = [
    Hostile("h_infinite_loop", "an infinite loop: the cell times out and is interrupted",
            "while True:\n    pass\n", "cell", r"CellTimeoutError|KeyboardInterrupt", slow=True),
    Hostile("h_deaf_loop", "ignores SIGINT and loops: the kernel is killed after a second timeout",
            "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass\n",
            "some", r"stopped responding|KernelDied", must_lose=frozenset({"test_column_small"}),
            slow=True),
    Hostile("h_os_exit", "os._exit(3): the kernel process ends",
            "import os\nos._exit(3)\n", "dies", r"kernel died"),
    Hostile("h_sys_exit", "sys.exit(1) in a cell",
            "import sys\nsys.exit(1)\n", "cell", r"SystemExit"),
    Hostile("h_kill_parent", "os.kill(os.getppid(), SIGKILL): would kill stock nbgrader",
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "cell",
            r"PermissionError|Operation not permitted", sandbox_only=True),
    Hostile("h_kill_group", "SIGKILL to its own process group",
            "import os, signal\nos.killpg(0, signal.SIGKILL)\n", "dies", r"kernel died",
            sandbox_only=True),
    Hostile("h_memory_grab", "allocates twice the memory limit",
            f"import numpy as np\n_hog = np.ones({_TWICE_LIMIT} // 8)\n", "cell", r"MemoryError",
            sandbox_only=True),
    Hostile("h_process_storm", "forks up to 3000 children (each exits after 2 s), then stops",
            "import os, time\n_kids = []\ntry:\n    for _ in range(3000):\n"
            "        _pid = os.fork()\n        if _pid == 0:\n            time.sleep(2)\n"
            "            os._exit(0)\n        _kids.append(_pid)\nfinally:\n"
            "    for _pid in _kids:\n        os.waitpid(_pid, 0)\n", "cell",
            r"BlockingIOError|Resource temporarily unavailable", sandbox_only=True),
    Hostile("h_stdout_flood", "prints 20 MB, then answers correctly",
            "import sys\nfor _ in range(20000):\n    sys.stdout.write('x' * 1000 + '\\n')\n",
            "none", r"output truncated"),
    Hostile("h_stderr_warnings", "warns on stderr in its cell and on every call",
            "import sys, warnings\nwarnings.warn('this solution is deprecated')\n",
            "some", r"warning", answer=None, must_lose=frozenset({"test_column_small"})),
    Hostile("h_rebind_numpy", "rebinds np.allclose / np.array_equal / np.isclose; wrong answer",
            "import numpy as np\nnp.allclose = lambda *a, **k: True\n"
            "np.array_equal = lambda *a, **k: True\nnp.isclose = lambda a, b, *r, **k: True\n",
            "some", r"AssertionError|expected", answer=_ZEROS,
            must_lose=frozenset({"test_column_matches_dense"})),
    Hostile("h_rebind_asserts", "rebinds np.testing and every tpgrade helper to no-ops; wrong answer",
            "import numpy as np, sys\nnp.testing.assert_allclose = lambda *a, **k: None\n"
            "np.testing.assert_array_equal = lambda *a, **k: None\n"
            "for _name, _mod in list(sys.modules.items()):\n"
            "    if _name.startswith('tpgrade'):\n"
            "        for _attr in dir(_mod):\n"
            "            if callable(getattr(_mod, _attr)) and not _attr.startswith('__'):\n"
            "                try:\n                    setattr(_mod, _attr, lambda *a, **k: None)\n"
            "                except Exception:\n                    pass\n",
            "some", r"AssertionError|expected", answer=_ZEROS,
            must_lose=frozenset({"test_column_matches_dense"})),
    Hostile("h_rebind_collectives", "replaces tpsim's collectives with silent fakes",
            "import numpy as np, tpsim\n"
            "def all_gather(per_rank, axis=-1):\n    return np.concatenate(per_rank, axis=axis)\n"
            "def all_reduce(per_rank):\n    return sum(per_rank)\n"
            "tpsim.all_gather, tpsim.all_reduce = all_gather, all_reduce\n",
            "some", r"all_gather|collective", must_lose=frozenset({"test_column_one_all_gather"})),
    Hostile("h_tamper_tests", "rewrites every test cell to `pass` (and 100 points); wrong answer",
            "", "some", r"AssertionError|expected", answer=_ZEROS, tamper=True,
            must_lose=frozenset({"test_column_matches_dense"})),
    Hostile("h_read_source", "reads the instructor's source notebook (solutions, hidden tests)",
            "import pathlib, tpsim\n_here = pathlib.Path.cwd()\n"
            "for _src in (_here.parents[2] / 'source' / 'tp_linear' / 'tp_linear.ipynb',\n"
            "             pathlib.Path(tpsim.__file__).parents[1] / 'source' / 'tp_linear'"
            " / 'tp_linear.ipynb'):\n    try:\n        print(_src.read_text()[:2000])\n"
            "    except OSError as _err:\n        print('blocked:', _err)\n"
            "raise FileNotFoundError('source/ is not readable')\n", "cell", r"FileNotFoundError"),
    Hostile("h_read_hidden_tests", "reads the notebook being graded (it holds the hidden tests)",
            "print(open('tp_linear.ipynb').read()[:2000])\n", "cell", r"FileNotFoundError"),
    Hostile("h_write_gradebook", "opens gradebook.db and sets every score to 99",
            "import pathlib, sqlite3\n"
            "_db = sqlite3.connect(str(pathlib.Path.cwd().parents[2] / 'gradebook.db'))\n"
            "_db.execute('UPDATE grade SET auto_score = 99')\n_db.commit()\n", "cell",
            r"OperationalError", sandbox_only=True),
    Hostile("h_network", "connects to a service on the grader's host (tests listen on its "
            "loopback at GRADER_PORT; the sandbox's own network namespace cannot reach it)",
            "import socket\nsocket.create_connection(('127.0.0.1', %d), timeout=5)\n" % GRADER_PORT,
            "cell", r"ConnectionRefusedError|Network is unreachable|timed out", sandbox_only=True),
    Hostile("h_torch_deadlock", "a collective on one rank of two: waits for a rank that never comes",
            "import datetime, torch.distributed as dist\n"
            "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:29731', rank=0,"
            " world_size=2, timeout=datetime.timedelta(seconds=600))\n", "some",
            r"CellTimeoutError|stopped responding|KernelDied",
            must_lose=frozenset({"test_column_small"}), slow=True, sandbox_only=True),
    Hostile("h_torch_crashed_rank", "two gloo ranks; rank 1 crashes before the all_reduce",
            "import os, datetime, torch, torch.distributed as dist, torch.multiprocessing as tmp\n"
            "def _rank(r):\n    if r == 1:\n        os._exit(1)\n"
            "    dist.init_process_group('gloo', init_method='tcp://127.0.0.1:29733', rank=r,"
            " world_size=2, timeout=datetime.timedelta(seconds=20))\n"
            "    dist.all_reduce(torch.ones(2))\n"
            "tmp.start_processes(_rank, nprocs=2, start_method='fork')\n", "cell",
            r"exit code|ProcessExitedException|ProcessRaisedException", sandbox_only=True),
]

_WARN_EVERY_CALL = '''
import sys as _sys
_column_parallel_impl = column_parallel
def column_parallel(*args, **kwargs):
    print("warning: column_parallel is deprecated", file=_sys.stderr)
    return _column_parallel_impl(*args, **kwargs)
'''


def by_name(student: str) -> Hostile:
    return next(h for h in HOSTILE if h.student == student)


def submission(h: Hostile, source_dir=None) -> Submission:
    """The Submission (answers by grade_id) for a hostile student."""
    src = Path(source_dir or REPO / "source") / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    reference = reference_answers(read(src))[TARGET]
    answer = h.answer if h.answer is not None else reference
    if h.student == "h_stderr_warnings":
        answer = reference + "\n" + _WARN_EVERY_CALL
    return Submission(h.student, ASSIGNMENT, {ASSIGNMENT: {TARGET: h.attack + answer}}, why=h.why)


def notebooks(h: Hostile, source_dir=None, release_dir=None) -> dict:
    """{filename: notebook} as the student would hand it in."""
    nbs = build(submission(h, source_dir), source_dir, release_dir)
    if h.tamper:
        for nb in nbs.values():
            for cell in nb.cells:
                if is_test(cell):
                    cell.source = "pass  # tests? what tests?"
                    meta(cell)["points"] = 100
    return nbs


def expected_losers(h: Hostile, graded: dict) -> tuple[set, set]:
    """(grade_ids that must lose, grade_ids that must keep full marks) for one hostile
    student, given the grade_ids of the notebook in order: graded = {grade_id: max}."""
    ids = list(graded)
    column = {g for g in ids if g.startswith("test_column")}
    row = {g for g in ids if g.startswith("test_row")}
    shard = {g for g in ids if g.startswith("test_shard")}
    if h.effect == "cell":
        return column, set(ids) - column
    if h.effect == "dies":
        return column | row, set(ids) - column - row
    if h.effect == "none":
        return set(), set(ids)
    return set(h.must_lose), shard


def reason_found(h: Hostile, feedback_html: str) -> bool:
    return re.search(h.reason, feedback_html) is not None


def copy_notebooks(nbs: dict) -> dict:
    return {k: copy.deepcopy(v) for k, v in nbs.items()}
