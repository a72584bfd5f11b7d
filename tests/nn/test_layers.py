"""Layers: exact products against plain formulas, gradients by finite differences,
BatchNorm statistics, NimbusLayer mode switching, devices, bad input."""
import numpy as np
import pytest

import nimbus
import nimbus.nn as nn
from nimbus.arrays import backend
from nimbus.arrays.autograd import Tensor


def _h(x):
    return backend.to_host(x)


def _relu_rows(rng, n, d):
    return np.maximum(0, rng.standard_normal((n, d))).astype(np.float32)


def test_linear_exact_forward_and_gradients(xp, rng):
    layer = nn.Linear(6, 4, random_state=int(rng.integers(1000))).to(xp.zeros(1))
    x = Tensor(xp.asarray(rng.standard_normal((5, 6)).astype(np.float32)), requires_grad=True)
    y = layer(x)
    W, b = _h(layer.weight.data), _h(layer.bias.data)
    np.testing.assert_allclose(_h(y.data), _h(x.data) @ W + b, rtol=1e-5, atol=1e-6)
    g = rng.standard_normal((5, 4)).astype(np.float32)
    (y * xp.asarray(g)).sum().backward()
    np.testing.assert_allclose(_h(x.grad), g @ W.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_h(layer.weight.grad), _h(x.data).T @ g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_h(layer.bias.grad), g.sum(0), rtol=1e-5, atol=1e-5)


def _naive_conv(x, w, b, stride, pad):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp_[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 1)])
def test_conv2d_exact_matches_naive_and_gradient(xp, rng, stride, pad):
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=pad, random_state=int(rng.integers(99)))
    conv.to(xp.zeros(1))
    x_np = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    x = Tensor(xp.asarray(x_np), requires_grad=True)
    y = conv(x)
    # weight is B (C*KH*KW, O), flattened like PyTorch's (O, C, KH, KW)
    w = _h(conv.weight.data).T.reshape(4, 3, 3, 3)
    ref = _naive_conv(x_np.astype(np.float64), w, _h(conv.bias.data), stride, pad)
    np.testing.assert_allclose(_h(y.data), ref, rtol=1e-4, atol=1e-4)
    # gradient of sum(y * g) w.r.t. one input pixel, by finite differences
    g = rng.standard_normal(ref.shape)
    (y * xp.asarray(g.astype(np.float32))).sum().backward()
    for _ in range(4):
        idx = tuple(int(rng.integers(s)) for s in x_np.shape)
        e = np.zeros_like(x_np, dtype=np.float64)
        e[idx] = 1e-3
        fd = ((_naive_conv(x_np + e, w, 0, stride, pad) -
               _naive_conv(x_np - e, w, 0, stride, pad)) * g).sum() / 2e-3
        assert abs(fd - float(_h(x.grad)[idx])) < 1e-3 * max(1, abs(fd))


