"""The public functions: amm, fit, compare. Thin: a name -> strategy registry."""
from __future__ import annotations

import time

import numpy as np

from ._progress import progress_bar
from ._timing import time_call
from .arrays import backend, validate
from .metrics import nmse
from .strategies import REGISTRY, make
from .table import Table


def _strategy(method, ncodebooks, params):
    if not isinstance(method, str) or method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[method]
    allowed = cls._param_names()
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise ValueError(f"method {method!r} has no parameter(s) {', '.join(unknown)}; "
                         f"its parameters: {', '.join(allowed)}")
    return make(method, ncodebooks=ncodebooks, **params)


def fit(A_train, B, method="maddness", ncodebooks=16, **params):
    """Learn an approximate product ``A @ B`` for new rows A.

    Parameters
    ----------
    A_train : (N, D) array (NumPy or CuPy) of real numbers, coerced to float32;
        rows like those the op will see (N >= 16).
    B : (D, M) array; moved to A_train's library if it is in the other one.
    method : "exact", "pq", "maddness", "joint" or "dm"
    ncodebooks : int, C (1 <= C <= D); ignored by "exact"
    **params : hyperparameters of the method (e.g. ``random_state``, ``split``)

    Returns
    -------
    op : fitted Strategy; ``op(A)`` gives the (N', M) float32 approximation of
        ``A @ B`` in A's library.
    """
    op = _strategy(method, ncodebooks, params)
    B = validate.as_matrix(B, "B")
    A_train = validate.as_matrix(A_train, "A_train")
    return op.fit(A_train, backend.like(B, A_train))


def amm(A, B, method="maddness", ncodebooks=16, train=None, **params):
    """Approximate ``A @ B`` with lookup tables.

    Fits on ``train`` (default: A itself) and applies to A.

    Parameters
    ----------
    A : (N, D) array of real numbers (NumPy or CuPy), coerced to float32
    B : (D, M) array
    train : (N', D) array, optional, rows to learn from
    method, ncodebooks, **params : as in :func:`fit`

    Returns
    -------
    Y : (N, M) float32 array of A's library and device
    """
    op = fit(A if train is None else train, B, method, ncodebooks, **params)
    return op(A)


def compare(A_train, A_test, B, methods=("exact", "pq", "maddness", "joint"),
            ncodebooks=(8, 16, 32), *, repeat=3, verbose=False, **params):
    """Fit each method at each C on A_train and measure it on A_test.

    Parameters
    ----------
    A_train : (N, D), A_test : (N', D), B : (D, M) arrays of real numbers (NumPy or
        CuPy; coerced to float32; A_test and B are moved to A_train's library)
    methods : method name or sequence of distinct names ("exact", "pq", "maddness",
        "joint", "dm"); "exact" gives one row (no C)
    ncodebooks : int or sequence of int; values above D are skipped
    repeat : int >= 1, timed repetitions of the apply, at least (median reported); a fast
        apply is repeated until the runs take about 20 ms in all (at most 1000 runs)
    verbose : bool, progress bar over the (method, C) fits
    **params : passed to each method that takes them (e.g. ``random_state=0``,
        ``split="node"``); a parameter no method takes is an error

    Returns
    -------
    Table with one row per (method, C): ``method``, ``C`` (None for "exact"),
    ``nmse`` (test, ``mean((Y - Y_hat)**2) / var(Y)`` with ``Y = A_test @ B``),
    ``fit_s`` (seconds to fit, LUT included), ``apply_s`` (median seconds of
    encode + lookup of A_test), ``lut_bytes`` (LUT size at inference; B for "exact"),
    ``chose`` (for "joint": "joint" or "maddness", the fit it kept, its ``choice_``:
    with fewer than 1024 training rows it checks its fit against MADDNESS by
    leave-one-out errors; None for the other methods).
    Its text repr is an aligned table, ``_repr_html_`` an HTML table;
    :func:`nimbus.plotting.plot_tradeoff` draws it.
    """
    A_train = validate.as_matrix(A_train, "A_train")
    A_test = validate.as_matrix(A_test, "A_test")
    B = backend.like(validate.as_matrix(B, "B"), A_train)
    A_test = backend.like(A_test, A_train)
    validate.check_inner(A_train, B, "A_train")
    validate.check_inner(A_test, B, "A_test")
    repeat = validate.check_int(repeat, "repeat", lo=1)
    if isinstance(methods, str):
        methods = [methods]
    try:
        methods = list(methods)
    except TypeError:
        raise TypeError(f"methods must be a method name or a sequence of names, "
                        f"got {type(methods).__name__}") from None
    if not methods:
        raise ValueError("methods is empty; give at least one of "
                         f"{', '.join(sorted(REGISTRY))}")
    for m in methods:
        if not isinstance(m, str) or m not in REGISTRY:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(sorted(REGISTRY))}")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise ValueError(f"method(s) listed twice: {', '.join(dup)}")
    Cs = [ncodebooks] if isinstance(ncodebooks, (int, np.integer)) else list(ncodebooks)
    Cs = [validate.check_int(c, "ncodebooks", lo=1) for c in Cs]
    taken = set()
    for m in methods:
        taken.update(REGISTRY[m]._param_names())
    unused = [k for k in params if k not in taken]
    if unused:
        raise ValueError(f"no method takes parameter(s) {', '.join(unused)}")
    D = A_train.shape[1]
    jobs = [(m, None) if m == "exact" else (m, c) for m in methods
            for c in (Cs if m != "exact" else [None]) if c is None or c <= D]
    if not jobs:
        raise ValueError(f"every ncodebooks value {Cs} is larger than D={D} (the number of "
                         "columns): nothing to compare")
    Y = A_test @ B
    rows = []
    with progress_bar(len(jobs), "compare", verbose) as bar:
        for m, C in jobs:
            bar.set_postfix_str(f"fitting {m} C={C}")
            kw = {k: v for k, v in params.items() if k in REGISTRY[m]._param_names()}
            t0 = time.perf_counter()
            op = make(m, ncodebooks=C, **kw).fit(A_train, B)
            backend.synchronize(getattr(op, "lut_", None), getattr(op, "B_", None))
            fit_s = time.perf_counter() - t0
            apply_s, Y_hat = time_call(op, A_test, repeat=repeat)
            rows.append({"method": m, "C": C, "nmse": nmse(Y, Y_hat), "fit_s": fit_s,
                         "apply_s": apply_s, "lut_bytes": op.lut_bytes,
                         "chose": getattr(op, "choice_", None)})
            bar.update()
    return Table(rows, ["method", "C", "nmse", "fit_s", "apply_s", "lut_bytes", "chose"],
                 title=f"test NMSE and times: train {tuple(A_train.shape)}, test "
                       f"{tuple(A_test.shape)}, B {tuple(B.shape)}")
