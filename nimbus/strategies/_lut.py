"""LUT helpers shared by the strategies: one-hot codes, bucket sums, the ridge solver over
codes, 8-bit quantization.

This module imports nothing from the strategies (``base`` imports it), so it holds the
constants they share.
"""
from __future__ import annotations

import numpy as np

from ..arrays import backend, kernels

NBUCKETS = 16           # K of every strategy at its default (depth-4 trees, 16 centroids)
# Largest C*K for which the ridge over codes solves for all C*K rows at once (its Gram
# matrix is (C*K)^2 float64, its solve O((C*K)^3)); beyond it (deep trees over many
# codebooks) the solve is block Gauss-Seidel: GS_SWEEPS sweeps of exact per-codebook fits
MAX_DENSE_UNKNOWNS = 4096
GS_SWEEPS = 4


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


def bucket_sums(bucket, nb, T):
    """Row counts and target sums per bucket, in float64.

    Parameters
    ----------
    bucket : (N,) integer bucket ids < nb (NumPy or CuPy)
    nb : int, number of buckets
    T : (N, P) real targets, same library

    Returns
    -------
    counts : (nb,) float64, sums : (nb, P) float64
    """
    xp = backend.namespace(bucket, T)
    P = T.shape[1]
    b = bucket.astype(np.int64)
    # one bincount over (bucket, column) keys: float64 sums with no (N, nb) one-hot matrix
    key = (b[:, None] * P + xp.arange(P, dtype=np.int64)[None, :]).ravel()
    sums = xp.bincount(key, weights=T.astype(np.float64).ravel(), minlength=nb * P)
    return xp.bincount(b, minlength=nb).astype(np.float64), sums.reshape(nb, P)


def ridge_reg(lam, N, C, K):
    """The ridge weight of penalty ``lam`` on N rows of C codebooks of K buckets.

    ``lam`` counts in mean bucket sizes (N / (C*K) rows), so that it means the same at
    any number of rows; a tiny jitter keeps empty buckets solvable at ``lam = 0``.
    """
    return lam * N / (C * K) + 1e-6


