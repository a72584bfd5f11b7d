"""The autograd: every op against central finite differences (float64), on NumPy and CuPy.

Besides the gradient checks: values against direct formulas (naive convolution
loop, batch-norm and cross-entropy formulas), dtype preservation in float32,
gradient accumulation, unbroadcasting, a 10000-op chain, no_grad, the Function
contract, error messages, and a small MLP that must learn sklearn's digits.
"""
import time

import numpy as np
import pytest

from nimbus.arrays import autograd as ag
from nimbus.arrays import optim
from nimbus.arrays.autograd import Function, Tensor


def _h(x):
    x = x.data if isinstance(x, Tensor) else x
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _t(xp, arr, grad=True, dtype=np.float64):
    return Tensor(xp.asarray(np.array(arr, dtype=dtype)), requires_grad=grad)


# ------------------------------------------------------------------ finite differences
def _objective(fn, tensors, weight):
    with ag.no_grad():
        return float(_h((fn(*tensors).data * weight).sum()))


def numeric_grads(fn, tensors, weight, eps=1e-6):
    """Central differences of sum(fn(*tensors) * weight) w.r.t. every entry of every tensor."""
    grads = []
    for t in tensors:
        g = np.zeros(t.shape)
        flat = t.data.reshape(-1)                       # a view: writes go into t.data
        for j in range(flat.size):
            old = float(flat[j])
            flat[j] = old + eps
            hi = _objective(fn, tensors, weight)
            flat[j] = old - eps
            lo = _objective(fn, tensors, weight)
            flat[j] = old
            g.reshape(-1)[j] = (hi - lo) / (2 * eps)
        grads.append(g)
    return grads


def check_gradients(xp, rng, fn, *arrays, rtol=1e-5, atol=1e-7):
    """Backward of fn at float64 ``arrays`` equals finite differences."""
    tensors = [_t(xp, a) for a in arrays]
    out = fn(*tensors)
    assert out.requires_grad
    weight = xp.asarray(rng.standard_normal(out.shape))
    out.backward(weight)
    numeric = numeric_grads(fn, tensors, weight)
    for i, (t, want) in enumerate(zip(tensors, numeric)):
        assert t.grad is not None, f"input {i} got no gradient"
        assert t.grad.shape == t.shape and t.grad.dtype == np.float64
        np.testing.assert_allclose(_h(t.grad), want, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i}")
    return out


def _normal(rng, *shape):
    return rng.standard_normal(shape)


def _positive(rng, *shape):
    return rng.uniform(0.5, 2.0, size=shape)


def _distinct(rng, *shape):
    """Well-separated values (a shuffled grid plus jitter): no near-ties for max/relu."""
    n = int(np.prod(shape))
    vals = (rng.permutation(n) - n / 2) * 0.1 + 0.05 + rng.uniform(-0.02, 0.02, n)
    return vals.reshape(shape)


class Square(Function):
    """x * x + 3 y: a custom Function used as one of the checked ops."""

    @staticmethod
    def forward(ctx, x, y, scale=1.0):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return scale * (x * x) + 3 * y

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved
        return 2 * ctx.scale * x * grad_out, 3 * grad_out


