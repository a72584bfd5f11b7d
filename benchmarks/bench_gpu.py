"""GPU benchmark: the fitted MADDNESS op (encode + 8-bit LUT lookup) against cuBLAS.

Run on a machine with a CUDA GPU and CuPy::

    python benchmarks/bench_gpu.py [--quick] [--json results.json]

For (N, D, M) in (65536, 512, 512), (65536, 512, 100), (16384, 1024, 1024),
(1024, 4096, 4096), C in {16, 32}, float32 and float16 input/output, it prints:

* encode, lookup and total time of the fitted op on new rows: the total is the
  fused kernel (``mode="fused"``) and the encode + lookup kernels (``"split"``),
  with the faster reported; ``op(A)`` is the whole checked call (input checks,
  the NaN/Inf flag read, which synchronises) timed with a host clock, then the same
  with ``check_finite=False`` ("unchecked"), and unchecked calls queued back to back
  timed by CUDA events ("queued": the per-call cost of an inference loop);
* cuBLAS ``A @ B`` in fp32, tf32 (CuPy's compute type switched in-process) and
  fp16 (tensor cores) on the same arrays, and the ratios;
* encode's achieved DRAM bandwidth: (bytes of A + bytes of codes) / encode time;
* the lookup rate N*M*C / lookup time against the shared-memory roofline: every
  lookup reads one byte of the 8-bit LUT from shared memory, which delivers
  128 bytes per clock per multiprocessor, so the roofline is
  multiprocessors * 128 B * SM clock (lookups/s).

Method: the strategy is fitted (on the host, ``refine=0``; fitting is not timed)
on a training subset; inputs are low-rank plus noise (never zeros); every timed
call is checked against the reference first; times are CUDA-event medians over
repeated trials of back-to-back calls on rotating input buffers (their total is
well over the L2 cache), queued behind a spin kernel so that host launch overhead
never leaves the GPU idle inside the timed region.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nimbus.arrays import backend                      # noqa: E402
from nimbus.arrays.kernels import reference as ref     # noqa: E402

SHAPES = [(65536, 512, 512), (65536, 512, 100), (16384, 1024, 1024), (1024, 4096, 4096)]
CODEBOOKS = (16, 32)
HEADLINE = (65536, 512, 512, 16)
ROTATE_BYTES = 160e6          # input bytes cycled through per timed call sequence (> L2)


class Timer:
    """CUDA-event timing of ``fn(i)`` over rotating buffers (see module docstring)."""

    def __init__(self, cp, cuda, reps=20, trials=11):
        self.cp, self.cuda, self.reps, self.trials = cp, cuda, reps, trials
        dev = cuda.device_info(cp.cuda.Device().id)
        self.cycles_per_ms = (dev["clock_khz"] or 2_000_000)
        self.spin_ms = 3.0
        self.starved = 0

    def __call__(self, fn, nbuf):
        cp = self.cp
        for i in range(3):
            fn(i % nbuf)
        cp.cuda.Device().synchronize()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(self.trials):
            self.cuda.spin(int(self.spin_ms * self.cycles_per_ms))
            e0.record()
            h0 = time.perf_counter()
            for r in range(self.reps):
                fn(r % nbuf)
            host_ms = (time.perf_counter() - h0) * 1e3
            e1.record()
            e1.synchronize()
            if host_ms > self.spin_ms * 0.8:       # the GPU may have waited for the host
                self.starved += 1
                self.spin_ms = min(50.0, host_ms * 2)
            times.append(cp.cuda.get_elapsed_time(e0, e1) / self.reps)
        return float(np.median(times))


def wall_ms(cp, fn, nbuf, calls=20):
    """Median host wall-clock time of one synchronised call ``fn(i)``."""
    for i in range(2):
        fn(i % nbuf)
    cp.cuda.Device().synchronize()
    out = []
    for r in range(calls):
        t0 = time.perf_counter()
        fn(r % nbuf)
        cp.cuda.Device().synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(out))


def set_tf32(on):
    """Switch CuPy's float32 matmul compute type (cuBLAS) between TF32 and the default."""
    from cupy._core import _routines_linalg as rl
    tf32 = getattr(rl, "COMPUTE_TYPE_TF32", 7)
    default = getattr(rl, "COMPUTE_TYPE_DEFAULT", 1)
    rl.set_compute_type(np.float32, tf32 if on else default)


def rel_err(Y, Y_ref):
    Y, Y_ref = backend.to_host(Y).astype(np.float64), backend.to_host(Y_ref).astype(np.float64)
    return float(np.linalg.norm(Y - Y_ref) / np.linalg.norm(Y_ref))


