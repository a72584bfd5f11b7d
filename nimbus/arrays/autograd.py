"""A small reverse-mode autograd over NumPy or CuPy arrays.

The shape of it is micrograd's: a :class:`Tensor` holds an array (``.data``), a
gradient (``.grad``) and, when it was made by an op while gradients are on, the
op's inputs and a *backward* closure. ``loss.backward()`` sorts the graph
topologically (iteratively: graphs of tens of thousands of ops must not hit the
recursion limit) and walks it from the loss back, each op's backward returning
one gradient per input, which the walk ADDS into that input's gradient, so a
tensor used twice receives the sum of both contributions.

Arrays stay in their library: every op asks :func:`nimbus.arrays.backend.namespace`
for ``xp`` and writes ``xp.`` code, so the same graph runs on NumPy and on CuPy.
Mixing the two in one op raises ``TypeError``.

Dtypes are kept: float32 in, float32 out, gradients included. Python scalars are
weak (``x * 2.0`` stays float32) and raw arrays given as constants take the
Tensor's float dtype. Lists and Python numbers wrapped by ``Tensor(...)`` become
float32; arrays are wrapped as they are (float64 is fine: the gradient tests use it).

After ``backward()`` the graph is released (saved arrays freed), as in PyTorch;
pass ``retain_graph=True`` to walk it again. Gradients land in ``.grad`` of the
leaves (tensors made by the user with ``requires_grad=True``) and of tensors on
which :meth:`Tensor.retain_grad` was called.

Custom ops plug in through :class:`Function` (forward and backward on raw arrays).

Ops: ``+ - * / -x x**p @``, :func:`relu`, :func:`exp`, :func:`log`, :func:`tanh`,
:func:`sigmoid`, :func:`sum`, :func:`mean`, :func:`max`, :func:`reshape`,
:func:`transpose` / :func:`permute`, indexing ``t[idx]``, :func:`take_rows`,
:func:`concatenate`, :func:`pad`, :func:`im2col` / :func:`col2im` (raw arrays,
for the Conv2d layer's own Function), :func:`batch_norm`, :func:`log_softmax`,
:func:`softmax`, :func:`softmax_cross_entropy`.
"""
from __future__ import annotations

import builtins
import contextlib
import numbers
import threading

import numpy as np

from . import backend

__all__ = [
    "Tensor", "Function", "Context", "tensor", "no_grad", "is_grad_enabled", "unbroadcast",
    "add", "sub", "mul", "div", "neg", "pow", "matmul",
    "relu", "exp", "log", "tanh", "sigmoid",
    "sum", "mean", "max", "reshape", "transpose", "permute", "getitem", "take_rows",
    "concatenate", "pad", "im2col", "col2im",
    "batch_norm", "log_softmax", "softmax", "softmax_cross_entropy",
]

DEFAULT_DTYPE = np.float32

# ------------------------------------------------------------------ grad mode
_state = threading.local()


def is_grad_enabled() -> bool:
    """False inside :func:`no_grad` (per thread)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Context manager: ops inside build no graph (outputs have ``requires_grad=False``).

    Use it for evaluation and for in-place parameter updates.
    """
    previous = is_grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous


# ------------------------------------------------------------------ helpers
def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == "f"


def _raw(x):
    """The array behind a Tensor, or ``x`` itself."""
    return x.data if isinstance(x, Tensor) else x


def _xp_of(*items):
    """``xp`` of all arrays among ``items`` (Tensors unwrapped); TypeError when mixed."""
    return backend.namespace(*[a for a in map(_raw, items) if backend.is_array(a)])


def _scalar(value):
    """A Python number for numpy/cupy scalars and 0-d host numbers.

    NumPy scalars such as ``np.float64(2.0)`` are "strong" under NumPy 2 promotion
    and would turn float32 data into float64; Python numbers are weak and do not.
    """
    if isinstance(value, bool):
        raise TypeError("booleans are not accepted as operands; use 0/1 numbers or a float array")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _constant(value, like):
    """An operand that takes no gradient, made compatible with Tensor ``like``.

    Python numbers stay Python numbers (weak: they keep ``like``'s dtype); raw
    arrays and lists become arrays of ``like``'s library and, when ``like`` holds
    floats, of its dtype.
    """
    if isinstance(value, (numbers.Number, np.generic)) and not backend.is_array(value):
        value = _scalar(value)
        if not isinstance(value, numbers.Real):
            raise TypeError(f"complex operands are not supported, got {value!r}")
        return value
    xp = like.xp
    if isinstance(value, (list, tuple)):
        value = xp.asarray(value)
    if not backend.is_array(value):
        raise TypeError(f"cannot combine a Tensor with {type(value).__name__}; "
                        "give a Tensor, an array or a real number")
    backend.namespace(value, like.data)  # raises TypeError when NumPy and CuPy are mixed
    if _is_float(like.dtype) and value.dtype != like.dtype:
        value = value.astype(like.dtype)
    return value


