"""DM layer step (forward + backward) on the GPU against the exact layer step (cuBLAS fp32).

At N=8192, D=512, M=512, C=32 (default), one training step of a layer:

* exact: ``Y = X @ W``; ``dX = dY @ W^T``; ``dW = X^T @ dY`` (three fp32 cuBLAS GEMMs);
* DM: ``dm_forward`` (tree encode + LUT sum) and ``dm_backward`` (leaf gradients
  by one cuBLAS GEMM, the node kernel, the LUT scatter-add), every gradient asked;
  also the same step through the autograd Function (``DMFunction``) to show its
  overhead, and the parts of the step one by one.

Timing: CUDA events around each call, after warm-up, median of ``--reps`` runs,
inputs rotated among 4 sets so that repeats do not hit a warm L2 with the same X.
Correctness is checked in the same run against the plain-CuPy oracle.

``--depth`` sets the trees' depth (default 4: 16 leaves; 9-10 take uint16 codes).

Usage: ``python benchmarks/bench_dm_gpu.py [--n 8192 --d 512 --m 512 --c 32 --depth 4]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nimbus.arrays import backend, kernels  # noqa: E402
from nimbus.arrays.autograd import Tensor  # noqa: E402
from nimbus.arrays.kernels import dm_cuda, dm_reference  # noqa: E402
from nimbus.strategies.dm import DMFunction  # noqa: E402
from nimbus.table import Table  # noqa: E402


def _time(cp, fn, sets, reps, warmup=5):
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    cp.cuda.get_current_stream().synchronize()
    times = []
    for i in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90))


def _problem(cp, rng, N, D, M, C, depth):
    K = 2 ** depth
    X = np.maximum(0, rng.standard_normal((N, D))).astype(np.float32)
    starts = np.round(np.linspace(0, D, C + 1)).astype(int)
    dims = np.stack([rng.integers(starts[c], starts[c + 1], size=K - 1) for c in range(C)])
    thr = np.abs(0.8 * rng.standard_normal((C, K - 1))).astype(np.float32)
    lut = (0.1 * rng.standard_normal((C, K, M))).astype(np.float32)
    inv_tau = np.full((C, K - 1), 2.0, np.float32)
    gY = rng.standard_normal((N, M)).astype(np.float32)
    W = (rng.standard_normal((D, M)) / np.sqrt(D)).astype(np.float32)
    return [cp.asarray(a) for a in (X, dims.astype(np.int32), thr, lut, inv_tau, gY, W)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--c", type=int, default=32)
    p.add_argument("--depth", type=int, default=4, help="tree depth, 1..10 (default 4)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cp = backend.cupy()
    if cp is None or not backend.has_cuda():
        raise SystemExit("needs CuPy and a CUDA device")
    N, D, M, C, depth = args.n, args.d, args.m, args.c, args.depth
    if not 1 <= depth <= 10:
        raise SystemExit(f"--depth must be in 1..10, got {depth}")
    K = 2 ** depth
    rng = np.random.default_rng(0)
    sets = [_problem(cp, rng, N, D, M, C, depth) for _ in range(4)]
    inv_temp = 1.0

    # correctness first, on the same inputs
    X, dims, thr, lut, inv_tau, gY, W = sets[0]
    codes, Y = kernels.dm_forward(X, dims, thr, lut)
    rc, rY = dm_reference.dm_forward(X, dims, thr, lut)
    assert bool((codes == rc).all()), "codes differ from the oracle"
    err_y = float(cp.abs(Y - rY).max())
    got = kernels.dm_backward(X, dims, thr, inv_tau, lut, codes, gY, inv_temp)
    ref = dm_reference.dm_backward(X, dims, thr, inv_tau, lut, codes, gY, inv_temp)
    rel = [float(cp.linalg.norm(g - r) / cp.linalg.norm(r)) for g, r in zip(got, ref)]
    print(f"check vs oracle: forward max |diff| {err_y:.2e}; backward relative errors "
          f"dX {rel[0]:.1e}, dt {rel[1]:.1e}, dLUT {rel[2]:.1e}")

    def exact_step(X, dims, thr, lut, inv_tau, gY, W):
        Y = X @ W
        dX = gY @ W.T
        dW = X.T @ gY
        return Y, dX, dW

    def dm_step(X, dims, thr, lut, inv_tau, gY, W):
        codes, Y = kernels.dm_forward(X, dims, thr, lut)
        return kernels.dm_backward(X, dims, thr, inv_tau, lut, codes, gY, inv_temp)

    def dm_autograd(X, dims, thr, lut, inv_tau, gY, W):
        x = Tensor(X, requires_grad=True)
        t = Tensor(thr, requires_grad=True)
        lt = Tensor(lut, requires_grad=True)
        y = DMFunction.apply(x, t, lt, dims=dims, inv_tau=inv_tau, inv_temp=inv_temp)
        y.backward(gY)
        return x.grad

    parts = {
        "encode": lambda X, dims, thr, lut, *a: dm_cuda.encode(X, dims, thr),
        "lookup": lambda X, dims, thr, lut, *a: dm_cuda.lookup(codes, lut),
        "leaf grads G (cuBLAS)": lambda X, dims, thr, lut, inv_tau, gY, W:
            gY @ lut.reshape(C * K, M).T,
        "LUT scatter-add": lambda X, dims, thr, lut, inv_tau, gY, W:
            dm_cuda.lut_grad(codes, gY, K),
        "node backward (dX, dt)": lambda X, dims, thr, lut, inv_tau, gY, W:
            dm_cuda.dm_backward(X, dims, thr, inv_tau, lut, codes, gY, inv_temp, True, True,
                                False),
    }
    rows = []
    t_exact = _time(cp, exact_step, sets, args.reps)
    rows.append({"what": "exact step: 3 fp32 GEMMs (cuBLAS)", "median_ms": t_exact[0],
                 "p10_ms": t_exact[1], "p90_ms": t_exact[2], "vs_exact": 1.0})
    t_dm = _time(cp, dm_step, sets, args.reps)
    rows.append({"what": "DM step: dm_forward + dm_backward", "median_ms": t_dm[0],
                 "p10_ms": t_dm[1], "p90_ms": t_dm[2], "vs_exact": t_dm[0] / t_exact[0]})
    t_ag = _time(cp, dm_autograd, sets, args.reps)
    rows.append({"what": "DM step through autograd (DMFunction)", "median_ms": t_ag[0],
                 "p10_ms": t_ag[1], "p90_ms": t_ag[2], "vs_exact": t_ag[0] / t_exact[0]})
    for name, fn in parts.items():
        t = _time(cp, fn, sets, args.reps)
        rows.append({"what": f"  part: {name}", "median_ms": t[0], "p10_ms": t[1],
                     "p90_ms": t[2], "vs_exact": t[0] / t_exact[0]})
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    table = Table(rows, ["what", "median_ms", "p10_ms", "p90_ms", "vs_exact"],
                  title=f"one layer step at N={N}, D={D}, M={M}, C={C}, depth {depth} "
                  f"on {dev}")
    print(table)
    print()
    print(table.to_markdown())
    ratio = t_dm[0] / t_exact[0]
    print(f"\nDM step / exact step = {ratio:.2f} (target <= 4)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "depth": depth, "rows": rows, "ratio": ratio, "check": rel},
                      f, indent=1)


if __name__ == "__main__":
    main()
