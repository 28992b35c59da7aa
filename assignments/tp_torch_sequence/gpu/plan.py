"""tp_torch_sequence's units (gpu_runner.plan says what each table means): the sequence-parallel
mappings, LayerSP, VocabParallelEmbedding and the vocabulary-parallel cross-entropy; the
collectives' kinds, counts and sizes (seqcounts) have a cell of their own.
"""
from __future__ import annotations

LAYERS = ("seqmap", "sp", "emb", "ce")

STEPS = {
    "seqmap": ("gather", "reduce_scatter", "scatter"),
    "sp": ("forward", "backward", "float64"),
    "emb": ("shards", "forward", "backward", "float64", "errors"),
    "ce": ("forward", "backward", "stable", "float64"),
}

CHECKS = {
    ("seqmap", "gather"): ("seqmap.gather_forward", "seqmap.gather_backward",
                           "seqcounts.gather*"),
    ("seqmap", "reduce_scatter"): ("seqmap.reduce_scatter_forward",
                                   "seqmap.reduce_scatter_backward", "seqcounts.reduce_scatter*"),
    ("seqmap", "scatter"): ("seqmap.scatter_forward", "seqmap.scatter_backward",
                            "seqcounts.scatter*"),
    ("sp", "forward"): ("sp.forward", "seqcounts.sp_forward*"),
    ("sp", "backward"): ("sp.grad_input", "sp.grad_weights", "sp.grad_biases",
                         "sp.grad_layernorm", "seqcounts.sp_backward*"),
    ("sp", "float64"): ("sp.forward_float64", "sp.grad_float64"),
    ("emb", "shards"): ("emb.shards", "emb.default_init", "emb.empty_shard*"),
    ("emb", "forward"): ("emb.forward", "emb.forward_small_vocab", "seqcounts.emb_forward*"),
    ("emb", "backward"): ("emb.grad_weight", "seqcounts.emb_backward*"),
    ("emb", "float64"): ("emb.forward_float64", "emb.grad_float64"),
    ("emb", "errors"): ("emb.bad_ids", "emb.bad_shape"),
    ("ce", "forward"): ("ce.forward", "ce.forward_small_vocab", "seqcounts.ce_forward*",
                        "seqcounts.ce_sizes*"),
    ("ce", "backward"): ("ce.grad_logits", "seqcounts.ce_backward*"),
    ("ce", "stable"): ("ce.large_logits", "ce.grad_large_logits"),
    ("ce", "float64"): ("ce.forward_float64", "ce.grad_float64"),
}

_CELLS = {
    "seqmap": "gpu_sp_mappings", "seqcounts": "gpu_sp_collectives",
    "sp.forward": "gpu_sp_forward", "sp.forward_float64": "gpu_sp_forward",
    "sp": "gpu_sp_backward",
    "emb.bad_ids": "gpu_embedding_errors", "emb.bad_shape": "gpu_embedding_errors",
    "emb.grad_weight": "gpu_embedding_backward", "emb.grad_float64": "gpu_embedding_backward",
    "emb": "gpu_embedding_forward",
    "ce.large_logits": "gpu_ce_stable", "ce.grad_large_logits": "gpu_ce_stable",
    "ce.grad_logits": "gpu_ce_backward", "ce.grad_float64": "gpu_ce_backward",
    "ce": "gpu_ce_forward",
}


def cell_of(check: str) -> str:
    """The gpu_* cell of a sub-check ("sp.grad_input@3"): the check's own entry first, else its
    family's."""
    name = check.split("@")[0].rstrip("*")
    return _CELLS.get(name) or _CELLS[name.split(".")[0]]