class CodeRidge:
    """Ridge regression of targets on one-hot codes: the one solver of the strategies.

    Minimises ``||Y - G L||^2 + reg ||L - L0||^2`` over the rows L (C*K, M), where G
    (N, C*K) is the one-hot matrix of ``codes`` and the prior L0 (C, K, M) is what the
    penalty shrinks to, one codebook at a time: ``prior_of(c, codes[:, c])`` (K, M).
    MADDNESS shrinks towards each codebook's bucket means of its own columns, joint
    bucketing towards those of its partial product: a bucket with few rows keeps about
    what its own subspace says instead of absorbing what the other codebooks miss on
    those rows (robust to heavy tails, small N).

    Dense (C*K <= MAX_DENSE_UNKNOWNS, or ``dense=True``): the exact solution
    ``(G^T G + reg I)^-1 (G^T Y + reg L0)``. ``G^T G`` (pair counts, by bincount),
    ``G^T Y`` and L0 (float64) are kept per codebook, so that changing one codebook's
    codes (``update(c)``) costs O(N C) instead of a new (N, C*K) product.
    Blockwise (larger C*K, deep trees): no Gram matrix; ``solve`` runs ``sweeps`` block
    Gauss-Seidel sweeps from the prior, each codebook's rows set to their exact
    minimiser given the others. Every sweep lowers the objective, and the result is
    linear in the targets and the prior, as the dense solution is.

    Parameters
    ----------
    codes : (N, C) uint8 or uint16 (NumPy or CuPy); kept by reference: change a
        column in place, then call ``update(c)``
    Y : (N, M) float32 targets, same library
    reg : float > 0, the ridge weight (see :func:`ridge_reg`)
    prior_of : callable (c, (N,) codes of c) -> (K, M) prior rows of codebook c
    nbuckets : int, K
    dense : bool or None; None: dense iff C*K <= MAX_DENSE_UNKNOWNS
    sweeps : int or None, Gauss-Seidel sweeps of the blockwise solve (None: GS_SWEEPS)
    """

    def __init__(self, codes, Y, reg, prior_of, nbuckets, dense=None, sweeps=None):
        xp = backend.namespace(codes, Y)
        self.xp = xp
        self.Y = Y
        self.reg = reg
        self.prior_of = prior_of
        self.codes = codes
        self.K = K = nbuckets
        N, C = codes.shape
        self.dense = C * K <= MAX_DENSE_UNKNOWNS if dense is None else bool(dense)
        self.sweeps = GS_SWEEPS if sweeps is None else int(sweeps)
        # fewer rows than unknowns (only with few rows, issue 17): the same solution
        # from the (N, N) system of the rows, O(N^3) instead of O((C K)^3)
        self.dual = self.dense and N < C * K and is_small(N)
        if self.dual:
            self.kern = xp.zeros((N, N), dtype=np.float64)    # G G^T: codebooks agreeing
            self.seen = codes.copy()                          # codes kern counts
            for c in range(C):
                self.kern += self.seen[:, c:c + 1] == self.seen[None, :, c]
        elif self.dense:
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
        if getattr(self, "dual", False):
            old, new = self.seen[:, c], codes[:, c]
            self.kern -= old[:, None] == old[None, :]
            self.kern += new[:, None] == new[None, :]
            self.seen[:, c] = new
            return
        if not self.dense:
            return
        # pair counts of (code in c, code in c') for every c' at once
        key = (codes[:, c].astype(np.int64)[:, None] * K + codes.astype(np.int64)
               + (xp.arange(C, dtype=np.int64) * K * K)[None, :])
        block = xp.bincount(key.ravel(), minlength=C * K * K).reshape(C, K, K)
        rows = block.transpose(1, 0, 2).reshape(K, C * K).astype(np.float64)
        self.gram[c * K:(c + 1) * K, :] = rows
        self.gram[:, c * K:(c + 1) * K] = rows.T
        self.rhs[c * K:(c + 1) * K] = bucket_sums(codes[:, c], K, self.Y)[1]

    def solve(self, X=None, prior=None):
        """The rows (C, K, M) float32 for the targets Y; or, for other targets X (N, P)
        and their prior (C, K, P), the same regression's solution (C, K, P) float32."""
        xp, K = self.xp, self.K
        C = self.codes.shape[1]
        X = self.Y if X is None else X
        prior = self.prior if prior is None else prior
        if not self.dense:
            return self._gauss_seidel(X, prior)
        if self.dual:
            return self._dual(X, prior)
        rhs = self.rhs if X is self.Y else xp.concatenate(
            [bucket_sums(self.codes[:, c], K, X)[1] for c in range(C)])
        lhs = self.gram + self.reg * xp.eye(self.gram.shape[0])
        sol = xp.linalg.solve(lhs, rhs + self.reg * prior.reshape(rhs.shape))
        return sol.reshape(C, K, -1).astype(np.float32)

    def _dual(self, X, prior):
        # L = L0 + G^T alpha with (G G^T + reg I) alpha = X - G L0: the dense solution
        # by the push-through identity, solved in the N-dimensional space of the rows
        xp, K, codes = self.xp, self.K, self.codes
        C = codes.shape[1]
        idx = [codes[:, c].astype(np.int64) for c in range(C)]
        R = X.astype(np.float64)
        for c in range(C):
            R = R - prior[c][idx[c]]
        lhs = self.kern + self.reg * xp.eye(self.kern.shape[0])
        alpha = xp.linalg.solve(lhs, R)
        out = xp.empty(prior.shape, dtype=np.float32)
        for c in range(C):
            out[c] = prior[c] + bucket_sums(idx[c], K, alpha)[1]
        return out

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
        for _ in range(self.sweeps):
            for c in range(C):
                # bucket sums of what codebook c should explain: E plus its own rows
                sums = kernels.lookup_backward(one[c], E, K)[0] + counts[c] * L[c]
                new = (sums + reg * prior[c].astype(np.float32)) / (counts[c] + reg)
                E -= (new - L[c])[idx[c]]
                L[c] = new
        return L


