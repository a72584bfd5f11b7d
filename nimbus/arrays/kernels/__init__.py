"""The kernel op table: one entry per hot loop, dispatched by array type.

This module is the only place that picks an implementation by array library:

* NumPy arrays go to :mod:`.cpu` (Numba);
* CuPy arrays go to :mod:`.cuda` (RawKernels), falling back to the plain-array
  :mod:`.reference` for any op that module does not provide;
* :mod:`.reference` is also the test oracle.

Ops (shapes and semantics in :mod:`.reference`):
``encode_tree``, ``encode_pq``, ``lookup``, ``lookup_q``, ``lookup_backward``.

Trees have any depth d in 1..10, read from the width of ``dims``: (C, K-1) with
K = 2**d leaves (:func:`.reference.tree_depth`; another width raises ValueError);
LUTs are (C, K, M) with K read from ``lut.shape[1]``. Codes are uint8 up to depth 8
(K <= 256) and uint16 beyond (:func:`.reference.code_dtype`). The Numba kernels take
both. On CuPy, ops on wider codes (trees of depth 9-10, LUTs of K > 256; see
:func:`_wide`) go to the depth-templated kernels of :mod:`.dm_cuda` (encode, float and
8-bit lookups, LUT scatter-add, for K a power of two; the reference otherwise): the
byte-tuned kernels of :mod:`.cuda` take byte codes only.
"""
from __future__ import annotations

import importlib
import threading

import numpy as np

from .. import backend, validate
from . import reference

OPS = ("encode_tree", "encode_pq", "lookup", "lookup_q", "lookup_backward", "encode_lookup_q")

_modules = {}


def _module(lib):
    if lib not in _modules:
        name = "cpu" if lib == "numpy" else "cuda"
        try:
            _modules[lib] = importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            if lib == "numpy":
                raise
            _modules[lib] = None          # no RawKernels: the reference runs on CuPy
    return _modules[lib]


def _wide(dims=None, codes=None, nbuckets=None):
    """True for trees, codes or LUTs beyond a byte (depth > 8, uint16 codes, K > 256): the
    kernels of :mod:`.cuda` write and read uint8 codes, so on CuPy these go elsewhere
    (:func:`_wide_gpu`)."""
    if dims is not None and int(dims.shape[1]) > (1 << reference.BYTE_DEPTH) - 1:
        return True
    if codes is not None and codes.dtype == np.uint16:
        return True
    return nbuckets is not None and int(nbuckets) > 1 << reference.BYTE_DEPTH


# ops on wide codes that dm_cuda serves on CuPy (its kernels are templated on the depth)
_WIDE_GPU = {"encode_tree": "encode", "lookup": "lookup", "lookup_q": "lookup_q",
             "lookup_backward": "lut_grad"}


def _wide_gpu(op, K):
    """For CuPy arrays beyond a byte: the dm_cuda function serving ``op`` with K leaves (a
    power of two), else the reference."""
    mod = _dm_gpu() if op in _WIDE_GPU and int(K) & (int(K) - 1) == 0 else None
    return getattr(mod, _WIDE_GPU[op]) if mod is not None else getattr(reference, op)


