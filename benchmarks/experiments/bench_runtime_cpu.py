"""Time the CPU chain kernel (nimbus.arrays.kernels.runtime_cpu.ChainCPU) on the shapes of
the Fashion-MNIST MLP 784-256-256-256-10, beside the float32 MLP as NumPy/BLAS.

The converted network is stood in for by random trees and LUTs of the same shapes (the
kernels have no data-dependent branches on the SIMD path, so the time does not depend
on the values): codebook c of a layer tests columns in its own slice of ``w`` inputs,
as a converted layer does. Each point: median of many calls after warm-up, one output
buffer per batch size (as the runtime calls it), numba.set_num_threads(t) for the
kernel and the same thread count for BLAS where threadpoolctl is importable.

    python benchmarks/experiments/bench_runtime_cpu.py            # the full grid
    python benchmarks/experiments/bench_runtime_cpu.py --quick    # depth 4, w = 8 only
    python benchmarks/experiments/bench_runtime_cpu.py --configs 5x4 --plain
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numba
import numpy as np

from nimbus.arrays.kernels import runtime_cpu as rc

WIDTHS = (784, 256, 256, 256, 10)


def make_layers(depth, w, rng, widths=WIDTHS):
    """Random layers of the MLP's shapes: ceil(D / w) codebooks of depth ``depth``."""
    layers = []
    K = 2 ** depth
    for D, M in zip(widths[:-1], widths[1:]):
        C = -(-D // w)
        lo = np.minimum(np.arange(C) * w, D - 1)[:, None]
        dims = np.minimum(lo + rng.integers(0, w, (C, K - 1)), D - 1).astype(np.int32)
        thr = rng.normal(0, 0.5, (C, K - 1)).astype(np.float32)
        lut = rng.integers(0, 256, (C, K, M)).astype(np.uint8)
        # scale/bias that keep the next layer's inputs near N(0, 1)
        scale = np.full(M, 1.0 / (40 * np.sqrt(C)), dtype=np.float32)
        bias = np.full(M, -127.5 * C / (40 * np.sqrt(C)), dtype=np.float32)
        layers.append({"dims": dims, "thresholds": thr, "lut": lut, "scale": scale,
                       "bias": bias})
    return layers


def median_time(fn, min_time=0.2, min_calls=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def blas_threads(n):
    """A context that limits BLAS to n threads (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def float_mlp(rng, widths=WIDTHS):
    Ws = [(rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
          for a, b in zip(widths[:-1], widths[1:])]

    def run(X):
        h = X
        for W in Ws[:-1]:
            h = np.maximum(h @ W, 0)
        return h @ Ws[-1]
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="depth 4, w = 8 only")
    ap.add_argument("--batches", default="1,16,256,4096")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per point")
    ap.add_argument("--configs", default=None,
                    help="depth x inputs per codebook, e.g. 5x4,4x8 (default: the grid)")
    ap.add_argument("--plain", action="store_true",
                    help="also time the plain-loop path at every point")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    threads = [min(int(t), numba.config.NUMBA_NUM_THREADS) for t in args.threads.split(",")]
    configs = [(4, 8)] if args.quick else [(4, 8), (5, 8), (6, 8), (4, 4), (5, 4), (6, 4),
                                           (4, 2), (5, 2), (6, 2)]
    if args.configs:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    rng = np.random.default_rng(0)
    X_all = rng.normal(size=(max(batches), WIDTHS[0])).astype(np.float32)
    Xs = {n: np.ascontiguousarray(X_all[:n]) for n in batches}
    mlp = float_mlp(rng)
    print(f"SIMD path available (AVX-512 VBMI + VNNI): {rc.simd_supported()}")
    print("times in ms, median after warm-up; ratio = NumPy float32 MLP time / ours\n")

    numpy_ms = {}
    for t in threads:
        with blas_threads(t):
            for n in batches:
                numpy_ms[t, n] = median_time(lambda: mlp(Xs[n]), args.min_time) * 1e3

    rows = []
    for depth, w in configs:
        layers = make_layers(depth, w, rng)
        Cs = "/".join(str(layer["lut"].shape[0]) for layer in layers)
        paths = [("simd", True)] if rc.simd_supported() else []
        if args.plain or not paths or (depth, w) in ((4, 8), (5, 4)):
            paths.append(("plain", False))
        for name, simd in paths:
            chain = rc.ChainCPU(layers, d_in=WIDTHS[0], simd=simd)
            nbytes = chain.lut.nbytes
            for t in threads:
                numba.set_num_threads(t)
                for n in batches:
                    ms = median_time(lambda: chain(Xs[n]), args.min_time) * 1e3
                    rows.append((depth, w, Cs, nbytes, name, t, n, ms, numpy_ms[t, n]))
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    print("| depth | in/codebook | C per layer | LUT bytes | path | threads | batch "
          "| ChainCPU ms | NumPy fp32 ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for depth, w, Cs, nbytes, name, t, n, ms, np_ms in rows:
        print(f"| {depth} | {w} | {Cs} | {nbytes / 1e3:.0f} KB | {name} | {t} | {n} "
              f"| {ms:.4f} | {np_ms:.4f} | {np_ms / ms:.2f}x |")


if __name__ == "__main__":
    main()
