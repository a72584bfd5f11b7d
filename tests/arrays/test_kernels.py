"""Every kernel of the op table agrees with the plain-array reference.

Codes must match exactly; sums to float32 rounding. Shapes are random and
include the ragged edges: N=1, C=1, M=1, D not a multiple of C. The same bodies
run with xp=numpy (Numba kernels) and xp=cupy (RawKernels, marked gpu).
"""
import re

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


@pytest.mark.parametrize("N,C,M", [(401, 8, 20), (4096, 32, 20), (64, 300, 17),
                                   (3000, 300, 17)])
def test_numba_lookup_q_serial_and_parallel(rng, N, C, M):
    """Small lookups run on one thread, large ones in parallel (16- or 32-bit
    accumulators each): the same exact integer sums as the reference either way."""
    from nimbus.arrays.kernels import cpu
    codes = rng.integers(0, 16, size=(N, C)).astype(np.uint8)
    q = rng.integers(0, 256, size=(C, 16, M)).astype(np.uint8)
    q[:, :, 0] = 255
    ones, zeros = np.ones(M, dtype=np.float32), np.zeros(M, dtype=np.float32)
    exact = sum(q[c].astype(np.int64)[codes[:, c]] for c in range(C)).astype(np.float32)
    parallel = N * C * M >= cpu._LOOKUP_PARALLEL_WORK
    assert parallel == (N >= 3000)                  # the cases cover both paths
    np.testing.assert_array_equal(cpu.lookup_q(codes, q, ones, zeros), exact)


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


# ------------------------------------------------------------------ trees of any depth 1..8
DEPTHS = [1, 2, 3, 4, 5, 8]
DEPTH_SHAPES = [(1, 3, 1, 1), (257, 37, 5, 7), (130, 300, 3, 33)]   # (N, D, C, M)


