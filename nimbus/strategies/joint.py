"""Joint bucketing: hash trees that bucket by the error of the product, not of the input.

MADDNESS learns each codebook's tree so that the rows of ``A`` in a bucket are
close to each other. What matters is the error of ``A @ B``: directions of A
that ``B`` ignores cost nothing, directions it amplifies cost a lot, and what
the other codebooks already explain costs nothing either. Joint bucketing
learns every tree against that error directly:

1. Start: the tree of subspace c minimises the within-bucket SSE of the partial
   product ``A_c @ B_c`` (computed exactly in few dimensions: with ``B_c = U S
   V^T``, ``A_c @ B_c`` has the same SSE as ``A_c @ U S``; more than ``rank``
   dimensions are projected on their top principal directions); its LUT rows
   would be the bucket means of ``A_c @ B_c``, but step 2 replaces them at once.
2. Joint refit: all LUTs together by ridge least squares of ``Y = A @ B`` on the
   one-hot codes (penalty ``ridge`` times the mean bucket count).
3. Up to ``refine`` block-coordinate passes in product space: with the other
   codebooks fixed, tree c is relearned against what they leave unexplained,
   ``R_c = Y - sum_{c' != c} LUT_c'[codes_c']`` (projected on its top ``rank``
   principal directions when M is larger), and kept only if, with its best LUT
   rows, it lowers the loss; then all LUTs are refit jointly again (after every
   tree, or every C/32 trees for C > 32). Every step lowers the training loss
   ``||Y - sum_c LUT_c[codes_c]||^2 + reg ||LUT||^2``; the passes stop early
   once a pass gains less than ``tol`` of it.

The LUT is stored as prototypes in A's space, ``P = ridge(onehot(codes), A)``
(C, K, D): the ridge solution is linear in its targets, so ``P @ B`` *is* the
joint ridge refit against ``Y = A @ B``, and ``build_lut(B_new)`` gives the
least-squares LUT for any other B (for the trees learned with the first B).

The trees are ordinary MADDNESS trees (depth 4 by default; one column of the subspace and
one threshold per node; ``split="level"`` shares the column across a level,
``split="node"`` lets every node choose), so encoding uses the same kernels.
Thresholds fall only between distinct training values and ``x == t`` goes left,
in learning and encoding alike (integer pixels, ReLU zeros).
"""
from __future__ import annotations

import numpy as np

from ..arrays import backend, kernels, validate
from .._progress import progress_bar
from ..arrays.kernels.reference import code_dtype
from .base import TreeStrategy, subspace_starts

DEPTH = 4                   # the default tree depth (16 leaves)
# Largest C*K for which the joint LUT refit solves for all C*K rows at once (its Gram
# matrix is (C*K)^2 float64); beyond it (deep trees over many codebooks) the refit is
# block Gauss-Seidel: sweeps of exact per-codebook fits against the others' residual
MAX_DENSE_UNKNOWNS = 4096
GS_SWEEPS = 4
# Candidate thresholds per column: a column with more distinct values is cut
# near its quantiles (uint8 pixels and other small alphabets stay exact).
MAX_BINS = 256


# ------------------------------------------------------------------ helpers
def _midpoint(lo, hi):
    """float32 threshold t with lo <= t < hi, for host float32 arrays lo < hi."""
    mid = ((lo.astype(np.float64) + hi.astype(np.float64)) / 2).astype(np.float32)
    return np.where(mid < hi, mid, lo).astype(np.float32)


def _bucket_sums(xp, bucket, nb, T):
    """Per-bucket row counts (nb,) and sums (nb, P) of T (N, P), both float64."""
    P = T.shape[1]
    b = bucket.astype(np.int64)
    key = (b[:, None] * P + xp.arange(P, dtype=np.int64)[None, :]).ravel()
    sums = xp.bincount(key, weights=T.astype(np.float64).ravel(), minlength=nb * P)
    return xp.bincount(b, minlength=nb).astype(np.float64), sums.reshape(nb, P)


def _sse(xp, leaves, T, nb=2 ** DEPTH):
    """Within-bucket SSE of T (N, P) for bucket ids ``leaves`` (N,) < nb, as a float."""
    n, s = _bucket_sums(xp, leaves, nb, T)
    return float(((T.astype(np.float64) ** 2).sum() - ((s ** 2).sum(axis=1) / xp.maximum(n, 1)).sum()))


