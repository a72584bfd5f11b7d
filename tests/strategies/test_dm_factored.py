"""DM with ``lut_form="factored"``: LUT = prototypes @ weights, trained through both."""
import numpy as np
import pytest

import nimbus
import nimbus.nn as nn
from nimbus.arrays import backend
from nimbus.arrays.autograd import Tensor
from nimbus.strategies import DM
from nimbus.arrays import kernels
from nimbus.arrays.kernels import dm_reference
from nimbus.strategies.dm import FactoredLUT


def _h(x):
    return backend.to_host(x)


def _data(rng, n=1500, D=20, M=7):
    A = (rng.standard_normal((n, 6)) @ rng.standard_normal((6, D))).astype(np.float32)
    return A, rng.standard_normal((D, M)).astype(np.float32)


def test_factored_lut_gradients_by_finite_differences(xp, rng):
    P = Tensor(xp.asarray(rng.standard_normal((3, 4, 2))), requires_grad=True)
    W = Tensor(xp.asarray(rng.standard_normal((5, 3))), requires_grad=True)
    cols = xp.asarray(np.array([[0, 1], [2, 3], [4, 0]]))
    mask = xp.asarray(np.array([[1, 1], [1, 1], [1, 0]], dtype=np.float64))   # ragged
    G = xp.asarray(rng.standard_normal((3, 4, 3)))
    (FactoredLUT.apply(P, W, cols=cols, mask=mask) * Tensor(G)).sum().backward()

    def loss(p, w):
        return float((FactoredLUT.apply(p, w, cols=cols, mask=mask).data * G).sum())

    eps = 1e-6
    for T, other, first in ((P, W, True), (W, P, False)):
        x = _h(T.data)
        num = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            up, dn = x.copy(), x.copy()
            up[i] += eps
            dn[i] -= eps
            args = [(xp.asarray(up), other.data), (xp.asarray(dn), other.data)]
            if not first:
                args = [(b, a) for a, b in args]
            num[i] = (loss(*args[0]) - loss(*args[1])) / (2 * eps)
        np.testing.assert_allclose(_h(T.grad), num, rtol=1e-6, atol=1e-8)
    # the padded slot of codebook 2 reads column 0 but must give it no gradient
    W2 = Tensor(xp.asarray(rng.standard_normal((5, 3))), requires_grad=True)
    FactoredLUT.apply(Tensor(P.data), W2, cols=cols, mask=mask).sum().backward()
    np.testing.assert_allclose(_h(W2.grad)[0], _h(P.data)[0, :, 0].sum() * np.ones(3))


def test_factored_dm_fits_trains_hardens_and_saves(xp, rng, tmp_path):
    A, B = _data(rng)
    A, B = xp.asarray(A), xp.asarray(B)
    dm = DM(3, depth=5, init="maddness", lut_form="factored", random_state=0).fit(A, B)
    K = 32
    assert dm.proto_.shape == (3, K, 7) and dm.weight_.shape == (20, 7)   # widths 7, 7, 6
    assert [p.shape for p in dm.parameters()] == [(3, K - 1), (3, K, 7), (20, 7)]
    # the initial LUT is the leaves' input means times B
    codes = _h(dm.encode(A))
    c, k = 1, int(np.bincount(codes[:, 1]).argmax())
    cols = _h(dm.cols_)[c][_h(dm.colmask_)[c] > 0]
    want = _h(A)[codes[:, c] == k][:, cols].mean(axis=0) @ _h(B)[cols]
    np.testing.assert_allclose(_h(dm.lut_)[c, k], want, rtol=1e-4, atol=1e-4)
    before = nimbus.nmse(A @ B, dm(A))
    dm.train(A, B, epochs=4)
    after = nimbus.nmse(A @ B, dm(A))
    assert after < before, (after, before)
    # the product is remade once after training, not on every call
    made = dm.lut_
    dm(A)
    assert dm.lut_ is made
    np.testing.assert_allclose(_h(made), _h(FactoredLUT.apply(dm.proto_, dm.weight_, cols=dm.cols_,
                                                             mask=dm.colmask_).data), rtol=1e-6)
    hard = dm.harden(quantize=False)
    np.testing.assert_allclose(_h(hard(A)), _h(dm(A)), rtol=1e-5, atol=1e-5)
    nimbus.save(dm, tmp_path / "f.npz")
    back = nimbus.load(tmp_path / "f.npz")
    assert back.lut_form == "factored"
    np.testing.assert_array_equal(_h(back(A)), _h(dm(A)))


def test_factored_dm_inside_a_network_trains_its_weight_copy(rng):
    A, B = _data(rng, D=16, M=4)
    y = (A[:, 0] > 0).astype(np.int64)
    model = nn.Sequential(nn.Linear(16, 4, random_state=0))
    model.layers[0].use("dm", A, ncodebooks=2, depth=3, init="maddness", lut_form="factored")
    dm = model.layers[0].strategy
    w0 = _h(dm.weight_).copy()
    nn.fit(model, A, y, epochs=2, batch_size=64, lr=1e-2, random_state=0)
    assert not np.allclose(_h(dm.weight_), w0)       # the weight copy trained
    assert set(map(id, model.parameters())) >= set(map(id, dm.parameters()))


