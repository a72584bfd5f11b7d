"""Trees of any depth 1..10 in the tree strategies (MADDNESS, joint, DM) and the pipeline.

K = 2**depth leaves per codebook: shapes follow K, codes stay below K, deeper trees fit
better, depth 4 is the default, joint's blockwise refit (C*K > 4096) keeps ``P @ B ==
LUT``, and a DM of any depth hardens, saves and loads to the same outputs.
"""
import numpy as np
import pytest

import nimbus
from nimbus.arrays import backend
from nimbus.strategies import DM, Joint, Maddness
from nimbus.strategies import _lut


def _h(x):
    return backend.to_host(x)


def _lowrank(rng, n, D, r=6):
    A = rng.standard_normal((n, r)) @ rng.standard_normal((r, D)) + 0.1 * rng.standard_normal((n, D))
    return A.astype(np.float32)


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8, 9])
def test_maddness_shapes_follow_depth(xp, rng, depth):
    K = 2 ** depth
    A = xp.asarray(_lowrank(rng, max(600, 2 * K), 12))
    B = xp.asarray(rng.standard_normal((12, 5)).astype(np.float32))
    op = Maddness(3, depth=depth, split="node").fit(A, B)
    assert op.dims_.shape == (3, K - 1) and op.thresholds_.shape == (3, K - 1)
    assert op.lut_.shape == (3, K, 5) and op.prototypes_.shape == (3, K, 12)
    assert op.nbuckets == K
    codes = _h(op.encode(A))
    assert codes.shape == (A.shape[0], 3) and int(codes.max()) < K
    # apply = lookup(encode) with the 8-bit LUT
    np.testing.assert_allclose(_h(op(A)), _h(op.lookup(op.encode(A))), rtol=1e-5, atol=1e-4)
    if K < 256:
        with pytest.raises(ValueError, match=str(K)):
            op.lookup(xp.full((2, 3), K, dtype=np.uint8))


def test_deeper_trees_fit_better(rng):
    A = _lowrank(rng, 6000, 16)
    B = rng.standard_normal((16, 8)).astype(np.float32)
    tr, te = A[:5000], A[5000:]
    err = {d: nimbus.nmse(te @ B, Maddness(4, depth=d, quantize=False).fit(tr, B)(te))
           for d in (2, 4, 6)}
    assert err[6] < err[4] < err[2], err


def test_default_depth_is_four(rng):
    A = _lowrank(rng, 500, 8)
    B = rng.standard_normal((8, 3)).astype(np.float32)
    a = Maddness(2).fit(A, B)
    b = Maddness(2, depth=4).fit(A, B)
    np.testing.assert_array_equal(_h(a.lut_q_), _h(b.lut_q_))
    assert a.dims_.shape == (2, 15) and "depth=4" in repr(a)


@pytest.mark.parametrize("bad, err", [(0, ValueError), (11, ValueError), (2.0, TypeError),
                                      (True, TypeError)])
def test_bad_depth(rng, bad, err):
    A = _lowrank(rng, 300, 8)
    B = rng.standard_normal((8, 3)).astype(np.float32)
    for cls in (Maddness, Joint, DM):
        with pytest.raises(err, match="depth"):
            cls(2, depth=bad).fit(A, B)


def test_too_few_rows_for_the_leaves(rng):
    A = _lowrank(rng, 100, 8)
    with pytest.raises(ValueError, match="128"):
        Maddness(2, depth=7).fit(A, rng.standard_normal((8, 3)))


def test_maddness_without_ridge_when_too_many_unknowns(rng):
    # C * K = 32 * 256 > 4096: the prototypes are each codebook's own bucket means
    A = _lowrank(rng, 3000, 32)
    B = rng.standard_normal((32, 4)).astype(np.float32)
    op = Maddness(32, depth=8, refine=0, clip=0.0, quantize=False).fit(A, B)
    codes = _h(op.encode(A))
    P = _h(op.prototypes_)
    for c in (0, 17, 31):
        col = A[:, c]
        for k in np.unique(codes[:, c])[:5]:
            np.testing.assert_allclose(P[c, k, c], col[codes[:, c] == k].mean(), rtol=1e-4,
                                       atol=1e-5)
        others = np.delete(np.arange(32), c)
        assert not P[c][:, others].any()


