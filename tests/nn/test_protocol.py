"""The strategy protocol: a strategy defined here, registered here, runs through the whole
network code (fit a layer, train, convert, fold, save and load) with no change to nimbus.nn.

``LutOnly`` is a trainable strategy of its own kind: hard MADDNESS trees, and a LUT that
trains by backprop (its gradient is the exact scatter-add; no gradient reaches the input).
Its hard form is itself with the trained LUT, re-quantized as asked.
"""
import numpy as np
import pytest

import nimbus
import nimbus.nn as nn
from nimbus.arrays import backend, kernels
from nimbus.arrays.autograd import Function, Tensor
from nimbus.arrays.optim import Adam
from nimbus.strategies import REGISTRY, Maddness, register
from nimbus.strategies.base import TreeStrategy


class _LutSum(Function):
    """Y = sum_c lut[c, codes[:, c]]: gradient to the LUT only (scatter-add)."""

    @staticmethod
    def forward(ctx, x, lut, *, codes):
        ctx.codes, ctx.K = codes, lut.shape[1]
        return kernels.lookup(codes, lut)

    @staticmethod
    def backward(ctx, g):
        return None, kernels.lookup_backward(ctx.codes, g, ctx.K)


class LutOnly(TreeStrategy):
    name = "test_lut_only"
    trainable = True

    def __init__(self, ncodebooks=16, *, depth=4, hard=False, quantize=False, random_state=None):
        super().__init__(ncodebooks, quantize=quantize, random_state=random_state)
        self.depth = depth
        self.hard = hard

    def _fit(self, A, rng, B):
        tree = Maddness(ncodebooks=self.ncodebooks, depth=self.depth, quantize=False,
                        refine=0).fit(A, B)
        self.starts_ = tree.starts_
        self.dims_, self.thresholds_ = tree.dims_, tree.thresholds_
        self.prototypes_ = tree.prototypes_

    def parameters(self):
        if self.hard:
            return []
        t = getattr(self, "_lut_t", None)
        if t is None or t.data is not self.lut_:
            t = self._lut_t = Tensor(self.lut_, requires_grad=True)
        return [t]

    def optimizers(self, lr):
        return [Adam(self.parameters(), lr=lr * float(self.lut_.std() or 1.0))] \
            if not self.hard else []

    def forward(self, x):
        if self.hard:
            return super().forward(x)
        self._cache = {}
        codes = self.encode(x.data)
        return _LutSum.apply(x, self.parameters()[0], codes=codes)

    def harden(self, quantize=None):
        if self.hard:
            return super().harden(quantize)
        out = self.copy()
        out.hard = True
        out.quantize = bool(quantize)
        out._set_lut(out.lut_)
        return out


@pytest.fixture
def lut_only():
    register(LutOnly)
    try:
        yield LutOnly
    finally:
        REGISTRY.pop(LutOnly.name, None)


def _mlp(seed):
    return nn.Sequential(nn.Linear(64, 32, random_state=seed), nn.BatchNorm(32), nn.ReLU(),
                         nn.Linear(32, 10, random_state=seed + 1))


def test_new_strategy_through_the_network_code(tmp_path, lut_only, rng):
    Xtr, ytr, Xte, yte = nn.data.load_digits(random_state=0)
    model = _mlp(int(rng.integers(99)))
    nn.fit(model, Xtr, ytr, epochs=8, batch_size=64, random_state=0)
    float_acc = nn.accuracy(model, Xte, yte)

    # a layer switches to it and trains it (its LUT moves; the weights do not)
    conv = nn.Conversion(model, Xtr, ytr, method=lut_only.name, depth=4,
                                 epochs_per_layer=2, finetune_epochs=1, batch_size=64,
                                 validation=(Xte, yte), random_state=0)
    conv.evaluate_float()
    conv.layers()
    layers = [m for m in model if isinstance(m, nn.NimbusLayer)]
    assert all(isinstance(m.strategy, lut_only) for m in layers)
    assert all(m.mode == lut_only.name for m in layers)
    assert sum(len(m.strategy.parameters()) for m in layers) == 2
    # the trained LUT differs from the initial prototypes @ B
    s0 = layers[0].strategy
    init = (s0.prototypes_.reshape(-1, 64) @ layers[0].weight.data).reshape(s0.lut_.shape)
    assert not np.allclose(init, s0.lut_)
    # a model mid-conversion (trainable strategy) saves and loads through the registry
    path = tmp_path / "mid.npz"
    nimbus.save(model, path)
    back = nimbus.load(path)
    assert isinstance(back[0].strategy, lut_only)
    np.testing.assert_array_equal(back(Xte), model(Xte))

    conv.finetune()
    conv.int8()
    assert all(m.strategy.hard and m.strategy.quantize for m in layers)
    unfolded = model(Xte)
    conv.fold()
    # folded: BatchNorm and ReLU went into the LUT layers
    assert [type(m).__name__ for m in model] == ["Linear", "Linear"]
    np.testing.assert_allclose(model(Xte), unfolded, rtol=1e-5, atol=1e-4)
    acc = nn.accuracy(model, Xte, yte)
    assert acc > float_acc - 0.2          # a working classifier, not noise
    assert conv.report.final_accuracy == pytest.approx(acc)

    path = tmp_path / "folded.npz"
    nimbus.save(model, path)
    back = nimbus.load(path)
    np.testing.assert_array_equal(back(Xte), model(Xte))


def test_convert_refuses_a_method_that_does_not_train(lut_only):
    Xtr, ytr, _, _ = nn.data.load_digits(random_state=0)
    with pytest.raises(ValueError, match="not a registered trainable"):
        nn.convert(_mlp(0), Xtr, ytr, method="maddness")
    with pytest.raises(TypeError, match="unknown recipe field"):
        nn.convert(_mlp(0), Xtr, ytr, depht=4)


def test_hard_strategy_refuses_gradients(lut_only):
    Xtr, ytr, _, _ = nn.data.load_digits(random_state=0)
    layer = nn.Linear(64, 10, random_state=0)
    layer.use(lut_only.name, Xtr[:400], ncodebooks=8)
    layer.harden(quantize=True)
    x = Tensor(Xtr[:5], requires_grad=True)
    with pytest.raises(ValueError, match="passes no gradient"):
        layer(x)
    assert backend.is_array(layer(Xtr[:5]))


def test_fold_keeps_a_held_exact_strategy():
    """fold hardens every held strategy: a hard one without a LUT (exact) stays as it is."""
    Xtr, _, Xte, _ = nn.data.load_digits(random_state=0)
    layer = nn.Linear(64, 10, random_state=0)
    exact = nimbus.strategies.Exact().fit(Xtr, layer.weight.data)
    layer.use(exact)
    folded = nn.fold(nn.Sequential(layer))
    assert folded[0].strategy.harden() is folded[0].strategy
    np.testing.assert_allclose(folded(Xte), Xte @ layer.weight.data + layer.bias.data,
                               rtol=1e-5, atol=1e-5)
