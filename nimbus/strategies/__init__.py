"""Strategies a NimbusLayer switches between; ``REGISTRY`` maps names to classes."""
from .. import io as _io
from .base import Strategy, NotFittedError, subspace_starts
from .exact import Exact
from .pq import PQ
from .maddness import Maddness

REGISTRY = {cls.name: cls for cls in (Exact, PQ, Maddness)}


def register(cls):
    """Add a Strategy subclass to the registry under ``cls.name`` (returns cls)."""
    REGISTRY[cls.name] = cls
    return cls


from .dm import DM; register(DM)  # noqa: E402,E702  (differentiable MADDNESS)
from .joint import Joint; register(Joint)  # noqa: E402,E702  (joint bucketing)


def _load(meta, arrays):
    cls = REGISTRY.get(meta.get("class"))
    if cls is None:
        raise KeyError(f"unknown strategy class {meta.get('class')!r}")
    return cls.from_state(meta, arrays)


_io.register_loader("strategy", _load)


def make(method, **params):
    """A new strategy by registry name, e.g. ``make("maddness", ncodebooks=16)``."""
    if not isinstance(method, str) or method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method](**params)


__all__ = ["Strategy", "NotFittedError", "subspace_starts", "Exact", "PQ", "Maddness",
           "REGISTRY", "register", "make"]
