"""numpy functions as they were when tpgrade was imported (the notebook's read-only setup cell).

A solution cell may rebind `np.allclose`, `np.testing.assert_allclose` or even
`np.asarray` in the shared numpy module; the checks use these references (and ndarray
methods/operators, which a notebook cannot rebind) so that such a rebinding cannot change
a verdict. The torch notebooks' checks compare in numpy too (see tpgrade._torch_trusted).
"""
import math as _math
import operator as _operator

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
arange = _np.arange
exp = _np.exp
erf = _math.erf          # numpy has none: the gelu reference applies it elementwise
index = _operator.index  # an int, numpy integer or 0-d torch integer tensor as an exact int
