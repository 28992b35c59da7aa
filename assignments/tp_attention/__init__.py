"""The tp_attention assignment's metadata, read by the registry (assignments/__init__.py)."""
ORDER = 4
TITLE = "Tensor-parallel attention (whole heads, GQA), the layer and its cost"
KIND = "numpy"
# Hidden tests it must carry (tests/test_release.py checks the release shows none of them).
SETTINGS = {"hidden_tests": True}
