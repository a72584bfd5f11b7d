"""The conversion pipeline: a trained network -> lookup tables, layer by layer.

Stages (docs/ARCHITECTURE.md, "The path of data"):

1. ``pretrain``: (optional) train the float model with exact layers;
2. ``layer l`` for every Linear/Conv2d layer l = 1..L in order: the modules before
   l run ONCE, in evaluation mode and fast hard mode, over the training set (and
   the validation set), and their output is cached; in fact only the modules
   between layer l-1 and layer l run, on the previous cache, so a stage costs the
   same however many layers are already converted. Layer l is initialised from
   its cached inputs (joint bucketing or MADDNESS trees, C = ceil(D /
   codebook_dim)) and trained as DM; the modules after it run exact with frozen
   weights, passing gradients (the affine parameters of the BatchNorm right
   after l keep training when ``train_bn``);
3. ``finetune``: every converted layer in DM, briefly, at a smaller step;
4. ``int8``: LUTs quantized to 8 bits (per-codebook offset, shared scale, exact
   integer sums);
5. ``folded``: BatchNorm after a layer folded into its LUT columns, ReLU before a
   layer into its thresholds (see :mod:`nimbus.nn.fold`).

``schedule="published"`` runs the schedule of Stella Nera instead, for
comparison: no caching, and every converted layer stays trainable in DM at every
later stage (stage l trains layers 1..l), so the cost grows with depth squared.

Everything runs where X lives (NumPy or CuPy): the model is moved there first.
"""
from __future__ import annotations

import time

import numpy as np

from ..arrays import backend, validate
from ..arrays.autograd import Tensor, no_grad
from ..table import Table
from ..strategies.base import check_depth
from .layers import BatchNorm, NimbusLayer, Sequential
from .train import _check_label_range, check_xy, noisy_forward, soft_targets, train_loop

__all__ = ["convert", "ConversionReport"]


class ConversionReport:
    """Accuracy and time after every stage and layer of :func:`convert`.

    Attributes
    ----------
    rows : list of dict with keys ``stage`` ("float", "layer", "finetune", "int8",
        "folded", ...), ``layer`` (index among the converted layers, from 1, or
        None), ``name`` (the layer's description), ``accuracy`` (on the
        validation set, or the training set when none was given), ``loss``
        (training loss of the stage's last epoch, or None), ``seconds`` (the
        stage's wall time) and ``total_seconds`` (since the start of conversion).
    evaluated_on : "validation" or "train"
    settings : dict of the conversion's parameters
    """

    COLUMNS = ["stage", "layer", "name", "accuracy", "loss", "seconds", "total_seconds"]

    def __init__(self, evaluated_on, settings):
        self.rows = []
        self.evaluated_on = evaluated_on
        self.settings = dict(settings)

    def add(self, stage, accuracy, seconds, total, layer=None, name=None, loss=None):
        row = {"stage": stage, "layer": layer, "name": name, "accuracy": accuracy,
               "loss": loss, "seconds": seconds, "total_seconds": total}
        self.rows.append(row)
        return row

    @property
    def table(self):
        return Table(self.rows, self.COLUMNS,
                     title=f"conversion: accuracy on the {self.evaluated_on} set after every stage")

    def accuracy(self, stage, layer=None):
        """Accuracy after ``stage`` (and, for stage "layer", after that layer); KeyError if absent."""
        for r in self.rows:
            if r["stage"] == stage and (layer is None or r["layer"] == layer):
                return r["accuracy"]
        raise KeyError(f"no {stage!r} stage{'' if layer is None else f' for layer {layer}'} "
                       "in this report")

    @property
    def float_accuracy(self):
        return self.accuracy("float")

    @property
    def final_accuracy(self):
        return self.rows[-1]["accuracy"]

    @property
    def conversion_seconds(self):
        """Wall time of stages 2-5 (pretraining and the float evaluation excluded)."""
        return sum(r["seconds"] for r in self.rows if r["stage"] not in ("float", "pretrain"))

    def seconds(self, stage):
        return sum(r["seconds"] for r in self.rows if r["stage"] == stage)

    def __str__(self):
        return str(self.table)

    __repr__ = __str__

    def _repr_html_(self):
        return self.table._repr_html_()

    def to_markdown(self):
        return self.table.to_markdown()

    def plot(self, ax=None):
        """Accuracy after each step (float line dashed); returns the matplotlib axes."""
        ax = _axes(ax)
        labels = [r["stage"] if r["layer"] is None else f"layer {r['layer']}" for r in self.rows]
        acc = [100 * r["accuracy"] for r in self.rows]
        ax.plot(range(len(acc)), acc, marker="o")
        ax.axhline(100 * self.float_accuracy, ls="--", color="gray", label="float")
        ax.set_xticks(range(len(acc)))
        ax.set_xticklabels(labels, rotation=45, ha="right")
        ax.set_ylabel(f"{self.evaluated_on} accuracy (%)")
        ax.set_title("accuracy after every conversion stage")
        ax.legend()
        return ax


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=(7, 3.5))
    return ax