def test_bad_lut_form(rng):
    A, B = _data(rng)
    with pytest.raises(ValueError, match="lut_form"):
        DM(2, lut_form="low-rank").fit(A, B)


@pytest.mark.parametrize("depth", [1, 4, 8])
def test_factored_leaf_gradients_equal_the_lut_product(xp, rng, depth):
    # ragged subspaces (D = 20 in 3 codebooks: widths 7, 7, 6) and a random column order
    A, B = _data(rng, n=600)
    order = rng.permutation(20)
    dm = DM(3, depth=depth, init="maddness", lut_form="factored", column_order=order,
            random_state=0).fit(xp.asarray(A), xp.asarray(B))
    gY = xp.asarray(rng.standard_normal((50, 7)).astype(np.float32))
    G = dm_reference.factored_leaf_gradients(gY, dm.proto_, dm.weight_, dm.cols_, dm.colmask_)
    want = dm_reference.leaf_gradients(gY, dm.lut_)
    assert G.shape == (50, 3 * 2 ** depth) and G.dtype == np.float32
    scale = float(abs(_h(want)).max())
    np.testing.assert_allclose(_h(G), _h(want), rtol=0, atol=1e-5 * scale)


def test_factored_dm_backward_matches_the_free_lut_backward(xp, rng):
    """The factored layer's gradients (leaf gradients through the factors) equal those
    of the same LUT trained as a free DM: input, thresholds, prototypes and weights.
    M = 32 outputs: at least 4x the subspace width, where DM.forward takes that path."""
    A, B = _data(rng, n=400, M=32)
    A = xp.asarray(A)
    dm = DM(3, depth=6, init="maddness", lut_form="factored", tau=0.5,
            random_state=0).fit(A, xp.asarray(B))
    x = Tensor(A[:64].copy(), requires_grad=True)
    gY = xp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
    (dm.forward(x) * Tensor(gY)).sum().backward()
    thr, proto, weight = dm.parameters()
    # the same op with a plain LUT product: DMFunction's default leaf gradients
    from nimbus.strategies.dm import DMFunction
    x2 = Tensor(A[:64].copy(), requires_grad=True)
    t2 = Tensor(thr.data.copy(), requires_grad=True)
    p2 = Tensor(proto.data.copy(), requires_grad=True)
    w2 = Tensor(weight.data.copy(), requires_grad=True)
    lut = FactoredLUT.apply(p2, w2, cols=dm.cols_, mask=dm.colmask_)
    Y2 = DMFunction.apply(x2, t2, lut, dims=dm.dims_, inv_tau=dm.inv_tau(), inv_temp=1.0)
    (Y2 * Tensor(gY)).sum().backward()
    for got, want in ((x.grad, x2.grad), (thr.grad, t2.grad), (proto.grad, p2.grad),
                      (weight.grad, w2.grad)):
        scale = float(abs(_h(want)).max()) or 1.0
        assert scale > 0
        np.testing.assert_allclose(_h(got), _h(want), rtol=0, atol=1e-5 * scale)


def test_dm_backward_checks_factors_and_gives_the_same_gradients_with_them(xp, rng):
    A, B = _data(rng, n=300, M=32)
    dm = DM(3, depth=4, init="maddness", lut_form="factored",
            random_state=0).fit(xp.asarray(A), xp.asarray(B))
    x = xp.asarray(A[:10])
    codes, _ = kernels.dm_forward(x, dm.dims_, dm.thresholds_, dm.lut_)
    gY = xp.asarray(rng.standard_normal((10, 32)).astype(np.float32))
    factors = (dm.proto_, dm.weight_, dm.cols_, dm.colmask_)
    args = (x, dm.dims_, dm.thresholds_, dm.inv_tau(), dm.lut_, codes, gY, 1.0)
    got = kernels.dm_backward(*args, factors=factors)
    want = kernels.dm_backward(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(_h(a), _h(b), rtol=0, atol=1e-5 * float(abs(_h(b)).max()))
    bad = [(dm.proto_[:, :8], dm.weight_, dm.cols_, dm.colmask_, "proto"),
           (dm.proto_, dm.weight_[:, :5], dm.cols_, dm.colmask_, "weight"),
           (dm.proto_, dm.weight_, dm.cols_[:, :3], dm.colmask_, "cols"),
           (dm.proto_, dm.weight_, dm.cols_, dm.colmask_[:2], "mask")]
    for *f, name in bad:
        with pytest.raises(ValueError, match=f"factors: {name}"):
            kernels.dm_backward(*args, factors=tuple(f))
    with pytest.raises(TypeError, match="factors must be a tuple"):
        kernels.dm_backward(*args, factors=dm.proto_)
