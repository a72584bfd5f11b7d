"""LUT helpers shared by the strategies: one-hot codes, ridge refits, 8-bit quantization."""
from __future__ import annotations

import numpy as np

from ..arrays import backend
from .base import NBUCKETS


def onehot(codes, nbuckets=NBUCKETS, dtype=np.float32):
    """One-hot matrix of codes.

    Parameters
    ----------
    codes : (N, C) uint8

    Returns
    -------
    G : (N, C * K) ``dtype``; ``G[n, c*K + k] = 1`` iff ``codes[n, c] == k``
    """
    xp = backend.namespace(codes)
    N, C = codes.shape
    G = xp.zeros((N, C * nbuckets), dtype=dtype)
    cols = codes.astype(np.int64) + (xp.arange(C, dtype=np.int64) * nbuckets)[None, :]
    G[xp.arange(N)[:, None], cols] = 1
    return G


def gram_of_codes(codes, nbuckets=NBUCKETS):
    """``G.T @ G`` for the one-hot ``G`` of ``codes``: (C*K, C*K) float64 counts."""
    G = onehot(codes, nbuckets)
    return (G.T @ G).astype(np.float64)


def ridge_on_codes(codes, targets, lam, nbuckets=NBUCKETS, prior=None):
    """Least-squares rows ``P`` so that ``onehot(codes) @ P`` fits ``targets``.

    Solves ``min ||targets - G P||^2 + reg ||P - prior||^2`` in float64, i.e.
    ``(G^T G + reg I) P = G^T targets + reg prior``.

    Parameters
    ----------
    codes : (N, C) uint8
    targets : (N, P) float32
    lam : float >= 0 (or inf: P = prior); reg = lam * N / (C*K), the mean bucket
        count times lam, so that it means the same at any number of rows.
    prior : (C, K, P) float32, optional (default 0): what the penalty shrinks to

    Returns
    -------
    P : (C, K, P) float32
    """
    xp = backend.namespace(codes, targets)
    N, C = codes.shape
    shape = (C, nbuckets, targets.shape[1])
    prior = xp.zeros(shape, dtype=np.float64) if prior is None else prior.astype(np.float64)
    if not np.isfinite(lam):
        return prior.astype(np.float32)
    G = onehot(codes, nbuckets)
    gram = (G.T @ G).astype(np.float64)
    reg = lam * N / (C * nbuckets) + 1e-6
    rhs = (G.T @ targets.astype(np.float32)).astype(np.float64) + reg * prior.reshape(C * nbuckets, -1)
    gram[xp.diag_indices(gram.shape[0])] += reg
    P = xp.linalg.solve(gram, rhs)
    return P.reshape(shape).astype(np.float32)


RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, float("inf"))


def ridge_auto(codes, targets, prior, rng, grid=RIDGE_GRID, holdout=0.2, nbuckets=NBUCKETS):
    """:func:`ridge_on_codes` with the penalty picked on held-out rows.

    A random ``holdout`` fraction of the rows is set aside; for every ``lam`` in
    ``grid`` the refit on the rest is scored on them (all penalties from one
    eigendecomposition of ``G^T G``), and the best ``lam`` is refit on all rows.
    With ``inf`` in the grid the result is never worse on held-out rows than
    ``prior`` itself, which protects small training sets from overfitting
    (C*K prototypes of D columns fitted from few rows).

    Parameters
    ----------
    codes : (N, C) uint8; targets : (N, P) float32; prior : (C, K, P) float32
    rng : numpy RandomState (host), picks the held-out rows

    Returns
    -------
    P : (C, K, P) float32, lam : float (the chosen penalty)
    """
    xp = backend.namespace(codes, targets)
    N, C = codes.shape
    n_val = int(N * holdout)
    if n_val < 1 or N - n_val < nbuckets:
        return ridge_on_codes(codes, targets, grid[0], nbuckets, prior), grid[0]
    perm = xp.asarray(rng.permutation(N))
    val, tr = perm[:n_val], perm[n_val:]
    prior_flat = prior.reshape(C * nbuckets, -1).astype(np.float64)
    G_tr = onehot(codes[tr], nbuckets, np.float64)
    gram = G_tr.T @ G_tr
    rhs = G_tr.T @ (targets[tr].astype(np.float64) - G_tr @ prior_flat)   # fit the change from prior
    evals, Q = xp.linalg.eigh(gram)
    Qr = Q.T @ rhs
    G_val = onehot(codes[val], nbuckets, np.float64)
    resid = targets[val].astype(np.float64) - G_val @ prior_flat
    GQ = G_val @ Q
    scale = (N - n_val) / (C * nbuckets)
    errors = []
    for lam in grid:
        if not np.isfinite(lam):
            errors.append(float((resid ** 2).sum()))
            continue
        delta = Qr / (evals + lam * scale + 1e-6)[:, None]
        errors.append(float(((resid - GQ @ delta) ** 2).sum()))
    best = grid[int(np.argmin(errors))]
    return ridge_on_codes(codes, targets, best, nbuckets, prior), best