# ------------------------------------------------------------------ helpers
def _run(modules, A, batch_size=8192):
    """Modules applied in order, evaluation mode, no graph, in batches: a raw array."""
    if not modules:
        return A
    xp = backend.namespace(A)
    out = []
    with no_grad():
        for s in range(0, A.shape[0], batch_size):
            x = Tensor(A[s:s + batch_size])
            for m in modules:
                x = m(x)
            out.append(x.data)
    return xp.concatenate(out, axis=0)


def _chain(modules):
    def forward(x):
        for m in modules:
            x = m(x)
        return x
    return forward


def _accuracy_of(modules, A, y):
    xp = backend.namespace(A)
    logits = _run(modules, A)
    return float((xp.argmax(logits, axis=1) == y).mean())


class _Trainable:
    """Context: only the given tensors require grad; every other parameter is frozen."""

    def __init__(self, model, tensors):
        self.model = model
        self.keep = {id(t) for t in tensors}

    def __enter__(self):
        self.saved = []
        for m in self.model.modules():
            for p in _all_tensors(m):
                self.saved.append((p, p.requires_grad))
                p.requires_grad = id(p) in self.keep
        return self

    def __exit__(self, *exc):
        for p, rg in self.saved:
            p.requires_grad = rg
        return False


def _all_tensors(m):
    ts = []
    if isinstance(m, NimbusLayer):
        ts = [m.weight, m.bias]
        if m.strategy is not None and m.strategy.name == "dm":
            ts += m.strategy.parameters()
    elif isinstance(m, BatchNorm):
        ts = [m.gamma, m.beta]
    return [t for t in ts if t is not None]


def _layer_tensors(layer):
    ts = list(layer.strategy.parameters()) if layer.mode == "dm" else [layer.weight]
    return ts + ([layer.bias] if layer.bias is not None else [])


def _optimizers(layers, bns, lr):
    from ..arrays.optim import Adam
    opts = []
    for layer in layers:
        opts += layer.strategy.optimizers(lr)
        if layer.bias is not None:
            opts.append(Adam([layer.bias], lr=lr))
    bn_params = [p for bn in bns for p in (bn.gamma, bn.beta)]
    if bn_params:
        opts.append(Adam(bn_params, lr=lr))
    return opts


def _bn_after(mods, positions):
    """The BatchNorms directly after the layers at ``positions``."""
    return [mods[p + 1] for p in positions if p + 1 < len(mods) and isinstance(mods[p + 1], BatchNorm)]


def _describe(layer):
    return f"{type(layer).__name__} {layer.in_rows}->{layer.out_features} C={layer.ncodebooks}"


