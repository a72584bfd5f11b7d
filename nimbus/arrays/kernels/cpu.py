"""Numba kernels for the CPU (NumPy arrays).

Imported lazily by :mod:`nimbus.arrays.kernels` the first time a NumPy array
needs a kernel, so ``import nimbus`` does not pay for importing Numba. Each
kernel is compiled on first call and cached on disk (``cache=True``).

Thread mapping: every kernel runs ``prange`` over blocks of rows (the backward
over codebooks), so threads never write the same output element; the PQ encoder runs
small batches (rows x D x K below ``_PQ_PARALLEL_WORK``) on one thread.

Launchers make every argument contiguous with its exact dtype before the call;
the semantics are those of :mod:`.reference`, for trees of any depth 1..10 (read
from ``dims.shape[1]``) and LUTs of any K in 1..1024 (read from ``lut.shape[1]``).
Codes are uint8, or uint16 for trees deeper than 8 (Numba compiles each code dtype
once).
The encoders check A for NaN/Inf in the same pass over memory
(``FUSED_FINITE_CHECK``), so the apply path reads A once.
"""
from __future__ import annotations

import numpy as np
import numba
from numba import njit, prange

from ..validate import check_nbuckets, check_tree, code_dtype, lut_buckets

_ROWS_PER_BLOCK = 64   # rows per parallel task: amortises allocations, keeps rows in L2
FUSED_FINITE_CHECK = frozenset({"encode_tree", "encode_pq", "encode_lookup_q"})


_EXP_MASK = np.uint32(0x7F800000)   # float32 exponent bits: all ones <=> NaN or Inf


@njit(inline="always")
def _block_nonfinite(bits, n0, n1):
    # integer max over exponent fields: vectorises (a float sum would not, without
    # fast-math, and fast-math may assume NaNs away)
    m = np.uint32(0)
    for n in range(n0, n1):
        for j in range(bits.shape[1]):
            m = max(m, bits[n, j] & _EXP_MASK)
    return m == _EXP_MASK


# The tree depth is a run-time value (the width of dims), so one compiled kernel serves
# every depth 1..10 (two: depths 9 and 10 write uint16 codes). With a run-time trip
# count LLVM cannot unroll the descent, which
# cost 20% at the default depth 4; so each kernel calls its inlined row loop twice,
# once with the literal 4 (unrolled like the old fixed-depth kernels) and once with the
# run-time depth.

@njit(inline="always")
def _rows_level(A, ldims, thr, out, c, n0, n1, nnodes, depth):
    # one column per level: the loads of A do not depend on the comparisons, only the
    # threshold loads do
    d0 = ldims[c, 0]
    t0 = thr[c, 0]
    for n in range(n0, n1):
        node = 1 + (A[n, d0] > t0)
        for level in range(1, depth):
            node = 2 * node + 1 + (A[n, ldims[c, level]] > thr[c, node])
        out[n, c] = node - nnodes


