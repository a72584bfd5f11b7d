"""Plain array versions of every kernel: the test oracle.

Each function takes NumPy or CuPy arrays and uses only ``xp`` operations of the
arrays' own library, so the same code checks the Numba kernels on the CPU and the
RawKernels on the GPU. Written for clarity, not speed.

Shared conventions (all kernels):

* A tree has 15 internal nodes in heap order (node ``i`` has children ``2i+1``
  and ``2i+2``) and 16 leaves; a row goes right at node ``i`` when
  ``A[n, dims[c, i]] > thresholds[c, i]`` (strictly), so a value equal to a
  threshold always goes left, in learning and in encoding alike. The code is the
  leaf index ``node - 15`` (0..15). A per-level tree stores its level's dimension
  at every node of that level.
* LUTs have shape (C, K, M); 8-bit LUTs are uint8 with ``Y = isum * scale + bias``,
  ``isum[n, m] = sum_c lut_q[c, codes[n, c], m]`` summed exactly in integers.
"""
from __future__ import annotations

import numpy as np

from .. import backend, validate

NLEAVES = 16
NNODES = 15
DEPTH = 4


def encode_tree(A, dims, thresholds):
    """Codes of the rows of ``A`` under C depth-4 trees.

    Parameters
    ----------
    A : (N, D) float32 (float16 accepted)
    dims : (C, 15) int32, absolute column of A tested at each node
    thresholds : (C, 15) float32

    Returns
    -------
    codes : (N, C) uint8, leaf reached in each tree

    Raises ValueError if A holds NaN or Inf (every encoder checks).
    """
    xp = backend.namespace(A, dims, thresholds)
    validate.finite_or_raise(A, "A")
    N = A.shape[0]
    C = dims.shape[0]
    codes = xp.empty((N, C), dtype=np.uint8)
    rows = xp.arange(N)
    for c in range(C):
        node = xp.zeros(N, dtype=np.int64)
        for _ in range(DEPTH):
            d = dims[c][node]
            t = thresholds[c][node]
            right = (A[rows, d].astype(np.float32) > t).astype(np.int64)
            node = 2 * node + 1 + right
        codes[:, c] = (node - NNODES).astype(np.uint8)
    return codes


def encode_pq(A, centroids, starts):
    """Nearest-centroid codes, per subspace.

    Parameters
    ----------
    A : (N, D) float32
    centroids : (C, K, W) float32, zero-padded past each subspace's width
    starts : (C + 1,) int32, subspace c spans columns ``starts[c]:starts[c+1]``

    Returns
    -------
    codes : (N, C) uint8, ``argmin_k ||A[n, sub_c] - centroids[c, k, :w_c]||^2``
        (ties go to the lowest k)
    """
    xp = backend.namespace(A, centroids)
    validate.finite_or_raise(A, "A")
    starts = [int(s) for s in backend.to_host(starts)]
    C = centroids.shape[0]
    codes = xp.empty((A.shape[0], C), dtype=np.uint8)
    for c in range(C):
        a = A[:, starts[c]:starts[c + 1]].astype(np.float32)
        w = a.shape[1]
        cent = centroids[c, :, :w]
        dist = ((a[:, None, :] - cent[None, :, :]) ** 2).sum(axis=2)
        codes[:, c] = xp.argmin(dist, axis=1).astype(np.uint8)
    return codes


def lookup(codes, lut):
    """``Y[n, :] = sum_c lut[c, codes[n, c], :]``.

    Parameters
    ----------
    codes : (N, C) uint8
    lut : (C, K, M) float32

    Returns
    -------
    Y : (N, M) float32
    """
    xp = backend.namespace(codes, lut)
    C = lut.shape[0]
    Y = xp.zeros((codes.shape[0], lut.shape[2]), dtype=np.float32)
    for c in range(C):
        Y += lut[c][codes[:, c].astype(np.int64)]
    return Y


def lookup_q(codes, lut_q, scale, bias):
    """8-bit LUT lookup: exact integer sums, then ``isum * scale + bias``.

    Parameters
    ----------
    codes : (N, C) uint8
    lut_q : (C, K, M) uint8
    scale : (M,) float32
    bias : (M,) float32

    Returns
    -------
    Y : (N, M) float32
    """
    xp = backend.namespace(codes, lut_q)
    C = lut_q.shape[0]
    acc = xp.zeros((codes.shape[0], lut_q.shape[2]), dtype=np.int32)
    for c in range(C):
        acc += lut_q[c][codes[:, c].astype(np.int64)].astype(np.int32)
    return (acc.astype(np.float32) * scale[None, :] + bias[None, :]).astype(np.float32)


def lookup_backward(codes, grad_Y, nbuckets=NLEAVES):
    """Gradient of ``lookup`` with respect to the LUT: a scatter-add.

    Parameters
    ----------
    codes : (N, C) uint8
    grad_Y : (N, M) float32
    nbuckets : int (K)

    Returns
    -------
    grad_lut : (C, K, M) float32, ``sum over n with codes[n, c] == k of grad_Y[n]``
    """
    xp = backend.namespace(codes, grad_Y)
    N, C = codes.shape
    M = grad_Y.shape[1]
    out = xp.zeros((C, nbuckets, M), dtype=np.float32)
    for c in range(C):
        onehot = (codes[:, c].astype(np.int64)[:, None] == xp.arange(nbuckets)[None, :])
        out[c] = onehot.astype(np.float32).T @ grad_Y.astype(np.float32)
    return out


def encode_lookup_q(A, dims, thresholds, lut_q, scale, bias, out_dtype=np.float32):
    """MADDNESS apply: 8-bit LUT sums of the tree codes of A, cast to ``out_dtype``.

    Parameters
    ----------
    A : (N, D) float32 (float16 accepted)
    dims : (C, 15) int32; thresholds : (C, 15) float32 (as :func:`encode_tree`)
    lut_q : (C, 16, M) uint8; scale, bias : (M,) float32 (as :func:`lookup_q`)
    out_dtype : float32 or float16

    Returns
    -------
    Y : (N, M) ``out_dtype``, ``lookup_q(encode_tree(A, dims, thresholds), lut_q, scale,
        bias)`` rounded once to ``out_dtype``
    """
    Y = lookup_q(encode_tree(A, dims, thresholds), lut_q, scale, bias)
    return Y.astype(out_dtype, copy=False)
