"""The compiled inference runtime: a converted network as a plan of steps, one call per batch.

``nimbus.nn.compile(model)`` turns a converted model (int8 LUTs, BatchNorm/ReLU folded) into a
:class:`CompiledModel`, called like the model: ``compiled(X)`` gives the logits (float32),
``compiled.predict(X)`` the class ids; NumPy in, NumPy out (Numba on the CPU); CuPy in,
CuPy out (a CUDA graph on the GPU). Its outputs are bitwise the model's (the LUT arithmetic is
integer; the float steps are the same float32 operations).

The plan is a list of steps, built once from the modules' ``inference_steps()``:

* runs of consecutive LUT layers become ONE kernel call (:func:`nimbus.arrays.kernels.chain`):
  on the CPU one Numba function over the whole run, rows in cache-sized blocks; on the GPU one
  kernel captured in a CUDA graph per batch size;
* a remaining float layer is one BLAS (cuBLAS) product, a ReLU or an unfolded affine map
  one array operation.

No autograd, no per-layer validation: the input is checked once at the entry (dtype, shape,
one finite check, made by the first kernel as it reads the rows: on the CPU a flag per task,
on the GPU a flag read with the one sync the call needs; ``check_finite="nan"`` makes the rows
that hold NaN or Inf NaN in the output instead, so a GPU call only queues work and still no
row's result is silently wrong; ``check_finite=False`` skips the check).

This module imports no training code (no autograd, optimizers, layers or strategies: a test
holds it to that); ``nimbus.save(compiled, path)`` writes only what inference needs (8-bit
LUTs, trees, scales, float weights of float layers), and ``nimbus.load`` reads it back with
NumPy and Numba (and CuPy on the GPU) alone.
"""
from __future__ import annotations

import numpy as np

from .. import io as _io
from ..arrays import backend, kernels, validate

__all__ = ["compile", "CompiledModel", "FORMAT_VERSION"]

#: version of the compiled artifact's layout (``nimbus.save(compiled)``)
FORMAT_VERSION = 1

# arrays of each step kind, in the order the plan keeps them
_STEP_ARRAYS = {"lut": ("dims", "thresholds", "lut", "scale", "bias"),
                "dense": ("weight", "bias"), "affine": ("a", "b"), "relu": (), "flatten": ()}
_LUT_KEYS = ("dims", "thresholds", "lut", "scale", "bias")


def compile(model):
    """The compiled inference plan of a converted model.

    Parameters
    ----------
    model : a nimbus.nn model (Sequential) after ``nn.convert(..., int8=True, fold=True)``:
        its Linear layers hold 8-bit LUT strategies (float Linear layers may remain; they run
        as BLAS calls), BatchNorm and ReLU are folded into them

    Returns
    -------
    CompiledModel

    Raises
    ------
    ValueError naming the missing step: not converted (no LUT layer), not int8 (a float or
    still trainable LUT), not folded (a BatchNorm or bias after a LUT layer, a ReLU before
    one); a module that has no compiled form (Conv2d).
    TypeError if ``model`` is not a nimbus.nn model.
    """
    if not hasattr(model, "inference_steps") or not hasattr(model, "modules"):
        raise TypeError(f"compile needs a converted nimbus.nn model, got {type(model).__name__}")
    try:
        steps = model.inference_steps()
    except ValueError as exc:
        raise ValueError(f"cannot compile this model: {exc}") from None
    _check_steps(steps)
    return CompiledModel(steps)


def _check_steps(steps):
    if not any(s["op"] == "lut" for s in steps):
        raise ValueError("the model is not converted: none of its layers holds a LUT strategy "
                         "(run nn.convert(model, X, y) first)")
    for i, s in enumerate(steps):
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        if s["op"] == "lut" and s.get("layer_bias") is not None:
            raise ValueError("the model is not folded: a LUT layer still adds its own bias "
                             "(run nn.fold(model), or nn.convert(..., fold=True))")
        if s["op"] == "lut" and nxt is not None and nxt["op"] == "affine":
            raise ValueError("the model is not folded: a BatchNorm follows a LUT layer "
                             "(run nn.fold(model), or nn.convert(..., fold=True))")
        if s["op"] == "relu":
            k = i + 1
            while k < len(steps) and steps[k]["op"] == "flatten":
                k += 1
            if k < len(steps) and steps[k]["op"] == "lut" and steps[k]["encoder"] == "tree":
                raise ValueError("the model is not folded: a ReLU comes before a LUT layer "
                                 "(run nn.fold(model), or nn.convert(..., fold=True))")
        if s["op"] == "lut" and s.get("encoder") != "tree":
            raise ValueError(f"the compiled runtime runs tree encoders; a layer has a "
                             f"{s.get('encoder')!r} encoder")


