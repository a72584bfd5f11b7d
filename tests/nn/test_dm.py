"""Differentiable MADDNESS: exact hard forward, surrogate backward, harden(), GPU kernels.

The backward is checked three ways: against a slow reference written the obvious
way (explicit path matrix, full softmax, loops over rows and trees), by finite
differences of the surrogate function whose gradient it is, and (LUT) by finite
differences of the exact forward. The xp=cupy cases run the RawKernels.
"""
import numpy as np
import pytest

import nimbus
from nimbus.arrays import backend, kernels
from nimbus.arrays.autograd import Tensor
from nimbus.arrays.kernels import dm_reference
from nimbus.strategies import DM, Maddness
from nimbus.strategies.dm import DMFunction, patch_order


def _h(x):
    return backend.to_host(x)


def _problem(rng, N, D, C, M, shared_columns=False):
    """Random DM inputs; trees test arbitrary columns (several trees may share one)."""
    A = rng.standard_normal((N, D)).astype(np.float32)
    if shared_columns:
        dims = rng.integers(0, D, size=(C, 15)).astype(np.int32)
    else:
        starts = np.round(np.linspace(0, D, C + 1)).astype(int)
        dims = np.stack([rng.integers(starts[c], starts[c + 1], size=15) for c in range(C)])
        dims = dims.astype(np.int32)
    thr = (0.5 * rng.standard_normal((C, 15))).astype(np.float32)
    lut = rng.standard_normal((C, 16, M)).astype(np.float32)
    inv_tau = rng.uniform(0.5, 3.0, size=(C, 15)).astype(np.float32)
    gY = rng.standard_normal((N, M)).astype(np.float32)
    return A, dims, thr, lut, inv_tau, gY


def _path_matrix():
    """P (16, 15) built from its definition: walk every leaf's path from the root."""
    P = np.zeros((16, 15))
    for leaf in range(16):
        node, bits = 0, [(leaf >> (3 - level)) & 1 for level in range(4)]
        for b in bits:
            P[leaf, node] = 1 if b else -1
            node = 2 * node + 1 + b
    return P


def _slow_backward(A, dims, thr, lut, inv_tau, gY, inv_temp):
    """The surrogate gradients the obvious way, in float64, one row and one tree at a time."""
    A, thr, lut, inv_tau, gY = (np.asarray(a, np.float64) for a in (A, thr, lut, inv_tau, gY))
    N, D = A.shape
    C, _, M = lut.shape
    P = _path_matrix()
    gA, gt, glut = np.zeros((N, D)), np.zeros((C, 15)), np.zeros((C, 16, M))
    for n in range(N):
        for c in range(C):
            x = A[n, dims[c]]
            s = np.where(x > thr[c], 1.0, -1.0)
            b = P @ s
            leaf = int(np.argmax(b))                    # the reached leaf scores 4
            assert b[leaf] == 4
            glut[c, leaf] += gY[n]
            p = np.exp(b * inv_temp) / np.exp(b * inv_temp).sum()
            G = lut[c] @ gY[n]                          # dL/d onehot_k
            J = (np.diag(p) - np.outer(p, p)) * inv_temp   # d softmax(b/T) / d b
            gs = P.T @ (J @ G)
            z = (x - thr[c]) * inv_tau[c]
            gx = gs * (1 - np.tanh(z) ** 2) * inv_tau[c]
            for j in range(15):
                gA[n, dims[c, j]] += gx[j]
            gt[c] -= gx
    return gA, gt, glut


@pytest.mark.parametrize("N,D,C,M,shared", [(7, 13, 3, 5, False), (1, 8, 1, 1, False),
                                             (33, 20, 4, 12, True), (300, 40, 5, 130, False)])
