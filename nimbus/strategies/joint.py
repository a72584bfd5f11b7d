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

With few training rows (N < ``_lut.SMALL_ROWS`` = 1024; issue 17) the error is mostly
that of the LUT, not of the trees: C K M entries estimated from buckets of a few rows (on
bench_small at N = 50-200, the same trees with their LUT fitted on 2000 other rows have
2-85 % lower test NMSE).
So the fit tries several LUT models on two sets of trees and keeps one only where it is
shown to be better on rows it was not fitted on:

* trees: MADDNESS's at its defaults (learned on A alone) and this fit's start trees
  (step 1, then the refit of step 2; no passes: on a few hundred rows they fit noise);
* LUT models (:func:`._lut.path_ridge_loo`): a prior, ``gamma`` times each codebook's
  bucket means of its own partial product plus ``1 - gamma`` times the mean row, and a
  ridge fit of what the prior leaves over, either on the leaves (``lut_design_`` "leaf";
  at ``gamma = 1`` MADDNESS's own model) or on every node of every tree level
  ("node": a leaf's LUT row is the sum of the rows of the nodes on its path, so a leaf of
  a few rows borrows from its parent, and codebooks that see correlated columns share
  the work); ``gamma`` in ``LUT_GAMMAS``, penalty in ``LUT_LAMS``;
* every model is scored by the leave-one-out error of the product of every training row,
  in closed form and exact: the row is left out of the ridge fit *and* of the prior's
  bucket means (a bucket left empty falls back to its nearest ancestor with rows). With
  the prior held fixed, a row's own share of a bucket mean of two or three rows made that
  error optimistic, more so for some models than others;
* MADDNESS's own fit is the reference. A model on its trees replaces it if its error is
  lower by ``SELECT_Z_MADDNESS`` (2) standard errors of the row differences; a model on
  the joint trees replaces that winner only if lower by ``SELECT_MARGIN`` (5 %) of its
  error and by ``SELECT_Z`` (3) standard errors: trees learned on these rows' products
  flatter their own leave-one-out error (the trees are held fixed in it).

``choice_`` is "maddness" where MADDNESS's fit was kept as it is, else "joint";
``trees_`` and ``lut_design_``, ``lut_gamma_``, ``ridge_chosen_`` say which model;
``report()`` shows them, ``compare`` the choice. With few rows the leaf size and a clip of the
training columns also follow from N (:func:`._trees.small_data_min_leaf`,
:func:`._lut.small_data_clip`). From 1024 rows on none of this runs (the network
conversion's initial trees are fitted on 1347-8192 rows, unchanged).

The LUT is stored as prototypes in A's space, ``P = ridge(onehot(codes), A)``
(C, K, D): the ridge solution (and every LUT model above) is linear in its targets, so
``P @ B`` *is* the joint ridge refit against ``Y = A @ B``, and ``build_lut(B_new)`` gives the
least-squares LUT for any other B (for the trees learned with the first B).

The trees are ordinary MADDNESS trees (depth 4 by default; one column of the subspace and
one threshold per node; ``split="level"`` shares the column across a level,
``split="node"`` lets every node choose), so encoding uses the same kernels. They come
from the strategies' one tree learner, :func:`._trees.learn_tree` with
``search="binned"`` (leave-one-out gains on binned columns); the LUT refits from its one
ridge solver over codes, :class:`._lut.CodeRidge`. Thresholds fall only between
distinct training values and ``x == t`` goes left, in learning and encoding alike
(integer pixels, ReLU zeros).
"""
from __future__ import annotations

import numpy as np

from ..arrays import backend, kernels, validate
from .._progress import progress_bar
from ..arrays.validate import code_dtype
from ._clip import winsorize
from ._lut import (LOO_GRID, SMALL_ROWS, CodeRidge, bucket_sums, is_small, onehot,
                   path_ridge_fit, path_ridge_loo, ridge_loo, ridge_reg, small_data_clip)
from ._trees import bin_columns, learn_tree, small_data_min_leaf, top_directions
from .base import TreeStrategy, subspace_starts

# With few rows (N < SMALL_ROWS; needs SELECT_MIN_BUCKET_ROWS * K rows, 48 at K = 16) the
# LUT models tried on both sets of trees (_lut.path_ridge_loo): designs, prior weights
# gamma, penalties (relative to the mean bucket size, as _lut.ridge_reg)
SELECT_MIN_BUCKET_ROWS = 3
LUT_DESIGNS = ("leaf", "node")
LUT_GAMMAS = (0.0, 0.5, 1.0)
LUT_LAMS = (1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
# A model on MADDNESS's trees replaces MADDNESS's own fit if its leave-one-out error is
# lower by SELECT_Z_MADDNESS standard errors of the row differences; a model on the joint
# trees replaces that winner if lower by SELECT_MARGIN of its error and SELECT_Z standard
# errors (the joint trees were learned on these rows' products: their leave-one-out
# error, trees held fixed, flatters them)
SELECT_Z_MADDNESS = 2.0
SELECT_MARGIN = 0.05
SELECT_Z = 3.0


def _beats(e, ref, margin, z):
    """True if the row errors ``e`` (N,) are below ``(1 - margin)`` of ``ref`` (N,) on
    average by ``z`` standard errors of the row differences."""
    d = e - ref
    se = float(d.std(ddof=1)) / np.sqrt(len(d))
    return float(d.mean()) + z * se < -margin * float(ref.mean())


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
        sweeps instead of one dense solve (see :class:`._lut.CodeRidge`)
    refine : int >= 0, most block-coordinate passes in product space (0: the
        partial-product trees plus the joint ridge refit only)
    tol : float >= 0, stop the passes once one lowers the loss by less than
        this fraction
    ridge : "auto" (default) or float >= 0, ridge penalty of the joint LUT refit,
        relative to the mean bucket size (0: least squares with a tiny jitter). "auto":
        1e-2 from 1024 training rows on; with fewer, the penalty of ``_lut.LOO_GRID``
        (inf read as 1e4, the prior) with the least leave-one-out error of the refit on
        the start trees, and with ``select`` the penalty of the LUT model kept
        (``ridge_chosen_``)
    rank : int >= 1, dimensions the targets of a tree are projected to (their top
        principal directions) when M or the subspace width is larger; bounds
        the learning cost for wide B
    min_leaf : int >= 1 or None, fewest training rows on either side of a split;
        None: N // 500 (at least 1) from 1024 rows on, with fewer
        :func:`._trees.small_data_min_leaf` (``max(2, min(N // (4 K), 8))``, floor 1
        with subspaces of under 4 columns); ``min_leaf_`` says which. Splits are also scored by their
        leave-one-out SSE, so small leaves must pay for their noise.
    max_candidates : int >= 1 or None, columns searched per tree level when the
        subspace is wider (those whose within-bucket linear fit to the targets
        is best); None: all columns (the cost grows with D / C; on the
        Fashion-MNIST input layer, 49 columns a subspace, 32 candidates fitted
        as well as all 49)
    select : bool (default True), with fewer than 1024 training rows choose the trees and
        the LUT model by leave-one-out errors, MADDNESS's own fit the reference (module
        docstring). Needs 3 K rows (48 at depth 4); with K to 3 K rows the documented
        fallback is MADDNESS, unchecked (``selection_`` and ``report()`` say so). Fewer
        than K rows is a ValueError naming the minimum. False: the joint fit, unchecked
    quantize : bool, 8-bit LUT (True) or float32 LUT
    random_state : unused by the learners (they and the check are deterministic); kept
        for the interface
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
    choice_ : "maddness" (MADDNESS's fit, kept as it is) or "joint" (this strategy's
        model); selection_ : str, how it was chosen
    trees_ : "joint" or "maddness", whose trees (with few rows; absent in the fallback)
    lut_design_ : "maddness", "leaf" or "node", lut_gamma_ : float (absent for
        "maddness"): the LUT model kept with few rows (module docstring)
    cv_nmse_ : (2,) float64 host array, leave-one-out NMSE of the product of (the kept
        fit, MADDNESS's) over the training rows (NaN in the fallback; absent where no
        check ran)
    min_leaf_, ridge_chosen_ (and clip_ with few rows): the rules used
    train_loss_ is absent where MADDNESS's trees were kept.
    lut_ : (C, K, M) float32 = prototypes_ @ B; lut_q_, lut_scale_, lut_bias_
        (8-bit with an offset per codebook and output column and a scale per column,
        :func:`._lut.quantize_lut_per_column`: each column's step is set by its own
        range, which matters where a few columns of Y are much wider than the rest)
    """

    name = "joint"
    LUT_QUANTIZER = "column"

    def __init__(self, ncodebooks=16, *, split="node", depth=4, refine=20, tol=1e-3, ridge="auto",
                 rank=16, min_leaf=None, max_candidates=32, select=True, quantize=True,
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
        self.select = select
        self.verbose = verbose

    def _check_params(self):
        super()._check_params()
        validate.check_choice(self.split, "split", ("level", "node"))
        validate.check_int(self.refine, "refine", lo=0)
        validate.check_float(self.tol, "tol", lo=0.0)
        if self.ridge != "auto":
            validate.check_float(self.ridge, "ridge", lo=0.0)
        validate.check_int(self.rank, "rank", lo=1)
        if self.min_leaf is not None:
            validate.check_int(self.min_leaf, "min_leaf", lo=1)
        if self.max_candidates is not None:
            validate.check_int(self.max_candidates, "max_candidates", lo=1)
        if not isinstance(self.select, (bool, np.bool_)):
            raise TypeError(f"select must be True or False, got {self.select!r}")

    # ---------------------------------------------------------------- fitting
    def _fit(self, A, rng, B):
        if B is None:
            raise ValueError("joint bucketing learns its trees from the product A @ B: "
                             "call fit(A, B) with the (D, M) matrix B")
        N = A.shape[0]
        if not (self.select and is_small(N)):
            self._fit_joint(A, B, self.refine)
            self.choice_ = "joint"
            self.selection_ = ("off (select=False)" if not self.select else
                               f"none needed: N = {N} >= {SMALL_ROWS} rows")
            return
        self._fit_selected(A, B, rng)

    # ------------------------------------------------------- joint or maddness
    def _candidate(self, name):
        """An unfitted candidate of the check: "joint" (this joint fit without passes and
        without the check) or "maddness" (MADDNESS at its defaults, same C and depth)."""
        from .maddness import Maddness
        if name == "maddness":
            return Maddness(self.ncodebooks, depth=self.depth, quantize=self.quantize)
        params = self.get_params()
        params.update(refine=0, select=False, verbose=False)
        return Joint(**params)

    def _fit_selected(self, A, B, rng):
        """With few rows: MADDNESS's fit, then LUT models on its trees and on the joint
        trees, each kept only if it beats the fit before it on leave-one-out errors of the
        product, row against row (module docstring)."""
        N, K = A.shape[0], self.nbuckets
        B = backend.like(B, A)
        mad = self._candidate("maddness").fit(A, B)
        if N < SELECT_MIN_BUCKET_ROWS * K:
            # documented fallback: leaves of 2-3 rows leave no row to check a fit on
            self._keep_maddness(mad)
            self.selection_ = (f"fallback: {N} rows are too few to check the joint fit "
                               f"(it needs {SELECT_MIN_BUCKET_ROWS * K} = "
                               f"{SELECT_MIN_BUCKET_ROWS} K); MADDNESS, unchecked")
            self.cv_nmse_ = np.full(2, np.nan)
            return
        self._fit_joint(A, B, 0)
        Y = (A @ B).astype(np.float64)
        yss = max(float(((Y - Y.mean(axis=0)) ** 2).sum()), 1e-300)
        lam_mad = float(getattr(mad, "ridge_chosen_", np.inf))
        rows = self.lut_model_rows(mad, A, B, Y, ("leaf",), (1.0,), (lam_mad,))
        e_mad = rows[("leaf", 1.0, lam_mad)]
        # 1. LUT models on MADDNESS's trees against MADDNESS's own fit; 2. on the joint
        #    trees against the winner of 1, by a margin: trees learned on the product
        #    flatter their own leave-one-out error (the trees are held fixed)
        best = ("maddness", None, e_mad)
        for trees, op, margin, z in (("maddness", mad, 0.0, SELECT_Z_MADDNESS),
                                     ("joint", self, SELECT_MARGIN, SELECT_Z)):
            ref = best[2]
            for cfg, e in self.lut_model_rows(op, A, B, Y).items():
                if _beats(e, ref, margin, z) and float(e.sum()) < float(best[2].sum()):
                    best = (trees, cfg, e)
        trees, cfg, e_best = best
        self.cv_nmse_ = np.array([float(e_best.sum()), float(e_mad.sum())]) / yss
        self.selection_ = f"leave-one-out check ({N} rows < {SMALL_ROWS})"
        if cfg is None:
            self._keep_maddness(mad)
            self.trees_ = self.lut_design_ = "maddness"
            return
        if trees == "maddness":
            self._keep_maddness(mad)
        self.choice_ = "joint"          # joint's own model, on either set of trees
        self.trees_ = trees
        design, gamma, lam = cfg
        self.lut_design_, self.lut_gamma_, self.ridge_chosen_ = design, float(gamma), float(lam)
        Aw = winsorize(A, self.clip_)
        self.prototypes_ = path_ridge_fit(self.encode(Aw), Aw, self.starts_, self.depth,
                                          design, gamma, lam)

    def lut_model_rows(self, op, A, B, Y, designs=LUT_DESIGNS, gammas=LUT_GAMMAS,
                       lams=LUT_LAMS):
        """Leave-one-out errors of the LUT models on the fitted trees of ``op`` (this joint
        fit or a MADDNESS one), the prior refit without the row too
        (:func:`._lut.path_ridge_loo`).

        Parameters
        ----------
        op : fitted tree strategy with ``starts_``, ``clip_`` and trees of ``self.depth``
        A : (N, D) training rows; B : (D, M); Y : (N, M) float64, ``A @ B`` of the
            unclipped rows (the models are fit on the clipped rows, as the trees were)
        designs, gammas, lams : the models tried (see ``_lut.path_ridge_loo``)

        Returns
        -------
        dict (design, gamma, lam) -> (N,) float64 host array, each row's squared error of
        the product, summed over its M columns
        """
        xp = backend.namespace(A)
        Aw = winsorize(A, getattr(op, "clip_", 0.0))
        codes = op.encode(Aw)
        Bf = backend.like(B, A).astype(np.float64)
        X = Aw.astype(np.float64)
        C = codes.shape[1]
        Z = xp.stack([X[:, int(op.starts_[c]):int(op.starts_[c + 1])]
                      @ Bf[int(op.starts_[c]):int(op.starts_[c + 1])] for c in range(C)])
        off = Y - X @ Bf                 # the clip's own error, in every model's rows
        out = {}
        for design in designs:
            res = path_ridge_loo(codes, Z, self.depth, design, gammas, lams)
            for (g, lam), E in res.items():
                out[(design, g, lam)] = backend.to_host(((off + E) ** 2).sum(axis=1))
        return out

    def _keep_maddness(self, mad):
        self._adopt(mad)
        self.choice_ = "maddness"
        for k in ("train_loss_", "loo_nmse_"):      # the joint fit's, not kept
            if hasattr(self, k):
                delattr(self, k)

    def _adopt(self, op):
        """Take the trees and prototypes of a fitted MADDNESS ``op``."""
        for k in ("starts_", "dims_", "thresholds_", "prototypes_", "ridge_chosen_",
                  "min_leaf_", "clip_"):
            if hasattr(op, k):
                setattr(self, k, getattr(op, k))

    def report(self):
        """What the fit chose, as a dict: ``choice`` ("maddness": MADDNESS's fit as it is;
        "joint": this strategy's model), ``selection`` (how: leave-one-out check, fallback,
        or none needed); where the check ran, ``trees`` ("joint" or "maddness"),
        ``lut_model`` ("maddness" or ``{"design", "gamma", "ridge"}``) and ``cv_nmse``
        (leave-one-out NMSE of the product, ``{"kept", "maddness"}``); and the rules
        taken from N: ``min_leaf``, ``ridge``, ``clip``."""
        self._check_fitted("choice_")
        out = {"choice": self.choice_, "selection": self.selection_}
        if hasattr(self, "trees_"):
            out["trees"] = self.trees_
        if hasattr(self, "lut_design_"):
            out["lut_model"] = ("maddness" if self.lut_design_ == "maddness" else
                                {"design": self.lut_design_, "gamma": self.lut_gamma_,
                                 "ridge": self.ridge_chosen_})
        if hasattr(self, "cv_nmse_"):
            out["cv_nmse"] = {"kept": float(self.cv_nmse_[0]),
                              "maddness": float(self.cv_nmse_[1])}
        for k in ("min_leaf_", "ridge_chosen_", "clip_"):
            if hasattr(self, k):
                out[k[:-1] if k != "ridge_chosen_" else "ridge"] = getattr(self, k)
        return out

    def _fit_joint(self, A, B, refine):
        """The joint fit itself (steps 1-3 of the module docstring) with ``refine`` passes."""
        xp = backend.namespace(A)
        B = backend.like(B, A)
        self.starts_ = subspace_starts(A.shape[1], self.ncodebooks)
        N = A.shape[0]
        if is_small(N):
            # few rows: learn from columns clipped at 2 rows a tail (see Maddness.clip)
            self.clip_ = small_data_clip(0.0, N)
            A = winsorize(A, self.clip_)
        Y = (A @ B).astype(np.float32)
        binned = {}              # subspace -> bin_columns(A_c), shared by both paths
        # split="node": the per-level trees are node trees too, and the coordinate
        # descent from per-node greedy trees sometimes settles in a worse optimum
        # than from per-level ones, so both paths run and the lower training loss wins
        modes = ("node", "level") if self.split == "node" else ("level",)
        best = None
        with progress_bar(len(modes) * self.ncodebooks * (1 + refine), "joint trees",
                          self.verbose) as bar:
            for mode in modes:
                out = self._fit_path(A, B, Y, mode, binned, bar, refine)
                if best is None or out[-1] < best[-1]:
                    best = out
        history, dims, thr, ridge, self.ridge_chosen_, score = best
        self.min_leaf_ = self._min_leaf(A.shape[0])
        if is_small(A.shape[0]) and self.ridge == "auto":
            self.loo_nmse_ = score / max(float(((Y - Y.mean(axis=0)).astype(np.float64) ** 2).sum()), 1e-300)
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
            n, sums = bucket_sums(codes[:, c], K, A[:, s:e])
            out[c, :, s:e] = sums / xp.maximum(n, 1)[:, None]
        return out

    def _fit_path(self, A, B, Y, mode, binned, bar, refine):
        """Start + refine passes with trees of one split mode.

        Returns
        -------
        history : list of float, training loss after the start and each pass
        dims : (C, K - 1) int32 host, thresholds : (C, K - 1) float32 host,
        ridge : the final :class:`._lut.CodeRidge` (its ``codes`` are the training codes)
        """
        xp = backend.namespace(A)
        N = A.shape[0]
        C = self.ncodebooks
        starts = self.starts_
        y_ss = float(((Y - Y.mean(axis=0)).astype(np.float64) ** 2).sum())
        K = self.nbuckets
        small = is_small(N)
        lam = 1e-2 if self.ridge == "auto" else self.ridge
        reg = ridge_reg(lam, N, C, K)
        dims = np.zeros((C, K - 1), dtype=np.int32)
        thr = np.full((C, K - 1), np.inf, dtype=np.float32)
        codes = xp.empty((N, C), dtype=code_dtype(K))
        # a leaf of a few rows has a mean that heavy tails can throw far off
        min_leaf = self._min_leaf(N)

        def learn(c, T):
            s, e = int(starts[c]), int(starts[c + 1])
            if c not in binned:
                binned[c] = bin_columns(A[:, s:e])
            return learn_tree(A, range(s, e), T, mode, self.max_candidates, self.depth,
                              search="binned", min_leaf=min_leaf, binned=binned[c])

        def prior_of(c, leaves):
            # bucket means of the partial product A_c @ B_c: (K, M)
            s, e = int(starts[c]), int(starts[c + 1])
            n, sums = bucket_sums(leaves, K, A[:, s:e])
            return (sums / xp.maximum(n, 1)[:, None]) @ B[s:e].astype(np.float64)

        def block_fit(leaves, R, c):
            # min over this block's LUT rows L of ||R - L[leaves]||^2 + reg ||L - L0||^2:
            # L = (S + reg L0) / (n + reg); returns (loss less ||R||^2, L)
            n, sums = bucket_sums(leaves, K, R)
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
                Z = Z @ top_directions(Z, self.rank, dtype=np.float64)
            dims[c], thr[c], codes[:, c] = learn(c, Z)
            bar.update()
        # 2. joint ridge refit of all LUTs against Y
        ridge = CodeRidge(codes, Y, reg, prior_of, K)
        if small and self.ridge == "auto":
            # few rows: the penalty of least leave-one-out error on these trees, kept
            # for the passes (a fixed small penalty interpolates where N ~ C K)
            lam = self._loo_lam(codes, Y, ridge.prior)
            reg = ridge.reg = ridge_reg(lam, N, C, K)
        lut, recon = refit()
        history = [loss_of(lut, recon)]
        # 3. block-coordinate passes in product space; every step lowers the loss.
        # A joint refit after each tree (each C/32 trees for larger C, where the
        # (K C)^3 solve gets dear) lets the others adapt before the next tree:
        # fewer passes to converge, and a lower optimum, than one refit per pass.
        # (blockwise refits are sweeps over all codebooks: one per pass is enough)
        every = max(1, C // 32) if ridge.dense else C
        for done in range(refine):
            for c in range(C):
                own = lut[c][codes[:, c].astype(np.int64)]
                R = Y - recon + own                                    # tree c's job
                T = R if R.shape[1] <= self.rank else R @ top_directions(
                    R, self.rank, dtype=np.float64).astype(np.float32)
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
                bar.update(C * (refine - done - 1))
                break                       # converged: later passes change little
        # the path's score: its training loss, or with few rows the leave-one-out error
        # of its LUT refit (training losses at different penalties do not compare)
        score = history[-1]
        if small and self.ridge == "auto":
            score = float(self._loo_errors(codes, Y, ridge.prior, (lam,))[0])
        return history, dims, thr, ridge, lam, score

    def _min_leaf(self, N):
        """Fewest rows on either side of a split for N training rows (see ``min_leaf``)."""
        if self.min_leaf is not None:
            return int(self.min_leaf)
        if is_small(N):       # few rows (issue 17): leaves of a few rows are noise
            return small_data_min_leaf(N, self.nbuckets, int(np.diff(self.starts_).min()))
        return max(1, N // 500)

    # few rows: the penalty for a grid of LOO_GRID with inf replaced by LAM_PRIOR
    # (effectively the prior, which the solver cannot take as inf)
    LAM_PRIOR = 1e4

    def _loo_errors(self, codes, Y, prior, grid):
        """Leave-one-out errors of the LUT refit on ``codes`` for the penalties ``grid``."""
        K = self.nbuckets
        C = codes.shape[1]
        G = onehot(codes, K, np.float64)
        resid = Y.astype(np.float64) - G @ prior.reshape(C * K, -1)
        return ridge_loo(codes, resid, K, grid)

    def _loo_lam(self, codes, Y, prior):
        grid = tuple(lam if np.isfinite(lam) else self.LAM_PRIOR for lam in LOO_GRID)
        return grid[int(np.argmin(self._loo_errors(codes, Y, prior, grid)))]
