"""Network layers over :mod:`nimbus.arrays.autograd`: Linear, Conv2d, BatchNorm, ReLU,
Flatten, Sequential, and :class:`NimbusLayer`, a product layer that holds one strategy.

A :class:`NimbusLayer` (``Linear``, ``Conv2d``) wraps a weight ``B`` of shape (D, M)
(rows: input features; for a convolution D = C_in * KH * KW, flattened like
PyTorch's weight) and a bias (M,). It computes its product one of three ways:

* ``exact``: ``rows @ B`` with autograd; weights train (the default);
* ``dm``: differentiable MADDNESS; its thresholds and LUT train, gradients pass;
* ``maddness`` / ``pq`` / ``joint`` (and a hardened DM): fast hard inference by the
  strategy's kernels; no gradient passes (asking for one raises).

``layer.use(method, X, **params)`` switches by one call, fitting the strategy from
the layer's inputs ``X`` when it needs to.

Calling conventions: ``module(tensor)`` builds a graph and returns a Tensor;
``module(array)`` (NumPy or CuPy) evaluates without a graph and returns an array
of the same library. The model's arrays must live in the library of the data:
:meth:`Module.to` moves them (``nn.fit``/``nn.convert`` do it for you).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .. import io as _io
from ..arrays import autograd as ag
from ..arrays import backend, validate
from ..arrays.autograd import Function, Tensor, no_grad

__all__ = ["Module", "NimbusLayer", "Linear", "Conv2d", "BatchNorm", "ReLU", "Flatten",
           "Dropout", "Sequential", "MODULES"]

MODULES = {}          # class name -> class, for loading saved models


def _register(cls):
    MODULES[cls.__name__] = cls
    return cls


def _check_tensor_features(x, n, what, axis=1):
    if x.ndim < 2 or x.shape[axis] != n:
        got = x.shape[axis] if x.ndim >= 2 else None
        raise ValueError(f"{what} expects {n} input features (axis {axis}), got an input of "
                         f"shape {tuple(x.shape)}" + ("" if got is None else f" ({got} features)"))


def _as_input(X):
    """A raw input array: real numbers as contiguous float32, finite, at least 2-D."""
    if isinstance(X, Tensor):
        return X.data
    if not backend.is_array(X):
        X = np.asarray(X)
    if X.dtype.kind == "b" or X.dtype.kind not in "iuf":
        raise TypeError(f"model inputs must be real numbers, got dtype {X.dtype}")
    if X.ndim < 2:
        raise ValueError(f"model inputs must have a batch axis and features, got shape "
                         f"{tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"model input is empty (shape {tuple(X.shape)})")
    xp = backend.namespace(X)
    X = xp.ascontiguousarray(X, dtype=np.float32)
    validate.finite_or_raise(X, "X")
    return X


def _assign(tensor, array):
    """Give ``tensor`` new data in place: the Tensor object (held by optimizers) stays."""
    if tensor.data is not array:
        tensor.data = array
        tensor.grad = None


# ====================================================================== Module
class Module:
    """Base class: parameters, train/eval mode, calling, device moves, saved state.

    Subclasses implement ``forward(x: Tensor) -> Tensor`` and, for saving,
    ``_config()`` (JSON-able constructor arguments), ``_arrays()`` / ``_set_arrays()``.
    """

    _nimbus_kind = "model"

    def __init__(self):
        self.training = True

    # ------------------------------------------------------------ structure
    def children(self):
        """Direct sub-modules (none for a leaf module)."""
        return []

    def modules(self):
        """This module and all sub-modules, depth first."""
        yield self
        for ch in self.children():
            yield from ch.modules()

    def _own_parameters(self):
        """Trainable Tensors of this module itself (not of its children)."""
        return []

    def parameters(self):
        """All trainable Tensors (``requires_grad``) of this module and its children."""
        out, seen = [], set()
        for m in self.modules():
            for p in m._own_parameters():
                if p is not None and p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def optimizers(self, lr):
        """Adam optimizers for the trainable parameters (one group per scale).

        A trainable strategy's parameters get the strategy's own optimizers (DM scales
        ``lr`` by the parameters' magnitudes, see :meth:`nimbus.strategies.DM.param_scales`);
        everything else shares one Adam with step ``lr``.
        """
        from ..arrays.optim import Adam
        opts, plain, seen = [], [], set()
        for m in self.modules():
            s = getattr(m, "strategy", None)
            if s is not None:
                opts += s.optimizers(lr)
                seen.update(id(p) for p in s.parameters())
            for p in m._own_parameters():
                if p is not None and p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    plain.append(p)
        if plain:
            opts.append(Adam(plain, lr=lr))
        return opts

    def train(self, mode=True):
        """Set training mode (BatchNorm uses batch statistics) on this module and its children."""
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode (BatchNorm uses its running statistics)."""
        return self.train(False)

    # ------------------------------------------------------------- calling
    def forward(self, x):
        raise NotImplementedError

    def __call__(self, x):
        """``Tensor`` in: a Tensor (graph built when gradients are on). Array in: the
        output array, computed without a graph, same library as the input."""
        if isinstance(x, Tensor):
            return self.forward(x)
        X = _as_input(x)
        self._check_library(X)
        with no_grad():
            return self.forward(Tensor(X)).data

    def predict(self, X, batch_size=8192):
        """Class ids ``argmax(model(X))`` in evaluation mode, in batches.

        Parameters
        ----------
        X : (N, ...) array of real numbers (NumPy or CuPy)

        Returns
        -------
        (N,) int64 array of X's library
        """
        X = _as_input(X)
        xp = backend.namespace(X)
        was = self.training
        self.eval()
        try:
            out = [xp.argmax(self(X[s:s + batch_size]), axis=1)
                   for s in range(0, X.shape[0], batch_size)]
        finally:
            self.train(was)
        return xp.concatenate(out).astype(np.int64)

    # ------------------------------------------------------------ devices
    def _arrays_in_use(self):
        """Arrays whose library the model lives in (parameters, buffers, strategies)."""
        for m in self.modules():
            yield from m._own_arrays_in_use()

    def _own_arrays_in_use(self):
        return (a for a in self._arrays().values() if a is not None)

    def library(self):
        """``"numpy"`` or ``"cupy"``: where this model's arrays live (None if it has none,
        like a ReLU: such a module takes either)."""
        for a in self._arrays_in_use():
            return backend.library_name(a)
        return None

    def _check_library(self, X):
        lib = self.library()
        if lib is not None and backend.library_name(X) != lib:
            raise TypeError(f"the model's arrays are {lib} arrays but the input is a "
                            f"{backend.library_name(X)} array; move the model first with "
                            f"model.to(X) (nn.fit and nn.convert do this)")

    def to(self, like):
        """Move every array of the model to the library (and device) of ``like``.

        ``like`` is an array, or ``"numpy"`` / ``"cupy"``. Returns self. Optimizers
        made before the move keep the old arrays: make them afterwards.
        """
        if isinstance(like, str):
            if like not in ("numpy", "cupy"):
                raise ValueError(f"to() takes an array, 'numpy' or 'cupy', got {like!r}")
            like = np.empty(0) if like == "numpy" else backend.to_device(np.empty(0))
        for m in self.modules():
            m._move(like)
        return self

    def _move(self, like):
        """Move this module's own arrays (not its children's)."""
        arrays = {k: (None if a is None else backend.like(a, like))
                  for k, a in self._arrays().items()}
        self._set_arrays(arrays)

    # --------------------------------------------------------------- state
    def _config(self):
        return {}

    def _arrays(self):
        """This module's own arrays: {name: array or None}."""
        return {}

    def _set_arrays(self, arrays):
        pass

    def to_state(self):
        """(meta, arrays) for :func:`nimbus.save`: the module tree and every array (NumPy)."""
        arrays = {}
        meta = self._state_into(arrays, "")
        return {"model": meta}, arrays

    def _state_into(self, arrays, prefix):
        names = []
        for k, a in self._arrays().items():
            if a is not None:
                arrays[prefix + k] = backend.to_host(a)
                names.append(k)
        meta = {"class": type(self).__name__, "config": self._config(), "arrays": names,
                "training": bool(self.training)}
        extra = self._extra_state(arrays, prefix)
        if extra:
            meta["extra"] = extra
        kids = self.children()
        if kids:
            meta["children"] = [ch._state_into(arrays, f"{prefix}{i}/")
                                for i, ch in enumerate(kids)]
        return meta

    def _extra_state(self, arrays, prefix):
        return None

    @staticmethod
    def _from_meta(meta, arrays, prefix=""):
        cls = MODULES.get(meta.get("class"))
        if cls is None:
            raise KeyError(f"unknown module class {meta.get('class')!r}")
        kids = [Module._from_meta(m, arrays, f"{prefix}{i}/")
                for i, m in enumerate(meta.get("children", []))]
        obj = cls._build(meta["config"], kids)
        obj._set_arrays({k: arrays[prefix + k] for k in meta["arrays"]})
        if meta.get("extra") is not None:
            obj._load_extra(meta["extra"], arrays, prefix)
        obj.training = bool(meta.get("training", False))
        return obj

    @classmethod
    def _build(cls, config, children):
        return cls(**config)

    def _load_extra(self, extra, arrays, prefix):
        pass

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------- inference
    def inference_steps(self):
        """This module as steps of the compiled runtime (:func:`nimbus.nn.compile`), in
        evaluation mode: a list of dicts with ``"op"`` ("lut", "dense", "relu", "affine",
        "flatten") and the op's host (NumPy) arrays. ValueError if it has none."""
        raise ValueError(f"{type(self).__name__} has no compiled form")


def _load_model(meta, arrays):
    return Module._from_meta(meta["model"], arrays)


_io.register_loader("model", _load_model)      # nimbus.load reads saved models through it


# ================================================================== simple ops
@_register
class ReLU(Module):
    """``max(x, 0)`` elementwise."""

    def forward(self, x):
        return ag.relu(x)

    def inference_steps(self):
        return [{"op": "relu"}]


@_register
class Flatten(Module):
    """(N, ...) -> (N, prod(...))."""

    def forward(self, x):
        return ag.reshape(x, (x.shape[0], -1))

    def inference_steps(self):
        return [{"op": "flatten"}]


@_register
class Dropout(Module):
    """Inverted dropout: in training mode zero each entry with probability ``p`` and scale
    the rest by 1 / (1 - p); the identity in evaluation mode (and once folded).

    Parameters
    ----------
    p : float in [0, 1)
    random_state : None, int or RandomState (the masks are drawn on the host)
    """

    def __init__(self, p=0.5, random_state=None):
        super().__init__()
        self.p = validate.check_float(p, "p", 0.0, 1.0)
        if self.p >= 1.0:
            raise ValueError(f"dropout probability must be below 1, got {p}")
        self._rng = validate.random_state(random_state)

    def _config(self):
        return {"p": self.p}

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = self._rng.random_sample(x.shape) >= self.p
        scale = backend.like((keep / (1.0 - self.p)).astype(np.float32), x.data)
        return x * scale

    def inference_steps(self):
        return []                  # the identity in evaluation mode


@_register
class BatchNorm(Module):
    """Batch normalization over the feature axis 1, for (N, F) and (N, F, H, W) inputs.

    Training mode normalises with the batch's statistics and updates running
    statistics (``momentum``; the running variance is the unbiased one);
    evaluation mode computes ``x * a + b`` with ``a = gamma / sqrt(running_var +
    eps)`` and ``b = beta - running_mean * a`` (see :meth:`affine`), still
    differentiable in gamma and beta.

    Parameters
    ----------
    num_features : int, F
    eps : float > 0; momentum : float in (0, 1]
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features = validate.check_int(num_features, "num_features", lo=1)
        self.eps = validate.check_float(eps, "eps", 0.0, lo_open=True)
        self.momentum = validate.check_float(momentum, "momentum", 0.0, 1.0, lo_open=True)
        self.gamma = Tensor(np.ones(self.num_features, np.float32), requires_grad=True)
        self.beta = Tensor(np.zeros(self.num_features, np.float32), requires_grad=True)
        self.running_mean = np.zeros(self.num_features, np.float32)
        self.running_var = np.ones(self.num_features, np.float32)

    def _config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum}

    def _own_parameters(self):
        return [self.gamma, self.beta]

    def _arrays(self):
        return {"gamma": self.gamma.data, "beta": self.beta.data,
                "running_mean": self.running_mean, "running_var": self.running_var}

    def _set_arrays(self, arrays):
        for name in ("gamma", "beta"):
            if name in arrays:
                _assign(getattr(self, name), arrays[name])
        if "running_mean" in arrays:
            self.running_mean = arrays["running_mean"]
        if "running_var" in arrays:
            self.running_var = arrays["running_var"]

    def affine(self):
        """The evaluation-mode map as raw arrays ``(a, b)``, each (F,) float32: y = x * a + b."""
        xp = backend.namespace(self.gamma.data)
        inv = (1.0 / xp.sqrt(self.running_var + np.float32(self.eps))).astype(np.float32)
        a = (self.gamma.data * inv).astype(np.float32)
        b = (self.beta.data - self.running_mean * a).astype(np.float32)
        return a, b

    def inference_steps(self):
        a, b = self.affine()
        return [{"op": "affine", "a": backend.to_host(a), "b": backend.to_host(b),
                 "features": self.num_features}]

    def forward(self, x):
        _check_tensor_features(x, self.num_features, repr(self))
        shape = (1, self.num_features) + (1,) * (x.ndim - 2)
        if self.training:
            y, mean, var = ag.batch_norm(x, self.gamma, self.beta, self.eps, return_stats=True)
            m = x.size // self.num_features
            mom = np.float32(self.momentum)
            unbiased = var * np.float32(m / max(m - 1, 1))
            self.running_mean = ((1 - mom) * self.running_mean + mom * mean).astype(np.float32)
            self.running_var = ((1 - mom) * self.running_var + mom * unbiased).astype(np.float32)
            return y
        if not (ag.is_grad_enabled() and (self.gamma.requires_grad or self.beta.requires_grad)):
            # frozen affine: one fused op (a frozen network trains through it cheaply)
            a, b = self.affine()
            return _Affine.apply(x, a=a.reshape(shape), b=b.reshape(shape))
        xp = x.xp
        inv = (1.0 / xp.sqrt(self.running_var + np.float32(self.eps))).astype(np.float32)
        a = self.gamma * inv                                    # Tensor (F,): gamma trains
        b = self.beta - a * self.running_mean
        return x * ag.reshape(a, shape) + ag.reshape(b, shape)


class _Affine(Function):
    """``x * a + b`` with constant, broadcastable a and b (gradient to x only)."""

    @staticmethod
    def forward(ctx, x, *, a, b):
        ctx.a = a
        return x * a + b

    @staticmethod
    def backward(ctx, g):
        return (g * ctx.a,)


@_register
class Sequential(Module):
    """Modules applied in order. ``model[i]``, ``len(model)``, iteration, ``append``."""

    def __init__(self, *modules):
        super().__init__()
        for m in modules:
            if not isinstance(m, Module):
                raise TypeError(f"Sequential takes modules, got {type(m).__name__}")
        self.layers = list(modules)

    @classmethod
    def _build(cls, config, children):
        return cls(*children)

    def children(self):
        return list(self.layers)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x

    def inference_steps(self):
        return [step for m in self.layers for step in m.inference_steps()]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(*self.layers[i])
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"Sequential takes modules, got {type(module).__name__}")
        self.layers.append(module)
        return self

    def __repr__(self):
        inner = "\n".join(f"  ({i}) {m!r}" for i, m in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


# ================================================================ NimbusLayer
class NimbusLayer(Module):
    """A product layer ``rows @ B + bias`` that holds ONE strategy at a time.

    Subclasses define how inputs become rows (:meth:`_rows`) and outputs are
    shaped back (:meth:`_unrows`). See the module docstring for the modes.

    Attributes
    ----------
    weight : Tensor (D, M) float32 (None once folded: the LUT then holds more than B)
    bias : Tensor (M,) float32 or None
    strategy : None in ``exact`` mode, else the fitted Strategy
    mode : "exact" or the strategy's name
    """

    in_features = None
    out_features = None

    def __init__(self, in_features, out_features, bias=True, random_state=None):
        super().__init__()
        self.in_features = validate.check_int(in_features, "in_features", lo=1)
        self.out_features = validate.check_int(out_features, "out_features", lo=1)
        rng = validate.random_state(random_state)
        bound = 1.0 / math.sqrt(self.in_features)              # PyTorch's default init
        self.weight = Tensor(rng.uniform(-bound, bound, (self.in_features, self.out_features))
                             .astype(np.float32), requires_grad=True)
        self.bias = (Tensor(rng.uniform(-bound, bound, self.out_features).astype(np.float32),
                            requires_grad=True) if bias else None)
        self.strategy = None

    # ------------------------------------------------------------- modes
    @property
    def mode(self):
        return "exact" if self.strategy is None else self.strategy.name

    @property
    def ncodebooks(self):
        """C of the current strategy (None in exact mode)."""
        return None if self.strategy is None else self.strategy.n_codebooks

    def use(self, method, X=None, *, ncodebooks=None, codebook_dim=None, max_fit_rows=None,
            random_state=None, **params):
        """Switch the layer to ``method``; fit it from the layer's inputs ``X`` if needed.

        Parameters
        ----------
        method : "exact", a registered strategy name (``nimbus.strategies.REGISTRY``),
            or an already fitted Strategy (taken as it is)
        X : this layer's inputs (Linear: (N, D); Conv2d: (N, C, H, W)), NumPy or
            CuPy like the model. Needed by every method but "exact", except when the
            method's class can start from the strategy the layer holds
            (:meth:`~nimbus.strategies.Strategy.from_fitted`: DM from a fitted tree;
            X, if given, then sets DM's tau units).
        ncodebooks : int, C; default ``ceil(D / codebook_dim)``
        codebook_dim : int, input dimensions per codebook (default 8)
        max_fit_rows : int, optional: fit on at most this many rows (drawn at random)
        random_state : None, int or RandomState
        **params : the strategy's hyperparameters (e.g. ``tau`` for DM)

        Returns
        -------
        self
        """
        from ..strategies import REGISTRY, Strategy
        if isinstance(method, Strategy):
            self._accept(method)
            self.strategy = method
            return self
        if method == "exact":
            if self.weight is None:
                raise ValueError(f"{self!r} was folded: it has no weights to multiply by; "
                                 "load or build the unfolded model to go back to exact mode")
            self.strategy = None
            return self
        if not isinstance(method, str) or method not in REGISTRY:
            raise ValueError(f"unknown method {method!r}; known: exact, "
                             f"{', '.join(sorted(k for k in REGISTRY if k != 'exact'))}")
        rows = None
        if X is not None:
            rows = self._fit_rows(X, max_fit_rows, random_state)
        cls = REGISTRY[method]
        if self.strategy is not None and not isinstance(self.strategy, cls):
            started = cls.from_fitted(self.strategy, rows, random_state=random_state, **params)
            if started is not None:
                self.strategy = started
                return self
        if self.weight is None:
            raise ValueError(f"{self!r} was folded: it has no weights to fit a strategy to")
        if rows is None:
            raise ValueError(f"layer.use({method!r}) needs the layer's inputs X to fit on")
        C = self._codebooks(ncodebooks, codebook_dim)
        strat = cls(ncodebooks=C, random_state=random_state, **params)
        strat.fit(rows, backend.like(self.weight.data, rows))
        self.strategy = strat
        return self

    def _codebooks(self, ncodebooks, codebook_dim):
        D = self.in_rows
        if ncodebooks is not None:
            C = validate.check_int(ncodebooks, "ncodebooks", lo=1, hi=D)
            if codebook_dim is not None:
                raise ValueError("give ncodebooks or codebook_dim, not both")
            return C
        d = 8 if codebook_dim is None else validate.check_int(codebook_dim, "codebook_dim", lo=1)
        return max(1, -(-D // d))

    def _accept(self, strategy):
        n_in = getattr(strategy, "n_features_in_", None)
        if n_in is None:
            raise ValueError(f"the strategy {strategy!r} is not fitted")
        if n_in != self.in_rows:
            raise ValueError(f"the strategy was fitted on {n_in} features but {self!r} has "
                             f"{self.in_rows} per row")
        n_out = getattr(strategy, "n_outputs_", None)
        if n_out is not None and n_out != self.out_features:
            raise ValueError(f"the strategy gives {n_out} outputs but {self!r} has "
                             f"{self.out_features}")

    def harden(self, quantize=True):
        """Fast hard inference from here on (the strategy's :meth:`harden`): a trainable
        strategy becomes its hard form (DM: a plain MADDNESS with its trees and LUT); the
        LUT is 8-bit when ``quantize``, float otherwise."""
        s = self.strategy
        if s is None:
            raise ValueError(f"{self!r} is in exact mode: there is nothing to harden")
        self.strategy = s.harden(quantize=bool(quantize))
        return self

    # ------------------------------------------------------------ forward
    @property
    def in_rows(self):
        """D: features per row that the product sees."""
        return self.in_features

    def _fit_rows(self, X, max_rows, random_state):
        X = X.data if isinstance(X, Tensor) else X
        X = _as_input(X)
        rows = self._rows_raw(X)
        if max_rows is not None and rows.shape[0] > max_rows:
            rng = validate.random_state(random_state)
            pick = np.sort(rng.choice(rows.shape[0], size=int(max_rows), replace=False))
            rows = rows[backend.namespace(rows).asarray(pick)]
        return rows

    def _rows_raw(self, X):
        """Raw input array -> raw (N', D) float32 rows."""
        return self._rows(Tensor(X)).data

    def _product(self, rows):
        """rows (N', D) Tensor -> (N', M) Tensor by the current mode (bias not added)."""
        s = self.strategy
        if s is None:
            return rows @ self.weight
        try:
            return s.forward(rows)
        except ValueError as exc:
            raise ValueError(f"{self!r}: {exc}") from None

    def forward(self, x):
        rows = self._rows(x)
        y = self._product(rows)
        if self.bias is not None:
            y = y + self.bias
        return self._unrows(y, x)

    def _rows(self, x):
        raise NotImplementedError

    def _unrows(self, y, x):
        raise NotImplementedError

    # --------------------------------------------------------- inference
    def inference_steps(self):
        """One step: ``"dense"`` (W (D, M), b (M,) or None) in exact mode, else ``"lut"``
        with the strategy's :meth:`~nimbus.strategies.Strategy.inference_spec` and the
        layer's bias as ``layer_bias`` (None once folded). ValueError for layers that have no compiled form
        (a Conv2d) or a strategy without an 8-bit form (names what is missing)."""
        if not self._rows_are_inputs:
            raise ValueError(f"{self!r}: the compiled runtime runs Linear layers (a "
                             f"{type(self).__name__} has no compiled form yet)")
        bias = None if self.bias is None else backend.to_host(self.bias.data)
        base = {"in": self.in_features, "out": self.out_features, "bias": bias}
        if self.strategy is None:
            if self.weight is None:
                raise ValueError(f"{self!r} has neither weights nor a strategy")
            return [dict(base, op="dense", weight=backend.to_host(self.weight.data))]
        try:
            spec = self.strategy.inference_spec()
        except ValueError as exc:
            raise ValueError(f"{self!r}: {exc}") from None
        spec = {k: (backend.to_host(v) if backend.is_array(v) else v) for k, v in spec.items()}
        # the LUT's "bias" is its offset; the layer's own bias (None once folded) is apart
        return [dict(spec, op="lut", layer_bias=bias, **{"in": self.in_features,
                                                          "out": self.out_features})]

    #: True when the product's rows are the layer's input rows (Linear), not im2col windows
    _rows_are_inputs = False

    # ------------------------------------------------------------- state
    def _own_parameters(self):
        ps = [self.weight] if self.strategy is None else list(self.strategy.parameters())
        ps.append(self.bias)
        return [p for p in ps if p is not None]

    def _arrays(self):
        out = {"weight": None if self.weight is None else self.weight.data,
               "bias": None if self.bias is None else self.bias.data}
        return out

    def _set_arrays(self, arrays):
        for name in ("weight", "bias"):
            if arrays.get(name) is not None:
                if getattr(self, name) is None:
                    setattr(self, name, Tensor(arrays[name], requires_grad=True))
                else:
                    _assign(getattr(self, name), arrays[name])

    def _own_arrays_in_use(self):
        yield from super()._own_arrays_in_use()
        if self.strategy is not None:
            yield from self.strategy.learned_arrays().values()

    def _move(self, like):
        super()._move(like)
        if self.strategy is not None:
            self.strategy.to(like)

    def _extra_state(self, arrays, prefix):
        extra = {"has_weight": self.weight is not None, "has_bias": self.bias is not None}
        if self.strategy is not None:
            meta, arrs = self.strategy.to_state()
            for k, a in arrs.items():
                arrays[f"{prefix}strategy/{k}"] = a
            extra["strategy"] = meta
        return extra

    def _load_extra(self, extra, arrays, prefix):
        from ..strategies import REGISTRY
        if not extra.get("has_weight", True):
            self.weight = None
        if not extra.get("has_bias", True):
            self.bias = None
        meta = extra.get("strategy")
        if meta is not None:
            cls = REGISTRY.get(meta.get("class"))
            if cls is None:
                raise KeyError(f"unknown strategy class {meta.get('class')!r}")
            sub = {k: arrays[f"{prefix}strategy/{k}"] for k in meta["arrays"]}
            self.strategy = cls.from_state(meta, sub)
            like = self.weight.data if self.weight is not None else \
                (self.bias.data if self.bias is not None else None)
            if like is not None:
                self._move(like)


@_register
class Linear(NimbusLayer):
    """Fully connected NimbusLayer: ``y = x @ B + bias``, x (N, D) -> y (N, M).

    Parameters
    ----------
    in_features : int, D; out_features : int, M
    bias : bool
    random_state : None, int or RandomState (initial weights: U(-1/sqrt(D), 1/sqrt(D)))
    """

    _rows_are_inputs = True

    def _config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def _rows(self, x):
        if x.ndim != 2:
            raise ValueError(f"{self!r} expects inputs of shape (N, {self.in_features}), got "
                             f"{tuple(x.shape)}")
        _check_tensor_features(x, self.in_features, repr(self))
        return x

    def _unrows(self, y, x):
        return y

    def __repr__(self):
        mode = "" if self.mode == "exact" else f", mode={self.mode!r}"
        return f"Linear({self.in_features} -> {self.out_features}{mode})"


class _Im2Rows(Function):
    """(N, C, H, W) -> (N * Ho * Wo, C * KH * KW) sliding windows as rows (differentiable)."""

    @staticmethod
    def forward(ctx, x, *, kernel_size, stride, padding):
        xp = backend.namespace(x)
        cols = ag.im2col(x, kernel_size, stride, padding)      # (C, KH, KW, N, Ho, Wo)
        ctx.cols_shape = cols.shape
        ctx.x_shape = x.shape
        ctx.stride, ctx.padding = stride, padding
        D = cols.shape[0] * cols.shape[1] * cols.shape[2]
        return xp.ascontiguousarray(cols.reshape(D, -1).T)

    @staticmethod
    def backward(ctx, g):
        cols = g.T.reshape(ctx.cols_shape)
        return (ag.col2im(cols, ctx.x_shape, ctx.stride, ctx.padding),)


def _pair(v, name):
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return (validate.check_int(v[0], name, lo=0), validate.check_int(v[1], name, lo=0))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


@_register
class Conv2d(NimbusLayer):
    """2-D convolution as a NimbusLayer over im2col rows.

    x (N, C_in, H, W) -> y (N, C_out, Ho, Wo). The product's rows are the
    windows (N * Ho * Wo of them, D = C_in * KH * KW features each, ordered as
    PyTorch flattens its weight); ``weight`` is B (D, C_out).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding : int or (h, w)
    bias : bool; random_state : None, int or RandomState
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 random_state=None):
        self.in_channels = validate.check_int(in_channels, "in_channels", lo=1)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(f"kernel_size and stride must be at least 1, got "
                             f"{self.kernel_size}, {self.stride}")
        D = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        super().__init__(D, out_channels, bias=bias, random_state=random_state)

    def _config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_features,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "bias": self.bias is not None}

    @classmethod
    def _build(cls, config, children):
        cfg = dict(config)
        for k in ("kernel_size", "stride", "padding"):
            cfg[k] = tuple(cfg[k])
        return cls(**cfg)

    def _rows(self, x):
        if x.ndim != 4:
            raise ValueError(f"{self!r} expects images of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        _check_tensor_features(x, self.in_channels, repr(self))
        return _Im2Rows.apply(x, kernel_size=self.kernel_size, stride=self.stride,
                              padding=self.padding)

    def _unrows(self, y, x):
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return ag.transpose(ag.reshape(y, (n, ho, wo, self.out_features)), (0, 3, 1, 2))

    def __repr__(self):
        mode = "" if self.mode == "exact" else f", mode={self.mode!r}"
        return (f"Conv2d({self.in_channels} -> {self.out_features}, kernel={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}{mode})")
