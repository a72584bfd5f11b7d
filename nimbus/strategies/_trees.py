"""Learning the hash trees of MADDNESS (depth 4 by default, any depth 1..10).

One tree per codebook. Level by level, every bucket is split in two at a
threshold on one column; the column and thresholds are chosen to minimise the
total within-bucket sum of squared errors (SSE) of a target matrix ``T`` (the
subspace's own columns for MADDNESS; the partial product for joint bucketing).

``split="level"``: one column per level, shared by its buckets (the paper);
``split="node"``: every bucket picks its own column (2**depth - 1 (column, threshold)
pairs; 15 at the default depth 4).

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
from ..arrays.kernels.reference import code_dtype
from .base import NBUCKETS

DEPTH = 4


def _bucket_col_sse(xp, Xc, bucket, nb):
    """(ncols,) SSE of each column of Xc summed over buckets."""
    G = (bucket[:, None] == xp.arange(nb)[None, :]).astype(np.float64)   # (N, nb)
    n = G.sum(axis=0)[:, None]
    s1 = G.T @ Xc.astype(np.float64)
    s2 = G.T @ (Xc.astype(np.float64) ** 2)
    return (s2 - s1 ** 2 / xp.maximum(n, 1)).sum(axis=0)


def _best_splits(xp, x, order0, bucket, counts, Tc):
    """Best split of every bucket on one column.

    Parameters
    ----------
    x : (N,) float32, the column
    order0 : (N,) int, a stable ascending sort of x
    bucket : (N,) uint8 bucket of each row
    counts : host (nb,) int rows per bucket
    Tc : (N, P) float64 targets, centred within each bucket

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
    # Tc sums to 0 over each bucket, so one running sum restarts at every bucket
    # boundary, and the right part's sum is minus the left part's: the SSE removed
    # by splitting after row i is ||L||^2 * n / (n_left * n_right).
    sq = (xp.cumsum(Tc[order], axis=0) ** 2).sum(axis=1)
    ends = np.cumsum(counts)
    starts = ends - counts
    cnt = xp.asarray(np.asarray(counts, dtype=np.float64))
    nl = (xp.arange(x.shape[0]) - xp.asarray(starts)[bs] + 1).astype(np.float64)
    nr = cnt[bs] - nl
    nxt = xp.concatenate([xs[1:], xs[-1:]])
    valid = (nr > 0) & (xs < nxt)               # only between distinct values
    gain = xp.where(valid, sq * cnt[bs] / (nl * xp.maximum(nr, 1)), -xp.inf)
    best_pos = xp.stack([
        int(starts[b]) + xp.argmax(gain[int(starts[b]):int(ends[b])]) if counts[b] >= 2
        else xp.asarray(max(int(starts[b]) - 1, 0), dtype=np.int64)
        for b in range(nb)]).astype(np.int64)
    g = backend.to_host(gain[best_pos]).astype(np.float64)
    lo = backend.to_host(xs[best_pos]).astype(np.float32)
    hi = backend.to_host(xs[xp.minimum(best_pos + 1, x.shape[0] - 1)]).astype(np.float32)
    g[np.asarray(counts) < 2] = -np.inf
    thr = _midpoints(lo, hi)
    thr[~np.isfinite(g)] = np.inf
    return g, thr


def _midpoints(lo, hi):
    """float32 thresholds t with lo <= t < hi (lo < hi elementwise where it matters)."""
    mid = ((lo.astype(np.float64) + hi.astype(np.float64)) / 2).astype(np.float32)
    return np.where(mid < hi, mid, lo).astype(np.float32)


def learn_tree(X, cols, T=None, split="level", max_candidates=16, depth=DEPTH):
    """Learn one tree of ``depth`` levels (2**depth leaves).

    Parameters
    ----------
    X : (N, D) float32, rows to bucket (NumPy or CuPy)
    cols : sequence of int, absolute columns of X the tree may test
    T : (N, P) array, optional; targets whose within-bucket SSE is minimised
        (default ``X[:, cols]``)
    split : "level" or "node"
    max_candidates : int; columns tried per level (those with the largest
        summed within-bucket SSE) when there are more
    depth : int in 1..10

    Returns
    -------
    dims : (2**depth - 1,) int32 host array, column tested at each node (heap order)
    thresholds : (2**depth - 1,) float32 host array
    leaves : (N,) uint8 (library of X), bucket of each training row
    """
    xp = backend.namespace(X)
    cols = np.asarray(cols, dtype=np.int64)
    Xc = X[:, xp.asarray(cols)]
    T = (Xc if T is None else T).astype(np.float64)
    N = X.shape[0]
    orders = {}                                   # column -> stable argsort, made on demand
    dims = np.zeros(2 ** depth - 1, dtype=np.int32)
    thresholds = np.full(2 ** depth - 1, np.inf, dtype=np.float32)
    cdt = code_dtype(2 ** depth)
    bucket = xp.zeros(N, dtype=cdt)
    for level in range(depth):
        nb = 2 ** level
        counts = backend.to_host(xp.bincount(bucket, minlength=nb)).astype(np.int64)
        if len(cols) > max_candidates:
            sse = backend.to_host(_bucket_col_sse(xp, Xc, bucket, nb))
            cand = np.argsort(-sse, kind="stable")[:max_candidates]
        else:
            cand = np.arange(len(cols))
        # centre the targets within each bucket (see _best_splits)
        G = (bucket[:, None] == xp.arange(nb, dtype=cdt)[None, :]).astype(np.float64)
        means = (G.T @ T) / xp.maximum(xp.asarray(counts, dtype=np.float64), 1)[:, None]
        Tc = T - means[bucket.astype(np.int64)]
        gains = np.empty((len(cand), nb))
        thrs = np.empty((len(cand), nb), dtype=np.float32)
        for i, j in enumerate(cand):
            if j not in orders:
                orders[j] = xp.argsort(Xc[:, j], kind="stable")
            gains[i], thrs[i] = _best_splits(xp, Xc[:, j], orders[j], bucket, counts, Tc)
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
        bucket = (2 * bucket + right).astype(cdt)
    return dims, thresholds, bucket