def implementation(op, *arrays):
    """The function that runs ``op`` for arrays of this library."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    lib = backend.library_name(arrays[0]) if arrays else "numpy"
    mod = _module(lib)
    fn = getattr(mod, op, None) if mod is not None else None
    return fn if fn is not None else getattr(reference, op)


_state = threading.local()


def finite_checks_enabled():
    """Whether the encode ops check A for NaN/Inf in this thread (default True)."""
    return getattr(_state, "check", True)


class finite_checks:
    """Context manager: ``with finite_checks(False):`` the encode ops of this thread skip
    their NaN/Inf check of A where skipping saves time.

    On the GPU the check is fused into the encode kernel but raising needs one
    device-to-host read of a flag, which synchronises the host with the device (0.2-0.3
    ms a call on an H100); without it a call only queues its kernels. Non-finite rows
    then get meaningless codes: the caller promises finite input. On the CPU the Numba
    encoders check in the pass that reads A anyway, so they still raise; a separate
    check pass (reference fallbacks) is skipped.
    """

    def __init__(self, enabled):
        if not isinstance(enabled, (bool, np.bool_)):
            raise TypeError(f"check_finite must be True or False, got {enabled!r}")
        self.enabled = bool(enabled)

    def __enter__(self):
        self._prev = finite_checks_enabled()
        _state.check = self.enabled
        return self

    def __exit__(self, *exc):
        _state.check = self._prev
        return False


def _checked(op, A, fn=None):
    """The implementation of an encode op (or ``fn``), preceded by a NaN/Inf check of A
    unless the implementation does that check itself in its own pass over A (or checks
    are off, see :class:`finite_checks`)."""
    fn = fn or implementation(op, A)
    mod = _module(backend.library_name(A))
    if mod is not None and fn is getattr(mod, op, None) and \
            op in getattr(mod, "FUSED_FINITE_CHECK", ()):
        if not finite_checks_enabled() and backend.is_cupy(A):
            return lambda *args: fn(*args, check_finite=False)     # no flag read, no sync
        return fn
    if not finite_checks_enabled():
        return fn
    return lambda *args: (validate.finite_or_raise(A, "A"), fn(*args))[1]


def encode_tree(A, dims, thresholds):
    """(N, D) float32, (C, K-1) int32, (C, K-1) float32 -> (N, C) codes (0..K-1): uint8,
    or uint16 for trees deeper than 8.

    K = 2**d with the depth d in 1..10 read from dims' width. Raises ValueError if A
    holds NaN or Inf, or if dims' width is not 2**d - 1."""
    if _wide(dims=dims) and backend.is_cupy(A):
        fn = _wide_gpu("encode_tree", int(dims.shape[1]) + 1)
        if fn is reference.encode_tree:    # the reference checks A for NaN/Inf itself
            return fn(A, dims, thresholds)
        return _checked("encode_tree", A, fn)(A, dims, thresholds)
    return _checked("encode_tree", A)(A, dims, thresholds)


def encode_pq(A, centroids, starts):
    """(N, D) float32, (C, K, W) float32, (C+1,) int -> (N, C) uint8 codes.

    Raises ValueError if A holds NaN or Inf."""
    return _checked("encode_pq", A)(A, centroids, starts)


def encode_lookup_q(A, dims, thresholds, lut_q, scale, bias, out_dtype=np.float32):
    """MADDNESS apply in one op: ``lookup_q(encode_tree(A, dims, thresholds), ...)``.

    (N, D) float32 (float16 on the GPU), (C, K-1) int32, (C, K-1) float32, (C, K, M) uint8,
    (M,), (M,) -> (N, M) ``out_dtype`` (float32 or float16), K = 2**d. On CuPy one fused kernel
    (codes stay in shared memory). Raises ValueError if A holds NaN or Inf."""
    if _wide(dims=dims) and backend.is_cupy(A):
        Y = lookup_q(encode_tree(A, dims, thresholds), lut_q, scale, bias)
        return Y.astype(out_dtype, copy=False)
    return _checked("encode_lookup_q", A)(A, dims, thresholds, lut_q, scale, bias, out_dtype)


def lookup(codes, lut):
    """(N, C) uint8 or uint16, (C, K, M) float32 (K in 1..1024) -> (N, M) float32 sums of
    LUT rows."""
    if _wide(codes=codes, nbuckets=lut.shape[1]) and backend.is_cupy(codes):
        return _wide_gpu("lookup", lut.shape[1])(codes, lut)
    return implementation("lookup", codes)(codes, lut)


def lookup_q(codes, lut_q, scale, bias):
    """(N, C) uint8 or uint16, (C, K, M) uint8 (K in 1..1024), (M,), (M,) -> (N, M) float32, exact
    integer sums."""
    if _wide(codes=codes, nbuckets=lut_q.shape[1]) and backend.is_cupy(codes):
        return _wide_gpu("lookup_q", lut_q.shape[1])(codes, lut_q, scale, bias)
    return implementation("lookup_q", codes)(codes, lut_q, scale, bias)


def lookup_backward(codes, grad_Y, nbuckets=16):
    """(N, C) uint8 or uint16, (N, M) float32 -> (C, K, M) float32 scatter-add of grad
    rows, K = ``nbuckets`` in 1..1024 (codes >= K add nothing)."""
    if _wide(codes=codes, nbuckets=nbuckets) and backend.is_cupy(codes):
        reference.check_nbuckets(nbuckets)
        return _wide_gpu("lookup_backward", nbuckets)(codes, grad_Y, nbuckets)
    return implementation("lookup_backward", codes)(codes, grad_Y, nbuckets)