# ------------------------------------------------------------------ convert
def convert(model, X, y, *, codebook_dim=8, ncodebooks=None, depth=4, lut_form="free", init="auto",
            init_rows=8192,
            init_params=None, epochs_per_layer=2, finetune_epochs=1, batch_size=256, lr=1e-2,
            finetune_lr=None, tau=0.3, temperature=1.0, train_bn=True, distill=0.5,
            distill_temperature=1.0, noise=0.3, column_orders=None, int8=True, fold=True,
            pretrain_epochs=0, pretrain_lr=1e-3, pretrain_noise=0.0, schedule="layerwise",
            validation=None,
            random_state=None, verbose=False):
    """Convert every Linear/Conv2d layer of a trained model to lookup tables.

    Parameters
    ----------
    model : Sequential whose Linear/Conv2d layers are direct children (trained,
        unless ``pretrain_epochs`` > 0). Modified in place.
    X : (N, ...) array of real numbers (NumPy or CuPy); y : (N,) int labels
    codebook_dim : int, input dimensions per codebook: C = ceil(D / codebook_dim)
    ncodebooks : int, optional, the same C for every layer instead
    depth : int in 1..10, depth of every layer's trees: K = 2**depth LUT rows per
        codebook (4: the MADDNESS 16; deeper trees partition each codebook's inputs
        more finely for LUTs 2**(depth-4) times as large, at the same lookup cost)
    lut_form : "free" or "factored": how DM parametrises each LUT while it trains
        (see :class:`nimbus.strategies.DM`); the converted model is the same kind
    init : "auto" (joint bucketing if available, else MADDNESS), "joint", "maddness"
    init_rows : int, rows of the cached inputs the initial trees are fitted on
    init_params : dict, extra hyperparameters of the initial tree learner
        (default ``{"refine": 0}``: refinement passes are slow on wide layers and
        DM training does their work)
    epochs_per_layer : int, DM epochs for each layer (stage 2)
    finetune_epochs : int, epochs with every layer in DM (stage 3); 0 skips it
    batch_size : int; lr : float, Adam step (DM parameters scale it by their magnitudes)
    finetune_lr : float, default lr / 5
    tau, temperature : DM surrogate widths (see :class:`nimbus.strategies.DM`)
    train_bn : bool, the affine parameters of the BatchNorm right after each trained
        layer train too (the other BatchNorms stay frozen)
    distill : float in [0, 1], weight of the float model's own predictions in the
        training targets (knowledge distillation): targets are ``distill *
        softmax(float logits / distill_temperature) + (1 - distill) * onehot(y)``;
        0 trains on labels only
    distill_temperature : float > 0, softens the float model's probabilities
    noise : float >= 0, training-time input noise of every DM layer, in units of each
        input column's standard deviation (see :class:`nimbus.strategies.DM`)
    column_orders : optional dict {converted-layer number (1-based): permutation of
        that layer's input columns}: which columns each codebook sees (e.g.
        :func:`nimbus.strategies.dm.patch_order` for image patches)
    int8 : bool, quantize LUTs to 8 bits (stage 4); else keep float LUTs
    fold : bool, fold BatchNorm and ReLU (stage 5); the model's modules are replaced
        by the folded chain
    pretrain_epochs : int, exact training first (stage 1); pretrain_lr its step
    pretrain_noise : float >= 0, input noise of every layer during pretraining, in
        standard deviations of each input feature (see :func:`nimbus.nn.fit`'s
        ``input_noise``): a float model that tolerates perturbed inputs loses less
        when its layers' inputs are quantized
    schedule : "layerwise" (ours: cached prefix, one DM layer per stage) or
        "published" (every converted layer keeps training in DM at later stages)
    validation : optional (X_val, y_val) for the reported accuracies
    random_state : None, int or RandomState
    verbose : progress bars and a line per stage

    Returns
    -------
    ConversionReport (text and HTML tables; ``.plot()``)

    Raises
    ------
    ValueError if the model has no Linear/Conv2d layer, is not a Sequential of
    modules, or X/y are malformed (shapes, labels out of range).
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"convert needs a nimbus.nn.Sequential model, got {type(model).__name__}")
    X, y = check_xy(model, X, y)
    positions = [i for i, m in enumerate(model.layers) if isinstance(m, NimbusLayer)]
    if not positions:
        raise ValueError("the model has no Linear or Conv2d layer to convert")
    for m in model.layers:
        if isinstance(m, Sequential):
            raise ValueError("convert needs a flat Sequential (nested Sequentials are not "
                             "supported: list their modules in one Sequential)")
    validate.check_choice(schedule, "schedule", ("layerwise", "published"))
    for name, v in (("epochs_per_layer", epochs_per_layer), ("finetune_epochs", finetune_epochs),
                    ("pretrain_epochs", pretrain_epochs)):
        validate.check_int(v, name, lo=0)
    batch_size = validate.check_int(batch_size, "batch_size", lo=1)
    lr = validate.check_float(lr, "lr", 0.0, lo_open=True)
    finetune_lr = lr / 5 if finetune_lr is None else validate.check_float(
        finetune_lr, "finetune_lr", 0.0, lo_open=True)
    init_rows = validate.check_int(init_rows, "init_rows", lo=16)
    distill = validate.check_float(distill, "distill", 0.0, 1.0)
    distill_temperature = validate.check_float(distill_temperature, "distill_temperature", 0.0,
                                               lo_open=True)
    noise = validate.check_float(noise, "noise", 0.0)
    pretrain_noise = validate.check_float(pretrain_noise, "pretrain_noise", 0.0)
    depth = check_depth(depth)
    validate.check_choice(lut_form, "lut_form", ("free", "factored"))
    column_orders = dict(column_orders or {})
    for k in column_orders:
        if not (isinstance(k, int) and 1 <= k <= len(positions)):
            raise ValueError(f"column_orders keys are converted-layer numbers 1..{len(positions)}"
                             f", got {k!r}")
    if ncodebooks is not None and codebook_dim != 8:
        raise ValueError("give ncodebooks or codebook_dim, not both")
    rng = validate.random_state(random_state)
    if validation is not None:
        Xv, yv = check_xy(model, *validation)
        Xv, yv = backend.like(Xv, X), backend.like(yv, X)
        evaluated_on = "validation"
    else:
        Xv, yv = X, y
        evaluated_on = "train"
    model.to(X)
    model.eval()
    with no_grad():
        _check_label_range(model(X[:2]).shape[1], y)
    if init_params is None:
        # refinement passes cost more than they give once DM trains the layer
        init_params = {"refine": 0}
    dm_params = {"tau": tau, "temperature": temperature, "init": init,
                 "init_params": init_params, "noise": noise, "depth": depth,
                 "lut_form": lut_form}
    settings = {"codebook_dim": codebook_dim, "ncodebooks": ncodebooks, "depth": depth,
                "lut_form": lut_form,
                "init": init,
                "epochs_per_layer": epochs_per_layer, "finetune_epochs": finetune_epochs,
                "batch_size": batch_size, "lr": lr, "finetune_lr": finetune_lr, "tau": tau,
                "temperature": temperature, "train_bn": train_bn, "distill": distill,
                "distill_temperature": distill_temperature, "noise": noise,
                "int8": int8, "fold": fold, "pretrain_noise": pretrain_noise,
                "schedule": schedule}
    report = ConversionReport(evaluated_on, settings)
    say = _say(verbose)
    t_start = time.perf_counter()
    mods = model.layers

    def log(row):
        acc = row["accuracy"]
        layer = "" if row["layer"] is None else f" {row['layer']} ({row['name']})"
        say(f"{row['stage']}{layer}: {evaluated_on} accuracy {100 * acc:.2f}%, "
            f"{row['seconds']:.1f} s")

    # 1. pretrain ------------------------------------------------------------
    if pretrain_epochs:
        t0 = time.perf_counter()
        model.train()
        opts = model.optimizers(pretrain_lr)
        forward = model if pretrain_noise == 0 else noisy_forward(
            model, pretrain_noise, rng.randint(2 ** 31), X)
        losses = train_loop(forward, opts, X, y, epochs=pretrain_epochs, batch_size=batch_size,
                            rng=rng, verbose=verbose, desc="pretrain")
        model.eval()
        log(report.add("pretrain", _accuracy_of(mods, Xv, yv), time.perf_counter() - t0,
                       time.perf_counter() - t_start, loss=losses[-1]))
    t0 = time.perf_counter()
    log(report.add("float", _accuracy_of(mods, Xv, yv), time.perf_counter() - t0,
                   time.perf_counter() - t_start))
    # training targets: labels, or labels mixed with the float model's predictions
    T = y if distill == 0 else soft_targets(_run(mods, X) / np.float32(distill_temperature), y,
                                            1.0 - distill)

    def use_dm(li, layer, inputs):
        layer.use("dm", inputs, ncodebooks=ncodebooks,
                  codebook_dim=None if ncodebooks is not None else codebook_dim,
                  max_fit_rows=init_rows, random_state=rng,
                  column_order=column_orders.get(li), **dm_params)

    # 2. layer by layer ------------------------------------------------------
    if schedule == "layerwise":
        H, Hv, prev = X, Xv, 0
        for li, pos in enumerate(positions, start=1):
            t0 = time.perf_counter()
            H = _run(mods[prev:pos], H)            # only the modules since the last stage
            Hv = _run(mods[prev:pos], Hv) if Xv is not X else H
            prev = pos
            layer = mods[pos]
            use_dm(li, layer, H)
            suffix = mods[pos:]
            bns = _bn_after(mods, [pos]) if train_bn else []
            losses = _train(model, [layer], bns, _chain(suffix), H, T, epochs_per_layer,
                            batch_size, lr, rng, verbose, f"layer {li}")
            acc = _accuracy_of(suffix, Hv, yv)
            log(report.add("layer", acc, time.perf_counter() - t0, time.perf_counter() - t_start,
                           layer=li, name=_describe(layer), loss=losses[-1] if losses else None))
    else:
        for li, pos in enumerate(positions, start=1):
            t0 = time.perf_counter()
            layer = mods[pos]
            use_dm(li, layer, _run(mods[:pos], X))     # no cache: the prefix reruns
            trained = [mods[p] for p in positions[:li]]
            bns = _bn_after(mods, positions[:li]) if train_bn else []
            losses = _train(model, trained, bns, _chain(mods), X, T, epochs_per_layer,
                            batch_size, lr, rng, verbose, f"layer {li}")
            acc = _accuracy_of(mods, Xv, yv)
            log(report.add("layer", acc, time.perf_counter() - t0, time.perf_counter() - t_start,
                           layer=li, name=_describe(layer), loss=losses[-1] if losses else None))

    # 3. finetune ------------------------------------------------------------
    if finetune_epochs:
        t0 = time.perf_counter()
        layers = [mods[p] for p in positions]
        bns = _bn_after(mods, positions) if train_bn else []
        losses = _train(model, layers, bns, _chain(mods), X, T, finetune_epochs, batch_size,
                        finetune_lr, rng, verbose, "finetune")
        log(report.add("finetune", _accuracy_of(mods, Xv, yv), time.perf_counter() - t0,
                       time.perf_counter() - t_start, loss=losses[-1] if losses else None))

    # 4. int8 (or float) hard LUTs ------------------------------------------
    t0 = time.perf_counter()
    for p in positions:
        mods[p].harden(quantize=int8)
    log(report.add("int8" if int8 else "hard", _accuracy_of(mods, Xv, yv),
                   time.perf_counter() - t0, time.perf_counter() - t_start))

    # 5. fold ----------------------------------------------------------------
    if fold:
        from .fold import fold as _fold
        t0 = time.perf_counter()
        folded = _fold(model)
        model.layers = folded.layers
        model.eval()
        log(report.add("folded", _accuracy_of(model.layers, Xv, yv), time.perf_counter() - t0,
                       time.perf_counter() - t_start))
    model.eval()
    return report


def _train(model, layers, bns, forward, X, y, epochs, batch_size, lr, rng, verbose, desc):
    """Train the DM parameters and biases of ``layers`` (+ BatchNorm affines ``bns``),
    everything else frozen, modules in evaluation mode (BatchNorm uses its running
    statistics, so what trains is what is evaluated)."""
    if not epochs:
        return []
    tensors = [t for layer in layers for t in _layer_tensors(layer)]
    tensors += [p for bn in bns for p in (bn.gamma, bn.beta)]
    model.eval()
    with _Trainable(model, tensors):
        opts = _optimizers(layers, bns, lr)
        return train_loop(forward, opts, X, y, epochs=epochs, batch_size=batch_size, rng=rng,
                          verbose=verbose, desc=desc)


def _say(verbose):
    if not verbose:
        return lambda msg: None
    try:
        from tqdm.auto import tqdm
        return tqdm.write
    except ImportError:  # pragma: no cover
        return print
