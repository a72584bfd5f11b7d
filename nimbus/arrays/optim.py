"""Optimizers for :class:`nimbus.arrays.autograd.Tensor` parameters: SGD and Adam.

Updates happen in place on ``param.data`` with ``xp`` operations (NumPy or CuPy),
so parameters stay where they live and no host transfer happens. Hyperparameters
are Python floats (weak scalars: float32 parameters stay float32). ``lr`` is a
plain attribute that a schedule may set between steps (the training loop of
``nimbus.nn.train`` anneals it on a cosine this way)::

    opt = Adam(params, lr=1e-3)
    for t in range(total_steps):
        opt.lr = 0.5e-3 * (1 + math.cos(math.pi * t / total_steps))
        opt.zero_grad(); loss(...).backward(); opt.step()

Parameters whose ``grad`` is None are skipped by ``step()`` (their state does not
advance), as in PyTorch.
"""
from __future__ import annotations

import math

from . import backend, validate
from .autograd import Tensor

__all__ = ["Optimizer", "SGD", "Adam"]


class Optimizer:
    """Common part: the parameter list, ``lr``, ``zero_grad()``.

    Parameters
    ----------
    params : iterable of Tensor (floating data); duplicates are kept once
    lr : float > 0
    """

    def __init__(self, params, lr):
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors (e.g. a list), not one Tensor")
        unique, seen = [], set()
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"every parameter must be a Tensor, got {type(p).__name__}")
            if not p.requires_grad:
                raise ValueError(f"parameter {p!r} does not require grad; set requires_grad=True")
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        if not unique:
            raise ValueError("the optimizer got an empty parameter list")
        self.params = unique
        self.lr = validate.check_float(lr, "lr", 0.0, lo_open=True)
        self.state = [dict() for _ in unique]     # per-parameter buffers, aligned with params

    def zero_grad(self):
        """Drop every parameter's gradient (``grad = None``: cheaper than filling zeros)."""
        for p in self.params:
            p.grad = None

    def step(self):
        raise NotImplementedError

    def _active(self):
        """(param, grad, state) for parameters that received a gradient."""
        for p, st in zip(self.params, self.state):
            if p.grad is not None:
                backend.namespace(p.data, p.grad)     # TypeError if grad lives elsewhere
                yield p, p.grad, st


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    Same rule as PyTorch's SGD (no dampening)::

        g = grad + weight_decay * p
        buf = g                          (first step)
        buf = momentum * buf + g         (later steps)
        d = g + momentum * buf if nesterov else buf      (d = g without momentum)
        p -= lr * d
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        self.momentum = validate.check_float(momentum, "momentum", 0.0)
        self.weight_decay = validate.check_float(weight_decay, "weight_decay", 0.0)
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs a momentum above 0")
        self.nesterov = bool(nesterov)

    def step(self):
        lr, mom, wd = float(self.lr), self.momentum, self.weight_decay
        for p, g, st in self._active():
            if wd:
                g = g + wd * p.data
            if mom:
                buf = st.get("momentum")
                if buf is None:
                    buf = st["momentum"] = g.astype(p.dtype, copy=True)
                else:
                    buf *= mom
                    buf += g
                g = g + mom * buf if self.nesterov else buf
            p.data -= lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``decoupled=True`` gives AdamW.

    Per parameter, with t counting that parameter's steps::

        g = grad (+ weight_decay * p when not decoupled: L2 through the gradient)
        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        p -= lr * weight_decay * p                        (decoupled only, before the step)
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=False):
        super().__init__(params, lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = tuple(validate.check_float(b, "betas", 0.0, 1.0) for b in betas)
        if self.betas[0] >= 1 or self.betas[1] >= 1:
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        self.eps = validate.check_float(eps, "eps", 0.0)
        self.weight_decay = validate.check_float(weight_decay, "weight_decay", 0.0)
        self.decoupled = bool(decoupled)

    def step(self):
        lr, (b1, b2), eps, wd = float(self.lr), self.betas, self.eps, self.weight_decay
        for p, g, st in self._active():
            xp = backend.namespace(p.data)
            if not st:
                st["t"] = 0
                st["m"] = xp.zeros_like(p.data)
                st["v"] = xp.zeros_like(p.data)
            st["t"] += 1
            t, m, v = st["t"], st["m"], st["v"]
            if wd and not self.decoupled:
                g = g + wd * p.data
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            if wd and self.decoupled:
                p.data *= 1 - lr * wd
            # fold both bias corrections into scalars: one sqrt and one division per entry
            step_size = lr / (1 - b1 ** t)
            denom = xp.sqrt(v)
            denom *= 1 / math.sqrt(1 - b2 ** t)
            denom += eps
            p.data -= step_size * (m / denom)

