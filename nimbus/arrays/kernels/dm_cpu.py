"""Numba kernel for the node part of the DM backward on the CPU (NumPy arrays).

Semantics: :func:`.dm_reference.node_gradients` followed by the threshold sum and
the column scatter-add, fused in one pass so that no (N, C, K-1) or (N, C, K)
temporary is made (plain NumPy spent ~50 ms per 256-row batch at C=98 on them).
Trees of any depth d in 1..10 (K = 2**d leaves, read from ``dims.shape[1] == K - 1``).

Thread mapping: ``prange`` over blocks of rows; a row's column gradients are
written only by its block, and each block keeps its own threshold-gradient
partial sums (added afterwards), so threads never write the same element.

The path matrix P is implicit: O(K) work per (row, codebook). The softmax over leaf
scores needs no ``exp`` per element: with hard node signs a leaf's score is
``b = s @ P^T = d - 2 m`` where m counts the nodes on its path that the row
disagrees with (one top-down pass), so ``exp((b - d) / T)`` takes one of d + 1
precomputed values. The node gradients ``gs = gb @ P`` are subtree sums, bottom-up.
"""
from __future__ import annotations


import numpy as np
from numba import njit, prange

from .cpu import _check_columns
from ..validate import tree_depth

_ROWS_PER_BLOCK = 16


@njit(parallel=True, cache=True, nogil=True)
def _node_backward(A, dims, thr, inv_tau, G, etab, inv_temp, want_a, gA, gt_part):
    N = A.shape[0]
    C, nnodes = dims.shape                  # K - 1 heap-ordered nodes, K leaves
    nleaves = nnodes + 1
    nblocks = gt_part.shape[0]
    one = np.float32(1.0)
    for blk in prange(nblocks):
        right = np.empty(nnodes, dtype=np.int64)
        miss = np.empty(2 * nnodes + 1, dtype=np.int64)
        diff = np.empty(nnodes, dtype=np.float32)
        gs = np.empty(nnodes, dtype=np.float32)
        p = np.empty(nleaves, dtype=np.float32)
        sub = np.empty(2 * nnodes + 1, dtype=np.float32)
        n0 = blk * _ROWS_PER_BLOCK
        n1 = min(N, n0 + _ROWS_PER_BLOCK)
        for n in range(n0, n1):
            for c in range(C):
                for j in range(nnodes):
                    diff[j] = A[n, dims[c, j]] - thr[c, j]
                    right[j] = 1 if diff[j] > 0 else 0      # x > t, as the encoder decides
                # disagreements along each path, top-down: a child the row did not
                # take adds one (leaves end up at heap positions K-1..2K-2)
                miss[0] = 0
                for j in range(nnodes):
                    miss[2 * j + 1] = miss[j] + right[j]
                    miss[2 * j + 2] = miss[j] + (1 - right[j])
                # the two sums over the K leaves run in float64: in float32 their
                # rounding grows with K (2.7e-5 of the largest gradient at K = 1024)
                total = 0.0
                for k in range(nleaves):
                    p[k] = etab[miss[nnodes + k]]
                    total += p[k]
                inv_total = np.float32(1.0 / total)
                pg = 0.0
                for k in range(nleaves):
                    p[k] *= inv_total
                    pg += p[k] * G[n, c * nleaves + k]
                pg32 = np.float32(pg)
                for k in range(nleaves):
                    sub[nnodes + k] = p[k] * (G[n, c * nleaves + k] - pg32) * inv_temp
                for j in range(nnodes - 1, -1, -1):
                    gs[j] = sub[2 * j + 2] - sub[2 * j + 1]
                    sub[j] = sub[2 * j + 1] + sub[2 * j + 2]
                # tanh'(z) = 1 - tanh(z)^2 = 4u / (1 + u)^2 with u = exp(-2|z|): one
                # float32 exp (math.tanh would run in float64)
                for j in range(nnodes):
                    it = inv_tau[c, j]
                    u = np.exp(np.float32(-2.0) * abs(diff[j] * it))
                    gx = gs[j] * (np.float32(4.0) * u / ((one + u) * (one + u))) * it
                    gs[j] = gx
                    gt_part[blk, c, j] -= gx
                if want_a:
                    for j in range(nnodes):
                        gA[n, dims[c, j]] += gs[j]


def node_backward(A, dims, thresholds, inv_tau, G, inv_temp, need_a=True):
    """Fused node backward.

    Parameters
    ----------
    A : (N, D) float32; dims : (C, K-1) int32; thresholds, inv_tau : (C, K-1) float32,
        K = 2**d leaves (d in 1..10, from dims' width)
    G : (N, C * K) float32 leaf gradients; inv_temp : float

    Returns
    -------
    grad_A : (N, D) float32 or None; grad_t : (C, K-1) float32
    """
    A = np.ascontiguousarray(A, dtype=np.float32)
    dims = np.ascontiguousarray(dims, dtype=np.int32)
    depth = tree_depth(dims)
    thresholds = np.ascontiguousarray(thresholds, dtype=np.float32)
    inv_tau = np.ascontiguousarray(inv_tau, dtype=np.float32)
    G = np.ascontiguousarray(G, dtype=np.float32)
    N, D = A.shape
    C, nnodes = dims.shape
    # the kernel indexes all of these by (c, node), G by c * K + leaf: no bounds checks
    for name, x in (("thresholds", thresholds), ("inv_tau", inv_tau)):
        if x.shape != dims.shape:
            raise ValueError(f"{name} has shape {x.shape}; it must match dims' {dims.shape}")
    if G.shape != (N, C * (nnodes + 1)):
        raise ValueError(f"G has shape {G.shape}; expected ({N}, {C * (nnodes + 1)})")
    _check_columns(dims, D)
    nblocks = max(1, (N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK)
    etab = np.exp(-2.0 * np.arange(depth + 1) * float(inv_temp)).astype(np.float32)
    gA = np.zeros((N, D) if need_a else (1, 1), dtype=np.float32)
    part = np.zeros((nblocks, C, nnodes), dtype=np.float32)
    _node_backward(A, dims, thresholds, inv_tau, G, etab, np.float32(inv_temp), bool(need_a),
                   gA, part)
    return (gA if need_a else None), part.sum(axis=0)
