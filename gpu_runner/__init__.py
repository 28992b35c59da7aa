"""Grade the torch assignments (tp_torch, tp_torch_sequence) on real ranks: torchrun jobs
whose results join nbgrader's gradebook. Entry point: `python -m gpu_runner.grade ASSIGNMENT`
(see gpu_runner/README.md)."""
