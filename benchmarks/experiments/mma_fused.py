"""Experiment: the fused MADDNESS apply with the lookup on the integer tensor cores.

Not part of the library (it was ``engine="mma"`` of ``nimbus.arrays.kernels.cuda.
encode_lookup_q`` and the module ``cuda_mma.py`` until it moved here): measured slower
than the library's fused kernel, see README.md in this folder.

The lookup ``Y[n, m] = sum_c LUT[c, code[n, c], m]`` is the product of the one-hot code
matrix (N x 16C, one 1 per codebook) with the 8-bit LUT (16C x M), done with
``mma.sync.m16n8k32.u8.u8.s32`` (exact int32 sums). Each warp keeps the LUT of its 32
output columns in registers for the whole kernel (64 registers at C = 16), so the LUT
takes no shared memory and all of it goes to a deep pipeline of A tiles. The CUDA source
is encode_lookup_mma.cu beside this script, compiled after the library's prelude
(nimbus/arrays/kernels/cuda/prelude.cuh); trees of depth 4 (K = 16), C <= 16, compute
capability >= 8.0.

Fragment layouts (PTX ISA, mma.m16n8k32 with .u8), lane = 4 * g + t:
A (16 x 32, row): reg q holds rows g + 8 * (q & 1), columns 4t..4t+3 (+16 if q >= 2);
B (32 x 8, col): reg h holds rows 4t..4t+3 (+16 if h == 1) of column g;
C (16 x 8): c0, c1 = row g, columns 2t, 2t+1; c2, c3 = row g + 8.
K = 32 is two codebooks (rows 0..15: codebook 2ks, 16..31: codebook 2ks+1).

Run on a machine with a CUDA GPU and CuPy, from the repository root::

    python benchmarks/experiments/mma_fused.py --check      # bit-exactness only
    python benchmarks/experiments/mma_fused.py [--trials 9]  # check, then time

``--check`` compares the kernel with the reference (nimbus.arrays.kernels.reference)
bit for bit on ragged shapes, every pipeline variant and misaligned inputs, and checks
that a NaN in any batch is flagged; the timing compares it with the library's fused
kernel at the headline shape 65536 x 512 x 512, C = 16 (CUDA events, rotating buffers,
bench_gpu's Timer).
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


def _pow2_at_least(x):
    p = 1
    while p < x:
        p *= 2
    return p


def config(C, M, D, in_size, dev, nstage=None, mpw=None, stage_target=32 * 1024):
    """Launch plan (NT, MT, MPW, RB, NSTAGE, smem) of the kernel, or None when it does
    not apply.

    MT: the smallest power of two from 32 to 512 columns covering M (wider M: column
    tiles of 512, each re-encoding its rows); one warp per 32 columns and row group; row
    groups (up to 512 threads) and m-tiles per warp chosen so that a batch's A tile is
    about ``stage_target`` bytes; NSTAGE A tiles (up to ``nstage``, default as many as
    fit, at most 6) in the shared memory a block may use when ``512 // NT`` blocks share
    a multiprocessor.
    """
    if C < 1 or C > 16 or dev["cc"] < 80 or M < 1 or D < 1:
        return None
    mt = min(512, max(32, _pow2_at_least(M)))
    ncs = mt // 32
    row_bytes = D * in_size
    wps = 16 // ncs
    while wps > 1 and 16 * wps * row_bytes > stage_target:
        wps //= 2
    nt = 32 * ncs * wps
    if mpw is None:
        mpw = 2 if 32 * wps * row_bytes <= stage_target else 1
    rb = 16 * wps * mpw
    cp_ = (C + 3) // 4 * 4
    head = (8 * mt + C * 120 + 15) // 16 * 16 + (2 * rb * cp_ + 15) // 16 * 16
    tile = (rb * row_bytes + 15) // 16 * 16
    blocks = max(1, 512 // nt)
    budget = min(dev["smem_optin"], dev["smem_sm"] // blocks - 1024)
    fit = (budget - head) // tile if budget > head else 0
    ns = min(fit, nstage if nstage else 6)
    if ns < 2 or (nstage and ns < nstage):
        return None
    return nt, mt, mpw, rb, ns, head + ns * tile


def source(**defs):
    """Header of #defines, the library's prelude, then encode_lookup_mma.cu."""
    lines = []
    for role in ("IN", "OUT", "LUT"):
        ctype, size = _CTYPES[np.dtype(defs.pop(role, np.float32))]
        lines += [f"#define {role}_T {ctype}", f"#define {role}_SIZE {size}"]
    lines += [f"#define {k} {int(v)}" for k, v in defs.items()]
    with open(os.path.join(HERE, "encode_lookup_mma.cu"), encoding="utf-8") as f:
        body = f.read()
    return "\n".join(lines) + "\n" + cuda.load_source("prelude.cuh") + body