def ridge_on_codes(codes, targets, lam, nbuckets=NBUCKETS, prior=None, dense=None):
    """Least-squares rows ``P`` so that ``onehot(codes) @ P`` fits ``targets``, in one call.

    Solves ``min ||targets - G P||^2 + reg ||P - prior||^2`` with :class:`CodeRidge`,
    i.e. ``(G^T G + reg I) P = G^T targets + reg prior`` (float64 when dense).

    Parameters
    ----------
    codes : (N, C) uint8 or uint16
    targets : (N, P) float32
    lam : float >= 0 (or inf: P = prior); reg = :func:`ridge_reg` (lam times the mean
        bucket count, so that it means the same at any number of rows)
    prior : (C, K, P) float32, optional (default 0): what the penalty shrinks to
    dense : bool or None, as :class:`CodeRidge` (None: dense iff C*K <= MAX_DENSE_UNKNOWNS)

    Returns
    -------
    P : (C, K, P) float32
    """
    xp = backend.namespace(codes, targets)
    N, C = codes.shape
    if prior is None:
        prior = xp.zeros((C, nbuckets, targets.shape[1]), dtype=np.float64)
    if not np.isfinite(lam):
        return prior.astype(np.float32)
    return CodeRidge(codes, targets, ridge_reg(lam, N, C, nbuckets),
                     lambda c, _codes: prior[c], nbuckets, dense=dense).solve()


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


# ------------------------------------------------------------ few training rows
# Issue 17: below SMALL_ROWS training rows the strategies take some choices from N
# instead of their fixed defaults (leaf size, ridge penalty; joint's check against
# MADDNESS). The bound is far below the rows the network conversion fits its initial
# trees on (8192; 1347 on the digits of ``convert --quick``), so that path is unchanged.
SMALL_ROWS = 1024
# Penalties :func:`ridge_loo` tries (relative to the mean bucket size, as ridge_reg;
# inf: the prior itself)
LOO_GRID = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, float("inf"))


# With few rows the clip of MADDNESS (and joint's) keeps at least CLIP_ROWS rows a tail:
# on Student-t columns a 1e-3 quantile of 50 or 100 rows clips nothing, and buckets of a
# few extreme rows then give test NMSE above 1 (bench_small, heavy)
CLIP_ROWS = 2


def small_data_clip(q, N):
    """The clip quantile for N < SMALL_ROWS training rows: ``max(q, CLIP_ROWS / N)``."""
    return float(max(q, CLIP_ROWS / max(int(N), 1)))


def is_small(N):
    """True when N training rows are few enough for the rules of issue 17 (N < SMALL_ROWS)."""
    return int(N) < SMALL_ROWS


def ridge_loo(codes, resid, nbuckets=NBUCKETS, grid=LOO_GRID, project=None):
    """Leave-one-out error of the ridge fit over codes, for every penalty of ``grid``.

    The fit is ``L = L0 + argmin ||resid - G D||^2 + reg ||D||^2`` (G the one-hot
    (N, C*K) matrix of ``codes``, ``resid`` the targets less the prior's prediction
    ``G L0``, reg = :func:`ridge_reg`); its hat matrix ``H = G (G^T G + reg I)^-1 G^T``
    gives every row's leave-one-out residual in closed form, ``(r - H r) / (1 - H_nn)``,
    for all penalties from one eigendecomposition of the smaller of ``G G^T`` (N, N) and
    ``G^T G`` (C*K, C*K). Rows alone in a bucket have ``H_nn`` near 1 at small
    penalties, so fits that interpolate them score badly: the penalty that
    generalises wins (the prior is held fixed, a small optimism).

    Parameters
    ----------
    codes : (N, C) uint8 or uint16
    resid : (N, P) real, targets less ``G L0``
    grid : sequence of float >= 0 or inf (inf: the prior, residual ``resid`` itself)
    project : (P, M) real or None; errors of ``resid @ project`` (e.g. B, so that the
        error is that of the product ``A @ B`` while the fit is in A's space)

    Returns
    -------
    errors : (len(grid),) float64 host array, summed squared leave-one-out residuals
    """
    R = resid.astype(np.float64)
    if project is not None:
        R = R @ project.astype(np.float64)
    errors = np.empty(len(grid))
    for i, e in enumerate(_loo_residuals(codes, R, nbuckets, grid)):
        errors[i] = float((e ** 2).sum())
    return errors