# (name, function of tensors, input makers); each maker gets rng
OPS = [
    ("add", lambda a, b: a + b, [(_normal, 3, 4), (_normal, 3, 4)]),
    ("add_broadcast_row", lambda a, b: a + b, [(_normal, 3, 4), (_normal, 4)]),
    ("add_broadcast_both", lambda a, b: a + b, [(_normal, 3, 1), (_normal, 1, 4)]),
    ("add_broadcast_0d", lambda a, b: a + b, [(_normal, 2, 3), (_normal,)]),
    ("radd_scalar", lambda a: 2.5 + a, [(_normal, 3, 2)]),
    ("add_raw_array", lambda a: a + a.xp.arange(4.0) + 1, [(_normal, 2, 4)]),
    ("sub", lambda a, b: a - b, [(_normal, 3, 4), (_normal, 3, 1)]),
    ("rsub_scalar", lambda a: 1.5 - a, [(_normal, 3)]),
    ("rsub_raw_array", lambda a: a.xp.ones((2, 3)) - a, [(_normal, 3)]),
    ("mul", lambda a, b: a * b, [(_normal, 3, 4), (_normal, 1, 4)]),
    ("mul_self", lambda a: a * a, [(_normal, 5)]),
    ("rmul_scalar", lambda a: 3.0 * a * 2, [(_normal, 2, 3)]),
    ("div", lambda a, b: a / b, [(_normal, 3, 4), (_positive, 4)]),
    ("rdiv_scalar", lambda a: 2.0 / a, [(_positive, 3, 2)]),
    ("neg", lambda a: -a, [(_normal, 4, 2)]),
    ("pow2", lambda a: a ** 2, [(_normal, 3, 3)]),
    ("pow3", lambda a: a ** 3, [(_normal, 3, 3)]),
    ("pow_half", lambda a: a ** 0.5, [(_positive, 3, 3)]),
    ("pow_neg", lambda a: a ** -1.5, [(_positive, 3, 3)]),
    ("matmul", lambda a, b: a @ b, [(_normal, 3, 4), (_normal, 4, 5)]),
    ("matmul_batched", lambda a, b: a @ b, [(_normal, 2, 3, 4), (_normal, 2, 4, 5)]),
    ("matmul_batched_shared", lambda a, b: a @ b, [(_normal, 2, 3, 4), (_normal, 4, 5)]),
    ("matmul_batch_broadcast", lambda a, b: a @ b, [(_normal, 1, 3, 4), (_normal, 2, 4, 2)]),
    ("rmatmul_raw", lambda b: b.xp.linspace(-1, 1, 12).reshape(3, 4) @ b, [(_normal, 4, 2)]),
    ("relu", lambda a: a.relu(), [(_distinct, 4, 5)]),
    ("exp", lambda a: a.exp(), [(_normal, 3, 4)]),
    ("log", lambda a: a.log(), [(_positive, 3, 4)]),
    ("tanh", lambda a: a.tanh(), [(_normal, 3, 4)]),
    ("sigmoid", lambda a: a.sigmoid(), [(_normal, 3, 4)]),
    ("sum_all", lambda a: a.sum(), [(_normal, 3, 4)]),
    ("sum_axis0", lambda a: a.sum(axis=0), [(_normal, 3, 4)]),
    ("sum_neg_axis_keep", lambda a: a.sum(axis=-1, keepdims=True), [(_normal, 2, 3, 4)]),
    ("sum_tuple", lambda a: a.sum(axis=(0, 2)), [(_normal, 2, 3, 4)]),
    ("mean_all", lambda a: a.mean(), [(_normal, 3, 4)]),
    ("mean_axis1", lambda a: a.mean(axis=1), [(_normal, 3, 4)]),
    ("mean_tuple_keep", lambda a: a.mean(axis=(1, 2), keepdims=True), [(_normal, 2, 3, 4)]),
    ("max_all", lambda a: a.max(), [(_distinct, 3, 4)]),
    ("max_axis1", lambda a: a.max(axis=1), [(_distinct, 3, 4)]),
    ("max_axis0_keep", lambda a: a.max(axis=0, keepdims=True), [(_distinct, 3, 4)]),
    ("max_tuple", lambda a: a.max(axis=(0, 2)), [(_distinct, 2, 3, 4)]),
    ("reshape", lambda a: a.reshape(4, -1) * a.xp.arange(6.0), [(_normal, 2, 3, 4)]),
    ("transpose", lambda a: a.T, [(_normal, 3, 4)]),
    ("permute", lambda a: a.permute(2, 0, 1), [(_normal, 2, 3, 4)]),
    ("getitem_slice", lambda a: a[1:, ::2], [(_normal, 4, 5)]),
    ("getitem_int_repeats", lambda a: a[a.xp.asarray([0, 2, 2, 0, 1])], [(_normal, 3, 4)]),
    ("getitem_pairs", lambda a: a[a.xp.asarray([0, 1, 1]), a.xp.asarray([2, 0, 0])],
     [(_normal, 3, 4)]),
    ("getitem_mask", lambda a: a[a.xp.asarray([True, False, True])], [(_normal, 3, 4)]),
    ("take_rows", lambda a: ag.take_rows(a, a.xp.asarray([3, 0, 3, 3, 1])), [(_normal, 4, 3)]),
    ("concatenate0", lambda a, b: ag.concatenate([a, b], axis=0), [(_normal, 2, 3), (_normal, 4, 3)]),
    ("concatenate_raw", lambda a, b: ag.concatenate([a, a.xp.ones((2, 1)), b], axis=1),
     [(_normal, 2, 3), (_normal, 2, 2)]),
    ("pad", lambda a: ag.pad(a, ((0, 0), (1, 2), (2, 1)), value=0.5), [(_normal, 2, 3, 3)]),
    ("batch_norm_2d", lambda x, g, b: ag.batch_norm(x, g, b), [(_normal, 6, 3), (_positive, 3),
                                                             (_normal, 3)]),
    ("batch_norm_2d_plain", lambda x: ag.batch_norm(x), [(_normal, 5, 4)]),
    ("batch_norm_4d", lambda x, g, b: ag.batch_norm(x, g, b), [(_normal, 3, 2, 3, 2), (_positive, 2),
                                                             (_normal, 2)]),
    ("log_softmax", lambda a: ag.log_softmax(a), [(_normal, 3, 5)]),
    ("log_softmax_axis0", lambda a: ag.log_softmax(a, axis=0), [(_normal, 3, 5)]),
    ("softmax", lambda a: ag.softmax(a), [(_normal, 3, 5)]),
    ("cross_entropy_mean",
     lambda a: ag.softmax_cross_entropy(a, a.xp.asarray([0, 4, 2, 4])), [(_normal, 4, 5)]),
    ("cross_entropy_sum",
     lambda a: ag.softmax_cross_entropy(a, a.xp.asarray([1, 1, 0]), reduction="sum"),
     [(_normal, 3, 2)]),
    ("cross_entropy_none",
     lambda a: ag.softmax_cross_entropy(a, a.xp.asarray([2, 0, 1]), reduction="none"),
     [(_normal, 3, 3)]),
    ("function", lambda a, b: Square.apply(a, b, scale=0.5), [(_normal, 3, 2), (_normal, 3, 2)]),
    ("function_then_ops", lambda a: Square.apply(a.tanh(), a).sum(axis=0), [(_normal, 3, 2)]),
    ("composite_mlp", lambda x, w1, w2: ag.softmax_cross_entropy(
        (x @ w1).relu() @ w2, x.xp.asarray([0, 2, 1, 2])), [(_normal, 4, 3), (_normal, 3, 5),
                                                            (_normal, 5, 3)]),
]
OP_IDS = [name for name, _, _ in OPS]


