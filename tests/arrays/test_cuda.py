"""GPU kernels (nimbus.arrays.kernels.cuda) against the plain-array reference.

Beyond test_kernels.py (every table op on ragged shapes): the fused MADDNESS apply
``encode_lookup_q`` and its variants, float16 input/output, float16 LUTs, grid and
shared-memory limits (many rows, many columns, many codebooks), non-contiguous and
misaligned inputs, bad inputs, the compile cache, and fitted strategies on CuPy
against the same fit on NumPy. Bodies that make sense on both libraries take the
``xp`` fixture; GPU-only tests are marked ``gpu``.
"""
import subprocess
import sys

import numpy as np
import pytest

from nimbus.arrays import backend, kernels
from nimbus.arrays.kernels import reference as ref

gpu = pytest.mark.gpu


def _h(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _cp():
    return backend.cupy()


def _cuda():
    from nimbus.arrays.kernels import cuda
    return cuda


def _tree_problem(rng, xp, N, D, C, M, in_dtype=np.float32):
    """Rows with many exact ties against the thresholds, trees, and an 8-bit LUT."""
    A = rng.integers(-4, 5, size=(N, D)).astype(np.float32)
    A[:, : D // 2] += rng.standard_normal((N, D // 2)).astype(np.float32)
    dims = rng.integers(0, D, size=(C, 15)).astype(np.int32)
    thr = rng.integers(-3, 4, size=(C, 15)).astype(np.float32)
    thr[rng.random((C, 15)) < 0.1] = np.inf
    q = rng.integers(0, 256, size=(C, 16, M)).astype(np.uint8)
    q[:, :, 0] = 255                       # worst case for 16-bit lane sums
    scale = (rng.random(M) + 0.5).astype(np.float32)
    bias = rng.standard_normal(M).astype(np.float32)
    return (xp.asarray(A.astype(in_dtype)), xp.asarray(dims), xp.asarray(thr), xp.asarray(q),
            xp.asarray(scale), xp.asarray(bias))


def _exact_isum(A, dims, thr, q):
    """Integer LUT sums of the reference codes, on the host (int64)."""
    codes = _h(ref.encode_tree(A, dims, thr)).astype(np.int64)
    qh = _h(q).astype(np.int64)
    return sum(qh[c][codes[:, c]] for c in range(qh.shape[0]))


FUSED_SHAPES = [  # (N, D, C, M)
    (1, 1, 1, 1), (257, 37, 5, 7), (1000, 64, 16, 33), (517, 129, 32, 16),
    (300, 512, 16, 512), (33, 300, 300, 9), (64, 40, 3, 1100),
]


@pytest.mark.parametrize("N,D,C,M", FUSED_SHAPES)
def test_encode_lookup_q_matches_reference(xp, rng, N, D, C, M):
    A, dims, thr, q, scale, bias = _tree_problem(rng, xp, N, D, C, M)
    got = kernels.encode_lookup_q(A, dims, thr, q, scale, bias)
    assert type(got) is type(A) and got.dtype == np.float32 and got.shape == (N, M)
    want = ref.encode_lookup_q(A, dims, thr, q, scale, bias)
    np.testing.assert_allclose(_h(got), _h(want), rtol=1e-6, atol=1e-6)
    # unit scale, zero bias: the result is the exact integer sum
    ones, zeros = xp.ones(M, dtype=np.float32), xp.zeros(M, dtype=np.float32)
    isum = _h(kernels.encode_lookup_q(A, dims, thr, q, ones, zeros))
    np.testing.assert_array_equal(isum, _exact_isum(A, dims, thr, q).astype(np.float32))


def test_encode_lookup_q_rejects_nan(xp, rng):
    A, dims, thr, q, scale, bias = _tree_problem(rng, xp, 50, 20, 4, 8)
    A[17, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite|NaN"):
        kernels.encode_lookup_q(A, dims, thr, q, scale, bias)


# ------------------------------------------------------------------ GPU-only variants
@gpu
@pytest.mark.parametrize("in_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["fused", "split"])
def test_fused_and_split_dtypes(rng, in_dtype, out_dtype, mode):
    cp = _cp()
    N, D, C, M = 777, 96, 16, 100
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, N, D, C, M, in_dtype)
    got = _cuda().encode_lookup_q(A, dims, thr, q, scale, bias, out_dtype, mode=mode)
    assert got.dtype == out_dtype and got.shape == (N, M)
    want = ref.encode_lookup_q(A, dims, thr, q, scale, bias, out_dtype)
    np.testing.assert_array_equal(_h(got), _h(want))


@gpu
@pytest.mark.parametrize("M", [33, 34])
def test_float16_rows_of_any_alignment(rng, M):
    # rows of 66 or 68 bytes: 2- and 4-byte aligned chunks take the narrow store paths
    cp = _cp()
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, 203, 48, 8, M, np.float16)
    want = _h(ref.encode_lookup_q(A, dims, thr, q, scale, bias, np.float16))
    for mode in ("fused", "split"):
        got = _cuda().encode_lookup_q(A, dims, thr, q, scale, bias, np.float16, mode=mode)
        np.testing.assert_array_equal(_h(got), want)


@gpu
@pytest.mark.parametrize("nstage", [2, 3])
def test_fused_pipeline_depths(rng, nstage):
    cp = _cp()
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, 3001, 64, 16, 512)
    got = _cuda().encode_lookup_q(A, dims, thr, q, scale, bias, mode="fused", nstage=nstage)
    np.testing.assert_array_equal(_h(got), _h(ref.encode_lookup_q(A, dims, thr, q, scale, bias)))


@gpu
@pytest.mark.parametrize("mode", ["fused", "split"])
def test_integer_sums_are_exact(rng, mode):
    # the 16-bit lane sums of the lookup core, with a column of 255s in every codebook
    cp = _cp()
    N, D, C, M = 301, 64, 32, 48
    A, dims, thr, q, _, _ = _tree_problem(rng, cp, N, D, C, M, np.float16)
    ones, zeros = cp.ones(M, dtype=np.float32), cp.zeros(M, dtype=np.float32)
    got = _cuda().encode_lookup_q(A, dims, thr, q, ones, zeros, np.float32, mode=mode)
    np.testing.assert_array_equal(_h(got), _exact_isum(A, dims, thr, q).astype(np.float32))


def _compiled(name, **defs):
    """Whether kernel ``name`` was compiled for substitutions including ``defs``."""
    want = {k: (str(np.dtype(v)) if k in ("IN", "OUT") else v) for k, v in defs.items()}
    return any(k[0] == name and all(dict(k[2]).get(d) == v for d, v in want.items())
               for k in list(_cuda()._kernel_cache))


def _assert_fused_variant(rng, N, D, C, M, in_dtype, **kw):
    """The fused kernel with the options ``kw`` equals the reference bit for bit."""
    cp = _cp()
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, N, D, C, M, in_dtype)
    want = _h(ref.encode_lookup_q(A, dims, thr, q, scale, bias, in_dtype))
    got = _cuda().encode_lookup_q(A, dims, thr, q, scale, bias, in_dtype, mode="fused", **kw)
    np.testing.assert_array_equal(_h(got), want)


