"""numpy functions as they were when tpgrade was imported (the notebook's read-only setup cell).

A solution cell may rebind `np.allclose`, `np.testing.assert_allclose` or even
`np.asarray` in the shared numpy module; the checks use these references (and ndarray
methods/operators, which a notebook cannot rebind) so that such a rebinding cannot change
a verdict.
"""
import numpy as _np

ndarray = _np.ndarray
generic = _np.generic
integer = _np.integer
float32 = _np.float32
float64 = _np.float64
dtype = _np.dtype
asarray = _np.asarray
maximum = _np.maximum
tanh = _np.tanh
default_rng = _np.random.default_rng