def _kernel(dev_id, **defs):
    key = (dev_id, tuple(sorted((k, str(v)) for k, v in defs.items())))
    if key not in _compiled:
        _compiled[key] = backend.cupy().RawKernel(source(**defs), "encode_lookup_mma_kernel")
    return _compiled[key]


def encode_lookup_mma(A, dims, thresholds, lut_q, scale, bias, out_dtype=np.float32, *,
                      nstage=None, mpw=None, check_finite=True):
    """``reference.encode_lookup_q`` on the tensor cores (depth-4 trees, C <= 16).

    A : (N, D) float32 or float16 CuPy array; dims (C, 15) int32; thresholds (C, 15)
    float32; lut_q (C, 16, M) uint8; scale, bias (M,) float32 -> (N, M) ``out_dtype``.
    Raises ValueError when the plan does not apply (C > 16, compute capability < 8.0,
    too many column tiles) or A holds NaN/Inf.
    """
    cp = backend.cupy()
    dev_id = A.device.id
    out_dt = np.dtype(out_dtype)
    A = cp.ascontiguousarray(A, dtype=np.float16 if A.dtype == np.float16 else np.float32)
    dims = cp.ascontiguousarray(dims, dtype=np.int32)
    thresholds = cp.ascontiguousarray(thresholds, dtype=np.float32)
    lut_q = cp.ascontiguousarray(lut_q, dtype=np.uint8)
    scale = cp.ascontiguousarray(scale, dtype=np.float32)
    bias = cp.ascontiguousarray(bias, dtype=np.float32)
    if dims.shape[1] != 15 or lut_q.shape[1] != 16:
        raise ValueError("the mma experiment takes depth-4 trees (K = 16) only")
    N, D = A.shape
    C, _, M = lut_q.shape
    dev = cuda.device_info(dev_id)
    cfg = config(C, M, D, A.itemsize, dev, nstage, mpw)
    if cfg is None or (M + cfg[1] - 1) // cfg[1] > 65535:
        raise ValueError(f"no mma plan for C={C}, M={M}, D={D}, nstage={nstage}, mpw={mpw}")
    nt, MT, MPW, RB, NS, smem = cfg
    Y = cp.empty((N, M), dtype=out_dt)
    flag = cp.zeros(1, dtype=np.int32)
    a_vec = int(cuda._aligned(A) and (D * A.itemsize) % 16 == 0)
    lut_vec = int(M % 4 == 0 and lut_q.data.ptr % 4 == 0)
    y_vec = int(cuda._aligned(Y) and (M * out_dt.itemsize) % 16 == 0)
    kern = _kernel(dev_id, IN=A.dtype, OUT=out_dt, NT=nt, NCB=C, MT=MT, MPW=MPW, NSTAGE=NS,
                   USE_CP_ASYNC=1)
    gy = (M + MT - 1) // MT
    gx = max(1, min((N + RB - 1) // RB,
                    -(-dev["sms"] * cuda._blocks_per_sm(kern, nt, smem, dev) // gy)))
    cuda._launch(kern, (gx, gy), nt, (A, dims, thresholds, lut_q, scale, bias, Y, flag,
                                      np.int32(N), np.int32(D), np.int32(M), np.int32(a_vec),
                                      np.int32(lut_vec), np.int32(y_vec)), smem, dev)
    if check_finite and int(flag.get()[0]):
        raise ValueError("A contains NaN or Inf")
    return Y


def _problem(rs, cp, N, D, C, M, in_dtype):
    """Rows with exact ties against the thresholds, depth-4 trees, an 8-bit LUT with a
    column of 255s (the worst case for the sums)."""
    A = rs.integers(-4, 5, size=(N, D)).astype(np.float32)
    A[:, : D // 2] += rs.standard_normal((N, D // 2)).astype(np.float32)
    dims = rs.integers(0, D, size=(C, 15)).astype(np.int32)
    thr = rs.integers(-3, 4, size=(C, 15)).astype(np.float32)
    thr[rs.random((C, 15)) < 0.1] = np.inf
    q = rs.integers(0, 256, size=(C, 16, M)).astype(np.uint8)
    q[:, :, 0] = 255
    scale = (rs.random(M) + 0.5).astype(np.float32)
    bias = rs.standard_normal(M).astype(np.float32)
    return tuple(cp.asarray(x) for x in (A.astype(in_dtype), dims, thr, q, scale, bias))


SHAPES = [  # (N, D, C, M): odd/even codebooks, M below one slice, ragged, two tiles
    (1, 1, 1, 1), (257, 37, 5, 7), (1000, 64, 16, 33), (517, 129, 16, 512),
    (3001, 64, 16, 512), (333, 40, 3, 100), (700, 24, 15, 700), (90, 16, 2, 1100),
]


def check(rs):
    """Bit-exactness against the reference; returns the number of cases checked."""
    cp = backend.cupy()
    n = 0
    for N, D, C, M in SHAPES:
        for in_dt, out_dt in ((np.float32, np.float32), (np.float16, np.float16),
                              (np.float16, np.float32)):
            args = _problem(rs, cp, N, D, C, M, in_dt)
            want = ref.encode_lookup_q(*args, out_dt).get()
            np.testing.assert_array_equal(encode_lookup_mma(*args, out_dt).get(), want)
            n += 1
    for in_dt in (np.float32, np.float16):          # every stage and code buffer reused
        args = _problem(rs, cp, 20011, 96, 16, 512, in_dt)
        want = ref.encode_lookup_q(*args, in_dt).get()
        for nstage in (2, 3, 6):
            for mpw in (1, 2):
                got = encode_lookup_mma(*args, in_dt, nstage=nstage, mpw=mpw).get()
                np.testing.assert_array_equal(got, want)
                n += 1
    A, dims, thr, q, scale, bias = _problem(rs, cp, 400, 64, 16, 36, np.float32)
    want = ref.encode_lookup_q(A, dims, thr, q, scale, bias).get()
    flat = cp.empty(A.size + 1, dtype=np.float32)
    flat[1:] = A.ravel()
    qflat = cp.empty(q.size + 1, dtype=np.uint8)
    qflat[1:] = q.ravel()
    for Av in (A, flat[1:].reshape(A.shape), cp.asfortranarray(A)):
        for qv in (q, qflat[1:].reshape(q.shape)):
            got = encode_lookup_mma(Av, dims, thr, qv, scale, bias).get()
            np.testing.assert_array_equal(got, want)
            n += 1
    A, dims, thr, q, scale, bias = _problem(rs, cp, 5000, 64, 16, 128, np.float16)
    for row in (0, 2500, 4999):
        bad = A.copy()
        bad[row, 63] = np.nan
        try:
            encode_lookup_mma(bad, dims, thr, q, scale, bias)
        except ValueError:
            n += 1
        else:
            raise AssertionError(f"NaN in row {row} not flagged")
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="bit-exactness only, no timing")
    ap.add_argument("--trials", type=int, default=9)
    args = ap.parse_args(argv)
    cp = backend.cupy()
    if cp is None or not backend.has_cuda():
        sys.exit("mma_fused needs CuPy and a CUDA device")
    if cuda.device_info(cp.cuda.Device().id)["cc"] < 80:
        sys.exit("mma_fused needs compute capability 8.0 or newer")
    rs = np.random.default_rng(0)
    print(f"check: {check(rs)} cases bit-exact against the reference", flush=True)
    if args.check:
        return
    from bench_gpu import Timer          # benchmarks/bench_gpu.py
    timer = Timer(cp, cuda, trials=args.trials)
    N, D, C, M = 65536, 512, 16, 512
    for dt in (np.float32, np.float16):
        nbuf = 4
        probs = [_problem(rs, cp, N, D, C, M, dt) for _ in range(nbuf)]
        lib = timer(lambda i: cuda.encode_lookup_q(*probs[i], dt, mode="fused",
                                                   check_finite=False), nbuf)
        row = [f"{np.dtype(dt).name} I/O: library fused {lib:.4f} ms"]
        for ns, mpw in ((3, 2), (6, 1)):
            t = timer(lambda i: encode_lookup_mma(*probs[i], dt, nstage=ns, mpw=mpw,
                                                  check_finite=False), nbuf)
            row.append(f"mma {ns} stages, {mpw} m-tiles {t:.4f} ms")
        print("; ".join(row), flush=True)


if __name__ == "__main__":
    main()