@gpu
@pytest.mark.parametrize("N,D,C,M", FUSED_SHAPES + [(20011, 96, 16, 512), (131, 64, 16, 64)])
@pytest.mark.parametrize("groups,nstage", [(2, 2), (2, 3), (4, 2)])
@pytest.mark.parametrize("in_dtype", [np.float32, np.float16])
def test_simt_warp_groups_variant(rng, N, D, C, M, groups, nstage, in_dtype):
    _assert_fused_variant(rng, N, D, C, M, in_dtype, groups=groups, nstage=nstage)
    cuda = _cuda()
    cfg = cuda._fused_config(C, M, D, np.dtype(in_dtype).itemsize,
                             cuda.device_info(_cp().cuda.Device().id), None, None, nstage,
                             groups)
    if cfg is not None:                  # it fits: the grouped kernel itself ran
        assert _compiled("encode_lookup_q_kernel", NCB=C, IN=in_dtype, GROUPS=groups)


@gpu
def test_warp_groups_bad_arguments(rng):
    cp = _cp()
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, 100, 32, 4, 16)
    with pytest.raises(ValueError, match="groups"):
        _cuda().encode_lookup_q(A, dims, thr, q, scale, bias, groups=3)


@gpu
@pytest.mark.parametrize("in_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kw", [dict(groups=1), dict(groups=2)])
def test_fused_variants_flag_nan_in_any_batch(rng, in_dtype, kw):
    cp = _cp()
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, 5000, 64, 16, 128, in_dtype)
    for row in (0, 2500, 4999):
        bad = A.copy()
        bad[row, 63] = np.nan if row != 2500 else -np.inf
        with pytest.raises(ValueError, match="non-finite|NaN"):
            _cuda().encode_lookup_q(bad, dims, thr, q, scale, bias, mode="fused", **kw)


