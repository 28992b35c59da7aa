"""The tp_torch assignment's metadata, read by the registry (assignments/__init__.py)."""
ORDER = 5
TITLE = "Megatron-style tensor-parallel layers with torch.distributed"
KIND = "torch"
