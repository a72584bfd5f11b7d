"""ChainCUDA (nimbus.arrays.kernels.runtime_cuda): a chain of LUT layers on the GPU, bit
for bit against the reference applied layer by layer (encode_tree then lookup_q, the
output of one layer the input of the next).

Chains are random but not arbitrary: each layer's thresholds are drawn from the values
its input actually takes (so codes spread over the leaves and many rows tie a threshold
exactly: ties go left), some thresholds are -inf (every row goes right), and some LUT
columns are all 255 (the largest integer sums, past 16-bit lanes when C > 257).
"""
import zlib

import numpy as np
import pytest

from nimbus.arrays import backend
from nimbus.arrays.kernels import reference as ref

pytestmark = pytest.mark.gpu


def _cp():
    return backend.cupy()


def _chain_cls():
    from nimbus.arrays.kernels.runtime_cuda import ChainCUDA
    return ChainCUDA


def _layer_ref(A, layer):
    """One layer by the reference, on the host: (N, M) float32."""
    codes = ref.encode_tree(A, layer["dims"], layer["thresholds"])
    return ref.lookup_q(codes, layer["lut"], layer["scale"], layer["bias"])


def chain_ref(X, layers):
    h = X
    for layer in layers:
        h = _layer_ref(h, layer)
    return h


def make_chain(rng, X, specs, ninf=0.05):
    """Layers for input X (host float32) from specs [(C, depth, M), ...]."""
    layers = []
    h = X
    for C, depth, M in specs:
        K = 2 ** depth
        N, D = h.shape
        dims = rng.integers(0, D, size=(C, K - 1)).astype(np.int32)
        # thresholds taken from the values the input has in the tested column
        rows = rng.integers(0, N, size=(C, K - 1))
        thr = h[rows, dims].astype(np.float32)
        thr[rng.random((C, K - 1)) < ninf] = -np.inf
        lut = rng.integers(0, 256, size=(C, K, M)).astype(np.uint8)
        lut[:, :, rng.integers(0, M)] = 255
        # outputs of order one: isum is about C * 127.5 +- sqrt(C) * 74
        scale = (rng.uniform(0.5, 1.5, M) / (74.0 * np.sqrt(C))).astype(np.float32)
        bias = (-127.5 * C * scale + rng.normal(0, 0.1, M)).astype(np.float32)
        layer = dict(dims=dims, thresholds=thr, lut=lut, scale=scale, bias=bias)
        layers.append(layer)
        h = _layer_ref(h, layer)
    return layers


def _x(rng, N, D):
    X = rng.standard_normal((N, D)).astype(np.float32)
    X[:, ::3] = np.round(X[:, ::3])           # many exact ties
    return X


CHAINS = {  # name: (D0, [(C, depth, M), ...])
    "mlp8": (784, [(98, 4, 256), (32, 4, 256), (32, 4, 256), (32, 4, 10)]),
    "depths": (40, [(7, 1, 33), (5, 6, 256), (3, 9, 10), (4, 4, 1)]),
    "k64": (100, [(20, 6, 33), (9, 6, 10)]),
    "k512": (64, [(8, 9, 256), (6, 9, 10)]),
    "wideC": (300, [(300, 1, 33), (257, 2, 10)]),
    "one": (17, [(3, 4, 1)]),
    "odd": (50, [(13, 4, 40), (7, 2, 24), (5, 3, 16)]),     # C K not a multiple of 32
}
# chains the tensor-core kernel takes (every depth >= 2)
MMA_CHAINS = sorted(n for n, (_, specs) in CHAINS.items() if min(d for _, d, _ in specs) >= 2)


@pytest.mark.parametrize("name", sorted(CHAINS))
@pytest.mark.parametrize("N", [1, 7, 1000])
def test_chain_matches_reference(name, N):
    cp = _cp()
    rng = np.random.default_rng(zlib.crc32(f"{name}/{N}".encode()))
    D0, specs = CHAINS[name]
    X = _x(rng, max(N, 64), D0)
    layers = make_chain(rng, X, specs)
    X = X[:N]
    want = chain_ref(X, layers)
    chain = _chain_cls()(layers, in_features=D0)
    got = chain(cp.asarray(X))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.get().view(np.uint32), want.view(np.uint32))
    # second call: the graph replayed
    np.testing.assert_array_equal(chain(cp.asarray(X), check_finite=False).get(), want)


