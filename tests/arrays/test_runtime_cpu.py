"""The CPU chain kernel (nimbus.arrays.kernels.runtime_cpu) against the reference, layer by
layer, bitwise: plain-loop path and SIMD path (where the CPU has AVX-512 VBMI + VNNI)."""
import numpy as np
import numba
import pytest

from nimbus.arrays.kernels import reference as ref
from nimbus.arrays.kernels import runtime_cpu as rc

SIMD_PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(
    not rc.simd_supported(), reason="CPU without AVX-512 VBMI/VNNI"))]


def make_layer(rng, d_in, C, depth, M, neg_inf=0.1, tie_from=None):
    """A random layer: dims in 0..d_in-1, thresholds with some -inf (folded ReLU) and +inf, and,
    when tie_from (N, d_in) is given, some thresholds equal to input values (ties)."""
    K = 2 ** depth
    dims = rng.integers(0, d_in, (C, K - 1)).astype(np.int32)
    thr = rng.normal(size=(C, K - 1)).astype(np.float32)
    thr[rng.random((C, K - 1)) < neg_inf] = -np.inf
    thr[rng.random((C, K - 1)) < neg_inf / 2] = np.inf     # a bucket with no split
    if tie_from is not None:
        pick = rng.random((C, K - 1)) < 0.3
        rows = rng.integers(0, tie_from.shape[0], (C, K - 1))
        thr[pick] = tie_from[rows, dims][pick]
    lut = rng.integers(0, 256, (C, K, M)).astype(np.uint8)
    lut[rng.random((C, K, M)) < 0.05] = 255          # saturated bytes: largest sums
    scale = (rng.random(M) * 0.02 + 1e-3).astype(np.float32)
    bias = rng.normal(size=M).astype(np.float32)
    return {"dims": dims, "thresholds": thr, "lut": lut, "scale": scale, "bias": bias}


def reference_chain(layers, X):
    h = X
    for layer in layers:
        codes = ref.encode_tree(h, layer["dims"], layer["thresholds"])
        h = ref.lookup_q(codes, layer["lut"], layer["scale"], layer["bias"])
    return h


def make_chain(rng, d0, widths, depths, C_list, N):
    """layers for inputs of d0 columns; ties taken from a sample of each layer's input."""
    X = rng.normal(size=(N, d0)).astype(np.float32)
    layers = []
    h = X
    d = d0
    for M, depth, C in zip(widths, depths, C_list):
        layer = make_layer(rng, d, C, depth, M, tie_from=h)
        layers.append(layer)
        h = reference_chain([layer], h)
        d = M
    return layers, X


CASES = [
    # d0, widths, depths, codebooks
    (784, (256, 256, 256, 10), (4, 4, 4, 4), (98, 32, 32, 32)),
    (37, (33, 1), (4, 4), (5, 3)),                       # ragged: D not a multiple of C
    (50, (10, 33, 256), (1, 5, 6), (7, 9, 2)),
    (20, (16, 10), (9, 5), (3, 4)),                      # K = 512 (uint16 codes)
    (64, (12,), (10,), (2,)),                            # K = 1024
    (30, (17, 5), (2, 3), (300, 260)),                   # C > 257: int32 sums
]


