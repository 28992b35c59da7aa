"""The sandbox's knobs, set from nbgrader_config.py as `c.Sandbox.<name> = value`.

Defaults are sized for the course's exercises: a notebook needs well under 1 GiB and a few
seconds of CPU; the limits only have to stop a runaway cell without getting in a correct
one's way.
"""
from __future__ import annotations

import os

from traitlets import Bool, Dict, Float, Integer, List, Unicode
from traitlets.config import Configurable

from tpsim import cputime

# Environment a grading worker sets so that parallel kernels run under distinct uids (per-uid
# process limits then stay independent between workers).
UID_ENV = "TPCOURSE_SANDBOX_UID"


class Sandbox(Configurable):
    """How a student's kernel (or a gpu_runner job) is confined."""

    enabled = Bool(True, help=(
        "Run student code in the sandbox. Setting this to False grades with the grader's own "
        "rights (unsafe: a student can kill the grader or read the hidden tests); it is the only "
        "way to grade on a machine where the sandbox is unavailable.")).tag(config=True)

    uid = Integer(64000, help=(
        "Unprivileged uid (and gid) the student's code runs as when the grader is root. A "
        "parallel grader adds its worker index. No passwd entry is needed. A grader that is not "
        "root cannot switch uid: the code then runs as the grader's uid inside a user "
        "namespace, without capabilities.")).tag(config=True)

    memory_mb = Integer(4096, help="Address-space limit (RLIMIT_AS) per process, MiB. "
                        "0 disables (needed with CUDA, which reserves huge virtual ranges)."
                        ).tag(config=True)
    cpu_seconds = Integer(300, help="CPU-time limit (RLIMIT_CPU) for the whole kernel, s."
                          ).tag(config=True)
    max_processes = Integer(256, help=(
        "Process/thread limit (RLIMIT_NPROC) for the sandbox uid; under a grader that is not "
        "root, for the sandbox's user namespace (Linux >= 5.14; older kernels count the "
        "grader's own processes too, which are then added).")).tag(config=True)
    max_open_files = Integer(256, help="Open-file limit (RLIMIT_NOFILE).").tag(config=True)
    max_file_mb = Integer(64, help="Largest file a student may write (RLIMIT_FSIZE), MiB."
                          ).tag(config=True)
    tmpfs_mb = Integer(256, help="Size of the private /tmp and /dev/shm, MiB.").tag(config=True)
    max_output_bytes = Integer(2_000_000, help=(
        "Output kept per notebook while it runs; beyond it further output is dropped and a note "
        "says so (nbgrader's LimitOutput then trims what is kept).")).tag(config=True)

    network = Bool(False, help="Keep the host network (default: a private namespace with "
                   "loopback only, which torch's gloo rendezvous needs).").tag(config=True)
    gpu = Bool(False, help="Bind the GPU device nodes (/dev/nvidia*, /dev/dri) into the sandbox."
               ).tag(config=True)

    hide_paths = List(Unicode(), help=(
        "Extra host paths the student must not see (the course root, the exchange, the sqlite "
        "gradebook, the project checkout, /root, /home and /run are always hidden; /tmp, "
        "/var/tmp and /dev/shm are private). The grader's Python environment stays readable "
        "inside them: its prefix and every sys.path entry, so keep secrets off sys.path.")
    ).tag(config=True)
    readonly_paths = List(Unicode(), help=(
        "Host paths inside a hidden or private tree that the kernel still needs, read-only "
        "(the Python environment, every sys.path entry and the course's installed packages "
        "are added automatically).")
    ).tag(config=True)
    private_packages = List(Unicode(), ["tpcourse", "assignments.*.examples",
                                        "assignments.*.tests", "assignments.*.bench",
                                        "assignments.*.notebook"], help=(
        "Editable-installed packages whose source stays hidden (instructor tooling: tpcourse, "
        "and each assignment's example students, tests, benchmarks and the source notebook's "
        "review copy, notebook.pct.py; a dotted pattern hides "
        "those modules or folders of a package and shows the rest). Others (tpsim, tpgrade, "
        "an assignment's checks and gpu units) are readable.")).tag(config=True)
    env = Dict(help="Extra environment variables for the student's code.").tag(config=True)

    bwrap = Unicode("bwrap", help="The bubblewrap binary.").tag(config=True)

    def effective_uid(self) -> int:
        return int(os.environ.get(UID_ENV, self.uid))


class TimeLimits(Configurable):
    """How long student code may run while it is graded, in the CPU time it uses
    (tpsim.cputime): a busy grading machine makes a correct student's code take longer on
    the clock, never cost it a point. The per-cell limit itself is c.Execute.timeout (the
    kernel) and c.Judge.timeout (the judge's student process), in seconds of CPU time."""

    wall_factor = Float(cputime.WALL_FACTOR, help=(
        "Every CPU-time limit has a wall-clock backstop this many times longer, for code that "
        "computes a little and waits a little, forever. A correct cell uses a fraction of its "
        "limit, so it stays clear of the backstop even with several busy processes per core."
    )).tag(config=True)
    stall_seconds = Float(cputime.STALL_SECONDS, help=(
        "Student code that computes nothing (under 0.5% of a core) for this long while the "
        "grader waits for it is waiting for something that never comes (a deadlock, a sleep): "
        "it is interrupted as if past its limit. A runnable process on a loaded machine still "
        "computes every fraction of a second. 0: only the wall-clock backstop stops it."
    )).tag(config=True)
    notebook_cpu_seconds = Integer(600, help=(
        "CPU time all the student code of one notebook may use while it is graded: the kernel, "
        "the judge's student processes (a rerun included) and the ranks they fork, with a "
        "wall-clock backstop wall_factor times longer. Past it nothing more of that notebook "
        "runs: its remaining tests score 0 and say so, the gradebook comment says the "
        "notebook timed out, and the next student is graded. 0: no budget.")).tag(config=True)