# ---------------------------------------------------------------- differentiable MADDNESS
# Appended ops (the ops above are unchanged). NumPy: the Numba encode/lookup/
# lookup_backward kernels above plus the fused Numba node backward of dm_cpu; CuPy: the
# RawKernels of dm_cuda, or the plain-xp oracle dm_reference when they are absent.
DM_OPS = ("dm_forward", "dm_backward")
_dm_gpu_module = None       # dm_cuda once imported; False if it cannot be


def _dm_gpu():
    global _dm_gpu_module
    if _dm_gpu_module is None:
        try:
            _dm_gpu_module = importlib.import_module(f"{__name__}.dm_cuda")
        except ImportError:
            _dm_gpu_module = False
    return _dm_gpu_module or None


def dm_forward(A, dims, thresholds, lut):
    """Hard DM forward: the trees' codes and the LUT sum (bitwise encode_tree + lookup).

    (N, D) float32, (C, K-1) int32, (C, K-1) float32, (C, K, M) float32 ->
    (codes (N, C) uint8 or uint16, Y (N, M) float32), K = 2**d for a depth d in 1..10. The
    NumPy path raises ValueError on NaN/Inf in A (the encoder's fused check); the GPU
    path does not check.
    """
    from . import dm_reference
    if backend.is_cupy(A):
        return (_dm_gpu() or dm_reference).dm_forward(A, dims, thresholds, lut)
    dm_reference.check_dm(dims, thresholds, lut)
    codes = encode_tree(A, dims, thresholds)
    return codes, lookup(codes, lut)


def dm_backward(A, dims, thresholds, inv_tau, lut, codes, grad_Y, inv_temp,
                need_a=True, need_t=True, need_lut=True, factors=None):
    """Surrogate gradients of the DM op (semantics in :mod:`.dm_reference`).

    Parameters
    ----------
    A : (N, D) float32; dims : (C, K-1) int32; thresholds, inv_tau : (C, K-1) float32
    lut : (C, K, M) float32; codes : (N, C) uint8 (the forward's); grad_Y : (N, M) float32
    (K = 2**d leaves, d in 1..10 read from dims' width)
    inv_temp : float, 1 / softmax temperature
    need_a, need_t, need_lut : which gradients to compute
    factors : optional ``(proto (C, K, w), weight (D, M), cols (C, w), mask (C, w))`` when
        the LUT is ``proto[c] @ weight[cols[c]]`` (a factored DM layer): the leaf
        gradients may then go through the factors
        (:func:`.dm_reference.factored_leaf_gradients`). Same result either way; used on
        the CPU where M >= 4w (the leaf gradients 1.9x faster there), ignored on the GPU, where
        the one cuBLAS product is faster than the extra launches (0.83-0.88x measured,
        benchmarks/bench_dm_factored.py)

    Returns
    -------
    (grad_A (N, D) | None, grad_t (C, K-1) | None, grad_lut (C, K, M) | None), float32
    """
    from . import dm_reference
    if factors is not None:
        dm_reference.check_factors(factors, lut)
    if backend.is_cupy(A):
        mod = _dm_gpu() or dm_reference
        return mod.dm_backward(A, dims, thresholds, inv_tau, lut, codes, grad_Y, inv_temp,
                               need_a, need_t, need_lut)
    from . import dm_cpu
    dm_reference.check_dm(dims, thresholds, lut, inv_tau)
    grad_lut = lookup_backward(codes, grad_Y, lut.shape[1]) if need_lut else None
    grad_A = grad_t = None
    if need_a or need_t:
        if factors is not None and lut.shape[2] >= 4 * factors[0].shape[2]:
            G = dm_reference.factored_leaf_gradients(grad_Y, *factors)
        else:
            G = dm_reference.leaf_gradients(grad_Y, lut)      # one BLAS product
        grad_A, grad_t = dm_cpu.node_backward(A, dims, thresholds, inv_tau, G, inv_temp, need_a)
        grad_t = grad_t if need_t else None
    return grad_A, grad_t, grad_lut