def _inputs(rng, makers):
    return [maker(rng, *shape) for maker, *shape in makers]


@pytest.mark.parametrize("name,fn,makers", OPS, ids=OP_IDS)
def test_gradient_matches_finite_differences(xp, rng, name, fn, makers):
    check_gradients(xp, rng, fn, *_inputs(rng, makers))


@pytest.mark.parametrize("name,fn,makers", OPS, ids=OP_IDS)
def test_float32_stays_float32(xp, rng, name, fn, makers):
    tensors = [_t(xp, a, dtype=np.float32) for a in _inputs(rng, makers)]
    out = fn(*tensors)
    assert out.dtype == np.float32, f"{name} produced {out.dtype}"
    assert type(out.data) is type(tensors[0].data)
    out.backward(xp.ones(out.shape, dtype=np.float32))
    for t in tensors:
        assert t.grad.dtype == np.float32


def test_every_public_op_is_checked():
    # a new op added to __all__ without a gradient case should fail here
    covered = {"add", "sub", "mul", "div", "neg", "pow", "matmul", "relu", "exp", "log", "tanh",
               "sigmoid", "sum", "mean", "max", "reshape", "transpose", "permute", "getitem",
               "take_rows", "concatenate", "pad",
               "batch_norm", "log_softmax", "softmax", "softmax_cross_entropy"}
    helpers = {"Tensor", "Function", "Context", "tensor", "no_grad", "is_grad_enabled",
               "unbroadcast", "im2col", "col2im"}
    assert set(ag.__all__) == covered | helpers