@pytest.mark.parametrize("simd", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("N", [1, 7, 1000])
def test_chain_matches_reference(case, N, simd):
    d0, widths, depths, C_list = CASES[case]
    rng = np.random.default_rng(1000 * case + N)
    layers, X = make_chain(rng, d0, widths, depths, C_list, N)
    fits = all(2 ** d in (16, 32, 64) for d in depths)
    if simd and not (fits and rc.simd_supported()):
        with pytest.raises(ValueError, match="simd=True"):
            rc.ChainCPU(layers, d_in=d0, simd=True)
        return
    chain = rc.ChainCPU(layers, d_in=d0, simd=simd)
    assert chain.simd == simd
    expected = reference_chain(layers, X)
    got = chain(X)
    assert got.shape == (N, widths[-1]) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    # a second call of the same N reuses the buffers and gives the same values
    assert np.array_equal(chain(X.copy()), expected)
    if simd:
        # small batches go to the plain loops: the SIMD path on them too
        chain.small_n = 0
        np.testing.assert_array_equal(chain(X), expected)


@pytest.mark.parametrize("simd", SIMD_PATHS)
@pytest.mark.parametrize("depth", [4, 5, 6])
def test_chain_k16_32_64_ragged(depth, simd):
    rng = np.random.default_rng(depth)
    layers, X = make_chain(rng, 101, (70, 1, 19), (depth, depth, depth), (13, 6, 1), 200)
    chain = rc.ChainCPU(layers, d_in=101, simd=simd)
    np.testing.assert_array_equal(chain(X), reference_chain(layers, X))


@pytest.mark.parametrize("simd", SIMD_PATHS)
@pytest.mark.parametrize("width", [1, 3, 4, 6, 8])
def test_chain_trees_on_column_slices(width, simd):
    # as a converted layer: tree c tests columns of its own slice of `width` inputs only
    # (the SIMD path then picks x from the slice's columns: W = 4 or 8 of them)
    rng = np.random.default_rng(width)
    X = rng.normal(size=(150, 50)).astype(np.float32)
    layers = []
    h = X
    for depth, M in ((4, 24), (5, 33), (6, 7)):
        D = h.shape[1]
        C = -(-D // width)
        layer = make_layer(rng, D, C, depth, M)
        lo = np.minimum(np.arange(C) * width, D - 1)[:, None]
        dims = np.minimum(lo + rng.integers(0, width, layer["dims"].shape), D - 1)
        layer["dims"] = dims.astype(np.int32)
        tie = rng.random(dims.shape) < 0.3          # thresholds equal to input values
        layer["thresholds"][tie] = h[rng.integers(0, h.shape[0], dims.shape), dims][tie]
        layers.append(layer)
        h = reference_chain([layer], h)
    chain = rc.ChainCPU(layers, d_in=50, simd=simd)
    if simd:    # W = 8 is used at depth 6 only
        W = list(chain.meta_simd[:, rc._W])
        assert W == ([4] * 3 if width <= 4 else [0, 0, 8])
    np.testing.assert_array_equal(chain(X), reference_chain(layers, X))
    chain.small_n = 0
    np.testing.assert_array_equal(chain(X[:3]), reference_chain(layers, X[:3]))


@pytest.mark.parametrize("simd", SIMD_PATHS)
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_same_values(threads, simd):
    rng = np.random.default_rng(7)
    layers, X = make_chain(rng, 40, (64, 10), (4, 4), (10, 16), 777)
    chain = rc.ChainCPU(layers, d_in=40, simd=simd)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        got = chain(X).copy()
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(got, reference_chain(layers, X))


@pytest.mark.parametrize("simd", SIMD_PATHS)
def test_out_argument_and_cached_output(simd):
    rng = np.random.default_rng(3)
    layers, X = make_chain(rng, 24, (8, 3), (4, 4), (6, 2), 50)
    chain = rc.ChainCPU(layers, d_in=24, simd=simd)
    out = np.full((50, 3), np.nan, dtype=np.float32)
    assert chain(X, out=out) is out
    np.testing.assert_array_equal(out, reference_chain(layers, X))
    first = chain(X)
    assert chain(X) is first                      # one output array per batch size
    with pytest.raises(ValueError, match="out must be"):
        chain(X, out=np.empty((50, 4), dtype=np.float32))


@pytest.mark.parametrize("simd", SIMD_PATHS)
def test_readonly_input_and_warm_up(simd):
    rng = np.random.default_rng(5)
    layers, X = make_chain(rng, 30, (20, 4), (4, 4), (8, 5), 100)
    X.setflags(write=False)
    chain = rc.ChainCPU(layers, d_in=30, simd=simd).warm_up()
    np.testing.assert_array_equal(chain(X), reference_chain(layers, X))


def test_extreme_sums_257_codebooks_of_255():
    # 257 codebooks of 255: the largest sum a uint16 holds, exactly; 258 go through int32
    for C in (257, 258):
        layer = {"dims": np.zeros((C, 15), dtype=np.int32),
                 "thresholds": np.zeros((C, 15), dtype=np.float32),
                 "lut": np.full((C, 16, 3), 255, dtype=np.uint8),
                 "scale": np.ones(3, dtype=np.float32),
                 "bias": np.zeros(3, dtype=np.float32)}
        X = np.ones((5, 1), dtype=np.float32)
        for simd in (False, rc.simd_supported()):
            got = rc.ChainCPU([layer], d_in=1, simd=simd)(X)
            assert np.all(got == 255.0 * C)


@pytest.mark.parametrize("N", [5, 333])
def test_encode_lookup_q_cpu_matches_reference(N):
    rng = np.random.default_rng(11)
    A = rng.normal(size=(N, 45)).astype(np.float32)
    for depth, M in ((4, 33), (5, 10), (6, 3), (8, 1), (10, 7)):
        layer = make_layer(rng, 45, 6, depth, M, tie_from=A)
        expected = ref.encode_lookup_q(A, layer["dims"], layer["thresholds"], layer["lut"],
                                       layer["scale"], layer["bias"])
        got = rc.encode_lookup_q_cpu(A, layer["dims"], layer["thresholds"], layer["lut"],
                                     layer["scale"], layer["bias"])
        np.testing.assert_array_equal(got, expected)


def good_layers():
    rng = np.random.default_rng(0)
    return [make_layer(rng, 12, 3, 4, 8), make_layer(rng, 8, 2, 4, 5)]


@pytest.mark.parametrize("breakit, exc, match", [
    (lambda L: L[0].update(dims=L[0]["dims"].astype(np.int64)), TypeError, "dims must be int32"),
    (lambda L: L[0].update(thresholds=L[0]["thresholds"].astype(np.float64)), TypeError,
     "thresholds must be float32"),
    (lambda L: L[1].update(lut=L[1]["lut"].astype(np.int16)), TypeError, "lut must be uint8"),
    (lambda L: L[0].update(scale=[1.0] * 8), TypeError, "scale must be a NumPy array"),
    (lambda L: L[0].update(thresholds=L[0]["thresholds"][:, :7]), ValueError, "thresholds shape"),
    (lambda L: L[0].update(dims=L[0]["dims"][:, :6], thresholds=L[0]["thresholds"][:, :6]),
     ValueError, "2\\*\\*d - 1 nodes"),
    (lambda L: L[0].update(lut=L[0]["lut"][:, :8]), ValueError, "lut shape"),
    (lambda L: L[1].update(bias=L[1]["bias"][:3]), ValueError, "bias"),
    (lambda L: L[1]["dims"].__setitem__((0, 0), 8), ValueError, "columns in 0..7"),
    (lambda L: L[0]["dims"].__setitem__((0, 0), 12), ValueError, "columns in 0..11"),
    (lambda L: L[0]["dims"].__setitem__((0, 0), -1), ValueError, "columns in 0..11"),
    (lambda L: L[0]["thresholds"].__setitem__((0, 0), np.nan), ValueError, "NaN"),
    (lambda L: L[0].pop("bias"), ValueError, "no 'bias'"),
    (lambda L: L.__setitem__(1, "layer"), TypeError, "must be a dict"),
    (lambda L: L.clear(), ValueError, "non-empty list"),
])
def test_bad_layers(breakit, exc, match):
    layers = good_layers()
    breakit(layers)
    with pytest.raises(exc, match=match):
        rc.ChainCPU(layers, d_in=12)


def test_bad_inputs():
    chain = rc.ChainCPU(good_layers(), d_in=12)
    X = np.zeros((4, 12), dtype=np.float32)
    with pytest.raises(TypeError, match="float32"):
        chain(X.astype(np.float64))
    with pytest.raises(TypeError, match="NumPy array"):
        chain(X.tolist())
    with pytest.raises(ValueError, match="13 columns"):
        chain(np.zeros((4, 13), dtype=np.float32))
    with pytest.raises(ValueError, match="N >= 1"):
        chain(np.zeros((0, 12), dtype=np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        chain(np.zeros((12, 4), dtype=np.float32).T)
    with pytest.raises(ValueError, match="d_in"):
        rc.ChainCPU(good_layers(), d_in=0)
    with pytest.raises(ValueError, match="simd must be"):
        rc.ChainCPU(good_layers(), d_in=12, simd="yes")


def test_plain_loops_alone_without_simd(tmp_path):
    # as on a CPU without AVX-512 VBMI/VNNI: the module imports, picks the plain loops,
    # refuses simd=True, and matches the reference
    import os
    import subprocess
    import sys
    code = (
        "import numpy as np\n"
        "from nimbus.arrays.kernels import runtime_cpu as rc\n"
        "assert not rc.simd_supported()\n"
        "rng = np.random.default_rng(0)\n"
        "L = [{'dims': rng.integers(0, 9, (3, 15)).astype(np.int32),\n"
        "      'thresholds': rng.normal(size=(3, 15)).astype(np.float32),\n"
        "      'lut': rng.integers(0, 256, (3, 16, 4)).astype(np.uint8),\n"
        "      'scale': np.ones(4, np.float32), 'bias': np.zeros(4, np.float32)}]\n"
        "ch = rc.ChainCPU(L, d_in=9)\n"
        "assert not ch.simd\n"
        "try:\n"
        "    rc.ChainCPU(L, d_in=9, simd=True)\n"
        "    raise SystemExit('simd=True accepted')\n"
        "except ValueError:\n"
        "    pass\n"
        "X = rng.normal(size=(70, 9)).astype(np.float32)\n"
        "np.save(%r, ch(X)); np.save(%r, X)\n" % (str(tmp_path / "y.npy"), str(tmp_path / "x.npy"))
    )
    env = dict(os.environ, NIMBUS_NO_SIMD="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)
    rng = np.random.default_rng(0)
    L = [{"dims": rng.integers(0, 9, (3, 15)).astype(np.int32),
          "thresholds": rng.normal(size=(3, 15)).astype(np.float32),
          "lut": rng.integers(0, 256, (3, 16, 4)).astype(np.uint8),
          "scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}]
    X = np.load(tmp_path / "x.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), reference_chain(L, X))


@pytest.mark.parametrize("simd", SIMD_PATHS)
def test_check_finite_scans_every_row(simd):
    rng = np.random.default_rng(5)
    layers, X = make_chain(rng, 70, (33, 10), (4, 5), (18, 9), 200)
    chain = rc.ChainCPU(layers, d_in=70, simd=simd)
    for N in (1, 7, 200):
        np.testing.assert_array_equal(chain(X[:N], check_finite=True),
                                      reference_chain(layers, X[:N]))
        for v in (np.nan, np.inf, -np.inf):
            bad = X[:N].copy()
            bad[int(rng.integers(N)), int(rng.integers(70))] = v
            with pytest.raises(ValueError, match="NaN or Inf"):
                chain(bad, check_finite=True)
            chain(bad)                    # unchecked: runs (the caller promised finite rows)
