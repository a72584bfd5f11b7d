"""The Strategy base class: scikit-learn style parameters, a LUT, and apply.

A strategy approximates ``A @ B`` for a fixed ``B`` (D x M) and new rows ``A``
(N x D): ``encode`` maps rows to codes (N x C, uint8, one of K buckets per
codebook: K = 16 by default, ``2**depth`` for the tree strategies), ``lookup`` sums
LUT rows ``LUT[c, codes[n, c], :]``.

Conventions, as in scikit-learn: ``__init__`` only stores hyperparameters
(validated in ``fit``), learned state ends in ``_``, ``fit`` returns ``self``,
``random_state`` is resolved in ``fit``. Learned arrays live in the library
(NumPy or CuPy) of the data they were fitted on; applying the strategy to rows
of the other library converts them once, on purpose, and caches the copy, so
the output always follows ``A``.
"""
from __future__ import annotations

import inspect

import numpy as np

from ..arrays import backend, kernels, validate
from ._lut import NBUCKETS  # K at the default, defined in _lut (which imports nothing from here)

# codes are uint8 up to depth 8 (256 leaves), uint16 up to depth 10 (1024 leaves)
MAX_DEPTH = validate.MAX_DEPTH


def check_depth(depth):
    """The tree depth as an int in 1..10 (K = 2**depth leaves per codebook)."""
    return validate.check_int(depth, "depth", lo=1, hi=MAX_DEPTH)


def subspace_starts(D, C):
    """Column boundaries of C contiguous subspaces over D columns.

    Returns
    -------
    starts : (C + 1,) int64; subspace c is ``starts[c]:starts[c+1]``; widths
        differ by at most one, so D need not be a multiple of C.
    """
    if C > D:
        raise ValueError(f"ncodebooks={C} is larger than the number of columns D={D}; "
                         "each codebook needs at least one column")
    return np.round(np.linspace(0, D, C + 1)).astype(np.int64)


class NotFittedError(ValueError, AttributeError):
    """Raised when a strategy is used before ``fit`` (or before ``build_lut``)."""


