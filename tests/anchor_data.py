"""Data of the published-reference comparisons (ANCHORS.md): same seeds, same splits.

Kept identical to the project's shared anchors/synth.py so that our figures are
comparable with the published ones. NMSE = mean((Y - Yhat)**2) / var(Y), Y = A_te @ B.
"""
import numpy as np

from nimbus.nn.data import digits_task  # noqa: F401  (the digits task lives in the library)


def make_data(kind, n_train, n_test, D, M, seed=0):
    rng = np.random.RandomState(seed)
    N = n_train + n_test
    if kind == "gauss":
        A = rng.randn(N, D)
    elif kind == "lowrank":
        r = max(2, D // 8)
        A = rng.randn(N, r) @ rng.randn(r, D) + 0.1 * rng.randn(N, D)
    elif kind == "relu":
        r = max(2, D // 8)
        A = np.maximum(0, rng.randn(N, r) @ rng.randn(r, D) + 0.3 * rng.randn(N, D))
    else:
        raise ValueError(kind)
    A = A.astype(np.float32)
    B = rng.randn(D, M).astype(np.float32)
    return A[:n_train], A[n_train:], B


# (kind, D, M, C) -> (MADDNESS as published, PQ-16 as published), ANCHORS.md
SYNTH_ANCHORS = {
    ("gauss", 32, 16, 4): (.687, .624), ("gauss", 32, 16, 8): (.366, .354),
    ("gauss", 32, 16, 16): (.123, .120), ("gauss", 32, 16, 32): (.039, .038),
    ("lowrank", 32, 16, 4): (.116, .342), ("lowrank", 32, 16, 8): (.044, .199),
    ("lowrank", 32, 16, 16): (.034, .107),
    ("relu", 32, 16, 4): (.123, .177), ("relu", 32, 16, 8): (.196, .089),
    ("relu", 32, 16, 16): (.160, .052),
    ("lowrank", 128, 16, 8): (.274, .574), ("lowrank", 128, 16, 16): (.154, .469),
    ("lowrank", 128, 16, 32): (.078, .314), ("lowrank", 128, 16, 64): (.025, .125),
}
# C -> (MADDNESS with splits only between distinct values, PQ-16), sklearn digits
DIGITS_ANCHORS = {2: (.347, .332), 4: (.211, .270), 8: (.111, .229), 16: (.045, .031),
                  32: (.024, .0185)}
