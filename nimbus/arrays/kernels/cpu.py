"""Numba kernels for the CPU (NumPy arrays).

Imported lazily by :mod:`nimbus.arrays.kernels` the first time a NumPy array
needs a kernel, so ``import nimbus`` does not pay for importing Numba. Each
kernel is compiled on first call and cached on disk (``cache=True``).

Thread mapping: every kernel runs ``prange`` over blocks of rows (the backward
over codebooks), so threads never write the same output element.

Launchers make every argument contiguous with its exact dtype before the call;
the semantics are those of :mod:`.reference`.
"""
from __future__ import annotations

import numpy as np
import numba
from numba import njit, prange

from .reference import NNODES, DEPTH

_ROWS_PER_BLOCK = 64   # rows per parallel task: amortises the accumulator allocation


@njit(parallel=True, cache=True, nogil=True)
def _encode_tree(A, dims, thr, out):
    N = A.shape[0]
    C = dims.shape[0]
    for n in prange(N):
        for c in range(C):
            node = 0
            for _ in range(DEPTH):
                go_right = 1 if A[n, dims[c, node]] > thr[c, node] else 0
                node = 2 * node + 1 + go_right
            out[n, c] = node - NNODES


@njit(parallel=True, cache=True, nogil=True)
def _encode_pq(A, cent, starts, out):
    N = A.shape[0]
    C, K = cent.shape[0], cent.shape[1]
    for n in prange(N):
        for c in range(C):
            s0 = starts[c]
            w = starts[c + 1] - s0
            best = np.inf
            best_k = 0
            for k in range(K):
                d = 0.0
                for j in range(w):
                    diff = A[n, s0 + j] - cent[c, k, j]
                    d += diff * diff
                if d < best:      # strict: ties keep the lowest k, as argmin does
                    best = d
                    best_k = k
            out[n, c] = best_k


@njit(parallel=True, cache=True, nogil=True)
def _lookup(codes, lut, out):
    N, C = codes.shape
    M = lut.shape[2]
    nblocks = (N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for b in prange(nblocks):
        acc = np.empty(M, dtype=np.float32)
        for n in range(b * _ROWS_PER_BLOCK, min(N, (b + 1) * _ROWS_PER_BLOCK)):
            acc[:] = 0.0
            for c in range(C):
                row = lut[c, codes[n, c]]
                for m in range(M):
                    acc[m] += row[m]
            for m in range(M):
                out[n, m] = acc[m]


@njit(parallel=True, cache=True, nogil=True)
def _lookup_q16(codes, lut_q, scale, bias, out):
    # 16-bit accumulators: exact while C * 255 < 65536 (checked by the launcher).
    N, C = codes.shape
    M = lut_q.shape[2]
    nblocks = (N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for b in prange(nblocks):
        acc = np.empty(M, dtype=np.uint16)
        for n in range(b * _ROWS_PER_BLOCK, min(N, (b + 1) * _ROWS_PER_BLOCK)):
            acc[:] = 0
            for c in range(C):
                row = lut_q[c, codes[n, c]]
                for m in range(M):
                    acc[m] += np.uint16(row[m])
            for m in range(M):
                out[n, m] = np.float32(acc[m]) * scale[m] + bias[m]


@njit(parallel=True, cache=True, nogil=True)
def _lookup_q32(codes, lut_q, scale, bias, out):
    N, C = codes.shape
    M = lut_q.shape[2]
    nblocks = (N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for b in prange(nblocks):
        acc = np.empty(M, dtype=np.int32)
        for n in range(b * _ROWS_PER_BLOCK, min(N, (b + 1) * _ROWS_PER_BLOCK)):
            acc[:] = 0
            for c in range(C):
                row = lut_q[c, codes[n, c]]
                for m in range(M):
                    acc[m] += np.int32(row[m])
            for m in range(M):
                out[n, m] = np.float32(acc[m]) * scale[m] + bias[m]


@njit(parallel=True, cache=True, nogil=True)
def _lookup_backward(codes, g, out):
    N, C = codes.shape
    M = g.shape[1]
    for c in prange(C):
        for n in range(N):
            k = codes[n, c]
            for m in range(M):
                out[c, k, m] += g[n, m]


def _c(x, dtype):
    return np.ascontiguousarray(x, dtype=dtype)


def encode_tree(A, dims, thresholds):
    A = _c(A, np.float32)
    dims = _c(dims, np.int32)
    thresholds = _c(thresholds, np.float32)
    out = np.empty((A.shape[0], dims.shape[0]), dtype=np.uint8)
    _encode_tree(A, dims, thresholds, out)
    return out


def encode_pq(A, centroids, starts):
    A = _c(A, np.float32)
    centroids = _c(centroids, np.float32)
    starts = _c(starts, np.int64)
    out = np.empty((A.shape[0], centroids.shape[0]), dtype=np.uint8)
    _encode_pq(A, centroids, starts, out)
    return out


def lookup(codes, lut):
    codes = _c(codes, np.uint8)
    lut = _c(lut, np.float32)
    out = np.empty((codes.shape[0], lut.shape[2]), dtype=np.float32)
    _lookup(codes, lut, out)
    return out


def lookup_q(codes, lut_q, scale, bias):
    codes = _c(codes, np.uint8)
    lut_q = _c(lut_q, np.uint8)
    scale = _c(scale, np.float32)
    bias = _c(bias, np.float32)
    out = np.empty((codes.shape[0], lut_q.shape[2]), dtype=np.float32)
    kernel = _lookup_q16 if lut_q.shape[0] * 255 < 65536 else _lookup_q32
    kernel(codes, lut_q, scale, bias, out)
    return out


def lookup_backward(codes, grad_Y, nbuckets=16):
    codes = _c(codes, np.uint8)
    grad_Y = _c(grad_Y, np.float32)
    out = np.zeros((codes.shape[1], nbuckets, grad_Y.shape[1]), dtype=np.float32)
    _lookup_backward(codes, grad_Y, out)
    return out


def num_threads():
    """Threads Numba uses for ``prange`` loops."""
    return numba.get_num_threads()