class Strategy:
    """Base class of every strategy (see module docstring).

    Subclasses implement ``_fit(A, rng)`` (learn the hash and prototypes from
    rows), ``_encode(A)`` and ``_prototypes_lut(B)`` (the float LUT for a B).
    """

    name = None           # registry key, e.g. "maddness"
    needs_codes = True    # False for "exact", which multiplies instead

    def __init__(self, ncodebooks=16, *, quantize=True, random_state=None):
        self.ncodebooks = ncodebooks
        self.quantize = quantize
        self.random_state = random_state

    # ---------------------------------------------------------------- params
    @classmethod
    def _param_names(cls):
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind != p.VAR_KEYWORD]

    def get_params(self, deep=False):
        """Hyperparameters as a dict (scikit-learn convention)."""
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params):
        names = self._param_names()
        for k, v in params.items():
            if k not in names:
                raise ValueError(f"{type(self).__name__} has no parameter {k!r}; "
                                 f"parameters: {', '.join(names)}")
            setattr(self, k, v)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # how _set_lut quantizes LUTs to 8 bits by default ("shared" or "column")
    LUT_QUANTIZER = "shared"

    @property
    def nbuckets(self):
        """K, the buckets (LUT rows) per codebook: ``2**depth`` for tree strategies, else 16."""
        depth = getattr(self, "depth", None)
        return NBUCKETS if depth is None else 2 ** int(depth)

    def _check_params(self):
        validate.check_int(self.ncodebooks, "ncodebooks", lo=1)
        if "depth" in self._param_names():
            check_depth(self.depth)
        if not isinstance(self.quantize, (bool, np.bool_)):
            raise TypeError(f"quantize must be True or False, got {self.quantize!r}")

    # --------------------------------------------------------------- fitting
    def fit(self, A, B=None):
        """Learn the hash and prototypes from the rows of ``A``; with ``B``, the LUT too.

        Parameters
        ----------
        A : (N, D) array of real numbers (NumPy or CuPy); coerced to float32.
            N must be at least K (one row per bucket: 16, or 2**depth).
        B : (D, M) array, optional; the fixed right-hand matrix.

        Returns
        -------
        self
        """
        self._check_params()
        A = validate.as_matrix(A, "A", min_rows=self.nbuckets if self.needs_codes else 1)
        if B is not None:
            B = validate.as_matrix(B, "B")
            validate.check_inner(A, B)
        self._reset()
        rng = validate.random_state(self.random_state)
        self.n_features_in_ = int(A.shape[1])
        with backend.blas_single_thread(A):
            self._fit(A, rng, B)
        if B is not None:
            self.build_lut(B)
        return self

    def _reset(self):
        for k in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, k)
        self._cache = {}

    def _fit(self, A, rng, B):
        raise NotImplementedError

    def build_lut(self, B):
        """Make the LUT for a (new) ``B`` from the learned prototypes.

        Parameters
        ----------
        B : (D, M) array of real numbers; coerced to float32.
        """
        self._check_fitted("n_features_in_")
        B = validate.as_matrix(B, "B")
        if B.shape[0] != self.n_features_in_:
            raise ValueError(f"B has {B.shape[0]} rows but the strategy was fitted on "
                             f"{self.n_features_in_} columns")
        self.n_outputs_ = int(B.shape[1])
        self._use_B(B)
        return self

    def _use_B(self, B):
        """Store what applying needs for this (checked) B: here, its LUT."""
        self._set_lut(self._prototypes_lut(B))

    def _set_lut(self, lut, quantizer=None):
        """Store a float LUT (C, K, M) and, when ``quantize``, its 8-bit version.

        quantizer : "shared" (an offset per codebook, one scale: :func:`._lut.quantize_lut`)
            or "column" (an offset per codebook and column, a scale per column:
            :func:`._lut.quantize_lut_per_column`); the same lookup format either way.
            Default: the one this strategy used last (``lut_quantizer_``, kept when the
            LUT is re-quantized or saved), else the class's ``LUT_QUANTIZER``.
        """
        from ._lut import quantize_lut, quantize_lut_per_column
        q = quantizer or getattr(self, "lut_quantizer_", self.LUT_QUANTIZER)
        validate.check_choice(q, "quantizer", ("shared", "column"))
        self._cache = {}
        self.lut_ = lut.astype(np.float32)
        self.lut_quantizer_ = q
        if self.quantize:
            fn = quantize_lut if q == "shared" else quantize_lut_per_column
            self.lut_q_, self.lut_scale_, self.lut_bias_ = fn(self.lut_)
        else:
            for k in ("lut_q_", "lut_scale_", "lut_bias_"):
                self.__dict__.pop(k, None)

    def _prototypes_lut(self, B):
        raise NotImplementedError

    # -------------------------------------------------------------- applying
    def _check_fitted(self, attr="lut_"):
        if not hasattr(self, attr):
            what = "fit(A, B) or build_lut(B)" if attr == "lut_" else "fit(A)"
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call {what} first")

    def _learned(self, name, like):
        """Learned array ``name`` in the library/device of ``like`` (converted once, cached)."""
        arr = getattr(self, name)
        if type(arr) is np.ndarray and type(like) is np.ndarray:
            return arr                     # both on the host: the per-call common case
        where = backend.place(like)
        if backend.place(arr) == where:
            return arr
        key = (name,) + where
        hit = self._cache.get(key)
        if hit is None or hit[0] is not arr:
            hit = (arr, backend.like(arr, like))
            self._cache[key] = hit
        return hit[1]

    def _check_rows(self, A, check_finite=True):
        self._check_fitted("n_features_in_")
        # float16 stays float16 on the GPU (its kernels read it natively); NumPy widens it.
        # The encode kernels check NaN/Inf in their own pass over A (check_finite=False).
        A = validate.as_matrix(A, "A", allow_half=backend.is_cupy(A), check_finite=check_finite)
        if A.shape[1] != self.n_features_in_:
            raise ValueError(f"A has {A.shape[1]} columns but the strategy was fitted on "
                             f"{self.n_features_in_}")
        return A

    def encode(self, A, *, check_finite=True):
        """Bucket of each row in each codebook.

        Parameters
        ----------
        A : (N, D) array of real numbers (NumPy or CuPy), coerced to float32.
        check_finite : bool, raise ValueError on NaN/Inf in A (see :meth:`__call__`)

        Returns
        -------
        codes : (N, C) uint8 (uint16 for trees deeper than 8), same library and device as ``A``
        """
        with kernels.finite_checks(check_finite):
            return self._encode(self._check_rows(A, check_finite=check_finite and
                                                 not self.needs_codes))

    def lookup(self, codes):
        """Sum of LUT rows picked by ``codes``.

        Parameters
        ----------
        codes : (N, C) uint8 (uint16 when K > 256), values < K (as ``encode`` returns)

        Returns
        -------
        Y : (N, M) float32, same library as ``codes``
        """
        self._check_fitted("lut_")
        codes = validate.as_codes(codes, self.lut_.shape[0], self.lut_.shape[1])
        return self._lookup(codes)

    def _lookup(self, codes):
        if self.quantize:
            return kernels.lookup_q(codes, self._learned("lut_q_", codes),
                                    self._learned("lut_scale_", codes),
                                    self._learned("lut_bias_", codes))
        return kernels.lookup(codes, self._learned("lut_", codes))

    def __call__(self, A, *, check_finite=True):
        """Approximate ``A @ B``: ``lookup(encode(A))``.

        Parameters
        ----------
        A : (N, D) array of real numbers, coerced to float32.
        check_finite : bool (default True): raise ValueError if A holds NaN or Inf.
            False is for GPU inference loops: the check itself is fused into the encode
            kernel, but raising needs a device-to-host read that synchronises (0.2-0.3
            ms a call on an H100); without it the call only queues work. Rows with
            NaN/Inf then give meaningless outputs (the caller promises finite input).
            On the CPU the check is part of the encode pass and always runs.

        Returns
        -------
        Y : (N, M) float32, same library and device as ``A``
        """
        self._check_fitted("lut_")
        with kernels.finite_checks(check_finite):
            return self._apply(self._check_rows(A, check_finite=check_finite and
                                                not self.needs_codes))

    def _apply(self, A):
        """encode + lookup of checked rows; output dtype follows A (float16 stays float16).

        Subclasses may override with a fused kernel."""
        Y = self._lookup(self._encode(A))
        return Y if Y.dtype == A.dtype else Y.astype(A.dtype)

    # ------------------------------------------------------------ state I/O
    _nimbus_kind = "strategy"

    def to_state(self):
        """Everything needed to rebuild this strategy, for :func:`nimbus.save`.

        Returns
        -------
        meta : JSON-able dict (class name, hyperparameters, learned scalars)
        arrays : dict of NumPy arrays (learned arrays, copied to the host)
        """
        learned, arrays = {}, {}
        for k, v in vars(self).items():
            if not k.endswith("_") or k.startswith("_"):
                continue
            if backend.is_array(v):
                arrays[k] = backend.to_host(v)
            elif isinstance(v, (np.integer, np.floating)):
                learned[k] = v.item()
            elif isinstance(v, (bool, int, float, str, type(None))):
                learned[k] = v
            else:
                raise TypeError(f"learned attribute {k} of type {type(v).__name__} "
                                "cannot be saved")
        params = {k: (v if isinstance(v, (bool, int, float, str, type(None), list, tuple))
                      else None) for k, v in self.get_params().items()}
        meta = {"class": self.name, "params": params, "learned": learned,
                "arrays": sorted(arrays)}
        return meta, arrays

    @classmethod
    def from_state(cls, meta, arrays):
        """Inverse of :meth:`to_state` (arrays stay NumPy; CuPy rows convert them on use)."""
        obj = cls(**meta["params"])
        obj._reset()
        for k, v in meta["learned"].items():
            setattr(obj, k, v)
        for k in meta["arrays"]:
            setattr(obj, k, arrays[k])
        return obj

    @property
    def lut_bytes(self):
        """Bytes the LUT takes at inference (8-bit entries when quantized)."""
        self._check_fitted("lut_")
        return int(self.lut_.size * (1 if self.quantize else 4))

    # ============================================================ the protocol
    # What nn/, io, the CLI and the inference runtime use of a strategy, beyond fit /
    # encode / lookup / __call__. They never test a strategy's name or read its learned
    # attributes: a new strategy overrides what differs (docs/ARCHITECTURE.md).

    #: True for a strategy whose parameters train by backprop inside a network (DM)
    trainable = False

    @property
    def n_codebooks(self):
        """C as fitted (the LUT's first axis), else the ``ncodebooks`` asked for."""
        lut = getattr(self, "lut_", None)
        return int(lut.shape[0]) if lut is not None else self.ncodebooks

    def parameters(self):
        """Trainable Tensors (empty unless :attr:`trainable`)."""
        return []

    def optimizers(self, lr):
        """Optimizers for :meth:`parameters` at relative step ``lr`` (empty unless trainable)."""
        return []

    def forward(self, x):
        """The op on a Tensor ``x`` (N, D) -> Tensor (N, M), for networks.

        A hard strategy passes no gradient: asking for one (``x`` requires grad while
        gradients are on) raises ValueError. Trainable strategies override this."""
        from ..arrays.autograd import Tensor, is_grad_enabled
        if x.requires_grad and is_grad_enabled():
            raise ValueError(f"this {self.name!r} strategy is hard and passes no gradient, "
                             "but its input needs one; switch to a trainable strategy (dm) "
                             "or to exact to train through it")
        return Tensor(self(x.data))

    @classmethod
    def from_fitted(cls, other, A=None, **params):
        """A new strategy of this class that starts from the fitted strategy ``other``
        (e.g. a trainable one from a tree and LUT), or None when it cannot: the caller
        then fits it from rows. ``A``: the rows ``other`` saw, optional."""
        return None

    def harden(self, quantize=None):
        """The fast hard strategy for inference: this one, its LUT re-quantized when
        ``quantize`` (True: 8-bit, False: float) differs from its own; a trainable
        strategy returns a new hard one (None keeps its LUT's precision)."""
        if quantize is not None and bool(quantize) != bool(self.quantize):
            self._check_fitted("lut_")
            self.quantize = bool(quantize)
            self._set_lut(self.lut_)
        return self

    # folding (nimbus.nn.fold): what the strategy can absorb
    #: its output is a LUT sum, so a per-column affine map after it folds into the LUT
    folds_output_affine = True
    #: its encoder compares inputs with thresholds, so a ReLU before it folds in
    folds_input_relu = False

    def absorb_output_affine(self, a, b, bias=None):
        """Compose the output with ``(y + bias) * a + b`` per column, in place.

        Parameters
        ----------
        a, b : (M,) float32 (a BatchNorm's affine map, say); bias : (M,) float32 or None,
            a bias added before the map (the layer's own)

        With an 8-bit LUT (``Y = isum * scale + offset``) ``scale`` becomes ``scale * a``
        and ``offset`` ``(offset + bias) * a + b``: the 8-bit entries stay as they were.
        The float LUT is scaled by ``a`` and ``bias * a + b`` is added to codebook 0's rows.
        """
        self._check_fitted("lut_")
        xp = backend.namespace(self.lut_)
        a = backend.like(a, self.lut_).astype(np.float32)
        b = backend.like(b, self.lut_).astype(np.float32)
        M = self.lut_.shape[2]
        lb = (xp.zeros(M, dtype=np.float32) if bias is None
              else backend.like(bias, self.lut_).astype(np.float32))
        shift = (lb * a + b).astype(np.float32)
        lut = (self.lut_ * a[None, None, :]).astype(np.float32)
        lut[0] += shift[None, :]                  # every row of codebook 0: added exactly once
        self.lut_ = lut
        if getattr(self, "quantize", False):
            # compose with Y = isum * scale + offset directly, so the 8-bit entries (and
            # their rounding) stay exactly as they were
            self.lut_scale_ = (self.lut_scale_ * a).astype(np.float32)
            self.lut_bias_ = ((self.lut_bias_ + lb) * a + b).astype(np.float32)
        self._cache = {}

    def absorb_input_relu(self):
        """Make the encoder see ``relu(x)`` instead of ``x`` (in place); only where
        :attr:`folds_input_relu`."""
        raise ValueError(f"a {type(self).__name__} strategy cannot absorb a ReLU before it")

    def inference_spec(self):
        """What the compiled runtime needs to run this strategy (nimbus.nn.compile).

        Returns
        -------
        dict with ``"encoder"`` (the encoder's kind, e.g. ``"tree"``) and its arrays, and
        the 8-bit LUT: ``"lut"`` (C, K, M) uint8, ``"scale"`` (M,) float32, ``"bias"``
        (M,) float32, so that ``Y = float32(sum_c lut[c, code_c]) * scale + bias``.
        Arrays stay in the strategy's library.

        Raises
        ------
        ValueError when the strategy has no 8-bit LUT (not converted, or not int8).
        """
        raise ValueError(f"a {type(self).__name__} strategy has no inference form for the "
                         "compiled runtime")

    def _int8_lut(self):
        self._check_fitted("lut_")
        if self.trainable:
            raise ValueError(f"this {type(self).__name__} is still trainable: harden it to "
                             "int8 first (nn.convert's int8 stage, or layer.harden(quantize=True))")
        if not self.quantize or getattr(self, "lut_q_", None) is None:
            raise ValueError(f"this {type(self).__name__} has a float LUT: quantize it to int8 "
                             "first (nn.convert(..., int8=True) or harden(quantize=True))")
        return {"lut": self.lut_q_, "scale": self.lut_scale_, "bias": self.lut_bias_}

    # arrays and devices
    def learned_arrays(self):
        """{name: array} of the learned arrays that live on the data's device."""
        return {k: v for k, v in vars(self).items()
                if k.endswith("_") and not k.startswith("_") and k != "starts_"
                and backend.is_array(v)}

    def to(self, like):
        """Move the learned arrays to the library (and device) of array ``like``; self."""
        for k, v in self.learned_arrays().items():
            setattr(self, k, backend.like(v, like))
        self._cache = {}
        return self

    def copy(self, like=None):
        """An independent copy (through the saved state), its arrays where ``like`` is."""
        meta, arrays = self.to_state()
        out = type(self).from_state(meta, {k: np.array(v, copy=True) for k, v in arrays.items()})
        out._cache = {}
        return out if like is None else out.to(like)