@gpu
def test_lookup_q_float16_output(rng):
    cp = _cp()
    N, C, M = 999, 16, 72
    codes = cp.asarray(rng.integers(0, 16, size=(N, C)).astype(np.uint8))
    q = cp.asarray(rng.integers(0, 256, size=(C, 16, M)).astype(np.uint8))
    scale = cp.asarray((rng.random(M) * 0.01).astype(np.float32))
    bias = cp.asarray(rng.standard_normal(M).astype(np.float32))
    got = _cuda().lookup_q(codes, q, scale, bias, np.float16)
    want = ref.lookup_q(codes, q, scale, bias).astype(np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(_h(got), _h(want))


@gpu
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
def test_lookup_float16_lut(rng, out_dtype):
    cp = _cp()
    N, C, M = 515, 12, 40
    codes = cp.asarray(rng.integers(0, 16, size=(N, C)).astype(np.uint8))
    lut = cp.asarray(rng.standard_normal((C, 16, M)).astype(np.float16))
    got = _cuda().lookup(codes, lut, out_dtype)
    want = ref.lookup(codes, lut).astype(out_dtype)       # float32 sums of float16 entries
    assert got.dtype == out_dtype
    np.testing.assert_array_equal(_h(got), _h(want))


@gpu
def test_encode_float16_input(rng):
    cp = _cp()
    A, dims, thr, _, _, _ = _tree_problem(rng, cp, 1500, 70, 9, 1, np.float16)
    np.testing.assert_array_equal(_h(kernels.encode_tree(A, dims, thr)),
                                  _h(ref.encode_tree(A, dims, thr)))
    from nimbus.strategies import subspace_starts
    starts = subspace_starts(70, 9)
    W = int(np.diff(starts).max())
    cent = cp.asarray(rng.standard_normal((9, 16, W)).astype(np.float32))
    got = _h(kernels.encode_pq(A, cent, starts))
    want = _h(ref.encode_pq(A, cent, starts))
    assert (got == want).mean() >= 0.99


@gpu
def test_many_rows_use_grid_stride_loops(rng):
    cp = _cp()
    N, D, C, M = 2 ** 21 + 3, 4, 2, 8
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, N, D, C, M)
    codes = kernels.encode_tree(A, dims, thr)
    assert bool((codes == ref.encode_tree(A, dims, thr)).all())
    for mode in ("fused", "split"):
        got = _cuda().encode_lookup_q(A, dims, thr, q, scale, bias, mode=mode)
        assert float(cp.abs(got - ref.lookup_q(codes, q, scale, bias)).max()) <= 1e-4


@gpu
def test_many_columns_tile_the_lut(rng):
    cp = _cp()
    N, D, C, M = 70, 24, 4, 5000
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, N, D, C, M)
    want = _h(ref.encode_lookup_q(A, dims, thr, q, scale, bias))
    for mode in ("auto", "fused", "split"):
        got = _cuda().encode_lookup_q(A, dims, thr, q, scale, bias, mode=mode)
        np.testing.assert_allclose(_h(got), want, rtol=1e-6, atol=1e-6)
    codes = ref.encode_tree(A, dims, thr)
    lut = cp.asarray(rng.standard_normal((C, 16, M)).astype(np.float32))
    np.testing.assert_array_equal(_h(kernels.lookup(codes, lut)), _h(ref.lookup(codes, lut)))


