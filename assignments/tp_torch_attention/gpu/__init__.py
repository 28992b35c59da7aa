"""tp_torch_attention's gpu_runner units: ParallelAttention, ParallelTransformerLayer and the
student's measurement of the TP overhead (plan, data, observe: the rank side, judge: the grader
side, overhead: the grader's own measurement, run next to the student's)."""
