"""The tp_linear assignment's metadata, read by the registry (assignments/__init__.py)."""
ORDER = 1
TITLE = "Column- and row-parallel linear layers, with simulated collectives"
KIND = "numpy"
# Hidden tests it must carry (tests/test_release.py checks the release shows none of them).
SETTINGS = {"hidden_tests": True}
