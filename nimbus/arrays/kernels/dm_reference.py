"""Differentiable MADDNESS (DM) forward and backward in plain ``xp``: the oracle.

Runs on NumPy or CuPy with the arrays' own library and is what the CuPy
RawKernels of :mod:`.dm_cuda` are tested against. It already uses the efficient
formulation (no O(C^2) matrices, no N x M x C tensor):

* forward: the hard trees and the LUT sum, exactly (``encode_tree`` + ``lookup``);
* backward, per row n and codebook c (trees as in :mod:`.reference`: 15 heap-ordered
  nodes, go right iff ``x > t``):

  - gather the 15 tested values ``x_j = A[n, dims[c, j]]`` (one gather, (N, C, 15));
  - hard node signs ``s_j = +1 if x_j > t_j else -1``; leaf scores ``b = s @ P^T``
    with the one shared 16 x 15 path matrix ``P`` (+1 right, -1 left, 0 off path);
    the reached leaf scores 4, every other leaf less;
  - leaf gradients ``G = grad_Y @ LUT_flat^T``: ONE matmul, (N, M) @ (M, C*16);
  - the one-hot's surrogate is ``softmax(b / T)``: ``gb = p * (G - <p, G>) / T``;
  - node gradients ``gs = gb @ P``; the sign's surrogate derivative is
    ``tanh'((x - t) / tau) / tau``, so ``gx_j = gs_j * (1 - tanh^2(z_j)) / tau_j``;
  - ``grad_t = -sum_n gx`` and ``grad_A`` is the scatter-add of ``gx`` into the
    tested columns;
  - ``grad_LUT`` is the exact scatter-add of ``grad_Y`` rows into the picked
    entries (``lookup_backward``).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from . import reference

NNODES = 15
NLEAVES = 16
DEPTH = 4


def path_matrix(xp=np):
    """The shared path matrix P of a depth-4 tree.

    Returns
    -------
    P : (16, 15) float32; ``P[k, j] = +1`` if leaf k's path goes right at node j,
        ``-1`` if it goes left there, 0 if node j is not on its path.
    """
    P = np.zeros((NLEAVES, NNODES), dtype=np.float32)
    for k in range(NLEAVES):
        node = 0
        for level in range(DEPTH):
            bit = (k >> (DEPTH - 1 - level)) & 1         # most significant bit first
            P[k, node] = 1.0 if bit else -1.0
            node = 2 * node + 1 + bit
    return xp.asarray(P)


def dm_forward(A, dims, thresholds, lut):
    """Hard forward: codes of the trees and the LUT sum.

    Parameters
    ----------
    A : (N, D) float32
    dims : (C, 15) int32, thresholds : (C, 15) float32
    lut : (C, 16, M) float32

    Returns
    -------
    codes : (N, C) uint8
    Y : (N, M) float32, ``sum_c lut[c, codes[n, c]]``
    """
    codes = reference.encode_tree(A, dims, thresholds)
    return codes, reference.lookup(codes, lut)


def leaf_gradients(grad_Y, lut):
    """``G = grad_Y @ LUT_flat^T``: the gradient of the loss w.r.t. each leaf's one-hot.

    Parameters
    ----------
    grad_Y : (N, M) float32; lut : (C, 16, M) float32

    Returns
    -------
    G : (N, C * 16) float32, ``G[n, c*16 + k] = <grad_Y[n], lut[c, k]>``
    """
    C, K, M = lut.shape
    return grad_Y @ lut.reshape(C * K, M).T


def node_gradients(A, dims, thresholds, inv_tau, G, inv_temp):
    """Surrogate gradient of the loss w.r.t. each gathered node input ``x_j``.

    Parameters
    ----------
    A : (N, D) float32; dims : (C, 15) int32; thresholds, inv_tau : (C, 15) float32
    G : (N, C * 16) float32 leaf gradients (see :func:`leaf_gradients`)
    inv_temp : float, 1 / T

    Returns
    -------
    gx : (N, C, 15) float32
    """
    xp = backend.namespace(A)
    N = A.shape[0]
    C = dims.shape[0]
    P = path_matrix(xp)
    X = A[:, dims.reshape(-1).astype(np.int64)].reshape(N, C, NNODES)    # one gather
    diff = X - thresholds[None]
    s = xp.where(diff > 0, np.float32(1), np.float32(-1))
    b = (s.reshape(N * C, NNODES) @ P.T).reshape(N, C, NLEAVES)        # reached leaf: 4
    e = xp.exp((b - np.float32(DEPTH)) * np.float32(inv_temp))           # max exponent 0
    p = e / e.sum(axis=2, keepdims=True)
    Gr = G.reshape(N, C, NLEAVES)
    gb = p * (Gr - (p * Gr).sum(axis=2, keepdims=True)) * np.float32(inv_temp)
    gs = (gb.reshape(N * C, NLEAVES) @ P).reshape(N, C, NNODES)
    th = xp.tanh(diff * inv_tau[None])
    return (gs * (1 - th * th) * inv_tau[None]).astype(np.float32)


def scatter_columns(gx, dims, D):
    """Add the node gradients into the columns they tested.

    Parameters
    ----------
    gx : (N, C, 15) float32; dims : (C, 15) int32; D : int

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
    dims : (C, 15) int32; thresholds : (C, 15) float32
    inv_tau : (C, 15) float32, 1 / tau per node (tau may differ per node)
    lut : (C, 16, M) float32
    codes : (N, C) uint8, the forward's codes
    grad_Y : (N, M) float32, upstream gradient
    inv_temp : float, 1 / T (softmax temperature)
    need_a, need_t, need_lut : which gradients to compute
    lut_grad : optional function ``(codes, grad_Y, nbuckets) -> (C, 16, M)`` for the
        LUT scatter-add (default: :func:`reference.lookup_backward`)

    Returns
    -------
    grad_A : (N, D) float32 or None
    grad_t : (C, 15) float32 or None
    grad_lut : (C, 16, M) float32 or None
    """
    grad_lut = None
    if need_lut:
        grad_lut = (lut_grad or reference.lookup_backward)(codes, grad_Y, NLEAVES)
    grad_A = grad_t = None
    if need_a or need_t:
        G = leaf_gradients(grad_Y, lut)
        gx = node_gradients(A, dims, thresholds, inv_tau, G, inv_temp)
        if need_t:
            grad_t = -gx.sum(axis=0)
        if need_a:
            grad_A = scatter_columns(gx, dims, A.shape[1])
    return grad_A, grad_t, grad_lut
