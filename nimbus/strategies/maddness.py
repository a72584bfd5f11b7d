"""MADDNESS (Blalock & Guttag, ICML 2021): hash trees + ridge prototypes + 8-bit LUTs."""
from __future__ import annotations

import numpy as np

from ..arrays import backend, validate
from ..arrays.validate import code_dtype
from ._lut import MAX_DENSE_UNKNOWNS, bucket_means, ridge_auto, ridge_on_codes
from ._trees import learn_tree, top_directions
from ._clip import winsorize
from .base import TreeStrategy, subspace_starts
from .._progress import progress_bar


def _reconstruction_sse(A, codes, P):
    """Training SSE of the rows rebuilt from their codes: ``||A - sum_c P[c, codes_c]||^2``."""
    R = A.astype(np.float64)
    for c in range(P.shape[0]):
        R -= P[c][codes[:, c].astype(np.int64)]
    return float((R ** 2).sum())


def learn_trees(X, starts, split="level", max_candidates=16, progress=None, depth=4):
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
    X's library), codes : (N, C) uint8 training codes (uint16 beyond depth 8)
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


def refine_trees(X, starts, codes, prototypes, split="level", max_candidates=16, rank=32,
                 progress=None, depth=4):
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
        dims[c], thr[c], leaves = learn_tree(X, range(s, e), T, split, max_candidates, depth)
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
    ridge : "auto" or float >= 0, ridge penalty relative to the mean bucket size,
        shrinking the all-column prototypes towards each codebook's plain bucket
        means; "auto" picks it from a grid on 20% held-out rows (never worse there
        than no ridge step at all; noisy on small training sets); 0 is plain
        least squares. Skipped when C * 2**depth exceeds 4096 (the step solves for
        all C*K prototypes at once): the prototypes are then the bucket means
    refine : int >= 0, passes of block coordinate descent over the trees after the
        first ridge fit (each tree relearned against what the other codebooks leave
        unexplained, over all D columns); a pass is kept only if it lowers the
        training reconstruction error
    clip : float in [0, 0.49], learn from training rows clipped per column to their
        clip and 1 - clip quantiles, so that heavy tails cannot make a bucket of
        a few extreme rows (0 turns it off)
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
    lut_ : (C, K, M) float32; lut_q_, lut_scale_, lut_bias_ when quantized
    """

    name = "maddness"

    def __init__(self, ncodebooks=16, *, split="level", depth=4, ridge=1e-2, max_candidates=16,
                 refine=1, clip=1e-3, quantize=True, random_state=None, verbose=False):
        super().__init__(ncodebooks, quantize=quantize, random_state=random_state)
        self.split = split
        self.depth = depth
        self.ridge = ridge
        self.max_candidates = max_candidates
        self.refine = refine
        self.clip = clip
        self.verbose = verbose

    def _check_params(self):
        super()._check_params()
        validate.check_choice(self.split, "split", ("level", "node"))
        if self.ridge != "auto":
            validate.check_float(self.ridge, "ridge", lo=0.0)
        validate.check_int(self.max_candidates, "max_candidates", lo=1)
        validate.check_int(self.refine, "refine", lo=0)
        validate.check_float(self.clip, "clip", 0.0, 0.49)

    def _fit(self, A, rng, B):
        A = winsorize(A, self.clip)
        C = self.ncodebooks
        self.starts_ = subspace_starts(A.shape[1], C)
        with progress_bar(C, "maddness trees", self.verbose) as bar:
            dims, thr, codes = learn_trees(A, self.starts_, self.split, self.max_candidates,
                                           progress=bar.update, depth=self.depth)
        P = self._ridge(codes, A, rng)
        err = _reconstruction_sse(A, codes, P)
        for _ in range(self.refine):
            with progress_bar(C, "maddness refine", self.verbose) as bar:
                dims2, thr2, codes2 = refine_trees(A, self.starts_, codes, P, self.split,
                                                   self.max_candidates, progress=bar.update,
                                                   depth=self.depth)
            P2 = self._ridge(codes2, A, rng)
            err2 = _reconstruction_sse(A, codes2, P2)
            if err2 >= err:       # greedy trees on projected targets can lose: keep the better
                break
            dims, thr, codes, P, err = dims2, thr2, codes2, P2, err2
        self.dims_, self.thresholds_, self.prototypes_ = dims, thr, P

    def _ridge(self, codes, A, rng):
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
        if self.ridge == "auto":
            P, self.ridge_chosen_ = ridge_auto(codes, A, prior, rng, nbuckets=K)
            return P
        return ridge_on_codes(codes, A, self.ridge, K, prior=prior)
