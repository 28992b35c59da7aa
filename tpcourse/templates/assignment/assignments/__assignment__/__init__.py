"""The __assignment__ assignment's metadata, read by the registry (assignments/__init__.py)."""
ORDER = __order__
TITLE = "__assignment__: a row-parallel matmul, in numpy and on real ranks"
KIND = "torch"
