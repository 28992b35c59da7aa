"""The tp_torch_attention assignment's metadata, read by the registry (assignments/__init__.py)."""
ORDER = 7
TITLE = "Tensor-parallel attention, the layer and the cost of TP, with torch"
KIND = "torch"
# Hidden tests it must carry (tests/test_release.py checks the release shows none of them).
SETTINGS = {"hidden_tests": True}
