"""Folding BatchNorm and ReLU into LUT layers gives the unfolded model's outputs.

Layer by layer the folded encodings are bitwise those of the unfolded model (a ReLU
folded into thresholds is exact) and the folded outputs equal the unfolded ones
to float32 rounding. End to end the same holds for every row, except where an
intermediate value lies within rounding of a threshold (then a code may flip);
such rows are detected, not assumed, and must be rare.
"""
import numpy as np
import pytest

import nimbus
import nimbus.nn as nn
from nimbus.arrays import backend
from nimbus.arrays.autograd import Tensor


def _h(x):
    return backend.to_host(x)


def _randomize_bn(bn, rng, negative=True):
    F = bn.num_features
    bn.gamma.data = rng.uniform(0.5, 2.0, F).astype(np.float32) * (
        np.where(rng.random(F) < 0.3, -1, 1) if negative else 1).astype(np.float32)
    bn.beta.data = rng.standard_normal(F).astype(np.float32)
    bn.running_mean = rng.standard_normal(F).astype(np.float32)
    bn.running_var = rng.uniform(0.5, 2.0, F).astype(np.float32)


def _converted_mlp(xp, rng, method="maddness", int8=True, sizes=(24, 32, 16, 5)):
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b, random_state=int(rng.integers(1000))))
        if i < len(sizes) - 2:
            bn = nn.BatchNorm(b)
            _randomize_bn(bn, rng)
            mods += [bn, nn.ReLU()]
    model = nn.Sequential(*mods).eval()
    X = xp.asarray(rng.standard_normal((3000, sizes[0])).astype(np.float32))
    model.to(X)
    H = X
    for m in model.layers:
        if isinstance(m, nn.Linear):
            m.use(method, H, codebook_dim=8, random_state=0)
            if method == "dm":
                # move thresholds and LUT off their initial values, as training would
                thr, lut = m.strategy.parameters()
                thr.data += xp.asarray(0.1 * rng.standard_normal(thr.shape).astype(np.float32))
                lut.data += xp.asarray(0.1 * rng.standard_normal(lut.shape).astype(np.float32))
            m.harden(quantize=int8)
        H = m(H)
    return model, X


def _layer_inputs(model, X):
    """(input, pre-ReLU value or None) of every Linear of the unfolded model."""
    out, x, relu_in = [], X, None
    for m in model.layers:
        if isinstance(m, nn.Linear):
            out.append((x, relu_in))
        relu_in = x if isinstance(m, nn.ReLU) else None
        x = m(x)
    return out


@pytest.mark.parametrize("method,int8", [("maddness", True), ("maddness", False), ("dm", True),
                                         ("joint", True)])
def test_folded_mlp_equals_unfolded(xp, rng, method, int8):
    if method not in nimbus.strategies.REGISTRY:
        pytest.skip(f"no {method} strategy registered")
    model, X = _converted_mlp(xp, rng, method, int8)
    folded = nn.fold(model)
    # a chain of LUT layers only: no BatchNorm or ReLU op is left
    assert [type(m).__name__ for m in folded.layers] == ["Linear"] * 3
    assert all(m.weight is None and m.bias is None for m in folded.layers)
    # layer by layer: bitwise codes, outputs to float32 rounding
    unf_lin = [m for m in model.layers if isinstance(m, nn.Linear)]
    bns = [m for m in model.layers if isinstance(m, nn.BatchNorm)] + [None]
    for k, ((x_in, pre), f) in enumerate(zip(_layer_inputs(model, X), folded.layers)):
        z = x_in if pre is None else pre              # the folded layer reads pre-ReLU values
        np.testing.assert_array_equal(_h(f.strategy.encode(z)), _h(unf_lin[k].strategy.encode(x_in)))
        want = unf_lin[k](x_in)
        if bns[k] is not None:
            want = bns[k](want)
        got = f(z)
        scale = float(np.abs(_h(want)).max())
        np.testing.assert_allclose(_h(got), _h(want), rtol=1e-5, atol=1e-6 * scale)
    # end to end
    want, got = _h(model(X)), _h(folded(X))
    close = np.isclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max()).all(axis=1)
    if not close.all():
        # every differing row must have a code flip caused by a near-tie in some layer
        flips = np.zeros(len(want), bool)
        xf = X
        for (x_in, pre), f, u in zip(_layer_inputs(model, X), folded.layers, unf_lin):
            flips |= (_h(f.strategy.encode(xf)) != _h(u.strategy.encode(x_in))).any(axis=1)
            xf = f(xf)
        assert flips[~close].all()
    assert close.mean() >= 0.99


