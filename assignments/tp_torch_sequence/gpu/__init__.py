"""tp_torch_sequence's gpu_runner units: the sequence-parallel mappings, LayerSP, the
vocabulary-parallel embedding and cross-entropy (plan, data, observe: the rank side, judge: the
grader side)."""
