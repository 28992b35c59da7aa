"""The tp_sequence assignment's metadata, read by the registry (assignments/__init__.py)."""
ORDER = 3
TITLE = "Sequence parallelism, the vocabulary-parallel embedding and cross-entropy"
KIND = "numpy"
# Hidden tests it must carry (tests/test_release.py checks the release shows none of them).
SETTINGS = {"hidden_tests": True}
