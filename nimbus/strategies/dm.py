"""Differentiable MADDNESS (DM): MADDNESS trees and LUT trained by backpropagation.

Forward is exactly the hard MADDNESS op: trees of depth d (4 by default) pick one of
K = 2**d LUT rows per codebook and the rows are summed. Backward uses surrogate
gradients:

* a node decision ``s = sign(x[dim] - t)`` passes gradient as
  ``tanh'((x - t) / tau) / tau`` to x and, negated, to t;
* leaf scores ``b = s @ P^T`` with the fixed K x (K-1) path matrix P (+1 right, -1
  left, 0 off path; never formed for deep trees: the kernels walk the tree); the
  forward's one-hot leaf is differentiated as ``softmax(b / T)``;
* the LUT gradient is the exact scatter-add of the output gradient.

No O(C^2) selection matrix and no N x M x C tensor is ever made: the node values
are gathered, P is shared by all trees, and the leaf gradients come from one
matmul ``grad_Y @ LUT_flat^T`` (kernels ``dm_forward`` / ``dm_backward``).

``tau`` is relative: each node uses ``tau * scale`` where ``scale`` is the standard
deviation of the node's column on the rows DM was initialised from, so one value
suits raw pixels and normalised activations alike.
"""
from __future__ import annotations

import numpy as np

from ..arrays import backend, kernels, validate
from ..arrays.autograd import Function, Tensor, is_grad_enabled, no_grad
from .base import TreeStrategy, subspace_starts


def patch_order(height, width, patch_height, patch_width, channels=1):
    """Column order that groups an image's pixels into patches, for ``column_order``.

    For inputs that are images flattened row-major as (channels, height, width), the
    permutation lists the pixels of each ``patch_height x patch_width`` patch (all
    channels) one patch after the other, patches row-major. With ``codebook_dim =
    channels * patch_height * patch_width`` every codebook then sees one patch.

    Returns
    -------
    (channels * height * width,) int64 NumPy array, a permutation
    """
    for name, v in (("height", height), ("width", width), ("patch_height", patch_height),
                    ("patch_width", patch_width), ("channels", channels)):
        validate.check_int(v, name, lo=1)
    if height % patch_height or width % patch_width:
        raise ValueError(f"a {patch_height} x {patch_width} patch does not tile a {height} x "
                         f"{width} image")
    idx = np.arange(channels * height * width).reshape(channels, height // patch_height,
                                                       patch_height, width // patch_width,
                                                       patch_width)
    return np.ascontiguousarray(idx.transpose(1, 3, 0, 2, 4)).reshape(-1).astype(np.int64)


class DMFunction(Function):
    """The DM op as an autograd Function: ``Y = DMFunction.apply(x, thresholds, lut, ...)``.

    Positional inputs (Tensors or raw arrays of one library):
    x : (N, D) float32; thresholds : (C, K-1) float32; lut : (C, K, M) float32.
    Keyword arguments (no gradient): dims : (C, K-1) int32; inv_tau : (C, K-1) float32
    (1 / tau per node); inv_temp : float (1 / T); factors : optional ``(proto, weight,
    cols, mask)`` of a factored LUT (see :class:`FactoredLUT`), which the backward may
    use for the leaf gradients (``kernels.dm_backward``).
    Output: Y (N, M) float32, exactly the hard trees + LUT sum.
    """

    @staticmethod
    def forward(ctx, x, thresholds, lut, *, dims, inv_tau, inv_temp, factors=None):
        codes, Y = kernels.dm_forward(x, dims, thresholds, lut)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, thresholds, lut, codes)
            ctx.dims, ctx.inv_tau, ctx.inv_temp = dims, inv_tau, inv_temp
            ctx.factors = factors
        return Y

    @staticmethod
    def backward(ctx, grad_Y):
        x, thresholds, lut, codes = ctx.saved
        need_a, need_t, need_lut = ctx.needs_input_grad
        return kernels.dm_backward(x, ctx.dims, thresholds, ctx.inv_tau, lut, codes, grad_Y,
                                   ctx.inv_temp, need_a=need_a, need_t=need_t, need_lut=need_lut,
                                   factors=ctx.factors)


