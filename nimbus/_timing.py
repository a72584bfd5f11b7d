"""Wall-clock timing that waits for GPU work (used by compare; benchmarks use CUDA events)."""
from __future__ import annotations

import time

from .arrays import backend


def time_call(fn, *args, repeat=3, warmup=1):
    """Median seconds of ``fn(*args)`` over ``repeat`` runs after ``warmup`` runs.

    Returns
    -------
    (seconds, last result)
    """
    out = None
    for _ in range(warmup):
        out = fn(*args)
        backend.synchronize(out)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        backend.synchronize(out)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out