def test_backward_matches_slow_reference(xp, rng, N, D, C, M, shared):
    A, dims, thr, lut, inv_tau, gY = _problem(rng, N, D, C, M, shared)
    inv_temp = float(rng.uniform(0.3, 2.0))
    args = [xp.asarray(a) for a in (A, dims, thr, inv_tau, lut)]
    codes, Y = kernels.dm_forward(args[0], args[1], args[2], args[4])
    gA, gt, gl = kernels.dm_backward(args[0], args[1], args[2], args[3], args[4], codes,
                                     xp.asarray(gY), inv_temp)
    rA, rt, rl = _slow_backward(A, dims, thr, lut, inv_tau, gY, inv_temp)
    for got, ref in ((gA, rA), (gt, rt), (gl, rl)):
        got = _h(got)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * (np.abs(ref).max() + 1))
    # the oracle agrees as well
    oA, ot, ol = dm_reference.dm_backward(*args[:4], args[4], codes, xp.asarray(gY), inv_temp)
    np.testing.assert_allclose(_h(oA), rA, rtol=1e-4, atol=1e-5 * (np.abs(rA).max() + 1))
    np.testing.assert_allclose(_h(ot), rt, rtol=1e-4, atol=1e-5 * (np.abs(rt).max() + 1))


def test_backward_skips_what_is_not_needed(xp, rng):
    A, dims, thr, lut, inv_tau, gY = (xp.asarray(a) for a in _problem(rng, 20, 16, 2, 3))
    codes, _ = kernels.dm_forward(A, dims, thr, lut)
    gA, gt, gl = kernels.dm_backward(A, dims, thr, inv_tau, lut, codes, gY, 1.0,
                                     need_a=False, need_t=True, need_lut=False)
    assert gA is None and gl is None and gt.shape == (2, 15)
    full = kernels.dm_backward(A, dims, thr, inv_tau, lut, codes, gY, 1.0)
    np.testing.assert_allclose(_h(gt), _h(full[1]), rtol=1e-6, atol=1e-7)


def _surrogate(A, thr, dims, lut, inv_tau, gY, inv_temp, b0):
    """The smooth function whose gradient (in A and t) the DM backward returns.

    Per row and tree: <G, J(b0) (P tanh((x - t) inv_tau))> with G = LUT gY and J the
    softmax Jacobian at the hard leaf scores b0 (held fixed: b0 is piecewise
    constant, so away from ties its derivative is 0)."""
    P = _path_matrix()
    total = 0.0
    N = A.shape[0]
    C = dims.shape[0]
    for n in range(N):
        for c in range(C):
            b = b0[n, c]
            p = np.exp(b * inv_temp) / np.exp(b * inv_temp).sum()
            J = (np.diag(p) - np.outer(p, p)) * inv_temp
            soft = P @ np.tanh((A[n, dims[c]] - thr[c]) * inv_tau[c])
            total += (lut[c] @ gY[n]) @ (J @ soft)
    return total


def test_surrogate_finite_differences(rng):
    N, D, C, M = 5, 10, 2, 4
    A, dims, thr, lut, inv_tau, gY = _problem(rng, N, D, C, M)
    inv_temp = 0.7
    codes, _ = kernels.dm_forward(A, dims, thr, lut)
    gA, gt, _ = kernels.dm_backward(A, dims, thr, inv_tau, lut, codes, gY, inv_temp)
    A64, t64 = A.astype(np.float64), thr.astype(np.float64)
    P = _path_matrix()
    b0 = np.stack([[P @ np.where(A64[n, dims[c]] > t64[c], 1.0, -1.0) for c in range(C)]
                   for n in range(N)])
    f = lambda a, t: _surrogate(a, t, dims, lut, inv_tau, gY, inv_temp, b0)  # noqa: E731
    eps = 1e-6
    # only where the function is defined: no tested value within eps of its threshold
    margin = np.abs(A64[:, dims] - t64[None]).min()
    assert margin > 10 * eps
    for _ in range(12):
        n, d = rng.integers(N), rng.integers(D)
        e = np.zeros_like(A64)
        e[n, d] = eps
        fd = (f(A64 + e, t64) - f(A64 - e, t64)) / (2 * eps)
        assert abs(fd - gA[n, d]) <= 1e-3 * max(1.0, abs(fd)), (n, d, fd, gA[n, d])
    for _ in range(12):
        c, j = rng.integers(C), rng.integers(15)
        e = np.zeros_like(t64)
        e[c, j] = eps
        fd = (f(A64, t64 + e) - f(A64, t64 - e)) / (2 * eps)
        assert abs(fd - gt[c, j]) <= 1e-3 * max(1.0, abs(fd)), (c, j, fd, gt[c, j])