class FactoredLUT(Function):
    """``lut[c] = proto[c] @ weight[cols[c]]``: a LUT made from prototypes in each
    codebook's input subspace and the layer's weights, as an autograd Function.

    Positional inputs: proto (C, K, w) float32; weight (D, M) float32.
    Keyword arguments (no gradient): cols (C, w) int64, the subspace's absolute
    columns (padded); mask (C, w) float32, 1 for real columns, 0 for padding.
    Output: lut (C, K, M) float32. Every column belongs to one codebook, so the
    weight gradient is a plain scatter of the per-codebook gradients.
    """

    @staticmethod
    def forward(ctx, proto, weight, *, cols, mask):
        Wg = weight[cols] * mask[:, :, None]                   # (C, w, M)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(proto, Wg)
            ctx.cols, ctx.mask, ctx.D = cols, mask, weight.shape[0]
        return proto @ Wg

    @staticmethod
    def backward(ctx, grad):
        proto, Wg = ctx.saved
        need_p, need_w = ctx.needs_input_grad
        g_proto = grad @ Wg.transpose(0, 2, 1) if need_p else None
        g_w = None
        if need_w:
            xp = backend.namespace(grad)
            gWg = (proto.transpose(0, 2, 1) @ grad) * ctx.mask[:, :, None]      # (C, w, M)
            g_w = xp.zeros((ctx.D, grad.shape[2]), dtype=np.float32)
            real = ctx.mask > 0
            g_w[ctx.cols[real]] = gWg[real]
        return g_proto, g_w


def _init_name(init):
    from . import REGISTRY
    if init == "auto":
        return "joint" if "joint" in REGISTRY else "maddness"
    if init not in ("joint", "maddness"):
        raise ValueError(f"init must be 'auto', 'joint' or 'maddness', got {init!r}")
    if init not in REGISTRY:
        raise ValueError(f"init={init!r} is not available (no such strategy registered)")
    return init


