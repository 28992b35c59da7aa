"""Instructor-side tooling for the tensor-parallelism course: the nbgrader cycle driver,
example submissions, the demo, and class-wide grading."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSIGNMENTS = ("tp_linear", "tp_mlp", "tp_sequence", "tp_attention", "tp_torch",
               "tp_torch_sequence", "tp_torch_attention")