# ------------------------------------------------------------------ engine behaviour
def test_tensor_used_twice_accumulates(xp, rng):
    x0 = rng.standard_normal((3, 4))
    x = _t(xp, x0)
    y = x * x + x * 3.0 + x.exp()
    y.backward(xp.ones((3, 4)))
    np.testing.assert_allclose(_h(x.grad), 2 * x0 + 3 + np.exp(x0), rtol=1e-12)
    # a second, separate graph adds to the existing gradient
    (x * 2.0).sum().backward()
    np.testing.assert_allclose(_h(x.grad), 2 * x0 + 5 + np.exp(x0), rtol=1e-12)
    x.zero_grad()
    assert x.grad is None


def test_diamond_graph(xp, rng):
    a0 = rng.standard_normal(5)
    a = _t(xp, a0)
    b = a.tanh()
    c = b * b + b                                     # b feeds two ops
    c.sum().backward()
    t = np.tanh(a0)
    np.testing.assert_allclose(_h(a.grad), (2 * t + 1) * (1 - t * t), rtol=1e-12)


def test_unbroadcast(xp, rng):
    g = xp.asarray(rng.standard_normal((2, 3, 4)))
    gh = _h(g)
    np.testing.assert_allclose(_h(ag.unbroadcast(g, (3, 1))), gh.sum(axis=(0, 2))[:, None],
                               rtol=1e-12)
    np.testing.assert_allclose(_h(ag.unbroadcast(g, ())), gh.sum(), rtol=1e-12)
    np.testing.assert_allclose(_h(ag.unbroadcast(g, (1, 3, 4))), gh.sum(axis=0, keepdims=True))
    assert ag.unbroadcast(g, (2, 3, 4)) is g
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(5,\)"):
        ag.unbroadcast(g, (5,))


def test_broadcast_add_gradients(xp, rng):
    a = _t(xp, rng.standard_normal((4, 1, 3)))
    b = _t(xp, rng.standard_normal((2, 1)))
    (a + b).backward(xp.ones((4, 2, 3)))
    np.testing.assert_allclose(_h(a.grad), np.full((4, 1, 3), 2.0))
    np.testing.assert_allclose(_h(b.grad), np.full((2, 1), 12.0))


def test_deep_chain_has_no_recursion_limit(xp):
    x = _t(xp, [0.5, -1.0])
    y = x
    for _ in range(5000):
        y = y * 1.0001
        y = y + 0.0
    assert y._op == "add"
    y.sum().backward()
    np.testing.assert_allclose(_h(x.grad), np.full(2, 1.0001 ** 5000), rtol=1e-9)
    # a deep graph that is never walked must also be freed without overflowing the stack
    z = x
    for _ in range(20000):
        z = z + 1.0
    del z


def test_graph_is_released_after_backward(xp):
    x = _t(xp, [1.0, 2.0])
    y = x * 3.0
    z = y.exp().sum()
    z.backward(retain_graph=True)
    z.backward()                                      # retained once: a second walk works
    np.testing.assert_allclose(_h(x.grad), 2 * 3 * np.exp([3.0, 6.0]))
    w = (y * 2.0).sum()
    with pytest.raises(RuntimeError, match="retain_graph"):
        w.backward()


def test_retain_grad_on_intermediate(xp):
    x = _t(xp, [1.0, -2.0])
    h = (x * 2.0).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(_h(h.grad), [4.0, -8.0])
    np.testing.assert_allclose(_h(x.grad), [8.0, -16.0])


def test_no_grad(xp):
    x = _t(xp, [1.0, 2.0])
    with ag.no_grad():
        assert not ag.is_grad_enabled()
        y = x * 2.0 + 1.0
        with ag.no_grad():
            pass
        assert not ag.is_grad_enabled()               # nested exit keeps the outer state
    assert ag.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()
    d = (x * 2.0).detach()
    assert not d.requires_grad and d.is_leaf


