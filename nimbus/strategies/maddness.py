"""MADDNESS (Blalock & Guttag, ICML 2021): hash trees + ridge prototypes + 8-bit LUTs."""
from __future__ import annotations

import numpy as np

from ..arrays import backend, validate
from ..arrays.validate import code_dtype
from ._lut import (LOO_GRID, MAX_DENSE_UNKNOWNS, bucket_means, is_small, onehot, ridge_loo,
                   ridge_on_codes, small_data_clip)
from ._trees import learn_tree, small_data_min_leaf, top_directions
from ._clip import winsorize
from .base import TreeStrategy, subspace_starts
from .._progress import progress_bar


def _reconstruction_sse(A, codes, P):
    """Training SSE of the rows rebuilt from their codes: ``||A - sum_c P[c, codes_c]||^2``."""
    R = A.astype(np.float64)
    for c in range(P.shape[0]):
        R -= P[c][codes[:, c].astype(np.int64)]
    return float((R ** 2).sum())


def learn_trees(X, starts, split="level", max_candidates=16, progress=None, depth=4,
                min_leaf=1):
    """One tree per subspace, each minimising the SSE of its own subspace's columns.

    Parameters
    ----------
    X : (N, D) float32
    starts : (C + 1,) int, subspace column boundaries
    progress : callable() called after each tree, optional
    depth : int in 1..10, levels of every tree
    min_leaf : int >= 1, fewest training rows on each side of a split

    Returns
    -------
    dims : (C, 2**depth - 1) int32, thresholds : (C, 2**depth - 1) float32 (both in
    X's library), codes : (N, C) uint8 training codes (uint16 beyond depth 8)
    """
    xp = backend.namespace(X)
    C = len(starts) - 1
    dims = np.zeros((C, 2 ** depth - 1), dtype=np.int32)
    thr = np.zeros((C, 2 ** depth - 1), dtype=np.float32)
    codes = xp.empty((X.shape[0], C), dtype=code_dtype(2 ** depth))
    for c in range(C):
        dims[c], thr[c], codes[:, c] = learn_tree(
            X, range(int(starts[c]), int(starts[c + 1])), None, split, max_candidates, depth,
            min_leaf=min_leaf)
        if progress is not None:
            progress()
    return xp.asarray(dims), xp.asarray(thr), codes


