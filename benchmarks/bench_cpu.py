"""CPU speed: a fitted MADDNESS op on new rows (encode + lookup) against NumPy's A @ B.

    python benchmarks/bench_cpu.py                     # N=100000, D=512, M in 16/128/512, C in 8/16/32
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_cpu.py   # NumPy at its best

Both are timed in the same process on the same arrays: median of ``--repeat`` runs
after a warm-up. The op is fitted once per C on separate training rows (fit
time is not part of the figure) and its LUT rebuilt for each M. Prints a markdown
table (for benchmarks/RESULTS.md) and the BLAS that NumPy used.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import nimbus
from nimbus.strategies import Maddness


def _median_time(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _data(n_train, n, D, rng):
    """(n_train, D) training rows and (n, D) new rows of one distribution, float32.

    ReLU of a rank-16 signal plus noise: activation-like rows. The mixing matrix is drawn
    once, so the new rows come from the distribution the op was fitted on."""
    r = 16
    mix = rng.standard_normal((r, D)).astype(np.float32)
    out = []
    for rows in (n_train, n):
        A = rng.standard_normal((rows, r)).astype(np.float32) @ mix
        out.append(np.maximum(A + 0.3 * rng.standard_normal((rows, D)).astype(np.float32), 0))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--m", type=int, nargs="+", default=[16, 128, 512])
    p.add_argument("--c", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    A_train, A = _data(args.n_train, args.n, args.d, rng)
    Bs = {M: rng.standard_normal((args.d, M)).astype(np.float32) for M in args.m}
    try:
        from threadpoolctl import threadpool_info
        blas = [(i["internal_api"], i.get("architecture"), i["num_threads"])
                for i in threadpool_info() if i["user_api"] == "blas"]
    except ImportError:
        blas = "unknown"
    from nimbus.arrays.kernels import cpu
    print(f"# bench_cpu: N={args.n} D={args.d}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, numba threads {cpu.num_threads()}; BLAS {blas}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')}")
    rows = []
    for C in args.c:
        op = Maddness(C).fit(A_train)
        codes = op.encode(A)
        t_enc = _median_time(lambda: op.encode(A), args.repeat)
        for M in args.m:
            B = Bs[M]
            op.build_lut(B)
            t_blas = _median_time(lambda: A @ B, args.repeat)
            t_look = _median_time(lambda: op.lookup(codes), args.repeat)
            t_tot = _median_time(lambda: op(A), args.repeat)
            err = nimbus.nmse(A[:5000] @ B, op(A[:5000]))
            rows.append((M, C, t_blas, t_enc, t_look, t_tot, err))
            print(f"M={M:4d} C={C:3d}: numpy {t_blas * 1e3:7.1f} ms | encode {t_enc * 1e3:6.1f} "
                  f"lookup {t_look * 1e3:6.1f} total {t_tot * 1e3:6.1f} ms | "
                  f"speed-up x{t_blas / t_tot:.2f} | nmse {err:.3f}", flush=True)
    print()
    print("| M | C | NumPy A@B (ms) | encode (ms) | lookup (ms) | encode+lookup (ms) | speed-up | NMSE |")
    print("|---|---|---|---|---|---|---|---|")
    for M, C, tb, te, tl, tt, e in rows:
        print(f"| {M} | {C} | {tb * 1e3:.1f} | {te * 1e3:.1f} | {tl * 1e3:.1f} | {tt * 1e3:.1f} | "
              f"{tb / tt:.2f}x | {e:.3f} |")


if __name__ == "__main__":
    main()