def ridge_loo_residuals(codes, resid, lam, nbuckets=NBUCKETS):
    """Leave-one-out residuals of the ridge fit over codes at one penalty.

    The fit and its closed form are those of :func:`ridge_loo`; this returns the residuals
    themselves, row by row, so that a caller can compare two fits row against row (their
    difference's standard error) or score them against other targets than the fitted
    ones (the row's target less its residual is its leave-one-out prediction).

    Parameters
    ----------
    codes : (N, C) uint8 or uint16
    resid : (N, P) real, targets less ``G L0`` (the prior's prediction)
    lam : float >= 0 or inf (inf: the prior, residual ``resid`` itself)

    Returns
    -------
    E : (N, P) float64, row n's target less its prediction by the fit on the other rows
    """
    return next(_loo_residuals(codes, resid.astype(np.float64), nbuckets, (lam,)))


def _hat_eig(G):
    """The ridge hat matrix of G (N, P) float64 in eigen-form, from one eigendecomposition
    of the smaller of ``G G^T`` and ``G^T G``: (s, W, num) with ``H(reg) = W diag(num /
    (s + reg)) W^T`` (s and num (r,), W (N, r) float64, arrays of G's library)."""
    xp = backend.namespace(G)
    if G.shape[0] <= G.shape[1]:
        s, W = xp.linalg.eigh(G @ G.T)            # H = W diag(s / (s + reg)) W^T
        s = xp.maximum(s, 0.0)
        return s, W, s
    s, V = xp.linalg.eigh(G.T @ G)                # H = (G V) diag(1 / (s + reg)) (G V)^T
    s = xp.maximum(s, 0.0)
    return s, G @ V, xp.ones_like(s)


def _loo_residuals(codes, R, K, grid):
    """Yield the (N, P) float64 leave-one-out residuals of R (N, P) float64 for every
    penalty of ``grid``, from one eigendecomposition (see :func:`ridge_loo`)."""
    xp = backend.namespace(codes, R)
    N, C = codes.shape
    G = onehot(codes, K, np.float64)
    s, W, num = _hat_eig(G)
    W2 = W ** 2
    WR = W.T @ R
    for lam in grid:
        if not np.isfinite(lam):
            yield R
            continue
        f = num / (s + ridge_reg(lam, N, C, K))
        h = W2 @ f                                              # (N,) leverages
        yield (R - W @ (f[:, None] * WR)) / xp.maximum(1.0 - h, 1e-9)[:, None]


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


# ------------------------------------------------- few rows: LUT models on fixed trees
# Joint's LUT models with few rows (issue 17; see joint.py): the LUT of codebook c is
# a prior plus a ridge fit over the nodes of its tree. The prior is ``gamma`` times the
# bucket means of the codebook's own partial product plus ``1 - gamma`` times the mean
# row (shared over the codebooks); the ridge fits what the prior leaves over, either on
# the leaves alone (design "leaf", MADDNESS's model at gamma = 1) or on every node of
# every level below the root (design "node": a leaf's value is the sum over its path, so
# a leaf of a few rows borrows from its parent, the parent from its parent, and so on).
PATH_LEVELS = {"leaf": "the leaves only", "node": "every level below the root"}


def path_levels(design, depth):
    """The tree levels (1 = the root's children, ..., depth = the leaves) of a design."""
    if design == "leaf":
        return (int(depth),)
    if design == "node":
        return tuple(range(1, int(depth) + 1))
    raise ValueError(f"design must be one of {tuple(PATH_LEVELS)}, got {design!r}")