class TreeStrategy(Strategy):
    """A strategy that encodes with hash trees (``dims_``, ``thresholds_``: (C, K-1)) and
    keeps prototypes in A's space (``prototypes_``: (C, K, D)): MADDNESS and joint
    bucketing share encoding, the 8-bit apply and the LUT ``prototypes @ B``."""

    def _encode(self, A):
        return kernels.encode_tree(A, self._learned("dims_", A), self._learned("thresholds_", A))

    def _apply(self, A):
        """encode + lookup of checked rows, output dtype = A.dtype. With an 8-bit LUT one
        op (on CuPy a fused kernel: codes stay on chip; float16 in, float16 out)."""
        if self.quantize:
            return kernels.encode_lookup_q(
                A, self._learned("dims_", A), self._learned("thresholds_", A),
                self._learned("lut_q_", A), self._learned("lut_scale_", A),
                self._learned("lut_bias_", A), out_dtype=A.dtype)
        return super()._apply(A)

    folds_input_relu = True

    def absorb_input_relu(self):
        """``relu(x) > t`` equals ``x > t`` for ``t >= 0`` and is always true for ``t < 0``:
        such thresholds become -inf, so the encoder sees relu(x) while reading x."""
        self._check_fitted("thresholds_")
        xp = backend.namespace(self.thresholds_)
        t = self.thresholds_
        self.thresholds_ = xp.where(t >= 0, t, np.float32(-np.inf)).astype(np.float32)
        self._cache = {}

    def inference_spec(self):
        """``{"encoder": "tree", "dims": (C, K-1) int32, "thresholds": (C, K-1) float32,
        "lut", "scale", "bias"}`` (see :meth:`Strategy.inference_spec`)."""
        spec = {"encoder": "tree", "dims": self.dims_, "thresholds": self.thresholds_}
        spec.update(self._int8_lut())
        return spec

    def _prototypes_lut(self, B):
        P = self._learned("prototypes_", B)
        C, K, D = P.shape
        return (P.reshape(C * K, D) @ B).reshape(C, K, B.shape[1])