def _operands(a, b):
    """Both operands of a binary op: Tensors stay, the other side becomes a constant."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        backend.namespace(a.data, b.data)
        return a, b
    if isinstance(a, Tensor):
        return a, _constant(b, a)
    if isinstance(b, Tensor):
        return _constant(a, b), b
    raise TypeError("at least one operand must be a Tensor")


def _tensor_arg(a, op):
    """``a`` itself when it is a Tensor; TypeError naming ``op`` otherwise."""
    if not isinstance(a, Tensor):
        raise TypeError(f"{op} expects a Tensor, got {type(a).__name__} (wrap arrays in Tensor(...))")
    return a


def _needs(x) -> bool:
    return isinstance(x, Tensor) and x._requires_grad


def _shape(x):
    return x.shape if hasattr(x, "shape") else ()


def _norm_axis(axis, ndim):
    """``axis`` (None, int or tuple) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array of {ndim} dimension(s)")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axis!r}")
    return tuple(sorted(out))


def _pair(v, name):
    """An int or a pair of ints as a pair (height, width)."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the adjoint of NumPy broadcasting.

    Parameters
    ----------
    grad : array, shape broadcast(shape, other)
    shape : tuple of int, the shape of the operand before broadcasting

    Returns
    -------
    array of shape ``shape`` (``grad`` itself when the shapes already agree)
    """
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra < 0 or any(n not in (1, g) for n, g in zip(shape, grad.shape[extra:])):
        raise ValueError(f"cannot unbroadcast a gradient of shape {tuple(grad.shape)} "
                         f"to shape {shape}")
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