def bucket_means(codes, X, nbuckets=NBUCKETS):
    """Mean of the rows of ``X`` in each bucket of each codebook.

    Parameters
    ----------
    codes : (N, C) uint8
    X : (N, P) float32

    Returns
    -------
    means : (C, K, P) float32 (0 for empty buckets)
    """
    G = onehot(codes, nbuckets)
    sums = G.T @ X.astype(np.float32)
    counts = G.sum(axis=0)
    xp = backend.namespace(codes)
    means = sums / xp.maximum(counts, 1)[:, None]
    return means.reshape(codes.shape[1], nbuckets, X.shape[1]).astype(np.float32)


def quantize_lut(lut):
    """8-bit LUT with one offset per codebook and one shared scale (as MADDNESS/Bolt).

    ``lut[c, k, m] ~= offset[c] + scale * q[c, k, m]``; the lookup sums ``q``
    exactly in integers and returns ``scale * isum + sum_c offset[c]``.

    Parameters
    ----------
    lut : (C, K, M) float32

    Returns
    -------
    q : (C, K, M) uint8
    scale : (M,) float32 (one value, repeated per column so folding can rescale columns)
    bias : (M,) float32 (sum of the per-codebook offsets, likewise per column)
    """
    xp = backend.namespace(lut)
    C, K, M = lut.shape
    lut64 = lut.astype(np.float64)
    offsets = lut64.reshape(C, -1).min(axis=1)                  # (C,)
    spans = lut64.reshape(C, -1).max(axis=1) - offsets          # (C,)
    scale = float(spans.max()) / 255.0
    if scale <= 0.0:
        scale = 1.0                                              # an all-constant LUT
    q = xp.rint((lut64 - offsets[:, None, None]) / scale)
    q = xp.clip(q, 0, 255).astype(np.uint8)
    bias = float(offsets.sum())
    return (q, xp.full(M, scale, dtype=np.float32), xp.full(M, bias, dtype=np.float32))


def quantize_lut_per_column(lut):
    """8-bit LUT with an offset per (codebook, column) and a scale per column.

    ``lut[c, k, m] ~= offset[c, m] + scale[m] * q[c, k, m]``; the lookup sums q
    exactly in integers and returns ``scale * isum + bias`` with
    ``bias[m] = sum_c offset[c, m]``: the format of ``_lut.quantize_lut``.

    Parameters
    ----------
    lut : (C, K, M) float32

    Returns
    -------
    q : (C, K, M) uint8, scale : (M,) float32, bias : (M,) float32
    """
    xp = backend.namespace(lut)
    lut64 = lut.astype(np.float64)
    offsets = lut64.min(axis=1)                                   # (C, M)
    span = (lut64.max(axis=1) - offsets).max(axis=0)              # (M,)
    scale = xp.where(span > 0, span / 255.0, 1.0)                 # constant column: any
    q = xp.clip(xp.rint((lut64 - offsets[:, None, :]) / scale), 0, 255).astype(np.uint8)
    return q, scale.astype(np.float32), offsets.sum(axis=0).astype(np.float32)
