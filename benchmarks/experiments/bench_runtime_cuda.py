"""ChainCUDA (the whole converted MLP in one captured kernel) against the float MLP on the GPU.

The network: Fashion-MNIST's MLP shapes 784-256-256-256-10. The converted chain has, per
layer, C = inputs / (input dims per codebook) trees of depth log2(K) and an 8-bit LUT
(synthetic values: speed does not depend on them). Baselines: the float MLP
``h = maximum(h @ W + b, 0)`` as cuBLAS fp32 and fp16 GEMMs through CuPy (eager), and,
where torch imports, the fp16 network captured in a torch.cuda.CUDAGraph.

Timings: device time by CUDA events around each call (median of many after warm-up) and
host wall time per call (a loop of calls then one sync, divided by the count; with
check_finite=True every call syncs itself). Prints a Markdown table and writes it (and
JSON) to $OUT when that is set.

    python3 benchmarks/experiments/bench_runtime_cuda.py [--quick]

Measured once (H100 80GB HBM3, this file and runtime_cuda at commit 314fb17; device ms by
events, check_finite=False): 8 dims K=16 chain 0.0285 / 0.0285 / 0.0295 / 0.061 / 0.899 ms
at N = 1 / 16 / 256 / 4096 / 65536, against cuBLAS fp32 0.305 / 0.334 / 0.369 / 0.323 /
1.468, cuBLAS fp16 0.353 / 0.331 / 0.327 / 0.322 / 0.631, torch fp16 CUDA graph 0.0225 /
0.0239 / 0.0244 / 0.0327 / 0.216. 4 dims: 1.51 ms and 2 dims: 3.39 ms at 65536 (the cost
grows with the codebook count). Tile sweep at 65536: rows 32 with 16 KiB chunks 0.825 ms,
32 KiB (the default) 0.898, rows 16 0.927, rows 64 1.13.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

SIZES = [784, 256, 256, 256, 10]
BATCHES = [1, 16, 256, 4096, 65536]


def make_layers(rng, dims_per_cb, K):
    depth = int(K).bit_length() - 1
    layers = []
    for D, M in zip(SIZES[:-1], SIZES[1:]):
        C = D // dims_per_cb
        dims = rng.integers(0, D, size=(C, K - 1)).astype(np.int32)
        thr = (0.5 * rng.standard_normal((C, K - 1))).astype(np.float32)
        lut = rng.integers(0, 256, size=(C, K, M)).astype(np.uint8)
        scale = np.full(M, 1.0 / (74.0 * np.sqrt(C)), dtype=np.float32)
        bias = (-127.5 * C * scale).astype(np.float32)
        layers.append(dict(dims=dims, thresholds=thr, lut=lut, scale=scale, bias=bias))
    return layers


def time_calls(cp, fn, n, warm=5):
    """(median device ms by events, host wall ms per call) of ``fn()``."""
    for _ in range(warm):
        fn()
    cp.cuda.get_current_stream().synchronize()
    ev = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(n)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    ev[-1][1].synchronize()
    dev = float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in ev]))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    cp.cuda.get_current_stream().synchronize()
    wall = (time.perf_counter() - t0) / n * 1e3
    return dev, wall


def float_mlp(cp, rng, dtype):
    Ws = [cp.asarray((rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype))
          for a, b in zip(SIZES[:-1], SIZES[1:])]
    bs = [cp.asarray((0.1 * rng.standard_normal(b)).astype(dtype)) for b in SIZES[1:]]

    def run(X):
        h = X
        for i, (W, b) in enumerate(zip(Ws, bs)):
            h = h @ W + b
            if i < len(Ws) - 1:
                h = cp.maximum(h, 0)
        return h
    return run


def torch_graph_fp16():
    """A callable N -> (timer fn) for the fp16 MLP in a torch CUDA graph, or None."""
    try:
        import torch
    except Exception:
        return None
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers).cuda().half().eval()

    def build(N):
        x = torch.randn(N, SIZES[0], device="cuda", dtype=torch.float16)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(s):
            for _ in range(3):
                net(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g):
            y = net(x)
        return g, (x, y)
    return build


def time_torch(build, N, n):
    import torch
    g, keep = build(N)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    dev = float(np.median([a.elapsed_time(b) for a, b in ev]))
    t0 = time.perf_counter()
    for _ in range(n):
        g.replay()
    torch.cuda.synchronize()
    return dev, (time.perf_counter() - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer calls, fewer configs")
    args = ap.parse_args()
    import cupy as cp
    from nimbus.arrays.kernels.runtime_cuda import ChainCUDA

    rng = np.random.default_rng(0)
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    ncalls = (lambda N: 20 if N >= 65536 else 50) if args.quick else \
        (lambda N: 30 if N >= 65536 else 100)
    X32 = {N: cp.asarray(rng.standard_normal((N, SIZES[0])).astype(np.float32)) for N in BATCHES}
    X16 = {N: X32[N].astype(cp.float16) for N in BATCHES}
    rows = []          # (what, batch, device ms, wall ms)

    f32, f16 = float_mlp(cp, rng, np.float32), float_mlp(cp, rng, np.float16)
    tb = torch_graph_fp16()
    base = {}
    for N in BATCHES:
        base[("cublas fp32", N)] = time_calls(cp, lambda: f32(X32[N]), ncalls(N))
        base[("cublas fp16", N)] = time_calls(cp, lambda: f16(X16[N]), ncalls(N))
        if tb is not None:
            try:
                base[("torch fp16 graph", N)] = time_torch(tb, N, ncalls(N))
            except Exception as e:      # report, keep going
                print("torch graph failed:", e)
                tb = None

    configs = [("8 dims, K=16", 8, 16), ("8 dims, K=32", 8, 32), ("8 dims, K=64", 8, 64),
               ("4 dims, K=16", 4, 16), ("2 dims, K=16", 2, 16)]
    if args.quick:
        configs = configs[:1] + configs[3:4]
    for label, dpc, K in configs:
        lay = make_layers(rng, dpc, K)
        for kernel in ("simt", "mma"):
            chain = ChainCUDA(lay, in_features=SIZES[0], kernel=kernel)
            for N in BATCHES:
                for check in (True, False):
                    d, w = time_calls(cp, lambda: chain(X32[N], check_finite=check), ncalls(N))
                    info = chain.plan_info(N, check_finite=check)
                    rows.append((f"chain {label} {kernel}" + (" check" if check else ""), N, d, w,
                                 info))

    # tile sweep at the largest batch (the default tile is the first row)
    sweep = []
    lay = make_layers(rng, 4, 16)
    for kernel, r, chunk in (("simt", 16, 32768), ("simt", 32, 32768), ("simt", 32, 16384),
                             ("mma", 32, 0), ("mma", 64, 0), ("mma", 128, 0)):
        try:
            ch = ChainCUDA(lay, in_features=SIZES[0], rows=r, kernel=kernel,
                           **({"chunk_bytes": chunk} if chunk else {}))
            d, w = time_calls(cp, lambda: ch(X32[65536], check_finite=False), ncalls(65536))
            sweep.append((f"{kernel} {r}", chunk, d, w))
        except Exception as e:
            sweep.append((f"{kernel} {r}", chunk, float("nan"), float("nan")))
            print("sweep", r, chunk, "failed:", e)

    lines = [f"# ChainCUDA vs the float MLP 784-256-256-256-10 on {name}", "",
             "device ms = median of CUDA-event times per call; wall ms = host time per call "
             "(loop, one sync at the end).", "",
             "| what | " + " | ".join(f"N={N}" for N in BATCHES) + " |",
             "|---|" + "---|" * len(BATCHES)]

    def cell(d, w):
        return f"{d:.4f} / {w:.4f}"
    for what in ("cublas fp32", "cublas fp16", "torch fp16 graph"):
        if (what, BATCHES[0]) in base:
            lines.append(f"| {what} (dev / wall ms) | "
                         + " | ".join(cell(*base[(what, N)]) for N in BATCHES) + " |")
    by = {}
    for what, N, d, w, info in rows:
        by.setdefault(what, {})[N] = (d, w, info)
    for what, per in by.items():
        lines.append(f"| {what} (dev / wall ms) | "
                     + " | ".join(cell(*per[N][:2]) for N in BATCHES) + " |")
    lines += ["", "Speed-up of the chain (check_finite=False, device time) over each baseline:", "",
              "| chain | baseline | " + " | ".join(f"N={N}" for N in BATCHES) + " |",
              "|---|---|" + "---|" * len(BATCHES)]
    for what, per in by.items():
        if what.endswith("check"):
            continue
        for b in ("cublas fp32", "cublas fp16", "torch fp16 graph"):
            if (b, BATCHES[0]) in base:
                lines.append(f"| {what} | {b} | " + " | ".join(
                    f"{base[(b, N)][0] / per[N][0]:.2f}x" for N in BATCHES) + " |")
    lines += ["", "Plans (rows per block, pairs per thread, shared bytes, blocks):", ""]
    for what, per in by.items():
        if not what.endswith("check"):
            lines.append(f"- {what}: " + "; ".join(
                f"N={N}: {per[N][2]['kernel']} {per[N][2]['rows']}/{per[N][2]['rpt']}/"
                f"{per[N][2]['shared_bytes']}/"
                f"{per[N][2]['blocks']}" for N in BATCHES))
    lines += ["", "Tile sweep, 4 dims K=16 (the default), N=65536, check_finite=False:", "",
              "| kernel, rows | chunk bytes | device ms | wall ms |", "|---|---|---|---|"]
    for r, chunk, d, w in sweep:
        lines.append(f"| {r} | {chunk} | {d:.4f} | {w:.4f} |")
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_runtime_cuda.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out, "bench_runtime_cuda.json"), "w") as f:
            json.dump(dict(device=name,
                           base={f"{k[0]}|{k[1]}": v for k, v in base.items()},
                           chain=[(w, N, d, wl, info) for w, N, d, wl, info in rows],
                           sweep=sweep), f, indent=1)


if __name__ == "__main__":
    main()