def learn_trees(X, starts, split="level", max_candidates=16, progress=None, depth=DEPTH):
    """One tree per subspace, each minimising the SSE of its own subspace's columns.

    Parameters
    ----------
    X : (N, D) float32
    starts : (C + 1,) int, subspace column boundaries
    progress : callable() called after each tree, optional
    depth : int in 1..10, levels of every tree

    Returns
    -------
    dims : (C, 2**depth - 1) int32, thresholds : (C, 2**depth - 1) float32 (both in
    X's library), codes : (N, C) uint8 training codes
    """
    xp = backend.namespace(X)
    C = len(starts) - 1
    dims = np.zeros((C, 2 ** depth - 1), dtype=np.int32)
    thr = np.zeros((C, 2 ** depth - 1), dtype=np.float32)
    codes = xp.empty((X.shape[0], C), dtype=code_dtype(2 ** depth))
    for c in range(C):
        dims[c], thr[c], codes[:, c] = learn_tree(
            X, range(int(starts[c]), int(starts[c + 1])), None, split, max_candidates, depth)
        if progress is not None:
            progress()
    return xp.asarray(dims), xp.asarray(thr), codes


assert NBUCKETS == 2 ** DEPTH  # internal invariant, not a user check


def _top_directions(R, rank, max_rows=8192):
    """(D, rank) top principal directions of R's rows (from at most max_rows rows)."""
    xp = backend.namespace(R)
    sub = R[:: max(1, R.shape[0] // max_rows)]
    sub = sub - sub.mean(axis=0)
    _, vecs = xp.linalg.eigh(sub.T @ sub)
    return vecs[:, ::-1][:, :rank]


def refine_trees(X, starts, codes, prototypes, split="level", max_candidates=16, rank=32,
                 progress=None, depth=DEPTH):
    """One pass of block coordinate descent over the trees.

    With every other codebook's prototypes fixed, codebook c's tree is relearned
    to minimise the SSE of what the others leave unexplained, ``R_c = X - sum_{c'
    != c} P_c'[codes_c']`` over all D columns, and its prototypes become the
    bucket means of ``R_c``. When D is large the SSE is measured on R_c's own
    subspace columns plus its projection on the top ``rank`` principal
    directions of the full residual (one eigendecomposition per pass, so the
    cost stays linear in C).

    Parameters
    ----------
    X : (N, D) float32
    starts : (C + 1,) int
    codes : (N, C) uint8 current codes
    prototypes : (C, K, D) float32 current prototypes (e.g. from the ridge fit),
        K = 2**depth
    depth : int in 1..10, levels of every tree

    Returns
    -------
    dims : (C, K - 1) int32, thresholds : (C, K - 1) float32, codes : (N, C) uint8
    """
    from ._lut import bucket_means
    xp = backend.namespace(X)
    C = len(starts) - 1
    codes = codes.copy()
    P = prototypes.astype(np.float32).copy()
    dims = np.zeros((C, 2 ** depth - 1), dtype=np.int32)
    thr = np.zeros((C, 2 ** depth - 1), dtype=np.float32)
    lookup = lambda c: P[c][codes[:, c].astype(np.int64)]  # noqa: E731
    R = X - sum(lookup(c) for c in range(C))          # the residual of all codebooks
    V = _top_directions(R, rank) if X.shape[1] > 2 * rank else None
    for c in range(C):
        s, e = int(starts[c]), int(starts[c + 1])
        Rc = R + lookup(c)                             # what codebook c should explain
        T = Rc if V is None else xp.concatenate([Rc @ V, Rc[:, s:e]], axis=1)
        dims[c], thr[c], leaves = learn_tree(X, range(s, e), T, split, max_candidates, depth)
        codes[:, c] = leaves
        P[c] = bucket_means(leaves[:, None], Rc, 2 ** depth)[0]
        R = Rc - lookup(c)
        if progress is not None:
            progress()
    return xp.asarray(dims), xp.asarray(thr), codes
