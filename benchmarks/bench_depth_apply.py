"""Inference cost of a converted layer against tree depth: the 8-bit apply (tree encode +
8-bit LUT sums) at depths 4, 8, 9 and 10 against the exact product in the same run.

The shapes are the converted Fashion-MNIST MLP's layers: D = 784 with C = 98 codebooks
and D = 256 with C = 32, M = 256 outputs, 8 input columns per codebook. Trees are random
(every node tests a column of its codebook's 8, thresholds drawn from the data's scale),
LUTs random uint8: the cost does not depend on what the trees learned. Depth 9 and 10
take uint16 codes and LUTs of 512 or 1024 rows per codebook (128 or 256 KiB at M = 256),
which no longer fit in shared memory: on CuPy they run the depth-templated kernels of
``dm_cuda`` (encode, then the 8-bit lookup), depth <= 8 the byte-tuned fused kernel of
``cuda``.

Every timed call is first checked bitwise against the plain-array reference on 2048 rows.
``encode_ms`` times the tree encode alone (part of ``apply_ms``; on CuPy the fused depth-4
kernel does not run it separately, so there the parts do not add up).
GPU: CUDA events, warm-up, median of ``--reps`` calls, exact = cuBLAS fp32 ``A @ B``.
CPU: wall clock, median, exact = NumPy/BLAS ``A @ B``.

Usage: ``python benchmarks/bench_depth_apply.py [--gpu] [--n N] [--reps R]``
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nimbus._timing import time_call  # noqa: E402
from nimbus.arrays import backend, kernels  # noqa: E402
from nimbus.arrays.kernels import reference as ref  # noqa: E402
from nimbus.table import Table  # noqa: E402

SHAPES = ((784, 256, 98), (256, 256, 32))      # (D, M, C)
DEPTHS = (4, 8, 9, 10)


def _layer(rng, D, M, C, depth):
    """Random trees over 8-column codebooks and a random 8-bit LUT (host arrays)."""
    nn = 2 ** depth - 1
    starts = np.linspace(0, D, C + 1).astype(int)
    dims = np.stack([rng.integers(starts[c], starts[c + 1], size=nn) for c in range(C)])
    thr = rng.uniform(0.0, 1.0, size=(C, nn)).astype(np.float32)
    q = rng.integers(0, 256, size=(C, 2 ** depth, M)).astype(np.uint8)
    scale = rng.uniform(1e-3, 1e-2, size=M).astype(np.float32)
    bias = rng.standard_normal(M).astype(np.float32)
    return dims.astype(np.int32), thr, q, scale, bias


def _timer(gpu, reps):
    if gpu:
        cp = backend.cupy()

        def run(fn):
            for _ in range(3):
                fn()
            cp.cuda.get_current_stream().synchronize()
            times = []
            for _ in range(reps):
                start, end = cp.cuda.Event(), cp.cuda.Event()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end))
            return float(np.median(times))
        return run

    return lambda fn: time_call(fn, repeat=reps, warmup=1)[0] * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="CuPy arrays on the GPU")
    p.add_argument("--n", type=int, default=None, help="rows (default 65536 GPU, 8192 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls (default 50 GPU, 5 CPU)")
    args = p.parse_args(argv)
    if args.gpu and not backend.has_cuda():
        raise SystemExit("--gpu needs CuPy and a CUDA device")
    xp = backend.cupy() if args.gpu else np
    N = args.n or (65536 if args.gpu else 8192)
    reps = args.reps or (50 if args.gpu else 5)
    if N < 1 or reps < 1:
        raise SystemExit("--n and --reps must be positive")
    timer = _timer(args.gpu, reps)
    rng = np.random.default_rng(0)
    rows = []
    for D, M, C in SHAPES:
        A = xp.asarray(np.maximum(0, rng.standard_normal((N, D))).astype(np.float32))
        B = xp.asarray(rng.standard_normal((D, M)).astype(np.float32))
        t_exact = timer(lambda: A @ B)
        for depth in DEPTHS:
            dims, thr, q, scale, bias = (xp.asarray(a) for a in _layer(rng, D, M, C, depth))
            sl = A[:2048]
            got = kernels.encode_lookup_q(sl, dims, thr, q, scale, bias)
            want = ref.encode_lookup_q(sl, dims, thr, q, scale, bias)
            if not np.array_equal(backend.to_host(got), backend.to_host(want)):
                raise AssertionError(f"depth {depth}, D={D}: the op differs from the reference")
            with kernels.finite_checks(False):
                t = timer(lambda: kernels.encode_lookup_q(A, dims, thr, q, scale, bias))
                t_enc = timer(lambda: kernels.encode_tree(A, dims, thr))
            rows.append({"D": D, "M": M, "C": C, "depth": depth, "K": 2 ** depth,
                         "lut_MB": C * 2 ** depth * M / 1e6, "encode_ms": t_enc,
                         "apply_ms": t, "exact_ms": t_exact, "exact/apply": t_exact / t})
            print(f"D={D} C={C} depth {depth}: apply {t:.4f} ms, exact {t_exact:.4f} ms",
                  flush=True)
    cp = backend.cupy()
    where = (cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
             if args.gpu else f"CPU, {os.cpu_count()} cores")
    table = Table(rows, ["D", "M", "C", "depth", "K", "lut_MB", "encode_ms", "apply_ms",
                         "exact_ms", "exact/apply"],
                  title=f"8-bit apply of a converted layer, N={N}, on {where}")
    print(table)
    print()
    print(table.to_markdown())


if __name__ == "__main__":
    main()