@pytest.mark.parametrize("name", ["mlp8", "depths", "k64", "wideC"])
@pytest.mark.parametrize("rows", [1, 4, 16, 32, 64])
def test_tiles_staged_and_direct(name, rows):
    """Every tile size (staged LUT chunks once rows >= K, direct reads below) and a ragged
    last tile."""
    cp = _cp()
    rng = np.random.default_rng(rows * 7 + len(name))
    D0, specs = CHAINS[name]
    X = _x(rng, 203, D0)
    layers = make_chain(rng, X, specs)
    want = chain_ref(X, layers)
    got = _chain_cls()(layers, rows=rows)(cp.asarray(X))
    np.testing.assert_array_equal(got.get(), want)


@pytest.mark.parametrize("name", sorted(CHAINS))
@pytest.mark.parametrize("rows", [1, 4, 32])
def test_prefetch_on_and_off(name, rows):
    """The prefetch block (descriptors, compact trees, scales and biases staged in shared
    memory as the kernel starts) gives the bits of the reference, and of the kernel
    without it; plan_info says which ran."""
    cp = _cp()
    rng = np.random.default_rng(zlib.crc32(f"pre/{name}/{rows}".encode()))
    D0, specs = CHAINS[name]
    X = _x(rng, 77, D0)
    layers = make_chain(rng, X, specs)
    want = chain_ref(X, layers)
    for prefetch in (True, False):
        chain = _chain_cls()(layers, in_features=D0, rows=rows, kernel="simt", prefetch=prefetch)
        got = chain(cp.asarray(X))
        np.testing.assert_array_equal(got.get().view(np.uint32), want.view(np.uint32))
        used = chain.plan_info(len(X))["prefetch_bytes"]
        assert (used > 0) == prefetch, (prefetch, used)
    with pytest.raises(TypeError, match="prefetch"):
        _chain_cls()(layers, prefetch="yes")


def test_prefetch_skipped_for_columns_past_uint16():
    """A first layer that tests columns >= 65536 cannot use the compact (uint16) trees:
    the chain runs without the prefetch block, same bits."""
    cp = _cp()
    rng = np.random.default_rng(65536)
    X = _x(rng, 5, 70000)
    layers = make_chain(rng, X, [(3, 2, 16), (2, 3, 4)])
    layers[0]["dims"][0, 0] = 69999
    layers[0]["thresholds"][0, 0] = X[2, 69999]
    want = chain_ref(X, layers)
    chain = _chain_cls()(layers, kernel="simt")
    np.testing.assert_array_equal(chain(cp.asarray(X)).get(), want)
    assert chain.plan_info(5, 70000)["prefetch_bytes"] == 0


def test_small_chunks_many_stages():
    """Chunks of one codebook: every chunk boundary of the double buffer is crossed."""
    cp = _cp()
    rng = np.random.default_rng(5)
    X = _x(rng, 100, 60)
    layers = make_chain(rng, X, [(9, 4, 33), (5, 3, 256), (4, 4, 10)])
    want = chain_ref(X, layers)
    for chunk in (16 * 48, 16 * 256 * 2, 0):
        got = _chain_cls()(layers, rows=64, chunk_bytes=chunk)(cp.asarray(X))
        np.testing.assert_array_equal(got.get(), want)


@pytest.mark.parametrize("kernel", ["simt", "auto"])
@pytest.mark.parametrize("name", ["mlp8", "k512"])
def test_large_batch(name, kernel):
    cp = _cp()
    rng = np.random.default_rng(70000 + len(name))
    D0, specs = CHAINS[name]
    X = _x(rng, 70000, D0)
    layers = make_chain(rng, X[:2000], specs)
    want = chain_ref(X, layers)
    chain = _chain_cls()(layers, in_features=D0, kernel=kernel)
    assert chain.plan_info(70000)["kernel"] == ("mma" if kernel == "auto" else "simt")
    np.testing.assert_array_equal(chain(cp.asarray(X)).get(), want)


