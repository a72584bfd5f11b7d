"""Accuracy measures and a simple cost model."""
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


def accuracy(y_true, y_pred):
    """Fraction of equal labels. Both (N,) integer arrays (any library)."""
    t = backend.to_host(y_true).ravel()
    p = backend.to_host(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("no labels given")
    return float((t == p).mean())


def cost(strategy, n_rows):
    """Work and memory of applying a fitted strategy to ``n_rows`` rows.

    Returns
    -------
    dict with ``lookups`` (N*C*M table reads), ``comparisons`` (encode
    comparisons: 4 per codebook per row for trees, 16*width for PQ distances),
    ``lut_bytes``, and ``multiply_adds`` (N*D*M for the exact product, else 0 in
    the lookup).
    """
    name = getattr(strategy, "name", None)
    if name == "exact":
        D, M = strategy.B_.shape
        return {"lookups": 0, "comparisons": 0, "lut_bytes": strategy.lut_bytes,
                "multiply_adds": int(n_rows) * D * M}
    C, K, M = strategy.lut_.shape
    comps = 4 * C if hasattr(strategy, "thresholds_") else K * strategy.n_features_in_
    return {"lookups": int(n_rows) * C * M, "comparisons": int(n_rows) * comps,
            "lut_bytes": strategy.lut_bytes, "multiply_adds": 0}
