"""Built-in datasets: sklearn digits (bundled with scikit-learn) and Fashion-MNIST.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (files under
/usr/share/datasets/fashion-mnist); ``NIMBUS_FASHION_MNIST`` may point to another
folder holding the same four ``*-idx?-ubyte.gz`` files.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from ..arrays import validate

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def digits_task():
    """The sklearn-digits matrix-product task of the published MADDNESS/PQ comparison
    (figures in benchmarks/RESULTS.md, "MADDNESS and PQ against the published figures").

    Returns
    -------
    A_train : (1377, 64) float32, pixel rows (values 0..16)
    A_test : (400, 64) float32
    B : (64, 20) float32, the last 20 images as columns
    """
    from sklearn.datasets import load_digits
    X = load_digits().data.astype(np.float32)
    A, Q = X[:-20], X[-20:]
    return A[:1377], A[1377:], np.ascontiguousarray(Q.T)


def load_digits(test_fraction=0.25, random_state=0):
    """sklearn digits as a classification task, pixels scaled to [0, 1].

    Returns
    -------
    X_train : (n_train, 64) float32, y_train : (n_train,) int64,
    X_test : (n_test, 64) float32, y_test : (n_test,) int64
    """
    from sklearn.datasets import load_digits as _ld
    d = _ld()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = validate.random_state(random_state)
    perm = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return X[tr], y[tr], X[te], y[te]


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path} is too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, "
                         f"found {data.size}")
    return data.reshape(shape)


def fashion_mnist_dir():
    return os.environ.get("NIMBUS_FASHION_MNIST", FASHION_DIR)


def load_fashion_mnist(n_train=None, n_test=None, flatten=True):
    """Fashion-MNIST, pixels scaled to [0, 1].

    Parameters
    ----------
    n_train, n_test : int, optional; keep only the first rows of each split
    flatten : bool; (N, 784) rows if True, else (N, 1, 28, 28) images

    Returns
    -------
    X_train : (60000, 784) float32, y_train : (60000,) int64,
    X_test : (10000, 784) float32, y_test : (10000,) int64

    Raises
    ------
    FileNotFoundError naming the Debian package ``dataset-fashion-mnist`` when the
    files are absent.
    """
    folder = fashion_mnist_dir()
    names = {"Xtr": "train-images-idx3-ubyte.gz", "ytr": "train-labels-idx1-ubyte.gz",
             "Xte": "t10k-images-idx3-ubyte.gz", "yte": "t10k-labels-idx1-ubyte.gz"}
    missing = [n for n in names.values() if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {folder} (missing {', '.join(missing)}). "
            "Install the Debian package: sudo apt-get install dataset-fashion-mnist "
            "(or set NIMBUS_FASHION_MNIST to a folder holding the four .gz files).")
    arrs = {k: _read_idx(os.path.join(folder, v)) for k, v in names.items()}
    out = []
    for X, y, n in ((arrs["Xtr"], arrs["ytr"], n_train), (arrs["Xte"], arrs["yte"], n_test)):
        if n is not None:
            n = validate.check_int(n, "n_train/n_test", lo=1)
            X, y = X[:n], y[:n]
        X = X.astype(np.float32) / 255.0
        X = X.reshape(len(X), -1) if flatten else X.reshape(len(X), 1, 28, 28)
        out += [np.ascontiguousarray(X), y.astype(np.int64)]
    return tuple(out)

