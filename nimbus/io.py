"""Saving and loading fitted strategies and models: one ``.npz`` file.

The file holds the learned arrays (NumPy, any CuPy array is copied to the
host) and one JSON document under the key ``__nimbus__`` describing what they
are. Nothing is pickled: loading uses ``allow_pickle=False``, so a file cannot
run code. Writes go to a temporary file that replaces the target only once
complete, so a failed save never destroys an existing file.

Objects take part through two methods and a registered loader:
``obj._nimbus_kind`` ("strategy", "model", ...), ``obj.to_state() -> (meta dict,
{name: array})`` and ``register_loader(kind, fn(meta, arrays) -> obj)``.

This module imports nothing of nimbus: each package registers the loaders of
the classes it defines when it is imported (``nimbus.strategies`` the kind
"strategy", ``nimbus.nn`` the kind "model" and the compiled kinds). The public
:func:`nimbus.load` imports those packages before it reads; a caller of
:func:`load` here must have imported the package that registers the file's kind.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "nimbus"
VERSION = 1
_META_KEY = "__nimbus__"
_loaders = {}


def register_loader(kind, fn):
    """Register ``fn(meta, arrays) -> object`` for files whose kind is ``kind``.

    ``kind`` is a non-empty str (the ``_nimbus_kind`` of the saved class); a
    later registration of the same kind replaces the earlier one (re-imports).
    ``meta`` is the JSON dict the object's ``to_state`` returned and ``arrays``
    the dict of NumPy arrays it returned, as read back from the file.
    """
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"register_loader: kind must be a non-empty str, got {kind!r}")
    if not callable(fn):
        raise TypeError(f"register_loader: the loader for {kind!r} must be callable, "
                        f"got {type(fn).__name__}")
    _loaders[kind] = fn


def known_kinds():
    """The kinds of file that :func:`load` can read now (sorted list of str)."""
    return sorted(_loaders)


def _to_state(obj):
    kind = getattr(obj, "_nimbus_kind", None)
    if kind is None or not hasattr(obj, "to_state"):
        raise TypeError(f"cannot save a {type(obj).__name__}: expected a nimbus strategy or "
                        "model (something with to_state())")
    meta, arrays = obj.to_state()
    return kind, meta, arrays


def save(obj, path):
    """Write a fitted strategy or model to ``path`` (an ``.npz`` file, written atomically).

    Parameters
    ----------
    obj : Strategy or nimbus.nn model
    path : str or os.PathLike; the file name is used exactly as given
    """
    kind, meta, arrays = _to_state(obj)
    doc = {"format": FORMAT, "version": VERSION, "kind": kind, "meta": meta}
    try:
        text = json.dumps(doc, allow_nan=True)
    except TypeError as exc:
        raise TypeError(f"cannot save {type(obj).__name__}: {exc}") from None
    for name, a in arrays.items():
        if name == _META_KEY or not isinstance(a, np.ndarray) or a.dtype.kind == "O":
            raise TypeError(f"cannot save array {name!r} ({type(a).__name__})")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".nimbus-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_META_KEY: np.array(text)}, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load(path):
    """Read what :func:`save` wrote. Arrays come back as NumPy arrays.

    Raises
    ------
    FileNotFoundError if ``path`` does not exist; ValueError if it is not a
    nimbus file (not an .npz archive, no nimbus metadata, a newer format
    version, missing or malformed arrays).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(6)
        if head == b"\x93NUMPY":
            raise ValueError(f"{path} holds a single array (.npy), not a nimbus .npz archive")
        raise ValueError(f"{path} is not a readable nimbus file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if _META_KEY not in npz.files:
                raise ValueError(f"{path} is an .npz archive but was not written by "
                                 "nimbus.save (no nimbus metadata)")
            doc = json.loads(str(npz[_META_KEY][()]))
            arrays = {k: npz[k] for k in npz.files if k != _META_KEY}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt nimbus metadata ({exc})") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(path):
            raise                      # our own message above
        raise ValueError(f"{path} is not a readable nimbus file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a nimbus file (format {doc.get('format')!r})"
                         if isinstance(doc, dict) else f"{path}: corrupt nimbus metadata")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise ValueError(f"{path} was written by a newer nimbus (format version "
                         f"{doc.get('version')!r}; this one reads up to {VERSION})")
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in _loaders:
        # No import here on purpose: the registering packages import this module
        # (nimbus.load imports them first), so importing them back would be a cycle.
        raise ValueError(f"{path}: unknown object kind {kind!r} (this nimbus reads "
                         f"{', '.join(known_kinds()) or 'no kinds yet'}; read files with "
                         "nimbus.load, which imports the packages that register them)")
    try:
        return _loaders[kind](doc.get("meta", {}), arrays)
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{path}: incomplete or malformed nimbus file ({exc!r})") from None

