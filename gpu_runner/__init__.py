"""Grade the torch assignments' gpu_* cells on real ranks: torchrun jobs whose results join
nbgrader's gradebook. Entry point: `python -m gpu_runner.grade ASSIGNMENT` (see
gpu_runner/README.md).

This package is the machinery every torch assignment shares: the plan (units, sub-checks,
cells), the worker each rank runs, the phases and fault rules of the rank side (observe), the
reports' records, the judge's view of them, launching, supervising, the reference run, the
report and the gradebook. What one assignment checks lives with it, in
`assignments/<name>/gpu/` (its plan, data, rank side and grader side), found through the
registry (`assignments`); nothing here names an assignment."""