class CompiledModel:
    """A converted network as an inference plan (see the module docstring).

    Attributes
    ----------
    steps : list of dicts, ``{"op": "lut" | "dense" | "relu" | "affine" | "flatten", ...}``
        with the step's host arrays: "lut" ``dims`` (C, K-1) int32, ``thresholds`` (C, K-1)
        float32, ``lut`` (C, K, M) uint8, ``scale``, ``bias`` (M,) float32; "dense"
        ``weight`` (D, M) float32 and ``bias`` (M,) float32 or None; "affine" ``a``, ``b``
        (F,) float32
    n_features_in : int, D0; n_outputs : int
    """

    _nimbus_kind = "compiled"

    def __init__(self, steps):
        self.steps = [_host_step(s) for s in steps]
        first = self.steps[0]
        self.n_features_in = int(first["in"]) if "in" in first else None
        outs = [s["out"] for s in self.steps if "out" in s]
        self.n_outputs = int(outs[-1])
        # the plan: runs of LUT steps grouped, per library built on first use
        self._groups = _group(self.steps)
        self._plans = {}
        # array types whose float32 C-contiguous rows go straight to the plan (a device
        # array's type is added once one has passed _entry: CuPy is never imported here)
        self._ready_types = {np.ndarray}

    # ------------------------------------------------------------------ plan
    def _plan(self, X):
        """The plan for arrays of X's library and device (built on first use, then cached)."""
        where = backend.place(X)
        plan = self._plans.get(where)
        if plan is None:
            plan = []
            for kind, items in self._groups:
                if kind == "chain":
                    layers = [{k: s[k] for k in _LUT_KEYS} for s in items]
                    plan.append(("chain", kernels.chain(layers, int(items[0]["in"]), where[0])))
                else:
                    s = items[0]
                    arrays = {k: (None if s.get(k) is None else backend.like(s[k], X))
                              for k in _STEP_ARRAYS[s["op"]]}
                    plan.append((s["op"], arrays))
            self._plans[where] = plan
        return plan

    # --------------------------------------------------------------- calling
    def __call__(self, X, *, check_finite=True):
        """Logits of the rows of X.

        Parameters
        ----------
        X : (N, D0) array of real numbers, NumPy or CuPy; coerced to C-contiguous float32
            (CuPy float16 too)
        check_finite : True (default), "nan" or False. True: raise ValueError if X holds
            NaN or Inf; on the GPU the first kernel sets a flag that is read with the
            call's one sync. "nan": every logit of a row whose input holds NaN or Inf is
            NaN, the other rows are unchanged; found by the kernels as they read the rows,
            so a GPU call only queues work (no sync; as CuPy's own errors by default).
            False: nothing is checked and a GPU call only queues work (rows with NaN/Inf
            then give meaningless logits)

        Returns
        -------
        (N, n_outputs) float32 array of X's library (and device); a fresh array per call
        """
        if not (type(X) in self._ready_types and X.dtype == np.float32 and X.ndim == 2
                and X.flags.c_contiguous and X.shape[1] == self.n_features_in
                and X.shape[0] > 0):      # else the common case, checked in a few reads
            X = self._entry(X)
        mode = validate.finite_mode(check_finite)
        first = True
        for op, item in self._plan(X):
            if op == "chain":          # the kernels scan X for NaN/Inf as they read it
                # "nan": every chain marks its rows (NaN from a float step before it too)
                X = item(X, check_finite="nan" if mode == 2 else (mode == 1 and first))
            else:                      # float steps carry NaN rows through as NaN
                if mode == 1 and first:
                    _finite_or_raise(X)
                X = _apply(op, item, X)
            first = False
        return X

    def predict(self, X, *, check_finite=True):
        """Class ids ``argmax(compiled(X), axis=1)``: (N,) int64 array of X's library;
        with ``check_finite="nan"`` -1 for the rows whose input holds NaN or Inf."""
        Y = self(X, check_finite=check_finite)
        xp = backend.namespace(Y)
        ids = xp.argmax(Y, axis=1).astype(np.int64)
        if validate.finite_mode(check_finite) == 2:      # (no boolean indexing: no sync)
            ids = xp.where(xp.isnan(Y).any(axis=1), np.int64(-1), ids)
        return ids

    def _entry(self, X):
        if not backend.is_array(X):
            raise TypeError(f"X must be a NumPy or CuPy array, got {type(X).__name__}")
        if X.dtype.kind not in "iuf" or X.dtype.kind == "b":
            raise TypeError(f"X must hold real numbers, got dtype {X.dtype}")
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (rows, {self.n_features_in} features), got shape "
                             f"{tuple(X.shape)}")
        if X.shape[0] == 0:
            raise ValueError(f"X is empty (shape {tuple(X.shape)})")
        if self.n_features_in is not None and X.shape[1] != self.n_features_in:
            raise ValueError(f"X has {X.shape[1]} features per row; the model takes "
                             f"{self.n_features_in}")
        xp = backend.namespace(X)
        if X.dtype != np.float32 or not X.flags.c_contiguous:
            X = xp.ascontiguousarray(X, dtype=np.float32)
        if not isinstance(X, np.ndarray):     # (a NumPy subclass keeps taking this path)
            self._ready_types.add(type(X))
        return X

    # ----------------------------------------------------------------- sizes
    @property
    def nbytes(self):
        """Bytes of the plan's arrays (what the saved artifact holds, before zip)."""
        return int(sum(s[k].nbytes for s in self.steps for k in _STEP_ARRAYS[s["op"]]
                       if s.get(k) is not None))

    def __repr__(self):
        ops = ", ".join(s["op"] for s in self.steps)
        return (f"CompiledModel({self.n_features_in} -> {self.n_outputs}: {ops}; "
                f"{self.nbytes / 1e6:.2f} MB)")

    # ----------------------------------------------------------------- state
    def to_state(self):
        """(meta, arrays) for :func:`nimbus.save`: the steps' host arrays, nothing else."""
        arrays, metas = {}, []
        for i, s in enumerate(self.steps):
            names = [k for k in _STEP_ARRAYS[s["op"]] if s.get(k) is not None]
            for k in names:
                arrays[f"{i}/{k}"] = s[k]
            metas.append({"op": s["op"], "arrays": names,
                          **{k: s[k] for k in ("in", "out", "encoder", "features") if k in s}})
        return {"format_version": FORMAT_VERSION, "steps": metas}, arrays

    @classmethod
    def from_state(cls, meta, arrays):
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"this compiled model's format version is {version!r}; this nimbus "
                             f"reads version {FORMAT_VERSION}: compile the model again with this "
                             "version (nimbus.nn.compile)")
        steps = []
        for i, m in enumerate(meta["steps"]):
            op = m["op"]
            if op not in _STEP_ARRAYS:
                raise ValueError(f"unknown step {op!r} in a compiled model")
            s = {k: v for k, v in m.items() if k != "arrays"}
            for k in _STEP_ARRAYS[op]:
                s[k] = arrays[f"{i}/{k}"] if k in m["arrays"] else None
            steps.append(s)
        try:
            _check_steps(steps)
            return cls(steps)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed compiled model ({exc!r})") from None


