"""The kernel op table: one entry per hot loop, dispatched by array type.

This module is the only place that picks an implementation by array library:

* NumPy arrays go to :mod:`.cpu` (Numba);
* CuPy arrays go to :mod:`.cuda` (RawKernels), falling back to the plain-array
  :mod:`.reference` for any op that module does not provide;
* :mod:`.reference` is also the test oracle.

Ops (shapes and semantics in :mod:`.reference`):
``encode_tree``, ``encode_pq``, ``lookup``, ``lookup_q``, ``lookup_backward``.
"""
from __future__ import annotations

import importlib

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


def implementation(op, *arrays):
    """The function that runs ``op`` for arrays of this library."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    lib = backend.library_name(arrays[0]) if arrays else "numpy"
    mod = _module(lib)
    fn = getattr(mod, op, None) if mod is not None else None
    return fn if fn is not None else getattr(reference, op)


def _checked(op, A):
    """The implementation of an encode op, preceded by a NaN/Inf check of A unless the
    implementation does that check itself in its own pass over A."""
    fn = implementation(op, A)
    mod = _module(backend.library_name(A))
    if mod is not None and fn is getattr(mod, op, None) and \
            op in getattr(mod, "FUSED_FINITE_CHECK", ()):
        return fn
    return lambda *args: (validate.finite_or_raise(A, "A"), fn(*args))[1]


def encode_tree(A, dims, thresholds):
    """(N, D) float32, (C, 15) int32, (C, 15) float32 -> (N, C) uint8 codes.

    Raises ValueError if A holds NaN or Inf."""
    return _checked("encode_tree", A)(A, dims, thresholds)


def encode_pq(A, centroids, starts):
    """(N, D) float32, (C, K, W) float32, (C+1,) int -> (N, C) uint8 codes.

    Raises ValueError if A holds NaN or Inf."""
    return _checked("encode_pq", A)(A, centroids, starts)


def encode_lookup_q(A, dims, thresholds, lut_q, scale, bias, out_dtype=np.float32):
    """MADDNESS apply in one op: ``lookup_q(encode_tree(A, dims, thresholds), ...)``.

    (N, D) float32 (float16 on the GPU), (C, 15) int32, (C, 15) float32, (C, 16, M) uint8,
    (M,), (M,) -> (N, M) ``out_dtype`` (float32 or float16). On CuPy one fused kernel
    (codes stay in shared memory). Raises ValueError if A holds NaN or Inf."""
    return _checked("encode_lookup_q", A)(A, dims, thresholds, lut_q, scale, bias, out_dtype)


def lookup(codes, lut):
    """(N, C) uint8, (C, K, M) float32 -> (N, M) float32 sums of LUT rows."""
    return implementation("lookup", codes)(codes, lut)


def lookup_q(codes, lut_q, scale, bias):
    """(N, C) uint8, (C, K, M) uint8, (M,), (M,) -> (N, M) float32, exact integer sums."""
    return implementation("lookup_q", codes)(codes, lut_q, scale, bias)


def lookup_backward(codes, grad_Y, nbuckets=16):
    """(N, C) uint8, (N, M) float32 -> (C, K, M) float32 scatter-add of grad rows."""
    return implementation("lookup_backward", codes)(codes, grad_Y, nbuckets)
