"""The operating-point frontier: accuracy lost (from ``frontier.py``'s JSON lines) against the
compiled model's speed, per (depth, input dimensions per codebook) point.

Speed depends on the shapes only (C, K, M per layer), so each point is timed as a compiled
chain of its Fashion-MNIST MLP shapes (784-256-256-256-10) with random trees and 8-bit LUTs,
beside the float MLP as NumPy/BLAS in the same run (and cuBLAS fp32 with ``--gpu``):

* CPU: batch 1 and 4096, 1 thread and all cores (median of many calls after warm-up);
* GPU (``--gpu``): batch 1 and 65536, CUDA-event device time (median), ``check_finite=False``.

Prints a markdown table (accuracy mean and sd over seeds, artifact bytes / float32 weights,
latencies and speed-ups) and, with ``--plot FILE.png``, draws points lost against the CPU
speed-up at batch 4096 (all cores) with :func:`nimbus.plotting.plot_frontier`.

    python benchmarks/bench_frontier.py --results frontier.jsonl [more.jsonl] --plot frontier.png
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_frontier.py ...
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np

SIZES = (784, 256, 256, 256, 10)


def _plan(depth, dim, rng):
    layers = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        C, K = -(-a // dim), 2 ** depth
        layers.append({"dims": rng.integers(0, a, (C, K - 1)).astype(np.int32),
                       "thresholds": (0.5 * rng.standard_normal((C, K - 1))).astype(np.float32),
                       "lut": rng.integers(0, 256, (C, K, b)).astype(np.uint8),
                       "scale": np.full(b, 1e-3, np.float32), "bias": np.zeros(b, np.float32)})
    return layers


def _artifact_bytes(layers):
    return int(sum(v.nbytes for layer in layers for v in layer.values()))


def _median_ms(fn, min_time=0.3, warm=3):
    for _ in range(warm):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = int(min(20000, max(10, min_time / one)))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def _float_mlp(rng):
    Ws = [(0.05 * rng.standard_normal((a, b))).astype(np.float32)
          for a, b in zip(SIZES[:-1], SIZES[1:])]
    bs = [np.zeros(b, np.float32) for b in SIZES[1:]]

    def run(X, xp=np, Ws=Ws, bs=bs):
        h = X
        for W, b in zip(Ws[:-1], bs[:-1]):
            h = xp.maximum(h @ W + b, 0)
        return h @ Ws[-1] + bs[-1]
    return run, Ws, bs


def time_cpu(points, threads, batches, rng):
    import numba
    from nimbus.arrays import kernels
    mlp, _, _ = _float_mlp(rng)
    out = {}
    for th in threads:
        numba.set_num_threads(th)
        try:
            from threadpoolctl import threadpool_limits
            limit = threadpool_limits(th)
        except ImportError:                 # BLAS keeps its own thread count
            limit = None
        for N in batches:
            X = rng.random((N, SIZES[0])).astype(np.float32)
            out[("numpy", th, N)] = _median_ms(lambda: mlp(X))
            for (depth, dim) in points:
                chain = kernels.chain(_plan(depth, dim, rng), SIZES[0], "numpy")
                Y = np.empty((N, SIZES[-1]), np.float32)
                out[((depth, dim), th, N)] = _median_ms(lambda: chain(X, out=Y))
        if limit is not None:
            limit.restore_original_limits()
    return out


def time_gpu(points, batches, rng):
    import cupy as cp
    from nimbus.arrays import kernels
    mlp, Ws, bs = _float_mlp(rng)
    Wg = [cp.asarray(W) for W in Ws]
    bg = [cp.asarray(b) for b in bs]
    out = {}

    def dev_ms(fn, n=200):
        for _ in range(10):
            fn()
        s, e = cp.cuda.Event(), cp.cuda.Event()
        ts = []
        for _ in range(n):
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(cp.cuda.get_elapsed_time(s, e))
        return float(np.median(ts))
    for N in batches:
        X = cp.asarray(rng.random((N, SIZES[0])).astype(np.float32))
        out[("cublas_fp32", N)] = dev_ms(lambda: mlp(X, cp, Wg, bg))
        for (depth, dim) in points:
            chain = kernels.chain(_plan(depth, dim, rng), SIZES[0], "cupy")
            out[((depth, dim), N)] = dev_ms(lambda: chain(X, check_finite=False))
    return out


def read_accuracy(paths):
    acc = collections.defaultdict(list)
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    acc[(int(r["depth"]), int(r["codebook_dim"]))].append(float(r["points_lost"]))
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="*", default=[], help="frontier.py JSON lines")
    ap.add_argument("--points", nargs="*", default=None,
                    help="DEPTHxDIM points to time (default: those in --results)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--plot", default=None, help="write the frontier plot to this PNG")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args(argv)
    acc = read_accuracy(args.results)
    points = ([tuple(int(v) for v in p.split("x")) for p in args.points] if args.points
              else sorted(acc))
    if not points:
        ap.error("no points: give --results or --points")
    rng = np.random.default_rng(0)
    cores = os.cpu_count() or 1
    cpu = {} if args.no_cpu else time_cpu(points, sorted({1, cores}), (1, 4096), rng)
    gpu = time_gpu(points, (1, 65536), rng) if args.gpu else {}
    rows = []
    wbytes = 4 * sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:]))
    for p in points:
        lost = acc.get(p, [])
        row = {"depth": p[0], "codebook_dim": p[1], "label": f"d{p[0]} w{p[1]}",
               "runs": len(lost),
               "points_lost": float(np.mean(lost)) if lost else None,
               "lost_sd": float(np.std(lost)) if len(lost) > 1 else 0.0,
               "artifact_over_float": _artifact_bytes(_plan(p[0], p[1], rng)) / wbytes}
        for key, val in cpu.items():
            if key[0] == p:
                row[f"cpu_ms_t{key[1]}_b{key[2]}"] = val
                row[f"cpu_speedup_t{key[1]}_b{key[2]}"] = cpu[("numpy", key[1], key[2])] / val
        for key, val in gpu.items():
            if key[0] == p:
                row[f"gpu_ms_b{key[1]}"] = val
                row[f"gpu_speedup_fp32_b{key[1]}"] = gpu[("cublas_fp32", key[1])] / val
        rows.append(row)
    cols = ["label", "runs", "points_lost", "lost_sd", "artifact_over_float"] + sorted(
        {k for r in rows for k in r if k.startswith(("cpu_", "gpu_"))})
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c) for c in cols]
        print("| " + " | ".join("-" if v is None else (f"{v:.4g}" if isinstance(v, float)
                                                       else str(v)) for v in cells) + " |")
    base = {k: v for k, v in cpu.items() if k[0] == "numpy"}
    base.update({k: v for k, v in gpu.items() if k[0] == "cublas_fp32"})
    print("float baselines (ms):", {" ".join(map(str, k)): round(v, 4) for k, v in base.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "baselines_ms": {" ".join(map(str, k)): v
                                                      for k, v in base.items()},
                       "cores": cores, "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        from nimbus.plotting import plot_frontier
        key = f"cpu_speedup_t{cores}_b4096"
        pts = [dict(r, speedup=r[key]) for r in rows if r["points_lost"] is not None and key in r]
        ax = plot_frontier(pts, title="Fashion-MNIST MLP, compiled, CPU batch 4096 (all cores):\n"
                                      "points lost vs speed-up over NumPy fp32")
        ax.figure.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