# ------------------------------------------------------------------ Tensor
class Tensor:
    """An array of NumPy or CuPy with an optional gradient.

    Parameters
    ----------
    data : array (NumPy or CuPy, kept as is, no copy), Tensor, list or number
        Lists and Python numbers become float32 NumPy arrays.
    requires_grad : bool
        Track operations on this tensor; needs a floating dtype (TypeError otherwise).

    Attributes
    ----------
    data : the array (any shape; float32 by default)
    grad : array like ``data`` or None; accumulated by :meth:`backward`
    """

    __slots__ = ("data", "grad", "_requires_grad", "_parents", "_backward", "_op",
                 "_retain", "_released", "__weakref__")
    # Make `ndarray (op) Tensor` call the Tensor's reflected operator instead of
    # NumPy/CuPy treating the Tensor as an object to broadcast over.
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        elif not backend.is_array(data):
            if isinstance(data, bool) or not isinstance(data, (numbers.Real, list, tuple, np.generic)):
                raise TypeError(f"Tensor data must be an array, a list or a real number, "
                                f"got {type(data).__name__}")
            data = np.asarray(data, dtype=DEFAULT_DTYPE)
        self.data = data
        self.grad = None
        self._parents = ()
        self._backward = None
        self._op = "leaf"
        self._retain = False
        self._released = False
        self._requires_grad = False
        self.requires_grad = requires_grad

    # ----------------------------------------------------------- properties
    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value):
        value = bool(value)
        if value and not _is_float(self.data.dtype):
            raise TypeError(f"only floating-point tensors can require gradients; this one has "
                            f"dtype {self.data.dtype} (cast with .astype(np.float32))")
        self._requires_grad = value

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return int(self.data.size)

    @property
    def xp(self):
        """``numpy`` or ``cupy``: the library of ``data``."""
        return backend.namespace(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._backward is None

    @property
    def T(self):
        return transpose(self)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        lib = backend.library_name(self.data)
        extra = ", requires_grad=True" if self._requires_grad else ""
        op = f", op={self._op}" if self._backward is not None else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, {lib}{extra}{op})"

    # ----------------------------------------------------------- basic methods
    def detach(self):
        """A new leaf sharing ``data`` (no copy), outside any graph."""
        return Tensor(self.data)

    def zero_grad(self):
        """Forget the gradient (sets ``grad`` to None; the next backward starts fresh)."""
        self.grad = None

    def retain_grad(self):
        """Also store this (non-leaf) tensor's gradient in ``.grad`` during backward."""
        self._retain = True
        return self

    def item(self):
        return self.data.item()

    def numpy(self):
        """The data as a NumPy array (copied from the device for CuPy)."""
        return backend.to_host(self.data)

    # ----------------------------------------------------------- operators
    def __add__(self, other):
        return add(self, other)

    def __radd__(self, other):
        return add(other, self)

    def __sub__(self, other):
        return sub(self, other)

    def __rsub__(self, other):
        return sub(other, self)

    def __mul__(self, other):
        return mul(self, other)

    def __rmul__(self, other):
        return mul(other, self)

    def __truediv__(self, other):
        return div(self, other)

    def __rtruediv__(self, other):
        return div(other, self)

    def __neg__(self):
        return neg(self)

    def __pow__(self, exponent):
        return pow(self, exponent)

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    def __getitem__(self, index):
        return getitem(self, index)

    # ----------------------------------------------------------- op methods
    def relu(self):
        return relu(self)

    def exp(self):
        return exp(self)

    def log(self):
        return log(self)

    def tanh(self):
        return tanh(self)

    def sigmoid(self):
        return sigmoid(self)

    def sum(self, axis=None, keepdims=False):
        return sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return max(self, axis, keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return reshape(self, shape)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return transpose(self, axes or None)

    def permute(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return permute(self, axes)

    # ----------------------------------------------------------- backward
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        Parameters
        ----------
        grad : array of ``self.shape`` or None
            Upstream gradient; may be omitted only when ``self`` has one element.
        retain_graph : bool
            Keep the graph (and the arrays it saved) for another backward.
        """
        if not self._requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no input "
                               "had requires_grad=True, or it was made under no_grad())")
        xp = self.xp
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward() without a gradient needs a one-element tensor; "
                                 f"this one has shape {self.shape}: pass grad=")
            grad = xp.ones(self.shape, dtype=self.dtype)
        else:
            grad = _raw(grad)
            if not backend.is_array(grad):
                grad = xp.asarray(grad, dtype=self.dtype)
            backend.namespace(grad, self.data)
            if tuple(grad.shape) != self.shape:
                raise ValueError(f"grad has shape {tuple(grad.shape)} but the tensor has shape "
                                 f"{self.shape}")
        _run_backward(self, grad, retain_graph)


def tensor(data, requires_grad=False, dtype=None, xp=None):
    """A new Tensor with a copy of ``data`` in library ``xp`` (default: ``data``'s own, or numpy).

    ``dtype`` defaults to float32 for non-array input and to ``data``'s dtype for arrays.
    """
    raw = _raw(data)
    if xp is None:
        xp = backend.namespace(raw) if backend.is_array(raw) else np
    if dtype is None and not backend.is_array(raw):
        dtype = DEFAULT_DTYPE
    if backend.is_array(raw) and backend.library_name(raw) != xp.__name__.split(".")[0]:
        raw = backend.to_host(raw)
    return Tensor(xp.array(raw, dtype=dtype, copy=True), requires_grad=requires_grad)


# ------------------------------------------------------------------ graph engine
def _result(data, parents, backward, op):
    """Wrap an op's output; link it into the graph when some input needs a gradient.

    ``parents`` is a tuple aligned with the tuple that ``backward(grad)`` returns;
    entries that are not Tensors (constants) get no gradient.
    """
    out = Tensor.__new__(Tensor)
    if not backend.is_array(data):            # NumPy reductions return scalars, not 0-d arrays
        data = np.asarray(data)
    out.data = data
    out.grad = None
    out._op = op
    out._retain = False
    out._released = False
    if is_grad_enabled() and builtins.any(_needs(p) for p in parents):
        out._requires_grad = True
        out._parents = parents
        out._backward = backward
    else:
        out._requires_grad = False
        out._parents = ()
        out._backward = None
    return out


def _topological_order(root):
    """Nodes that require grad, each after all of its parents (iterative DFS)."""
    order, seen = [], {id(root)}
    stack = [(root, iter(root._parents))]
    while stack:
        node, parents = stack[-1]
        for p in parents:
            if _needs(p) and id(p) not in seen:
                seen.add(id(p))
                stack.append((p, iter(p._parents)))
                break
        else:
            stack.pop()
            order.append(node)
    return order


def _accumulate_into_grad(node, g):
    """``node.grad += g`` without aliasing ``g`` (it may be shared with other nodes)."""
    xp = backend.namespace(node.data)
    if node.grad is None:
        node.grad = xp.array(g, dtype=node.data.dtype, copy=True, order="C")
    else:
        node.grad = node.grad + g


def _run_backward(root, grad, retain_graph):
    order = _topological_order(root)
    pending = {id(root): grad}        # summed gradients of nodes not yet visited
    for node in reversed(order):
        g = pending.pop(id(node), None)
        if g is None:
            continue
        if node._backward is None:
            if node._released:
                raise RuntimeError(
                    f"the graph behind a tensor made by {node._op!r} was already freed by an "
                    "earlier backward(); call backward(retain_graph=True) the first time")
            _accumulate_into_grad(node, g)
            continue
        if node._retain:
            _accumulate_into_grad(node, g)
        grads = node._backward(g)
        for parent, pg in zip(node._parents, grads):
            if pg is None or not _needs(parent):
                continue
            pg = _check_grad(pg, parent, node._op)
            key = id(parent)
            pending[key] = pending[key] + pg if key in pending else pg
        if not retain_graph:
            node._parents = ()
            node._backward = None
            node._released = True


def _check_grad(pg, parent, op):
    """A gradient for ``parent`` as an array of its shape and dtype (errors name the op)."""
    if not backend.is_array(pg):
        if isinstance(pg, (numbers.Number, np.generic)):
            pg = parent.xp.asarray(pg, dtype=parent.dtype)
        else:
            raise TypeError(f"backward of {op!r} returned a {type(pg).__name__} as a gradient; "
                            "expected an array or None")
    if backend.library_name(pg) != backend.library_name(parent.data):
        raise TypeError(f"backward of {op!r} returned a {backend.library_name(pg)} gradient for a "
                        f"{backend.library_name(parent.data)} input")
    if tuple(pg.shape) != parent.shape:
        if pg.size == 1 and parent.size == 1:
            pg = pg.reshape(parent.shape)
        else:
            raise RuntimeError(f"backward of {op!r} returned a gradient of shape "
                               f"{tuple(pg.shape)} for an input of shape {parent.shape}")
    if pg.dtype != parent.dtype:
        pg = pg.astype(parent.dtype)
    return pg


# ------------------------------------------------------------------ Function
class Context:
    """Scratch space handed to :meth:`Function.forward` and :meth:`Function.backward`.

    Attributes: ``needs_input_grad`` (tuple of bool, one per positional input),
    ``saved`` (tuple set by :meth:`save_for_backward`), and anything else the
    function stores on it.
    """

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved = ()

    def save_for_backward(self, *arrays):
        self.saved = arrays


class Function:
    """Base class of custom differentiable ops working on raw arrays.

    Subclass it with two static methods::

        class Square(Function):
            @staticmethod
            def forward(ctx, x):               # raw xp arrays in, one raw array out
                ctx.save_for_backward(x)
                return x * x
            @staticmethod
            def backward(ctx, grad_out):       # one gradient (or None) per positional input
                (x,) = ctx.saved
                return (2 * x * grad_out,)

        y = Square.apply(t)                    # t: Tensor (or raw array); y: Tensor

    Positional inputs may be Tensors, raw arrays or scalars; Tensors are unwrapped
    before ``forward``. Keyword arguments go to ``forward`` unchanged and get no
    gradient. ``grad_out`` is a C-contiguous array of the output's shape that other
    ops may share: read it, never modify it in place. ``backward`` runs only when
    some input needs a gradient (check ``ctx.needs_input_grad`` to skip work), and
    its results for inputs that need none are ignored; returned gradients must
    have their input's shape and library (errors name the Function otherwise) and
    are cast to the input's dtype.
    """

    @staticmethod
    def forward(ctx, *inputs, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad_out):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **kwargs):
        name = cls.__name__
        _xp_of(*inputs)                          # refuse NumPy/CuPy mixtures up front
        enabled = is_grad_enabled()
        needs = tuple(enabled and _needs(x) for x in inputs)
        ctx = Context(needs)
        out = cls.forward(ctx, *[_raw(x) for x in inputs], **kwargs)
        if isinstance(out, Tensor) or not (backend.is_array(out) or isinstance(out, np.generic)):
            raise TypeError(f"{name}.forward must return one raw array, got {type(out).__name__}")
        parents = tuple(x if isinstance(x, Tensor) else None for x in inputs)

        def backward(g):
            # custom kernels want contiguous buffers; a no-op for most gradients
            grads = cls.backward(ctx, _xp_of(g).ascontiguousarray(g))
            if not isinstance(grads, (tuple, list)):
                grads = (grads,)
            if len(grads) != len(inputs):
                raise TypeError(f"{name}.backward returned {len(grads)} gradient(s) for "
                                f"{len(inputs)} positional input(s)")
            return grads

        return _result(out, parents, backward, name)


# ------------------------------------------------------------------ elementwise
def add(a, b):
    """``a + b`` with broadcasting; either side may be a number or a raw array."""
    a, b = _operands(a, b)
    sa, sb = _shape(a), _shape(b)

    def backward(g):
        return (unbroadcast(g, sa) if _needs(a) else None,
                unbroadcast(g, sb) if _needs(b) else None)

    return _result(_raw(a) + _raw(b), (a, b), backward, "add")


def sub(a, b):
    """``a - b`` with broadcasting."""
    a, b = _operands(a, b)
    sa, sb = _shape(a), _shape(b)

    def backward(g):
        return (unbroadcast(g, sa) if _needs(a) else None,
                unbroadcast(-g, sb) if _needs(b) else None)

    return _result(_raw(a) - _raw(b), (a, b), backward, "sub")


def mul(a, b):
    """``a * b`` with broadcasting."""
    a, b = _operands(a, b)
    da, db = _raw(a), _raw(b)

    def backward(g):
        return (unbroadcast(g * db, _shape(a)) if _needs(a) else None,
                unbroadcast(g * da, _shape(b)) if _needs(b) else None)

    return _result(da * db, (a, b), backward, "mul")


def div(a, b):
    """``a / b`` with broadcasting."""
    a, b = _operands(a, b)
    da, db = _raw(a), _raw(b)
    out = da / db

    def backward(g):
        gq = g / db                      # shared by both sides: d(a/b) = (da - out*db) / b
        return (unbroadcast(gq, _shape(a)) if _needs(a) else None,
                unbroadcast(-gq * out, _shape(b)) if _needs(b) else None)

    return _result(out, (a, b), backward, "div")


def neg(a):
    """``-a``."""
    _tensor_arg(a, "neg")
    return _result(-a.data, (a,), lambda g: (-g,), "neg")


def pow(a, exponent):
    """``a ** exponent`` for a real-number exponent (no gradient to the exponent)."""
    _tensor_arg(a, "pow")
    if isinstance(exponent, Tensor) or backend.is_array(exponent):
        raise TypeError("only a real-number exponent is supported (x ** 2.0); "
                        "for a tensor exponent write exp(y * log(x))")
    p = _scalar(exponent)
    if not isinstance(p, numbers.Real):
        raise TypeError(f"exponent must be a real number, got {exponent!r}")
    x = a.data

    def backward(g):
        if p == 0:                        # constant 1: avoid 0 * inf at x == 0
            return (g * 0,)
        return (g * (p * x ** (p - 1)),)

    return _result(x ** p, (a,), backward, "pow")


def _unary(a, fn, name):
    _tensor_arg(a, name)
    return fn(a.data, a.xp)


def relu(a):
    """``max(a, 0)``; the gradient at exactly 0 is taken as 0."""
    def fn(x, xp):
        mask = x > 0
        return _result(x * mask, (a,), lambda g: (g * mask,), "relu")
    return _unary(a, fn, "relu")


def exp(a):
    def fn(x, xp):
        out = xp.exp(x)
        return _result(out, (a,), lambda g: (g * out,), "exp")
    return _unary(a, fn, "exp")


def log(a):
    """Natural log (no clamping: log of 0 is -inf, as in xp)."""
    def fn(x, xp):
        return _result(xp.log(x), (a,), lambda g: (g / x,), "log")
    return _unary(a, fn, "log")


def tanh(a):
    def fn(x, xp):
        out = xp.tanh(x)
        return _result(out, (a,), lambda g: (g * (1 - out * out),), "tanh")
    return _unary(a, fn, "tanh")


def sigmoid(a):
    """Logistic function, computed as 0.5 (1 + tanh(x/2)): no overflow for large |x|."""
    def fn(x, xp):
        out = 0.5 * (1 + xp.tanh(0.5 * x))
        return _result(out, (a,), lambda g: (g * out * (1 - out),), "sigmoid")
    return _unary(a, fn, "sigmoid")


# ------------------------------------------------------------------ matmul
def _gemm_tn(a, b):
    """``a.T @ b`` for a (K, P), b (K, Q) with a long K (a weight gradient): (P, Q).

    Computed as ``(b.T @ a).T`` when Q > P. The two are the same product, but
    OpenBLAS was measured 5-60x slower when the output has few rows and many
    columns over a long K (e.g. K=8192, P=10, Q=256); the larger side as rows is
    fast. cuBLAS does not care. The result may be a transposed (F-order) view.
    """
    if a.shape[1] >= b.shape[1]:
        return a.T @ b
    return (b.T @ a).T


def matmul(a, b):
    """``a @ b`` for 2-D and batched (3-D or more, broadcast batch axes) operands.

    Shapes: (..., N, D) @ (..., D, M) -> (..., N, M). Raises ValueError naming both
    shapes when the inner dimensions differ or an operand has fewer than 2 axes.
    """
    a, b = _operands(a, b)
    da, db = _raw(a), _raw(b)
    sa, sb = tuple(_shape(da)), tuple(_shape(db))
    if len(sa) < 2 or len(sb) < 2:
        raise ValueError(f"matmul needs operands with at least 2 dimensions, got shapes {sa} and {sb}")
    if sa[-1] != sb[-2]:
        raise ValueError(f"matmul: inner dimensions differ: {sa} @ {sb} ({sa[-1]} != {sb[-2]})")
    try:
        out = da @ db
    except ValueError as exc:
        raise ValueError(f"matmul: batch dimensions of {sa} and {sb} do not broadcast ({exc})") from None
    xp = _xp_of(da, db)

    def backward(g):
        ga = gb = None
        if _needs(a):
            ga = unbroadcast(g @ xp.swapaxes(db, -1, -2), sa)
        if _needs(b):
            if len(sb) == 2:
                # 2-D weight (also shared by a batch): one GEMM over all rows
                gb = _gemm_tn(da.reshape(-1, sa[-1]), g.reshape(-1, sb[-1]))
            else:
                gb = unbroadcast(xp.swapaxes(da, -1, -2) @ g, sb)
        return ga, gb

    return _result(out, (a, b), backward, "matmul")


# ------------------------------------------------------------------ reductions
def sum(a, axis=None, keepdims=False):
    """Sum over ``axis`` (None: all, int, or tuple of ints)."""
    _tensor_arg(a, "sum")
    axes = _norm_axis(axis, a.ndim)
    shape = a.shape
    xp = a.xp

    def backward(g):
        if not keepdims:
            g = xp.expand_dims(g, axes) if axes else g
        return (xp.broadcast_to(g, shape),)

    return _result(a.data.sum(axis=axes, keepdims=keepdims), (a,), backward, "sum")


def mean(a, axis=None, keepdims=False):
    """Mean over ``axis`` (None: all, int, or tuple of ints)."""
    _tensor_arg(a, "mean")
    axes = _norm_axis(axis, a.ndim)
    count = int(np.prod([a.shape[i] for i in axes])) if axes else 1
    shape = a.shape
    xp = a.xp

    def backward(g):
        if not keepdims:
            g = xp.expand_dims(g, axes) if axes else g
        return (xp.broadcast_to(g / count, shape),)

    return _result(a.data.mean(axis=axes, keepdims=keepdims), (a,), backward, "mean")


def max(a, axis=None, keepdims=False):
    """Maximum over ``axis``; the gradient goes to the first argmax only (ties: one winner)."""
    _tensor_arg(a, "max")
    axes = _norm_axis(axis, a.ndim)
    xp = a.xp
    x = a.data
    out = x.max(axis=axes, keepdims=keepdims)
    if not a._requires_grad or not is_grad_enabled():
        return _result(out, (a,), None, "max")
    # move the reduced axes last and flatten them, so one argmax finds the winner
    kept = tuple(i for i in range(a.ndim) if i not in axes)
    perm = kept + axes
    moved = xp.transpose(x, perm).reshape([x.shape[i] for i in kept] + [-1])
    winner = xp.argmax(moved, axis=-1)
    inverse = tuple(int(i) for i in np.argsort(perm))

    def backward(g):
        g_kept = g.reshape(winner.shape + (1,))
        onehot = xp.arange(moved.shape[-1]) == winner[..., None]
        gm = (onehot * g_kept).reshape([x.shape[i] for i in perm])
        return (xp.transpose(gm, inverse),)

    return _result(out, (a,), backward, "max")


# ------------------------------------------------------------------ shape ops
def reshape(a, shape):
    """View with a new shape (one -1 allowed)."""
    _tensor_arg(a, "reshape")
    old = a.shape
    return _result(a.data.reshape(shape), (a,), lambda g: (g.reshape(old),), "reshape")


def transpose(a, axes=None):
    """Permute axes (``axes=None`` reverses them, as ``.T``)."""
    _tensor_arg(a, "transpose")
    axes = tuple(range(a.ndim))[::-1] if axes is None else tuple(int(i) % a.ndim for i in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"axes {axes} are not a permutation of {a.ndim} dimensions")
    xp = a.xp
    inverse = tuple(int(i) for i in np.argsort(axes))
    return _result(xp.transpose(a.data, axes), (a,),
                   lambda g: (xp.transpose(g, inverse),), "transpose")


def permute(a, axes):
    """Same as :func:`transpose` with explicit ``axes`` (PyTorch's name)."""
    return transpose(a, tuple(axes))


def _has_integer_array(index):
    """True when ``index`` holds an integer array (so positions may repeat)."""
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if isinstance(item, (list, tuple)):
            item = np.asarray(item)
        if backend.is_array(item) and item.dtype.kind in "iu":
            return True
    return False


def getitem(a, index):
    """``a[index]``: basic slicing, boolean masks and integer arrays (repeats add up)."""
    _tensor_arg(a, "getitem")
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    xp = a.xp
    shape, dtype = a.shape, a.dtype
    scatter = _has_integer_array(index)

    def backward(g):
        full = xp.zeros(shape, dtype=dtype)
        if scatter:
            xp.add.at(full, index, g)      # repeated indices must add, not overwrite
        else:
            full[index] = g
        return (full,)

    return _result(a.data[index], (a,), backward, "getitem")


def take_rows(a, rows):
    """Rows ``a[rows]`` for an integer index array ``rows`` (repeats allowed).

    Shapes: a (R, ...), rows (B,) int -> (B, ...).
    """
    _tensor_arg(a, "take_rows")
    rows = _raw(rows)
    xp = a.xp
    if not backend.is_array(rows):
        rows = xp.asarray(rows)
    backend.namespace(rows, a.data)
    if rows.dtype.kind not in "iu":
        raise TypeError(f"take_rows needs integer row indices, got dtype {rows.dtype}")
    shape, dtype = a.shape, a.dtype

    def backward(g):
        full = xp.zeros(shape, dtype=dtype)
        xp.add.at(full, rows, g)
        return (full,)

    return _result(xp.take(a.data, rows, axis=0), (a,), backward, "take_rows")


def concatenate(tensors, axis=0):
    """Join tensors (or raw arrays) along an existing axis."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate needs at least one tensor")
    xp = _xp_of(*tensors)
    like = next((t for t in tensors if isinstance(t, Tensor)), None)
    if like is None:
        raise TypeError("concatenate needs at least one Tensor")
    parts = [t if isinstance(t, Tensor) else _constant(t, like) for t in tensors]
    ndim = like.ndim
    ax = _norm_axis(axis, ndim)[0]
    bounds = np.cumsum([0] + [_shape(p)[ax] for p in parts])

    def backward(g):
        lead = (slice(None),) * ax
        return tuple(g[lead + (slice(int(lo), int(hi)),)] if _needs(p) else None
                     for p, lo, hi in zip(parts, bounds[:-1], bounds[1:]))

    out = xp.concatenate([_raw(p) for p in parts], axis=ax)
    return _result(out, tuple(p if isinstance(p, Tensor) else None for p in parts),
                   backward, "concatenate")


def _pad_width(pad_width, ndim):
    """NumPy-style pad widths as ((before, after),) * ndim."""
    if isinstance(pad_width, numbers.Integral):
        return ((int(pad_width), int(pad_width)),) * ndim
    pw = [tuple(int(v) for v in (p if isinstance(p, (tuple, list)) else (p, p))) for p in pad_width]
    if len(pw) == 1:
        pw = pw * ndim
    if len(pw) != ndim or any(len(p) != 2 or min(p) < 0 for p in pw):
        raise ValueError(f"pad_width {pad_width!r} does not give (before, after) >= 0 for each of "
                         f"{ndim} dimensions")
    return tuple(pw)


def pad(a, pad_width, value=0.0):
    """Constant padding, NumPy's ``pad_width`` convention (int, or (before, after) per axis)."""
    _tensor_arg(a, "pad")
    pw = _pad_width(pad_width, a.ndim)
    xp = a.xp
    inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pw, a.shape))
    out = xp.pad(a.data, pw, mode="constant", constant_values=value)
    return _result(out, (a,), lambda g: (g[inner],), "pad")


# ------------------------------------------------------------------ convolution
def _out_size(n, k, s, p, what):
    size = (n + 2 * p - k) // s + 1
    if size < 1:
        raise ValueError(f"{what}: the kernel ({k}) is larger than the padded input ({n} + 2*{p})")
    return size


def _offset_slices(i, j, ho, wo, sh, sw):
    """The (rows, cols) slices of the padded image seen by kernel offset (i, j)."""
    return slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw)


def im2col(x, kernel_size, stride=1, padding=0):
    """Sliding windows of an NCHW array, for convolution as one matrix product.

    Parameters
    ----------
    x : array (N, C, H, W)
    kernel_size, stride, padding : int or (h, w) pair

    Returns
    -------
    cols : array (C, KH, KW, N, Ho, Wo), same dtype, with
        ``cols[c, i, j, n, y, z] = xpad[n, c, i + y*sh, j + z*sw]``.
        Channel-major, so ``cols.reshape(C*KH*KW, N*Ho*Wo)`` is a view and the
        convolution is a single large GEMM. One strided copy per kernel offset
        (KH*KW of them): no loop over pixels.
    """
    xp = backend.namespace(x)
    (kh, kw), (sh, sw), (ph, pw) = (_pair(kernel_size, "kernel_size"), _pair(stride, "stride"),
                                    _pair(padding, "padding"))
    n, c, h, w = x.shape
    ho, wo = _out_size(h, kh, sh, ph, "im2col"), _out_size(w, kw, sw, pw, "im2col")
    if ph or pw:
        xpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        xpad[:, :, ph:ph + h, pw:pw + w] = x
    else:
        xpad = x
    xpad = xpad.transpose(1, 0, 2, 3)                        # (C, N, Hp, Wp) view
    cols = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            rows, colz = _offset_slices(i, j, ho, wo, sh, sw)
            cols[:, i, j] = xpad[:, :, rows, colz]
    return cols


def col2im(cols, x_shape, stride=1, padding=0):
    """Adjoint of :func:`im2col`: add every window entry back to its pixel.

    Parameters
    ----------
    cols : array (C, KH, KW, N, Ho, Wo)
    x_shape : (N, C, H, W) of the image that was unfolded
    stride, padding : as given to :func:`im2col`

    Returns
    -------
    array (N, C, H, W), same dtype as ``cols``; overlapping windows add up.
    """
    xp = backend.namespace(cols)
    c, kh, kw, n, ho, wo = cols.shape
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding")
    _, _, h, w = x_shape
    img = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            # within one offset the target pixels are distinct, so += is exact
            rows, colz = _offset_slices(i, j, ho, wo, sh, sw)
            img[:, :, rows, colz] += cols[:, i, j]
    return img[:, :, ph:ph + h, pw:pw + w].transpose(1, 0, 2, 3)


# ------------------------------------------------------------------ normalization
def batch_norm(x, gamma=None, beta=None, eps=1e-5, return_stats=False):
    """Training-mode batch normalization with batch statistics.

    Parameters
    ----------
    x : Tensor (N, F) or (N, C, H, W); statistics over all axes but the feature/channel axis 1
    gamma, beta : Tensor or array (F,) / (C,), or None (scale 1, shift 0)
    eps : added to the (biased) variance
    return_stats : also return the batch mean and biased variance, raw arrays (F,),
        for the layer's running statistics

    Returns
    -------
    y : Tensor like x, ``gamma * (x - mean) / sqrt(var + eps) + beta``
    (y, mean, var) when ``return_stats``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_norm expects a Tensor x, got {type(x).__name__}")
    if x.ndim not in (2, 4):
        raise ValueError(f"batch_norm needs x of shape (N, F) or (N, C, H, W), got {x.shape}")
    xp = _xp_of(x, gamma, beta)
    nf = x.shape[1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None and tuple(_shape(_raw(p))) != (nf,):
            raise ValueError(f"batch_norm: {name} must have shape ({nf},) for x of shape "
                             f"{x.shape}, got {tuple(_shape(_raw(p)))}")
    eps = float(eps)                                          # a Python float never upcasts
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    bshape = (1, nf) + (1,) * (x.ndim - 2)                   # broadcasts over the batch axes
    m = x.size // nf
    data = x.data
    mu = data.mean(axis=axes, keepdims=True)
    xc = data - mu
    var = (xc * xc).mean(axis=axes, keepdims=True)
    inv = 1 / xp.sqrt(var + eps)
    xhat = xc * inv
    g_b = None if gamma is None else _raw(gamma).reshape(bshape)
    out = xhat if g_b is None else xhat * g_b
    if beta is not None:
        out = out + _raw(beta).reshape(bshape)

    def backward(g):
        gx = ggamma = gbeta = None
        if _needs(x):
            gxhat = g if g_b is None else g * g_b
            s1 = gxhat.sum(axis=axes, keepdims=True)
            s2 = (gxhat * xhat).sum(axis=axes, keepdims=True)
            gx = inv * (gxhat - (s1 + xhat * s2) / m)
        if _needs(gamma):
            ggamma = (g * xhat).sum(axis=axes)
        if _needs(beta):
            gbeta = g.sum(axis=axes)
        return gx, ggamma, gbeta

    parents = (x, gamma if isinstance(gamma, Tensor) else None,
               beta if isinstance(beta, Tensor) else None)
    y = _result(out, parents, backward, "batch_norm")
    if return_stats:
        return y, mu.reshape(nf), var.reshape(nf)
    return y


# ------------------------------------------------------------------ softmax family
def _log_softmax_raw(x, axis, xp):
    shifted = x - x.max(axis=axis, keepdims=True)            # no overflow in exp
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def log_softmax(a, axis=-1):
    """``x - logsumexp(x, axis)``, computed stably."""
    _tensor_arg(a, "log_softmax")
    xp = a.xp
    out = _log_softmax_raw(a.data, axis, xp)

    def backward(g):
        return (g - xp.exp(out) * g.sum(axis=axis, keepdims=True),)

    return _result(out, (a,), backward, "log_softmax")


def softmax(a, axis=-1):
    """``exp(x) / sum(exp(x), axis)``, computed stably."""
    _tensor_arg(a, "softmax")
    xp = a.xp
    out = xp.exp(_log_softmax_raw(a.data, axis, xp))

    def backward(g):
        return (out * (g - (g * out).sum(axis=axis, keepdims=True)),)

    return _result(out, (a,), backward, "softmax")


def _check_labels(labels, logits):
    """Labels as an integer array (N,) of the logits' library, values in [0, K)."""
    xp = logits.xp
    n, k = logits.shape
    labels = _raw(labels)
    if isinstance(labels, (list, tuple)):
        labels = xp.asarray(labels)
    if not backend.is_array(labels):
        raise TypeError(f"labels must be an integer array, got {type(labels).__name__}")
    backend.namespace(labels, logits.data)                   # same library as the logits
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per row of logits), got "
                         f"{tuple(labels.shape)}")
    if n and bool(((labels < 0) | (labels >= k)).any()):
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(f"labels must lie in [0, {k}) for {k} classes; got values from {lo} to {hi}")
    return labels


def softmax_cross_entropy(logits, labels, reduction="mean"):
    """Cross-entropy of softmax(logits) against integer labels, fused and stable.

    Parameters
    ----------
    logits : Tensor (N, K) float
    labels : int array (N,) in [0, K) (same library as the logits)
    reduction : "mean" (default), "sum" or "none" (per-row losses, shape (N,))

    The backward is ``(softmax(logits) - onehot(labels)) * grad`` (divided by N for "mean").
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {logits.shape}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    xp = logits.xp
    n, k = logits.shape
    labels = _check_labels(labels, logits)
    rows = xp.arange(n)
    logp = _log_softmax_raw(logits.data, 1, xp)
    losses = -logp[rows, labels]
    out = losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses

    def backward(g):
        grad = xp.exp(logp)                                   # softmax, a fresh array we own
        grad[rows, labels] -= 1
        if reduction == "none":
            return (grad * g[:, None],)
        scale = g / n if reduction == "mean" else g
        return (grad * scale,)

    return _result(out, (logits,), backward, "softmax_cross_entropy")

