"""The tp_torch_sequence assignment's metadata, read by the registry (assignments/__init__.py)."""
ORDER = 6
TITLE = "Sequence parallelism and the vocabulary split with torch.distributed"
KIND = "torch"
