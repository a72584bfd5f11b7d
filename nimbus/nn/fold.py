"""Folding BatchNorm and ReLU into converted layers: a chain of encode + lookup.

Rules (all exact up to float32 rounding of the folded numbers):

* a BatchNorm right after a LUT layer is a per-column affine map ``y * a + b``
  (evaluation mode): it folds into the LUT's columns. With an 8-bit LUT
  (``Y = isum * scale + bias``) the per-column ``scale`` and ``bias`` become
  ``scale * a`` and ``(bias + layer_bias) * a + b``; with a float LUT every entry is
  scaled by ``a`` and ``layer_bias * a + b`` is added to codebook 0's rows;
* a ReLU before a LUT layer (possibly with a Flatten in between: both act
  elementwise) folds into that layer's thresholds: ``relu(x) > t`` equals ``x > t``
  for ``t >= 0`` and is always true for ``t < 0``, so such thresholds become -inf;
  zero padding of a convolution is unaffected (relu(0) = 0);
* a BatchNorm after an exact layer folds into its weights and bias (standard).

What is NOT folded, and stays as its own op: a BatchNorm that does not directly
follow a layer (e.g. one on the model's input, or after a ReLU). Its map
``a x + b > t`` would become ``x > (t - b) / a``, with the comparison flipping
for ``a < 0`` and a rounding of ``(t - b) / a`` that can send a row the other way
at a tie, so it would not give the same outputs; a ReLU with no LUT layer after
it (e.g. the last op) also stays.
"""
from __future__ import annotations

import numpy as np

from ..arrays import backend
from .layers import BatchNorm, Flatten, NimbusLayer, ReLU, Sequential

__all__ = ["fold"]


def _copy_layer(layer, like):
    """A fresh copy of a NimbusLayer (same class and config) holding a copied strategy."""
    new = type(layer)._build(layer._config(), [])
    new._set_arrays({k: (None if v is None else backend.like(np.array(backend.to_host(v)), like))
                     for k, v in layer._arrays().items()})
    if layer.weight is None:
        new.weight = None
    if layer.bias is None:
        new.bias = None
    new.strategy = None if layer.strategy is None else layer.strategy.copy(like)
    new.training = False
    return new


def _has_lut(layer):
    s = layer.strategy
    return s is not None and s.folds_output_affine


def _has_trees(layer):
    return _has_lut(layer) and layer.strategy.folds_input_relu


def _fold_affine_into_lut(layer, a, b):
    """Compose the layer's output (bias included) with the per-column map ``y * a + b``."""
    layer.strategy.absorb_output_affine(a, b, None if layer.bias is None else layer.bias.data)
    layer.bias = None


def _fold_relu_into_thresholds(layer):
    layer.strategy.absorb_input_relu()


def _fold_bn_into_weights(layer, a, b):
    w = layer.weight.data
    a = backend.like(a, w)
    b = backend.like(b, w)
    layer.weight.data = (w * a[None, :]).astype(np.float32)
    if layer.bias is None:
        from ..arrays.autograd import Tensor
        layer.bias = Tensor(b.astype(np.float32), requires_grad=True)
    else:
        layer.bias.data = (layer.bias.data * a + b).astype(np.float32)


def _copy_plain(m, like):
    """Copy of a module without a strategy (BatchNorm, ReLU, Flatten, ...)."""
    new = type(m)._build(m._config(), [])
    new._set_arrays({k: (None if v is None else backend.like(np.array(backend.to_host(v)), like))
                     for k, v in m._arrays().items()})
    new.training = False
    return new


def fold(model):
    """A folded copy of a converted model (the model itself is left unchanged).

    Parameters
    ----------
    model : Sequential; its LUT layers may hold any LUT strategy (a trainable one is
        hardened first: DM to a float-LUT MADDNESS); exact layers are allowed

    Returns
    -------
    Sequential in evaluation mode: its LUT layers carry the BatchNorms after them
    in their LUT columns and the ReLUs before them in their thresholds; every
    folded LUT layer has no weight (its LUT no longer equals ``prototypes @ B``)
    and no separate bias. See the module docstring for what stays unfolded.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"fold needs a Sequential model, got {type(model).__name__}")
    for m in model.layers:
        if isinstance(m, Sequential):
            raise ValueError("fold needs a flat Sequential (no nested Sequential)")
    like = next(iter(model._arrays_in_use()), np.empty(0))
    mods = []
    for m in model.layers:
        if isinstance(m, NimbusLayer):
            layer = _copy_layer(m, like)
            if layer.strategy is not None:
                layer.strategy = layer.strategy.harden()     # a trainable one: its hard form
            mods.append(layer)
        else:
            mods.append(_copy_plain(m, like))
    relu_into = set()          # indices of LUT layers that absorb the ReLU before them
    out = []
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, ReLU):
            k = i + 1
            while k < len(mods) and isinstance(mods[k], Flatten):
                k += 1             # elementwise ops commute with a reshape
            if k < len(mods) and isinstance(mods[k], NimbusLayer) and _has_trees(mods[k]):
                relu_into.add(k)
            else:
                out.append(m)
            i += 1
            continue
        if isinstance(m, NimbusLayer):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if _has_lut(m):
                if i in relu_into:
                    _fold_relu_into_thresholds(m)
                if isinstance(nxt, BatchNorm):
                    _fold_affine_into_lut(m, *nxt.affine())
                    i += 1
                elif m.bias is not None:
                    ones = backend.namespace(m.bias.data).ones(m.out_features, np.float32)
                    _fold_affine_into_lut(m, ones, ones * 0)
                m.weight = None
            elif m.strategy is None and isinstance(nxt, BatchNorm):
                _fold_bn_into_weights(m, *nxt.affine())
                i += 1
            out.append(m)
            i += 1
            continue
        out.append(m)
        i += 1
    folded = Sequential(*out)
    folded.eval()
    return folded
