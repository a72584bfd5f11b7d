"""SGD and Adam against steps computed by hand (float64), on NumPy and CuPy."""
import math

import numpy as np
import pytest

from nimbus.arrays import autograd as ag
from nimbus.arrays import optim
from nimbus.arrays.autograd import Tensor


def _h(x):
    x = x.data if isinstance(x, Tensor) else x
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _param(xp, arr, dtype=np.float64):
    # a copy: updates happen in place and must not touch the reference array
    return Tensor(xp.asarray(np.array(arr, dtype=dtype)), requires_grad=True)


def _run(opt, param, grads, xp):
    """Apply one step per given gradient; returns the parameter after each step."""
    seen = []
    for g in grads:
        param.grad = xp.asarray(g)
        opt.step()
        seen.append(_h(param).copy())
    return seen


def test_sgd_plain_and_weight_decay(xp, rng):
    p0 = rng.standard_normal(5)
    grads = rng.standard_normal((3, 5))
    p = _param(xp, p0)
    got = _run(optim.SGD([p], lr=0.1, weight_decay=0.01), p, grads, xp)
    want = p0.copy()
    for g, step in zip(grads, got):
        want = want - 0.1 * (g + 0.01 * want)
        np.testing.assert_allclose(step, want, rtol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum(xp, rng, nesterov):
    p0 = rng.standard_normal((2, 3))
    grads = rng.standard_normal((4, 2, 3))
    p = _param(xp, p0)
    got = _run(optim.SGD([p], lr=0.05, momentum=0.9, nesterov=nesterov), p, grads, xp)
    want, buf = p0.copy(), None
    for g, step in zip(grads, got):
        buf = g.copy() if buf is None else 0.9 * buf + g
        want = want - 0.05 * (g + 0.9 * buf if nesterov else buf)
        np.testing.assert_allclose(step, want, rtol=1e-12)


def _adam_reference(p0, grads, lr, b1, b2, eps, wd, decoupled):
    p, m, v, out = p0.copy(), 0.0, 0.0, []
    for t, g in enumerate(grads, start=1):
        if wd and not decoupled:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if decoupled:
            p = p * (1 - lr * wd)
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        out.append(p.copy())
    return out


@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_matches_hand_computed_steps(xp, rng, wd, decoupled):
    p0 = rng.standard_normal(6)
    grads = rng.standard_normal((5, 6))
    p = _param(xp, p0)
    opt = optim.Adam([p], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd,
                     decoupled=decoupled)
    got = _run(opt, p, grads, xp)
    want = _adam_reference(p0, grads, 0.01, 0.8, 0.99, 1e-6, wd, decoupled)
    for step, ref in zip(got, want):
        np.testing.assert_allclose(step, ref, rtol=1e-10)


def test_adam_first_step_is_lr_times_sign(xp, rng):
    # bias correction makes the first step lr * g / (|g| + eps): about lr in every coordinate
    p0 = rng.standard_normal(8)
    g = rng.standard_normal(8)
    p = _param(xp, p0)
    _run(optim.Adam([p], lr=0.1, eps=1e-12), p, [g], xp)
    np.testing.assert_allclose(_h(p), p0 - 0.1 * g / (np.abs(g) + 1e-12), rtol=1e-12)
    np.testing.assert_allclose(_h(p), p0 - 0.1 * np.sign(g), atol=1e-6)


def test_adam_minimizes_a_quadratic(xp, rng):
    # random rotations with singular values in [0.5, 2]: every draw is well conditioned
    q1 = np.linalg.qr(rng.standard_normal((8, 8)))[0][:, :5]
    q2 = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    A = q1 @ np.diag(rng.uniform(0.5, 2.0, 5)) @ q2.T
    b = A @ rng.standard_normal(5) + 0.1 * rng.standard_normal(8)
    x_star = np.linalg.lstsq(A, b, rcond=None)[0]
    x = _param(xp, np.zeros(5), dtype=np.float32)
    A_t, b_t = xp.asarray(A, dtype=np.float32), xp.asarray(b, dtype=np.float32)
    opt = optim.Adam([x], lr=0.05)
    for t in range(1500):
        # anneal on a cosine from 0.05 to 1e-4 (as nn.train's loop does): constant steps
        # of Adam keep hovering about lr away from the minimum
        opt.lr = 1e-4 + 0.5 * (0.05 - 1e-4) * (1 + math.cos(math.pi * t / 1500))
        opt.zero_grad()
        r = A_t @ x.reshape(5, 1) - b_t.reshape(8, 1)
        (r * r).sum().backward()
        opt.step()
    assert x.dtype == np.float32
    np.testing.assert_allclose(_h(x), x_star, atol=2e-3)


def test_updates_in_place_and_keep_dtype(xp, rng):
    for make in (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
                 lambda ps: optim.Adam(ps, lr=0.1, weight_decay=1e-3, decoupled=True)):
        p = _param(xp, rng.standard_normal((3, 2)), dtype=np.float32)
        buffer = p.data
        opt = make([p])
        for _ in range(2):
            p.grad = xp.asarray(rng.standard_normal((3, 2)), dtype=np.float32)
            opt.step()
        assert p.data is buffer and p.dtype == np.float32


def test_zero_grad_and_skipping_params_without_grad(xp, rng):
    a = _param(xp, rng.standard_normal(3))
    b = _param(xp, rng.standard_normal(3))
    b_before = _h(b).copy()
    opt = optim.Adam([a, b, a], lr=0.1)              # duplicates are kept once
    assert len(opt.params) == 2
    (a * 2.0).sum().backward()
    opt.step()
    np.testing.assert_array_equal(_h(b), b_before)    # b had no gradient: untouched
    assert opt.state[1] == {}
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_training_loop_with_autograd(xp, rng):
    # SGD with momentum on logistic regression: the loss must fall a lot
    X = rng.standard_normal((200, 4))
    y = (X @ np.array([1.0, -2.0, 0.5, 0.0]) > 0).astype(np.int64)
    w = _param(xp, np.zeros((4, 2)), dtype=np.float32)
    Xt, yt = Tensor(xp.asarray(X, dtype=np.float32)), xp.asarray(y)
    opt = optim.SGD([w], lr=0.5, momentum=0.9)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = ag.softmax_cross_entropy(Xt @ w, yt)
        loss.backward()
        opt.step()
        losses.append(float(_h(loss)))
    assert losses[-1] < 0.2 * losses[0]


def test_optimizer_errors(xp):
    p = _param(xp, [1.0])
    with pytest.raises(ValueError, match="lr"):
        optim.SGD([p], lr=0.0)
    with pytest.raises(TypeError, match="iterable"):
        optim.SGD(p, lr=0.1)
    with pytest.raises(TypeError, match="Tensor"):
        optim.Adam([xp.ones(2)])
    with pytest.raises(ValueError, match="empty"):
        optim.Adam([])
    with pytest.raises(ValueError, match="requires_grad"):
        optim.Adam([Tensor(xp.ones(2))])
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam([p], betas=(0.9, 1.0))
