"""The conversion pipeline: a trained network -> lookup tables, layer by layer.

:func:`convert` runs the named stages of :class:`Conversion` (pretrain, layers, finetune,
int8, fold) as the recipe (:mod:`nimbus.nn.recipe`) configures them; each stage is a method
a user can also call alone. See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import time

import numpy as np

from ..arrays import backend, validate
from ..arrays.autograd import Tensor, no_grad
from ..table import Table
from .layers import BatchNorm, NimbusLayer, Sequential
from .train import _check_label_range, check_xy, noisy_forward, soft_targets, train_loop

__all__ = ["convert", "Conversion", "ConversionReport"]


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
        if m.strategy is not None:
            ts += m.strategy.parameters()
    elif isinstance(m, BatchNorm):
        ts = [m.gamma, m.beta]
    return [t for t in ts if t is not None]


def _layer_tensors(layer):
    ts = [layer.weight] if layer.strategy is None else list(layer.strategy.parameters())
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
def convert(model, X, y, *, recipe=None, column_orders=None, validation=None, random_state=None,
            verbose=False, **overrides):
    """Convert every Linear/Conv2d layer of a trained model to lookup tables.

    The pipeline of :class:`Conversion`'s named stages: ``pretrain`` (when
    ``pretrain_epochs``), ``layers`` (layer-wise training of the trainable strategy),
    ``finetune`` (when ``finetune_epochs``), ``int8`` and ``fold`` (when ``fold``).

    Parameters
    ----------
    model : Sequential whose Linear/Conv2d layers are direct children (trained,
        unless ``pretrain_epochs`` > 0). Modified in place.
    X : (N, ...) array of real numbers (NumPy or CuPy); y : (N,) int labels
    recipe : :class:`nimbus.nn.recipe.Recipe`, default :data:`nimbus.nn.recipe.DEFAULT`
        (the recipe the README measures and the CLI uses)
    **overrides : any recipe field, e.g. ``depth=6, codebook_dim=4, finetune_epochs=0,
        int8=False, fold=False`` (see :class:`~nimbus.nn.recipe.Recipe` for all of them)
    column_orders : optional dict {converted-layer number (1-based): permutation of
        that layer's input columns}: which columns each codebook sees (e.g.
        :func:`nimbus.strategies.dm.patch_order` for image patches)
    validation : optional (X_val, y_val) for the reported accuracies
    random_state : None, int or RandomState
    verbose : progress bars and a line per stage

    Returns
    -------
    ConversionReport (text and HTML tables; ``.plot()``)

    Raises
    ------
    ValueError if the model has no Linear/Conv2d layer, is not a Sequential of
    modules, or X/y are malformed (shapes, labels out of range); TypeError for an
    unknown recipe field.
    """
    conv = Conversion(model, X, y, recipe=recipe, column_orders=column_orders,
                      validation=validation, random_state=random_state, verbose=verbose,
                      **overrides)
    return conv.run()


class Conversion:
    """One conversion, stage by stage: each stage is a method a user may call alone
    (in this order), each adds rows to :attr:`report`.

    ``Conversion(model, X, y, ...)`` takes the arguments of :func:`convert` and checks
    them; :meth:`run` runs the stages the recipe asks for:

    1. :meth:`pretrain`: (optional) train the float model with exact layers;
    2. :meth:`layers`: for every Linear/Conv2d layer l = 1..L in order, the modules
       before l run ONCE, in evaluation mode and fast hard mode, over the training set
       (and the validation set), and their output is cached; only the modules between
       layer l-1 and layer l run, on the previous cache, so a stage costs the same
       however many layers are already converted. Layer l switches to the recipe's
       trainable strategy (DM, initialised from joint bucketing or MADDNESS trees on
       its cached inputs, C = ceil(D / codebook_dim)) and trains; the modules after it
       run exact with frozen weights, passing gradients (the affine parameters of the
       BatchNorm right after l train too when ``train_bn``). ``schedule="published"``
       runs Stella Nera's schedule instead: no cache, every converted layer keeps
       training at every later stage (cost quadratic in depth);
    3. :meth:`finetune`: every converted layer trainable, briefly, at a smaller step;
    4. :meth:`int8`: every layer hardened, LUTs quantized to 8 bits (exact integer sums);
    5. :meth:`fold`: BatchNorm after a layer folded into its LUT columns, ReLU before a
       layer into its thresholds (see :mod:`nimbus.nn.fold`).

    Everything runs where X lives (NumPy or CuPy): the model is moved there first.
    """

    def __init__(self, model, X, y, *, recipe=None, column_orders=None, validation=None,
                 random_state=None, verbose=False, **overrides):
        from . import recipe as _recipe
        if not isinstance(model, Sequential):
            raise TypeError(f"convert needs a nimbus.nn.Sequential model, got "
                            f"{type(model).__name__}")
        r = _recipe.DEFAULT if recipe is None else recipe
        if not isinstance(r, _recipe.Recipe):
            raise TypeError(f"recipe must be a nimbus.nn.recipe.Recipe, got {type(r).__name__}")
        self.recipe = r = r.replace(**overrides).resolved()
        X, y = check_xy(model, X, y)
        self.positions = [i for i, m in enumerate(model.layers) if isinstance(m, NimbusLayer)]
        if not self.positions:
            raise ValueError("the model has no Linear or Conv2d layer to convert")
        for m in model.layers:
            if isinstance(m, Sequential):
                raise ValueError("convert needs a flat Sequential (nested Sequentials are not "
                                 "supported: list their modules in one Sequential)")
        from ..strategies import REGISTRY
        if r.method not in REGISTRY or not REGISTRY[r.method].trainable:
            raise ValueError(f"recipe method {r.method!r} is not a registered trainable strategy; "
                             f"trainable: {sorted(k for k, c in REGISTRY.items() if c.trainable)}")
        self.method_params = r.method_params(REGISTRY[r.method])
        self.column_orders = dict(column_orders or {})
        for k in self.column_orders:
            if not (isinstance(k, int) and 1 <= k <= len(self.positions)):
                raise ValueError(f"column_orders keys are converted-layer numbers "
                                 f"1..{len(self.positions)}, got {k!r}")
        if overrides.get("ncodebooks") is not None and overrides.get("codebook_dim") is not None:
            raise ValueError("give ncodebooks or codebook_dim, not both")
        self.rng = validate.random_state(random_state)
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
        self.model, self.X, self.y, self.Xv, self.yv = model, X, y, Xv, yv
        self.verbose = verbose
        self.report = ConversionReport(evaluated_on, r.as_dict())
        self._say = _say(verbose)
        self._t_start = time.perf_counter()
        self._targets = None

    # ----------------------------------------------------------- plumbing
    @property
    def mods(self):
        return self.model.layers

    def _log(self, stage, t0, modules=None, X=None, layer=None, name=None, loss=None):
        acc = _accuracy_of(self.mods if modules is None else modules,
                           self.Xv if X is None else X, self.yv)
        now = time.perf_counter()
        row = self.report.add(stage, acc, now - t0, now - self._t_start, layer=layer, name=name,
                              loss=loss)
        where = "" if layer is None else f" {layer} ({name})"
        self._say(f"{stage}{where}: {self.report.evaluated_on} accuracy {100 * acc:.2f}%, "
                  f"{row['seconds']:.1f} s")
        return row

    def targets(self):
        """Training targets: labels, or labels mixed with the float model's predictions
        (made once, by the model as it is when first asked: the float model)."""
        r = self.recipe
        if self._targets is None:
            self._targets = self.y if r.distill == 0 else soft_targets(
                _run(self.mods, self.X) / np.float32(r.distill_temperature), self.y,
                1.0 - r.distill)
        return self._targets

    def _use_trainable(self, li, layer, inputs):
        r = self.recipe
        params = dict(self.method_params)
        if li in self.column_orders:
            params["column_order"] = self.column_orders[li]
        layer.use(r.method, inputs, ncodebooks=r.ncodebooks,
                  codebook_dim=None if r.ncodebooks is not None else r.codebook_dim,
                  max_fit_rows=r.init_rows, random_state=self.rng, **params)

    def _train(self, layers, bns, forward, X, epochs, lr, desc):
        r = self.recipe
        return _train(self.model, layers, bns, forward, X, self.targets(), epochs, r.batch_size,
                      lr, self.rng, self.verbose, desc)

    # ------------------------------------------------------------- stages
    def pretrain(self):
        """Stage 1: exact training of the float model (``pretrain_epochs``)."""
        r, model = self.recipe, self.model
        t0 = time.perf_counter()
        model.train()
        opts = model.optimizers(r.pretrain_lr)
        forward = model if r.pretrain_noise == 0 else noisy_forward(
            model, r.pretrain_noise, self.rng.randint(2 ** 31), self.X)
        losses = train_loop(forward, opts, self.X, self.y, epochs=r.pretrain_epochs,
                            batch_size=r.batch_size, rng=self.rng, verbose=self.verbose,
                            desc="pretrain")
        model.eval()
        self._log("pretrain", t0, loss=losses[-1] if losses else None)

    def evaluate_float(self):
        """The float model's accuracy (the report's reference row)."""
        self._log("float", time.perf_counter())

    def layers(self):
        """Stage 2: every layer, in order, switched to the trainable strategy and trained."""
        r, mods, positions = self.recipe, self.mods, self.positions
        self.targets()
        if r.schedule == "layerwise":
            H, Hv, prev = self.X, self.Xv, 0
            for li, pos in enumerate(positions, start=1):
                t0 = time.perf_counter()
                H = _run(mods[prev:pos], H)            # only the modules since the last stage
                Hv = _run(mods[prev:pos], Hv) if self.Xv is not self.X else H
                prev = pos
                layer = mods[pos]
                self._use_trainable(li, layer, H)
                suffix = mods[pos:]
                bns = _bn_after(mods, [pos]) if r.train_bn else []
                losses = self._train([layer], bns, _chain(suffix), H, r.epochs_per_layer, r.lr,
                                     f"layer {li}")
                self._log("layer", t0, modules=suffix, X=Hv, layer=li, name=_describe(layer),
                          loss=losses[-1] if losses else None)
        else:
            for li, pos in enumerate(positions, start=1):
                t0 = time.perf_counter()
                layer = mods[pos]
                self._use_trainable(li, layer, _run(mods[:pos], self.X))  # no cache: reruns
                trained = [mods[p] for p in positions[:li]]
                bns = _bn_after(mods, positions[:li]) if r.train_bn else []
                losses = self._train(trained, bns, _chain(mods), self.X, r.epochs_per_layer,
                                     r.lr, f"layer {li}")
                self._log("layer", t0, layer=li, name=_describe(layer),
                          loss=losses[-1] if losses else None)

    def finetune(self):
        """Stage 3: every converted layer trains at once (``finetune_epochs``, ``finetune_lr``)."""
        r, mods = self.recipe, self.mods
        t0 = time.perf_counter()
        layers = [mods[p] for p in self.positions]
        bns = _bn_after(mods, self.positions) if r.train_bn else []
        losses = self._train(layers, bns, _chain(mods), self.X, r.finetune_epochs,
                             r.finetune_lr, "finetune")
        self._log("finetune", t0, loss=losses[-1] if losses else None)

    def int8(self):
        """Stage 4: hard LUTs, 8-bit when the recipe's ``int8`` (else float)."""
        t0 = time.perf_counter()
        for p in self.positions:
            self.mods[p].harden(quantize=self.recipe.int8)
        self._log("int8" if self.recipe.int8 else "hard", t0)

    def fold(self):
        """Stage 5: BatchNorm and ReLU folded into the LUT layers (the model's modules
        are replaced by the folded chain)."""
        from .fold import fold as _fold
        t0 = time.perf_counter()
        folded = _fold(self.model)
        self.model.layers = folded.layers
        self.model.eval()
        self._log("folded", t0)

    def run(self):
        """The stages the recipe asks for, in order; returns the :class:`ConversionReport`."""
        r = self.recipe
        if r.pretrain_epochs:
            self.pretrain()
        self.evaluate_float()
        self.layers()
        if r.finetune_epochs:
            self.finetune()
        self.int8()
        if r.fold:
            self.fold()
        self.model.eval()
        return self.report


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