class DM(TreeStrategy):
    """Differentiable MADDNESS (see the module docstring).

    Parameters
    ----------
    ncodebooks : int, C (1 <= C <= D)
    tau : float > 0, width of the node surrogate, relative to each node column's
        standard deviation
    temperature : float > 0, T of the leaf softmax (in units of leaf scores,
        which differ by 2 per disagreeing node)
    init : "auto" (joint bucketing when available, else MADDNESS), "joint" or
        "maddness": the tree and LUT DM starts from
    split : "node" (every node picks its column: same encode cost, better fit) or
        "level", passed to the initial tree learner
    depth : int in 1..10, levels of the initial trees (K = 2**depth LUT rows per
        codebook; a DM made by :meth:`from_tree` takes its tree's depth)
    lut_form : "free" (every LUT entry is a parameter) or "factored" (the LUT is
        ``prototype @ weight``: K prototypes of each codebook's own w input columns,
        initialised to its leaves' input means, times a trainable copy of B's rows
        for those columns; C*K*w + D*M parameters instead of C*K*M, i.e. the layer
        trained on vector-quantized inputs. It regularises deep trees, whose free
        LUTs overfit. ``harden`` multiplies it out)
    init_params : dict, optional, more hyperparameters of the initial tree learner
        (e.g. ``{"refine": 0}`` for a faster MADDNESS fit)
    column_order : optional permutation of range(D) (list or array): which columns
        each codebook sees. The initial tree learner cuts ``A[:, column_order]``
        into C consecutive subspaces, so codebook c sees the columns
        ``column_order[starts_[c]:starts_[c + 1]]`` (e.g. 2 x 4 pixel patches of an
        image instead of 1 x 8 strips, see :func:`patch_order`). The trees store
        absolute column indices, so the order costs nothing at inference; None:
        the columns in their own order
    noise : float >= 0, training-time input noise: while DM trains (gradients on),
        Gaussian noise of ``noise`` times each column's standard deviation (on the
        rows DM was initialised from) is added to the inputs, so rows near a
        threshold visit both sides and neighbouring leaves learn consistent LUT
        rows (a data augmentation; evaluation and hard inference see no noise)
    epochs : int >= 0, epochs of standalone training in ``fit`` that minimise
        ``||A B - DM(A)||^2`` (0: ``fit`` only initialises; a NimbusLayer trains DM
        inside a network instead)
    lr : float > 0, Adam step of the standalone training, relative to the
        parameters' scales (see :meth:`param_scales`)
    batch_size : int, rows per standalone training step
    random_state : None, int or RandomState
    verbose : bool, progress bars

    Learned attributes
    ------------------
    n_features_in_ : D; n_outputs_ : M
    starts_ : (C + 1,) int64 subspace boundaries
    dims_ : (C, K-1) int32, thresholds_ : (C, K-1) float32 (heap-ordered nodes)
    node_scale_ : (C, K-1) float32, tau's unit per node
    lut_ : (C, K, M) float32 (trained in place by an optimizer; with
        ``lut_form="factored"`` the product of the next two, remade after training
        steps when the strategy is next applied)
    proto_ : (C, K, w) float32, weight_ : (D, M) float32 (``lut_form="factored"``
        only; w the widest subspace), cols_ : (C, w) int64 and colmask_ : (C, w)
        float32, the subspaces' columns
    init_ : str, the strategy DM was initialised from
    """

    name = "dm"
    trainable = True

    def __init__(self, ncodebooks=16, *, tau=0.5, temperature=1.0, init="auto", split="node",
                 depth=4, lut_form="free", init_params=None, column_order=None, noise=0.0,
                 epochs=0, lr=1e-2, batch_size=256, random_state=None, verbose=False):
        super().__init__(ncodebooks, quantize=False, random_state=random_state)
        self.tau = tau
        self.temperature = temperature
        self.init = init
        self.split = split
        self.depth = depth
        self.lut_form = lut_form
        self.init_params = init_params
        self.column_order = column_order
        self.noise = noise
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.verbose = verbose

    def _check_params(self):
        super()._check_params()
        validate.check_float(self.tau, "tau", 0.0, lo_open=True)
        validate.check_float(self.temperature, "temperature", 0.0, lo_open=True)
        _init_name(self.init)
        validate.check_choice(self.split, "split", ("level", "node"))
        validate.check_choice(self.lut_form, "lut_form", ("free", "factored"))
        if self.init_params is not None and not isinstance(self.init_params, dict):
            raise TypeError(f"init_params must be a dict or None, got {self.init_params!r}")
        validate.check_float(self.noise, "noise", lo=0.0)
        validate.check_int(self.epochs, "epochs", lo=0)
        validate.check_float(self.lr, "lr", 0.0, lo_open=True)
        validate.check_int(self.batch_size, "batch_size", lo=1)

    # ------------------------------------------------------------------ fitting
    def fit(self, A, B=None):
        """Initialise trees and LUT from rows ``A`` and weights ``B`` (then train if ``epochs``).

        Parameters
        ----------
        A : (N, D) array of real numbers (NumPy or CuPy), coerced to float32; N >= 2**depth
        B : (D, M) array of real numbers; required (the LUT is ``prototypes @ B``)

        Returns
        -------
        self
        """
        self._check_params()
        if B is None:
            raise ValueError("DM.fit needs B: the LUT is learned for a given weight matrix")
        A = validate.as_matrix(A, "A", min_rows=self.nbuckets)
        B = backend.like(validate.as_matrix(B, "B"), A)
        validate.check_inner(A, B)
        self._reset()
        rng = validate.random_state(self.random_state)
        order = self._order(A.shape[1])
        if order is None:
            tree = self._initial_tree(rng).fit(A, B)
        else:
            xp = backend.namespace(A)
            o = xp.asarray(order)
            tree = self._initial_tree(rng).fit(xp.ascontiguousarray(A[:, o]),
                                               xp.ascontiguousarray(B[o]))
            # back to absolute columns of A (trees index columns directly)
            tree.dims_ = o[xp.asarray(tree.dims_)].astype(np.int32)
        self._take_tree(tree, A)
        if self.lut_form == "factored":
            self._factor(A, B)
        if self.epochs:
            self.train(A, B, rng=rng)
        return self

    def _factor(self, A, B):
        """Prototypes (each leaf's mean of its codebook's own columns; empty leaves: the
        subspace mean) and a copy of B, for ``lut_form="factored"``."""
        from ._lut import bucket_means
        xp = backend.namespace(A)
        D = A.shape[1]
        order = self._order(D)
        order = np.arange(D) if order is None else order
        C, K = self.dims_.shape[0], self.nbuckets
        widths = np.diff(self.starts_)
        w = int(widths.max())
        cols = np.zeros((C, w), dtype=np.int64)
        mask = np.zeros((C, w), dtype=np.float32)
        for c in range(C):
            cols[c, :widths[c]] = order[self.starts_[c]:self.starts_[c + 1]]
            mask[c, :widths[c]] = 1.0
        self.cols_, self.colmask_ = xp.asarray(cols), xp.asarray(mask)
        codes = kernels.encode_tree(A, self.dims_, self.thresholds_)
        proto = xp.zeros((C, K, w), dtype=np.float32)
        for c in range(C):
            sub = A[:, self.cols_[c]] * self.colmask_[c][None, :]
            counts = xp.bincount(codes[:, c].astype(np.int64), minlength=K)
            means = bucket_means(codes[:, c:c + 1], sub, K)[0]
            proto[c] = xp.where((counts > 0)[:, None], means, sub.mean(axis=0)[None, :])
        self.proto_ = proto
        self.weight_ = xp.ascontiguousarray(B, dtype=np.float32).copy()
        self._lut_stale = True
        self._sync_lut()

    def _sync_lut(self):
        """``lut_ = proto_ @ weight_`` per codebook (``lut_form="factored"``) when the
        factors may have changed since it was last made (a training forward marks it:
        the optimizer step that follows changes them); else nothing."""
        if getattr(self, "proto_", None) is None or not getattr(self, "_lut_stale", True):
            return
        with no_grad():
            self.lut_ = FactoredLUT.apply(self.proto_, self.weight_, cols=self.cols_,
                                          mask=self.colmask_).data
        self._lut_stale = False
        self._cache = {}

    def _order(self, D):
        """The checked column order as an int64 host array, or None."""
        if self.column_order is None:
            return None
        order = backend.to_host(self.column_order)
        if order.ndim != 1 or order.dtype.kind not in "iu" or order.shape[0] != D or \
                not np.array_equal(np.sort(order), np.arange(D)):
            raise ValueError(f"column_order must be a permutation of range({D}) (the layer's "
                             f"input columns), got an array of shape {order.shape}")
        return order.astype(np.int64)

    def train(self, A, B, epochs=None, rng=None):
        """Standalone training: Adam on ``mean ||A B - DM(A)||^2 / mean ||A B||^2``.

        Parameters
        ----------
        A : (N, D) rows, B : (D, M) weights (the B DM was fitted with)
        epochs : int, default ``self.epochs``
        rng : RandomState for the shuffling (default from ``random_state``)

        Returns
        -------
        self
        """
        self._check_fitted("lut_")
        A = validate.as_matrix(A, "A")
        B = backend.like(validate.as_matrix(B, "B"), A)
        validate.check_inner(A, B)
        if B.shape[1] != self.n_outputs_:
            raise ValueError(f"B has {B.shape[1]} columns but the LUT has {self.n_outputs_}")
        epochs = self.epochs if epochs is None else validate.check_int(epochs, "epochs", lo=0)
        rng = validate.random_state(self.random_state) if rng is None else rng
        with backend.blas_single_thread(A):
            self._train_standalone(A, B, rng, epochs)
        return self

    def _initial_tree(self, rng):
        from . import REGISTRY
        name = _init_name(self.init)
        cls = REGISTRY[name]
        wanted = {"ncodebooks": self.ncodebooks, "quantize": False, "split": self.split,
                  "depth": self.depth, "random_state": rng, "verbose": self.verbose}
        names = cls._param_names()
        params = {k: v for k, v in wanted.items() if k in names}
        for k, v in (self.init_params or {}).items():
            if k not in names:
                raise ValueError(f"init_params: {name} has no parameter {k!r}; its parameters: "
                                 f"{', '.join(names)}")
            params[k] = v
        return cls(**params)

    @classmethod
    def from_tree(cls, tree, A=None, **params):
        """A DM that starts from a fitted tree strategy (MADDNESS or joint).

        Parameters
        ----------
        tree : fitted Strategy with ``dims_`` (C, K-1), ``thresholds_`` (C, K-1), ``lut_`` (C, K, M)
        A : (N, D) array, optional: rows that set each node's tau unit (column
            standard deviations); without it every unit is 1
        **params : DM hyperparameters (tau, temperature, ...)
        """
        for attr in ("dims_", "thresholds_", "lut_"):
            if not hasattr(tree, attr):
                raise TypeError(f"DM.from_tree needs a fitted tree strategy (maddness or joint) "
                                f"with a LUT; {type(tree).__name__} has no {attr}")
        K = int(tree.lut_.shape[1])
        if int(tree.dims_.shape[1]) != K - 1 or K & (K - 1):
            raise ValueError(f"DM.from_tree: a tree with {int(tree.dims_.shape[1])} nodes and "
                             f"{K} LUT rows is not a complete binary tree")
        depth = K.bit_length() - 1
        if params.get("depth", depth) != depth:
            raise ValueError(f"DM.from_tree: depth={params['depth']!r} was asked for, but the "
                             f"tree has depth {depth}")
        params["depth"] = depth
        dm = cls(ncodebooks=int(tree.dims_.shape[0]), **params)
        dm._check_params()
        dm._reset()
        if A is not None:
            A = validate.as_matrix(A, "A")
            A = backend.like(A, tree.dims_)
        dm._take_tree(tree, A)
        return dm

    @classmethod
    def from_fitted(cls, other, A=None, **params):
        """:meth:`from_tree` when ``other`` is a fitted hard tree strategy with a LUT (the
        protocol's hook: a layer switching to DM starts from its tree), else None."""
        if other is None or other.trainable or \
                not all(hasattr(other, a) for a in ("dims_", "thresholds_", "lut_")):
            return None
        return cls.from_tree(other, A, **params)

    def _take_tree(self, tree, A):
        """Copy the tree and float LUT of ``tree``; node scales from rows ``A`` (or 1)."""
        xp = backend.namespace(tree.lut_)
        self.n_features_in_ = int(tree.n_features_in_)
        self.n_outputs_ = int(tree.lut_.shape[2])
        C = int(tree.dims_.shape[0])
        starts = getattr(tree, "starts_", None)
        self.starts_ = (np.asarray(backend.to_host(starts), dtype=np.int64) if starts is not None
                        else subspace_starts(self.n_features_in_, C))
        self.dims_ = xp.ascontiguousarray(xp.asarray(tree.dims_), dtype=np.int32).copy()
        self.thresholds_ = xp.ascontiguousarray(xp.asarray(tree.thresholds_),
                                                dtype=np.float32).copy()
        self.lut_ = xp.ascontiguousarray(tree.lut_, dtype=np.float32).copy()
        if A is not None:
            std = A.std(axis=0).astype(np.float32)
            floor = np.float32(1e-3) * std.mean() + np.float32(1e-12)    # constant columns
            self.col_scale_ = xp.ascontiguousarray(xp.maximum(std, floor), dtype=np.float32)
            self.node_scale_ = self.col_scale_[self.dims_]
        else:
            self.col_scale_ = xp.ones(self.n_features_in_, dtype=np.float32)
            self.node_scale_ = xp.ones(self.dims_.shape, dtype=np.float32)
        self.node_scale_ = xp.ascontiguousarray(self.node_scale_, dtype=np.float32)
        self.init_ = getattr(tree, "name", type(tree).__name__)
        self._tensors = None

    def build_lut(self, B):
        raise NotImplementedError("DM learns its LUT for the B it was fitted with; fit again "
                                  "(or start from a tree strategy with DM.from_tree) for a new B")

    # ------------------------------------------------------------- autograd
    def _param_arrays(self):
        if getattr(self, "proto_", None) is not None:
            return (self.thresholds_, self.proto_, self.weight_)
        return (self.thresholds_, self.lut_)

    def parameters(self):
        """The trainable tensors: ``[thresholds (C, K-1), lut (C, K, M)]``, or with
        ``lut_form="factored"`` ``[thresholds, proto (C, K, w), weight (D, M)]``.

        They share memory with ``thresholds_`` and ``lut_`` (``proto_``, ``weight_``):
        an optimizer's in-place update changes the strategy. The same Tensor objects
        are returned until the arrays are replaced (for instance by moving the
        strategy to another device).
        """
        self._check_fitted("lut_")
        arrays = self._param_arrays()
        t = getattr(self, "_tensors", None)
        if t is None or len(t) != len(arrays) or any(a.data is not b for a, b in zip(t, arrays)):
            t = tuple(Tensor(a, requires_grad=True) for a in arrays)
            self._tensors = t
        return list(t)

    def param_scales(self):
        """Typical magnitudes (floats) of the parameters, in :meth:`parameters` order.

        Adam moves every parameter by about ``lr`` per step whatever its units, so
        trainers multiply a relative learning rate by these: the mean node scale
        (column standard deviation) for the thresholds and the prototypes, the
        standard deviation of the LUT or of the weight copy for those.
        """
        self._check_fitted("lut_")
        thr = float(self.node_scale_.mean())
        if getattr(self, "proto_", None) is not None:
            return thr, float(self.col_scale_.mean()), float(self.weight_.std()) or 1.0
        return thr, float(self.lut_.std()) or 1.0

    def optimizers(self, lr):
        """One Adam per trainable parameter, ``lr`` scaled by :meth:`param_scales`
        (parameters whose ``requires_grad`` is off are left out)."""
        from ..arrays.optim import Adam
        return [Adam([p], lr=lr * s) for p, s in zip(self.parameters(), self.param_scales())
                if p.requires_grad]

    def inv_tau(self):
        """(C, K-1) float32: ``1 / (tau * node_scale_)``, per node."""
        return (np.float32(1.0) / (np.float32(self.tau) * self.node_scale_)).astype(np.float32)

    def forward(self, x):
        """The DM op on a Tensor ``x`` (N, D): a Tensor (N, M) with surrogate gradients
        to x, the thresholds and the LUT."""
        self._check_fitted("lut_")
        params = self.parameters()
        thr = params[0]
        training = is_grad_enabled() and any(p.requires_grad for p in params)
        self._cache = {}          # the LUT changes in place while training: drop device copies
        if len(params) == 2:
            lut = params[1]
        elif training:            # factored: the LUT is made from the prototypes and weights
            lut = FactoredLUT.apply(params[1], params[2], cols=self.cols_, mask=self.colmask_)
            self.lut_ = lut.data
            self._lut_stale = True            # the optimizer step that follows moves them
        else:                     # frozen factors: the product made last time
            self._sync_lut()
            lut = self.lut_
        # factored: the backward may make the leaf gradients through the factors
        factors = ((self.proto_, self.weight_, self.cols_, self.colmask_) if len(params) == 3
                   else None)
        if self.noise and training:
            x = x + self._noise_like(x)
        return DMFunction.apply(x, thr, lut, dims=self.dims_, inv_tau=self.inv_tau(),
                                inv_temp=1.0 / float(self.temperature), factors=factors)

    def _noise_like(self, x):
        """(N, D) float32 Gaussian noise, ``noise * col_scale_`` per column, x's library."""
        lib = backend.library_name(x.data)
        gen = getattr(self, "_noise_gen", None)
        if gen is None or gen[0] != lib:          # drawn in x's library: no per-step transfer
            seed = validate.random_state(self.random_state).randint(2 ** 31)
            gen = self._noise_gen = (lib, backend.normal_sampler(seed, x.data))
        z = gen[1](x.shape)
        scale = getattr(self, "col_scale_", None)          # absent in models saved before it
        if scale is None:
            return z * np.float32(self.noise)
        z *= backend.like(scale, x.data)[None, :] * np.float32(self.noise)
        return z

    # ------------------------------------------------------------- applying
    def _lookup(self, codes):
        self._sync_lut()
        return kernels.lookup(codes, self._learned("lut_", codes))

    def _apply(self, A):
        self._sync_lut()
        _, Y = kernels.dm_forward(A, self._learned("dims_", A), self._learned("thresholds_", A),
                                  self._learned("lut_", A))
        return Y if Y.dtype == A.dtype else Y.astype(A.dtype)

    def to_state(self):
        self._sync_lut()                  # the saved LUT is the factored one's product
        return super().to_state()

    def harden(self, quantize=None):
        """A plain :class:`~nimbus.strategies.Maddness` with the trained trees and LUT.

        Its output equals this DM's forward exactly (``quantize=False`` or None: the float
        LUT), or with the LUT in 8 bits (``quantize=True``: an offset per codebook and
        column, a scale per column, exact integer sums). It has no prototypes: a LUT for
        another B needs a new fit.
        """
        from .maddness import Maddness
        self._check_fitted("lut_")
        self._sync_lut()
        xp = backend.namespace(self.lut_)
        depth = int(self.lut_.shape[1]).bit_length() - 1
        level = all(bool((self.dims_[:, 2 ** l - 1:2 ** (l + 1) - 1]
                          == self.dims_[:, 2 ** l - 1:2 ** l]).all()) for l in range(depth))
        m = Maddness(ncodebooks=self.ncodebooks, split="level" if level else "node",
                     depth=depth, quantize=bool(quantize), random_state=self.random_state)
        m._reset()
        m.n_features_in_ = self.n_features_in_
        m.n_outputs_ = self.n_outputs_
        m.starts_ = np.array(self.starts_, dtype=np.int64)
        m.dims_ = xp.array(self.dims_, dtype=np.int32, copy=True)
        m.thresholds_ = xp.array(self.thresholds_, dtype=np.float32, copy=True)
        # per-column steps (never coarser than the shared scale; the same format): deep
        # or trained LUTs have columns of very different ranges
        m._set_lut(xp.array(self.lut_, dtype=np.float32, copy=True), quantizer="column")
        return m

    # ------------------------------------------------------------- standalone
    def _train_standalone(self, A, B, rng, epochs):
        """Adam on ``mean ||A B - DM(A)||^2 / mean ||A B||^2`` over shuffled batches."""
        from .._progress import progress_bar
        xp = backend.namespace(A)
        Y = A @ B
        denom = float((Y * Y).mean()) or 1.0
        opts = self.optimizers(self.lr)
        N = A.shape[0]
        bs = min(self.batch_size, N)
        with progress_bar(epochs, "dm standalone", self.verbose) as bar:
            for _ in range(epochs):
                perm = xp.asarray(rng.permutation(N))
                for s in range(0, N, bs):
                    idx = perm[s:s + bs]
                    for opt in opts:
                        opt.zero_grad()
                    diff = self.forward(Tensor(A[idx])) - Y[idx]
                    loss = (diff * diff).mean() * (1.0 / denom)
                    loss.backward()
                    for opt in opts:
                        opt.step()
                bar.update()
