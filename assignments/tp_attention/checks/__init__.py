"""The tp_attention notebook's checks, one module per exercise: `attention` (the heads, the
KV ranges, the fused QKV shard, attention_tp and transformer_layer_tp) and `cost` (tp_cost).
A test cell: `from assignments.tp_attention.checks import cost as check`."""
from tpgrade._harness import make_checks_read_only

from . import attention, cost  # noqa: F401  (both loaded, and locked, before any student code)

make_checks_read_only(__name__)