def test_backward_seed_checks(xp):
    x = _t(xp, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match=r"\(3,\)"):
        (x * 2.0).backward(xp.ones(3))


def test_scalars_and_raw_arrays_keep_float32(xp):
    x = Tensor(xp.ones((2, 3), dtype=np.float32), requires_grad=True)
    for y in (x * 2.0, 2.0 * x, x + np.float64(1.5), x / 3, x - xp.ones(3, dtype=np.float64),
              xp.ones((2, 3)) * x, x ** 2.0, 1 - x, xp.arange(3) + x):
        assert isinstance(y, Tensor) and y.dtype == np.float32, y
    assert Tensor([1, 2]).dtype == np.float32 and Tensor(3.0).dtype == np.float32


def test_tensor_construction_and_errors(xp):
    with pytest.raises(TypeError, match="int64"):
        Tensor(xp.arange(3), requires_grad=True)
    with pytest.raises(TypeError):
        Tensor("abc")
    t = Tensor(xp.arange(3))                          # integer data is fine without grads
    assert t.dtype.kind == "i" and not t.requires_grad and t.xp is xp
    c = ag.tensor(xp.ones(2, dtype=np.float64), requires_grad=True)
    assert c.dtype == np.float64 and c.requires_grad


def test_matmul_shape_error_names_shapes(xp):
    a, b = _t(xp, np.ones((3, 4))), _t(xp, np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(5, 2\)"):
        a @ b
    with pytest.raises(ValueError, match=r"\(4,\)"):
        a @ _t(xp, np.ones(4))


def test_operand_type_errors(xp):
    x = _t(xp, [1.0])
    with pytest.raises(TypeError):
        x + "a"
    with pytest.raises(TypeError):
        x ** x
    with pytest.raises(TypeError):
        x * True
    with pytest.raises(TypeError, match="sum expects a Tensor"):
        ag.sum(xp.ones(3))
    with pytest.raises(TypeError, match="relu expects a Tensor"):
        ag.relu(xp.ones(3))


@pytest.mark.gpu
def test_mixing_numpy_and_cupy_raises():
    from nimbus.arrays import backend
    cp = backend.cupy()
    a = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    b = Tensor(cp.ones(3, dtype=np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="different libraries"):
        a + b
    with pytest.raises(TypeError, match="different libraries"):
        b * np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="different libraries"):
        ag.softmax_cross_entropy(Tensor(cp.zeros((2, 3), dtype=np.float32)), np.array([0, 1]))
    with pytest.raises(TypeError, match="different libraries"):
        Square.apply(a, b)


def test_raw_array_on_the_left_returns_tensor(xp, rng):
    x = _t(xp, rng.standard_normal((2, 3)))
    arr = xp.asarray(rng.standard_normal((2, 3)))
    for y in (arr + x, arr - x, arr * x, arr / (x * x + 1.0)):
        assert isinstance(y, Tensor) and y.requires_grad


# ------------------------------------------------------------------ Function contract
class Scaled(Function):
    """out = x * y; no gradient for y on purpose (returns None)."""
    calls = []

    @staticmethod
    def forward(ctx, x, y, offset=0.0):
        assert not isinstance(x, Tensor) and not isinstance(y, Tensor)
        Scaled.calls.append(ctx.needs_input_grad)
        ctx.save_for_backward(x, y)
        ctx.offset = offset
        return x * y + offset

    @staticmethod
    def backward(ctx, grad_out):
        x, y = ctx.saved
        assert grad_out.flags.c_contiguous
        return grad_out * y, None


def test_function_contract(xp, rng):
    x0, y0 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    x, y = _t(xp, x0), _t(xp, y0)
    Scaled.calls.clear()
    out = Scaled.apply(x, y, offset=2.0)
    assert isinstance(out, Tensor) and out.requires_grad
    np.testing.assert_allclose(_h(out), x0 * y0 + 2.0)
    assert Scaled.calls == [(True, True)]
    out.sum().backward()
    np.testing.assert_allclose(_h(x.grad), y0)
    assert y.grad is None                              # backward said None for y
    # raw arrays and scalars as inputs; needs_input_grad reflects them
    out2 = Scaled.apply(x, xp.asarray(y0))
    assert Scaled.calls[-1] == (True, False)
    out3 = Scaled.apply(xp.asarray(x0), 3.0)
    assert isinstance(out3, Tensor) and not out3.requires_grad
    with ag.no_grad():
        out4 = Scaled.apply(x, y)
    assert Scaled.calls[-1] == (False, False) and not out4.requires_grad
    out2.backward(xp.ones((3, 2)))
    np.testing.assert_allclose(_h(x.grad), 2 * y0)


def test_function_backward_not_called_without_grads(xp):
    class Boom(Function):
        @staticmethod
        def forward(ctx, x):
            return x + 1

        @staticmethod
        def backward(ctx, grad_out):
            raise AssertionError("must not run")

    x = _t(xp, [1.0, 2.0])
    y = Boom.apply(x.detach()) * x                     # Boom's input needs no gradient
    y.sum().backward()
    np.testing.assert_allclose(_h(x.grad), [2.0, 3.0])


def test_function_errors(xp):
    class WrongCount(Function):
        @staticmethod
        def forward(ctx, x, y):
            return x + y

        @staticmethod
        def backward(ctx, g):
            return (g,)

    class WrongShape(Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            return (g * xp.ones(5),)

    class ReturnsTensor(Function):
        @staticmethod
        def forward(ctx, x):
            return Tensor(x)

    x = _t(xp, [1.0, 2.0])
    with pytest.raises(TypeError, match="1 gradient.*2 positional"):
        WrongCount.apply(x, x).sum().backward()
    with pytest.raises(RuntimeError, match=r"WrongShape.*\(5,\).*\(2,\)"):
        WrongShape.apply(x).backward()
    with pytest.raises(TypeError, match="one raw array"):
        ReturnsTensor.apply(x)


def test_function_gradient_cast_to_input_dtype(xp):
    class Upcast(Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return (g.astype(np.float64) * 2,)

    x = Tensor(xp.ones(3, dtype=np.float32), requires_grad=True)
    Upcast.apply(x).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(_h(x.grad), 2.0)


# ------------------------------------------------------------------ values vs formulas
def test_im2col_layout(xp, rng):
    x0 = rng.standard_normal((2, 3, 5, 6))
    cols = _h(ag.im2col(xp.asarray(x0), (3, 2), stride=(2, 3), padding=1))
    assert cols.shape == (3, 3, 2, 2, 3, 3)              # (C, KH, KW, N, Ho, Wo)
    xpad = np.pad(x0, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for c, i, j, n, y, z in [(0, 0, 0, 0, 0, 0), (2, 1, 1, 1, 2, 1), (1, 2, 0, 0, 1, 1)]:
        assert cols[c, i, j, n, y, z] == xpad[n, c, i + 2 * y, j + 3 * z]
    with pytest.raises(ValueError, match="larger than the padded input"):
        ag.im2col(xp.asarray(x0), (8, 2), padding=1)


def test_im2col_col2im_adjoint(xp, rng):
    # <im2col(x), c> == <x, col2im(c)>: col2im is the exact adjoint
    x0 = rng.standard_normal((2, 3, 6, 5))
    cols = ag.im2col(xp.asarray(x0), (3, 2), stride=(2, 1), padding=1)
    c0 = rng.standard_normal(cols.shape)
    back = ag.col2im(xp.asarray(c0), x0.shape, stride=(2, 1), padding=1)
    np.testing.assert_allclose((_h(cols) * c0).sum(), (x0 * _h(back)).sum(), rtol=1e-10)


def test_batch_norm_matches_formula(xp, rng):
    x0 = rng.standard_normal((8, 5)) * 3 + 2
    g0, b0 = rng.uniform(0.5, 2, 5), rng.standard_normal(5)
    y, mu, var = ag.batch_norm(_t(xp, x0), _t(xp, g0), _t(xp, b0), eps=1e-3, return_stats=True)
    want = g0 * (x0 - x0.mean(0)) / np.sqrt(x0.var(0) + 1e-3) + b0
    np.testing.assert_allclose(_h(y), want, rtol=1e-10)
    np.testing.assert_allclose(_h(mu), x0.mean(0), rtol=1e-10)
    np.testing.assert_allclose(_h(var), x0.var(0), rtol=1e-10)
    # 4-D: statistics per channel over (N, H, W)
    x4 = rng.standard_normal((4, 3, 5, 2)) * np.array([1.0, 5.0, 0.1])[None, :, None, None]
    y4 = _h(ag.batch_norm(_t(xp, x4), eps=0.0))
    np.testing.assert_allclose(y4.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y4.var(axis=(0, 2, 3)), 1, rtol=1e-10)
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\)"):
        ag.batch_norm(_t(xp, x0), _t(xp, np.ones(4)))


def test_cross_entropy_matches_formula(xp, rng):
    z0 = rng.standard_normal((6, 4)) * 5
    y0 = rng.integers(0, 4, 6)
    z = _t(xp, z0)
    loss = ag.softmax_cross_entropy(z, xp.asarray(y0))
    p = np.exp(z0) / np.exp(z0).sum(1, keepdims=True)
    np.testing.assert_allclose(float(_h(loss)), -np.log(p[np.arange(6), y0]).mean(), rtol=1e-10)
    loss.backward()
    onehot = np.eye(4)[y0]
    np.testing.assert_allclose(_h(z.grad), (p - onehot) / 6, rtol=1e-10, atol=1e-15)
    # stable for huge logits
    big = ag.softmax_cross_entropy(_t(xp, [[1000.0, 0.0], [0.0, -1000.0]]), xp.asarray([0, 1]))
    np.testing.assert_allclose(float(_h(big)), 500.0, rtol=1e-12)


def test_cross_entropy_label_errors(xp):
    z = _t(xp, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"\[0, 4\).*from 0 to 4"):
        ag.softmax_cross_entropy(z, xp.asarray([0, 4, 1]))
    with pytest.raises(ValueError, match="from -1"):
        ag.softmax_cross_entropy(z, xp.asarray([0, -1, 1]))
    with pytest.raises(TypeError, match="integer"):
        ag.softmax_cross_entropy(z, xp.asarray([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ag.softmax_cross_entropy(z, xp.asarray([0, 1]))


def test_max_gradient_goes_to_first_argmax(xp):
    x = _t(xp, [[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]])
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(_h(x.grad), [[0, 1, 0], [1, 0, 0]])


def test_getitem_basic_and_repeats(xp):
    x = _t(xp, np.arange(6.0).reshape(2, 3))
    y = x[xp.asarray([1, 1, 0])][:, 1:]
    np.testing.assert_array_equal(_h(y), [[4, 5], [4, 5], [1, 2]])
    y.sum().backward()
    np.testing.assert_array_equal(_h(x.grad), [[0, 1, 1], [0, 2, 2]])


# ------------------------------------------------------------------ end to end
def test_mlp_learns_digits(rng):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    seed = int(rng.integers(1 << 30))
    init = np.random.default_rng(seed)
    w1 = Tensor((init.standard_normal((64, 64)) * np.sqrt(2 / 64)).astype(np.float32), True)
    b1 = Tensor(np.zeros(64, np.float32), True)
    w2 = Tensor((init.standard_normal((64, 10)) * np.sqrt(1 / 64)).astype(np.float32), True)
    b2 = Tensor(np.zeros(10, np.float32), True)
    opt = optim.Adam([w1, b1, w2, b2], lr=3e-3)
    t0 = time.perf_counter()
    for epoch in range(15):
        order = init.permutation(len(X))
        for start in range(0, len(X), 64):
            idx = order[start:start + 64]
            logits = (Tensor(X[idx]) @ w1 + b1).relu() @ w2 + b2
            loss = ag.softmax_cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    elapsed = time.perf_counter() - t0
    with ag.no_grad():
        pred = ((Tensor(X) @ w1 + b1).relu() @ w2 + b2).data.argmax(1)
    acc = (pred == y).mean()
    assert w1.dtype == np.float32
    assert acc > 0.9, f"train accuracy {acc:.3f} (seed {seed})"
    assert elapsed < 20, f"training took {elapsed:.1f} s"
