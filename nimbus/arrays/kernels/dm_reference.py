"""Differentiable MADDNESS (DM) forward and backward in plain ``xp``: the oracle.

Runs on NumPy or CuPy with the arrays' own library and is what the CuPy
RawKernels of :mod:`.dm_cuda` are tested against. It already uses the efficient
formulation (no O(C^2) matrices, no N x M x C tensor, no dense path matrix):

* forward: the hard trees and the LUT sum, exactly (``encode_tree`` + ``lookup``);
* backward, per row n and codebook c (trees as in :mod:`.reference`: depth d in
  1..10 read from ``dims.shape[1] == K - 1``, K = 2**d leaves, heap-ordered nodes,
  go right iff ``x > t``):

  - gather the K-1 tested values ``x_j = A[n, dims[c, j]]`` (one gather, (N, C, K-1));
  - hard node signs ``s_j = +1 if x_j > t_j else -1``; leaf scores ``b = s @ P^T``
    with the shared K x (K-1) path matrix ``P`` (+1 right, -1 left, 0 off path);
    the reached leaf scores d, every other leaf less. ``P`` is never built:
    :func:`leaf_scores` walks the tree top-down (a child adds ``-s`` or ``+s`` of its
    parent to the parent's score), O(K) per (row, codebook) instead of O(K^2);
  - leaf gradients ``G = grad_Y @ LUT_flat^T``: ONE matmul, (N, M) @ (M, C*K);
  - the one-hot's surrogate is ``softmax(b / T)``, computed as
    ``exp((b - d) / T)`` normalised (max exponent 0);
    ``gb = p * (G - <p, G>) / T``;
  - node gradients ``gs = gb @ P``: :func:`node_sums` sums bottom-up,
    ``gs_j = (sum of gb over the right subtree of j) - (sum over the left subtree)``;
    the sign's surrogate derivative is ``tanh'((x - t) / tau) / tau``, so
    ``gx_j = gs_j * (1 - tanh^2(z_j)) / tau_j``;
  - ``grad_t = -sum_n gx`` and ``grad_A`` is the scatter-add of ``gx`` into the
    tested columns;
  - ``grad_LUT`` is the exact scatter-add of ``grad_Y`` rows into the picked
    entries (``lookup_backward`` with K buckets).
"""
from __future__ import annotations

import numpy as np

from .. import backend, validate
from . import reference
from ..validate import check_dm, tree_depth

# the default depth-4 tree (kept for modules that import them)
NNODES = 15
NLEAVES = 16
DEPTH = 4


