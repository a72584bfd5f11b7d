"""Where a small-batch call of the compiled model's GPU chain spends its time.

    python3 benchmarks/experiments/probe_small.py [CONVERTED.npz] [--batches 1 16 256]

For the converted model (default ``.carry/e2e/converted44.npz``, the default recipe's
Fashion-MNIST MLP), compiled, at each batch size and with chain_kernel's prefetch block on
and off, on CuPy input:

* ``kernel``: device ms per replay of the captured graph alone (events around 200
  back-to-back replays, divided by 200): the kernel's own time, plus launch gaps;
* ``chain wall``: host ms per ``ChainCUDA(X, check_finite=False)`` in a loop of calls (one
  sync at the end) and ``chain check``: the same with the per-call check (a sync each);
* ``model wall`` / ``model check``: the same through ``compiled(X)`` (nimbus.nn.compile);
* ``model dev``: CUDA events around one ``compiled(X, check_finite=False)`` call (median),
  which counts the host time before the first enqueued copy; ``nan``: the same calls with
  ``check_finite="nan"``;
* the host cost of the pieces of a call: ``cp.empty``, the 24-byte parameter copy, the
  graph launch, an event record.

Prints one table; a benchmark of the experiments folder, not of the library's path.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main():
    import cupy as cp

    import nimbus
    import nimbus.nn
    from nimbus.arrays.kernels.runtime_cuda import ChainCUDA
    from nimbus.nn.runtime import _LUT_KEYS
    ap = argparse.ArgumentParser()
    ap.add_argument("converted", nargs="?", default=".carry/e2e/converted44.npz")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    model = nimbus.load(args.converted)
    comp = nimbus.nn.compile(model) if isinstance(model, nimbus.nn.Module) else model
    groups = [items for kind, items in comp._groups if kind == "chain"]
    layers = [{k: s[k] for k in _LUT_KEYS} for s in groups[0]]
    D0 = int(groups[0][0]["in"])
    rng = np.random.default_rng(0)
    chains = {pre: ChainCUDA(layers, in_features=D0, prefetch=pre) for pre in (True, False)}
    stream = cp.cuda.get_current_stream()
    n = args.calls

    def host_loop(fn):
        for _ in range(20):
            fn()
        stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        stream.synchronize()
        return (time.perf_counter() - t0) / n * 1e3

    def dev_one(fn):
        t = []
        for _ in range(min(n, 500)):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            t.append(cp.cuda.get_elapsed_time(a, b))
        return float(np.median(t))

    print("| batch | prefetch | bytes | kernel ms | chain wall | chain check | chain nan "
          "| model wall | model check | model nan | model dev | model nan dev |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for N in args.batches:
        X = cp.asarray(rng.uniform(0, 1, (N, D0)).astype(np.float32))
        want = None
        for pre, ch in chains.items():
            y = ch(X)
            want = y if want is None else want
            assert bool((y == want).all()), "prefetch on/off differ"
            plan = ch._plan(N, D0, False)
            ch(X, check_finite=False)
            stream.synchronize()
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            for _ in range(200):
                plan.graph.launch(stream)
            b.record()
            b.synchronize()
            kern = cp.cuda.get_elapsed_time(a, b) / 200
            cw = host_loop(lambda: ch(X, check_finite=False))
            cc = host_loop(lambda: ch(X))
            cn = host_loop(lambda: ch(X, check_finite="nan"))
            info = ch.plan_info(N, D0, False)
            if pre:
                mw = host_loop(lambda: comp(X, check_finite=False))
                mc = host_loop(lambda: comp(X))
                mn = host_loop(lambda: comp(X, check_finite="nan"))
                md = dev_one(lambda: comp(X, check_finite=False))
                mnd = dev_one(lambda: comp(X, check_finite="nan"))
            else:
                mw = mc = mn = md = mnd = float("nan")
            print(f"| {N} | {pre} | {info['prefetch_bytes']} | {kern:.4f} | {cw:.4f} | {cc:.4f} "
                  f"| {cn:.4f} | {mw:.4f} | {mc:.4f} | {mn:.4f} | {md:.4f} | {mnd:.4f} |",
                  flush=True)
    # host cost of the pieces
    ch = chains[True]
    X = cp.asarray(rng.uniform(0, 1, (1, D0)).astype(np.float32))
    plan = ch._plan(1, D0, False)
    rt = cp.cuda.runtime
    pieces = {
        "cp.empty((1, 10))": lambda: cp.empty((1, 10), dtype=np.float32),
        "memcpyAsync 24 B": lambda: rt.memcpyAsync(plan.params.data.ptr, ch._pinned.ptr, 24,
                                                   rt.memcpyHostToDevice, stream.ptr),
        "graph.launch": lambda: plan.graph.launch(stream),
        "event record": lambda: cp.cuda.Event(block=False, disable_timing=True).record(stream),
        "stream.synchronize (idle)": lambda: stream.synchronize(),
        "get_current_stream": lambda: cp.cuda.get_current_stream(),
        "X.flags.c_contiguous": lambda: X.flags.c_contiguous,
        "X.dtype == float32": lambda: X.dtype == np.float32,
        "X.shape": lambda: X.shape,
        "X.data.device_id": lambda: X.data.device_id,
        "X.data.ptr": lambda: X.data.ptr,
        "chain(X, False)": lambda: ch(X, check_finite=False),
        "compiled(X, False)": lambda: comp(X, check_finite=False),
        "compiled(X, 'nan')": lambda: comp(X, check_finite="nan"),
    }
    for k, fn in pieces.items():
        print(f"host {k}: {host_loop(fn) * 1e3:.2f} us")


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
