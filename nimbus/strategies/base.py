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

NBUCKETS = 16           # K of every strategy at its default (depth-4 trees, 16 centroids)
# codes are uint8 up to depth 8 (256 leaves), uint16 up to depth 10 (1024 leaves)
MAX_DEPTH = kernels.reference.MAX_DEPTH


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

    def _prototypes_lut(self, B):
        P = self._learned("prototypes_", B)
        C, K, D = P.shape
        return (P.reshape(C * K, D) @ B).reshape(C, K, B.shape[1])