def test_batchnorm_statistics_and_eval(xp, rng):
    bn = nn.BatchNorm(3, momentum=0.5).to(xp.zeros(1))
    X = (3 + 2 * rng.standard_normal((50, 3))).astype(np.float32)
    y = bn(Tensor(xp.asarray(X)))
    np.testing.assert_allclose(_h(y.data).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(_h(y.data).std(0), 1, atol=1e-3)
    np.testing.assert_allclose(_h(bn.running_mean), 0.5 * X.mean(0), rtol=1e-5)
    np.testing.assert_allclose(_h(bn.running_var), 0.5 + 0.5 * X.var(0, ddof=1), rtol=1e-5)
    bn.eval()
    a, b = (_h(v) for v in bn.affine())
    out = bn(xp.asarray(X))
    np.testing.assert_allclose(_h(out), X * a + b, rtol=1e-6, atol=1e-6)
    # 2-D: per channel over (N, H, W)
    bn2 = nn.BatchNorm(2).to(xp.zeros(1))
    img = xp.asarray(rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * 5 + 1)
    out2 = _h(bn2(Tensor(img)).data)
    np.testing.assert_allclose(out2.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    with pytest.raises(ValueError, match="expects 3 input features"):
        bn(xp.zeros((4, 5), dtype=np.float32))


def test_nimbus_layer_switches_modes(xp, rng):
    X = xp.asarray(_relu_rows(rng, 400, 32))
    layer = nn.Linear(32, 8, random_state=int(rng.integers(99))).to(X)
    exact = layer(X)
    assert layer.mode == "exact" and layer.ncodebooks is None
    layer.use("maddness", X, codebook_dim=8)
    assert layer.mode == "maddness" and layer.ncodebooks == 4
    hard = layer(X)
    np.testing.assert_allclose(_h(hard), _h(layer.strategy(X) + layer.bias.data), rtol=1e-6)
    assert nimbus.nmse(_h(exact), _h(hard)) < 0.5
    layer.use("dm", X)                       # starts from the MADDNESS trees it held
    assert layer.mode == "dm" and layer.strategy.init_ == "maddness"
    np.testing.assert_allclose(_h(layer(X)), _h(layer.strategy.harden(False)(X) + layer.bias.data),
                               rtol=1e-6, atol=1e-5)
    names = {tuple(p.shape) for p in layer.parameters()}
    assert names == {(4, 15), (4, 16, 8), (8,)}         # thresholds, LUT, bias: not B
    layer.harden(quantize=True)
    assert layer.mode == "maddness" and layer.strategy.quantize
    layer.use("pq", X, ncodebooks=2)
    assert layer.mode == "pq" and layer.ncodebooks == 2
    layer.use("exact")
    np.testing.assert_array_equal(_h(layer(X)), _h(exact))


def test_hard_layer_refuses_to_pass_gradients(rng):
    X = _relu_rows(rng, 100, 16)
    layer = nn.Linear(16, 4).use("maddness", X)
    with pytest.raises(ValueError, match="passes no gradient"):
        layer(Tensor(X, requires_grad=True))
    layer(Tensor(X))                          # no gradient asked: fine


def test_conv_layer_with_a_strategy(rng):
    basis = rng.standard_normal((2, 2, 6, 6))
    coef = rng.standard_normal((20, 2))
    imgs = np.maximum(0, np.einsum("nk,kchw->nchw", coef, basis)).astype(np.float32)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    exact = conv(imgs)
    conv.use("maddness", imgs, codebook_dim=9, max_fit_rows=500, random_state=0)
    out = conv(imgs)
    assert out.shape == exact.shape == (20, 3, 6, 6)
    assert conv.ncodebooks == 2
    # the strategy sees the im2col windows: rows (n, y, x), features (c, ky, kx)
    pad = np.pad(imgs, ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = np.stack([pad[:, :, i:i + 3, j:j + 3].reshape(20, -1)
                     for i in range(6) for j in range(6)], axis=1).reshape(-1, 18)
    ref = (conv.strategy(rows) + conv.bias.data).reshape(20, 6, 6, 3).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert nimbus.nmse(exact.reshape(20, -1), out.reshape(20, -1)) < 0.9


def test_sequential_calls_and_predict(xp, rng):
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm(16), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(16, 3)).to(xp.zeros(1))
    X = xp.asarray(rng.standard_normal((40, 10)).astype(np.float32))
    model.eval()
    logits = model(X)
    assert type(logits) is type(X) and logits.shape == (40, 3)
    np.testing.assert_array_equal(_h(model.predict(X)), _h(logits).argmax(1))
    np.testing.assert_array_equal(_h(model(X)), _h(logits))      # dropout off in eval
    assert len(model) == 5 and isinstance(model[0], nn.Linear)
    assert nn.ReLU().library() is None and model.library() == backend.library_name(X)
    nn.ReLU()(xp.zeros((2, 3), dtype=np.float32))     # array-free modules take either library
    assert len(model.parameters()) == 6


def test_model_input_errors(rng):
    model = nn.Sequential(nn.Linear(10, 4))
    with pytest.raises(ValueError, match="expects 10 input features"):
        model(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        model(np.full((3, 10), np.nan, np.float32))
    with pytest.raises(TypeError, match="real numbers"):
        model(np.zeros((3, 10), bool))
    with pytest.raises(ValueError, match="unknown method"):
        model[0].use("kmeans", np.zeros((20, 10), np.float32))
    with pytest.raises(ValueError, match="needs the layer's inputs"):
        model[0].use("maddness")
    with pytest.raises(TypeError, match="Sequential takes modules"):
        nn.Sequential(nn.Linear(2, 2), "relu")


@pytest.mark.gpu
def test_model_moves_between_libraries(rng):
    cp = backend.cupy()
    X = _relu_rows(rng, 600, 16)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model[0].use("dm", X)
    ref = model(X)
    with pytest.raises(TypeError, match="model.to"):
        model(cp.asarray(X))
    model.to(cp.asarray(X))
    out = model(cp.asarray(X))
    np.testing.assert_allclose(out.get(), ref, rtol=1e-5, atol=1e-5)
