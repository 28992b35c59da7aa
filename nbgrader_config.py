"""nbgrader configuration for the tensor-parallelism course.

Stock nbgrader commands run from the repository root: `nbgrader generate_assignment NAME`,
`nbgrader autograde NAME`, ... (NAME: an assignment, assignments/<name>). The demo (`make demo`)
and the tests run the same commands in temporary course directories with this file copied in.
"""
c = get_config()  # noqa: F821 (provided by nbgrader when it loads this file)

c.CourseDirectory.course_id = "tp101"
c.CourseDirectory.root = __import__("os").path.dirname(__import__("os").path.abspath(__file__))

# Seconds of CPU time each cell's student code may use (tpsim.cputime: its whole process
# tree; a busy grader makes a cell take longer on the clock, not time out). The exercises use
# well under a second per cell. A cell that computes nothing for c.TimeLimits.stall_seconds
# (20) is stopped too, and c.TimeLimits.wall_factor (5) times this on the clock is the backstop.
# On timeout the cell is interrupted, gets a CellTimeoutError, and the remaining cells still
# run (so only the affected tests lose points). A notebook's student code may use
# c.TimeLimits.notebook_cpu_seconds (600) in all.
c.Execute.timeout = 30
c.Execute.interrupt_on_timeout = True

# What students see in place of a solution.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}

# The world sizes the gpu_runner grades the torch assignments' gpu_* cells at: a course setting,
# the same on every grading machine (NCCL with one rank per GPU only where there are
# max(world_sizes) GPUs, gloo on CPU otherwise; never more or fewer sizes because of the GPU
# count).
c.GpuRunner.world_sizes = [1, 2, 3, 4]

# Student code runs sandboxed (tpsandbox: bubblewrap namespaces, an unprivileged uid, resource
# limits, no view of source/, the gradebook or other students), also under a plain
# `nbgrader autograde`, and every test cell is decided by the judge (tpjudge): in nbgrader's own
# process, against the student's functions running in a sandboxed process of their own, so no
# code in a solution cell can reach a verdict. Solution cells that try are flagged for review
# in the gradebook. Grading refuses if bubblewrap is missing: run `.ci/setup-system.sh` (as
# root), or opt out explicitly (unsafe) with c.Sandbox.enabled = False.
# Limits: c.Sandbox.memory_mb, cpu_seconds, max_processes, ... (tpsandbox/settings.py);
# the judge: c.Judge.timeout, interrupt_grace, max_message_mb, max_header_kb, max_items, ...
# (tpjudge/settings.py).
from tpgrader import configure  # noqa: E402

configure(c)
