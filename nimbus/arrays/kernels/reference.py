"""Plain array versions of every kernel: the test oracle.

Each function takes NumPy or CuPy arrays and uses only ``xp`` operations of the
arrays' own library, so the same code checks the Numba kernels on the CPU and the
RawKernels on the GPU. Written for clarity, not speed.

Shared conventions (all kernels):

* A tree of depth ``d`` (1..10) has ``K = 2**d`` leaves and ``K - 1`` internal
  nodes in heap order (node ``i`` has children ``2i+1`` and ``2i+2``); the depth
  is inferred from ``dims.shape[1] == K - 1`` (:func:`tree_depth`). A row goes
  right at node ``i`` when ``A[n, dims[c, i]] > thresholds[c, i]`` (strictly), so
  a value equal to a threshold always goes left, in learning and in encoding
  alike, and a ``+inf`` threshold sends every row left. The code is the leaf
  index ``node - (K - 1)`` (0..K-1), stored as uint8 (uint16 beyond 256 leaves:
  :func:`code_dtype`). A per-level tree stores its
  level's dimension at every node of that level. The default depth is 4
  (``NLEAVES`` = 16 leaves, ``NNODES`` = 15 nodes).
* LUTs have shape (C, K, M) with K = ``lut.shape[1]`` in 1..1024; 8-bit LUTs are
  uint8 with ``Y = isum * scale + bias``, ``isum[n, m] = sum_c lut_q[c, codes[n, c], m]``
  summed exactly in integers.
"""
from __future__ import annotations

import numpy as np

from .. import backend, validate

# The tree and LUT shape rules live in validate (production checks, which must not import
# this test oracle); re-exported here, where tests and older code look for them.
from ..validate import (BYTE_DEPTH, DEPTH, MAX_DEPTH, NLEAVES, NNODES,  # noqa: F401
                        check_nbuckets, check_tree, code_dtype, depth_of_nodes, lut_buckets,
                        tree_depth)


def encode_tree(A, dims, thresholds):
    """Codes of the rows of ``A`` under C trees of depth d (K = 2**d leaves).

    Parameters
    ----------
    A : (N, D) float32 (float16 accepted)
    dims : (C, K-1) int32, absolute column of A tested at each node; the width fixes
        the depth (:func:`tree_depth`)
    thresholds : (C, K-1) float32

    Returns
    -------
    codes : (N, C) uint8 (uint16 for trees deeper than 8: ``code_dtype(K)``), leaf
        reached in each tree (0..K-1)

    Raises ValueError if A holds NaN or Inf (every encoder checks) or if dims'
    width is not 2**d - 1 with 1 <= d <= 10.
    """
    xp = backend.namespace(A, dims, thresholds)
    depth = check_tree(dims, thresholds)
    nnodes = dims.shape[1]
    validate.finite_or_raise(A, "A")
    N = A.shape[0]
    C = dims.shape[0]
    codes = xp.empty((N, C), dtype=code_dtype(nnodes + 1))
    rows = xp.arange(N)
    for c in range(C):
        node = xp.zeros(N, dtype=np.int64)
        for _ in range(depth):
            d = dims[c][node]
            t = thresholds[c][node]
            right = (A[rows, d].astype(np.float32) > t).astype(np.int64)
            node = 2 * node + 1 + right
        codes[:, c] = (node - nnodes).astype(codes.dtype)
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
    codes : (N, C) uint8, each < K
    lut : (C, K, M) float32, any K in 1..1024

    Returns
    -------
    Y : (N, M) float32
    """
    xp = backend.namespace(codes, lut)
    lut_buckets(lut)
    C = lut.shape[0]
    Y = xp.zeros((codes.shape[0], lut.shape[2]), dtype=np.float32)
    for c in range(C):
        Y += lut[c][codes[:, c].astype(np.int64)]
    return Y


def lookup_q(codes, lut_q, scale, bias):
    """8-bit LUT lookup: exact integer sums, then ``isum * scale + bias``.

    Parameters
    ----------
    codes : (N, C) uint8, each < K
    lut_q : (C, K, M) uint8, any K in 1..1024
    scale : (M,) float32
    bias : (M,) float32

    Returns
    -------
    Y : (N, M) float32
    """
    xp = backend.namespace(codes, lut_q)
    lut_buckets(lut_q)
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
    nbuckets : int (K), 1..1024; codes >= K contribute nothing

    Returns
    -------
    grad_lut : (C, K, M) float32, ``sum over n with codes[n, c] == k of grad_Y[n]``
    """
    check_nbuckets(nbuckets)
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
    dims : (C, K-1) int32; thresholds : (C, K-1) float32 (as :func:`encode_tree`)
    lut_q : (C, K, M) uint8; scale, bias : (M,) float32 (as :func:`lookup_q`)
    out_dtype : float32 or float16

    Returns
    -------
    Y : (N, M) ``out_dtype``, ``lookup_q(encode_tree(A, dims, thresholds), lut_q, scale,
        bias)`` rounded once to ``out_dtype``
    """
    Y = lookup_q(encode_tree(A, dims, thresholds), lut_q, scale, bias)
    return Y.astype(out_dtype, copy=False)


def chain(X, layers):
    """A chain of 8-bit LUT layers (a converted network's): each layer's
    :func:`encode_lookup_q` output is the next one's input.

    Parameters
    ----------
    X : (N, D0) float32
    layers : list of dicts with ``dims`` (C, K-1) int32, ``thresholds`` (C, K-1) float32,
        ``lut`` (C, K, M) uint8, ``scale`` and ``bias`` (M,) float32 (same library as X)

    Returns
    -------
    Y : (N, M_last) float32
    """
    for layer in layers:
        X = encode_lookup_q(X, layer["dims"], layer["thresholds"], layer["lut"],
                            layer["scale"], layer["bias"])
    return X
