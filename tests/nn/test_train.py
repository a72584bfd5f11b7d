"""fit's training-time input noise (``input_noise``) and its forward."""
import numpy as np
import pytest

import nimbus.nn as nn
from nimbus.arrays import backend
from nimbus.arrays.autograd import Tensor
from nimbus.nn.train import noisy_forward


def _identity_model(D):
    lin = nn.Linear(D, D, random_state=0)
    lin.weight.data[...] = np.eye(D, dtype=np.float32)
    lin.bias.data[...] = 0
    return nn.Sequential(lin)


def test_noise_has_the_asked_scale_per_feature(xp, rng):
    # identity layer: output - input is exactly the noise added before the layer
    N, D, sigma = 20000, 6, 0.3
    model = _identity_model(D)
    X = (rng.standard_normal((N, D)) * np.array([0.1, 1, 3, 10, 0.5, 2])).astype(np.float32)
    X = backend.like(X, xp.zeros(1))
    model.to(X)
    fwd = noisy_forward(model, sigma, 1, X)
    noise = backend.to_host(fwd(Tensor(X)).data - X)
    want = sigma * backend.to_host(X).std(axis=0)
    np.testing.assert_allclose(noise.std(axis=0), want, rtol=0.03)
    np.testing.assert_allclose(noise.mean(axis=0), 0, atol=4 * want.max() / np.sqrt(N))
    # independent of the input and fresh on every call
    noise2 = backend.to_host(fwd(Tensor(X)).data - X)
    assert abs(np.corrcoef(noise[:, 3], noise2[:, 3])[0, 1]) < 0.05
    assert abs(np.corrcoef(noise[:, 3], backend.to_host(X)[:, 3])[0, 1]) < 0.05


def test_noise_before_every_layer_not_after(rng):
    # two identity layers: the output carries two noise draws, the second scaled by the
    # std of the (already noisy) hidden values
    N, D, sigma = 20000, 4, 0.5
    a, b = _identity_model(D).layers[0], _identity_model(D).layers[0]
    model = nn.Sequential(a, nn.Sequential(b))      # nested layers get noise as well
    X = rng.standard_normal((N, D)).astype(np.float32)
    out = noisy_forward(model, sigma, 0, X)(Tensor(X)).data
    s1 = sigma * X.std(axis=0)
    hidden_std = np.sqrt(X.std(axis=0) ** 2 + s1 ** 2)
    want = np.sqrt(s1 ** 2 + (sigma * hidden_std) ** 2)
    np.testing.assert_allclose((out - X).std(axis=0), want, rtol=0.04)


def test_fit_with_input_noise_trains_and_validates(rng):
    X = rng.standard_normal((600, 10)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    model = nn.Sequential(nn.Linear(10, 16, random_state=0), nn.ReLU(), nn.Linear(16, 2, random_state=1))
    table = nn.fit(model, X, y, epochs=15, batch_size=64, lr=1e-2, random_state=0, input_noise=0.2)
    assert table.rows[-1]["loss"] < table.rows[0]["loss"]
    assert nn.accuracy(model, X, y) > 0.9
    with pytest.raises(ValueError, match="input_noise"):
        nn.fit(model, X, y, epochs=1, input_noise=-0.1)
    with pytest.raises(TypeError, match="input_noise"):
        nn.fit(model, X, y, epochs=1, input_noise="much")


def test_noise_needs_a_sequential(rng):
    with pytest.raises(TypeError, match="Sequential"):
        noisy_forward(nn.Linear(3, 3), 0.1, 0, np.zeros((2, 3), np.float32))


def test_zero_noise_is_plain_training(rng):
    X = rng.standard_normal((200, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    tables = []
    for noise in (0.0, None):
        model = nn.Sequential(nn.Linear(5, 2, random_state=0))
        kw = {} if noise is None else {"input_noise": noise}
        tables.append(nn.fit(model, X, y, epochs=2, random_state=3, **kw))
    assert [r["loss"] for r in tables[0].rows] == [r["loss"] for r in tables[1].rows]


def test_convert_pretrains_with_noise(rng):
    Xtr, ytr, Xte, yte = nn.data.load_digits(random_state=0)
    model = nn.Sequential(nn.Linear(64, 32, random_state=0), nn.BatchNorm(32), nn.ReLU(),
                          nn.Linear(32, 10, random_state=1))
    report = nn.convert(model, Xtr, ytr, depth=4, codebook_dim=8, pretrain_epochs=10, pretrain_noise=0.3,
                        epochs_per_layer=1, finetune_epochs=0, batch_size=64,
                        validation=(Xte, yte), random_state=0)
    assert report.settings["pretrain_noise"] == 0.3
    assert report.accuracy("pretrain") > 0.85
    with pytest.raises(ValueError, match="pretrain_noise"):
        nn.convert(model, Xtr, ytr, depth=4, codebook_dim=8, pretrain_noise=-1.0)
