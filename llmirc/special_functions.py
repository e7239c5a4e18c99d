"""Special functions of NumPy arrays, computed in float64 (constant folding, reference activations)."""

from __future__ import annotations

import math
from functools import cache

import numpy as np


@cache
def _erf64():
    """scipy's vectorized erf where scipy is installed (imported on first use: it costs ~0.2 s),
    else math.erf one element at a time (exact too)."""
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - depends on the environment
        return np.frompyfunc(math.erf, 1, 1)
    return erf


def erf(x: np.ndarray) -> np.ndarray:
    """The error function of x, elementwise, in x's dtype (computed in float64)."""
    return np.asarray(_erf64()(x.astype(np.float64)), np.float64).astype(x.dtype)