@pytest.mark.parametrize("name", MMA_CHAINS)
@pytest.mark.parametrize("rows", [32, 64, 128])
@pytest.mark.parametrize("N", [1, 45, 300])
def test_mma_kernel_matches_reference(name, rows, N):
    """The tensor-core kernel (one-hot codes x LUT by mma.sync) bit for bit against the
    reference: partial tiles, C K padded to a multiple of 32, K = 4 .. 512."""
    cp = _cp()
    rng = np.random.default_rng(zlib.crc32(f"mma/{name}/{rows}/{N}".encode()))
    D0, specs = CHAINS[name]
    X = _x(rng, max(N, 64), D0)
    layers = make_chain(rng, X, specs)
    X = X[:N]
    want = chain_ref(X, layers)
    chain = _chain_cls()(layers, in_features=D0, kernel="mma", rows=rows)
    info = chain.plan_info(N)
    assert info["kernel"] == "mma" and info["rows"] == rows
    got = chain(cp.asarray(X))
    np.testing.assert_array_equal(got.get().view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(chain(cp.asarray(X), check_finite=False).get(), want)


def test_mma_kernel_wide_layers_and_many_chunks():
    """500 outputs (8 column groups of 64) and a 600-codebook layer of depth 2 (many LUT
    chunks); rows=128 would need 32 warp tasks (16 at most) and says so."""
    cp = _cp()
    rng = np.random.default_rng(12)
    X = _x(rng, 700, 64)
    layers = make_chain(rng, X, [(16, 4, 500), (600, 2, 24), (6, 4, 10)])
    want = chain_ref(X, layers)
    ChainCUDA = _chain_cls()
    got = ChainCUDA(layers, kernel="mma")(cp.asarray(X))
    np.testing.assert_array_equal(got.get(), want)
    with pytest.raises(ValueError, match="mma"):
        ChainCUDA(layers, kernel="mma", rows=128)(cp.asarray(X))
    with pytest.raises(ValueError, match="depth"):
        ChainCUDA(make_chain(rng, X, [(4, 1, 8)]), kernel="mma")
    with pytest.raises(ValueError, match="kernel"):
        ChainCUDA(layers, kernel="tensor")


def test_cupy_layers_and_float16_input():
    cp = _cp()
    rng = np.random.default_rng(11)
    D0, specs = CHAINS["depths"]
    X = _x(rng, 300, D0).astype(np.float16).astype(np.float32)
    layers = make_chain(rng, X, specs)
    want = chain_ref(X, layers)
    dev_layers = [{k: cp.asarray(v) for k, v in layer.items()} for layer in layers]
    chain = _chain_cls()(dev_layers)
    np.testing.assert_array_equal(chain(cp.asarray(X.astype(np.float16))).get(), want)


def test_outputs_are_fresh_and_sizes_interleave():
    """A later call (same or other batch size) never overwrites an earlier result; a
    non-contiguous X is read correctly."""
    cp = _cp()
    rng = np.random.default_rng(3)
    D0, specs = CHAINS["mlp8"]
    X = _x(rng, 600, D0)
    layers = make_chain(rng, X, specs)
    want = chain_ref(X, layers)
    chain = _chain_cls()(layers, in_features=D0)
    Xd = cp.asarray(X)
    outs = [chain(Xd[:300], check_finite=False), chain(Xd[300:], check_finite=False),
            chain(Xd[:17]), chain(Xd[300:]), chain(Xd)]
    cp.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(outs[0].get(), want[:300])
    np.testing.assert_array_equal(outs[1].get(), want[300:])
    np.testing.assert_array_equal(outs[2].get(), want[:17])
    np.testing.assert_array_equal(outs[3].get(), want[300:])
    np.testing.assert_array_equal(outs[4].get(), want)
    assert outs[1].data.ptr != outs[3].data.ptr
    a, b = chain(Xd[:17]), chain(Xd[:17])          # the plan's ready Y is handed out once
    assert a.data.ptr != b.data.ptr and a.data.ptr != outs[2].data.ptr
    np.testing.assert_array_equal(a.get(), want[:17])
    Xs = cp.asfortranarray(Xd[:50])
    np.testing.assert_array_equal(chain(Xs).get(), want[:50])
    # many calls in flight without a sync cycle through the pinned parameter slots
    many = [chain(Xd[i:i + 5], check_finite=False) for i in range(0, 500, 5)]
    for i, y in zip(range(0, 500, 5), many):
        np.testing.assert_array_equal(y.get(), want[i:i + 5])


def test_calls_on_two_streams_without_syncs():
    """Calls alternating between two streams (and "nan" calls, which do not sync either)
    reuse the pinned parameter slots safely: every result is the reference's."""
    cp = _cp()
    rng = np.random.default_rng(12)
    D0, specs = CHAINS["odd"]
    X = _x(rng, 400, D0)
    layers = make_chain(rng, X, specs)
    want = chain_ref(X, layers)
    chain = _chain_cls()(layers, in_features=D0)
    Xd = cp.asarray(X)
    streams = [cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)]
    out = []
    for i in range(0, 400, 2):                       # 200 calls: three rounds of the ring
        with streams[(i // 2) % 2]:
            out.append((i, chain(Xd[i:i + 2], check_finite=False if i % 4 else "nan")))
    for s in streams:
        s.synchronize()
    for i, y in out:
        np.testing.assert_array_equal(y.get(), want[i:i + 2])


def test_nan_and_inf_raise():
    cp = _cp()
    rng = np.random.default_rng(4)
    D0, specs = CHAINS["depths"]
    X = _x(rng, 1000, D0)
    layers = make_chain(rng, X, specs)
    chain = _chain_cls()(layers, in_features=D0)
    for bad, where in ((np.nan, (999, D0 - 1)), (np.inf, (0, 0)), (-np.inf, (500, 17))):
        Xb = X.copy()
        Xb[where] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            chain(cp.asarray(Xb))
        y = chain(cp.asarray(Xb), check_finite=False)      # no check: no raise
        assert y.shape == (1000, specs[-1][2])
    # the flag is reset: a clean X passes after a bad one
    np.testing.assert_array_equal(chain(cp.asarray(X)).get(), chain_ref(X, layers))


@pytest.mark.parametrize("kernel,rows,N", [("simt", None, 1), ("simt", None, 300),
                                            ("simt", 32, 300), ("simt", 4, 50),
                                            ("mma", 32, 300), ("mma", None, 3000)])
@pytest.mark.parametrize("name", ["mlp8", "odd"])
def test_check_finite_nan_marks_rows(name, kernel, rows, N):
    """check_finite="nan": the rows whose input holds NaN or Inf come out all NaN, every
    other row keeps its bits; no error, in both kernels and every tile shape (values at
    the start, middle and end of rows, so 16-byte reads that span two rows are covered)."""
    cp = _cp()
    rng = np.random.default_rng(zlib.crc32(f"nanrows/{name}/{kernel}/{rows}/{N}".encode()))
    D0, specs = CHAINS[name]
    X = _x(rng, N, D0)
    layers = make_chain(rng, X, specs)
    want = chain_ref(X, layers)
    chain = _chain_cls()(layers, in_features=D0, kernel=kernel, rows=rows)
    Xb = X.copy()
    spoiled = sorted({0, N - 1, N // 2, N // 3})
    for i, r in enumerate(spoiled):
        Xb[r, (0, D0 - 1, D0 // 2, 1)[i % 4]] = (np.nan, np.inf, -np.inf, np.nan)[i % 4]
    got = chain(cp.asarray(Xb), check_finite="nan").get()
    keep = np.ones(N, dtype=bool)
    keep[spoiled] = False
    assert np.isnan(got[spoiled]).all()
    np.testing.assert_array_equal(got[keep].view(np.uint32), want[keep].view(np.uint32))
    np.testing.assert_array_equal(chain(cp.asarray(X), check_finite="nan").get(), want)
    with pytest.raises(ValueError, match="check_finite must be"):
        chain(cp.asarray(X), check_finite="raise")


def test_empty_batch():
    cp = _cp()
    rng = np.random.default_rng(6)
    D0, specs = CHAINS["one"]
    layers = make_chain(rng, _x(rng, 50, D0), specs)
    y = _chain_cls()(layers)(cp.zeros((0, D0), dtype=np.float32))
    assert y.shape == (0, 1) and y.dtype == np.float32


def test_bad_inputs():
    cp = _cp()
    ChainCUDA = _chain_cls()
    rng = np.random.default_rng(8)
    D0, specs = CHAINS["depths"]
    X = _x(rng, 64, D0)
    layers = make_chain(rng, X, specs)
    chain = ChainCUDA(layers, in_features=D0)
    with pytest.raises(TypeError, match="CuPy"):
        chain(X)
    with pytest.raises(TypeError, match="float32"):
        chain(cp.asarray(X.astype(np.int32)))
    with pytest.raises(ValueError, match="2-D"):
        chain(cp.asarray(X[0]))
    with pytest.raises(ValueError, match="columns"):
        chain(cp.asarray(X[:, :-1]))
    with pytest.raises(ValueError, match="non-empty"):
        ChainCUDA([])
    with pytest.raises(ValueError, match="dims"):                 # column past layer 0's M
        bad = [dict(l) for l in layers]
        bad[1]["dims"] = bad[1]["dims"].copy()
        bad[1]["dims"][0, 0] = specs[0][2]
        ChainCUDA(bad)
    with pytest.raises(ValueError, match="in_features|dims"):
        ChainCUDA(layers, in_features=3)
    with pytest.raises(TypeError, match="uint8"):
        bad = [dict(l) for l in layers]
        bad[0]["lut"] = bad[0]["lut"].astype(np.int16)
        ChainCUDA(bad)
    with pytest.raises(ValueError, match="lut"):
        bad = [dict(l) for l in layers]
        bad[0]["lut"] = bad[0]["lut"][:, :-1]
        ChainCUDA(bad)
    with pytest.raises(ValueError, match="scale"):
        bad = [dict(l) for l in layers]
        bad[0]["scale"] = bad[0]["scale"][:-1]
        ChainCUDA(bad)
    with pytest.raises(ValueError, match="NaN"):
        bad = [dict(l) for l in layers]
        bad[0]["thresholds"] = bad[0]["thresholds"].copy()
        bad[0]["thresholds"][0, 0] = np.nan
        ChainCUDA(bad)
    with pytest.raises(ValueError, match="nodes"):
        bad = [dict(l) for l in layers]                        # layer 1: depth 6
        bad[1]["dims"] = bad[1]["dims"][:, :2]
        bad[1]["thresholds"] = bad[1]["thresholds"][:, :2]
        ChainCUDA(bad)
    with pytest.raises(ValueError, match="lacks"):
        ChainCUDA([{"dims": layers[0]["dims"]}])
    with pytest.raises(ValueError, match="rows"):
        ChainCUDA(layers, rows=3)
    # once a batch size has a plan, the fast path still sends every other input through
    # the checks: dtype, layout, check_finite, and plan_info's shapes
    Xd = cp.asarray(X)
    want = chain(Xd).get()
    with pytest.raises(TypeError, match="float32"):
        chain(Xd.astype(np.float64))
    np.testing.assert_array_equal(chain(cp.asfortranarray(Xd)).get(), want)
    np.testing.assert_array_equal(chain(Xd.astype(np.float16).astype(np.float32)).get(),
                                  chain(Xd.astype(np.float16)).get())
    with pytest.raises(ValueError, match="check_finite"):
        chain(Xd, check_finite="yes")
    with pytest.raises(ValueError, match="columns"):
        chain.plan_info(len(X), D0 - 1)
    with pytest.raises(ValueError, match="at least 1"):
        chain.plan_info(0)