_DTYPES = {"dims": np.int32, "thresholds": np.float32, "lut": np.uint8, "scale": np.float32,
           "bias": np.float32, "weight": np.float32, "a": np.float32, "b": np.float32}


def _host_step(s):
    out = dict(s)
    for k in _STEP_ARRAYS.get(s["op"], ()):
        v = s.get(k)
        if v is not None:
            out[k] = np.ascontiguousarray(backend.to_host(v), dtype=_DTYPES[k])
    return out


def _group(steps):
    """Consecutive LUT steps as one ("chain", [steps]) group; every other step alone."""
    groups = []
    for s in steps:
        if s["op"] == "lut" and groups and groups[-1][0] == "chain":
            groups[-1][1].append(s)
        elif s["op"] == "lut":
            groups.append(("chain", [s]))
        else:
            groups.append((s["op"], [s]))
    return groups


def _apply(op, a, X):
    xp = backend.namespace(X)
    if op == "dense":
        Y = X @ a["weight"]
        return Y if a["bias"] is None else Y + a["bias"]
    if op == "relu":
        return xp.maximum(X, np.float32(0))
    if op == "affine":
        return (X * a["a"] + a["b"]).astype(np.float32, copy=False)
    return X.reshape(X.shape[0], -1)                    # flatten


def _finite_or_raise(X):
    # one pass: the sum of finite float32 values is finite unless it overflows, and only
    # then (values near 1e38) does the exact check run
    xp = backend.namespace(X)
    with np.errstate(over="ignore", invalid="ignore"):
        total = X.sum(dtype=np.float32)
    if not bool(xp.isfinite(total)):
        if not bool(xp.isfinite(X).all()):
            raise ValueError("X holds NaN or Inf")


_io.register_loader("compiled", CompiledModel.from_state)