def _top_directions(xp, R, rank, max_rows=8192):
    """(M, rank) orthonormal top principal directions of the rows of R (N, M)."""
    sub = R[:: max(1, R.shape[0] // max_rows)].astype(np.float64)
    sub = sub - sub.mean(axis=0)
    _, vecs = xp.linalg.eigh(sub.T @ sub)
    return vecs[:, ::-1][:, :rank]


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
    cuts[:, :nc][has] = _midpoint(lo[has], hi.astype(np.float32)[has])
    return XT, bins, cuts, ncut + 1


def learn_product_tree(binned, T, split="node", min_leaf=1, max_candidates=None, depth=DEPTH):
    """One tree of ``depth`` levels on binned columns, minimising the within-bucket SSE of T.

    Level by level, every bucket gets the split (column, cut) that removes the
    most leave-one-out SSE of T (a side with n rows and SSE s counts
    ``(n / (n-1))^2 * s``, a side of one row is not allowed);
    ``split="level"`` makes the buckets of a level share the column that
    removes the most in total. Cuts come from :func:`bin_columns`,
    so thresholds lie between two distinct training values; ``x > t`` goes
    right. A bucket with no admissible split (fewer than ``2 * min_leaf`` rows,
    one value, or no split with a positive leave-one-out gain) gets
    ``t = +inf``: everything goes left.

    The split search is histogram based: per level, weighted bincounts give the
    target sums of every (bucket, column, bin), and running sums over the bins
    give every split's gain at once. With more than ``max_candidates`` columns,
    a level searches only those whose linear fit to T within the buckets removes
    the most SSE (a cheap matrix product ranks them).

    Parameters
    ----------
    binned : ``bin_columns(Xc)`` of the (N, w) subspace columns
    T : (N, P) float32 or float64 targets, same library
    split : "node" or "level"
    min_leaf : int >= 1, fewest training rows on each side of a split
    max_candidates : int or None, columns searched per level (None: all)
    depth : int in 1..10 (K = 2**depth leaves)

    Returns
    -------
    dims : (K - 1,) int64 host array, column (0..w-1) tested at each node (heap order)
    thresholds : (K - 1,) float32 host array
    leaves : (N,) uint8, same library as T, leaf (0..K-1) of each training row
    """
    XT, bins, cuts, nbins = binned
    xp = backend.namespace(bins, T)
    w, N = bins.shape
    P = T.shape[1]
    # centred once: sums of raw targets would lose digits to a large mean
    T = T.astype(np.float64)
    T = T - T.mean(axis=0)
    Tt = xp.ascontiguousarray(T.T)                  # (P, N): one contiguous row per target
    sqn = (T ** 2).sum(axis=1)
    nnodes = 2 ** depth - 1
    dims = np.zeros(nnodes, dtype=np.int64)
    thr = np.full(nnodes, np.inf, dtype=np.float32)
    kcut = np.zeros(nnodes, dtype=np.int64)         # right iff bin > kcut (if thr finite)
    bucket = xp.zeros(N, dtype=np.int64)
    pos = xp.arange(N)
    screen = max_candidates is not None and w > max_candidates
    for level in range(depth):
        nb = 2 ** level
        if screen:
            cand = _screen_columns(xp, XT, T, bucket, nb, max_candidates)
        else:
            cand = np.arange(w)
        q = len(cand)
        K = int(nbins[cand].max())
        cb = bins[xp.asarray(cand)] if screen else bins
        key = (bucket[None, :] * (q * K) + (xp.arange(q, dtype=np.int64) * K)[:, None]
               + cb).ravel()                                                # (b, j, bin)
        size = nb * q * K
        hn = xp.bincount(key, minlength=size).reshape(nb, q, K).astype(np.float64)
        if level == 0 or screen:            # the same weights serve every level
            Wt = xp.tile(Tt, (1, q))                                           # (P, q*N)
            Wq = xp.tile(sqn, q)
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
        # on rows it was not computed from, so a split that cuts off one or two
        # extreme rows (heavy tails) no longer looks like a large gain
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
        ok = (nl >= min_leaf) & (nr >= min_leaf) & has_cut[None, :, :] & (gain > 0)
        gain = xp.where(ok, gain, -xp.inf)
        best = xp.argmax(gain, axis=2)                                         # (nb, q)
        g = backend.to_host(xp.take_along_axis(gain, best[:, :, None], axis=2)[:, :, 0])
        best = backend.to_host(best)
        useful = np.where(np.isfinite(g), g, 0.0)
        if split == "level":
            pick = np.full(nb, int(np.argmax(useful.sum(axis=0))))
        else:
            pick = np.argmax(useful, axis=1)
        node0 = nb - 1
        for b in range(nb):
            i = int(pick[b])
            dims[node0 + b] = cand[i]
            if np.isfinite(g[b, i]):
                kcut[node0 + b] = best[b, i]
                thr[node0 + b] = cuts[cand[i], best[b, i]]
        d_rows = xp.asarray(dims[node0:node0 + nb])[bucket]
        k_rows = xp.asarray(np.where(np.isfinite(thr), kcut, np.iinfo(np.int64).max)
                            [node0:node0 + nb])[bucket]
        right = bins[d_rows, pos] > k_rows          # x > t; equal goes left, as in the encoders
        bucket = 2 * bucket + right
    return dims, thr, bucket.astype(code_dtype(2 ** depth))


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


class _CodeRidge:
    """Ridge regression of Y on one-hot codes, updated one codebook at a time.

    Minimises ``||Y - G L||^2 + reg ||L - L0||^2`` over the LUT L (C*K, M), where G
    (N, C*K) is the one-hot matrix of the codes and the prior L0 holds each
    codebook's own partial-product bucket means (``prior_of``): a bucket with few
    rows keeps about what its own subspace says instead of absorbing what the
    other codebooks miss on those rows (robust to heavy tails, small N).

    Dense (C*K <= MAX_DENSE_UNKNOWNS): the solution ``(G^T G + reg I)^-1 (G^T Y +
    reg L0)``; ``G^T G`` (pair counts), ``G^T Y`` and L0 are kept, so changing one
    codebook's codes costs O(N C) instead of a new (N, C*K) product.
    Blockwise (larger C*K, deep trees): no Gram matrix; ``solve`` runs GS_SWEEPS block
    Gauss-Seidel sweeps from the prior, each codebook's rows set to their exact
    minimiser given the others. Every sweep lowers the objective, and the result is
    linear in the targets and the prior, as the dense solution is.
    """

    def __init__(self, codes, Y, reg, prior_of, nbuckets):
        xp = backend.namespace(codes, Y)
        self.xp = xp
        self.Y = Y
        self.reg = reg
        self.prior_of = prior_of
        self.codes = codes
        self.K = K = nbuckets
        N, C = codes.shape
        self.dense = C * K <= MAX_DENSE_UNKNOWNS
        if self.dense:
            self.gram = xp.zeros((C * K, C * K), dtype=np.float64)
            self.rhs = xp.zeros((C * K, Y.shape[1]), dtype=np.float64)
        self.prior = xp.zeros((C, K, Y.shape[1]), dtype=np.float64)
        for c in range(C):
            self.update(c)

    def update(self, c):
        """Refresh the rows of codebook c (after ``codes[:, c]`` changed)."""
        xp, codes, K = self.xp, self.codes, self.K
        N, C = codes.shape
        self.prior[c] = self.prior_of(c, codes[:, c])
        if not self.dense:
            return
        # pair counts of (code in c, code in c') for every c' at once
        key = (codes[:, c].astype(np.int64)[:, None] * K + codes.astype(np.int64)
               + (xp.arange(C, dtype=np.int64) * K * K)[None, :])
        block = xp.bincount(key.ravel(), minlength=C * K * K).reshape(C, K, K)
        rows = block.transpose(1, 0, 2).reshape(K, C * K).astype(np.float64)
        self.gram[c * K:(c + 1) * K, :] = rows
        self.gram[:, c * K:(c + 1) * K] = rows.T
        self.rhs[c * K:(c + 1) * K] = _bucket_sums(xp, codes[:, c], K, self.Y)[1]

    def solve(self, X=None, prior=None):
        """The LUT (C, K, M) float32 for the targets Y; or, for other targets X (N, P)
        and their prior (C, K, P), the same regression's solution (C, K, P)."""
        xp, K = self.xp, self.K
        C = self.codes.shape[1]
        X = self.Y if X is None else X
        prior = self.prior if prior is None else prior
        if not self.dense:
            return self._gauss_seidel(X, prior)
        rhs = self.rhs if X is self.Y else xp.concatenate(
            [_bucket_sums(xp, self.codes[:, c], K, X)[1] for c in range(C)])
        lhs = self.gram + self.reg * xp.eye(self.gram.shape[0])
        sol = xp.linalg.solve(lhs, rhs + self.reg * prior.reshape(rhs.shape))
        return sol.reshape(C, K, -1).astype(np.float32)

    def _gauss_seidel(self, X, prior):
        # The residual E = X - (every codebook's rows at its codes) is kept, so a
        # codebook's step costs one scatter-add of E into its buckets (the lookup
        # backward kernel) and one gathered update of E: no (N, P) target rebuilt per
        # codebook (15x faster on the 784-column input layer). float32, like the LUT.
        xp, K, codes = self.xp, self.K, self.codes
        C = codes.shape[1]
        L = prior.astype(np.float32)                        # astype copies
        reg = np.float32(self.reg)
        one = [xp.ascontiguousarray(codes[:, c:c + 1]) for c in range(C)]
        idx = [codes[:, c].astype(np.int64) for c in range(C)]
        counts = [xp.bincount(i, minlength=K).astype(np.float32)[:, None] for i in idx]
        E = X.astype(np.float32)
        for c in range(C):
            E -= L[c][idx[c]]
        for _ in range(GS_SWEEPS):
            for c in range(C):
                # bucket sums of what codebook c should explain: E plus its own rows
                sums = kernels.lookup_backward(one[c], E, K)[0] + counts[c] * L[c]
                new = (sums + reg * prior[c].astype(np.float32)) / (counts[c] + reg)
                E -= (new - L[c])[idx[c]]
                L[c] = new
        return L


# ----------------------------------------------------------------- strategy
class Joint(TreeStrategy):
    """Joint bucketing: hash trees learned against the error of ``A @ B``.

    See the module docstring for the algorithm. Encoding and lookup are those of
    MADDNESS (same trees, same 8-bit LUT format), so the apply cost is the same;
    only learning differs. ``fit`` needs ``B``.

    Parameters
    ----------
    ncodebooks : int, C (1 <= C <= D); subspace c is a contiguous block of columns
    split : "node" (every node picks its own column; default) or "level" (one
        column per tree level, as the paper's MADDNESS). With "node" the whole
        fit also runs with per-level trees (they are node trees too) and the
        lower training loss wins: the coordinate descent from greedy per-node
        trees sometimes settles in a worse optimum. Fit time doubles.
    depth : int in 1..10, levels of every tree (K = 2**depth buckets per codebook;
        default 4). With C*K > 4096 the joint LUT refit runs as block Gauss-Seidel
        sweeps instead of one dense solve (see ``_CodeRidge``)
    refine : int >= 0, most block-coordinate passes in product space (0: the
        partial-product trees plus the joint ridge refit only)
    tol : float >= 0, stop the passes once one lowers the loss by less than
        this fraction
    ridge : float >= 0, ridge penalty of the joint LUT refit, relative to the mean
        bucket size (0: least squares with a tiny jitter)
    rank : int >= 1, dimensions the targets of a tree are projected to (their top
        principal directions) when M or the subspace width is larger; bounds
        the learning cost for wide B
    min_leaf : int >= 1 or None, fewest training rows on either side of a split;
        None: N // 500 (at least 1). Splits are also scored by their
        leave-one-out SSE, so small leaves must pay for their noise.
    max_candidates : int >= 1 or None, columns searched per tree level when the
        subspace is wider (those whose within-bucket linear fit to the targets
        is best); None: all columns (the cost grows with D / C; on the
        Fashion-MNIST input layer, 49 columns a subspace, 32 candidates fitted
        as well as all 49)
    quantize : bool, 8-bit LUT (True) or float32 LUT
    random_state : unused (learning is deterministic); kept for the interface
    verbose : bool, progress bar over trees

    Learned attributes
    ------------------
    n_features_in_ : D
    starts_ : (C+1,) int64 subspace boundaries
    dims_ : (C, K - 1) int32 absolute columns, thresholds_ : (C, K - 1) float32
    prototypes_ : (C, K, D) float32, ridge prototypes in A's space
    train_loss_ : (passes + 1,) float64 host array, training loss (float LUT,
        ridge penalty included) over ``sum((Y - mean(Y))**2)``, after the start
        and after each pass: non-increasing
    lut_ : (C, K, M) float32 = prototypes_ @ B; lut_q_, lut_scale_, lut_bias_
        (8-bit with an offset per codebook and output column and a scale per column,
        :func:`._lut.quantize_lut_per_column`: each column's step is set by its own
        range, which matters where a few columns of Y are much wider than the rest)
    """

    name = "joint"
    LUT_QUANTIZER = "column"

    def __init__(self, ncodebooks=16, *, split="node", depth=4, refine=20, tol=1e-3, ridge=1e-2,
                 rank=16, min_leaf=None, max_candidates=32, quantize=True,
                 random_state=None, verbose=False):
        super().__init__(ncodebooks, quantize=quantize, random_state=random_state)
        self.split = split
        self.depth = depth
        self.refine = refine
        self.tol = tol
        self.ridge = ridge
        self.rank = rank
        self.min_leaf = min_leaf
        self.max_candidates = max_candidates
        self.verbose = verbose

    def _check_params(self):
        super()._check_params()
        validate.check_choice(self.split, "split", ("level", "node"))
        validate.check_int(self.refine, "refine", lo=0)
        validate.check_float(self.tol, "tol", lo=0.0)
        validate.check_float(self.ridge, "ridge", lo=0.0)
        validate.check_int(self.rank, "rank", lo=1)
        if self.min_leaf is not None:
            validate.check_int(self.min_leaf, "min_leaf", lo=1)
        if self.max_candidates is not None:
            validate.check_int(self.max_candidates, "max_candidates", lo=1)

    # ---------------------------------------------------------------- fitting
    def _fit(self, A, rng, B):
        if B is None:
            raise ValueError("joint bucketing learns its trees from the product A @ B: "
                             "call fit(A, B) with the (D, M) matrix B")
        xp = backend.namespace(A)
        B = backend.like(B, A)
        self.starts_ = subspace_starts(A.shape[1], self.ncodebooks)
        Y = (A @ B).astype(np.float32)
        binned = {}              # subspace -> bin_columns(A_c), shared by both paths
        # split="node": the per-level trees are node trees too, and the coordinate
        # descent from per-node greedy trees sometimes settles in a worse optimum
        # than from per-level ones, so both paths run and the lower training loss wins
        modes = ("node", "level") if self.split == "node" else ("level",)
        best = None
        with progress_bar(len(modes) * self.ncodebooks * (1 + self.refine), "joint trees",
                          self.verbose) as bar:
            for mode in modes:
                out = self._fit_path(A, B, Y, mode, binned, bar)
                if best is None or out[0][-1] < best[0][-1]:
                    best = out
        history, dims, thr, ridge = best
        self.dims_ = xp.asarray(dims)
        self.thresholds_ = xp.asarray(thr)
        # The same ridge in A's space (prior: each codebook's bucket means of its own
        # columns): P @ B is the refit against Y = A @ B, as the solution is linear
        # in the targets and the prior
        self.prototypes_ = ridge.solve(A, self._own_means(A, ridge.codes))
        self.train_loss_ = np.asarray(history, dtype=np.float64)

    def _own_means(self, A, codes):
        """(C, K, D) float64: bucket means of each codebook's own columns, 0 elsewhere."""
        xp = backend.namespace(A)
        C = codes.shape[1]
        K = self.nbuckets
        out = xp.zeros((C, K, A.shape[1]), dtype=np.float64)
        for c in range(C):
            s, e = int(self.starts_[c]), int(self.starts_[c + 1])
            n, sums = _bucket_sums(xp, codes[:, c], K, A[:, s:e])
            out[c, :, s:e] = sums / xp.maximum(n, 1)[:, None]
        return out

    def _fit_path(self, A, B, Y, mode, binned, bar):
        """Start + refine passes with trees of one split mode.

        Returns
        -------
        history : list of float, training loss after the start and each pass
        dims : (C, K - 1) int32 host, thresholds : (C, K - 1) float32 host,
        ridge : the final ``_CodeRidge`` (its ``codes`` are the training codes)
        """
        xp = backend.namespace(A)
        N = A.shape[0]
        C = self.ncodebooks
        starts = self.starts_
        y_ss = float(((Y - Y.mean(axis=0)).astype(np.float64) ** 2).sum())
        K = self.nbuckets
        reg = self.ridge * N / (C * K) + 1e-6    # as ridge_on_codes
        dims = np.zeros((C, K - 1), dtype=np.int32)
        thr = np.full((C, K - 1), np.inf, dtype=np.float32)
        codes = xp.empty((N, C), dtype=code_dtype(K))
        # a leaf of a few rows has a mean that heavy tails can throw far off
        min_leaf = self.min_leaf if self.min_leaf is not None else max(1, N // 500)

        def learn(c, T):
            s, e = int(starts[c]), int(starts[c + 1])
            if c not in binned:
                binned[c] = bin_columns(A[:, s:e])
            d, t, leaves = learn_product_tree(binned[c], T, mode, min_leaf,
                                              self.max_candidates, self.depth)
            return (d + s).astype(np.int32), t, leaves

        def prior_of(c, leaves):
            # bucket means of the partial product A_c @ B_c: (K, M)
            s, e = int(starts[c]), int(starts[c + 1])
            n, sums = _bucket_sums(xp, leaves, K, A[:, s:e])
            return (sums / xp.maximum(n, 1)[:, None]) @ B[s:e].astype(np.float64)

        def block_fit(leaves, R, c):
            # min over this block's LUT rows L of ||R - L[leaves]||^2 + reg ||L - L0||^2:
            # L = (S + reg L0) / (n + reg); returns (loss less ||R||^2, L)
            n, sums = _bucket_sums(xp, leaves, K, R)
            p = prior_of(c, leaves)
            top = sums + reg * p
            loss = float(reg * (p ** 2).sum() - ((top ** 2).sum(axis=1) / (n + reg)).sum())
            return loss, (top / (n + reg)[:, None]).astype(np.float32)

        def refit():
            lut = ridge.solve()
            return lut, kernels.lookup(codes, lut)

        def loss_of(lut, recon):
            err = float(((Y - recon).astype(np.float64) ** 2).sum())
            return (err + reg * float(((lut - ridge.prior) ** 2).sum())) / y_ss

        # 1. each tree against its own partial product A_c @ B_c; with B_c = U S V^T
        #    that has the SSE of A_c @ U S, in at most min(width, M) dimensions
        for c in range(C):
            s, e = int(starts[c]), int(starts[c + 1])
            U, S, _ = xp.linalg.svd(B[s:e].astype(np.float64), full_matrices=False)
            Z = A[:, s:e].astype(np.float64) @ (U * S[None, :])
            if Z.shape[1] > self.rank:
                Z = Z @ _top_directions(xp, Z, self.rank)
            dims[c], thr[c], codes[:, c] = learn(c, Z)
            bar.update()
        # 2. joint ridge refit of all LUTs against Y
        ridge = _CodeRidge(codes, Y, reg, prior_of, K)
        lut, recon = refit()
        history = [loss_of(lut, recon)]
        # 3. block-coordinate passes in product space; every step lowers the loss.
        # A joint refit after each tree (each C/32 trees for larger C, where the
        # (K C)^3 solve gets dear) lets the others adapt before the next tree:
        # fewer passes to converge, and a lower optimum, than one refit per pass.
        # (blockwise refits are sweeps over all codebooks: one per pass is enough)
        every = max(1, C // 32) if ridge.dense else C
        for done in range(self.refine):
            for c in range(C):
                own = lut[c][codes[:, c].astype(np.int64)]
                R = Y - recon + own                                    # tree c's job
                T = R if R.shape[1] <= self.rank else R @ _top_directions(
                    xp, R, self.rank).astype(np.float32)
                d, t, leaves = learn(c, T)
                new_loss, new_rows = block_fit(leaves, R, c)
                old_loss, old_rows = block_fit(codes[:, c], R, c)
                if new_loss < old_loss:
                    dims[c], thr[c], codes[:, c] = d, t, leaves
                    ridge.update(c)
                if (c + 1) % every == 0:
                    lut, recon = refit()
                else:                       # the exact minimiser over this block alone
                    lut[c] = new_rows if new_loss < old_loss else old_rows
                    recon = Y - R + lut[c][codes[:, c].astype(np.int64)]
                bar.update()
            lut, recon = refit()
            history.append(loss_of(lut, recon))
            if history[-2] - history[-1] <= self.tol * history[-2]:
                bar.update(C * (self.refine - done - 1))
                break                       # converged: later passes change little
        return history, dims, thr, ridge