def path_onehot(codes, depth, levels, dtype=np.float64):
    """Memberships of the rows in the tree nodes of ``levels``.

    Parameters
    ----------
    codes : (N, C) uint8 or uint16 leaf codes of trees of ``depth`` levels
    levels : sequence of int in 1..depth (depth alone: :func:`onehot`)

    Returns
    -------
    G : (N, C * F) ``dtype`` with F = sum over levels of 2**level; the columns of
        codebook c are ``c * F + offset(level) + (code >> (depth - level))``, the
        levels in the order given
    """
    xp = backend.namespace(codes)
    N, C = codes.shape
    F = sum(2 ** int(l) for l in levels)
    G = xp.zeros((N, C * F), dtype=dtype)
    code = codes.astype(np.int64)
    rows = xp.arange(N)[:, None]
    base = (xp.arange(C, dtype=np.int64) * F)[None, :]
    off = 0
    for l in levels:
        G[rows, base + off + (code >> (int(depth) - int(l)))] = 1
        off += 2 ** int(l)
    return G


def path_sums(coef, C, depth, levels):
    """(C, K, P): every leaf's sum of the node coefficients ``coef`` (C * F, P) on its path
    (the LUT rows of a fit on :func:`path_onehot` columns)."""
    xp = backend.namespace(coef)
    K = 2 ** int(depth)
    F = sum(2 ** int(l) for l in levels)
    coef = coef.reshape(C, F, -1)
    out = xp.zeros((C, K, coef.shape[2]), dtype=coef.dtype)
    leaf = np.arange(K)
    off = 0
    for l in levels:
        out += coef[:, xp.asarray(off + (leaf >> (int(depth) - int(l))))]
        off += 2 ** int(l)
    return out


def _own_shift(code, Z, depth):
    """(N, P) float64: the change of row n's own-bucket mean of ``Z`` (N, P) when row n is
    left out; a bucket left empty falls back to its deepest ancestor node that keeps rows
    (what the fit on the other rows predicts there)."""
    xp = backend.namespace(code, Z)
    K = 2 ** int(depth)
    code = code.astype(np.int64)
    n, sums = bucket_sums(code, K, Z)
    cnt, mean = n[code], (sums / xp.maximum(n, 1)[:, None])[code]
    out = (mean - Z) / xp.maximum(cnt - 1, 1)[:, None]
    todo = cnt <= 1
    for l in range(int(depth) - 1, -1, -1):     # singletons: the nearest ancestor with rows
        if not bool(todo.any()):
            break
        node = code >> (int(depth) - l)
        n, sums = bucket_sums(node, 2 ** l, Z)
        ok = todo & (n[node] >= 2)
        fall = (sums[node] - Z) / xp.maximum(n[node] - 1, 1)[:, None] - mean
        out = xp.where(ok[:, None], fall, out)
        todo = todo & ~ok
    return out


