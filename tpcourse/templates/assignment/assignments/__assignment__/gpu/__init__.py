"""__assignment__'s gpu_runner units: RowParallelMatmul's forward on real ranks (plan, data,
observe: the rank side, judge: the grader side)."""
