"""The conversion recipe: every default of a conversion, in one place.

:func:`nimbus.nn.convert` and ``python -m nimbus convert`` both read :data:`DEFAULT` (the
CLI's ``--quick`` reads :data:`QUICK`); a user overrides any field by keyword
(``nn.convert(model, X, y, depth=6)``) or passes a recipe of their own
(``nn.convert(model, X, y, recipe=nn.recipe.DEFAULT.replace(depth=6))``). The figures
behind the defaults are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..arrays import validate

__all__ = ["Recipe", "DEFAULT", "QUICK"]


@dataclass(frozen=True)
class Recipe:
    """How a trained network is converted to lookup tables (see :func:`nimbus.nn.convert`).

    Float model (the CLI trains it with these before converting)
    --------------------------------------------------------------
    float_epochs : int, epochs of the float model's training
    float_lr : float, its Adam step
    float_noise : float >= 0, input noise of every layer while the float model trains, in
        standard deviations of each input feature (robust to quantized inputs)

    Conversion (stages of :class:`nimbus.nn.convert.Conversion`)
    -------------------------------------------------------------
    method : registry name of the trainable strategy each layer trains as ("dm")
    codebook_dim : int, input dimensions per codebook: C = ceil(D / codebook_dim)
    ncodebooks : int or None, the same C for every layer instead
    depth : int in 1..10, tree depth: K = 2**depth LUT rows per codebook
    lut_form : "free", "factored" or "auto" (factored from depth 6: deep trees' free LUTs
        overfit)
    init : "auto", "joint" or "maddness": the tree learner the trainable layer starts from
    init_rows : int or None, rows of the cached inputs the initial trees are fitted on
        (None: 16384 from depth 9, else 8192)
    init_params : dict or None, extra hyperparameters of the initial tree learner (None:
        ``{"refine": 0}``, and leaves of at least 4 rows from depth 9)
    epochs_per_layer, finetune_epochs : int, DM epochs per layer (stage 2) and with every
        layer in DM (stage 3)
    batch_size : int; lr : float, relative Adam step; finetune_lr : float or None (lr / 5)
    tau, temperature : DM surrogate widths; noise : DM training-time input noise
    train_bn : bool, the BatchNorm right after a trained layer trains its affine too
    distill, distill_temperature : weight and temperature of the float model's predictions
        in the training targets
    pretrain_epochs, pretrain_lr, pretrain_noise : exact training inside convert first
    int8 : bool, 8-bit LUTs (stage 4); fold : bool, fold BatchNorm/ReLU (stage 5)
    schedule : "layerwise" (cached prefix, one trainable layer per stage) or "published"
    method_params_extra : dict or None, more hyperparameters of the trainable strategy
    """

    float_epochs: int = 25
    float_lr: float = 1e-3
    float_noise: float = 0.4
    method: str = "dm"
    codebook_dim: int = 4
    ncodebooks: int = None
    depth: int = 4
    lut_form: str = "auto"
    init: str = "auto"
    init_rows: int = None
    init_params: dict = field(default=None, hash=False, compare=True)
    epochs_per_layer: int = 3
    finetune_epochs: int = 12
    batch_size: int = 256
    lr: float = 1e-2
    finetune_lr: float = None
    tau: float = 0.3
    temperature: float = 1.0
    noise: float = 0.15
    train_bn: bool = True
    distill: float = 0.5
    distill_temperature: float = 1.0
    pretrain_epochs: int = 0
    pretrain_lr: float = 1e-3
    pretrain_noise: float = 0.0
    int8: bool = True
    fold: bool = True
    schedule: str = "layerwise"
    method_params_extra: dict = field(default=None, hash=False, compare=True)

    def replace(self, **changes):
        """A copy with ``changes`` (unknown names raise TypeError naming them)."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise TypeError(f"unknown recipe field(s) {', '.join(map(repr, bad))}; fields: "
                            f"{', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        return dataclasses.asdict(self)

    # ------------------------------------------------------------ derived
    def resolved(self):
        """A checked copy with every "auto"/None rule applied (the values a run uses)."""
        from ..strategies.base import check_depth
        r = self
        check_depth(r.depth)
        validate.check_choice(r.lut_form, "lut_form", ("auto", "free", "factored"))
        validate.check_choice(r.schedule, "schedule", ("layerwise", "published"))
        for name in ("epochs_per_layer", "finetune_epochs", "pretrain_epochs", "float_epochs"):
            validate.check_int(getattr(r, name), name, lo=0)
        validate.check_int(r.batch_size, "batch_size", lo=1)
        validate.check_int(r.codebook_dim, "codebook_dim", lo=1)
        validate.check_float(r.lr, "lr", 0.0, lo_open=True)
        validate.check_float(r.distill, "distill", 0.0, 1.0)
        validate.check_float(r.distill_temperature, "distill_temperature", 0.0, lo_open=True)
        for name in ("noise", "pretrain_noise", "float_noise"):
            validate.check_float(getattr(r, name), name, 0.0)
        if r.init_params is not None and not isinstance(r.init_params, dict):
            raise TypeError(f"init_params must be a dict or None, got {r.init_params!r}")
        changes = {}
        if r.lut_form == "auto":
            changes["lut_form"] = "factored" if r.depth >= 6 else "free"
        if r.finetune_lr is None:
            changes["finetune_lr"] = r.lr / 5
        else:
            validate.check_float(r.finetune_lr, "finetune_lr", 0.0, lo_open=True)
        if r.init_rows is None:
            changes["init_rows"] = 16384 if r.depth >= 9 else 8192
        else:
            validate.check_int(r.init_rows, "init_rows", lo=16)
        if r.init_params is None:
            # refinement passes cost more than they give once DM trains the layer; 512-1024
            # leaves per tree need leaves of a few rows (the default min_leaf is N / 500)
            changes["init_params"] = ({"refine": 0, "min_leaf": 4} if r.depth >= 9
                                      else {"refine": 0})
        return dataclasses.replace(r, **changes) if changes else r

    def method_params(self, cls):
        """Hyperparameters for the trainable strategy class ``cls`` (after :meth:`resolved`):
        those of the recipe's fields it takes (by its parameter names), then
        ``method_params_extra``."""
        ours = {"tau": self.tau, "temperature": self.temperature, "init": self.init,
                "init_params": self.init_params, "noise": self.noise, "depth": self.depth,
                "lut_form": self.lut_form}
        names = set(cls._param_names())
        params = {k: v for k, v in ours.items() if k in names}
        params.update(self.method_params_extra or {})
        return params


#: the recipe the README measures: ``nn.convert`` and ``python -m nimbus convert`` use it.
#: Trees of depth 4 (16 LUT rows, the MADDNESS K) over 4 input dimensions per codebook: the
#: fastest point of the measured frontier within 1.0 point of the float model on
#: Fashion-MNIST (0.94 lost on average over 4 runs; 8-bit LUTs the size of the float32
#: weights; benchmarks/RESULTS.md, "Operating point")
DEFAULT = Recipe()

#: ``python -m nimbus convert --quick`` (sklearn digits: a small MLP, shorter training)
QUICK = DEFAULT.replace(float_epochs=20, epochs_per_layer=4, finetune_epochs=6, batch_size=64)