def test_lut_gradient_is_exact(rng):
    # the forward is linear in the LUT: <gY, Y(lut + e)> - <gY, Y(lut)> = <grad, e>
    A, dims, thr, lut, inv_tau, gY = _problem(rng, 40, 12, 3, 6)
    codes, Y = kernels.dm_forward(A, dims, thr, lut)
    _, _, gl = kernels.dm_backward(A, dims, thr, inv_tau, lut, codes, gY, 1.0)
    E = rng.standard_normal(lut.shape).astype(np.float32)
    _, Y2 = kernels.dm_forward(A, dims, thr, lut + E)
    lhs = float((gY.astype(np.float64) * (Y2.astype(np.float64) - Y)).sum())
    np.testing.assert_allclose(lhs, float((gl.astype(np.float64) * E).sum()), rtol=1e-4)


def _digits_dm(xp, rng, **params):
    A, At, B = nimbus.nn.data.digits_task()
    seed = int(rng.integers(2 ** 31))
    dm = DM(ncodebooks=8, random_state=seed, **params).fit(xp.asarray(A), xp.asarray(B))
    return dm, xp.asarray(A), xp.asarray(At), xp.asarray(B), seed


def test_forward_equals_hard_maddness_exactly(xp, rng):
    A, _, B = nimbus.nn.data.digits_task()
    A, B = xp.asarray(A), xp.asarray(B)
    mad = Maddness(ncodebooks=8, split="node", quantize=False).fit(A, B)
    dm = DM.from_tree(mad, A)
    assert _h(dm.dims_).shape == (8, 15) and dm.lut_.shape == (8, 16, 20)
    x = Tensor(A, requires_grad=True)
    y = dm.forward(x)
    codes, ref = dm_reference.dm_forward(A, mad.dims_, mad.thresholds_, mad.lut_)
    np.testing.assert_array_equal(_h(y.data), _h(ref))              # bitwise, like the oracle
    np.testing.assert_array_equal(_h(dm.encode(A)), _h(mad.encode(A)))
    np.testing.assert_allclose(_h(y.data), _h(mad(A)), rtol=1e-6, atol=1e-5)
    if xp is np:                                    # same Numba kernels: bitwise equal
        np.testing.assert_array_equal(y.data, mad(A))
    y.sum().backward()
    assert x.grad.shape == A.shape and bool(xp.isfinite(x.grad).all())


def test_harden_identity(xp, rng):
    dm, A, At, B, _ = _digits_dm(xp, rng)
    # change the LUT and thresholds as training would, then harden
    thr, lut = dm.parameters()
    lut.data += 0.1 * xp.asarray(rng.standard_normal(lut.shape).astype(np.float32))
    thr.data += 0.05 * xp.asarray(rng.standard_normal(thr.shape).astype(np.float32))
    hard = dm.harden(quantize=False)
    assert isinstance(hard, Maddness) and hard.name == "maddness"
    np.testing.assert_array_equal(_h(hard.encode(At)), _h(dm.encode(At)))
    np.testing.assert_allclose(_h(hard(At)), _h(dm(At)), rtol=1e-6, atol=1e-4)
    if xp is np:
        np.testing.assert_array_equal(hard(At), dm(At))
    q = dm.harden(quantize=True)
    assert q.lut_q_.dtype == np.uint8
    err = _h(q(At)) - _h(dm(At))
    # 8 bits: each of the C entries is off by at most half its column's step
    step = _h(q.lut_scale_)[None, :]
    assert (np.abs(err) <= 0.5 * step * dm.ncodebooks * 1.001 + 1e-3).all()
    # per-column steps: never coarser than one shared step would be
    assert step.max() <= (float(_h(dm.lut_).max() - _h(dm.lut_).min())) / 255 * 1.0001
    # the hardened copy does not follow later training
    lut.data += 1.0
    assert not np.allclose(_h(hard(At)), _h(dm(At)))