def refine_trees(X, starts, codes, prototypes, split="level", max_candidates=16, rank=32,
                 progress=None, depth=4, min_leaf=1):
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
    min_leaf : int >= 1, fewest training rows on each side of a split

    Returns
    -------
    dims : (C, K - 1) int32, thresholds : (C, K - 1) float32, codes : (N, C) uint8
    """
    xp = backend.namespace(X)
    C = len(starts) - 1
    codes = codes.copy()
    P = prototypes.astype(np.float32).copy()
    dims = np.zeros((C, 2 ** depth - 1), dtype=np.int32)
    thr = np.zeros((C, 2 ** depth - 1), dtype=np.float32)
    lookup = lambda c: P[c][codes[:, c].astype(np.int64)]  # noqa: E731
    R = X - sum(lookup(c) for c in range(C))          # the residual of all codebooks
    V = top_directions(R, rank) if X.shape[1] > 2 * rank else None
    for c in range(C):
        s, e = int(starts[c]), int(starts[c + 1])
        Rc = R + lookup(c)                             # what codebook c should explain
        T = Rc if V is None else xp.concatenate([Rc @ V, Rc[:, s:e]], axis=1)
        dims[c], thr[c], leaves = learn_tree(X, range(s, e), T, split, max_candidates, depth,
                                             min_leaf=min_leaf)
        codes[:, c] = leaves
        P[c] = bucket_means(leaves[:, None], Rc, 2 ** depth)[0]
        R = Rc - lookup(c)
        if progress is not None:
            progress()
    return xp.asarray(dims), xp.asarray(thr), codes


class Maddness(TreeStrategy):
    """MADDNESS: a hash tree per codebook, prototypes refined by ridge regression.

    Learning (per codebook c, on the columns of subspace c): level by level the
    tree splits every bucket at a threshold on one column, chosen to minimise the
    within-bucket SSE (the paper's heuristic: the candidate columns are those
    with the largest summed SSE). Prototypes are then refit jointly over all D
    columns by ridge regression on the one-hot codes, and ``LUT[c, k] =
    prototype[c, k] @ B``, quantized to 8 bits with one offset per codebook and
    one shared scale, summed exactly in int32.

    Beyond the paper: thresholds fall only between distinct values (integer
    pixels and ReLU zeros encode as they were learned), constant columns and
    one-row buckets are handled, D need not be a multiple of C, and
    ``split="node"`` lets every node choose its own column, and ``depth`` sets the
    trees' depth (the paper's 4: 16 buckets per codebook; deeper trees give 2**depth
    buckets, a finer partition of each subspace for a LUT 2**(depth-4) times as large,
    at the same lookup cost).

    Parameters
    ----------
    ncodebooks : int, C (1 <= C <= D)
    split : "level" (paper) or "node"
    depth : int in 1..10, levels of every tree (K = 2**depth buckets per codebook)
    ridge : "auto" (default) or float >= 0, ridge penalty relative to the mean bucket
        size, shrinking the all-column prototypes towards each codebook's plain bucket
        means; 0 is plain least squares. "auto": 1e-2 (the former default) from
        ``_lut.SMALL_ROWS`` (1000) training rows on; with fewer, the penalty of
        ``_lut.LOO_GRID`` with the least leave-one-out error (closed form,
        :func:`._lut.ridge_loo`; measured on ``A @ B`` when ``fit`` is given B, else on
        A; ``inf``, the bucket means themselves, is in the grid), so that the fit does
        not interpolate where N is near C * K. ``ridge_chosen_`` says which.
        Skipped when C * 2**depth exceeds 4096 (the step solves for
        all C*K prototypes at once): the prototypes are then the bucket means
    min_leaf : int >= 1 or None (default), fewest training rows on each side of a
        split; None: 1 (the paper's learner) from 1000 training rows on, and with
        fewer :func:`._trees.small_data_min_leaf`, ``max(2, min(N // (4 K), 8))``
        (floor 1 with subspaces of fewer than 4 columns); ``min_leaf_`` says which
    refine : int >= 0, passes of block coordinate descent over the trees after the
        first ridge fit (each tree relearned against what the other codebooks leave
        unexplained, over all D columns); a pass is kept only if it lowers the
        training reconstruction error
    clip : float in [0, 0.49], learn from training rows clipped per column to their
        clip and 1 - clip quantiles, so that heavy tails cannot make a bucket of
        a few extreme rows (0 turns it off); with fewer than 1024 training rows at
        least 2 rows a tail, ``max(clip, 2 / N)`` (``clip_`` says which)
    max_candidates : int, columns tried per tree level
    quantize : bool, 8-bit LUT (True) or float32 LUT
    random_state : unused by the learner (it is deterministic); kept for the interface
    verbose : bool, progress bar over codebooks

    Learned attributes
    ------------------
    n_features_in_ : D
    starts_ : (C+1,) int64 subspace boundaries
    dims_ : (C, K - 1) int32, thresholds_ : (C, K - 1) float32 (heap-ordered nodes)
    prototypes_ : (C, K, D) float32
    min_leaf_ : int, the leaf size the trees kept; clip_ : float, the clip used
    ridge_chosen_ : float, the ridge penalty used (``inf``: the bucket means; absent
        where the ridge step is skipped)
    lut_ : (C, K, M) float32; lut_q_, lut_scale_, lut_bias_ when quantized
    """

    name = "maddness"

    def __init__(self, ncodebooks=16, *, split="level", depth=4, ridge="auto", max_candidates=16,
                 refine=1, min_leaf=None, clip=1e-3, quantize=True, random_state=None,
                 verbose=False):
        super().__init__(ncodebooks, quantize=quantize, random_state=random_state)
        self.split = split
        self.depth = depth
        self.ridge = ridge
        self.max_candidates = max_candidates
        self.refine = refine
        self.min_leaf = min_leaf
        self.clip = clip
        self.verbose = verbose

    def _check_params(self):
        super()._check_params()
        validate.check_choice(self.split, "split", ("level", "node"))
        if self.ridge != "auto":
            validate.check_float(self.ridge, "ridge", lo=0.0)
        validate.check_int(self.max_candidates, "max_candidates", lo=1)
        validate.check_int(self.refine, "refine", lo=0)
        if self.min_leaf is not None:
            validate.check_int(self.min_leaf, "min_leaf", lo=1)
        validate.check_float(self.clip, "clip", 0.0, 0.49)

    def _fit(self, A, rng, B):
        N = A.shape[0]
        self.clip_ = (small_data_clip(self.clip, N) if is_small(N) and self.clip > 0
                      else self.clip)
        A = winsorize(A, self.clip_)
        C = self.ncodebooks
        self.starts_ = subspace_starts(A.shape[1], C)
        self.min_leaf_ = self._min_leaf(A.shape[0])
        with progress_bar(C, "maddness trees", self.verbose) as bar:
            dims, thr, codes = learn_trees(A, self.starts_, self.split, self.max_candidates,
                                           progress=bar.update, depth=self.depth,
                                           min_leaf=self.min_leaf_)
        P = self._ridge(codes, A, B)
        err = _reconstruction_sse(A, codes, P)
        for _ in range(self.refine):
            with progress_bar(C, "maddness refine", self.verbose) as bar:
                dims2, thr2, codes2 = refine_trees(A, self.starts_, codes, P, self.split,
                                                   self.max_candidates, progress=bar.update,
                                                   depth=self.depth, min_leaf=self.min_leaf_)
            P2 = self._ridge(codes2, A, B)
            err2 = _reconstruction_sse(A, codes2, P2)
            if err2 >= err:       # greedy trees on projected targets can lose: keep the better
                break
            dims, thr, codes, P, err = dims2, thr2, codes2, P2, err2
        self.dims_, self.thresholds_, self.prototypes_ = dims, thr, P

    def _min_leaf(self, N):
        """The leaf size for N training rows (see ``min_leaf``)."""
        if self.min_leaf is not None:
            return int(self.min_leaf)
        if not is_small(N):
            return 1
        widths = np.diff(subspace_starts(self.n_features_in_, self.ncodebooks))
        return small_data_min_leaf(N, self.nbuckets, int(widths.min()))

    def _ridge(self, codes, A, B=None):
        """Prototypes over all D columns, shrunk towards the plain bucket means of each
        codebook's own subspace (the paper's prototypes before its ridge step)."""
        K = self.nbuckets
        prior = bucket_means(codes, A, K)                            # (C, K, D)
        xp = backend.namespace(A)
        cols = xp.arange(A.shape[1])
        starts = xp.asarray(self.starts_)
        own = (cols[None, :] >= starts[:-1, None]) & (cols[None, :] < starts[1:, None])
        prior = prior * own[:, None, :]
        if codes.shape[1] * K > MAX_DENSE_UNKNOWNS:
            # the step would be the blockwise solve; the paper's prototypes before its
            # ridge step are kept instead
            return prior.astype(np.float32)
        lam = self.ridge
        if lam == "auto":
            lam = self._auto_ridge(codes, A, B, prior)
        self.ridge_chosen_ = float(lam)
        return ridge_on_codes(codes, A, lam, K, prior=prior)

    def _auto_ridge(self, codes, A, B, prior):
        """``ridge="auto"``: 1e-2 from SMALL_ROWS rows on; with fewer, the penalty of
        LOO_GRID of least leave-one-out error of the product (of A without B)."""
        if not is_small(A.shape[0]):
            return 1e-2
        K = self.nbuckets
        C = codes.shape[1]
        G = onehot(codes, K, np.float64)
        resid = A.astype(np.float64) - G @ prior.reshape(C * K, -1).astype(np.float64)
        errors = ridge_loo(codes, resid, K, LOO_GRID,
                           None if B is None else backend.like(B, A))
        return LOO_GRID[int(np.argmin(errors))]
