"""CuPy RawKernels for the differentiable MADDNESS (DM) op: forward and backward.

Semantics are those of :mod:`.dm_reference` (the oracle these kernels are tested
against). The dense part of the backward, the leaf gradients ``G = grad_Y @
LUT_flat^T`` and the LUT gradient ``onehot^T @ grad_Y``, are cuBLAS matmuls;
everything else is here:

* ``dm_encode``: thread per (row, codebook), codebook fastest, so a warp walks the
  trees of one row and that row's values stay in L1.
* ``dm_lookup`` / ``dm_lookup4``: thread per (row, 1 or 4 output columns), columns
  fastest: LUT rows are read coalesced (float4 when M % 4 == 0) and a row's codes
  are broadcast. Codebooks are summed in order c = 0..C-1 from 0, as the reference
  does, so the result is bitwise the reference's.
* ``dm_lookup_q`` / ``dm_lookup_q4``: the 8-bit lookup for wide codes, thread per (row,
  1 or 4 output columns), columns fastest; int32 sums, then scale and bias.
* ``dm_onehot``: thread per (row, codebook) writes the 1 of the one-hot codes; the
  LUT gradient (the exact scatter-add of ``grad_Y`` rows) is then one cuBLAS
  product ``onehot^T @ grad_Y`` (see :func:`lut_grad` for why not a scatter kernel).
* ``dm_node_backward`` (trees of depth d <= 4): block = 32 codebook lanes x 8 row
  groups; a thread takes one codebook and ``rows_per_thread`` rows, recomputes the
  hard decisions of the K - 1 nodes, the leaf scores ``b = s @ P^T`` (P is
  implicit: unrolled paths; the softmax weights come from a (d+1)-entry table since
  b takes d + 1 values), the node gradients bottom-up (subtree sums) and the tanh'
  factor (one __expf); it adds each node's gradient into ``grad_A`` (atomicAdd:
  only trees sharing a column contend) and keeps its threshold gradients in
  registers, reduced over the block's row groups in shared memory into one partial
  per block (summed afterwards: deterministic).
* ``dm_node_backward_warp`` (depth 5..10, 32..1024 leaves, too many for registers): a
  warp per (row, codebook), the per-row arrays in shared memory, O(K) work: the
  path misses top-down, the leaf softmax with warp-shuffle sums, the subtree sums
  bottom-up; threshold gradients per warp in shared memory, one partial per block.

Trees have depth d in 1..10 (K = 2**d leaves, dims (C, K-1); the depth is read off
the shapes). Codes are uint8 up to depth 8 and uint16 beyond (``code_t`` in the
source); deeper trees take fewer warps per backward block (8, 4 at depth 9, 1 at depth
10) so that the per-warp shared arrays fit the 48 KiB of static shared memory.
Launchers check their inputs, make every argument contiguous with its exact dtype and
pass scalars as np.int32 / np.float32. The module is compiled on first use, once per
(device, depth); depth 4 compiles to the same code as before other depths existed
(except that the lookups take codes mod K and the one-hot skips codes >= K, which
valid codes never notice).
"""
from __future__ import annotations

import numpy as np

from .. import backend, validate
from .cuda import _check_dims, device_info, load_source

# The CUDA C++ of every kernel above is cuda/dm.cu (package data), compiled once per
# (device, depth) with a "#define DEPTH d" line in front (see _module_source).
_SOURCE_FILE = "dm.cu"

_modules = {}          # (device id, depth) -> compiled RawModule
_NB_ROWS = 8           # row groups per dm_node_backward block (NB_ROWS in the source)
_REGISTER_DEPTH = 4    # deepest trees whose backward keeps a (row, codebook) in registers


def _warps(depth):
    """Warps per dm_node_backward_warp block for trees of ``depth`` (NW in the source)."""
    return 8 if depth <= 8 else 4 if depth == 9 else 1


def _cp():
    return backend.cupy()


def _module_source(depth):
    """CUDA source of the module for trees of ``depth`` (1..10): the DEPTH define, then
    cuda/dm.cu."""
    return f"#define DEPTH {int(depth)}\n" + load_source(_SOURCE_FILE)