def test_hardened_lut_keeps_its_quantizer(rng, tmp_path):
    # DM.harden quantizes per column; re-quantizing (a layer switched to float LUTs and
    # back) and saving must keep that, not fall back to MADDNESS's shared scale
    from nimbus.strategies._lut import quantize_lut, quantize_lut_per_column
    dm, A, At, B, _ = _digits_dm(np, rng)
    dm.parameters()[1].data *= np.linspace(0.1, 10, dm.lut_.shape[2], dtype=np.float32)
    q = dm.harden(quantize=True)
    want = quantize_lut_per_column(q.lut_)
    assert not np.array_equal(quantize_lut(q.lut_)[1], want[1])      # the two differ here
    q.quantize = False
    q._set_lut(q.lut_)
    assert not hasattr(q, "lut_q_")
    q.quantize = True
    q._set_lut(q.lut_)
    for got, w in zip((q.lut_q_, q.lut_scale_, q.lut_bias_), want):
        np.testing.assert_array_equal(got, w)
    back = nimbus.load(nimbus.save(q, str(tmp_path / "q.npz")))
    back._set_lut(back.lut_)
    np.testing.assert_array_equal(back.lut_scale_, want[1])
    assert Maddness(4).LUT_QUANTIZER == "shared"
    with pytest.raises(ValueError, match="quantizer"):
        q._set_lut(q.lut_, quantizer="per-row")


def test_standalone_training_recovers_a_perturbed_lut(rng):
    # the initial LUT is least-squares optimal for its codes; spoil it, then train
    A = np.maximum(0, rng.standard_normal((2000, 4)) @ rng.standard_normal((4, 32))
                   + 0.3 * rng.standard_normal((2000, 32))).astype(np.float32)
    B = rng.standard_normal((32, 8)).astype(np.float32)
    dm = DM(ncodebooks=4, random_state=int(rng.integers(1000))).fit(A, B)
    Y = A @ B
    start = nimbus.nmse(Y, dm(A))
    dm.lut_ += (0.5 * dm.lut_.std() * rng.standard_normal(dm.lut_.shape)).astype(np.float32)
    spoiled = nimbus.nmse(Y, dm(A))
    assert spoiled > 2 * start
    dm.set_params(lr=2e-2).train(A, B, epochs=10)
    assert nimbus.nmse(Y, dm(A)) < 0.5 * spoiled


def test_registered_and_usable_through_the_api(rng):
    assert nimbus.strategies.REGISTRY["dm"] is DM
    A, At, B = nimbus.nn.data.digits_task()
    op = nimbus.fit(A, B, method="dm", ncodebooks=8, random_state=int(rng.integers(1000)))
    assert nimbus.nmse(At @ B, op(At)) < 0.3
    table = nimbus.compare(A, At, B, methods=["maddness", "dm"], ncodebooks=[8])
    assert [r["method"] for r in table] == ["maddness", "dm"]


def test_save_load_round_trip(tmp_path, rng):
    dm, A, At, B, _ = _digits_dm(np, rng)
    nimbus.save(dm, tmp_path / "dm.npz")
    back = nimbus.load(tmp_path / "dm.npz")
    assert isinstance(back, DM)
    np.testing.assert_array_equal(back(At), dm(At))


def test_bad_input():
    A, _, B = nimbus.nn.data.digits_task()
    with pytest.raises(ValueError, match="needs B"):
        DM(ncodebooks=4).fit(A)
    with pytest.raises(ValueError, match="tau"):
        DM(ncodebooks=4, tau=0).fit(A, B)
    with pytest.raises(ValueError, match="init"):
        DM(ncodebooks=4, init="kmeans").fit(A, B)
    with pytest.raises(ValueError, match="inner dimensions"):
        DM(ncodebooks=4).fit(A, B[:10])
    pq = nimbus.fit(A, B, method="pq", ncodebooks=4)
    with pytest.raises(TypeError, match="tree strategy"):
        DM.from_tree(pq)
    with pytest.raises(nimbus.strategies.NotFittedError):
        DM().parameters()


