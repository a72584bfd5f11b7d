"""k-means (k-means++ seeding, Lloyd iterations) on NumPy or CuPy arrays.

Random choices are drawn from a host ``RandomState`` so that NumPy and CuPy runs
from the same seed pick the same seeds.
"""
from __future__ import annotations

import numpy as np

from ..arrays import backend


def _sq_dists(xp, X, cent, xx=None):
    """(N, K) squared distances, computed as ||x||^2 - 2 x.c + ||c||^2, clipped at 0.

    ``xx`` is the precomputed (N,) ``||x||^2`` (it does not change between iterations)."""
    if xx is None:
        xx = (X ** 2).sum(axis=1)
    d = xx[:, None] - 2.0 * (X @ cent.T) + (cent ** 2).sum(axis=1)[None, :]
    return xp.maximum(d, 0.0)


def kmeans_pp(X, k, rng):
    """k-means++ seeds.

    Parameters
    ----------
    X : (N, w) float64
    k : int
    rng : numpy RandomState

    Returns
    -------
    (k, w) float64 seeds (rows of X; duplicates only when X has fewer than k distinct rows)
    """
    xp = backend.namespace(X)
    N = X.shape[0]
    idx = [int(rng.randint(N))]
    d2 = _sq_dists(xp, X, X[idx])[:, 0]
    for _ in range(1, k):
        p = backend.to_host(d2).astype(np.float64)
        total = p.sum()
        nxt = int(rng.randint(N)) if total <= 0 else int(
            np.searchsorted(np.cumsum(p) / total, rng.random_sample(), side="right"))
        nxt = min(nxt, N - 1)
        idx.append(nxt)
        d2 = xp.minimum(d2, _sq_dists(xp, X, X[[nxt]])[:, 0])
    return X[xp.asarray(idx)].copy()


def kmeans(X, k, rng, max_iter=25):
    """Lloyd's k-means from k-means++ seeds, until no assignment changes.

    Parameters
    ----------
    X : (N, w) float32 or float64 (NumPy or CuPy)
    k : int
    rng : numpy RandomState (host), for the seeds
    max_iter : int

    Returns
    -------
    centroids : (k, w) float32; an empty cluster keeps its previous centroid
    """
    xp = backend.namespace(X)
    X = X.astype(np.float64)
    cent = kmeans_pp(X, k, rng)
    xx = (X ** 2).sum(axis=1)
    assign = None
    for _ in range(max_iter):
        new = xp.argmin(_sq_dists(xp, X, cent, xx), axis=1)
        if assign is not None and bool((new == assign).all()):
            break
        assign = new
        G = (assign[:, None] == xp.arange(k)[None, :]).astype(np.float64)
        counts = G.sum(axis=0)
        cent = xp.where(counts[:, None] > 0, (G.T @ X) / xp.maximum(counts, 1)[:, None], cent)
    return cent.astype(np.float32)
