"""tp_torch_attention's units (gpu_runner.plan says what each table means): ParallelAttention,
ParallelTransformerLayer and the student's measurement of the TP overhead."""
from __future__ import annotations

from gpu_runner.plan import naming_rule

LAYERS = ("attention", "layer", "overhead")
STEPS = {"attention": ("forward", "backward", "float64"), "layer": ("forward", "backward"),
         "overhead": ("measure",)}
CHECKS = {
    ("attention", "forward"): ("attention.forward", "attention.forward_causal",
                               "counts.attention_forward*"),
    ("attention", "backward"): ("attention.grad_input", "attention.grad_qkv",
                                "attention.grad_proj", "counts.attention_backward*"),
    ("attention", "float64"): ("attention.forward_float64", "attention.grad_float64"),
    ("layer", "forward"): ("layer.forward", "counts.layer_forward*"),
    ("layer", "backward"): ("layer.grad_input", "layer.grad_norms", "layer.grad_attention",
                            "layer.grad_mlp", "counts.layer_backward*"),
    # measured next to the grader's own measurement, on the smallest group with communication
    ("overhead", "measure"): ("overhead.result", "overhead.agrees", "overhead.barrier",
                              "overhead.warmup"),
}
AT_SIZES = {"overhead": lambda sizes: [s for s in sizes if s >= 2][:1]}
# Verdicts that depend on the machine's load (the student's timing against the grader's own):
# graded like the others, but no recorded grade table can pin them (tpcourse.catalogue).
LOAD_DEPENDENT = {("overhead", "measure")}
_FAMILY_CELLS = {"overhead": "gpu_timing"}


def cell_of(check: str) -> str:
    return naming_rule(check, _FAMILY_CELLS)
