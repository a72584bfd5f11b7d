"""Learning the depth-4 hash trees of MADDNESS (and of joint bucketing).

One tree per codebook. Level by level, every bucket is split in two at a
threshold on one column; the column and thresholds are chosen to minimise the
total within-bucket sum of squared errors (SSE) of a target matrix ``T`` (the
subspace's own columns for MADDNESS; the partial product for joint bucketing).

``split="level"``: one column per level, shared by its buckets (the paper);
``split="node"``: every bucket picks its own column (15 (column, threshold) pairs).

Ties: a split falls only between two distinct values of the column, at their
midpoint (or at the lower value when the midpoint rounds up to the higher one
in float32), and a row goes right iff ``x > t``, so a value equal to a
threshold goes left here and in the encode kernels alike. A bucket with no such
split (one row, or a constant column) gets ``t = +inf``: everything stays left,
new rows included.

All array work uses the library of ``X`` (NumPy or CuPy); only small per-bucket
summaries cross to the host.
"""
from __future__ import annotations

import numpy as np

from ..arrays import backend
from .base import NBUCKETS

DEPTH = 4


def _bucket_col_sse(xp, Xc, bucket, nb):
    """(ncols,) SSE of each column of Xc summed over buckets."""
    G = (bucket[:, None] == xp.arange(nb)[None, :]).astype(np.float64)   # (N, nb)
    n = G.sum(axis=0)[:, None]
    s1 = G.T @ Xc.astype(np.float64)
    s2 = G.T @ (Xc.astype(np.float64) ** 2)
    return (s2 - s1 ** 2 / xp.maximum(n, 1)).sum(axis=0)


def _best_splits(xp, x, order0, bucket, counts, T):
    """Best split of every bucket on one column.

    Parameters
    ----------
    x : (N,) float32, the column
    order0 : (N,) int, a stable ascending sort of x
    bucket : (N,) uint8 bucket of each row
    counts : host (nb,) int rows per bucket
    T : (N, P) float64 targets

    Returns
    -------
    gains : host (nb,) float64, SSE removed by the best split (-inf: no valid split)
    thresholds : host (nb,) float32
    """
    nb = len(counts)
    # rows sorted by bucket, then by x within a bucket (stable radix sort on uint8)
    order = order0[xp.argsort(bucket[order0], kind="stable")]
    xs = x[order]
    bs = bucket[order].astype(np.int64)
    Ts = T[order]
    cs = xp.cumsum(Ts, axis=0)                                   # (N, P)
    cs0 = xp.concatenate([xp.zeros((1, T.shape[1])), cs], axis=0)
    ends = np.cumsum(counts)
    starts = ends - counts
    S0 = cs0[xp.asarray(starts)]                                  # (nb, P) prefix before bucket
    Tot = cs0[xp.asarray(ends)] - S0                              # (nb, P) bucket sums
    cnt = xp.asarray(np.asarray(counts, dtype=np.float64))
    L = cs - S0[bs]
    R = Tot[bs] - L
    pos = xp.arange(x.shape[0])
    nl = (pos - xp.asarray(starts)[bs] + 1).astype(np.float64)
    nr = cnt[bs] - nl
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = ((L ** 2).sum(axis=1) / nl + (R ** 2).sum(axis=1) / xp.maximum(nr, 1)
                - (Tot ** 2).sum(axis=1)[bs] / cnt[bs])
    nxt = xp.concatenate([xs[1:], xs[-1:]])
    valid = (nr > 0) & (xs < nxt)
    gain = xp.where(valid, gain, -xp.inf)
    best_pos = []
    for b in range(nb):
        if counts[b] >= 2:
            best_pos.append(int(starts[b]) + xp.argmax(gain[int(starts[b]):int(ends[b])]))
        else:
            best_pos.append(xp.asarray(int(starts[b]) if counts[b] else 0))
    best_pos = xp.stack([xp.asarray(p) for p in best_pos]).astype(np.int64)
    g = backend.to_host(gain[best_pos]).astype(np.float64)
    lo = backend.to_host(xs[best_pos]).astype(np.float32)
    hi = backend.to_host(xs[xp.minimum(best_pos + 1, x.shape[0] - 1)]).astype(np.float32)
    empty = np.asarray(counts) < 2
    g[empty] = -np.inf
    thr = _midpoints(lo, hi)
    thr[~np.isfinite(g)] = np.inf
    return g, thr


def _midpoints(lo, hi):
    """float32 thresholds t with lo <= t < hi (lo < hi elementwise where it matters)."""
    mid = ((lo.astype(np.float64) + hi.astype(np.float64)) / 2).astype(np.float32)
    return np.where(mid < hi, mid, lo).astype(np.float32)