def path_matrix(depth=DEPTH, xp=np):
    """The path matrix P of a tree of depth ``depth``, for tests and small depths.

    Parameters
    ----------
    depth : int, 1..10
    xp : array module of the result

    Returns
    -------
    P : (K, K-1) float32 with K = 2**depth; ``P[k, j] = +1`` if leaf k's path goes
        right at node j, ``-1`` if it goes left there, 0 if node j is not on its path.
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) \
            or not 1 <= depth <= validate.MAX_DEPTH:
        raise ValueError(f"depth must be an int in 1..{validate.MAX_DEPTH}; got {depth!r}")
    K = 1 << depth
    P = np.zeros((K, K - 1), dtype=np.float32)
    for k in range(K):
        node = 0
        for level in range(depth):
            bit = (k >> (depth - 1 - level)) & 1         # most significant bit first
            P[k, node] = 1.0 if bit else -1.0
            node = 2 * node + 1 + bit
    return xp.asarray(P)


def leaf_scores(s):
    """``b = s @ P^T`` without P: every leaf's score from the node signs, top-down.

    Parameters
    ----------
    s : (..., K-1) float32, a value per heap-ordered node (the hard signs +-1, or any)

    Returns
    -------
    b : (..., K) float32, ``b[k] = sum over the nodes j on leaf k's path of
        (+s_j if the path goes right at j else -s_j)``; O(K) work per tree.
    """
    xp = backend.namespace(s)
    depth = validate.depth_of_nodes(s.shape[-1], f"s of shape {tuple(s.shape)}")
    lead = s.shape[:-1]
    b = xp.zeros(lead + (1,), dtype=s.dtype)
    for level in range(depth):
        lo = (1 << level) - 1
        sl = s[..., lo:2 * lo + 1]                      # the 2**level nodes of this level
        # children of level position i sit at 2i (left) and 2i + 1 (right) one level down
        b = xp.stack([b - sl, b + sl], axis=-1).reshape(lead + (2 << level,))
    return b


def node_sums(gb):
    """``gs = gb @ P`` without P: per node, right-subtree sum minus left-subtree sum.

    Parameters
    ----------
    gb : (..., K) float32, a value per leaf

    Returns
    -------
    gs : (..., K-1) float32, ``gs[j] = sum of gb over the leaves under j's right child
        - sum over the leaves under its left child``; O(K) work per tree (bottom-up).
    """
    xp = backend.namespace(gb)
    K = gb.shape[-1]
    depth = validate.depth_of_nodes(K - 1, f"gb of shape {tuple(gb.shape)} (K - 1)")
    lead = gb.shape[:-1]
    sub = gb                                             # subtree sums, one level at a time
    levels = []
    for level in range(depth - 1, -1, -1):
        pairs = sub.reshape(lead + (1 << level, 2))       # (left child, right child)
        levels.append(pairs[..., 1] - pairs[..., 0])
        sub = pairs[..., 0] + pairs[..., 1]
    return xp.concatenate(levels[::-1], axis=-1)


def dm_forward(A, dims, thresholds, lut):
    """Hard forward: codes of the trees and the LUT sum.

    Parameters
    ----------
    A : (N, D) float32
    dims : (C, K-1) int32, thresholds : (C, K-1) float32 (K = 2**d, d in 1..10)
    lut : (C, K, M) float32

    Returns
    -------
    codes : (N, C) uint8
    Y : (N, M) float32, ``sum_c lut[c, codes[n, c]]``
    """
    check_dm(dims, thresholds, lut)
    codes = reference.encode_tree(A, dims, thresholds)
    return codes, reference.lookup(codes, lut)


def leaf_gradients(grad_Y, lut):
    """``G = grad_Y @ LUT_flat^T``: the gradient of the loss w.r.t. each leaf's one-hot.

    Parameters
    ----------
    grad_Y : (N, M) float32; lut : (C, K, M) float32

    Returns
    -------
    G : (N, C * K) float32, ``G[n, c*K + k] = <grad_Y[n], lut[c, k]>``
    """
    C, K, M = lut.shape
    return grad_Y @ lut.reshape(C * K, M).T


def check_factors(factors, lut):
    """Check the factors ``(proto, weight, cols, mask)`` of a factored LUT against ``lut``.

    proto : (C, K, w); weight : (D, M); cols : (C, w) int; mask : (C, w), where lut is
    (C, K, M) and ``lut[c] = proto[c] @ (weight[cols[c]] * mask[c][:, None])``.
    Raises ValueError naming the operand whose shape disagrees.
    """
    if not isinstance(factors, (tuple, list)) or len(factors) != 4:
        raise TypeError("factors must be a tuple (proto, weight, cols, mask)")
    proto, weight, cols, mask = factors
    C, K, M = lut.shape
    if proto.ndim != 3 or tuple(proto.shape[:2]) != (C, K):
        raise ValueError(f"factors: proto has shape {tuple(proto.shape)}; expected ({C}, {K}, w)"
                         f" for a LUT of shape {tuple(lut.shape)}")
    w = proto.shape[2]
    if weight.ndim != 2 or weight.shape[1] != M:
        raise ValueError(f"factors: weight has shape {tuple(weight.shape)}; expected (D, {M})")
    for name, x in (("cols", cols), ("mask", mask)):
        if tuple(x.shape) != (C, w):
            raise ValueError(f"factors: {name} has shape {tuple(x.shape)}; expected ({C}, {w})")


def factored_leaf_gradients(grad_Y, proto, weight, cols, mask):
    """:func:`leaf_gradients` of a factored LUT, ``lut[c] = proto[c] @ weight[cols[c]]``
    (padded columns masked), without the LUT:
    ``G[n, c*K + k] = <(grad_Y @ weight^T)[n, cols[c]] * mask[c], proto[c, k]>``.

    One (N, M) @ (M, D) product and C small (N, w) @ (w, K) ones: N*D*M + N*C*K*w
    multiply-adds instead of the N*C*K*M of ``grad_Y @ LUT_flat^T`` (M / w times fewer
    when D ~ C*w: 32x at M = 256, w = 8).

    Parameters
    ----------
    grad_Y : (N, M) float32; proto : (C, K, w) float32; weight : (D, M) float32
    cols : (C, w) int subspace columns (padded); mask : (C, w) float32, 0 on padding

    Returns
    -------
    G : (N, C * K) float32, C-contiguous
    """
    xp = backend.namespace(grad_Y)
    N = grad_Y.shape[0]
    C, K, _ = proto.shape
    gq = grad_Y @ weight.T                                   # (N, D): grad of the quantized input
    sub = gq[:, cols] * mask[None]                           # (N, C, w)
    G = xp.matmul(sub.transpose(1, 0, 2), proto.transpose(0, 2, 1))     # (C, N, K)
    return xp.ascontiguousarray(G.transpose(1, 0, 2), dtype=np.float32).reshape(N, C * K)


def node_gradients(A, dims, thresholds, inv_tau, G, inv_temp):
    """Surrogate gradient of the loss w.r.t. each gathered node input ``x_j``.

    Parameters
    ----------
    A : (N, D) float32; dims : (C, K-1) int32; thresholds, inv_tau : (C, K-1) float32
    G : (N, C * K) float32 leaf gradients (see :func:`leaf_gradients`)
    inv_temp : float, 1 / T

    Returns
    -------
    gx : (N, C, K-1) float32
    """
    xp = backend.namespace(A)
    depth = tree_depth(dims)
    N = A.shape[0]
    C, nnodes = dims.shape
    K = nnodes + 1
    if tuple(G.shape) != (N, C * K):
        raise ValueError(f"G has shape {tuple(G.shape)}; expected ({N}, {C * K})")
    X = A[:, dims.reshape(-1).astype(np.int64)].reshape(N, C, nnodes)    # one gather
    diff = X - thresholds[None]
    s = xp.where(diff > 0, np.float32(1), np.float32(-1))
    b = leaf_scores(s)                                                    # reached leaf: d
    e = xp.exp((b - np.float32(depth)) * np.float32(inv_temp))            # max exponent 0
    p = e / e.sum(axis=2, keepdims=True)
    Gr = G.reshape(N, C, K)
    gb = p * (Gr - (p * Gr).sum(axis=2, keepdims=True)) * np.float32(inv_temp)
    gs = node_sums(gb)
    th = xp.tanh(diff * inv_tau[None])
    return (gs * (1 - th * th) * inv_tau[None]).astype(np.float32)


def scatter_columns(gx, dims, D):
    """Add the node gradients into the columns they tested.

    Parameters
    ----------
    gx : (N, C, K-1) float32; dims : (C, K-1) int32; D : int

    Returns
    -------
    grad_A : (N, D) float32, ``grad_A[n, d] = sum over (c, j) with dims[c, j] == d``
    """
    xp = backend.namespace(gx)
    N = gx.shape[0]
    flat = (xp.arange(N, dtype=np.int64)[:, None] * D
            + dims.reshape(-1).astype(np.int64)[None, :]).reshape(-1)
    out = xp.bincount(flat, weights=gx.reshape(-1), minlength=N * D)
    return out.reshape(N, D).astype(np.float32)


def dm_backward(A, dims, thresholds, inv_tau, lut, codes, grad_Y, inv_temp,
                need_a=True, need_t=True, need_lut=True, lut_grad=None):
    """Surrogate gradients of the DM op w.r.t. its input, thresholds and LUT.

    Parameters
    ----------
    A : (N, D) float32, the forward's input
    dims : (C, K-1) int32; thresholds : (C, K-1) float32 (K = 2**d, d in 1..10)
    inv_tau : (C, K-1) float32, 1 / tau per node (tau may differ per node)
    lut : (C, K, M) float32
    codes : (N, C) uint8, the forward's codes
    grad_Y : (N, M) float32, upstream gradient
    inv_temp : float, 1 / T (softmax temperature)
    need_a, need_t, need_lut : which gradients to compute
    lut_grad : optional function ``(codes, grad_Y, nbuckets) -> (C, K, M)`` for the
        LUT scatter-add (default: :func:`reference.lookup_backward`)

    Returns
    -------
    grad_A : (N, D) float32 or None
    grad_t : (C, K-1) float32 or None
    grad_lut : (C, K, M) float32 or None
    """
    check_dm(dims, thresholds, lut, inv_tau)
    grad_lut = None
    if need_lut:
        grad_lut = (lut_grad or reference.lookup_backward)(codes, grad_Y, lut.shape[1])
    grad_A = grad_t = None
    if need_a or need_t:
        G = leaf_gradients(grad_Y, lut)
        gx = node_gradients(A, dims, thresholds, inv_tau, G, inv_temp)
        if need_t:
            grad_t = -gx.sum(axis=0)
        if need_a:
            grad_A = scatter_columns(gx, dims, A.shape[1])
    return grad_A, grad_t, grad_lut