@gpu
def test_many_codebooks_and_backward_groups(rng):
    cp = _cp()
    N, C, M = 3000, 40, 70
    codes = cp.asarray(rng.integers(0, 16, size=(N, C)).astype(np.uint8))
    g = cp.asarray(rng.standard_normal((N, M)).astype(np.float32))
    np.testing.assert_allclose(_h(kernels.lookup_backward(codes, g)),
                               _h(ref.lookup_backward(codes, g)), rtol=1e-4, atol=1e-3)
    # 300 codebooks: 16-bit lanes are flushed to 32-bit totals every 256 codebooks
    A, dims, thr, q, _, _ = _tree_problem(rng, cp, 45, 300, 300, 20)
    ones, zeros = cp.ones(20, dtype=np.float32), cp.zeros(20, dtype=np.float32)
    for mode in ("fused", "split"):
        got = _cuda().encode_lookup_q(A, dims, thr, q, ones, zeros, mode=mode)
        np.testing.assert_array_equal(_h(got), _exact_isum(A, dims, thr, q).astype(np.float32))


@gpu
@pytest.mark.parametrize("D", [64, 66])
def test_non_contiguous_and_misaligned_inputs(rng, D):
    cp = _cp()
    N, C, M = 400, 6, 36
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, N, D, C, M)
    flat = cp.empty(N * D + 1, dtype=np.float32)
    flat[1:] = A.ravel()
    wide = cp.zeros((N, 2 * D), dtype=np.float32)
    wide[:, ::2] = A
    views = {
        "strided": wide[:, ::2],                    # every other column
        "misaligned": flat[1:].reshape(N, D),       # contiguous, 4 bytes past 16-alignment
        "fortran": cp.asfortranarray(A),
    }
    qflat = cp.empty(q.size + 1, dtype=np.uint8)
    qflat[1:] = q.ravel()
    q_views = {"fortran": cp.asfortranarray(q), "misaligned": qflat[1:].reshape(q.shape)}
    want = _h(ref.encode_lookup_q(A, dims, thr, q, scale, bias))
    for name, Av in views.items():
        for qname, qv in q_views.items():
            for mode in ("fused", "split"):
                got = _cuda().encode_lookup_q(Av, dims, thr, qv, scale, bias, mode=mode)
                np.testing.assert_allclose(_h(got), want, rtol=1e-6, atol=1e-6,
                                           err_msg=f"{name} A, {qname} LUT, {mode}")
    codes = ref.encode_tree(A, dims, thr)
    codes_t = cp.asfortranarray(codes)
    np.testing.assert_allclose(_h(kernels.lookup_q(codes_t, q, scale, bias)),
                               _h(ref.lookup_q(codes, q, scale, bias)), rtol=1e-6, atol=1e-6)
    lut_view = cp.asarray(rng.standard_normal((C, 16, 2 * M)).astype(np.float32))[:, :, ::2]
    np.testing.assert_array_equal(_h(kernels.lookup(codes_t, lut_view)),
                                  _h(ref.lookup(codes, cp.ascontiguousarray(lut_view))))


@gpu
def test_bad_inputs_raise_clear_errors(rng):
    cp = _cp()
    cuda = _cuda()
    A, dims, thr, q, scale, bias = _tree_problem(rng, cp, 20, 10, 3, 5)
    codes = kernels.encode_tree(A, dims, thr)
    with pytest.raises(TypeError, match="uint8"):
        cuda.lookup_q(codes.astype(np.float32), q, scale, bias)
    with pytest.raises(TypeError, match="uint8"):
        cuda.lookup_q(codes, q.astype(np.int32), scale, bias)
    with pytest.raises(ValueError, match="codebooks"):
        cuda.lookup_q(codes[:, :2], q, scale, bias)
    with pytest.raises(ValueError, match="scale"):
        cuda.lookup_q(codes, q, scale[:3], bias)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        cuda.encode_tree(A, dims + 10, thr)
    with pytest.raises(ValueError, match="shape"):
        cuda.encode_tree(A, dims[:, :14], thr[:, :14])
    with pytest.raises(TypeError, match="CuPy"):
        cuda.encode_tree(_h(A), dims, thr)
    with pytest.raises(TypeError, match="out_dtype"):
        cuda.encode_lookup_q(A, dims, thr, q, scale, bias, np.int32)
    with pytest.raises(ValueError, match="mode"):
        cuda.encode_lookup_q(A, dims, thr, q, scale, bias, mode="fast")
    with pytest.raises(ValueError, match="grad_Y"):
        cuda.lookup_backward(codes, cp.zeros((3, 5), dtype=np.float32))
    bad = A.copy()
    bad[3, 4] = np.inf
    for fn in (lambda: kernels.encode_tree(bad, dims, thr),
               lambda: kernels.encode_lookup_q(bad, dims, thr, q, scale, bias),
               lambda: kernels.encode_pq(bad, cp.zeros((2, 16, 5), np.float32), [0, 5, 10])):
        with pytest.raises(ValueError, match="non-finite|NaN"):
            fn()
    half = A.astype(np.float16)
    half[0, 0] = np.float16(np.inf)
    with pytest.raises(ValueError, match="non-finite|NaN"):
        cuda.encode_lookup_q(half, dims, thr, q, scale, bias, np.float16)


