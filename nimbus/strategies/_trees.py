"""The tree learner of the strategies: one hash tree of ``depth`` levels (2**depth leaves).

MADDNESS, joint bucketing and DM's initialisation all learn their trees here. A tree
is grown greedily, level by level: every bucket of a level is split in two at a
threshold on one column, chosen to remove the most within-bucket sum of squared errors
(SSE) of a target matrix ``T`` (the subspace's own columns for MADDNESS; the partial
product or what the other codebooks leave unexplained for joint bucketing). Two
options make the split rules of the strategies:

``split``, who picks the column:
    ``"level"``: one column per level, shared by its buckets (the paper's rule, the
    column removing the most in total); ``"node"``: every bucket picks its own column.

``search``, how a column's best cut is found:
    ``"exact"`` (MADDNESS): every cut between two distinct values of the column, by a
    sorted scan; gain = the SSE removed. With more than ``max_candidates`` columns, a
    level tries those with the largest summed within-bucket SSE of their own values.
    ``"binned"`` (joint bucketing, "product trees"): cuts between the bins of
    :func:`bin_columns` (exact for columns of at most ``MAX_BINS`` values), found from
    per-(bucket, column, bin) histograms of T; gain = the *leave-one-out* SSE removed
    (a side with n rows and SSE s counts ``(n / (n-1))^2 s``), and only positive gains
    count, so a split that cuts off one or two extreme rows (heavy tails) no longer
    looks like a large gain. With more than ``max_candidates`` columns, a level
    searches those whose within-bucket linear fit to T removes the most SSE.

Both keep at least ``min_leaf`` training rows on each side of a split.

Ties: a split falls only between two distinct values of the column, at their
midpoint (or at the lower value when the midpoint rounds up to the higher one
in float32), and a row goes right iff ``x > t``, so a value equal to a
threshold goes left here and in the encode kernels alike. A bucket with no
admissible split gets ``t = +inf``: everything stays left, new rows included.

All array work uses the library of ``X`` (NumPy or CuPy); only small per-bucket
summaries cross to the host.
"""
from __future__ import annotations

import numpy as np

from ..arrays import backend
from ..arrays.validate import code_dtype
from ._lut import NBUCKETS

DEPTH = 4
assert NBUCKETS == 2 ** DEPTH  # internal invariant, not a user check
# Candidate cuts per column of the binned search: a column with more distinct values is
# cut near its quantiles (uint8 pixels and other small alphabets stay exact)
MAX_BINS = 256


# --------------------------------------------------------------- shared helpers
def midpoints(lo, hi):
    """float32 thresholds t with lo <= t < hi, for host float32 arrays with lo < hi.

    The float64 midpoint rounded to float32 may round up to ``hi``; then ``lo``
    itself separates the two values (``x > t`` sends ``hi`` right, ``lo`` left).
    """
    mid = ((lo.astype(np.float64) + hi.astype(np.float64)) / 2).astype(np.float32)
    return np.where(mid < hi, mid, lo).astype(np.float32)