@njit(parallel=True, cache=True, nogil=True)
def _encode_tree_level(A, bits, ldims, thr, out, bad):
    # ldims (C, depth) int32: the column of each level; thr (C, 2**depth - 1)
    N = A.shape[0]
    C, depth = ldims.shape
    nnodes = thr.shape[1]
    nblocks = (N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for b in prange(nblocks):
        n0 = b * _ROWS_PER_BLOCK
        n1 = min(N, n0 + _ROWS_PER_BLOCK)
        if _block_nonfinite(bits, n0, n1):
            bad[b] = True
        for c in range(C):
            if depth == 4:
                _rows_level(A, ldims, thr, out, c, n0, n1, nnodes, 4)
            else:
                _rows_level(A, ldims, thr, out, c, n0, n1, nnodes, depth)


@njit(inline="always")
def _rows_node(A, dims, thr, out, c, n0, n1, nnodes, depth):
    # a column per node: each load depends on the previous comparison
    for n in range(n0, n1):
        node = 0
        for _ in range(depth):
            node = 2 * node + 1 + (A[n, dims[c, node]] > thr[c, node])
        out[n, c] = node - nnodes


@njit(parallel=True, cache=True, nogil=True)
def _encode_tree_node(A, bits, dims, thr, out, bad):
    # dims, thr (C, 2**depth - 1)
    N = A.shape[0]
    C, nnodes = dims.shape
    depth = _depth_of(nnodes)
    nblocks = (N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for b in prange(nblocks):
        n0 = b * _ROWS_PER_BLOCK
        n1 = min(N, n0 + _ROWS_PER_BLOCK)
        if _block_nonfinite(bits, n0, n1):
            bad[b] = True
        for c in range(C):
            if depth == 4:
                _rows_node(A, dims, thr, out, c, n0, n1, nnodes, 4)
            else:
                _rows_node(A, dims, thr, out, c, n0, n1, nnodes, depth)


@njit(inline="always")
def _depth_of(nnodes):
    # nnodes = 2**depth - 1, validated by the launcher
    depth = 0
    while (1 << depth) - 1 < nnodes:
        depth += 1
    return depth


# PQ encode. The distances are those of the first kernel (kept so that codes do not
# change): per centroid, the float32 squares (a - c)**2 summed in float64 in column
# order, ties to the lowest k. That kernel looped k outside j, so each distance was one
# serial chain of float64 adds with a float32->float64 conversion per term and a
# branchy argmin: 0.3 ms for digits' 400 rows. Here the K distances of a row are one
# vector (the centroids transposed to (C, W, K): k innermost and contiguous), a block of
# rows is interleaved inside each column j so that no add waits for the previous one,
# and the argmin is two integer reductions over the float64 bit patterns (nonnegative
# doubles order as their bits), which LLVM vectorizes where a float argmin does not.
# Each distance still adds the same terms in the same order: the codes are bitwise
# those of the scalar kernel.

@njit(inline="always")
def _pq_block_codes(A, centT, starts, n0, nb, dist, distb, codes, K):
    # rows n0..n0+nb of A (N, D) float32 -> codes[0:nb, c] (uint8), for each codebook c of
    # centT (C, W, K) float32; dist (>= nb, K) float64 scratch, distb its int64 view
    C = centT.shape[0]
    for c in range(C):
        s0 = starts[c]
        w = starts[c + 1] - s0
        for r in range(nb):
            for k in range(K):
                dist[r, k] = 0.0
        for j in range(w):
            for r in range(nb):
                a = A[n0 + r, s0 + j]
                for k in range(K):
                    diff = a - centT[c, j, k]       # float32, as in the scalar kernel
                    dist[r, k] += diff * diff       # the float32 square, added in float64
        for r in range(nb):
            m = distb[r, 0]
            for k in range(1, K):
                m = min(m, distb[r, k])
            code = K
            for k in range(K):                      # the first k at the minimum
                code = min(code, k if distb[r, k] == m else K)
            codes[r, c] = code


@njit(inline="always")
def _pq_block(A, bits, centT, starts, n0, nb, dist, codes, K, check):
    # one block: its finite check, then its codes. K stays a run-time value: with a
    # literal 16 LLVM unrolls the k loops into scalar code (it cannot prove that dist
    # and centT do not overlap, so the unrolled adds are not packed into vectors), 2.5x
    # slower than the vectorized loop with its run-time overlap check
    bad = check and _block_nonfinite(bits, n0, n0 + nb)
    _pq_block_codes(A, centT, starts, n0, nb, dist, dist.view(np.int64), codes, K)
    return bad


@njit(inline="always")
def _pq_prepare(A, cent, starts):
    # checks starts against A (D columns) and cent (C, K, W): Numba does not check bounds,
    # so a subspace past A or wider than W would read foreign memory. Returns the
    # centroids transposed to (C, W, K) float32, or an empty array if starts is bad.
    C, K, W = cent.shape
    ok = starts.shape[0] == C + 1 and starts[0] >= 0 and starts[C] <= A.shape[1]
    for c in range(C):
        if ok and not 0 <= starts[c + 1] - starts[c] <= W:
            ok = False
    if not ok:
        return np.empty((0, W, K), dtype=np.float32)
    centT = np.empty((C, W, K), dtype=np.float32)
    for c in range(C):
        for k in range(K):
            for j in range(W):
                centT[c, j, k] = cent[c, k, j]
    return centT


# status codes of the PQ kernels
_PQ_OK, _PQ_NONFINITE, _PQ_BAD_STARTS = 0, 1, 2


@njit(cache=True, nogil=True)
def _encode_pq_serial(A, bits, cent, starts, out, check):
    """A (N, D) float32, bits its uint32 view, cent (C, K, W) float32, starts (C+1,)
    int64 -> out (N, C) uint8 codes. Returns a status: 0, 1 (A holds NaN/Inf; only when
    check) or 2 (starts does not fit A and cent; nothing written)."""
    centT = _pq_prepare(A, cent, starts)
    if centT.shape[0] != cent.shape[0]:
        return _PQ_BAD_STARTS
    N = A.shape[0]
    K = cent.shape[1]
    dist = np.empty((_ROWS_PER_BLOCK, K), dtype=np.float64)
    bad = False
    for n0 in range(0, N, _ROWS_PER_BLOCK):
        nb = min(_ROWS_PER_BLOCK, N - n0)
        bad |= _pq_block(A, bits, centT, starts, n0, nb, dist, out[n0:n0 + nb], K, check)
    return _PQ_NONFINITE if bad else _PQ_OK


@njit(parallel=True, cache=True, nogil=True)
def _encode_pq_parallel(A, bits, cent, starts, out, check):
    # as _encode_pq_serial, blocks of rows in parallel
    centT = _pq_prepare(A, cent, starts)
    if centT.shape[0] != cent.shape[0]:
        return _PQ_BAD_STARTS
    N = A.shape[0]
    K = cent.shape[1]
    nblocks = (N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    bad = np.zeros(nblocks, dtype=np.bool_)
    for b in prange(nblocks):
        dist = np.empty((_ROWS_PER_BLOCK, K), dtype=np.float64)
        n0 = b * _ROWS_PER_BLOCK
        nb = min(_ROWS_PER_BLOCK, N - n0)
        bad[b] = _pq_block(A, bits, centT, starts, n0, nb, dist, out[n0:n0 + nb], K, check)
    return _PQ_NONFINITE if bad.any() else _PQ_OK


@njit(inline="always")
def _bucket(code, kmask, kmax):
    # a code >= K must not read past the LUT: with K a power of two it is taken mod K
    # (kmask = K - 1, as the GPU kernels do), otherwise clamped to K - 1 (kmask = 0xFFFF)
    return min(code & kmask, kmax)


def _bucket_args(K):
    """(kmask, kmax) for :func:`_bucket` with K buckets."""
    pow2 = K & (K - 1) == 0
    return np.int64(K - 1 if pow2 else 0xFFFF), np.int64(K - 1)


@njit(parallel=True, cache=True, nogil=True)
def _lookup(codes, lut, out, kmask, kmax):
    N, C = codes.shape
    M = lut.shape[2]
    nblocks = (N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for b in prange(nblocks):
        acc = np.empty(M, dtype=np.float32)
        for n in range(b * _ROWS_PER_BLOCK, min(N, (b + 1) * _ROWS_PER_BLOCK)):
            acc[:] = 0.0
            for c in range(C):
                row = lut[c, _bucket(codes[n, c], kmask, kmax)]
                for m in range(M):
                    acc[m] += row[m]
            for m in range(M):
                out[n, m] = acc[m]


def _make_lookup_q(acc_dtype, parallel=True):
    """8-bit LUT lookup with ``acc_dtype`` accumulators, two rows at a time (blocks of rows
    in parallel, or on the calling thread with ``parallel=False``).

    Two rows share each pass over the codebooks, so every LUT row loaded from L1
    feeds two accumulators (measured 1.4x over one row at a time)."""

    @njit(parallel=parallel, cache=True, nogil=True)
    def kernel(codes, lut_q, scale, bias, out, kmask, kmax):
        N, C = codes.shape
        M = lut_q.shape[2]
        nblocks = (N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
        for b in prange(nblocks):
            acc0 = np.empty(M, dtype=acc_dtype)
            acc1 = np.empty(M, dtype=acc_dtype)
            n1 = min(N, (b + 1) * _ROWS_PER_BLOCK)
            for n in range(b * _ROWS_PER_BLOCK, n1, 2):
                pair = n + 1 < n1
                m_ = n + 1 if pair else n          # an odd last row is summed twice, kept once
                acc0[:] = 0
                acc1[:] = 0
                for c in range(C):
                    r0 = lut_q[c, _bucket(codes[n, c], kmask, kmax)]
                    r1 = lut_q[c, _bucket(codes[m_, c], kmask, kmax)]
                    for m in range(M):
                        acc0[m] += r0[m]
                        acc1[m] += r1[m]
                for m in range(M):
                    out[n, m] = np.float32(acc0[m]) * scale[m] + bias[m]
                if pair:
                    for m in range(M):
                        out[n + 1, m] = np.float32(acc1[m]) * scale[m] + bias[m]
    return kernel


# 16-bit accumulators are exact while C * 255 < 65536 (the launcher checks)
_lookup_q16 = _make_lookup_q(np.uint16)
_lookup_q32 = _make_lookup_q(np.int32)
# below this many byte adds (rows x codebooks x outputs) one thread: a parallel region
# costs 40-60 us to start (digits' 400 x 8 x 20 lookup took 58 us parallel, 6 serial)
_LOOKUP_PARALLEL_WORK = 1 << 21
_lookup_q16_serial = _make_lookup_q(np.uint16, parallel=False)
_lookup_q32_serial = _make_lookup_q(np.int32, parallel=False)


@njit(parallel=True, cache=True, nogil=True)
def _lookup_backward(codes, g, out):
    N, C = codes.shape
    M = g.shape[1]
    K = out.shape[1]
    for c in prange(C):
        for n in range(N):
            k = codes[n, c]
            if k < K:       # codes >= K add nothing (as in the reference), never out of bounds
                for m in range(M):
                    out[c, k, m] += g[n, m]


def _c(x, dtype):
    return np.ascontiguousarray(x, dtype=dtype)


def _raise_nonfinite(A, bad):
    first = int(np.argmax(bad)) * _ROWS_PER_BLOCK     # first block holding a NaN/Inf
    where = np.argwhere(~np.isfinite(A[first:first + _ROWS_PER_BLOCK]))[0]
    n, j = first + int(where[0]), int(where[1])
    raise ValueError(f"A contains non-finite value(s) (NaN or Inf); first at index ({n}, {j}): "
                     f"{A[n, j]}")


def _raise_nonfinite_any(A):
    where = np.argwhere(~np.isfinite(A))[0]
    n, j = int(where[0]), int(where[1])
    raise ValueError(f"A contains non-finite value(s) (NaN or Inf); first at index ({n}, {j}): "
                     f"{A[n, j]}")


def _level_dims(dims, depth):
    """(C, depth) int32 columns if every level of every tree tests one column, else None.

    dims : (C, 2**depth - 1) int32"""
    lv = [dims[:, 2 ** l - 1:2 ** (l + 1) - 1] for l in range(depth)]
    if all((x == x[:, :1]).all() for x in lv):
        return np.ascontiguousarray(np.stack([x[:, 0] for x in lv], axis=1), dtype=np.int32)
    return None


def _check_columns(dims, D):
    # Numba does not check bounds: a column outside A would read foreign memory
    if dims.size and (int(dims.min()) < 0 or int(dims.max()) >= D):
        raise ValueError(f"dims must name columns of A in 0..{D - 1}; got values in "
                         f"{int(dims.min())}..{int(dims.max())}")


def _codes(codes, K):
    """Codes as contiguous uint8, or uint16 when they are uint16 already or K > 256 (a
    uint16 code is never narrowed: a clamped code >= K keeps its value)."""
    wide = codes.dtype == np.uint16 or K > 256
    return _c(codes, np.uint16 if wide else np.uint8)


def _check_codebooks(codes, lut):
    if codes.ndim != 2 or codes.shape[1] != lut.shape[0]:
        raise ValueError(f"codes of shape {codes.shape} do not fit a LUT of shape {lut.shape}: "
                         f"need (N, {lut.shape[0]})")


def encode_tree(A, dims, thresholds):
    """Numba tree encode, any depth d in 1..10 (from ``dims.shape[1] == 2**d - 1``).

    A (N, D) float32, dims (C, 2**d - 1) int32, thresholds (C, 2**d - 1) float32 ->
    codes (N, C) uint8 (uint16 for d > 8). Raises ValueError if A holds NaN/Inf (checked
    in the same pass), if dims' width is not 2**d - 1 or if dims names a column outside A."""
    A = _c(A, np.float32)
    dims = _c(dims, np.int32)
    thresholds = _c(thresholds, np.float32)
    depth = check_tree(dims, thresholds)
    _check_columns(dims, A.shape[1])
    out = np.empty((A.shape[0], dims.shape[0]), dtype=code_dtype(1 << depth))
    bad = np.zeros((A.shape[0] + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK, dtype=np.bool_)
    ldims = _level_dims(dims, depth)
    if ldims is not None:
        _encode_tree_level(A, A.view(np.uint32), ldims, thresholds, out, bad)
    else:
        _encode_tree_node(A, A.view(np.uint32), dims, thresholds, out, bad)
    if bad.any():
        _raise_nonfinite(A, bad)
    return out


# rows x D x K (float32 squares) below which the PQ kernels run on one thread: starting a
# parallel region costs tens of microseconds when the other cores are busy (as in
# runtime_cpu), more than digits' 400 rows x 64 x 16 take on one core
_PQ_PARALLEL_WORK = 1 << 22


def _pq_args(A, centroids, starts):
    A = _c(A, np.float32)
    centroids = _c(centroids, np.float32)
    starts = _c(starts, np.int64)
    if A.ndim != 2 or centroids.ndim != 3 or not 1 <= centroids.shape[1] <= 256 \
            or starts.ndim != 1:
        raise ValueError(f"PQ needs A (N, D), centroids (C, K, W) with K in 1..256 and "
                         f"starts (C + 1,); got {A.shape}, {centroids.shape}, {starts.shape}")
    parallel = A.shape[0] * A.shape[1] * centroids.shape[1] >= _PQ_PARALLEL_WORK \
        and A.shape[0] > _ROWS_PER_BLOCK
    return A, centroids, starts, parallel


def _pq_status(status, A, centroids, starts):
    if status == _PQ_BAD_STARTS:
        raise ValueError(f"starts {starts.tolist()} must rise from 0 to at most D = "
                         f"{A.shape[1]} in C + 1 = {centroids.shape[0] + 1} steps of at "
                         f"most W = {centroids.shape[2]} columns")
    if status == _PQ_NONFINITE:
        _raise_nonfinite_any(A)


def encode_pq(A, centroids, starts):
    """Numba PQ encode: A (N, D) float32, centroids (C, K, W) float32 (K <= 256), starts
    (C+1,) int -> codes (N, C) uint8. Raises ValueError if A holds NaN/Inf (checked in the
    same pass) or if starts does not fit A and centroids."""
    A, centroids, starts, parallel = _pq_args(A, centroids, starts)
    out = np.empty((A.shape[0], centroids.shape[0]), dtype=np.uint8)
    kernel = _encode_pq_parallel if parallel else _encode_pq_serial
    _pq_status(kernel(A, A.view(np.uint32), centroids, starts, out, True), A, centroids,
               starts)
    return out


def lookup(codes, lut):
    """(N, C) uint8 or uint16 codes, (C, K, M) float32 LUT (K in 1..1024) -> (N, M) float32.

    Codes >= K read bucket ``code mod K`` (K a power of two) or K - 1, never past the LUT."""
    lut = _c(lut, np.float32)
    K = lut_buckets(lut)
    codes = _codes(codes, K)
    _check_codebooks(codes, lut)
    out = np.empty((codes.shape[0], lut.shape[2]), dtype=np.float32)
    _lookup(codes, lut, out, *_bucket_args(K))
    return out


def lookup_q(codes, lut_q, scale, bias):
    """(N, C) uint8 or uint16, (C, K, M) uint8 (K in 1..1024), (M,), (M,) float32 ->
    (N, M) float32, exact integer sums; codes >= K are handled as in :func:`lookup`."""
    lut_q = _c(lut_q, np.uint8)
    scale = _c(scale, np.float32)
    bias = _c(bias, np.float32)
    K = lut_buckets(lut_q)
    codes = _codes(codes, K)
    _check_codebooks(codes, lut_q)
    if scale.shape != (lut_q.shape[2],) or bias.shape != (lut_q.shape[2],):
        raise ValueError(f"scale {scale.shape} and bias {bias.shape} must both have shape "
                         f"({lut_q.shape[2]},) for a LUT of shape {lut_q.shape}")
    out = np.empty((codes.shape[0], lut_q.shape[2]), dtype=np.float32)
    narrow = lut_q.shape[0] * 255 < 65536
    if codes.shape[0] * lut_q.shape[0] * lut_q.shape[2] < _LOOKUP_PARALLEL_WORK:
        kernel = _lookup_q16_serial if narrow else _lookup_q32_serial
    else:
        kernel = _lookup_q16 if narrow else _lookup_q32
    kernel(codes, lut_q, scale, bias, out, *_bucket_args(K))
    return out


def encode_lookup_q(A, dims, thresholds, lut_q, scale, bias, out_dtype=np.float32):
    """encode_tree then lookup_q: on the CPU the (N, C) codes are small next to A, so
    two kernels cost about what one fused kernel would.

    A (N, D) float32, dims (C, K-1) int32, thresholds (C, K-1) float32 with K = 2**d,
    lut_q (C, K, M) uint8, scale, bias (M,) float32 -> (N, M) ``out_dtype``."""
    Y = lookup_q(encode_tree(A, dims, thresholds), lut_q, scale, bias)
    return Y if Y.dtype == out_dtype else Y.astype(out_dtype)


def lookup_backward(codes, grad_Y, nbuckets=16):
    """(N, C) uint8 or uint16 codes, (N, M) float32 -> (C, nbuckets, M) float32
    scatter-add; nbuckets = K in 1..1024, codes >= K add nothing."""
    K = check_nbuckets(nbuckets)
    codes = _codes(codes, K)
    grad_Y = _c(grad_Y, np.float32)
    if codes.ndim != 2 or grad_Y.ndim != 2 or codes.shape[0] != grad_Y.shape[0]:
        raise ValueError(f"codes {codes.shape} and grad_Y {grad_Y.shape} need shapes "
                         "(N, C) and (N, M)")
    out = np.zeros((codes.shape[1], K, grad_Y.shape[1]), dtype=np.float32)
    _lookup_backward(codes, grad_Y, out)
    return out


def num_threads():
    """Threads Numba uses for ``prange`` loops."""
    return numba.get_num_threads()