def _deep_tree_inputs(rng, xp, N, D, C, depth, per_level=False):
    """A, dims, thresholds for depth-``depth`` trees: integer-valued data and thresholds
    (many exact ties), some +inf thresholds; ``per_level`` repeats one column per level."""
    nnodes = 2 ** depth - 1
    A = rng.integers(-4, 5, size=(N, D)).astype(np.float32)
    A[:, : D // 2] += rng.standard_normal((N, D // 2)).astype(np.float32)
    if per_level:
        cols = rng.integers(0, D, size=(C, depth))
        dims = np.repeat(cols, [2 ** level for level in range(depth)], axis=1)
    else:
        dims = rng.integers(0, D, size=(C, nnodes))
    thr = rng.integers(-3, 4, size=(C, nnodes)).astype(np.float32)
    thr[rng.random((C, nnodes)) < 0.1] = np.inf
    return xp.asarray(A), xp.asarray(dims.astype(np.int32)), xp.asarray(thr)


@pytest.mark.parametrize("per_level", [False, True])
@pytest.mark.parametrize("N,D,C,M", DEPTH_SHAPES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_encode_tree_any_depth_matches_reference(xp, rng, depth, N, D, C, M, per_level):
    A, dims, thr = _deep_tree_inputs(rng, xp, N, D, C, depth, per_level)
    got = kernels.encode_tree(A, dims, thr)
    want = ref.encode_tree(A, dims, thr)
    assert got.dtype == np.uint8 and got.shape == (N, C) and type(got) is type(A)
    np.testing.assert_array_equal(_h(got), _h(want))
    assert int(_h(got).max()) < 2 ** depth


@pytest.mark.parametrize("depth", DEPTHS)
def test_encode_tree_any_depth_codes_are_the_path_bits(xp, rng, depth):
    # level l of every tree tests column l against threshold 0: the code's bits, most
    # significant first, are the signs x_l > 0 (x == 0 goes left); an independent oracle
    N, K = 500, 2 ** depth
    A = rng.integers(-2, 3, size=(N, depth + 1)).astype(np.float32)
    dims = np.repeat(np.arange(depth), [2 ** level for level in range(depth)])[None]
    want = sum((A[:, level] > 0).astype(np.int64) << (depth - 1 - level)
               for level in range(depth))
    thr = np.zeros((1, K - 1), dtype=np.float32)
    got = _h(kernels.encode_tree(xp.asarray(A), xp.asarray(dims.astype(np.int32)),
                                 xp.asarray(thr)))
    np.testing.assert_array_equal(got[:, 0], want)
    # the last node (the right-most of the last level) tests the spare column against
    # +inf: every row goes left there, so leaf K-1 becomes K-2; and the trees no longer
    # test one column per level (the per-node kernel on the CPU)
    dims[0, -1] = depth
    thr[0, -1] = np.inf
    got = _h(kernels.encode_tree(xp.asarray(A), xp.asarray(dims.astype(np.int32)),
                                 xp.asarray(thr)))
    np.testing.assert_array_equal(got[:, 0], np.where(want == K - 1, K - 2, want))


@pytest.mark.parametrize("depth", DEPTHS)
def test_encode_tree_any_depth_equal_goes_left(xp, depth):
    K = 2 ** depth
    A = xp.asarray(np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, -1.0]], dtype=np.float32))
    thr = xp.zeros((2, K - 1), dtype=np.float32)
    # tree 0 tests column 0 everywhere (one column per level); tree 1 alternates the two
    # equal columns node by node (a column per node)
    dims = np.zeros((2, K - 1), dtype=np.int32)
    dims[1] = np.arange(K - 1) % 2
    codes = _h(kernels.encode_tree(A, xp.asarray(dims), thr))
    assert codes.T.tolist() == [[0, K - 1, 0], [0, K - 1, 0]]     # x == t goes left
    # +inf everywhere sends every row to leaf 0
    inf = xp.asarray(np.full((2, K - 1), np.inf, dtype=np.float32))
    codes = _h(kernels.encode_tree(A * 1e30, xp.asarray(dims), inf))
    assert codes.T.tolist() == [[0, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("width", [0, 2, 4, 14, 16, 256, 1000, 2047])
def test_bad_dims_width_is_refused(xp, rng, width):
    A = xp.asarray(rng.standard_normal((5, 8)).astype(np.float32))
    dims = xp.zeros((3, width), dtype=np.int32)
    thr = xp.zeros((3, width), dtype=np.float32)
    shape = re.escape(str((3, width)))
    with pytest.raises(ValueError, match=shape):
        kernels.encode_tree(A, dims, thr)
    with pytest.raises(ValueError, match=shape):
        ref.encode_tree(A, dims, thr)
    lut_q = xp.zeros((3, 16, 4), dtype=np.uint8)
    one = xp.ones(4, dtype=np.float32)
    with pytest.raises(ValueError, match=shape):
        kernels.encode_lookup_q(A, dims, thr, lut_q, one, one)
    with pytest.raises(ValueError, match=shape):
        ref.tree_depth(dims)


def test_tree_depth():
    for depth in range(1, 11):
        assert ref.tree_depth(np.zeros((4, 2 ** depth - 1), dtype=np.int32)) == depth
        assert ref.tree_depth(np.zeros((0, 2 ** depth - 1))) == depth
    for bad in (np.zeros(15), np.zeros((2, 15, 1)), np.zeros((2, 2047)), np.zeros((2, 6))):
        with pytest.raises(ValueError, match=re.escape(str(bad.shape))):
            ref.tree_depth(bad)


def test_encode_tree_refuses_mismatched_thresholds(xp):
    A = xp.zeros((4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="thresholds"):
        kernels.encode_tree(A, xp.zeros((2, 7), dtype=np.int32), xp.zeros((2, 15), np.float32))


@pytest.mark.parametrize("N,D,C,M", DEPTH_SHAPES + [(33, 300, 300, 9)])
@pytest.mark.parametrize("depth", DEPTHS)
def test_lookups_with_any_K_match_reference(xp, rng, depth, N, D, C, M):
    K = 2 ** depth
    codes = xp.asarray(rng.integers(0, K, size=(N, C)).astype(np.uint8))
    lut = xp.asarray(rng.standard_normal((C, K, M)).astype(np.float32))
    got = kernels.lookup(codes, lut)
    assert got.dtype == np.float32 and got.shape == (N, M)
    np.testing.assert_allclose(_h(got), _h(ref.lookup(codes, lut)), rtol=1e-5, atol=1e-5 * C)
    q = rng.integers(0, 256, size=(C, K, M)).astype(np.uint8)
    q[:, :, 0] = 255                       # worst case for 16-bit accumulators
    q = xp.asarray(q)
    ones, zeros = xp.ones(M, dtype=np.float32), xp.zeros(M, dtype=np.float32)
    isum = _h(kernels.lookup_q(codes, q, ones, zeros))
    qh, ch = _h(q).astype(np.int64), _h(codes).astype(np.int64)
    exact = sum(qh[c][ch[:, c]] for c in range(C))
    np.testing.assert_array_equal(isum, exact.astype(np.float32))
    scale = xp.asarray(rng.random(M).astype(np.float32) + 0.5)
    bias = xp.asarray(rng.standard_normal(M).astype(np.float32))
    np.testing.assert_allclose(_h(kernels.lookup_q(codes, q, scale, bias)),
                               _h(ref.lookup_q(codes, q, scale, bias)), rtol=1e-6, atol=1e-6)
    g = xp.asarray(rng.standard_normal((N, M)).astype(np.float32))
    gl = _h(kernels.lookup_backward(codes, g, K))
    assert gl.shape == (C, K, M) and gl.dtype == np.float32
    want = np.zeros((C, K, M))
    for c in range(C):
        np.add.at(want[c], ch[:, c], _h(g).astype(np.float64))
    np.testing.assert_allclose(gl, want, rtol=1e-4, atol=1e-4 * np.sqrt(N))
    np.testing.assert_allclose(_h(ref.lookup_backward(codes, g, K)), want, rtol=1e-4,
                               atol=1e-4 * np.sqrt(N))


@pytest.mark.parametrize("K", [1, 2, 16, 64, 256])
def test_lookup_codes_past_K_are_taken_mod_K(xp, rng, K):
    # memory safety: a code >= K (power of two) reads bucket code mod K, never past the LUT
    N, C, M = 70, 3, 5
    codes = rng.integers(0, 256, size=(N, C)).astype(np.uint8)
    lut = rng.standard_normal((C, K, M)).astype(np.float32)
    q = rng.integers(0, 256, size=(C, K, M)).astype(np.uint8)
    one, zero = xp.ones(M, dtype=np.float32), xp.zeros(M, dtype=np.float32)
    wrapped = xp.asarray((codes.astype(np.int64) % K).astype(np.uint8))
    codes, lut, q = xp.asarray(codes), xp.asarray(lut), xp.asarray(q)
    np.testing.assert_array_equal(_h(kernels.lookup(codes, lut)),
                                  _h(kernels.lookup(wrapped, lut)))
    np.testing.assert_array_equal(_h(kernels.lookup_q(codes, q, one, zero)),
                                  _h(kernels.lookup_q(wrapped, q, one, zero)))


def test_lookup_backward_ignores_codes_past_K_on_the_cpu(rng):
    # the reference drops codes >= nbuckets; the Numba scatter must not write past the end
    N, C, M, K = 200, 4, 6, 8
    codes = rng.integers(0, 256, size=(N, C)).astype(np.uint8)
    g = rng.standard_normal((N, M)).astype(np.float32)
    got = kernels.lookup_backward(codes, g, K)
    np.testing.assert_allclose(got, ref.lookup_backward(codes, g, K), rtol=1e-5, atol=1e-5)
    for bad in (0, 1025, 2.0, True):
        with pytest.raises(ValueError, match="nbuckets"):
            kernels.lookup_backward(codes, g, bad)


@pytest.mark.parametrize("depth", DEPTHS)
def test_encode_lookup_q_any_depth_matches_reference(xp, rng, depth):
    N, D, C, M = 300, 40, 6, 19
    K = 2 ** depth
    A, dims, thr = _deep_tree_inputs(rng, xp, N, D, C, depth)
    q = xp.asarray(rng.integers(0, 256, size=(C, K, M)).astype(np.uint8))
    scale = xp.asarray(rng.random(M).astype(np.float32) + 0.5)
    bias = xp.asarray(rng.standard_normal(M).astype(np.float32))
    got = kernels.encode_lookup_q(A, dims, thr, q, scale, bias)
    assert got.dtype == np.float32 and got.shape == (N, M)
    want = ref.lookup_q(ref.encode_tree(A, dims, thr), q, scale, bias)
    np.testing.assert_allclose(_h(got), _h(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_h(ref.encode_lookup_q(A, dims, thr, q, scale, bias)), _h(want),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the Numba PQ encoder
def _pq_codes_float64(A, cent, starts):
    """The Numba encoder's arithmetic in NumPy: per centroid, the float32 squares summed in
    float64 in column order (cumsum is sequential), the first k at the minimum."""
    codes = np.empty((A.shape[0], cent.shape[0]), dtype=np.uint8)
    for c in range(cent.shape[0]):
        a = A[:, starts[c]:starts[c + 1]]
        sq = ((a[:, None, :] - cent[c, :, :a.shape[1]][None]) ** 2).astype(np.float64)
        d = np.cumsum(sq, axis=2)[:, :, -1] if a.shape[1] else np.zeros(sq.shape[:2])
        codes[:, c] = np.argmin(d, axis=1)
    return codes


@pytest.mark.parametrize("N,D,C,K", [(1, 3, 1, 16), (400, 64, 2, 16), (400, 64, 32, 16),
                                     (130, 37, 5, 3), (70, 20, 7, 200), (5000, 64, 16, 16)])
def test_numba_encode_pq_is_bitwise_its_float64_sums(rng, N, D, C, K):
    # integer data: many exact ties, which must go to the lowest k; (5000, 64, 16, 16) takes
    # the parallel kernel, the others the serial one
    from nimbus.arrays.kernels import cpu
    starts = subspace_starts(D, C)
    W = int(np.diff(starts).max())
    A = rng.integers(-3, 4, size=(N, D)).astype(np.float32)
    A[::2] += (rng.standard_normal((len(A[::2]), D)) * 1e-3).astype(np.float32)
    cent = rng.integers(-3, 4, size=(C, K, W)).astype(np.float32)
    cent[:, ::3] += (rng.standard_normal(cent[:, ::3].shape) * 0.5).astype(np.float32)
    np.testing.assert_array_equal(cpu.encode_pq(A, cent, starts),
                                  _pq_codes_float64(A, cent, starts))


def test_numba_encode_pq_checks_starts(rng):
    from nimbus.arrays.kernels import cpu
    A = rng.standard_normal((10, 8)).astype(np.float32)
    cent = np.zeros((2, 16, 4), dtype=np.float32)
    for bad in ([0, 4, 9], [0, 5, 8], [1, 0, 4], [0, 4]):
        with pytest.raises(ValueError, match="starts"):
            cpu.encode_pq(A, cent, np.array(bad))
