"""Training and evaluation: ``fit``, ``accuracy``, ``evaluate``, and the shared loop.

Training runs where the data lives: ``fit`` moves the model to X's library
(NumPy or CuPy) first. Loss: softmax cross-entropy on integer labels. Optimizer:
Adam (DM parameters get their own step sizes, see ``Module.optimizers``), with a
cosine decay of the step over the run.
"""
from __future__ import annotations

import time

import numpy as np

from .._progress import progress_bar
from ..arrays import autograd as ag
from ..arrays import backend, validate
from ..arrays.autograd import Tensor, no_grad
from ..table import Table
from .layers import Module, NimbusLayer, Sequential, _as_input

__all__ = ["fit", "accuracy", "evaluate", "train_loop", "check_xy", "soft_targets"]


def check_xy(model, X, y, name="X"):
    """Validated ``(X, y)``: X float32 (N, ...) finite, y int64 (N,) in X's library.

    Raises ValueError naming the problem (row counts differ, labels negative,
    labels beyond the model's number of outputs is caught by the loss)."""
    if not isinstance(model, Module):
        raise TypeError(f"model must be a nimbus.nn Module, got {type(model).__name__}")
    X = _as_input(X)
    y_arr = y.data if isinstance(y, Tensor) else y
    if not backend.is_array(y_arr):
        y_arr = np.asarray(y_arr)
    y_arr = validate.as_labels(y_arr, X.shape[0], "y")
    return X, backend.like(y_arr, X)


def _check_label_range(logits_cols, y):
    top = int(y.max())
    if top >= logits_cols:
        raise ValueError(f"labels go up to {top} but the model has only {logits_cols} outputs "
                         f"(classes 0..{logits_cols - 1})")


def _loss(logits, target):
    """Softmax cross-entropy against integer labels (B,) or target probabilities (B, K)."""
    if target.ndim == 1:
        return ag.softmax_cross_entropy(logits, target)
    return -(ag.log_softmax(logits, axis=1) * target).sum(axis=1).mean()


def soft_targets(logits, y, label_weight):
    """``label_weight * onehot(y) + (1 - label_weight) * softmax(logits)``: (N, K) float32.

    Distillation targets: the teacher's probabilities mixed with the labels."""
    xp = backend.namespace(logits)
    z = logits - logits.max(axis=1, keepdims=True)
    p = xp.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p *= np.float32(1.0 - label_weight)
    p[xp.arange(len(y)), y] += np.float32(label_weight)
    return p.astype(np.float32)


