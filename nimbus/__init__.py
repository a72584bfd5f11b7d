"""Cumulonimbus: approximate matrix products with learned lookup tables.

``nimbus.amm(A, B)`` approximates ``A @ B``; ``nimbus.fit`` returns a reusable
op; ``nimbus.compare`` tabulates methods; ``nimbus.save``/``nimbus.load`` store
fitted strategies and models. Strategies live in ``nimbus.strategies``; networks
in ``nimbus.nn``.
"""
import os as _os

# Numba's OpenMP threads otherwise spin after every parallel kernel and starve
# BLAS (and each other) on small machines: a 0.2 ms encode+lookup took 28 ms
# after a matrix product with the default policy. A user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import strategies  # noqa: E402
from .api import amm, compare, fit  # noqa: E402
from . import io as _io  # noqa: E402
from .io import save  # noqa: E402
from .metrics import nmse  # noqa: E402

__version__ = "0.1.0"

__all__ = ["amm", "fit", "compare", "save", "load", "nmse", "strategies", "nn", "__version__"]


# The packages whose import registers a loader with nimbus.io (each class
# registers where it is defined; io itself imports none of them, see load).
_LOADER_PACKAGES = (".strategies", ".nn")


def load(path):
    """Read a file written by :func:`nimbus.save`: a strategy, a model, or any
    other kind a nimbus package registers. Arrays come back as NumPy arrays.

    Imports the packages that register loaders (``nimbus.strategies``,
    ``nimbus.nn``) first, then reads with :func:`nimbus.io.load`.

    Parameters
    ----------
    path : str or os.PathLike, an ``.npz`` file written by :func:`nimbus.save`

    Raises
    ------
    FileNotFoundError if ``path`` does not exist; ValueError if it is not a
    nimbus file, is of an unknown kind, or is corrupt.
    """
    import importlib
    for pkg in _LOADER_PACKAGES:
        importlib.import_module(pkg, __name__)
    return _io.load(path)


def __getattr__(name):
    # nimbus.nn is imported on first use: it pulls in the autograd and layers
    if name == "nn":
        import importlib
        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'nimbus' has no attribute {name!r}")