def test_column_order_is_the_fit_of_permuted_columns(rng):
    # fitting with column_order = the fit on A[:, order] with the trees' columns mapped back
    A, At, B = nimbus.nn.data.digits_task()
    order = rng.permutation(A.shape[1])
    seed = int(rng.integers(1000))
    dm = DM(ncodebooks=8, column_order=order, random_state=seed).fit(A, B)
    ref = DM(ncodebooks=8, random_state=seed).fit(np.ascontiguousarray(A[:, order]),
                                                  np.ascontiguousarray(B[order]))
    np.testing.assert_array_equal(dm.dims_, order[ref.dims_])
    np.testing.assert_array_equal(dm.encode(At), ref.encode(np.ascontiguousarray(At[:, order])))
    np.testing.assert_allclose(dm(At), ref(np.ascontiguousarray(At[:, order])), rtol=1e-5,
                               atol=1e-4)
    # each tree only reads the columns its codebook was given
    per = -(-A.shape[1] // 8)
    for c in range(8):
        assert set(dm.dims_[c].tolist()) <= set(order[c * per:(c + 1) * per].tolist())
    for bad in (order[:-1], np.zeros(A.shape[1], dtype=int), order.astype(float)):
        with pytest.raises(ValueError, match="permutation"):
            DM(ncodebooks=8, column_order=bad).fit(A, B)


def test_patch_order():
    o = patch_order(4, 6, 2, 3)
    assert sorted(o.tolist()) == list(range(24))
    img = np.arange(24).reshape(4, 6)
    np.testing.assert_array_equal(o[:6], img[:2, :3].ravel())     # first patch: top left
    np.testing.assert_array_equal(o[6:12], img[:2, 3:].ravel())   # then to its right
    np.testing.assert_array_equal(o[12:18], img[2:, :3].ravel())
    two = patch_order(2, 2, 1, 2, channels=2)          # (channels, h, w): both channels
    np.testing.assert_array_equal(two, [0, 1, 4, 5, 2, 3, 6, 7])
    with pytest.raises(ValueError, match="does not tile"):
        patch_order(28, 28, 3, 4)


def test_noise_only_while_training(xp, rng):
    dm, A, At, B, _ = _digits_dm(xp, rng, noise=0.5)
    plain = DM.from_tree(dm.harden(quantize=False), A)
    x = Tensor(At)
    # evaluation: no noise, the hard forward of the same trees and LUT
    np.testing.assert_array_equal(_h(dm(At)), _h(plain(At)))
    thr, lut = dm.parameters()
    thr.requires_grad = lut.requires_grad = True
    y1, y2 = dm.forward(x).data, dm.forward(x).data
    assert backend.library_name(y1) == backend.library_name(At)   # noise in the inputs' library
    assert not np.array_equal(_h(y1), _h(y2))    # fresh noise on every training call
    assert not np.array_equal(_h(y1), _h(plain(At)))
    with pytest.raises(ValueError, match="noise"):
        DM(ncodebooks=4, noise=-1.0).fit(A, B)
    zero = DM.from_tree(dm.harden(quantize=False), A)
    zero.noise = 0.0
    np.testing.assert_array_equal(_h(zero.forward(x).data), _h(plain(At)))


@pytest.mark.gpu
@pytest.mark.parametrize("N,D,C,M", [(1, 8, 1, 1), (257, 37, 5, 7), (3000, 64, 8, 130),
                                     (5000, 256, 33, 64)])
def test_gpu_kernels_match_oracle(rng, N, D, C, M):
    _gpu_kernels_match_oracle(_problem(rng, N, D, C, M))


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [9, 10])
@pytest.mark.parametrize("N,D,C,M", [(1, 8, 1, 1), (257, 37, 5, 7), (3000, 64, 9, 132)])
def test_gpu_kernels_deep_trees_match_oracle(rng, depth, N, D, C, M):
    """Depth 9 and 10: uint16 codes, fewer warps per backward block."""
    codes = _gpu_kernels_match_oracle(_problem_depth(rng, N, D, C, M, depth))
    assert codes.dtype == np.uint16