def learn_tree(X, cols, T=None, split="level", max_candidates=16):
    """Learn one depth-4 tree.

    Parameters
    ----------
    X : (N, D) float32, rows to bucket (NumPy or CuPy)
    cols : sequence of int, absolute columns of X the tree may test
    T : (N, P) array, optional; targets whose within-bucket SSE is minimised
        (default ``X[:, cols]``)
    split : "level" or "node"
    max_candidates : int; columns tried per level (those with the largest
        summed within-bucket SSE) when there are more

    Returns
    -------
    dims : (15,) int32 host array, column tested at each node (heap order)
    thresholds : (15,) float32 host array
    leaves : (N,) uint8 (library of X), bucket of each training row
    """
    xp = backend.namespace(X)
    cols = np.asarray(cols, dtype=np.int64)
    Xc = X[:, xp.asarray(cols)]
    T = (Xc if T is None else T).astype(np.float64)
    N = X.shape[0]
    orders = {}                                   # column -> stable argsort, made on demand
    dims = np.zeros(2 ** DEPTH - 1, dtype=np.int32)
    thresholds = np.full(2 ** DEPTH - 1, np.inf, dtype=np.float32)
    bucket = xp.zeros(N, dtype=np.uint8)
    for level in range(DEPTH):
        nb = 2 ** level
        counts = backend.to_host(xp.bincount(bucket, minlength=nb)).astype(np.int64)
        if len(cols) > max_candidates:
            sse = backend.to_host(_bucket_col_sse(xp, Xc, bucket, nb))
            cand = np.argsort(-sse, kind="stable")[:max_candidates]
        else:
            cand = np.arange(len(cols))
        gains = np.empty((len(cand), nb))
        thrs = np.empty((len(cand), nb), dtype=np.float32)
        for i, j in enumerate(cand):
            if j not in orders:
                orders[j] = xp.argsort(Xc[:, j], kind="stable")
            gains[i], thrs[i] = _best_splits(xp, Xc[:, j], orders[j], bucket, counts, T)
        useful = np.where(np.isfinite(gains), gains, 0.0)
        if split == "level":
            pick = np.full(nb, int(np.argmax(useful.sum(axis=1))))
        else:
            pick = np.argmax(useful, axis=0)
        node0 = nb - 1
        for b in range(nb):
            dims[node0 + b] = cols[cand[pick[b]]]
            thresholds[node0 + b] = thrs[pick[b], b]
        # route rows: right iff x > t (equal goes left, as in the encoders)
        d_rows = xp.asarray(dims[node0:node0 + nb])[bucket.astype(np.int64)]
        t_rows = xp.asarray(thresholds[node0:node0 + nb])[bucket.astype(np.int64)]
        right = X[xp.arange(N), d_rows] > t_rows
        bucket = (2 * bucket + right).astype(np.uint8)
    return dims, thresholds, bucket


def learn_trees(X, starts, split="level", max_candidates=16, residual="subspace",
                progress=None):
    """One tree per subspace, learned greedily on residuals (as the reference learner).

    Codebook c splits on the original columns of subspace c but minimises the SSE
    of the residual left by codebooks 0..c-1, where each codebook's contribution
    is its bucket means over all D columns. This lets later codebooks account for
    what earlier ones already explain (correlated columns).

    Parameters
    ----------
    X : (N, D) float32
    starts : (C + 1,) int, subspace column boundaries
    residual : "subspace" (SSE of the residual's subspace columns), "full" (all
        columns) or "none" (plain SSE of the subspace's own columns)
    progress : callable() called after each tree, optional

    Returns
    -------
    dims : (C, 15) int32, thresholds : (C, 15) float32 (both in X's library),
    codes : (N, C) uint8 training codes
    """
    from ._lut import bucket_means
    xp = backend.namespace(X)
    C = len(starts) - 1
    dims = np.zeros((C, 2 ** DEPTH - 1), dtype=np.int32)
    thr = np.zeros((C, 2 ** DEPTH - 1), dtype=np.float32)
    codes = xp.empty((X.shape[0], C), dtype=np.uint8)
    R = X.astype(np.float64) if residual != "none" else None
    for c in range(C):
        cols = range(int(starts[c]), int(starts[c + 1]))
        if residual == "subspace":
            T = R[:, int(starts[c]):int(starts[c + 1])]
        elif residual == "full":
            T = R
        else:
            T = None
        dims[c], thr[c], leaves = learn_tree(X, cols, T, split, max_candidates)
        codes[:, c] = leaves
        if R is not None:
            means = bucket_means(leaves[:, None], R.astype(np.float32))[0]   # (K, D)
            R -= means[leaves.astype(np.int64)]
        if progress is not None:
            progress()
    return xp.asarray(dims), xp.asarray(thr), codes


assert NBUCKETS == 2 ** DEPTH  # internal invariant, not a user check