def test_joint_blockwise_refit(xp, rng, monkeypatch):
    # force the blockwise path on a small problem and check it against the dense one
    A = xp.asarray(_lowrank(rng, 2000, 24))
    B = xp.asarray(rng.standard_normal((24, 6)).astype(np.float32))
    dense = Joint(4, depth=5, refine=2, tol=0.0, split="level").fit(A, B)
    monkeypatch.setattr(_lut, "MAX_DENSE_UNKNOWNS", 16)
    monkeypatch.setattr(_lut, "GS_SWEEPS", 60)
    block = Joint(4, depth=5, refine=2, tol=0.0, split="level").fit(A, B)
    assert block.lut_.shape == (4, 32, 6) and block.dims_.shape == (4, 31)
    assert (np.diff(block.train_loss_) <= 1e-9).all(), block.train_loss_
    # P @ B is the refit against Y (Gauss-Seidel is linear in targets and prior)
    ref = _h(block.prototypes_).reshape(4 * 32, 24) @ _h(B)
    np.testing.assert_allclose(_h(block.lut_), ref.reshape(4, 32, 6), rtol=1e-3,
                               atol=1e-3 * np.abs(ref).max())
    # on the same codes, converged sweeps reach the dense solution
    codes = dense.encode(A)
    Y = (A @ B).astype(np.float32)
    no_prior = lambda c, leaves: xp.zeros((32, 6))  # noqa: E731
    want = _lut.CodeRidge(codes, Y, 5.0, no_prior, 32)         # MAX_DENSE_UNKNOWNS = 16
    assert not want.dense
    got = want.solve()
    dense_ridge = _lut.CodeRidge(codes, Y, 5.0, no_prior, 32, dense=True)
    assert dense_ridge.dense
    ref = _h(dense_ridge.solve())
    np.testing.assert_allclose(_h(got), ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))


def test_joint_deeper_fits_better(rng):
    A = _lowrank(rng, 4000, 16)
    B = rng.standard_normal((16, 8)).astype(np.float32)
    tr, te = A[:3000], A[3000:]
    e4 = nimbus.nmse(te @ B, Joint(4, refine=2, quantize=False).fit(tr, B)(te))
    e6 = nimbus.nmse(te @ B, Joint(4, depth=6, refine=2, quantize=False).fit(tr, B)(te))
    assert e6 < e4, (e6, e4)


@pytest.mark.parametrize("depth", [2, 6, 9])
def test_dm_any_depth_hardens_and_saves(xp, rng, tmp_path, depth):
    K = 2 ** depth
    A = xp.asarray(_lowrank(rng, 1500, 16))
    B = xp.asarray(rng.standard_normal((16, 7)).astype(np.float32))
    dm = DM(4, depth=depth, init="maddness", epochs=1, batch_size=128, random_state=1).fit(A, B)
    assert dm.lut_.shape == (4, K, 7) and dm.dims_.shape == (4, K - 1)
    hard = dm.harden(quantize=False)
    assert hard.depth == depth
    np.testing.assert_allclose(_h(hard(A)), _h(dm(A)), rtol=1e-5, atol=1e-5)
    nimbus.save(dm, tmp_path / "dm.npz")
    back = nimbus.load(tmp_path / "dm.npz")
    assert back.depth == depth
    np.testing.assert_array_equal(_h(back(A)), _h(dm(A)))


def test_dm_from_tree_takes_the_tree_depth(rng):
    A = _lowrank(rng, 800, 12)
    B = rng.standard_normal((12, 3)).astype(np.float32)
    tree = Maddness(3, depth=5, quantize=False).fit(A, B)
    dm = DM.from_tree(tree, A)
    assert dm.depth == 5 and dm.lut_.shape == (3, 32, 3)
    np.testing.assert_allclose(dm(A), tree(A), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depth"):
        DM.from_tree(tree, A, depth=4)
