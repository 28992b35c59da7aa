"""The tp_mlp assignment's metadata, read by the registry (assignments/__init__.py)."""
ORDER = 2
TITLE = "The tensor-parallel MLP and the communication it costs"
KIND = "numpy"
# Hidden tests it must carry (tests/test_release.py checks the release shows none of them).
SETTINGS = {"hidden_tests": True}
