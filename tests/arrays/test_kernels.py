"""Every kernel of the op table agrees with the plain-array reference.

Codes must match exactly; sums to float32 rounding. Shapes are random and
include the ragged edges: N=1, C=1, M=1, D not a multiple of C. The same bodies
run with xp=numpy (Numba kernels) and xp=cupy (RawKernels, marked gpu).
"""
import numpy as np
import pytest

from nimbus.arrays import kernels
from nimbus.arrays.kernels import reference as ref
from nimbus.strategies import subspace_starts

SHAPES = [  # (N, D, C, M)
    (1, 1, 1, 1), (1, 7, 3, 5), (2, 16, 16, 1), (257, 37, 5, 7), (1000, 64, 16, 33),
    (3, 100, 1, 130), (517, 129, 32, 16),
]


def _tree_inputs(rng, xp, N, D, C, with_ties=True):
    # integer-valued data so that many entries equal a threshold exactly
    A = rng.integers(-4, 5, size=(N, D)).astype(np.float32)
    A[:, : D // 2] += rng.standard_normal((N, D // 2)).astype(np.float32)
    dims = rng.integers(0, D, size=(C, 15)).astype(np.int32)
    if with_ties:
        thr = rng.integers(-3, 4, size=(C, 15)).astype(np.float32)
    else:
        thr = rng.standard_normal((C, 15)).astype(np.float32)
    thr[rng.random((C, 15)) < 0.1] = np.inf
    return xp.asarray(A), xp.asarray(dims), xp.asarray(thr)


def _h(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


@pytest.mark.parametrize("N,D,C,M", SHAPES)
def test_encode_tree_matches_reference(xp, rng, N, D, C, M):
    A, dims, thr = _tree_inputs(rng, xp, N, D, C)
    got = kernels.encode_tree(A, dims, thr)
    want = ref.encode_tree(A, dims, thr)
    assert got.dtype == np.uint8 and got.shape == (N, C)
    assert type(got) is type(A)
    np.testing.assert_array_equal(_h(got), _h(want))


def test_encode_tree_equal_goes_left(xp):
    # one tree testing column 0 at every node with threshold 0: x == 0 -> all left -> leaf 0
    A = xp.asarray(np.array([[0.0], [1.0], [-1.0]], dtype=np.float32))
    dims = xp.zeros((1, 15), dtype=np.int32)
    thr = xp.zeros((1, 15), dtype=np.float32)
    codes = _h(kernels.encode_tree(A, dims, thr))
    assert codes[:, 0].tolist() == [0, 15, 0]


@pytest.mark.parametrize("N,D,C,M", SHAPES)
def test_encode_pq_matches_reference(xp, rng, N, D, C, M):
    A = xp.asarray(rng.standard_normal((N, D)).astype(np.float32))
    starts = subspace_starts(D, C)
    W = int(np.diff(starts).max())
    cent = np.zeros((C, 16, W), dtype=np.float32)
    for c in range(C):
        w = starts[c + 1] - starts[c]
        cent[c, :, :w] = rng.standard_normal((16, w))
    cent = xp.asarray(cent)
    got = _h(kernels.encode_pq(A, cent, starts))
    want = _h(ref.encode_pq(A, cent, starts))
    # distances are summed in another order: a code may differ only at an exact near-tie,
    # where the chosen centroid is as close as the best one to float32 rounding
    Ah, ch = _h(A).astype(np.float64), _h(cent).astype(np.float64)
    for c in range(C):
        a = Ah[:, starts[c]:starts[c + 1]]
        d = ((a[:, None, :] - ch[c, :, : a.shape[1]][None]) ** 2).sum(-1)
        best = d.min(axis=1)
        chosen = d[np.arange(N), got[:, c]]
        np.testing.assert_allclose(chosen, best, rtol=1e-5, atol=1e-5)
    assert (got == want).mean() >= 0.99


@pytest.mark.parametrize("N,D,C,M", SHAPES)
def test_lookup_matches_reference(xp, rng, N, D, C, M):
    codes = xp.asarray(rng.integers(0, 16, size=(N, C)).astype(np.uint8))
    lut = xp.asarray(rng.standard_normal((C, 16, M)).astype(np.float32))
    got = kernels.lookup(codes, lut)
    assert got.dtype == np.float32 and got.shape == (N, M)
    np.testing.assert_allclose(_h(got), _h(ref.lookup(codes, lut)), rtol=1e-5, atol=1e-5 * C)


@pytest.mark.parametrize("N,D,C,M", SHAPES + [(33, 300, 300, 9)])
def test_lookup_q_exact_integer_sums(xp, rng, N, D, C, M):
    codes = xp.asarray(rng.integers(0, 16, size=(N, C)).astype(np.uint8))
    q = rng.integers(0, 256, size=(C, 16, M)).astype(np.uint8)
    q[:, :, 0] = 255                       # worst case for 16-bit accumulators
    q = xp.asarray(q)
    scale = xp.asarray(rng.random(M).astype(np.float32) + 0.5)
    bias = xp.asarray(rng.standard_normal(M).astype(np.float32))
    got = _h(kernels.lookup_q(codes, q, scale, bias))
    want = _h(ref.lookup_q(codes, q, scale, bias))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # with scale 1 and bias 0 the result is the integer sum itself, exactly
    ones, zeros = xp.ones(M, dtype=np.float32), xp.zeros(M, dtype=np.float32)
    isum = _h(kernels.lookup_q(codes, q, ones, zeros))
    qh, ch = _h(q).astype(np.int64), _h(codes).astype(np.int64)
    exact = sum(qh[c][ch[:, c]] for c in range(C))
    np.testing.assert_array_equal(isum, exact.astype(np.float32))


@pytest.mark.parametrize("N,D,C,M", SHAPES)
def test_lookup_backward_is_scatter_add(xp, rng, N, D, C, M):
    codes = xp.asarray(rng.integers(0, 16, size=(N, C)).astype(np.uint8))
    g = xp.asarray(rng.standard_normal((N, M)).astype(np.float32))
    got = _h(kernels.lookup_backward(codes, g))
    want = _h(ref.lookup_backward(codes, g))
    assert got.shape == (C, 16, M)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(N))


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="unknown kernel op"):
        kernels.implementation("nope")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("level_dims", [True, False])
def test_encoders_reject_nonfinite(xp, rng, bad, level_dims):
    N, D, C = 300, 20, 4
    A, dims, thr = _tree_inputs(rng, xp, N, D, C)
    if level_dims:   # one column per level takes the level kernel
        d = rng.integers(0, D, size=(C, 4))
        dims = xp.asarray(np.repeat(d, [1, 2, 4, 8], axis=1).astype(np.int32))
    n, j = int(rng.integers(0, N)), int(rng.integers(0, D))
    A[n, j] = bad
    with pytest.raises(ValueError, match=rf"non-finite.*\({n}, {j}\)"):
        kernels.encode_tree(A, dims, thr)
    starts = subspace_starts(D, C)
    cent = xp.zeros((C, 16, int(np.diff(starts).max())), dtype=np.float32)
    with pytest.raises(ValueError, match=rf"non-finite.*\({n}, {j}\)"):
        kernels.encode_pq(A, cent, starts)