def test_fold_leaves_the_model_unchanged(rng):
    model, X = _converted_mlp(np, rng)
    before = model(X)
    nn.fold(model)
    np.testing.assert_array_equal(model(X), before)
    assert len(model) == 7


def test_relu_fold_rule_on_ties(rng):
    # zeros, negatives and values equal to thresholds: relu(x) > t must equal x > t'
    X = rng.integers(-3, 4, size=(500, 16)).astype(np.float32)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    model[0].use("maddness", X)
    model[2].use("maddness", model[1](model[0](X)))
    thr = model[2].strategy.thresholds_
    thr[:, ::2] = -1.0                                # some negative thresholds
    thr[:, 1::4] = 0.0                                # and some exactly at zero
    folded = nn.fold(model)
    t = folded[1].strategy.thresholds_
    assert np.isneginf(t[:, ::2]).all() and (t[:, 1::4] == 0).all()
    z = model[0](X)
    np.testing.assert_array_equal(folded[1].strategy.encode(z), model[2].strategy.encode(model[1](z)))


def test_fold_conv_net(rng):
    imgs = np.maximum(0, rng.standard_normal((40, 2, 6, 6))).astype(np.float32)
    bn1, bn2 = nn.BatchNorm(4), nn.BatchNorm(4)
    _randomize_bn(bn1, rng)
    _randomize_bn(bn2, rng)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn1, nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), bn2, nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 3)).eval()
    h = imgs
    for m in model.layers:
        if isinstance(m, nn.NimbusLayer):
            m.use("maddness", h, codebook_dim=9, random_state=0).harden(True)
        h = m(h)
    folded = nn.fold(model)
    assert [type(m).__name__ for m in folded.layers] == ["Conv2d", "Conv2d", "Flatten", "Linear"]
    want, got = model(imgs), folded(imgs)
    close = np.isclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max()).all(axis=1)
    assert close.mean() >= 0.95


def test_what_stays_unfolded(rng):
    # BatchNorm on the input (not after a layer) and a trailing ReLU stay as ops;
    # BatchNorm after an exact layer goes into its weights; the ReLU before a LUT
    # layer goes into its thresholds
    X = rng.standard_normal((300, 16)).astype(np.float32)
    bn_in, bn_mid = nn.BatchNorm(16), nn.BatchNorm(8)
    _randomize_bn(bn_in, rng)
    _randomize_bn(bn_mid, rng)
    model = nn.Sequential(bn_in, nn.Linear(16, 8), bn_mid, nn.ReLU(), nn.Linear(8, 4),
                          nn.ReLU()).eval()
    model[4].use("maddness", model[:4](X)).harden(True)
    folded = nn.fold(model)
    assert [type(m).__name__ for m in folded.layers] == ["BatchNorm", "Linear", "Linear", "ReLU"]
    assert folded[1].mode == "exact" and folded[2].mode == "maddness"
    np.testing.assert_allclose(folded(X), model(X), rtol=1e-4, atol=1e-4)


def test_fold_errors():
    with pytest.raises(TypeError, match="Sequential"):
        nn.fold(nn.Linear(3, 3))
    model, X = _converted_mlp(np, np.random.default_rng(0))
    folded = nn.fold(model)
    with pytest.raises(ValueError, match="folded"):
        folded[0].use("exact")


def test_folded_graph_is_not_trainable_through_hard_layers(rng):
    model, X = _converted_mlp(np, rng)
    folded = nn.fold(model)
    with pytest.raises(ValueError, match="passes no gradient"):
        folded(Tensor(X, requires_grad=True))