@gpu
def test_compile_cache_is_per_variant_and_reused(rng):
    cp = _cp()
    cuda = _cuda()
    A, dims, thr, _, _, _ = _tree_problem(rng, cp, 64, 16, 2, 1)
    cuda.encode_tree(A, dims, thr)
    before = len(list(cuda._kernel_cache))
    cuda.encode_tree(A, dims, thr)
    cuda.encode_tree(A[:10], dims, thr)             # other sizes: same compiled kernel
    assert len(list(cuda._kernel_cache)) == before
    cuda.encode_tree(A.astype(np.float16), dims, thr)
    keys = [k for k in list(cuda._kernel_cache) if k[0] == "encode_tree_tile"]
    ins = {dict(k[2])["IN"] for k in keys}
    assert {"float32", "float16"} <= ins
    assert all(k[1] == cp.cuda.Device().id for k in keys)
    src = cuda.source("lookup_q_kernel", OUT=np.float16, NCB=16, MT=256, RPT=4)
    assert "#define OUT_T u16" in src and "Thread mapping" in src


def test_import_does_not_import_cupy():
    code = ("import sys, numpy as np, nimbus\n"
            "from nimbus.strategies import Maddness\n"
            "A = np.random.RandomState(0).standard_normal((64, 8)).astype(np.float32)\n"
            "op = Maddness(2).fit(A, np.ones((8, 3), np.float32)); op(A)\n"
            "print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("False")


# ------------------------------------------------------------------ fitted strategies
def _lowrank(rng, N, D, rank=6):
    Z = rng.standard_normal((N, rank)) @ rng.standard_normal((rank, D))
    return (Z + 0.1 * rng.standard_normal((N, D))).astype(np.float32)


def _nmse(Y, ref_Y):
    Y, ref_Y = _h(Y).astype(np.float64), _h(ref_Y).astype(np.float64)
    return float(((Y - ref_Y) ** 2).sum() / (ref_Y ** 2).sum())


@gpu
@pytest.mark.parametrize("method", ["maddness", "pq"])
def test_fit_on_cupy_matches_fit_on_numpy(rng, method):
    cp = _cp()
    from nimbus.strategies import make
    A = _lowrank(rng, 3000, 32)
    A_test = _lowrank(rng, 500, 32)
    B = rng.standard_normal((32, 12)).astype(np.float32)
    op_np = make(method, ncodebooks=8, random_state=0).fit(A, B)
    op_cp = make(method, ncodebooks=8, random_state=0).fit(cp.asarray(A), cp.asarray(B))
    exact = A_test @ B
    e_np = _nmse(op_np(A_test), exact)
    e_cp = _nmse(op_cp(cp.asarray(A_test)), exact)
    assert abs(e_np - e_cp) <= 1e-3, (e_np, e_cp)
    if method == "maddness":
        np.testing.assert_array_equal(_h(op_cp.dims_), _h(op_np.dims_))
        np.testing.assert_allclose(_h(op_cp.thresholds_), _h(op_np.thresholds_), rtol=1e-6)


@gpu
def test_fitted_maddness_applies_on_gpu_with_float16_io(rng):
    cp = _cp()
    from nimbus.strategies import Maddness
    A = _lowrank(rng, 2000, 64)
    B = rng.standard_normal((64, 40)).astype(np.float32)
    op = Maddness(16, random_state=0).fit(A, B)
    A_test = _lowrank(rng, 700, 64)
    y_np = op(A_test)                                 # Numba kernels
    y_cp = op(cp.asarray(A_test))                     # fused RawKernel, learned arrays copied once
    assert isinstance(y_cp, cp.ndarray) and y_cp.dtype == np.float32
    np.testing.assert_allclose(_h(y_cp), y_np, rtol=1e-5, atol=1e-5)
    y16 = op(cp.asarray(A_test).astype(np.float16))
    assert y16.dtype == np.float16
    exact = A_test @ B
    assert abs(_nmse(y16, exact) - _nmse(y_np, exact)) <= 2e-2
    codes = op.encode(cp.asarray(A_test))
    np.testing.assert_array_equal(_h(codes), op.encode(A_test))


# ------------------------------------------------------------------ trees of any depth, any K
# Beyond test_kernels.py's depth tests: larger shapes (several tiles and batches),
# float16 input and output, trees that overflow shared memory, the L1/L2 fallback
# lookups, the fused modes, and the warp-per-(row, codebook) DM backward.
def _trees(rng, xp, N, D, C, depth, in_dtype=np.float32):
    """Rows with exact ties against the thresholds and trees of ``depth`` (some +inf)."""
    nn = 2 ** depth - 1
    A = rng.integers(-4, 5, size=(N, D)).astype(np.float32)
    A[:, : D // 2] += rng.standard_normal((N, D // 2)).astype(np.float32)
    dims = rng.integers(0, D, size=(C, nn)).astype(np.int32)
    thr = rng.integers(-3, 4, size=(C, nn)).astype(np.float32)
    thr[rng.random((C, nn)) < 0.1] = np.inf
    return xp.asarray(A.astype(in_dtype)), xp.asarray(dims), xp.asarray(thr)


DEPTH_SHAPES = [  # (depth, N, D, C): ragged; at depth 8 C = 120 trees overflow shared memory
    (1, 1, 1, 1), (1, 257, 37, 5), (2, 100, 9, 3), (3, 1000, 64, 16), (5, 517, 129, 32),
    (6, 64, 300, 7), (7, 300, 40, 2), (8, 1000, 512, 16), (8, 70, 33, 120),
]


@gpu
@pytest.mark.parametrize("depth,N,D,C", DEPTH_SHAPES)
@pytest.mark.parametrize("in_dtype", [np.float32, np.float16])
def test_encode_tree_any_depth(rng, depth, N, D, C, in_dtype):
    cp = _cp()
    A, dims, thr = _trees(rng, cp, N, D, C, depth, in_dtype)
    got = kernels.encode_tree(A, dims, thr)
    assert got.dtype == np.uint8 and got.shape == (N, C)
    want = ref.encode_tree(A, dims, thr)
    np.testing.assert_array_equal(_h(got), _h(want))
    assert int(_h(got).max()) < 2 ** depth
    if depth == 4 or C > 100:
        return
    keys = list(_cuda()._kernel_cache)
    assert depth in {dict(k[2]).get("TREE_DEPTH") for k in keys if k[0] == "encode_tree_tile"}


@gpu
def test_encode_tree_depth8_flags_nan(rng):
    cp = _cp()
    A, dims, thr = _trees(rng, cp, 20, 8, 2, 8)
    A[5, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite|NaN"):
        kernels.encode_tree(A, dims, thr)


def _lut_q(rng, cp, C, K, M):
    q = rng.integers(0, 256, size=(C, K, M)).astype(np.uint8)
    q[:, :, 0] = 255                         # worst case for 16-bit lane sums
    scale = (rng.random(M) + 0.5).astype(np.float32)
    bias = rng.standard_normal(M).astype(np.float32)
    return cp.asarray(q), cp.asarray(scale), cp.asarray(bias)


K_SHAPES = [  # (K, N, C, M): the last two overflow shared memory (L1/L2 fallback kernels)
    (1, 33, 3, 5), (2, 257, 5, 7), (3, 100, 4, 33), (32, 1000, 16, 100), (100, 300, 9, 64),
    (256, 517, 8, 130), (256, 300, 64, 36), (200, 77, 80, 5),
]


@gpu
@pytest.mark.parametrize("K,N,C,M", K_SHAPES)
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
def test_lookups_any_k(rng, K, N, C, M, out_dtype):
    cp = _cp()
    cuda = _cuda()
    codes = cp.asarray(rng.integers(0, K, size=(N, C)).astype(np.uint8))
    q, scale, bias = _lut_q(rng, cp, C, K, M)
    # exact integer sums (unit scale, zero bias), then the scaled result
    ones, zeros = cp.ones(M, dtype=np.float32), cp.zeros(M, dtype=np.float32)
    isum = sum(_h(q).astype(np.int64)[c][_h(codes)[:, c].astype(np.int64)] for c in range(C))
    np.testing.assert_array_equal(_h(cuda.lookup_q(codes, q, ones, zeros)), isum)
    got = cuda.lookup_q(codes, q, scale, bias, out_dtype)
    assert got.dtype == out_dtype and got.shape == (N, M)
    want = ref.lookup_q(codes, q, scale, bias).astype(out_dtype)
    np.testing.assert_array_equal(_h(got), _h(want))
    for lut_dt in (np.float32, np.float16):
        lut = cp.asarray(rng.standard_normal((C, K, M)).astype(lut_dt))
        got = cuda.lookup(codes, lut, out_dtype)
        want = ref.lookup(codes, lut).astype(out_dtype)   # float32 sums in codebook order
        np.testing.assert_array_equal(_h(got), _h(want))
    g = cp.asarray(rng.standard_normal((N, M)).astype(np.float32))
    gl = cuda.lookup_backward(codes, g, K)
    assert gl.shape == (C, K, M)
    np.testing.assert_allclose(_h(gl), _h(ref.lookup_backward(codes, g, K)), rtol=1e-4,
                               atol=1e-4)


@gpu
def test_lookups_fall_back_to_global_reads(rng):
    # C * K * 16 bytes above the opt-in shared memory: no LUT tile fits
    cp = _cp()
    cuda = _cuda()
    K, C = 256, 64
    codes = cp.asarray(rng.integers(0, K, size=(50, C)).astype(np.uint8))
    q, scale, bias = _lut_q(rng, cp, C, K, 12)
    cuda.lookup_q(codes, q, scale, bias)
    cuda.lookup(codes, q.astype(np.float32))
    kinds = {dict(k[2]).get("LUT_Q") for k in list(cuda._kernel_cache)
             if k[0] == "lookup_global_kernel" and dict(k[2]).get("NK") == K}
    assert kinds == {0, 1}                       # the 8-bit and the float LUT variant
    # misaligned and odd-width LUTs take the scalar paths
    for M in (12, 13):
        q, scale, bias = _lut_q(rng, cp, C, K, M)
        flat = cp.empty(q.size + 1, dtype=np.uint8)
        flat[1:] = q.ravel()
        qv = flat[1:].reshape(q.shape)
        np.testing.assert_array_equal(_h(cuda.lookup_q(codes, qv, scale, bias)),
                                      _h(ref.lookup_q(codes, q, scale, bias)))
        lut = cp.asarray(rng.standard_normal((C, K, M)).astype(np.float32))
        fl = cp.empty(lut.size + 1, dtype=np.float32)
        fl[1:] = lut.ravel()
        np.testing.assert_array_equal(_h(cuda.lookup(codes, fl[1:].reshape(lut.shape))),
                                      _h(ref.lookup(codes, lut)))


@gpu
@pytest.mark.parametrize("K", [3, 16, 64])
def test_lookup_backward_drops_codes_past_k(rng, K):
    # as the reference: a code >= K adds nothing (both kernel paths: K <= 16 and K > 16)
    cp = _cp()
    codes = cp.asarray(rng.integers(0, 2 * K, size=(300, 5)).astype(np.uint8))
    g = cp.asarray(rng.standard_normal((300, 40)).astype(np.float32))
    np.testing.assert_allclose(_h(_cuda().lookup_backward(codes, g, K)),
                               _h(ref.lookup_backward(codes, g, K)), rtol=1e-5, atol=1e-5)


@gpu
def test_lookups_reject_bad_k(rng):
    cp = _cp()
    cuda = _cuda()
    codes = cp.zeros((4, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="1 <= K <= 256"):
        cuda.lookup_q(codes, cp.zeros((2, 257, 3), np.uint8), cp.ones(3, np.float32),
                      cp.zeros(3, np.float32))
    with pytest.raises(ValueError, match="1 <= K <= 256"):
        cuda.lookup(codes, cp.zeros((2, 0, 3), np.float32))
    for bad in (300, 0, 2.0, True):
        with pytest.raises(ValueError, match="nbuckets"):
            cuda.lookup_backward(codes, cp.zeros((4, 3), np.float32), bad)


@gpu
@pytest.mark.parametrize("depth,N,D,C,M", [(1, 300, 20, 5, 40), (3, 1000, 64, 16, 512),
                                           (5, 517, 129, 12, 33), (8, 400, 96, 16, 100)])
@pytest.mark.parametrize("mode", ["auto", "fused", "split"])
def test_encode_lookup_q_any_depth(rng, depth, N, D, C, M, mode):
    # depths other than 4 run the encode and lookup kernels in every mode
    cp = _cp()
    A, dims, thr = _trees(rng, cp, N, D, C, depth)
    q, scale, bias = _lut_q(rng, cp, C, 2 ** depth, M)
    codes = ref.encode_tree(A, dims, thr)
    for dt in (np.float32, np.float16):
        got = _cuda().encode_lookup_q(A, dims, thr, q, scale, bias, dt, mode=mode)
        np.testing.assert_array_equal(_h(got), _h(ref.lookup_q(codes, q, scale, bias).astype(dt)))
    with pytest.raises(ValueError, match="buckets"):
        _cuda().encode_lookup_q(A, dims, thr, q[:, :1], scale, bias, mode=mode)


@gpu
@pytest.mark.parametrize("depth,N,D,C,M", [(1, 257, 37, 5, 7), (2, 300, 16, 3, 8),
                                           (3, 500, 64, 40, 33), (5, 300, 64, 7, 16),
                                           (6, 1000, 48, 3, 12), (8, 200, 96, 5, 20)])
def test_dm_kernels_any_depth(rng, depth, N, D, C, M):
    cp = _cp()
    from nimbus.arrays.kernels import dm_cuda, dm_reference
    nn = 2 ** depth - 1
    A = rng.standard_normal((N, D)).astype(np.float32)
    dims = rng.integers(0, D, size=(C, nn)).astype(np.int32)
    thr = (0.5 * rng.standard_normal((C, nn))).astype(np.float32)
    inv_tau = (1.0 / (0.3 + rng.random((C, nn)))).astype(np.float32)
    lut = rng.standard_normal((C, 2 ** depth, M)).astype(np.float32)
    gY = rng.standard_normal((N, M)).astype(np.float32)
    A_, dims_, thr_, tau_, lut_, gY_ = (cp.asarray(a) for a in (A, dims, thr, inv_tau, lut, gY))
    codes, Y = dm_cuda.dm_forward(A_, dims_, thr_, lut_)
    want_codes, want_Y = dm_reference.dm_forward(A_, dims_, thr_, lut_)
    np.testing.assert_array_equal(_h(codes), _h(want_codes))
    np.testing.assert_array_equal(_h(Y), _h(want_Y))          # same order of additions
    got = dm_cuda.dm_backward(A_, dims_, thr_, tau_, lut_, codes, gY_, 0.8)
    want = dm_reference.dm_backward(A_, dims_, thr_, tau_, lut_, codes, gY_, 0.8)
    for name, g, w in zip(("grad_A", "grad_t", "grad_lut"), got, want):
        w = _h(w)
        assert g.shape == w.shape and g.dtype == np.float32, name
        np.testing.assert_allclose(_h(g), w, rtol=1e-4, atol=1e-5 * (np.abs(w).max() + 1),
                                   err_msg=name)
    ga, gt, gl = dm_cuda.dm_backward(A_, dims_, thr_, tau_, lut_, codes, gY_, 0.8,
                                     need_a=False, need_lut=False)
    assert ga is None and gl is None
    np.testing.assert_array_equal(_h(gt), _h(got[1]))      # deterministic partial sums
    with pytest.raises(ValueError, match="lut"):
        dm_cuda.dm_backward(A_, dims_, thr_, tau_, lut_[:, :1], codes, gY_, 0.8)