def _function(name, depth):
    """Kernel ``name`` of the module for trees of ``depth`` on the current device (each
    (device, depth) compiled once)."""
    cp = _cp()
    key = (cp.cuda.Device().id, int(depth))
    mod = _modules.get(key)
    if mod is None:
        mod = cp.RawModule(code=_module_source(depth))
        _modules[key] = mod
    return mod.get_function(name)


def _c(x, dtype):
    return _cp().ascontiguousarray(x, dtype=dtype)


def _aligned(x, nbytes):
    """``x`` itself when its data starts on an ``nbytes`` boundary, else an aligned copy
    (the vector kernels load float4 / uchar4; a contiguous view may start anywhere)."""
    return x if x.data.ptr % nbytes == 0 else x.copy()


def _codes(codes, K, C=None):
    """``codes`` checked ((N, C) uint8 or uint16, C codebooks when given) and made a
    contiguous array of the code dtype of K leaves (uint8 up to 256, uint16 beyond). The
    kernels take codes mod K (K = 2**d), so narrowing uint16 codes to a byte for K <= 256
    keeps every code's bucket (K divides 256)."""
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, C), got shape {tuple(codes.shape)}")
    if codes.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"codes must have dtype uint8 or uint16, got {codes.dtype}")
    if C is not None and codes.shape[1] != C:
        raise ValueError(f"codes have {codes.shape[1]} codebooks (shape {tuple(codes.shape)}) "
                         f"but the LUT has {C}")
    return _c(codes, validate.code_dtype(K))


def _leaf_depth(K, what):
    """Depth d of trees with K = 2**d leaves (1 <= d <= 10), else ValueError naming ``what``."""
    return validate.depth_of_nodes(int(K) - 1, f"{what} (K = {K} leaves)")


