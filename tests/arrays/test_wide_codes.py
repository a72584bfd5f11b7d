"""Trees of depth 9 and 10: codes wider than a byte (uint16, K = 512 or 1024 leaves).

The Numba kernels take uint8 and uint16 codes; on CuPy the depth-templated kernels of
dm_cuda serve the wide encode, float and 8-bit lookups, LUT scatter-add and DM ops (the
reference where K is not a power of two). Checked here against independent oracles (a per-row tree
walk, per-row sums, and the dense path-matrix form of the DM backward), on NumPy and
(marked gpu) CuPy; the byte-tuned CUDA kernels refuse deep trees with a ValueError.
"""
import numpy as np
import pytest

from nimbus.arrays import backend, kernels, validate
from nimbus.arrays.kernels import cpu as cpu_kernels
from nimbus.arrays.kernels import dm_reference
from nimbus.arrays.kernels import reference as ref


def _h(x):
    return backend.to_host(x)


def _trees(rng, depth, N=60, D=12, C=3):
    # integer-valued data: many entries equal a threshold (equal goes left)
    A = rng.integers(-4, 5, size=(N, D)).astype(np.float32)
    A[:, : D // 2] += rng.standard_normal((N, D // 2)).astype(np.float32)
    dims = rng.integers(0, D, size=(C, 2 ** depth - 1)).astype(np.int32)
    thr = rng.integers(-3, 4, size=(C, 2 ** depth - 1)).astype(np.float32)
    return A, dims, thr


def _walk(A, dims, thr):
    """Leaf of every row in every tree, one row at a time (heap order, right iff x > t)."""
    N, C, nn = A.shape[0], dims.shape[0], dims.shape[1]
    out = np.zeros((N, C), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            node = 0
            while node < nn:
                node = 2 * node + (2 if A[n, dims[c, node]] > thr[c, node] else 1)
            out[n, c] = node - nn
    return out


@pytest.mark.parametrize("depth", [9, 10])
def test_encode_tree_deep_matches_a_tree_walk(xp, rng, depth):
    A, dims, thr = _trees(rng, depth)
    codes = kernels.encode_tree(xp.asarray(A), xp.asarray(dims), xp.asarray(thr))
    assert codes.dtype == np.uint16 and type(codes) is type(xp.asarray(A))
    np.testing.assert_array_equal(_h(codes).astype(np.int64), _walk(A, dims, thr))
    assert ref.code_dtype(256) == np.uint8 and ref.code_dtype(257) == np.uint16


@pytest.mark.parametrize("K", [512, 1024])
def test_lookups_with_wide_codes_match_row_sums(xp, rng, K):
    N, C, M = 40, 3, 5
    codes = rng.integers(0, K, size=(N, C)).astype(np.uint16)
    lut = rng.standard_normal((C, K, M)).astype(np.float32)
    want = np.array([sum(lut[c, codes[n, c]] for c in range(C)) for n in range(N)])
    got = kernels.lookup(xp.asarray(codes), xp.asarray(lut))
    np.testing.assert_allclose(_h(got), want, rtol=1e-5, atol=1e-5)
    q = rng.integers(0, 256, size=(C, K, M)).astype(np.uint8)
    scale = rng.uniform(0.5, 2, size=M).astype(np.float32)
    bias = rng.standard_normal(M).astype(np.float32)
    isum = np.array([sum(q[c, codes[n, c]].astype(np.int64) for c in range(C)) for n in range(N)])
    got = kernels.lookup_q(xp.asarray(codes), xp.asarray(q), xp.asarray(scale), xp.asarray(bias))
    np.testing.assert_allclose(_h(got), isum * scale + bias, rtol=1e-6, atol=1e-4)
    gY = rng.standard_normal((N, M)).astype(np.float32)
    want = np.zeros((C, K, M))
    for n in range(N):
        for c in range(C):
            want[c, codes[n, c]] += gY[n]
    got = kernels.lookup_backward(xp.asarray(codes), xp.asarray(gY), K)
    np.testing.assert_allclose(_h(got), want, rtol=1e-5, atol=1e-5)


def test_dm_backward_depth_9_matches_the_dense_path_matrix(xp, rng):
    depth, T = 9, 0.7
    A, dims, thr = _trees(rng, depth, N=20, D=10, C=2)
    K, M = 2 ** depth, 4
    lut = rng.standard_normal((2, K, M)).astype(np.float32)
    inv_tau = rng.uniform(0.5, 2.0, size=dims.shape).astype(np.float32)
    gY = rng.standard_normal((20, M)).astype(np.float32)
    args = [xp.asarray(a) for a in (A, dims, thr, inv_tau, lut)]
    codes, Y = kernels.dm_forward(args[0], args[1], args[2], args[4])
    assert codes.dtype == np.uint16
    gA, gt, glut = kernels.dm_backward(*args, codes, xp.asarray(gY), 1.0 / T)
    # dense oracle: b = s @ P^T, p = softmax(b / T), gb = p (G - <p, G>) / T, gs = gb @ P
    P = _h(dm_reference.path_matrix(depth)).astype(np.float64)
    want_A = np.zeros(A.shape)
    want_t = np.zeros(thr.shape)
    for c in range(2):
        x = A[:, dims[c]].astype(np.float64)
        s = np.where(x > thr[c], 1.0, -1.0)
        b = s @ P.T
        p = np.exp((b - b.max(axis=1, keepdims=True)) / T)
        p /= p.sum(axis=1, keepdims=True)
        G = gY.astype(np.float64) @ lut[c].T.astype(np.float64)
        gb = p * (G - (p * G).sum(axis=1, keepdims=True)) / T
        gx = (gb @ P) * (1 - np.tanh((x - thr[c]) * inv_tau[c]) ** 2) * inv_tau[c]
        want_t[c] = -gx.sum(axis=0)
        np.add.at(want_A, (np.arange(20)[:, None], dims[c][None, :]), gx)
    np.testing.assert_allclose(_h(gt), want_t, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_h(gA), want_A, rtol=1e-4, atol=1e-4)
    assert _h(glut).shape == (2, K, M)


@pytest.mark.parametrize("depth", [9, 10])
def test_numba_kernels_take_deep_trees(rng, depth):
    A, dims, thr = _trees(rng, depth)
    codes = cpu_kernels.encode_tree(A, dims, thr)
    assert codes.dtype == np.uint16
    np.testing.assert_array_equal(codes.astype(np.int64), _walk(A, dims, thr))
    # a per-level tree (one column per level) takes the level kernel
    ldims = np.repeat(rng.integers(0, A.shape[1], size=(3, depth)), 2 ** np.arange(depth),
                      axis=1).astype(np.int32)
    np.testing.assert_array_equal(cpu_kernels.encode_tree(A, ldims, thr).astype(np.int64),
                                  _walk(A, ldims, thr))
    with pytest.raises(ValueError, match="depth d in 1..10"):
        kernels.encode_tree(A, rng.integers(0, 12, size=(3, 2047)).astype(np.int32),
                            np.zeros((3, 2047), np.float32))


def test_numba_lookups_keep_wide_codes_in_bounds(rng):
    """Codes >= K: mod K for K a power of two, clamped to K - 1 otherwise; a uint16 code is
    never narrowed to a byte first (300 would read bucket 44)."""
    C, M = 2, 3
    codes = np.array([[300, 5], [1023, 599], [44, 0]], dtype=np.uint16)
    for K in (512, 400, 64, 100):
        lut = rng.standard_normal((C, K, M)).astype(np.float32)
        bucket = codes % K if K & (K - 1) == 0 else np.minimum(codes, K - 1)
        want = lut[0, bucket[:, 0]] + lut[1, bucket[:, 1]]
        np.testing.assert_allclose(cpu_kernels.lookup(codes, lut), want, rtol=1e-6)
        q = rng.integers(0, 256, size=(C, K, M)).astype(np.uint8)
        isum = q[0, bucket[:, 0]].astype(np.int64) + q[1, bucket[:, 1]]
        one = np.ones(M, np.float32)
        np.testing.assert_array_equal(cpu_kernels.lookup_q(codes, q, one, 0 * one), isum)
        gY = rng.standard_normal((3, M)).astype(np.float32)
        got = cpu_kernels.lookup_backward(codes, gY, K)
        want = np.zeros((C, K, M))
        for n in range(3):
            for c in range(C):
                if codes[n, c] < K:                       # codes >= K add nothing
                    want[c, codes[n, c]] += gY[n]
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.gpu
def test_byte_cuda_kernels_refuse_deep_trees(rng):
    cp = backend.cupy()
    from nimbus.arrays.kernels import cuda
    A, dims, thr = (cp.asarray(a) for a in _trees(rng, 9))
    with pytest.raises(ValueError, match="depth d in 1..8"):
        cuda.encode_tree(A, dims, thr)


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [9, 10])
def test_op_table_sends_wide_gpu_ops_to_dm_cuda(rng, depth):
    """On CuPy, wide encode / lookup / scatter-add run the depth-templated dm_cuda kernels
    (checked against the oracle in tests/nn/test_dm.py); K not a power of two runs the
    reference; the encode still refuses NaN."""
    cp = backend.cupy()
    from nimbus.arrays.kernels import dm_cuda
    A, dims, thr = _trees(rng, depth, N=300)
    codes = kernels.encode_tree(cp.asarray(A), cp.asarray(dims), cp.asarray(thr))
    np.testing.assert_array_equal(_h(codes).astype(np.int64), _walk(A, dims, thr))
    K = 2 ** depth
    assert kernels._wide_gpu("encode_tree", K) is dm_cuda.encode
    assert kernels._wide_gpu("lookup", K) is dm_cuda.lookup
    assert kernels._wide_gpu("lookup_backward", K) is dm_cuda.lut_grad
    assert kernels._wide_gpu("lookup", 600) is ref.lookup           # not a power of two
    assert kernels._wide_gpu("lookup_q", K) is dm_cuda.lookup_q
    assert kernels._wide_gpu("lookup_q", 600) is ref.lookup_q
    # the 8-bit lookup kernel: bitwise the reference (exact integer sums, same rounding)
    C, M = dims.shape[0], 37
    q = cp.asarray(rng.integers(0, 256, size=(C, K, M)).astype(np.uint8))
    scale = cp.asarray(rng.uniform(0.01, 2, size=M).astype(np.float32))
    bias = cp.asarray(rng.standard_normal(M).astype(np.float32))
    np.testing.assert_array_equal(_h(kernels.lookup_q(codes, q, scale, bias)),
                                  _h(ref.lookup_q(codes, q, scale, bias)))
    # M % 4 == 0 takes the 4-column kernel; views that start off a 16-byte boundary are
    # copied before its vector loads
    q4 = cp.asarray(rng.integers(0, 256, size=(C * K * 8 + 1,)).astype(np.uint8))
    q4 = q4[1:].reshape(C, K, 8)
    sb = cp.asarray(rng.uniform(0.01, 2, size=17).astype(np.float32))
    np.testing.assert_array_equal(_h(kernels.lookup_q(codes, q4, sb[1:9], sb[9:])),
                                  _h(ref.lookup_q(codes, q4, sb[1:9], sb[9:])))
    lut8 = cp.asarray(rng.standard_normal(C * K * 8 + 1).astype(np.float32))[1:].reshape(C, K, 8)
    np.testing.assert_array_equal(_h(kernels.lookup(codes, lut8)), _h(ref.lookup(codes, lut8)))
    got = kernels.encode_lookup_q(cp.asarray(A).astype(np.float16), cp.asarray(dims),
                                  cp.asarray(thr), q, scale, bias, out_dtype=np.float16)
    want = ref.encode_lookup_q(cp.asarray(A).astype(np.float16), cp.asarray(dims),
                               cp.asarray(thr), q, scale, bias, np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(_h(got), _h(want))
    # codes >= K add nothing to the LUT gradient, as in the reference
    gY = cp.asarray(rng.standard_normal((2, 3)).astype(np.float32))
    wild = cp.asarray(np.array([[K + 5] * C, [1] * C], dtype=np.uint16))
    got = _h(kernels.lookup_backward(wild, gY, K))
    assert np.abs(got[:, 5]).max() == 0
    np.testing.assert_allclose(got[:, 1], np.repeat(_h(gY)[1:], C, axis=0), rtol=1e-6)
    # bad input through the op table: clear errors, no reads outside the arrays
    with pytest.raises(ValueError, match="column indices"):
        kernels.encode_tree(cp.asarray(A), cp.asarray(dims) + 100, cp.asarray(thr))
    with pytest.raises(ValueError, match="codebooks"):
        kernels.lookup(codes[:, :2], cp.zeros((C, K, 4), np.float32))
    with pytest.raises(TypeError, match="uint8 or uint16"):
        kernels.lookup(codes.astype(np.int64), cp.zeros((C, K, 4), np.float32))
    with pytest.raises(ValueError, match="grad_Y"):
        kernels.lookup_backward(codes, cp.zeros((3, 4), np.float32), K)
    with pytest.raises(ValueError, match="scale"):
        kernels.lookup_q(codes, q, scale[:3], bias)
    bad = cp.asarray(A)
    bad[150, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        kernels.encode_tree(bad, cp.asarray(dims), cp.asarray(thr))


def test_codes_dtype_follows_the_buckets(rng):
    c16 = rng.integers(0, 300, size=(5, 2)).astype(np.uint16)
    assert validate.as_codes(c16, 2, 512).dtype == np.uint16
    with pytest.raises(TypeError, match="uint16"):
        validate.as_codes(c16.astype(np.uint8), 2, 512)
    with pytest.raises(TypeError, match="uint8"):
        validate.as_codes(c16, 2, 256)
