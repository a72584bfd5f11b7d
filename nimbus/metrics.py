"""How close an approximate product is to the exact one: :func:`nmse`."""
from __future__ import annotations

import numpy as np

from .arrays import backend, validate


def nmse(Y, Y_hat):
    """Normalised mean squared error ``mean((Y - Y_hat)**2) / var(Y)``.

    0 is perfect; 1 is what predicting the mean of Y (over all entries) gives.

    Parameters
    ----------
    Y : (N, M) exact product; Y_hat : (N, M) approximation (any libraries, real dtypes)

    Returns
    -------
    float
    """
    Y = backend.to_host(validate.as_matrix(Y, "Y")).astype(np.float64)
    Y_hat = backend.to_host(validate.as_matrix(Y_hat, "Y_hat")).astype(np.float64)
    if Y.shape != Y_hat.shape:
        raise ValueError(f"Y has shape {Y.shape} but Y_hat has shape {Y_hat.shape}")
    var = Y.var()
    if var == 0:
        raise ValueError("Y is constant (variance 0): NMSE is undefined")
    return float(np.mean((Y - Y_hat) ** 2) / var)

