"""Input checks that raise ``ValueError``/``TypeError`` naming what was wrong.

Coercion rules (documented in the README and in every public docstring):

* real numbers (float64, float16, any integer type such as uint8 pixels) become
  contiguous float32; non-contiguous arrays become contiguous copies;
* bool, complex, strings and objects raise ``TypeError``;
* NaN/Inf, wrong number of dimensions, empty arrays raise ``ValueError``;
* codes must be ``uint8`` (``uint16`` beyond 256 buckets) with values below the number
  of buckets; trees of depth d in 1..10 have dims/thresholds of width 2**d - 1 and
  LUTs (C, K, M) have 1 <= K <= 1024 (:func:`tree_depth`, :func:`lut_buckets`).

Nothing here uses ``assert``: these are user-facing checks.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import backend

__all__ = [
    "as_matrix", "as_codes", "as_labels", "check_inner", "check_int",
    "check_float", "check_choice", "random_state", "finite_or_raise",
    "MAX_DEPTH", "BYTE_DEPTH", "code_dtype", "tree_depth", "depth_of_nodes", "check_tree",
    "lut_buckets", "check_nbuckets", "check_dm",
]

_REAL_KINDS = "iuf"


# ------------------------------------------------------------------ tree and LUT shapes
# Shared by the kernels (reference, Numba, CUDA), the dispatch and the strategies; here
# rather than in kernels/reference.py so that production code never imports the oracle.
# the default depth-4 tree
NLEAVES = 16
NNODES = 15
DEPTH = 4
MAX_DEPTH = 10         # codes are uint8 up to depth 8 (256 leaves), uint16 beyond (1024)
BYTE_DEPTH = 8         # the deepest trees whose codes fit a byte (the Numba/CUDA kernels)


def code_dtype(nbuckets):
    """The dtype of codes with ``nbuckets`` leaves: uint8 up to 256, uint16 up to 1024."""
    return np.uint8 if int(nbuckets) <= 256 else np.uint16


def tree_depth(dims, max_depth=MAX_DEPTH):
    """The depth d of the trees described by ``dims``, checked.

    Parameters
    ----------
    dims : (C, 2**d - 1) array (any library, any dtype), one row of node columns per tree
    max_depth : int, the deepest trees accepted (the byte-code kernels pass BYTE_DEPTH)

    Returns
    -------
    d : int, 1 <= d <= max_depth (10 by default)

    Raises ValueError, naming the shape, if ``dims`` is not 2-D or its width is not
    ``2**d - 1`` for a d in 1..max_depth (1, 3, 7, 15, ..., 1023 nodes).
    """
    shape = tuple(int(x) for x in getattr(dims, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"dims must be 2-D (C, 2**depth - 1); got shape {shape}")
    return depth_of_nodes(shape[1], f"dims of shape {shape}", max_depth)


def depth_of_nodes(nnodes, what="a tree", max_depth=MAX_DEPTH):
    """The depth d with ``2**d - 1 == nnodes``, checked to be in 1..max_depth.

    Parameters
    ----------
    nnodes : int, internal nodes per tree
    what : str, names the operand in the error message
    max_depth : int, the deepest trees accepted (default MAX_DEPTH = 10)

    Returns
    -------
    d : int, 1 <= d <= max_depth
    """
    nnodes = int(nnodes)
    d = (nnodes + 1).bit_length() - 1
    if nnodes < 1 or (1 << d) - 1 != nnodes or d > max_depth:
        raise ValueError(f"{what}: {nnodes} nodes per tree; a tree of depth d in "
                         f"1..{max_depth} has 2**d - 1 nodes (1, 3, 7, ..., "
                         f"{(1 << max_depth) - 1})")
    return d


def check_tree(dims, thresholds, max_depth=MAX_DEPTH):
    """:func:`tree_depth` of ``dims``, after checking that ``thresholds`` has its shape.

    Parameters
    ----------
    dims : (C, 2**d - 1); thresholds : (C, 2**d - 1); max_depth : as :func:`tree_depth`

    Returns
    -------
    d : int, 1 <= d <= max_depth
    """
    d = tree_depth(dims, max_depth)
    if tuple(thresholds.shape) != tuple(dims.shape):
        raise ValueError(f"thresholds has shape {tuple(thresholds.shape)}; it must match "
                         f"dims' shape {tuple(dims.shape)}")
    return d


def lut_buckets(lut, max_depth=MAX_DEPTH):
    """K = ``lut.shape[1]`` of a (C, K, M) LUT, checked to be in 1..2**max_depth
    (1024 by default; the byte-code kernels pass BYTE_DEPTH: 256).

    Returns
    -------
    K : int
    """
    top = 1 << max_depth
    if lut.ndim != 3 or not 1 <= lut.shape[1] <= top:
        raise ValueError(f"a LUT must have shape (C, K, M) with 1 <= K <= {top}; "
                         f"got {tuple(lut.shape)}")
    return int(lut.shape[1])


def check_nbuckets(nbuckets, max_depth=MAX_DEPTH):
    """``nbuckets`` as an int, checked to be in 1..2**max_depth (1024 by default; the
    byte-code kernels pass BYTE_DEPTH: 256)."""
    top = 1 << max_depth
    if isinstance(nbuckets, bool) or not isinstance(nbuckets, (int, np.integer)) \
            or not 1 <= int(nbuckets) <= top:
        raise ValueError(f"nbuckets must be an int in 1..{top}; got {nbuckets!r}")
    return int(nbuckets)


def check_dm(dims, thresholds, lut, inv_tau=None):
    """Depth d of the trees, after checking that the DM operands agree with it.

    Parameters
    ----------
    dims : (C, K-1); thresholds : (C, K-1); lut : (C, K, M); inv_tau : (C, K-1) or None

    Returns
    -------
    d : int, 1..10, with K = 2**d; raises ValueError naming the shapes otherwise
    """
    d = check_tree(dims, thresholds)
    K = 1 << d
    if lut.ndim != 3 or lut.shape[:2] != (dims.shape[0], K):
        raise ValueError(f"lut has shape {tuple(lut.shape)}; trees with dims of shape "
                         f"{tuple(dims.shape)} need ({dims.shape[0]}, {K}, M)")
    if inv_tau is not None and tuple(inv_tau.shape) != tuple(dims.shape):
        raise ValueError(f"inv_tau has shape {tuple(inv_tau.shape)}; it must match dims' "
                         f"shape {tuple(dims.shape)}")
    return d


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


def finite_mode(check_finite):
    """The compiled runtime's ``check_finite`` as the kernels' mode: False -> 0 (X is not
    looked at), True -> 1 (ValueError "X holds NaN or Inf"; on the GPU read with a sync),
    "nan" -> 2 (every output of a row whose input holds NaN or Inf is NaN, the other rows
    are unchanged; on the GPU no sync). Anything else is a ValueError."""
    if check_finite is True or check_finite is False or isinstance(check_finite, np.bool_):
        return int(bool(check_finite))
    if isinstance(check_finite, str) and check_finite == "nan":
        return 2
    raise ValueError(f"check_finite must be True, False or 'nan'; got {check_finite!r}")


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