def _gpu_kernels_match_oracle(problem):
    """dm_cuda's forward and backward against dm_reference on CuPy; returns the codes."""
    cp = backend.cupy()
    from nimbus.arrays.kernels import dm_cuda
    A, dims, thr, lut, inv_tau, gY = (cp.asarray(a) for a in problem)
    codes, Y = dm_cuda.dm_forward(A, dims, thr, lut)
    rcodes, rY = dm_reference.dm_forward(A, dims, thr, lut)
    np.testing.assert_array_equal(_h(codes), _h(rcodes))
    np.testing.assert_array_equal(_h(Y), _h(rY))            # same order of additions
    got = dm_cuda.dm_backward(A, dims, thr, inv_tau, lut, codes, gY, 0.8)
    ref = dm_reference.dm_backward(A, dims, thr, inv_tau, lut, codes, gY, 0.8)
    for g, r in zip(got, ref):
        r = _h(r)
        np.testing.assert_allclose(_h(g), r, rtol=1e-4, atol=1e-5 * (np.abs(r).max() + 1))
    return codes


# ------------------------------------------------------------------ trees of any depth 1..10
DEPTHS = [1, 2, 3, 4, 5, 8, 9, 10]


def _path_matrix_depth(depth):
    """P (2**d, 2**d - 1) from its definition: walk every leaf's path from the root."""
    K = 2 ** depth
    P = np.zeros((K, K - 1))
    for leaf in range(K):
        node = 0
        for level in range(depth):
            b = (leaf >> (depth - 1 - level)) & 1
            P[leaf, node] = 1 if b else -1
            node = 2 * node + 1 + b
    return P


def _problem_depth(rng, N, D, C, M, depth):
    """Random DM inputs for depth-``depth`` trees (columns may repeat across nodes)."""
    nnodes = 2 ** depth - 1
    A = rng.standard_normal((N, D)).astype(np.float32)
    dims = rng.integers(0, D, size=(C, nnodes)).astype(np.int32)
    thr = (0.5 * rng.standard_normal((C, nnodes))).astype(np.float32)
    lut = rng.standard_normal((C, 2 ** depth, M)).astype(np.float32)
    inv_tau = rng.uniform(0.5, 3.0, size=(C, nnodes)).astype(np.float32)
    gY = rng.standard_normal((N, M)).astype(np.float32)
    return A, dims, thr, lut, inv_tau, gY