def encode(A, dims, thresholds):
    """(N, D) float32, (C, K-1) int32, (C, K-1) float32 -> (N, C) codes (no NaN check),
    uint8 up to K = 256 and uint16 beyond; the depth d (K = 2**d, 1 <= d <= 10) is read
    off dims' shape."""
    cp = _cp()
    depth = validate.check_tree(dims, thresholds)
    if A.ndim != 2:
        raise ValueError(f"A must be 2-D (N, D), got shape {tuple(A.shape)}")
    if dims.dtype.kind not in "iu" or thresholds.dtype.kind != "f":
        raise TypeError(f"dims must hold integers and thresholds floats, got dtypes "
                        f"{dims.dtype} and {thresholds.dtype}")
    A, dims, thresholds = _c(A, np.float32), _c(dims, np.int32), _c(thresholds, np.float32)
    N, D = A.shape
    C = dims.shape[0]
    if C:
        _check_dims(dims, D)             # a column outside A would read foreign memory
    codes = cp.empty((N, C), dtype=validate.code_dtype(1 << depth))
    total = N * C
    if total:
        threads = 256
        _function("dm_encode", depth)(((total + threads - 1) // threads,), (threads,),
                                      (A, dims, thresholds, codes, np.int64(N), np.int32(D),
                                       np.int32(C)))
    return codes


def lookup(codes, lut):
    """(N, C) uint8 or uint16, (C, K, M) float32 -> (N, M) float32, summed in codebook
    order (K = 2**d, 1 <= d <= 10; codes taken mod K)."""
    cp = _cp()
    if lut.ndim != 3 or lut.dtype.kind != "f":
        raise ValueError(f"lut must be a float (C, K, M) array, got shape {tuple(lut.shape)} "
                         f"and dtype {lut.dtype}")
    K, M = lut.shape[1], lut.shape[2]
    depth = _leaf_depth(K, f"lut {tuple(lut.shape)}")
    codes, lut = _codes(codes, K, lut.shape[0]), _c(lut, np.float32)
    N, C = codes.shape
    Y = cp.empty((N, M), dtype=np.float32)
    if N == 0 or M == 0:
        return Y
    vec = M % 4 == 0
    if vec:
        lut = _aligned(lut, 16)
    width = M // 4 if vec else M
    threads = 128 if width >= 128 else 32 * ((width + 31) // 32)
    grid = ((width + threads - 1) // threads, min(N, 65535))
    name = "dm_lookup4" if vec else "dm_lookup"
    _function(name, depth)(grid, (threads,), (codes, lut, Y, np.int64(N), np.int32(C),
                                              np.int32(width)))
    return Y


def lookup_q(codes, lut_q, scale, bias):
    """(N, C) uint8 or uint16, (C, K, M) uint8, (M,), (M,) float32 -> (N, M) float32: exact
    integer sums of the 8-bit LUT rows, then ``isum * scale + bias`` (K = 2**d, 1 <= d <= 10;
    codes taken mod K). Used for trees deeper than 8, whose codes the byte-tuned kernels of
    :mod:`.cuda` do not take."""
    cp = _cp()
    if lut_q.ndim != 3:
        raise ValueError(f"lut_q must have shape (C, K, M), got {tuple(lut_q.shape)}")
    if lut_q.dtype != np.uint8:
        raise TypeError(f"lut_q must have dtype uint8, got {lut_q.dtype}")
    K, M = lut_q.shape[1], lut_q.shape[2]
    depth = _leaf_depth(K, f"lut_q {tuple(lut_q.shape)}")
    if scale.shape != (M,) or bias.shape != (M,):
        raise ValueError(f"scale {tuple(scale.shape)} and bias {tuple(bias.shape)} must both "
                         f"have shape ({M},) for lut_q {tuple(lut_q.shape)}")
    codes, lut_q = _codes(codes, K, lut_q.shape[0]), _c(lut_q, np.uint8)
    scale, bias = _c(scale, np.float32), _c(bias, np.float32)
    N, C = codes.shape
    Y = cp.empty((N, M), dtype=np.float32)
    if N and M:
        vec = M % 4 == 0
        if vec:
            lut_q, scale, bias = _aligned(lut_q, 4), _aligned(scale, 16), _aligned(bias, 16)
        width = M // 4 if vec else M
        threads = 128 if width >= 128 else 32 * ((width + 31) // 32)
        grid = ((width + threads - 1) // threads, min(N, 65535))
        _function("dm_lookup_q4" if vec else "dm_lookup_q", depth)(
            grid, (threads,), (codes, lut_q, scale, bias, Y, np.int64(N), np.int32(C),
                               np.int32(width)))
    return Y


def dm_forward(A, dims, thresholds, lut):
    """Hard forward: (codes (N, C) uint8 or uint16, Y (N, M) float32); see
    :func:`.dm_reference.dm_forward`."""
    validate.check_dm(dims, thresholds, lut)
    codes = encode(A, dims, thresholds)
    return codes, lookup(codes, lut)


def lut_grad(codes, grad_Y, nbuckets=16):
    """(N, C) uint8 or uint16, (N, M) float32 -> (C, K, M) float32 scatter-add of grad
    rows, K = ``nbuckets`` = 2**d (1 <= d <= 10); codes >= K add nothing.

    Computed as one cuBLAS product ``onehot(codes)^T @ grad_Y`` (onehot (N, C*K)): the
    same sums (each picked entry receives exactly the rows that picked it, times 1.0) in
    cuBLAS's order. Measured on an H100 at N=8192, C=32, M=512, K=16, a shared-memory
    scatter kernel took 0.31 ms (few resident blocks, a read-modify-write chain per row);
    the product is a 4.3 GFLOP fp32 GEMM. Its cost grows with K like that of the leaf
    gradients ``grad_Y @ LUT_flat^T`` the backward computes anyway.
    """
    cp = _cp()
    K = validate.check_nbuckets(nbuckets)
    depth = _leaf_depth(K, "nbuckets")
    codes = _codes(codes, K)
    if grad_Y.ndim != 2 or grad_Y.shape[0] != codes.shape[0]:
        raise ValueError(f"grad_Y must have shape (N={codes.shape[0]}, M), got "
                         f"{tuple(grad_Y.shape)}")
    grad_Y = _c(grad_Y, np.float32)
    N, C = codes.shape
    M = grad_Y.shape[1]
    onehot = cp.zeros((N, C * K), dtype=np.float32)
    if N and C:
        threads = 256
        total = N * C
        _function("dm_onehot", depth)(((total + threads - 1) // threads,), (threads,),
                                      (codes, onehot, np.int64(N), np.int32(C)))
    return (onehot.T @ grad_Y).reshape(C, K, M)


def _node_backward(A, dims, thresholds, inv_tau, G, grad_A, inv_temp, need_a, depth):
    """Launch the node backward for trees of ``depth``; returns the per-block threshold
    gradient partials (P, C, K-1) float32 (summed by the caller: deterministic)."""
    cp = _cp()
    N, D = A.shape
    C, NN = dims.shape
    args = (A, dims, thresholds, inv_tau, G, grad_A)
    tail = (np.int64(N), np.int32(D), np.int32(C), np.float32(inv_temp))
    if depth <= _REGISTER_DEPTH:
        rows_per_thread = 1
        gx = (N + _NB_ROWS * rows_per_thread - 1) // (_NB_ROWS * rows_per_thread)
        gy = (C + 31) // 32
        part = cp.empty((max(gx, 1), C, NN), dtype=np.float32)
        if N:
            _function("dm_node_backward", depth)(
                (gx, gy), (32, _NB_ROWS),
                (*args, part, *tail, np.int32(rows_per_thread), np.int32(bool(need_a))))
        else:
            part[...] = 0
        return part
    # a warp per (row, codebook): blocks of NW warps on one codebook; enough row chunks
    # for about 16 blocks per multiprocessor, at least one row per warp
    if C > 65535:
        raise ValueError(f"the DM backward kernel takes at most 65535 codebooks, got C={C}")
    sms = device_info(cp.cuda.Device().id)["sms"]
    nw = _warps(depth)
    chunks = max(1, min(-(-N // nw), -(-sms * 16 * 8 // nw // max(C, 1))))
    rows = -(-N // chunks)
    gx = -(-N // rows) if N else 1
    part = cp.empty((gx, C, NN), dtype=np.float32)
    if N and C:
        _function("dm_node_backward_warp", depth)(
            (gx, C), (32 * nw,),
            (*args, part, *tail, np.int32(rows), np.int32(bool(need_a))))
    else:
        part[...] = 0
    return part


def dm_backward(A, dims, thresholds, inv_tau, lut, codes, grad_Y, inv_temp,
                need_a=True, need_t=True, need_lut=True):
    """Surrogate gradients (grad_A, grad_t, grad_lut); see :func:`.dm_reference.dm_backward`.

    Shapes: A (N, D); dims (C, K-1) int32; thresholds, inv_tau (C, K-1) float32; lut
    (C, K, M); codes (N, C) uint8 (uint16 for K > 256); grad_Y (N, M) -> grad_A (N, D),
    grad_t (C, K-1), grad_lut (C, K, M), float32 (or None where not needed), K = 2**d,
    1 <= d <= 10. Trees
    of up to 16 leaves keep each (row, codebook) in a thread's registers; deeper trees
    take a warp per (row, codebook) with O(K) top-down / bottom-up passes.
    """
    cp = _cp()
    A = _c(A, np.float32)
    dims, thresholds, inv_tau = _c(dims, np.int32), _c(thresholds, np.float32), _c(inv_tau, np.float32)
    lut, grad_Y = _c(lut, np.float32), _c(grad_Y, np.float32)
    depth = validate.check_dm(dims, thresholds, lut, inv_tau)
    N, D = A.shape
    C, K, M = lut.shape
    grad_lut = lut_grad(codes, grad_Y, K) if need_lut else None
    grad_A = grad_t = None
    if need_a or need_t:
        # leaf gradients: one cuBLAS product, (N, M) @ (M, C*K)
        G = cp.ascontiguousarray(grad_Y @ lut.reshape(C * K, M).T)
        grad_A = cp.zeros((N, D), dtype=np.float32) if need_a else cp.empty((1, 1), np.float32)
        part = _node_backward(A, dims, thresholds, inv_tau, G, grad_A, inv_temp, need_a,
                              depth)
        grad_t = part.sum(axis=0) if need_t else None
        if not need_a:
            grad_A = None
    return grad_A, grad_t, grad_lut