def train_loop(forward, opts, X, y, *, epochs, batch_size, rng, verbose=False, desc="train",
               cosine=True, on_epoch=None):
    """Minimise the cross-entropy of ``forward(Tensor(X[idx]))`` against ``y[idx]``.

    Parameters
    ----------
    forward : callable Tensor (B, ...) -> Tensor (B, K) logits
    opts : list of optimizers (each with ``lr``, ``zero_grad``, ``step``)
    X : (N, ...) float32 array; y : (N,) int64 labels or (N, K) float32 target
        probabilities (e.g. from :func:`soft_targets`), same library
    epochs, batch_size : ints; rng : numpy RandomState (shuffling)
    cosine : decay every optimizer's step to 0 along a half cosine over the run
    on_epoch : optional callable(epoch, mean_loss) after each epoch

    Returns
    -------
    list of float: mean training loss per epoch
    """
    xp = backend.namespace(X)
    N = X.shape[0]
    bs = min(int(batch_size), N)
    steps_per_epoch = -(-N // bs)
    total = max(1, epochs * steps_per_epoch)
    base = [o.lr for o in opts]
    losses = []
    step = 0
    with progress_bar(epochs * steps_per_epoch, desc, verbose) as bar, \
            backend.blas_single_thread(X):
        for epoch in range(epochs):
            perm = xp.asarray(rng.permutation(N))
            acc = None
            for s in range(0, N, bs):
                idx = perm[s:s + bs]
                if cosine:
                    f = 0.5 * (1.0 + np.cos(np.pi * step / total))
                    for o, b in zip(opts, base):
                        o.lr = b * f
                for o in opts:
                    o.zero_grad()
                loss = _loss(forward(Tensor(X[idx])), y[idx])
                loss.backward()
                for o in opts:
                    o.step()
                # keep the running sum on the device: no host sync per step
                acc = loss.data * len(idx) if acc is None else acc + loss.data * len(idx)
                step += 1
                bar.update()
            mean = float(acc) / N
            if not np.isfinite(mean):
                raise FloatingPointError(f"training diverged in {desc}: the loss became {mean} "
                                         f"in epoch {epoch + 1}; lower the learning rate")
            losses.append(mean)
            bar.set_postfix_str(f"loss {mean:.4f}")
            if on_epoch is not None:
                on_epoch(epoch, mean)
    for o, b in zip(opts, base):
        o.lr = b
    return losses


def noisy_forward(model, sigma, seed, ref):
    """``model``'s training forward with Gaussian noise added to every layer's input.

    Before each Linear/Conv2d (a NimbusLayer among ``model.layers``), the input
    ``x`` gets ``sigma * std(x) * z``: z standard normal, std per input feature over
    the batch (not differentiated). The model learns to be robust to the kind of
    perturbation a quantizer of that input makes (DM trains with the same noise).

    model : Sequential; sigma : float > 0; seed : int; ref : array of the data's library
    Returns a callable Tensor -> Tensor.
    """
    if not isinstance(model, Sequential):
        raise TypeError("input_noise needs a nimbus.nn.Sequential model, got "
                        f"{type(model).__name__}")
    sample = backend.normal_sampler(seed, ref)
    s = np.float32(sigma)

    def run(modules, x):
        for m in modules:
            if isinstance(m, Sequential):          # nested: its layers get noise too
                x = run(m.layers, x)
                continue
            if isinstance(m, NimbusLayer):
                scale = x.data.std(axis=0).astype(np.float32) * s
                x = x + Tensor(sample(x.shape) * scale[None])
            x = m(x)
        return x

    def forward(x):
        return run(model.layers, x)
    return forward


def fit(model, X, y, epochs=10, batch_size=256, lr=1e-3, random_state=None, verbose=False,
        validation=None, input_noise=0.0):
    """Train ``model`` on (X, y) with Adam and softmax cross-entropy.

    Parameters
    ----------
    model : Module (e.g. Sequential) producing (N, K) logits
    X : (N, ...) array of real numbers (NumPy or CuPy), coerced to float32;
        the model is moved to X's library
    y : (N,) integer class labels in [0, K)
    epochs, batch_size : ints >= 1
    lr : float > 0, Adam step (DM parameters scale it, see ``Module.optimizers``)
    random_state : None, int or RandomState (shuffling)
    verbose : bool, progress bar
    validation : optional (X_val, y_val): accuracy after every epoch
    input_noise : float >= 0: while training, every Linear/Conv2d input gets Gaussian
        noise of this many standard deviations of each input feature (over the batch);
        needs a Sequential. Makes the model robust to quantized inputs (on
        Fashion-MNIST, 0.4 for 25 epochs: the same float accuracy as plain training,
        and conversion loses about 0.6 point less; benchmarks/RESULTS.md). 0 (default):
        plain training

    Returns
    -------
    Table with one row per epoch: epoch, loss (training), val_accuracy, seconds.
    The model is left in evaluation mode.
    """
    X, y = check_xy(model, X, y)
    epochs = validate.check_int(epochs, "epochs", lo=1)
    batch_size = validate.check_int(batch_size, "batch_size", lo=1)
    lr = validate.check_float(lr, "lr", 0.0, lo_open=True)
    input_noise = validate.check_float(input_noise, "input_noise", 0.0)
    rng = validate.random_state(random_state)
    if validation is not None:
        Xv, yv = check_xy(model, *validation, name="validation X")
        Xv, yv = backend.like(Xv, X), backend.like(yv, X)
    model.to(X)
    model.eval()
    with no_grad():
        _check_label_range(model(X[:2]).shape[1], y)
    model.train()
    opts = model.optimizers(lr)
    if not opts:
        raise ValueError("the model has no trainable parameters")
    rows, t0 = [], time.perf_counter()

    def on_epoch(epoch, loss):
        row = {"epoch": epoch + 1, "loss": loss, "val_accuracy": None,
               "seconds": time.perf_counter() - t0}
        if validation is not None:
            row["val_accuracy"] = accuracy(model, Xv, yv)
            model.train()
        rows.append(row)

    forward = model
    if input_noise > 0:
        forward = noisy_forward(model, input_noise, rng.randint(2 ** 31), X)
    try:
        train_loop(forward, opts, X, y, epochs=epochs, batch_size=batch_size, rng=rng,
                   verbose=verbose, desc="fit", on_epoch=on_epoch)
    finally:
        model.eval()
    return Table(rows, ["epoch", "loss", "val_accuracy", "seconds"], title="training")


def accuracy(model, X, y, batch_size=8192):
    """Fraction of rows whose predicted class (evaluation mode) equals the label.

    The model is moved to X's library if it lives elsewhere. Returns a float."""
    X, y = check_xy(model, X, y)
    model.to(X)
    pred = model.predict(X, batch_size=batch_size)
    return float((pred == y).mean())


def evaluate(model, X, y, batch_size=8192):
    """``{"loss": mean cross-entropy, "accuracy": float}`` in evaluation mode."""
    X, y = check_xy(model, X, y)
    model.to(X)
    was = model.training
    model.eval()
    total, correct = 0.0, 0
    try:
        with no_grad():
            for s in range(0, X.shape[0], batch_size):
                logits = model(Tensor(X[s:s + batch_size]))
                yb = y[s:s + batch_size]
                _check_label_range(logits.shape[1], yb)
                total += float(ag.softmax_cross_entropy(logits, yb, reduction="sum").data)
                correct += int((logits.xp.argmax(logits.data, axis=1) == yb).sum())
    finally:
        model.train(was)
    n = X.shape[0]
    return {"loss": total / n, "accuracy": correct / n}
