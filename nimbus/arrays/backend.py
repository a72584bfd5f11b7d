"""Which array library an array belongs to, and moving arrays between them.

This is the one place that knows NumPy from CuPy. Everything else asks
``namespace(x)`` for the module of ``x`` and writes ``xp.`` code, or calls the
kernel table in :mod:`nimbus.arrays.kernels`, which dispatches on the same rule.

CuPy is optional: it is imported only when an array from it shows up or when
:func:`has_cuda` is asked.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "namespace", "is_cupy", "has_cuda", "cupy", "to_host", "to_device",
    "like", "library_name",
]

_cupy = None          # the cupy module once imported, False if unavailable
_has_cuda = None      # cached answer of has_cuda()


def cupy():
    """The ``cupy`` module, or ``None`` when it is not installed or fails to import."""
    global _cupy
    if _cupy is None:
        try:
            import cupy as cp  # noqa: WPS433 (lazy on purpose: CuPy stays optional)
            _cupy = cp
        except Exception:  # ImportError, or a CUDA runtime that fails to load
            _cupy = False
    return _cupy or None


def is_cupy(x) -> bool:
    """True when ``x`` is a CuPy array (decided by its type's module; never imports CuPy)."""
    t = type(x)
    if t is np.ndarray:               # the common case first: this runs on every op call
        return False
    return t.__module__.split(".", 1)[0] == "cupy"


def namespace(*arrays):
    """Array module (``numpy`` or ``cupy``) of the given arrays.

    All arrays must come from one library: mixing raises ``TypeError`` naming the
    libraries, so that no silent device transfer happens. ``None`` entries are
    ignored; with no array at all the answer is ``numpy``.
    """
    libs = {library_name(a) for a in arrays if a is not None}
    if len(libs) > 1:
        raise TypeError(
            f"arrays from different libraries were mixed ({', '.join(sorted(libs))}); "
            "move them to one library first (nimbus.arrays.backend.to_host / to_device)")
    if libs == {"cupy"}:
        return cupy()
    return np


def library_name(x) -> str:
    """``"cupy"`` for CuPy arrays, else ``"numpy"``."""
    return "cupy" if is_cupy(x) else "numpy"


def has_cuda() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    global _has_cuda
    if _has_cuda is None:
        cp = cupy()
        try:
            _has_cuda = bool(cp is not None and cp.cuda.runtime.getDeviceCount() > 0)
        except Exception:
            _has_cuda = False
    return _has_cuda


def to_host(x):
    """A NumPy array with the values of ``x`` (no copy when ``x`` already is NumPy)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def to_device(x):
    """A CuPy array on the current device with the values of ``x``."""
    cp = cupy()
    if cp is None:
        raise RuntimeError("CuPy is not installed: install the 'gpu' extra "
                           "(pip install 'cumulonimbus[gpu]') to use the GPU")
    if is_cupy(x) and x.device.id == cp.cuda.Device().id:
        return x
    return cp.asarray(x)


def is_array(x) -> bool:
    """True for a NumPy or a CuPy array."""
    return isinstance(x, np.ndarray) or is_cupy(x)


_HOST = ("numpy", -1)


def place(x):
    """(library name, device id) of an array: -1 for NumPy's host memory."""
    if type(x) is np.ndarray:
        return _HOST
    return library_name(x), (x.data.device_id if is_cupy(x) else -1)


def like(x, ref):
    """``x`` moved to the library (and device) of ``ref``: the "output follows A" rule."""
    if is_cupy(ref):
        if is_cupy(x) and x.device.id == ref.device.id:
            return x
        with ref.device:
            return cupy().asarray(x)
    return to_host(x)


def normal_sampler(seed, ref):
    """A function ``shape -> float32 standard normal array`` in ``ref``'s library, drawn
    where the array will be used (on the GPU for CuPy: no host draw and transfer per call).

    seed : int; ref : NumPy or CuPy array (only its library matters)
    """
    if is_cupy(ref):
        state = cupy().random.RandomState(seed)
        return lambda shape: state.standard_normal(shape, dtype=np.float32)
    gen = np.random.default_rng(seed)
    return lambda shape: gen.standard_normal(shape, dtype=np.float32)


def synchronize(*arrays):
    """Wait for queued GPU work on the devices of any CuPy arrays given (no-op for NumPy)."""
    for a in arrays:
        if is_cupy(a):
            with a.device:
                cupy().cuda.get_current_stream().synchronize()


def blas_single_thread(x):
    """Context manager: one BLAS thread for NumPy work on ``x`` (a no-op for CuPy).

    Learning makes many small matrix products; on a 2-core machine OpenBLAS's
    spinning worker threads then cost far more than they give (measured: a
    20000 x 128 MADDNESS fit took 84 s with 2 threads on a loaded machine, 5 s
    with one).
    """
    import contextlib
    if is_cupy(x):
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, do nothing
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