def lowrank(cp, rs, N, D, W, noise=0.3):
    """(N, D) float32 rows on the GPU: rank-32 structure plus noise."""
    Z = cp.asarray(rs.standard_normal((N, W.shape[0]), dtype=np.float32))
    X = Z @ W
    X += noise * cp.asarray(rs.standard_normal((N, D), dtype=np.float32))
    return X


def copy_bandwidth(cp, timer):
    src = cp.asarray(np.random.default_rng(0).standard_normal(2 ** 27, dtype=np.float32))
    dst = cp.empty_like(src)
    t = timer(lambda i: dst.__setitem__(Ellipsis, src), 1)
    return 2 * src.nbytes / (t * 1e-3)


def fit_strategy(D, C, train, verbose=True):
    from nimbus.strategies import Maddness
    params = Maddness().get_params()
    kw = {"refine": 0} if "refine" in params else {}
    t0 = time.perf_counter()
    op = Maddness(C, random_state=0, **kw).fit(train)
    if verbose:
        print(f"  fitted maddness C={C} on {train.shape[0]} x {D} rows in "
              f"{time.perf_counter() - t0:.1f} s ({kw or 'default params'})", flush=True)
    return op


def variant_fits(kw, C, M, D, isz):
    """Whether a fused variant runs as asked (not falling back to another plan)."""
    from nimbus.arrays.kernels import cuda
    cp = backend.cupy()
    dev = cuda.device_info(cp.cuda.Device().id)
    cfg = cuda._fused_config(C, M, D, isz, dev, kw.get("mt"), kw.get("rpt"), kw.get("nstage"),
                             kw.get("groups", 1))
    return cfg is not None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="headline shape only")
    ap.add_argument("--json", default=None, help="write all figures to this file")
    ap.add_argument("--trials", type=int, default=11)
    ap.add_argument("--variants", action="store_true",
                    help="also time the fused kernel with one warp group on every shape (the headline always "
                         "times its variants)")
    args = ap.parse_args(argv)

    cp = backend.cupy()
    if cp is None or not backend.has_cuda():
        sys.exit("bench_gpu needs CuPy and a CUDA device")
    from nimbus.arrays.kernels import cuda
    dev_id = cp.cuda.Device().id
    dev = cuda.device_info(dev_id)
    props = cp.cuda.runtime.getDeviceProperties(dev_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    timer = Timer(cp, cuda, trials=args.trials)
    clock_hz = (dev["clock_khz"] or 1_980_000) * 1e3
    smem_roof = dev["sms"] * 128 * clock_hz          # bytes/s = 8-bit lookups/s
    bw_copy = copy_bandwidth(cp, timer)
    info = dict(date=time.strftime("%Y-%m-%d"), device=name, sms=dev["sms"],
                sm_clock_mhz=clock_hz / 1e6, cupy=cp.__version__, python=platform.python_version(),
                copy_tb_s=bw_copy / 1e12, smem_roofline_lookups_s=smem_roof,
                command="python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    print(f"# {name}: {dev['sms']} SMs, SM clock {clock_hz / 1e6:.0f} MHz, CuPy {cp.__version__}; "
          f"device copy {bw_copy / 1e12:.2f} TB/s (read + write); shared-memory roofline "
          f"{smem_roof / 1e12:.1f}e12 8-bit lookups/s", flush=True)

    shapes = [HEADLINE[:3]] if args.quick else SHAPES
    codebooks = (HEADLINE[3],) if args.quick else CODEBOOKS
    rows = []
    fits = {}
    rs = np.random.default_rng(12345)
    for (N, D, M) in shapes:
        print(f"\n== N={N} D={D} M={M}", flush=True)
        W = cp.asarray(rs.standard_normal((32, D), dtype=np.float32) / np.float32(np.sqrt(32)))
        nbuf = int(min(8, max(2, math.ceil(ROTATE_BYTES / (N * D * 4)))))
        A32 = [lowrank(cp, rs, N, D, W) for _ in range(nbuf)]
        A16 = [a.astype(np.float16) for a in A32]
        B32 = cp.asarray(rs.standard_normal((D, M), dtype=np.float32) / np.float32(np.sqrt(D)))
        B16 = B32.astype(np.float16)
        blas = {}
        blas["fp32"] = timer(lambda i: A32[i] @ B32, nbuf)
        set_tf32(True)
        try:
            blas["tf32"] = timer(lambda i: A32[i] @ B32, nbuf)
            err_tf32 = rel_err(A32[0][:2048] @ B32, A32[0][:2048].astype(np.float64) @ B32)
        finally:
            set_tf32(False)
        err_fp32 = rel_err(A32[0][:2048] @ B32, A32[0][:2048].astype(np.float64) @ B32)
        blas["fp16"] = timer(lambda i: A16[i] @ B16, nbuf)
        print(f"  cuBLAS fp32 {blas['fp32']:.4f} ms (rel err {err_fp32:.1e}), tf32 "
              f"{blas['tf32']:.4f} ms (rel err {err_tf32:.1e}: TF32 active if ~1e-3), "
              f"fp16 {blas['fp16']:.4f} ms", flush=True)
        exact = A32[0][:8192] @ B32
        for C in codebooks:
            key = (D, C)
            if key not in fits:
                ntrain = 2048 if D <= 1024 else 1024
                fits[key] = fit_strategy(D, C, backend.to_host(A32[0][-ntrain:]))
            op = fits[key]
            op.build_lut(backend.to_host(B32))
            learned = [op._learned(k, A32[0]) for k in
                       ("dims_", "thresholds_", "lut_q_", "lut_scale_", "lut_bias_")]
            dims, thr, lq, sc, bi = learned
            for dt, As in ((np.float32, A32), (np.float16, A16)):
                tag = "fp32" if dt == np.float32 else "fp16"
                r = dict(N=N, D=D, M=M, C=C, io=tag, nbuf=nbuf, **{f"blas_{k}_ms": v
                                                                 for k, v in blas.items()})
                try:
                    # correctness first: every path against the reference on a slice
                    sl = As[0][:4096]
                    want = backend.to_host(ref.encode_lookup_q(sl, dims, thr, lq, sc, bi, dt))

                    def check(mode):
                        got = cuda.encode_lookup_q(sl, dims, thr, lq, sc, bi, dt, mode=mode)
                        if not np.array_equal(backend.to_host(got), want):
                            raise AssertionError(f"{mode} differs from the reference")
                    r["nmse"] = rel_err(op(As[0][:8192]), exact) ** 2
                    codes = [cuda.encode_tree(a, dims, thr, check_finite=False) for a in As]
                    r["encode_ms"] = timer(lambda i: cuda.encode_tree(As[i], dims, thr,
                                                                      check_finite=False), nbuf)
                    def fused(i, **kw):
                        return cuda.encode_lookup_q(As[i], dims, thr, lq, sc, bi, dt, mode="fused",
                                                    check_finite=False, **kw)

                    def check_fused(tag2, **kw):
                        got = cuda.encode_lookup_q(sl, dims, thr, lq, sc, bi, dt, mode="fused", **kw)
                        if not np.array_equal(backend.to_host(got), want):
                            raise AssertionError(f"fused {tag2} differs from the reference")

                    check("split")
                    r["lookup_ms"] = timer(
                        lambda i: cuda.lookup_q(codes[i], lq, sc, bi, dt), nbuf)
                    check("fused")
                    r["fused_ms"] = timer(lambda i: fused(i), nbuf)
                    variants = {}
                    if (N, D, M, C) == HEADLINE:
                        variants = {}
                        for mt, rpt, ns in ((512, None, 2), (512, None, 3), (256, 1, 4)):
                            variants[f"simt_mt{mt}_rpt{rpt or 'd'}_ns{ns}"] = dict(
                                mt=mt, rpt=rpt, nstage=ns, groups=1)
                        for mt, rpt, ns, g in ((512, None, 2, 2), (512, None, 3, 2),
                                               (512, None, 2, 4), (512, 1, 3, 2),
                                               (256, 1, 4, 2)):
                            variants[f"simt_g{g}_mt{mt}_rpt{rpt or 'd'}_ns{ns}"] = dict(
                                mt=mt, rpt=rpt, nstage=ns, groups=g)
                    elif args.variants:
                        variants = {"simt": dict(groups=1)}
                    for tag2, kw in variants.items():
                        try:
                            if not variant_fits(kw, C, M, D, As[0].itemsize):
                                raise ValueError("does not fit in shared memory")
                            check_fused(tag2, **kw)
                            r[f"fused_{tag2}_ms"] = timer(lambda i: fused(i, **kw), nbuf)
                        except Exception as exc:      # a variant that does not fit, say
                            r[f"fused_{tag2}_ms"] = None
                            print(f"    variant {tag2}: {type(exc).__name__}: {exc}", flush=True)
                    r["split_ms"] = timer(
                        lambda i: cuda.encode_lookup_q(As[i], dims, thr, lq, sc, bi, dt,
                                                       mode="split", check_finite=False), nbuf)
                    r["total_ms"] = min(r["fused_ms"], r["split_ms"])
                    r["best_path"] = "fused" if r["fused_ms"] <= r["split_ms"] else "split"
                    r["fused_engine"] = "simt"     # the only fused kernel of the library
                    r["op_call_ms"] = wall_ms(cp, lambda i: op(As[i]), nbuf)
                    r["op_call_unchecked_ms"] = wall_ms(
                        cp, lambda i: op(As[i], check_finite=False), nbuf)
                    # calls queued back to back, no synchronisation between them: what an
                    # inference loop with check_finite=False pays per call
                    r["op_queued_ms"] = timer(lambda i: op(As[i], check_finite=False), nbuf)
                    r["enc_gb_s"] = (N * D * As[0].itemsize + N * C) / (r["encode_ms"] * 1e-3) / 1e9
                    r["lookups_s"] = N * M * C / (r["lookup_ms"] * 1e-3)
                    r["lookup_roof_frac"] = r["lookups_s"] / smem_roof
                    floor_ms = (N * D + N * M) * As[0].itemsize / bw_copy * 1e3
                    r["floor_ms"] = floor_ms
                    for k in ("fp32", "tf32", "fp16"):
                        r[f"x_{k}"] = blas[k] / r["total_ms"]
                    print(f"  C={C} {tag}: encode {r['encode_ms']:.4f} ms "
                          f"({r['enc_gb_s']:.0f} GB/s), lookup {r['lookup_ms']:.4f} ms "
                          f"(acc1, {r['lookups_s'] / 1e12:.2f}e12/s = "
                          f"{100 * r['lookup_roof_frac']:.0f}% smem roof), split {r['split_ms']:.4f}, "
                          f"fused ({r['fused_engine']}) {r['fused_ms']:.4f} ms -> {r['total_ms']:.4f} ms "
                          f"(floor {floor_ms:.4f}); x{r['x_fp32']:.1f} fp32, x{r['x_tf32']:.2f} "
                          f"tf32, x{r['x_fp16']:.2f} fp16; op(A) {r['op_call_ms']:.3f} ms wall "
                          f"({r['op_call_unchecked_ms']:.3f} unchecked, "
                          f"{r['op_queued_ms']:.4f} queued); "
                          f"NMSE {r['nmse']:.3f}", flush=True)
                    if variants:
                        print("    fused variants (ms): " + ", ".join(
                            f"{k} {r[f'fused_{k}_ms']:.4f}" if r[f"fused_{k}_ms"] else f"{k} -"
                            for k in variants), flush=True)
                except Exception as exc:          # keep measuring the other configurations
                    r["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"  C={C} {tag}: FAILED {r['error']}", flush=True)
                rows.append(r)
        del A32, A16
        cp.get_default_memory_pool().free_all_blocks()
    if timer.starved:
        print(f"\n# note: {timer.starved} trials queued slower than the spin; spin raised to "
              f"{timer.spin_ms:.1f} ms")

    print("\n| N, D, M | C | I/O | encode ms | lookup ms | split ms | fused ms (engine) | best ms (path) "
          "| cuBLAS fp32 / tf32 / fp16 ms | x fp32 | x tf32 | x fp16 | encode GB/s "
          "| lookups/s (% smem roof) | floor ms | op(A) ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['N']}, {r['D']}, {r['M']} | {r['C']} | {r['io']} | failed: {r['error']} |")
            continue
        print(f"| {r['N']}, {r['D']}, {r['M']} | {r['C']} | {r['io']} | {r['encode_ms']:.4f} | "
              f"{r['lookup_ms']:.4f} | {r['split_ms']:.4f} | {r['fused_ms']:.4f} ({r['fused_engine']}) | "
              f"{r['total_ms']:.4f} ({r['best_path']}) | "
              f"{r['blas_fp32_ms']:.3f} / {r['blas_tf32_ms']:.3f} / {r['blas_fp16_ms']:.3f} | "
              f"{r['x_fp32']:.1f} | {r['x_tf32']:.2f} | {r['x_fp16']:.2f} | {r['enc_gb_s']:.0f} | "
              f"{r['lookups_s'] / 1e12:.2f}e12 ({100 * r['lookup_roof_frac']:.0f}%) | "
              f"{r['floor_ms']:.4f} | {r['op_call_ms']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