def path_ridge_loo(codes, Z, depth, design, gammas, lams):
    """Leave-one-out residuals of the path-ridge LUT models, the prior refit without the row.

    For the fit of ``Y = sum_c Z_c`` on fixed codes: prior ``gamma * sum_c
    own_mean_c[codes_c] + (1 - gamma) * mean(Y)`` (own_mean_c: the bucket means of Z_c),
    plus the ridge fit of what it leaves on :func:`path_onehot` columns of ``design``
    (penalty ``reg = ridge_reg(lam, N, C, K)``; ``lam = inf``: the prior alone). Unlike
    :func:`ridge_loo`, the prior itself is left out with the row too: in buckets of two or
    three rows the row's own share of its bucket mean is what makes the leave-one-out
    error of a fixed prior optimistic. Exact (it equals N refits) by one eigendecomposition
    of the smaller of ``G G^T`` and ``G^T G``: row n's residual is ``(r_n - d_n - (H r)_n
    + (H D_n)_n) / (1 - H_nn)``, with r the residuals of the prior, H the ridge's hat
    matrix and D_n the change of every row's prior when row n is left out (nonzero in
    row n's buckets, and everywhere through the mean), d_n its value at row n.

    Parameters
    ----------
    codes : (N, C) uint8 or uint16 leaf codes (trees of ``depth`` levels)
    Z : (C, N, P) float64, every codebook's own partial product ``A_c @ B_c``
    design : "leaf" or "node" (see :func:`path_levels`)
    gammas : sequence of float in [0, 1]; lams : sequence of float >= 0 or inf

    Returns
    -------
    dict (gamma, lam) -> E (N, P) float64, row n's target less its prediction by the fit
    on the other rows
    """
    xp = backend.namespace(codes, Z)
    N, C = codes.shape
    K = 2 ** int(depth)
    levels = path_levels(design, depth)
    Y = Z.sum(axis=0)
    mu = Y.mean(axis=0)
    own = xp.zeros_like(Y)
    shift = xp.zeros_like(Y)          # sum over codebooks of the own-mean shifts at row n
    shifts = []
    for c in range(C):
        code = codes[:, c].astype(np.int64)
        n, sums = bucket_sums(code, K, Z[c])
        own += (sums / xp.maximum(n, 1)[:, None])[code]
        shifts.append(_own_shift(code, Z[c], depth))
        shift += shifts[-1]
    mshift = (mu - Y) / (N - 1)       # the mean row's shift at every row when n leaves
    G = path_onehot(codes, depth, levels)
    s, W, num = _hat_eig(G)
    W2 = W ** 2
    U = W.T @ onehot(codes, K, np.float64)        # (r, C K): W summed over each bucket
    u0 = W.sum(axis=0)                            # (r,): W summed over all rows
    idx = codes.astype(np.int64) + (xp.arange(C, dtype=np.int64) * K)[None, :]
    rows = xp.arange(N)[:, None]
    out = {}
    for lam in lams:
        if np.isfinite(lam):
            f = num / (s + ridge_reg(lam, N, C, K))
            Wf = W * f
            h = W2 @ f
            # (H D_n)_n: row n's hat row summed over its bucket of codebook c (each
            # codebook's own-mean shift) and over all rows (the mean's shift)
            Q = (Wf @ U)[rows, idx]                              # (N, C)
            HDl = sum(shifts[c] * Q[:, c:c + 1] for c in range(C))
            HDg = mshift * (Wf @ u0)[:, None]
        for g in gammas:
            r = Y - g * own - (1 - g) * mu
            dn = g * shift + (1 - g) * mshift
            if not np.isfinite(lam):
                out[(g, lam)] = r - dn
                continue
            Hr = Wf @ (W.T @ r)
            out[(g, lam)] = (r - dn - Hr + g * HDl + (1 - g) * HDg) / xp.maximum(1.0 - h, 1e-9)[:, None]
    return out


def path_ridge_fit(codes, X, starts, depth, design, gamma, lam):
    """Prototypes of a path-ridge LUT model (see :func:`path_ridge_loo`), in X's space.

    The fit is linear in its targets, so fitting the rows X (the clipped A) gives
    prototypes P with ``P @ B`` the fit against ``A @ B`` for any B.

    Parameters
    ----------
    codes : (N, C) leaf codes; X : (N, D) real; starts : (C + 1,) subspace boundaries
    design : "leaf" or "node"; gamma : float in [0, 1]; lam : float >= 0 or inf

    Returns
    -------
    P : (C, K, D) float32
    """
    xp = backend.namespace(codes, X)
    N, C = codes.shape
    K = 2 ** int(depth)
    D = X.shape[1]
    X = X.astype(np.float64)
    P0 = xp.zeros((C, K, D), dtype=np.float64)
    for c in range(C):
        s, e = int(starts[c]), int(starts[c + 1])
        n, sums = bucket_sums(codes[:, c], K, X[:, s:e])
        P0[c, :, s:e] = gamma * sums / xp.maximum(n, 1)[:, None]
    P0 += (1 - gamma) * X.mean(axis=0) / C
    if not np.isfinite(lam):
        return P0.astype(np.float32)
    R = X.copy()
    for c in range(C):
        R -= P0[c][codes[:, c].astype(np.int64)]
    levels = path_levels(design, depth)
    G = path_onehot(codes, depth, levels)
    reg = ridge_reg(lam, N, C, K)
    if N <= G.shape[1]:
        coef = G.T @ xp.linalg.solve(G @ G.T + reg * xp.eye(N), R)
    else:
        coef = xp.linalg.solve(G.T @ G + reg * xp.eye(G.shape[1]), G.T @ R)
    return (P0 + path_sums(coef, C, depth, levels)).astype(np.float32)
