"""Input checks that raise ``ValueError``/``TypeError`` naming what was wrong.

Coercion rules (documented in the README and in every public docstring):

* real numbers (float64, float16, any integer type such as uint8 pixels) become
  contiguous float32; non-contiguous arrays become contiguous copies;
* bool, complex, strings and objects raise ``TypeError``;
* NaN/Inf, wrong number of dimensions, empty arrays raise ``ValueError``;
* codes must be ``uint8`` with values below the number of buckets.

Nothing here uses ``assert``: these are user-facing checks.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import backend

__all__ = [
    "as_matrix", "as_codes", "as_labels", "check_inner", "check_int",
    "check_float", "check_choice", "random_state", "finite_or_raise",
]

_REAL_KINDS = "iuf"


def _as_array(x, name):
    """``x`` as a NumPy or CuPy array; array-likes (lists) go through NumPy."""
    if isinstance(x, np.ndarray) or backend.is_cupy(x):
        return x
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a 2-D array of real numbers, got {type(x).__name__}")
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged nested lists and the like
        raise TypeError(f"{name} could not be read as an array ({exc})") from None
    return arr


def _check_dtype(arr, name):
    kind = arr.dtype.kind
    if kind == "b":
        raise TypeError(f"{name} has dtype bool; give real numbers (cast with .astype(np.float32) "
                        "if 0/1 values are meant)")
    if kind == "c":
        raise TypeError(f"{name} has complex dtype {arr.dtype}; only real numbers are supported")
    if kind not in _REAL_KINDS:
        raise TypeError(f"{name} has dtype {arr.dtype}; expected real numbers (float or integer)")


def finite_or_raise(arr, name):
    """Raise ``ValueError`` if ``arr`` holds NaN or Inf, naming the first bad entry."""
    xp = backend.namespace(arr)
    ok = xp.isfinite(arr)
    if not bool(ok.all()):
        bad = xp.argwhere(~ok)
        n_bad = int(bad.shape[0])
        first = tuple(int(i) for i in backend.to_host(bad[0]))
        value = float(arr[first])
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or Inf, or a number "
                         f"too large for float32); first at index {first}: {value}")


def as_matrix(x, name="A", *, min_rows=1, dtype=np.float32, allow_half=False,
              check_finite=True):
    """``x`` as a C-contiguous 2-D float32 array of the same library.

    Parameters
    ----------
    x : array-like, shape (N, D)
        NumPy or CuPy array (or a nested list, read by NumPy) of real numbers.
    name : str
        Used in error messages.
    min_rows : int
        Fewest rows accepted (e.g. the number of buckets when fitting).
    allow_half : bool
        Keep float16 as float16 (the GPU kernels read it natively) instead of
        widening it to float32.
    check_finite : bool
        Raise on NaN/Inf (False only where a kernel checks in its own pass over
        the data, as the encoders do).

    Returns
    -------
    ndarray, shape (N, D), float32 (or float16 when ``allow_half`` and the input is)
    """
    arr = _as_array(x, name)
    _check_dtype(arr, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x columns), got shape {tuple(arr.shape)}")
    n, d = arr.shape
    if n == 0 or d == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)})")
    if n < min_rows:
        raise ValueError(f"{name} has {n} row(s); at least {min_rows} are needed")
    xp = backend.namespace(arr)
    target = arr.dtype if (allow_half and arr.dtype == np.float16) else dtype
    with np.errstate(over="ignore", invalid="ignore"):   # overflow is reported just below
        out = xp.ascontiguousarray(arr, dtype=target)
    if check_finite:
        finite_or_raise(out, name)
    return out


def as_codes(codes, ncodebooks, nbuckets=16, name="codes"):
    """Check a code matrix: 2-D of shape (N, ncodebooks), values < nbuckets, dtype uint8
    (uint16 where nbuckets > 256: trees deeper than 8).

    Returns
    -------
    ndarray, shape (N, ncodebooks), uint8 or uint16, C-contiguous, same library as ``codes``
    """
    arr = _as_array(codes, name)
    from .kernels.reference import code_dtype      # here: reference imports this module
    want = code_dtype(nbuckets)
    if arr.dtype != want:
        raise TypeError(f"{name} must have dtype {np.dtype(want).name} ({nbuckets} buckets), "
                        f"got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != ncodebooks:
        raise ValueError(f"{name} must have shape (N, {ncodebooks}), got {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)})")
    top = int(arr.max())
    if top >= nbuckets:
        raise ValueError(f"{name} holds bucket {top}, but there are only {nbuckets} buckets "
                         f"(0..{nbuckets - 1})")
    xp = backend.namespace(arr)
    return xp.ascontiguousarray(arr)


def as_labels(y, n, name="y"):
    """Class labels as a 1-D int64 array of length ``n`` (same library as ``y``)."""
    arr = _as_array(y, name)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per row), got shape "
                         f"{tuple(arr.shape)}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and bool((arr == arr.astype(np.int64)).all()):
            pass  # integral floats are accepted as labels
        else:
            raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    if n and int(out.min()) < 0:
        raise ValueError(f"{name} holds a negative class label ({int(out.min())})")
    return out


def check_inner(A, B, a_name="A", b_name="B"):
    """Raise ``ValueError`` unless ``A @ B`` is defined (A: (N, D), B: (D, M))."""
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"inner dimensions differ: {a_name} has {A.shape[1]} columns but "
                         f"{b_name} has {B.shape[0]} rows ({a_name} {tuple(A.shape)}, "
                         f"{b_name} {tuple(B.shape)})")


def check_int(value, name, lo=None, hi=None):
    """``value`` as an int within [lo, hi]; bools and non-integers raise ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be at most {hi}, got {value}")
    return value


def check_float(value, name, lo=None, hi=None, *, lo_open=False):
    """``value`` as a finite float within [lo, hi] (``lo_open``: strictly above lo)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'above' if lo_open else 'at least'} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be at most {hi}, got {value}")
    return value


def check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def random_state(seed):
    """A ``numpy.random.RandomState`` from None, an int, or a RandomState.

    Randomness is always drawn on the host so that NumPy and CuPy fits from the
    same seed make the same choices.
    """
    if seed is None or seed is np.random:
        return np.random.mtrand._rand
    if isinstance(seed, np.random.RandomState):
        return seed
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return np.random.RandomState(int(seed))
    raise TypeError(f"random_state must be None, an int or a numpy RandomState, got {seed!r}")
