"""tp_torch's gpu_runner units: ColumnParallelLinear, RowParallelLinear, ParallelMLP and the
errors they raise (plan, data, observe: the rank side, judge: the grader side)."""
