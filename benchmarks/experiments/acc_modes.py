"""Experiment: three accumulation schemes of the 8-bit GPU lookup (the old ACC_MODE switch).

Not part of the library: ``nimbus.arrays.kernels.cuda`` keeps scheme 1, the fastest
measured (see README.md in this folder); the switch (``acc_mode=`` of ``lookup_q`` and
``encode_lookup_q``) moved here. The schemes add 4 LUT bytes (one 32-bit word) of two
codebooks into 16-bit lanes:

* 0: ``__byte_perm`` spreads the bytes into 16-bit lanes, IADD3 adds both codebooks;
* 1: the same spread, the adds as IMAD (``x * one + acc``, ``one`` a runtime 1), so they
  run on the FMA pipe beside the byte_perms on the integer pipe (the library's);
* 2: even bytes masked into 16-bit lanes (LOP3 + IADD3), whole words summed in 64 bits
  with IMAD.WIDE, odd lanes = (whole - even) >> 8 at the end (2 rows per thread).

The kernel is the library's ``lookup_q_kernel`` (nimbus/arrays/kernels/cuda/lookup_q.cu
after the prelude) with lookup_q_core_acc_modes.cuh, the core as it was with the
switch, in place of the library's lookup_q_core.cuh.

Run on a machine with a CUDA GPU and CuPy, from the repository root::

    python benchmarks/experiments/acc_modes.py --check      # bit-exactness only
    python benchmarks/experiments/acc_modes.py [--trials 9]  # check, then time

``--check`` compares every scheme with the reference bit for bit (float32 and float16
output, 5 to 300 codebooks, K = 16 and 256); the timing runs the lookup at N = 65536,
C = 16, K = 16, M = 512 (CUDA events, rotating buffers, bench_gpu's Timer).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))

from nimbus.arrays import backend                      # noqa: E402
from nimbus.arrays.kernels import cuda                 # noqa: E402
from nimbus.arrays.kernels import reference as ref     # noqa: E402

_CTYPES = {np.dtype(np.float32): ("float", 4), np.dtype(np.float16): ("u16", 2)}
_compiled = {}


def source(unroll=0, **defs):
    """Header of #defines, the library's prelude, the experiment's core, the library's
    lookup_q.cu (PRAGMA_UNROLL_C replaced as the library does)."""
    lines = []
    for role in ("IN", "OUT", "LUT"):
        ctype, size = _CTYPES[np.dtype(defs.pop(role, np.float32))]
        lines += [f"#define {role}_T {ctype}", f"#define {role}_SIZE {size}"]
    defs.setdefault("NT", cuda.NT)
    lines += [f"#define {k} {int(v)}" for k, v in defs.items()]
    with open(os.path.join(HERE, "lookup_q_core_acc_modes.cuh"), encoding="utf-8") as f:
        core = f.read()
    body = (core + cuda.load_source("lookup_q.cu")).replace(
        "PRAGMA_UNROLL_C", "#pragma unroll" if not unroll else f"#pragma unroll {int(unroll)}")
    return "\n".join(lines) + "\n" + cuda.load_source("prelude.cuh") + body


def lookup_q(codes, lut_q, scale, bias, out_dtype=np.float32, *, acc_mode=1):
    """``reference.lookup_q`` with accumulation scheme ``acc_mode`` (0, 1 or 2).

    codes : (N, C) uint8 CuPy array; lut_q : (C, K, M) uint8, K <= 256; scale, bias :
    (M,) float32 -> (N, M) ``out_dtype``. Raises ValueError when the LUT tile does not
    fit in shared memory (the library would fall back to another kernel).
    """
    cp = backend.cupy()
    if acc_mode not in (0, 1, 2):
        raise ValueError(f"acc_mode must be 0, 1 or 2, got {acc_mode!r}")
    out_dt = np.dtype(out_dtype)
    dev_id = codes.device.id
    codes = cp.ascontiguousarray(codes, dtype=np.uint8)
    lut_q = cp.ascontiguousarray(lut_q, dtype=np.uint8)
    scale = cp.ascontiguousarray(scale, dtype=np.float32)
    bias = cp.ascontiguousarray(bias, dtype=np.float32)
    N, C = codes.shape
    K, M = lut_q.shape[1], lut_q.shape[2]
    dev = cuda.device_info(dev_id)
    # scheme 2 keeps 64-bit sums: half the rows per thread (as the switch did)
    rpt = 1 if C > 256 else (2 if acc_mode == 2 else 4)
    cfg = cuda._q_config(C, M, dev, None, rpt, K=K)
    if cfg is None:
        raise ValueError(f"the LUT tile of C={C}, K={K} does not fit in shared memory")
    MT, RPT, RB, smem = cfg
    unroll = cuda._unroll_c(C)
    key = (dev_id, str(out_dt), C, MT, RPT, K, acc_mode, dev["cc"] >= 80, unroll)
    if key not in _compiled:
        src = source(unroll, OUT=out_dt, NCB=C, MT=MT, RPT=RPT, NK=K, ACC_MODE=acc_mode,
                     USE_CP_ASYNC=dev["cc"] >= 80)
        _compiled[key] = cp.RawKernel(src, "lookup_q_kernel")
    kern = _compiled[key]
    Y = cp.empty((N, M), dtype=out_dt)
    codes_vec = int(C % 4 == 0 and cuda._aligned(codes))
    gy = (M + MT - 1) // MT
    nbatch = (N + RB - 1) // RB
    gx = max(1, min(nbatch, -(-dev["sms"] * cuda._blocks_per_sm(kern, cuda.NT, smem, dev)
                               // gy)))
    cuda._launch(kern, (gx, gy), cuda.NT,
                 (codes, lut_q, scale, bias, Y, np.int32(N), np.int32(M), np.uint32(1),
                  np.int32(cuda._lut_unit(lut_q, M, out_dt)), np.int32(codes_vec)), smem, dev)
    return Y


def _problem(rs, cp, N, C, K, M):
    codes = rs.integers(0, K, size=(N, C)).astype(np.uint8)
    q = rs.integers(0, 256, size=(C, K, M)).astype(np.uint8)
    q[:, :, 0] = 255                      # worst case for the 16-bit lane sums
    scale = (rs.random(M) * 0.01 + 0.001).astype(np.float32)
    bias = rs.standard_normal(M).astype(np.float32)
    return tuple(cp.asarray(x) for x in (codes, q, scale, bias))


def check(rs):
    """Every scheme against the reference, bit for bit; returns the cases checked."""
    cp = backend.cupy()
    n = 0
    for N, C, K, M in ((301, 32, 16, 48), (999, 16, 16, 72), (77, 5, 16, 7),
                       (513, 300, 16, 33), (64, 8, 256, 40)):
        args = _problem(rs, cp, N, C, K, M)
        for out_dt in (np.float32, np.float16):
            want = ref.lookup_q(*args).astype(out_dt).get()
            for acc in (0, 1, 2):
                np.testing.assert_array_equal(lookup_q(*args, out_dt, acc_mode=acc).get(),
                                              want)
                n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="bit-exactness only, no timing")
    ap.add_argument("--trials", type=int, default=9)
    args = ap.parse_args(argv)
    cp = backend.cupy()
    if cp is None or not backend.has_cuda():
        sys.exit("acc_modes needs CuPy and a CUDA device")
    rs = np.random.default_rng(0)
    print(f"check: {check(rs)} cases bit-exact against the reference", flush=True)
    if args.check:
        return
    from bench_gpu import Timer          # benchmarks/bench_gpu.py
    timer = Timer(cp, cuda, trials=args.trials)
    N, C, K, M = 65536, 16, 16, 512
    nbuf = 4
    probs = [_problem(rs, cp, N, C, K, M) for _ in range(nbuf)]
    for dt in (np.float32, np.float16):
        lib = timer(lambda i: cuda.lookup_q(*probs[i], dt), nbuf)
        row = [f"{np.dtype(dt).name} out: library lookup_q {lib:.4f} ms"]
        for acc in (0, 1, 2):
            t = timer(lambda i: lookup_q(*probs[i], dt, acc_mode=acc), nbuf)
            row.append(f"acc_mode {acc} {t:.4f} ms")
        print("; ".join(row), flush=True)


if __name__ == "__main__":
    main()