def _slow_backward_depth(A, dims, thr, lut, inv_tau, gY, inv_temp, depth):
    """The surrogate gradients the obvious way (dense P, full softmax Jacobian), float64."""
    A, thr, lut, inv_tau, gY = (np.asarray(a, np.float64) for a in (A, thr, lut, inv_tau, gY))
    N, D = A.shape
    C, K, M = lut.shape
    P = _path_matrix_depth(depth)
    gA, gt, glut = np.zeros((N, D)), np.zeros((C, K - 1)), np.zeros((C, K, M))
    codes = np.zeros((N, C), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            x = A[n, dims[c]]
            s = np.where(x > thr[c], 1.0, -1.0)
            b = P @ s
            leaf = int(np.argmax(b))                    # the reached leaf scores d
            assert b[leaf] == depth and (b == depth).sum() == 1
            codes[n, c] = leaf
            glut[c, leaf] += gY[n]
            e = np.exp((b - depth) * inv_temp)
            p = e / e.sum()
            G = lut[c] @ gY[n]
            J = (np.diag(p) - np.outer(p, p)) * inv_temp
            gs = P.T @ (J @ G)
            z = (x - thr[c]) * inv_tau[c]
            gx = gs * (1 - np.tanh(z) ** 2) * inv_tau[c]
            np.add.at(gA[n], dims[c], gx)
            gt[c] -= gx
    return codes, gA, gt, glut


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("N,D,C,M", [(1, 3, 1, 1), (9, 13, 3, 5), (40, 30, 2, 17)])
def test_any_depth_backward_matches_slow_reference(xp, rng, depth, N, D, C, M):
    A, dims, thr, lut, inv_tau, gY = _problem_depth(rng, N, D, C, M, depth)
    inv_temp = float(rng.uniform(0.3, 2.0))
    rc, rA, rt, rl = _slow_backward_depth(A, dims, thr, lut, inv_tau, gY, inv_temp, depth)
    a = [xp.asarray(x) for x in (A, dims, thr, inv_tau, lut, gY)]
    codes, Y = kernels.dm_forward(a[0], a[1], a[2], a[4])
    np.testing.assert_array_equal(_h(codes), rc)
    rcodes, rY = dm_reference.dm_forward(a[0], a[1], a[2], a[4])
    np.testing.assert_array_equal(_h(rcodes), rc)
    np.testing.assert_allclose(_h(Y), _h(rY), rtol=1e-5, atol=1e-5 * C)
    tol = lambda r: dict(rtol=1e-4, atol=1e-5 * (np.abs(r).max() + 1))   # noqa: E731
    for impl in (kernels, dm_reference):
        got = impl.dm_backward(a[0], a[1], a[2], a[3], a[4], codes, a[5], inv_temp)
        for g, r, shape in zip(got, (rA, rt, rl), ((N, D), (C, 2 ** depth - 1), lut.shape)):
            g = _h(g)
            assert g.dtype == np.float32 and g.shape == shape
            np.testing.assert_allclose(g, r, **tol(r))
    # only the thresholds' gradient: the same numbers
    _, gt, gl = kernels.dm_backward(a[0], a[1], a[2], a[3], a[4], codes, a[5], inv_temp,
                                    need_a=False, need_lut=False)
    assert gl is None
    np.testing.assert_allclose(_h(gt), rt, **tol(rt))


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_recursive_scores_and_node_sums_equal_the_path_matrix(xp, rng, depth):
    K = 2 ** depth
    P = _path_matrix_depth(depth)
    np.testing.assert_array_equal(_h(dm_reference.path_matrix(depth, xp)), P)
    assert _h(dm_reference.path_matrix(depth, xp)).dtype == np.float32
    # hard signs and arbitrary values, with leading batch axes
    s = np.where(rng.random((7, 3, K - 1)) < 0.5, -1.0, 1.0).astype(np.float32)
    b = _h(dm_reference.leaf_scores(xp.asarray(s)))
    np.testing.assert_array_equal(b, s @ P.T)                  # small integers: exact
    assert (b.max(axis=-1) == depth).all()
    v = rng.standard_normal((5, K - 1)).astype(np.float32)
    np.testing.assert_allclose(_h(dm_reference.leaf_scores(xp.asarray(v))), v @ P.T,
                               rtol=1e-5, atol=1e-5)
    gb = rng.standard_normal((7, 3, K)).astype(np.float32)
    gs = _h(dm_reference.node_sums(xp.asarray(gb)))
    assert gs.shape == (7, 3, K - 1)
    np.testing.assert_allclose(gs, gb.astype(np.float64) @ P, rtol=1e-5, atol=1e-5)
    for bad in (0, 11, 2.0):
        with pytest.raises(ValueError, match="depth"):
            dm_reference.path_matrix(bad)
    with pytest.raises(ValueError, match="nodes"):
        dm_reference.leaf_scores(xp.zeros((2, K), dtype=np.float32))


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_any_depth_surrogate_finite_differences(rng, depth):
    N, D, C, M = 4, 9, 2, 3
    A, dims, thr, lut, inv_tau, gY = _problem_depth(rng, N, D, C, M, depth)
    inv_temp = 0.7
    codes, _ = kernels.dm_forward(A, dims, thr, lut)
    gA, gt, _ = kernels.dm_backward(A, dims, thr, inv_tau, lut, codes, gY, inv_temp)
    A64, t64 = A.astype(np.float64), thr.astype(np.float64)
    P = _path_matrix_depth(depth)

    def f(a, t):   # <G, J(b0) (P tanh((x - t) inv_tau))>, b0 the hard scores at (A, thr)
        total = 0.0
        for n in range(N):
            for c in range(C):
                b = P @ np.where(A64[n, dims[c]] > t64[c], 1.0, -1.0)
                p = np.exp((b - depth) * inv_temp)
                p /= p.sum()
                J = (np.diag(p) - np.outer(p, p)) * inv_temp
                soft = P @ np.tanh((a[n, dims[c]] - t[c]) * inv_tau[c])
                total += (lut[c] @ gY[n]) @ (J @ soft)
        return total

    eps = 1e-6
    assert np.abs(A64[:, dims] - t64[None]).min() > 10 * eps
    for n in range(N):
        for d in range(D):
            e = np.zeros_like(A64)
            e[n, d] = eps
            fd = (f(A64 + e, t64) - f(A64 - e, t64)) / (2 * eps)
            assert abs(fd - gA[n, d]) <= 1e-3 * max(1.0, abs(fd)), (n, d, fd, gA[n, d])
    for c in range(C):
        for j in range(2 ** depth - 1):
            e = np.zeros_like(t64)
            e[c, j] = eps
            fd = (f(A64, t64 + e) - f(A64, t64 - e)) / (2 * eps)
            assert abs(fd - gt[c, j]) <= 1e-3 * max(1.0, abs(fd)), (c, j, fd, gt[c, j])


@pytest.mark.parametrize("depth", DEPTHS)
def test_any_depth_lut_gradient_is_exact(xp, rng, depth):
    # the forward is linear in the LUT: <gY, Y(lut + E)> - <gY, Y(lut)> = <grad, E>
    A, dims, thr, lut, inv_tau, gY = (xp.asarray(a) for a in
                                      _problem_depth(rng, 60, 12, 3, 6, depth))
    codes, Y = kernels.dm_forward(A, dims, thr, lut)
    _, _, gl = kernels.dm_backward(A, dims, thr, inv_tau, lut, codes, gY, 1.0)
    assert gl.shape == (3, 2 ** depth, 6)
    E = xp.asarray(rng.standard_normal(lut.shape).astype(np.float32))
    _, Y2 = kernels.dm_forward(A, dims, thr, lut + E)
    lhs = float((_h(gY).astype(np.float64) * (_h(Y2).astype(np.float64) - _h(Y))).sum())
    np.testing.assert_allclose(lhs, float((_h(gl).astype(np.float64) * _h(E)).sum()),
                               rtol=1e-4, atol=1e-4)


def test_any_depth_bad_shapes_are_refused(xp, rng):
    A, dims, thr, lut, inv_tau, gY = (xp.asarray(a) for a in _problem_depth(rng, 5, 8, 2, 3, 3))
    codes, _ = kernels.dm_forward(A, dims, thr, lut)
    for impl in (kernels, dm_reference):
        with pytest.raises(ValueError, match=r"\(2, 6\)"):          # width 6: no depth
            impl.dm_forward(A, dims[:, :6], thr[:, :6], lut)
        with pytest.raises(ValueError, match="lut"):                 # K = 16 for depth 3
            impl.dm_forward(A, dims, thr, xp.zeros((2, 16, 3), dtype=np.float32))
        with pytest.raises(ValueError, match="lut"):
            impl.dm_backward(A, dims, thr, inv_tau, xp.zeros((2, 16, 3), dtype=np.float32),
                             codes, gY, 1.0)
        with pytest.raises(ValueError, match=r"\(2, 15\)|lut|inv_tau"):
            impl.dm_backward(A, xp.zeros((2, 15), dtype=np.int32), xp.zeros((2, 15), np.float32),
                             inv_tau, lut, codes, gY, 1.0)
