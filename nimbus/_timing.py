"""Wall-clock timing that waits for GPU work (used by compare; benchmarks use CUDA events)."""
from __future__ import annotations

import time

from .arrays import backend


def time_call(fn, *args, repeat=3, warmup=1, min_time=0.02, max_repeat=1000):
    """Median seconds of ``fn(*args)`` over at least ``repeat`` runs after ``warmup`` runs,
    more (up to ``max_repeat``) while they take under ``min_time`` seconds in all: a call
    of tens of microseconds is timed over hundreds of runs, not three.

    Returns
    -------
    (seconds, last result)
    """
    out = None
    for _ in range(warmup):
        out = fn(*args)
        backend.synchronize(out)
    t0 = time.perf_counter()
    out = fn(*args)
    backend.synchronize(out)
    one = max(time.perf_counter() - t0, 1e-9)
    repeat = max(repeat, min(max_repeat, int(min_time / one)))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        backend.synchronize(out)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out