def top_directions(R, rank, max_rows=8192, dtype=None):
    """(P, rank) orthonormal top principal directions of the rows of R.

    Parameters
    ----------
    R : (N, P) real array (NumPy or CuPy)
    rank : int, directions kept (all P when rank >= P)
    max_rows : int, at most about this many evenly strided rows are used
    dtype : the dtype the covariance is formed and decomposed in (None: R's own;
        MADDNESS decomposes its float32 residual in float32, joint in float64)

    Returns
    -------
    V : (P, min(rank, P)) array of the library and dtype of the computation
    """
    xp = backend.namespace(R)
    sub = R[:: max(1, R.shape[0] // max_rows)]
    if dtype is not None:
        sub = sub.astype(dtype)
    sub = sub - sub.mean(axis=0)
    _, vecs = xp.linalg.eigh(sub.T @ sub)
    return vecs[:, ::-1][:, :rank]


# Leaf size with few training rows (issue 17, N < _lut.SMALL_ROWS): greedy splits on a
# hundred rows cut leaves of one or two rows, whose means are noise in every column the
# split did not look at. Each side of a split then keeps at least N / (LEAF_SHARE * K)
# rows, capped at LEAF_CAP, and never fewer than LEAF_FLOOR where subspaces have at
# least WIDE_SUBSPACE columns (with one to three columns a one-row leaf still holds a
# value that other rows share: pixels, small alphabets).
LEAF_SHARE = 4
LEAF_CAP = 8
LEAF_FLOOR = 2
WIDE_SUBSPACE = 4


def small_data_min_leaf(N, K, width):
    """Fewest training rows on each side of a split with N < SMALL_ROWS training rows.

    ``max(floor, min(N // (4 K), 8))``, floor 2 when the narrowest subspace has at least
    4 columns, else 1 (at K = 16: the floor below N = 128 or 192, then N // 64 up to 8).
    A bucket with no split that keeps that many rows on both sides stays whole (its
    sibling leaf stays empty), so with fewer than 2 K * floor rows fewer than K leaves
    are used.

    Parameters
    ----------
    N : int, training rows; K : int, leaves per tree; width : int, columns of the
        narrowest subspace

    Returns
    -------
    int >= 1
    """
    floor = LEAF_FLOOR if width >= WIDE_SUBSPACE else 1
    return int(max(floor, min(int(N) // (LEAF_SHARE * int(K)), LEAF_CAP)))


def bin_columns(Xc, max_bins=MAX_BINS):
    """Bin every column at cuts that fall only between distinct values.

    A column with at most ``max_bins`` distinct values gets one bin per value
    (splits on it are then exact); otherwise the cuts sit near the quantiles
    ``i / max_bins`` (each moved up to the next place where the sorted values
    change), so every bin holds about N / max_bins rows or one value.

    Parameters
    ----------
    Xc : (N, w) float32 (NumPy or CuPy)
    max_bins : int in [2, 256]

    Returns
    -------
    XT : (w, N) float32, the columns as rows, same library
    bins : (w, N) int32, same library; ``bins[j, n] > k`` iff ``Xc[n, j] > cuts[j, k]``
    cuts : (w, max_bins - 1) float32 host array, ascending per column, the
        threshold between bin k and bin k+1 (+inf past a column's last cut)
    nbins : (w,) int64 host array, bins used per column (1 for a constant column)
    """
    xp = backend.namespace(Xc)
    N, w = Xc.shape
    XT = xp.ascontiguousarray(Xc.T)
    order = xp.argsort(XT, axis=1)
    xs = xp.take_along_axis(XT, order, axis=1)
    # allowed[j, p]: a cut between sorted positions p and p + 1 separates distinct values
    allowed = xp.zeros((w, N), dtype=bool)
    allowed[:, :-1] = xs[:, :-1] < xs[:, 1:]
    n_allowed = allowed.sum(axis=1)
    # quantile cuts: the first allowed position at or after each target position
    apos = xp.argsort(~allowed, axis=1, kind="stable")          # allowed positions first
    before = xp.cumsum(allowed, axis=1) - allowed                 # allowed positions < p
    targets = xp.asarray(np.maximum((np.arange(1, max_bins) * N) // max_bins - 1, 0))
    k = before[:, targets]                                        # (w, max_bins - 1)
    ok = k < n_allowed[:, None]
    pos = xp.take_along_axis(apos, xp.minimum(k, N - 1), axis=1)
    cut = xp.zeros((w, N), dtype=bool)
    jj = xp.broadcast_to(xp.arange(w)[:, None], k.shape)
    cut[jj[ok], pos[ok]] = True                                   # repeats collapse
    few = (n_allowed < max_bins)[:, None]
    cut = xp.where(few, allowed, cut)                             # few values: every cut
    ncut = cut.sum(axis=1)
    # bin of the row at sorted position p = number of cuts before p
    ci = cut.astype(np.int32)
    bins = xp.empty((w, N), dtype=np.int32)
    bins[xp.arange(w)[:, None], order] = xp.cumsum(ci, axis=1) - ci
    # thresholds: midpoints of the values either side of each cut
    nc = min(N, max_bins - 1)                                     # most cuts possible
    cpos = xp.argsort(~cut, axis=1, kind="stable")[:, :nc]
    lo = backend.to_host(xp.take_along_axis(xs, cpos, axis=1)).astype(np.float32)
    hi = backend.to_host(xp.take_along_axis(xs, xp.minimum(cpos + 1, N - 1), axis=1))
    ncut = backend.to_host(ncut).astype(np.int64)
    cuts = np.full((w, max_bins - 1), np.inf, dtype=np.float32)
    has = np.arange(nc)[None, :] < ncut[:, None]
    cuts[:, :nc][has] = midpoints(lo[has], hi.astype(np.float32)[has])
    return XT, bins, cuts, ncut + 1


# ------------------------------------------------------------------ the learner
def learn_tree(X, cols, T=None, split="level", max_candidates=16, depth=DEPTH, *,
               search="exact", min_leaf=1, binned=None):
    """Learn one tree of ``depth`` levels (2**depth leaves); see the module docstring.

    Parameters
    ----------
    X : (N, D) float32, rows to bucket (NumPy or CuPy)
    cols : sequence of int, absolute columns of X the tree may test
    T : (N, P) real array, same library, optional; targets whose within-bucket SSE is
        minimised (default ``X[:, cols]``)
    split : "level" or "node", who picks the column (one per level or one per node)
    max_candidates : int or None; columns searched per level when there are more
        (None: all)
    depth : int in 1..10
    search : "exact" (every cut between distinct values, SSE gain; MADDNESS) or
        "binned" (histogram search over :func:`bin_columns`, leave-one-out SSE gain;
        joint bucketing)
    min_leaf : int >= 1, fewest training rows on each side of a split
    binned : ``bin_columns(X[:, cols])``, optional, for ``search="binned"`` (pass it
        to share the binning between the trees of one subspace)

    Returns
    -------
    dims : (2**depth - 1,) int32 host array, column of X tested at each node (heap order)
    thresholds : (2**depth - 1,) float32 host array
    leaves : (N,) uint8 (uint16 beyond depth 8), library of X, leaf of each training row
    """
    if split not in ("level", "node"):
        raise ValueError(f"split must be 'level' or 'node', got {split!r}")
    xp = backend.namespace(X)
    cols = np.asarray(cols, dtype=np.int64)
    if search == "exact":
        finder = _ExactSearch(X[:, xp.asarray(cols)], T, max_candidates, min_leaf)
    elif search == "binned":
        if binned is None:
            binned = bin_columns(X[:, xp.asarray(cols)])
        finder = _BinnedSearch(binned, X[:, xp.asarray(cols)] if T is None else T,
                               max_candidates, min_leaf)
    else:
        raise ValueError(f"search must be 'exact' or 'binned', got {search!r}")
    N = X.shape[0]
    dims = np.zeros(2 ** depth - 1, dtype=np.int32)
    thresholds = np.full(2 ** depth - 1, np.inf, dtype=np.float32)
    cdt = code_dtype(2 ** depth)
    bucket = xp.zeros(N, dtype=cdt)
    for level in range(depth):
        nb = 2 ** level
        # cand: (q,) host indices into cols; gains, thrs: (nb, q) host, the best split of
        # every (bucket, candidate): -inf gain and +inf threshold where there is none
        cand, gains, thrs = finder.level(bucket, nb)
        useful = np.where(np.isfinite(gains), gains, 0.0)
        if split == "level":
            pick = np.full(nb, int(np.argmax(useful.sum(axis=0))))
        else:
            pick = np.argmax(useful, axis=1)
        node0 = nb - 1
        dims[node0:node0 + nb] = cols[cand[pick]]
        thresholds[node0:node0 + nb] = thrs[np.arange(nb), pick]
        # route rows: right iff x > t (equal goes left, as in the encoders)
        bi = bucket.astype(np.int64)
        d_rows = xp.asarray(dims[node0:node0 + nb])[bi]
        t_rows = xp.asarray(thresholds[node0:node0 + nb])[bi]
        right = X[xp.arange(N), d_rows] > t_rows
        bucket = (2 * bucket + right).astype(cdt)
    return dims, thresholds, bucket


# ------------------------------------------------------------- search "exact"
class _ExactSearch:
    """Every cut between distinct values, by a sorted scan; gain = SSE removed."""

    def __init__(self, Xc, T, max_candidates, min_leaf):
        self.xp = backend.namespace(Xc)
        self.Xc = Xc
        self.T = (Xc if T is None else T).astype(np.float64)
        self.max_candidates = max_candidates
        self.min_leaf = min_leaf
        self.orders = {}                       # column -> stable argsort, made on demand

    def level(self, bucket, nb):
        xp, Xc, T = self.xp, self.Xc, self.T
        counts = backend.to_host(xp.bincount(bucket, minlength=nb)).astype(np.int64)
        # one-hot of the buckets (N, nb)
        G = (bucket[:, None] == xp.arange(nb, dtype=bucket.dtype)[None, :]).astype(np.float64)
        w = Xc.shape[1]
        if self.max_candidates is not None and w > self.max_candidates:
            sse = backend.to_host(_bucket_col_sse(G, Xc))
            cand = np.argsort(-sse, kind="stable")[:self.max_candidates]
        else:
            cand = np.arange(w)
        # centre the targets within each bucket (see _best_splits)
        means = (G.T @ T) / xp.maximum(xp.asarray(counts, dtype=np.float64), 1)[:, None]
        Tc = T - means[bucket.astype(np.int64)]
        gains = np.empty((len(cand), nb))
        thrs = np.empty((len(cand), nb), dtype=np.float32)
        for i, j in enumerate(cand):
            if j not in self.orders:
                self.orders[j] = xp.argsort(Xc[:, j], kind="stable")
            gains[i], thrs[i] = _best_splits(xp, Xc[:, j], self.orders[j], bucket, counts,
                                             Tc, self.min_leaf)
        # (nb, q) views: a level's total per column then sums along the contiguous axis
        return cand, gains.T, thrs.T


def _bucket_col_sse(G, Xc):
    """(ncols,) SSE of each column of Xc (N, ncols) summed over the buckets of G (N, nb)."""
    xp = backend.namespace(G)
    n = G.sum(axis=0)[:, None]
    s1 = G.T @ Xc.astype(np.float64)
    s2 = G.T @ (Xc.astype(np.float64) ** 2)
    return (s2 - s1 ** 2 / xp.maximum(n, 1)).sum(axis=0)


def _best_splits(xp, x, order0, bucket, counts, Tc, min_leaf):
    """Best split of every bucket on one column.

    Parameters
    ----------
    x : (N,) float32, the column
    order0 : (N,) int, a stable ascending sort of x
    bucket : (N,) uint8/uint16 bucket of each row
    counts : host (nb,) int rows per bucket
    Tc : (N, P) float64 targets, centred within each bucket
    min_leaf : int >= 1, fewest rows on each side

    Returns
    -------
    gains : host (nb,) float64, SSE removed by the best split (-inf: no valid split)
    thresholds : host (nb,) float32 (+inf: no valid split)
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
    valid = (nl >= min_leaf) & (nr >= min_leaf) & (xs < nxt)   # only between distinct values
    gain = xp.where(valid, sq * cnt[bs] / (nl * xp.maximum(nr, 1)), -xp.inf)
    best_pos = xp.stack([
        int(starts[b]) + xp.argmax(gain[int(starts[b]):int(ends[b])]) if counts[b] >= 2
        else xp.asarray(max(int(starts[b]) - 1, 0), dtype=np.int64)
        for b in range(nb)]).astype(np.int64)
    g = backend.to_host(gain[best_pos]).astype(np.float64)
    lo = backend.to_host(xs[best_pos]).astype(np.float32)
    hi = backend.to_host(xs[xp.minimum(best_pos + 1, x.shape[0] - 1)]).astype(np.float32)
    g[np.asarray(counts) < 2] = -np.inf
    thr = midpoints(lo, hi)
    thr[~np.isfinite(g)] = np.inf
    return g, thr


# ------------------------------------------------------------ search "binned"
class _BinnedSearch:
    """Histogram search over binned columns; gain = leave-one-out SSE removed, > 0.

    Per level, weighted bincounts give the target sums of every (bucket, column,
    bin), and running sums over the bins give every split's gain at once.
    """

    def __init__(self, binned, T, max_candidates, min_leaf):
        self.XT, self.bins, self.cuts, self.nbins = binned
        xp = self.xp = backend.namespace(self.bins, T)
        w = self.bins.shape[0]
        # centred once: sums of raw targets would lose digits to a large mean
        T = T.astype(np.float64)
        self.T = T = T - T.mean(axis=0)
        self.Tt = xp.ascontiguousarray(T.T)         # (P, N): one contiguous row per target
        self.sqn = (T ** 2).sum(axis=1)
        self.screen = max_candidates is not None and w > max_candidates
        self.max_candidates = max_candidates
        self.min_leaf = min_leaf
        self.W = None                               # tiled target weights, see level()

    def level(self, bucket, nb):
        xp, bins, nbins = self.xp, self.bins, self.nbins
        w = bins.shape[0]
        P = self.T.shape[1]
        bucket = bucket.astype(np.int64)
        if self.screen:
            cand = _screen_columns(xp, self.XT, self.T, bucket, nb, self.max_candidates)
        else:
            cand = np.arange(w)
        q = len(cand)
        K = int(nbins[cand].max())
        cb = bins[xp.asarray(cand)] if self.screen else bins
        key = (bucket[None, :] * (q * K) + (xp.arange(q, dtype=np.int64) * K)[:, None]
               + cb).ravel()                                                # (b, j, bin)
        size = nb * q * K
        hn = xp.bincount(key, minlength=size).reshape(nb, q, K).astype(np.float64)
        if self.W is None or self.screen:       # the same weights serve every level
            self.W = (xp.tile(self.Tt, (1, q)), xp.tile(self.sqn, q))      # (P, q*N), (q*N,)
        Wt, Wq = self.W
        S = xp.stack([xp.bincount(key, weights=Wt[p], minlength=size)
                      for p in range(P)]).reshape(P, nb, q, K)
        S = xp.cumsum(S, axis=3)                  # left part: bins <= k
        Q = xp.cumsum(xp.bincount(key, weights=Wq, minlength=size).reshape(nb, q, K), axis=2)
        nl = xp.cumsum(hn, axis=2)
        cnt = nl[:, :, -1:]                       # rows per bucket
        nr = cnt - nl
        tot = S[..., -1:]
        SR = tot - S

        # leave-one-out SSE of each side, (n / (n-1))^2 * SSE: a side's mean is judged
        # on rows it was not computed from
        def loo(q_, s_, n_):
            sse = q_ - xp.einsum("pbjk,pbjk->bjk", s_, s_) / xp.maximum(n_, 1)
            # one row: no estimate from the others; a huge finite cost (not inf,
            # whose differences would be NaN) rules such a side out
            return xp.where(n_ >= 2, sse * (n_ / xp.maximum(n_ - 1, 1)) ** 2,
                            xp.where(n_ == 1, 1e300, 0.0))
        gain = loo(Q[..., -1:], tot, cnt) - loo(Q, S, nl) - loo(Q[..., -1:] - Q, SR, nr)
        # a cut after bin k exists only below the column's last bin
        has_cut = xp.asarray(np.arange(K)[None, :] < (nbins[cand] - 1)[:, None])
        # a split must help out of sample (positive leave-one-out gain)
        ok = ((nl >= self.min_leaf) & (nr >= self.min_leaf) & has_cut[None, :, :]
              & (gain > 0))
        gain = xp.where(ok, gain, -xp.inf)
        best = xp.argmax(gain, axis=2)                                         # (nb, q)
        g = backend.to_host(xp.take_along_axis(gain, best[:, :, None], axis=2)[:, :, 0])
        best = backend.to_host(best)
        thrs = np.where(np.isfinite(g), self.cuts[cand[None, :], best], np.inf)
        return cand, g, thrs.astype(np.float32)


def _screen_columns(xp, XT, T, bucket, nb, q):
    """The q columns of XT (w, N) whose within-bucket linear fit to T removes the most SSE.

    Returns a sorted host int64 array of column indices.
    """
    w = XT.shape[0]
    score = np.zeros(w)
    for b in range(nb):
        rows = xp.nonzero(bucket == b)[0]
        if rows.shape[0] < 2:
            continue
        Xb = XT[:, rows].astype(np.float64)
        Xb = Xb - Xb.mean(axis=1, keepdims=True)
        Tb = T[rows] - T[rows].mean(axis=0)
        cross = Xb @ Tb                                          # (w, P)
        score += backend.to_host((cross ** 2).sum(axis=1) / xp.maximum((Xb ** 2).sum(axis=1), 1e-30))
    return np.sort(np.argsort(-score, kind="stable")[:q])
