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


def ridge_on_codes(codes, targets, lam, nbuckets=NBUCKETS):
    """Least-squares rows ``P`` so that ``onehot(codes) @ P`` fits ``targets``.

    Solves ``(G^T G + lam * I) P = G^T targets`` in float64.

    Parameters
    ----------
    codes : (N, C) uint8
    targets : (N, P) float32
    lam : float >= 0; scaled by N / (C*K) (the mean bucket count) so that it means
        the same at any number of rows.

    Returns
    -------
    P : (C, K, P) float32; rows of empty buckets are 0.
    """
    xp = backend.namespace(codes, targets)
    N, C = codes.shape
    G = onehot(codes, nbuckets)
    gram = (G.T @ G).astype(np.float64)
    rhs = (G.T @ targets.astype(np.float32)).astype(np.float64)
    reg = lam * N / (C * nbuckets) + 1e-6
    gram[xp.diag_indices(gram.shape[0])] += reg
    P = xp.linalg.solve(gram, rhs)
    return P.reshape(C, nbuckets, targets.shape[1]).astype(np.float32)


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
