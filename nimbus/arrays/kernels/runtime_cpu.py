"""CPU inference kernel for a converted network: a chain of 8-bit LUT layers in one call.

A converted network is a chain of layers l = 0..L-1, each a tree encoder and an 8-bit LUT:

* ``dims_l``       (C, K-1) int32, input column tested at each node, heap order (node 0 the
  root; the children of node i are 2i+1, taken when ``x <= t``, and 2i+2, when ``x > t``)
* ``thresholds_l`` (C, K-1) float32 (-inf: a folded ReLU; +inf: a bucket with no split)
* ``lut_l``        (C, K, M) uint8, K = 2**depth, depth 1..10
* ``scale_l``, ``bias_l`` (M,) float32

and computes, exactly as ``reference.encode_tree`` followed by ``reference.lookup_q``::

    code[n, c] = leaf reached walking tree c on row n          (0..K-1)
    isum[n, m] = sum_c lut[c, code[n, c], m]                    (exact integer)
    y[n, m]    = float32(isum[n, m]) * scale[m] + bias[m]       (float32 mul, then add)

``y`` is the next layer's input. :class:`ChainCPU` packs the layers once into a few flat
arrays; each call runs ONE compiled Numba function over the whole chain (``prange`` over
row blocks, numba.get_num_threads() tasks, each with its own scratch): every layer of a
block runs while its activations are in L1/L2. Two paths, both bitwise the reference:

* **SIMD** (every layer's K in 16/32/64, CPU with AVX-512 BW + VBMI + VNNI; picked at
  run time, see :func:`simd_supported`): blocks of 64 rows, transposed (16 x 16 tiles in
  registers) so that a tree node is one vector compare over 16 rows; the encoder and the
  lookup are LLVM intrinsics (byte permutes vpermb/vpermi2b over 4 codebooks' tables and
  vpdpbusd int32 sums; see the comment at "SIMD path"). Batches of a few rows take the
  plain loops (the SIMD path costs 16 rows).
* **plain loops** (any K, any CPU): blocks of ``BLOCK`` rows, a branch-free tree walk per
  row, then codebook-outer sums of LUT rows (contiguous M bytes) into uint16 rows, so
  that one codebook's K x M bytes of LUT stay in L1 while the block's rows read them.
  The sums are exact in uint16 for up to 257 codebooks (257 * 255 = 65535); a layer with
  more adds each run of 257 codebooks into an int32 row (``_U16_CODEBOOKS``).

The float step is a float32 multiply then a float32 add: Numba compiles without
fast-math, and the intrinsics emit fmul and fadd without contraction flags, so LLVM
does not fuse them into an FMA.

Measured (2-core Zen 4 shared with other jobs, so rough; one thread; the MLP
784-256-256-256-10). Depth 4 over 8 inputs per codebook (C = 98/32/32/32): SIMD 3.2-4.3
ms at batch 4096 (about 0.6-0.8 us per row: transpose 0.09, encode 0.2, lookup 0.3-0.36,
the lookup near 2 cycles per 64 lookups: vpermb-bound), 0.16-0.19 ms at 256, 0.018 ms
at 16, batch 1 (plain loops) 0.006 ms. Depth 5 over 4 inputs (C = 196/64/64/64, twice
the lookups): 5.5 ms at 4096, 0.29 ms at 256, 0.044 ms at 16, 0.0105 ms at 1. Plain
loops: 3-4 us per row at depth 4 over 8 inputs, 7.5 at depth 5 over 4, 9 at depth 9.
benchmarks/experiments/bench_runtime_cpu.py prints the table.
"""
from __future__ import annotations

import os

import numpy as np
import numba
from numba import njit, prange

BLOCK = 32              # rows per block: 32 rows x 256 float32 = 32 KB of activations
MAX_DEPTH = 10
_U16_CODEBOOKS = 257    # most codebooks whose byte sums cannot overflow a uint16

# columns of the per-layer metadata table (int64)
_C, _NN, _DEPTH, _M, _DIN, _DOFF, _LOFF, _SOFF = range(8)
_W, _COFF = 8, 9       # SIMD path only: distinct columns per tree (4, 8; 0: more), their offset
_NMETA = 8


# ----------------------------------------------------------------------------- kernels

@njit(inline="always")
def _walk(src, r0, nb, dims, thr, base, nn, depth, codes, c):
    # rows r0..r0+nb of src through tree c (nodes at dims/thr[base:base + nn]);
    # branch-free descent, node = 2 node + 1 + (x > t), four rows interleaved: each level
    # is a chain of dependent loads, and four independent chains in one loop body ran
    # 1.2x (depth 4) to 2x (depth 9) faster than one
    d = dims[base:base + nn]
    t = thr[base:base + nn]
    r = 0
    while r + 4 <= nb:
        a0 = src[r0 + r]
        a1 = src[r0 + r + 1]
        a2 = src[r0 + r + 2]
        a3 = src[r0 + r + 3]
        n0 = 0
        n1 = 0
        n2 = 0
        n3 = 0
        for _ in range(depth):
            n0 = 2 * n0 + 1 + (a0[d[n0]] > t[n0])
            n1 = 2 * n1 + 1 + (a1[d[n1]] > t[n1])
            n2 = 2 * n2 + 1 + (a2[d[n2]] > t[n2])
            n3 = 2 * n3 + 1 + (a3[d[n3]] > t[n3])
        codes[r, c] = n0 - nn
        codes[r + 1, c] = n1 - nn
        codes[r + 2, c] = n2 - nn
        codes[r + 3, c] = n3 - nn
        r += 4
    while r < nb:
        a = src[r0 + r]
        node = 0
        for _ in range(depth):
            node = 2 * node + 1 + (a[d[node]] > t[node])
        codes[r, c] = node - nn
        r += 1


@njit(inline="always")
def _walk_trees(a, dims, thr, doff, nn, depth, codes, r, C):
    # one row through all C trees, four trees interleaved (a batch of one row has no other
    # rows to interleave; four trees' chains of dependent loads overlap instead)
    c = 0
    while c + 4 <= C:
        b0 = doff + c * nn
        b1 = b0 + nn
        b2 = b1 + nn
        b3 = b2 + nn
        n0 = 0
        n1 = 0
        n2 = 0
        n3 = 0
        for _ in range(depth):
            n0 = 2 * n0 + 1 + (a[dims[b0 + n0]] > thr[b0 + n0])
            n1 = 2 * n1 + 1 + (a[dims[b1 + n1]] > thr[b1 + n1])
            n2 = 2 * n2 + 1 + (a[dims[b2 + n2]] > thr[b2 + n2])
            n3 = 2 * n3 + 1 + (a[dims[b3 + n3]] > thr[b3 + n3])
        codes[r, c] = n0 - nn
        codes[r, c + 1] = n1 - nn
        codes[r, c + 2] = n2 - nn
        codes[r, c + 3] = n3 - nn
        c += 4
    while c < C:
        b0 = doff + c * nn
        n0 = 0
        for _ in range(depth):
            n0 = 2 * n0 + 1 + (a[dims[b0 + n0]] > thr[b0 + n0])
        codes[r, c] = n0 - nn
        c += 1


@njit(inline="always")
def _encode(src, r0, nb, meta, l, dims, thr, codes):
    C = meta[l, _C]
    nn = meta[l, _NN]
    depth = meta[l, _DEPTH]
    doff = meta[l, _DOFF]
    if nb < 4:
        for r in range(nb):
            a = src[r0 + r]
            if depth == 4:
                _walk_trees(a, dims, thr, doff, nn, 4, codes, r, C)
            elif depth == 5:
                _walk_trees(a, dims, thr, doff, nn, 5, codes, r, C)
            else:
                _walk_trees(a, dims, thr, doff, nn, depth, codes, r, C)
        return
    for c in range(C):
        # a literal depth lets LLVM unroll the descent of the usual depths
        if depth == 4:
            _walk(src, r0, nb, dims, thr, doff + c * nn, nn, 4, codes, c)
        elif depth == 5:
            _walk(src, r0, nb, dims, thr, doff + c * nn, nn, 5, codes, c)
        elif depth == 6:
            _walk(src, r0, nb, dims, thr, doff + c * nn, nn, 6, codes, c)
        else:
            _walk(src, r0, nb, dims, thr, doff + c * nn, nn, depth, codes, c)


@njit(inline="always")
def _accumulate(nb, meta, l, lut, codes, acc16, acc32):
    """Exact LUT sums of the block's codes: acc16[:nb, :M] (uint16) when C <= 257, else
    acc32[:nb, :M] (int32). Returns True when the sums are in acc32."""
    C = meta[l, _C]
    K = meta[l, _NN] + 1
    M = meta[l, _M]
    loff = meta[l, _LOFF]
    wide = C > _U16_CODEBOOKS
    if wide:
        for r in range(nb):
            for m in range(M):
                acc32[r, m] = 0
    for c0 in range(0, C, _U16_CODEBOOKS):
        c1 = min(C, c0 + _U16_CODEBOOKS)
        for r in range(nb):
            for m in range(M):
                acc16[r, m] = 0
        # four codebooks per pass over a row of sums: a quarter of the loads and stores
        # of the uint16 row (4 x 255 fits in uint16 before it is added)
        c = c0
        while c + 4 <= c1:
            cbase = loff + c * K * M
            for r in range(nb):
                # 1-D slices per LUT row: with flat indices (row + m) LLVM kept the
                # negative-index wraparound and did not vectorise (20x slower)
                p0 = cbase + codes[r, c] * M
                p1 = cbase + (K + codes[r, c + 1]) * M
                p2 = cbase + (2 * K + codes[r, c + 2]) * M
                p3 = cbase + (3 * K + codes[r, c + 3]) * M
                l0 = lut[p0:p0 + M]
                l1 = lut[p1:p1 + M]
                l2 = lut[p2:p2 + M]
                l3 = lut[p3:p3 + M]
                arow = acc16[r]
                for m in range(M):
                    arow[m] += (l0[m] + l1[m]) + (l2[m] + l3[m])
            c += 4
        while c < c1:
            cbase = loff + c * K * M
            for r in range(nb):
                row = cbase + codes[r, c] * M
                lrow = lut[row:row + M]
                arow = acc16[r]
                for m in range(M):
                    arow[m] += lrow[m]
            c += 1
        if wide:
            for r in range(nb):
                for m in range(M):
                    acc32[r, m] += acc16[r, m]
    return wide


@njit(inline="always")
def _dequant(nb, meta, l, sb, acc16, acc32, wide, dst, d0):
    # dst[d0 + r, m] = float32(isum) * scale[m] + bias[m]
    M = meta[l, _M]
    soff = meta[l, _SOFF]
    if wide:
        for r in range(nb):
            for m in range(M):
                dst[d0 + r, m] = np.float32(acc32[r, m]) * sb[soff + m] + sb[soff + M + m]
    else:
        for r in range(nb):
            for m in range(M):
                dst[d0 + r, m] = np.float32(acc16[r, m]) * sb[soff + m] + sb[soff + M + m]


@njit(inline="always")
def _nonfinite(Xbits, n0, nb):
    # 1 if rows n0..n0+nb of X (its float32 bits) hold a NaN or Inf (exponent all ones):
    # an integer OR over the rows, which LLVM vectorises (a float test would not be)
    D = Xbits.shape[1]
    hit = np.uint32(0)
    for r in range(n0, n0 + nb):
        for d in range(D):
            hit |= np.uint32((Xbits[r, d] & 0x7F800000) == 0x7F800000)
    return hit


@njit(inline="always")
def _run_block(X, out, n0, nb, meta, dims, thr, lut, sb, buf0, buf1, codes, acc16, acc32):
    # every layer of rows n0..n0+nb; activations ping-pong between buf0 and buf1
    L = meta.shape[0]
    _encode(X, n0, nb, meta, 0, dims, thr, codes)
    wide = _accumulate(nb, meta, 0, lut, codes, acc16, acc32)
    if L == 1:
        _dequant(nb, meta, 0, sb, acc16, acc32, wide, out, n0)
        return
    _dequant(nb, meta, 0, sb, acc16, acc32, wide, buf0, 0)
    for l in range(1, L):
        src = buf0 if l % 2 == 1 else buf1
        dst = buf1 if l % 2 == 1 else buf0
        _encode(src, 0, nb, meta, l, dims, thr, codes)
        wide = _accumulate(nb, meta, l, lut, codes, acc16, acc32)
        if l == L - 1:
            _dequant(nb, meta, l, sb, acc16, acc32, wide, out, n0)
        else:
            _dequant(nb, meta, l, sb, acc16, acc32, wide, dst, 0)


@njit(inline="always")
def _scratch(meta):
    maxc = 1
    maxm = 1
    for l in range(meta.shape[0]):
        maxc = max(maxc, meta[l, _C])
        maxm = max(maxm, meta[l, _M])
    buf0 = np.empty((BLOCK, maxm), dtype=np.float32)
    buf1 = np.empty((BLOCK, maxm), dtype=np.float32)
    codes = np.empty((BLOCK, maxc), dtype=np.int32)
    acc16 = np.empty((BLOCK, maxm), dtype=np.uint16)
    acc32 = np.empty((BLOCK, maxm), dtype=np.int32)
    return buf0, buf1, codes, acc16, acc32


@njit(cache=True, nogil=True)
def _chain_serial(X, Xbits, out, meta, dims, thr, lut, sb, check):
    # one thread, no parallel region to start: small batches pay only the call.
    # check: scan each block for NaN/Inf as it is read; returns 1 if one was found
    N = X.shape[0]
    bad = 0
    buf0, buf1, codes, acc16, acc32 = _scratch(meta)
    for n0 in range(0, N, BLOCK):
        nb = min(BLOCK, N - n0)
        if check and _nonfinite(Xbits, n0, nb):
            bad = 1
        _run_block(X, out, n0, nb, meta, dims, thr, lut, sb, buf0, buf1, codes, acc16, acc32)
    return bad


@njit(cache=True, nogil=True, parallel=True)
def _chain_parallel(X, Xbits, out, meta, dims, thr, lut, sb, check, ntasks):
    # ntasks tasks, each with its own scratch, take the blocks t, t + ntasks, ...
    N = X.shape[0]
    nblocks = (N + BLOCK - 1) // BLOCK
    bad = np.zeros(ntasks, dtype=np.int64)
    for t in prange(ntasks):
        buf0, buf1, codes, acc16, acc32 = _scratch(meta)
        for b in range(t, nblocks, ntasks):
            n0 = b * BLOCK
            nb = min(BLOCK, N - n0)
            if check and _nonfinite(Xbits, n0, nb):
                bad[t] = 1
            _run_block(X, out, n0, nb, meta, dims, thr, lut, sb, buf0, buf1, codes,
                       acc16, acc32)
    return bad.max()


# ----------------------------------------------------------------------------- SIMD path
#
# For K in {16, 32, 64} on CPUs with AVX-512 VBMI and VNNI, a byte permute does 64 LUT
# lookups at once and vpdpbusd adds each four of them into int32 sums:
#
# * four codebooks form a group g; the LUT is re-laid per output column m as one table
#   of 4K bytes, ``lutP[m, g, j*K + k] = lut[4g + j, k, m]`` (codebooks past C: zeros);
# * the codes of 16 rows in group g make one 64-byte index vector,
#   ``idx[g, rg, 4r + j] = j*K + code[16 rg + r, 4g + j]``;
# * vpermb (K = 16: the 64-byte table in one register), vpermi2b (K = 32: 128 bytes in
#   two) or two vpermi2b and a select by byte position (K = 64) give the 64 bytes
#   ``lut[4g + j, code, m]`` at positions 4r + j, and ``vpdpbusd(acc, bytes, 1)`` adds
#   the four of row r into int32 lane r: exact sums, no widening steps, no overflow.
#
# The m-outer, g-inner loop keeps R accumulators (R row groups of 16 rows) in registers
# over all groups, then writes float32(acc) * scale[m] + bias[m] (the same two roundings
# as the reference) into row m of a transposed activation block (D, BLOCK_SIMD): the
# layout the next layer's encoder reads with contiguous loads over rows.

BLOCK_SIMD = 64          # rows per block on the SIMD path: 4 groups of 16 rows
_SIMD_K = (16, 32, 64)
_PAD = 64
_SIMD_MIN_ROWS_ONE_LAYER = 64
_U4 = 1


def simd_supported():
    """True when this CPU has the AVX-512 BW, VBMI and VNNI instructions the SIMD path uses
    (and the environment variable NIMBUS_NO_SIMD is unset or "0": set it to run and test
    the plain loops alone, as on another CPU)."""
    if os.environ.get("NIMBUS_NO_SIMD", "0") not in ("", "0"):
        return False
    try:
        import llvmlite.binding as llb
        feats = set(llb.get_host_cpu_features().flatten().split(","))
    except Exception:     # noqa: BLE001 - no feature list: take the plain loops
        return False
    return {"+avx512f", "+avx512bw", "+avx512vbmi", "+avx512vnni"} <= feats


def _make_lut_intrinsic(K, R, U):
    """A Numba intrinsic ``f(lutP, loff, idx, G, M, sb, soff, dst)`` running one layer's
    lookup for R groups of 16 rows (see the comment above), U output columns at a time
    (R * U independent vpdpbusd chains hide its latency; the last M % U columns go one
    at a time); K, R and U are fixed when it is built."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i8x64 = ir.VectorType(ir.IntType(8), 64)
    i32x16 = ir.VectorType(ir.IntType(32), 16)
    f32x16 = ir.VectorType(ir.FloatType(), 16)
    nbytes = 4 * K                      # one group's table for one column

    @intrinsic
    def lut_rows(typingctx, lutP, loff, idx, G, M, sb, soff, dst):
        sig = types.void(lutP, types.intp, idx, types.intp, types.intp, sb, types.intp, dst)

        def codegen(context, builder, signature, args):
            a_lut, a_loff, a_idx, a_G, a_M, a_sb, a_soff, a_dst = args
            t_lut, _, t_idx, _, _, t_sb, _, t_dst = signature.args
            lp = context.make_array(t_lut)(context, builder, a_lut).data
            ip = context.make_array(t_idx)(context, builder, a_idx).data
            sp = context.make_array(t_sb)(context, builder, a_sb).data
            dp = context.make_array(t_dst)(context, builder, a_dst).data
            mod = builder.module
            if K == 16:
                perm = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(i8x64, [i8x64, i8x64]), "llvm.x86.avx512.permvar.qi.512")
            else:
                perm = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(i8x64, [i8x64, i8x64, i8x64]),
                    "llvm.x86.avx512.vpermi2var.qi.512")
            dpbusd = cgutils.get_or_insert_function(
                mod, ir.FunctionType(i32x16, [i32x16, i32x16, i32x16]),
                "llvm.x86.avx512.vpdpbusd.512")
            intp = a_G.type
            ones = ir.Constant(i32x16, [ir.Constant(ir.IntType(32), 0x01010101)] * 16)
            zero = ir.Constant(i32x16, [ir.Constant(ir.IntType(32), 0)] * 16)
            upper = ir.Constant(ir.VectorType(ir.IntType(1), 64),
                                [ir.Constant(ir.IntType(1), int(i % 4 >= 2)) for i in range(64)])
            accs = [[cgutils.alloca_once(builder, i32x16) for _ in range(R)] for _ in range(U)]

            def vload(base, off, vt, align):
                return builder.load(builder.bitcast(builder.gep(base, [off]), vt.as_pointer()),
                                    align=align)

            def lookup(tabs, iv):
                if K == 16:
                    return builder.call(perm, [tabs[0], iv])
                if K == 32:
                    return builder.call(perm, [tabs[0], iv, tabs[1]])
                lo = builder.call(perm, [tabs[0], iv, tabs[1]])
                hi = builder.call(perm, [tabs[2], iv, tabs[3]])
                # byte 4r + j holds j*64 + code: vpermi2b reads its low 7 bits, so the
                # pair (tables 0, 1) serves j = 0, 1 and the pair (2, 3) serves j = 2, 3;
                # the choice is by position, a constant mask (a merge-masked permute)
                return builder.select(upper, hi, lo)

            def columns(m0, u):
                # columns m0 .. m0+u-1: sums over all groups, then the float rows
                for a in accs[:u]:
                    for ar in a:
                        builder.store(zero, ar)
                with cgutils.for_range(builder, a_G) as gl:
                    g = gl.index
                    ib = builder.mul(g, intp(64 * R))
                    ivs = [vload(ip, builder.add(ib, intp(64 * rg)), i8x64, 1)
                           for rg in range(R)]
                    for k in range(u):
                        tb = builder.mul(builder.add(builder.mul(builder.add(m0, intp(k)), a_G),
                                                     g), intp(nbytes))
                        tb = builder.add(a_loff, tb)
                        tabs = [vload(lp, builder.add(tb, intp(64 * i)), i8x64, 1)
                                for i in range(nbytes // 64)]
                        for rg in range(R):
                            p = lookup(tabs, ivs[rg])
                            acc = builder.load(accs[k][rg])
                            builder.store(builder.call(dpbusd, [acc, builder.bitcast(p, i32x16),
                                                                ones]), accs[k][rg])
                for k in range(u):
                    m = builder.add(m0, intp(k))
                    scale = builder.load(builder.gep(sp, [builder.add(a_soff, m)]))
                    bias = builder.load(builder.gep(sp, [builder.add(builder.add(a_soff, a_M),
                                                                     m)]))
                    svec = ir.Constant(f32x16, ir.Undefined)
                    bvec = ir.Constant(f32x16, ir.Undefined)
                    for i in range(16):
                        svec = builder.insert_element(svec, scale, ir.Constant(ir.IntType(32), i))
                        bvec = builder.insert_element(bvec, bias, ir.Constant(ir.IntType(32), i))
                    drow = builder.mul(m, intp(BLOCK_SIMD))
                    for rg in range(R):
                        f = builder.sitofp(builder.load(accs[k][rg]), f32x16)
                        y = builder.fadd(builder.fmul(f, svec), bvec)   # no FMA: as reference
                        ptr = builder.gep(dp, [builder.add(drow, intp(16 * rg))])
                        builder.store(y, builder.bitcast(ptr, f32x16.as_pointer()), align=4)

            nfull = builder.sdiv(a_M, intp(U))
            with cgutils.for_range(builder, nfull) as ml:
                columns(builder.mul(ml.index, intp(U)), U)
            if U > 1:
                done = builder.mul(nfull, intp(U))
                with cgutils.for_range(builder, builder.sub(a_M, done)) as ml:
                    columns(builder.add(done, ml.index), 1)
            return context.get_dummy_value()

        return sig, codegen

    return lut_rows


def _make_encode_intrinsic(K, R):
    """A Numba intrinsic ``f(srcT, dims, thr, doff, C, idx)`` encoding one layer for R
    groups of 16 rows: srcT (D, BLOCK_SIMD) float32, the block transposed; the trees'
    nodes at ``dims/thr[doff + c*(K-1) + node]``; writes the index vectors
    ``idx[(g*R + rg)*64 + 4r + j] = j*K + code[16 rg + r, 4g + j]`` (codebooks past C:
    code 0, a zero table). K (so the depth) and R are fixed when it is built.

    Per codebook and 16 rows, each node is one vector compare of a row of srcT with the
    node's threshold, OR-ed as bit ``node`` of a per-row mask (all nodes unrolled: no
    loop overhead, no aliasing question); the descent then reads the bits of its path
    from the mask (vector shifts), and four codebooks' codes, shifted into the four
    bytes of an int32 lane, make the 64-byte index vector with one store."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    nn = K - 1
    depth = K.bit_length() - 1
    # node j's bit: nodes 0..30 (levels 0-4) are bits 0..30 of word 0, the 32 nodes
    # 31..62 of level 5 (K = 64) bits 0..31 of word 1: int32 lanes (an int64 mask per
    # row doubled the vector work of every node)
    lane = ir.IntType(32)
    vm = ir.VectorType(lane, 16)
    nwords = 1 if nn <= 31 else 2
    i32 = ir.IntType(32)
    i32x16 = ir.VectorType(i32, 16)
    f32x16 = ir.VectorType(ir.FloatType(), 16)

    def splat(vt, value):
        return ir.Constant(vt, [ir.Constant(vt.element, value)] * 16)

    @intrinsic
    def encode_rows(typingctx, srcT, dims, thr, doff, C, idx):
        sig = types.void(srcT, dims, thr, types.intp, types.intp, idx)

        def codegen(context, builder, signature, args):
            a_src, a_dims, a_thr, a_doff, a_C, a_idx = args
            t_src, t_dims, t_thr, _, _, t_idx = signature.args
            sp = context.make_array(t_src)(context, builder, a_src).data
            dp = context.make_array(t_dims)(context, builder, a_dims).data
            tp = context.make_array(t_thr)(context, builder, a_thr).data
            ip = context.make_array(t_idx)(context, builder, a_idx).data
            intp = a_doff.type
            zero_m = splat(vm, 0)
            one_m = splat(vm, 1)
            two_m = splat(vm, 2)
            G = builder.sdiv(builder.add(a_C, intp(3)), intp(4))
            with cgutils.for_range(builder, G) as gl:
                g = gl.index
                combined = [splat(i32x16, 0)] * R
                for jj in range(4):
                    c = builder.add(builder.mul(g, intp(4)), intp(jj))
                    valid = builder.icmp_signed("<", c, a_C)
                    c = builder.select(valid, c, builder.sub(a_C, intp(1)))
                    base = builder.add(a_doff, builder.mul(c, intp(nn)))
                    masks = [[zero_m] * nwords for _ in range(R)]
                    for j in range(nn):
                        pos = builder.add(base, intp(j))
                        d = builder.sext(builder.load(builder.gep(dp, [pos])), intp)
                        t = builder.load(builder.gep(tp, [pos]))
                        tv = ir.Constant(f32x16, ir.Undefined)
                        for i in range(16):
                            tv = builder.insert_element(tv, t, i32(i))
                        row = builder.gep(sp, [builder.mul(d, intp(BLOCK_SIMD))])
                        word, b = (0, j) if j < 31 else (1, j - 31)
                        bit = splat(vm, 1 << b if b < 31 else -(1 << 31))   # int32 bit b
                        for rg in range(R):
                            p = builder.bitcast(builder.gep(row, [intp(16 * rg)]),
                                                f32x16.as_pointer())
                            x = builder.load(p, align=4)
                            right = builder.fcmp_ordered(">", x, tv)
                            masks[rg][word] = builder.or_(masks[rg][word],
                                                          builder.select(right, bit, zero_m))
                    for rg in range(R):
                        node = zero_m
                        for level in range(depth):
                            # level 5 reads word 1, its bit = node - 31
                            if level < 5:
                                b = builder.lshr(masks[rg][0], node)
                            else:
                                b = builder.lshr(masks[rg][1],
                                                 builder.sub(node, splat(vm, 31)))
                            b = builder.and_(b, one_m)
                            node = builder.add(builder.add(builder.mul(node, two_m), one_m), b)
                        code = builder.sub(node, splat(vm, nn))
                        code = builder.select(valid, code, splat(i32x16, 0))
                        code = builder.shl(builder.add(code, splat(i32x16, jj * K)),
                                           splat(i32x16, 8 * jj))
                        combined[rg] = builder.or_(combined[rg], code)
                for rg in range(R):
                    off = builder.add(builder.mul(g, intp(64 * R)), intp(64 * rg))
                    p = builder.bitcast(builder.gep(ip, [off]), i32x16.as_pointer())
                    builder.store(combined[rg], p, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return encode_rows


def _make_encode_gather_intrinsic(K, R):
    """Like :func:`_make_encode_intrinsic` (same arguments and output) for K = 32, 64:
    levels 0-3 as there (15 node tests into a mask), then levels 4 and 5 one step each:
    each row's node is a vector over 16 rows, the node's column and threshold come from
    the level's table by a register permute (vpermd/vpermps; vpermi2d/vpermi2ps for the
    32 nodes of level 5) and x by a gather from srcT. Gathers are slow on Zen 4 (about
    2.7 ns per codebook and row for all four levels of a depth-4 tree, 0.9 by the mask),
    but one gather replaces the 16 or 32 node tests of a deep level. Reads up to 16
    entries past a tree's last node: the packed dims and thresholds end with ``_PAD``
    spare entries."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    nn = K - 1
    depth = K.bit_length() - 1
    i32 = ir.IntType(32)
    i64 = ir.IntType(64)
    i32x16 = ir.VectorType(i32, 16)
    i64x16 = ir.VectorType(i64, 16)
    f32x16 = ir.VectorType(ir.FloatType(), 16)
    fptrx16 = ir.VectorType(ir.PointerType(ir.FloatType()), 16)
    all1 = ir.Constant(ir.VectorType(ir.IntType(1), 16), [ir.Constant(ir.IntType(1), 1)] * 16)

    def splat(vt, value):
        return ir.Constant(vt, [ir.Constant(vt.element, value)] * 16)

    @intrinsic
    def encode_rows(typingctx, srcT, dims, thr, doff, C, idx):
        sig = types.void(srcT, dims, thr, types.intp, types.intp, idx)

        def codegen(context, builder, signature, args):
            a_src, a_dims, a_thr, a_doff, a_C, a_idx = args
            t_src, t_dims, t_thr, _, _, t_idx = signature.args
            sp = context.make_array(t_src)(context, builder, a_src).data
            dp = context.make_array(t_dims)(context, builder, a_dims).data
            tp = context.make_array(t_thr)(context, builder, a_thr).data
            ip = context.make_array(t_idx)(context, builder, a_idx).data
            intp = a_doff.type
            mod = builder.module
            fn = cgutils.get_or_insert_function
            permd = fn(mod, ir.FunctionType(i32x16, [i32x16, i32x16]),
                       "llvm.x86.avx512.permvar.si.512")
            permps = fn(mod, ir.FunctionType(f32x16, [f32x16, i32x16]),
                        "llvm.x86.avx512.permvar.sf.512")
            perm2d = fn(mod, ir.FunctionType(i32x16, [i32x16, i32x16, i32x16]),
                        "llvm.x86.avx512.vpermi2var.d.512")
            perm2ps = fn(mod, ir.FunctionType(f32x16, [f32x16, i32x16, f32x16]),
                         "llvm.x86.avx512.vpermi2var.ps.512")
            gather = fn(mod, ir.FunctionType(f32x16, [fptrx16, i32, all1.type, f32x16]),
                        "llvm.masked.gather.v16f32.v16p0")
            iota = ir.Constant(i32x16, [i32(i) for i in range(16)])
            base_int = builder.ptrtoint(sp, i64)
            vbase = ir.Constant(i64x16, ir.Undefined)
            for i in range(16):
                vbase = builder.insert_element(vbase, base_int, i32(i))

            def vload(ptr, off, vt):
                return builder.load(builder.bitcast(builder.gep(ptr, [off]), vt.as_pointer()),
                                    align=4)

            G = builder.sdiv(builder.add(a_C, intp(3)), intp(4))
            with cgutils.for_range(builder, G) as gl:
                g = gl.index
                combined = [splat(i32x16, 0)] * R
                for jj in range(4):
                    c = builder.add(builder.mul(g, intp(4)), intp(jj))
                    valid = builder.icmp_signed("<", c, a_C)
                    c = builder.select(valid, c, builder.sub(a_C, intp(1)))
                    base = builder.add(a_doff, builder.mul(c, intp(nn)))
                    # levels 0-3 (15 nodes): every node tested with a contiguous load of
                    # its row, bits of a per-row mask, then the walk over the mask
                    masks = [splat(i32x16, 0)] * R
                    for j in range(15):
                        pos = builder.add(base, intp(j))
                        d = builder.sext(builder.load(builder.gep(dp, [pos])), intp)
                        t = builder.load(builder.gep(tp, [pos]))
                        tv = ir.Constant(f32x16, ir.Undefined)
                        for i in range(16):
                            tv = builder.insert_element(tv, t, i32(i))
                        row = builder.gep(sp, [builder.mul(d, intp(BLOCK_SIMD))])
                        for rg in range(R):
                            x = vload(row, intp(16 * rg), f32x16)
                            right = builder.fcmp_ordered(">", x, tv)
                            masks[rg] = builder.or_(masks[rg], builder.select(
                                right, splat(i32x16, 1 << j), splat(i32x16, 0)))
                    rel = []
                    for rg in range(R):
                        node = splat(i32x16, 0)
                        for _ in range(4):
                            b = builder.and_(builder.lshr(masks[rg], node), splat(i32x16, 1))
                            node = builder.add(builder.add(node, node),
                                               builder.add(splat(i32x16, 1), b))
                        rel.append(builder.sub(node, splat(i32x16, 15)))   # within level 4
                    # levels 4 and 5 (16 and 32 nodes): gathers
                    for level in range(4, depth):
                        start = builder.add(base, intp((1 << level) - 1))
                        dt = [vload(dp, builder.add(start, intp(16 * h)), i32x16)
                              for h in range(1 if level < 5 else 2)]
                        tt = [vload(tp, builder.add(start, intp(16 * h)), f32x16)
                              for h in range(1 if level < 5 else 2)]
                        for rg in range(R):
                            if level < 5:
                                dv = builder.call(permd, [dt[0], rel[rg]])
                                tv = builder.call(permps, [tt[0], rel[rg]])
                            else:
                                dv = builder.call(perm2d, [dt[0], rel[rg], dt[1]])
                                tv = builder.call(perm2ps, [tt[0], rel[rg], tt[1]])
                            # element index dims * BLOCK_SIMD + 16 rg + lane, in bytes
                            e = builder.add(builder.mul(dv, splat(i32x16, BLOCK_SIMD)),
                                            builder.add(iota, splat(i32x16, 16 * rg)))
                            addr = builder.add(vbase, builder.mul(builder.sext(e, i64x16),
                                                                  splat(i64x16, 4)))
                            x = builder.call(gather, [builder.inttoptr(addr, fptrx16), i32(4),
                                                      all1, ir.Constant(f32x16, ir.Undefined)])
                            right = builder.zext(builder.fcmp_ordered(">", x, tv), i32x16)
                            rel[rg] = builder.add(builder.add(rel[rg], rel[rg]), right)
                    for rg in range(R):
                        code = builder.select(valid, rel[rg], splat(i32x16, 0))
                        code = builder.shl(builder.add(code, splat(i32x16, jj * K)),
                                           splat(i32x16, 8 * jj))
                        combined[rg] = builder.or_(combined[rg], code)
                for rg in range(R):
                    off = builder.add(builder.mul(g, intp(64 * R)), intp(64 * rg))
                    p = builder.bitcast(builder.gep(ip, [off]), i32x16.as_pointer())
                    builder.store(combined[rg], p, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return encode_rows


def _make_encode_local_intrinsic(K, R, W):
    """Like :func:`_make_encode_intrinsic` (same output), for layers whose trees each test
    at most W (4 or 8) distinct columns -- a converted layer's codebook tests only its
    own slice of inputs. ``f(srcT, loc, thr, doff, coff, C, idx)``: ``loc[doff + c*(K-1)
    + node]`` is the node's column as an index into the tree's own column list
    ``loc[coff + c*W : coff + (c+1)*W]`` (absolute columns of srcT).

    Per codebook and 16 rows, the W columns are loaded once; then one step per level:
    the node's local column and threshold come from the level's table by a register
    permute (vpermd/vpermps; vpermi2d/vpermi2ps for the 32 nodes of level 5), x is
    picked from the W column vectors by log2(W) levels of blends, one compare. depth
    steps of about 10 vector instructions, where the mask encoder tests all K-1 nodes
    and the gather one waits on gathers. Reads up to 16 entries past a tree's last node
    (the packed arrays end with ``_PAD`` spare entries)."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    nn = K - 1
    depth = K.bit_length() - 1
    i32 = ir.IntType(32)
    i32x16 = ir.VectorType(i32, 16)
    f32x16 = ir.VectorType(ir.FloatType(), 16)
    nbits = W.bit_length() - 1

    def splat(vt, value):
        return ir.Constant(vt, [ir.Constant(vt.element, value)] * 16)

    @intrinsic
    def encode_rows(typingctx, srcT, loc, thr, doff, coff, C, idx):
        sig = types.void(srcT, loc, thr, types.intp, types.intp, types.intp, idx)

        def codegen(context, builder, signature, args):
            a_src, a_loc, a_thr, a_doff, a_coff, a_C, a_idx = args
            t_src, t_loc, t_thr, _, _, _, t_idx = signature.args
            sp = context.make_array(t_src)(context, builder, a_src).data
            lp = context.make_array(t_loc)(context, builder, a_loc).data
            tp = context.make_array(t_thr)(context, builder, a_thr).data
            ip = context.make_array(t_idx)(context, builder, a_idx).data
            intp = a_doff.type
            mod = builder.module
            fn = cgutils.get_or_insert_function
            permd = fn(mod, ir.FunctionType(i32x16, [i32x16, i32x16]),
                       "llvm.x86.avx512.permvar.si.512")
            permps = fn(mod, ir.FunctionType(f32x16, [f32x16, i32x16]),
                        "llvm.x86.avx512.permvar.sf.512")
            perm2d = fn(mod, ir.FunctionType(i32x16, [i32x16, i32x16, i32x16]),
                        "llvm.x86.avx512.vpermi2var.d.512")
            perm2ps = fn(mod, ir.FunctionType(f32x16, [f32x16, i32x16, f32x16]),
                         "llvm.x86.avx512.vpermi2var.ps.512")
            zero = splat(i32x16, 0)

            def vload(ptr, off, vt):
                return builder.load(builder.bitcast(builder.gep(ptr, [off]), vt.as_pointer()),
                                    align=4)

            G = builder.sdiv(builder.add(a_C, intp(3)), intp(4))
            with cgutils.for_range(builder, G) as gl:
                g = gl.index
                combined = [zero] * R
                for jj in range(4):
                    c = builder.add(builder.mul(g, intp(4)), intp(jj))
                    valid = builder.icmp_signed("<", c, a_C)
                    c = builder.select(valid, c, builder.sub(a_C, intp(1)))
                    base = builder.add(a_doff, builder.mul(c, intp(nn)))
                    cbase = builder.add(a_coff, builder.mul(c, intp(W)))
                    rows = []
                    for i in range(W):
                        col = builder.sext(builder.load(builder.gep(lp, [builder.add(
                            cbase, intp(i))])), intp)
                        rows.append(builder.gep(sp, [builder.mul(col, intp(BLOCK_SIMD))]))
                    xs = [[vload(rows[i], intp(16 * rg), f32x16) for i in range(W)]
                          for rg in range(R)]
                    rel = [zero] * R
                    for level in range(depth):
                        start = builder.add(base, intp((1 << level) - 1))
                        nt = 1 if level < 5 else 2
                        lt = [vload(lp, builder.add(start, intp(16 * h)), i32x16)
                              for h in range(nt)]
                        tt = [vload(tp, builder.add(start, intp(16 * h)), f32x16)
                              for h in range(nt)]
                        for rg in range(R):
                            if nt == 1:
                                li = builder.call(permd, [lt[0], rel[rg]])
                                tv = builder.call(permps, [tt[0], rel[rg]])
                            else:
                                li = builder.call(perm2d, [lt[0], rel[rg], lt[1]])
                                tv = builder.call(perm2ps, [tt[0], rel[rg], tt[1]])
                            cand = xs[rg]
                            for b in range(nbits):          # pick x by the bits of li
                                on = builder.icmp_unsigned(
                                    "!=", builder.and_(li, splat(i32x16, 1 << b)), zero)
                                cand = [builder.select(on, cand[2 * i + 1], cand[2 * i])
                                        for i in range(len(cand) // 2)]
                            right = builder.zext(builder.fcmp_ordered(">", cand[0], tv), i32x16)
                            rel[rg] = builder.add(builder.add(rel[rg], rel[rg]), right)
                    for rg in range(R):
                        code = builder.select(valid, rel[rg], zero)
                        code = builder.shl(builder.add(code, splat(i32x16, jj * K)),
                                           splat(i32x16, 8 * jj))
                        combined[rg] = builder.or_(combined[rg], code)
                for rg in range(R):
                    off = builder.add(builder.mul(g, intp(64 * R)), intp(64 * rg))
                    p = builder.bitcast(builder.gep(ip, [off]), i32x16.as_pointer())
                    builder.store(combined[rg], p, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return encode_rows


def _make_transpose16():
    """A Numba intrinsic ``f(src, soff, sstride, dst, doff, dstride)``: the 16 x 16 float32
    tile at ``src.flat[soff + i*sstride + j]`` written transposed to
    ``dst.flat[doff + j*dstride + i]``, in registers: 16 loads, 64 two-register
    shuffles, 16 stores (element by element it cost 3x more)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    f32x16 = ir.VectorType(ir.FloatType(), 16)
    i32 = ir.IntType(32)
    lo = ir.Constant(ir.VectorType(i32, 16), [i32(k) for i in range(8) for k in (i, 16 + i)])
    hi = ir.Constant(ir.VectorType(i32, 16),
                     [i32(k) for i in range(8, 16) for k in (i, 16 + i)])

    @intrinsic
    def transpose16(typingctx, src, soff, sstride, dst, doff, dstride):
        sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            a_src, a_soff, a_ss, a_dst, a_doff, a_ds = args
            sp = context.make_array(signature.args[0])(context, builder, a_src).data
            dp = context.make_array(signature.args[3])(context, builder, a_dst).data
            intp = a_soff.type

            def at(base, off, stride, i):
                p = builder.gep(base, [builder.add(off, builder.mul(stride, intp(i)))])
                return builder.bitcast(p, f32x16.as_pointer())

            rows = [builder.load(at(sp, a_soff, a_ss, i), align=4) for i in range(16)]
            # interleaving rows i and i+8 (low halves -> row 2i, high -> 2i+1) rotates the
            # 8-bit index (row, column) left by one bit; four times swaps row and column
            for _ in range(4):
                nxt = []
                for i in range(8):
                    nxt.append(builder.shuffle_vector(rows[i], rows[i + 8], lo))
                    nxt.append(builder.shuffle_vector(rows[i], rows[i + 8], hi))
                rows = nxt
            for i in range(16):
                builder.store(rows[i], at(dp, a_doff, a_ds, i), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return transpose16


_SIMD = simd_supported()
if _SIMD:
    _transpose16 = _make_transpose16()
    # one row group: 4 columns in flight; four row groups: 1 column (4 chains either way)
    _lut16_r1, _lut16_r4 = _make_lut_intrinsic(16, 1, 4), _make_lut_intrinsic(16, 4, _U4)
    _lut32_r1, _lut32_r4 = _make_lut_intrinsic(32, 1, 4), _make_lut_intrinsic(32, 4, _U4)
    _lut64_r1, _lut64_r4 = _make_lut_intrinsic(64, 1, 4), _make_lut_intrinsic(64, 4, _U4)

    _enc16_r1, _enc16_r4 = _make_encode_intrinsic(16, 1), _make_encode_intrinsic(16, 4)
    _enc32_r1, _enc32_r4 = (_make_encode_gather_intrinsic(32, 1),
                            _make_encode_gather_intrinsic(32, 4))
    _enc64_r1, _enc64_r4 = (_make_encode_gather_intrinsic(64, 1),
                            _make_encode_gather_intrinsic(64, 4))

    @njit(inline="always")
    def _simd_encode_k(K, R, srcT, dims, thr, doff, C, idx):
        if R == 1:
            if K == 16:
                _enc16_r1(srcT, dims, thr, doff, C, idx)
            elif K == 32:
                _enc32_r1(srcT, dims, thr, doff, C, idx)
            else:
                _enc64_r1(srcT, dims, thr, doff, C, idx)
        else:
            if K == 16:
                _enc16_r4(srcT, dims, thr, doff, C, idx)
            elif K == 32:
                _enc32_r4(srcT, dims, thr, doff, C, idx)
            else:
                _enc64_r4(srcT, dims, thr, doff, C, idx)

    # column-list encoders: W = 4 at every depth, W = 8 at depth 6 only (where measured
    # faster than the mask / gather encoders: see _pack_simd)
    _mk = _make_encode_local_intrinsic
    _l16_1_4, _l16_4_4 = _mk(16, 1, 4), _mk(16, 4, 4)
    _l32_1_4, _l32_4_4 = _mk(32, 1, 4), _mk(32, 4, 4)
    _l64_1_4, _l64_4_4 = _mk(64, 1, 4), _mk(64, 4, 4)
    _l64_1_8, _l64_4_8 = _mk(64, 1, 8), _mk(64, 4, 8)

    @njit(inline="always")
    def _simd_encode_local(K, R, W, srcT, loc, thr, doff, coff, C, idx):
        if W == 8:                              # K == 64
            if R == 1:
                _l64_1_8(srcT, loc, thr, doff, coff, C, idx)
            else:
                _l64_4_8(srcT, loc, thr, doff, coff, C, idx)
        elif R == 1:
            if K == 16:
                _l16_1_4(srcT, loc, thr, doff, coff, C, idx)
            elif K == 32:
                _l32_1_4(srcT, loc, thr, doff, coff, C, idx)
            else:
                _l64_1_4(srcT, loc, thr, doff, coff, C, idx)
        else:
            if K == 16:
                _l16_4_4(srcT, loc, thr, doff, coff, C, idx)
            elif K == 32:
                _l32_4_4(srcT, loc, thr, doff, coff, C, idx)
            else:
                _l64_4_4(srcT, loc, thr, doff, coff, C, idx)

    @njit(inline="always")
    def _simd_lookup(K, R, lutP, loff, idx, G, M, sb, soff, dst):
        if R == 1:
            if K == 16:
                _lut16_r1(lutP, loff, idx, G, M, sb, soff, dst)
            elif K == 32:
                _lut32_r1(lutP, loff, idx, G, M, sb, soff, dst)
            else:
                _lut64_r1(lutP, loff, idx, G, M, sb, soff, dst)
        else:
            if K == 16:
                _lut16_r4(lutP, loff, idx, G, M, sb, soff, dst)
            elif K == 32:
                _lut32_r4(lutP, loff, idx, G, M, sb, soff, dst)
            else:
                _lut64_r4(lutP, loff, idx, G, M, sb, soff, dst)
else:                                                    # pragma: no cover - other CPUs
    @njit(inline="always")
    def _simd_encode_k(K, R, srcT, dims, thr, doff, C, idx):
        raise RuntimeError("the SIMD encoder needs AVX-512")

    @njit(inline="always")
    def _simd_lookup(K, R, lutP, loff, idx, G, M, sb, soff, dst):
        raise RuntimeError("the SIMD lookup needs AVX-512 VBMI and VNNI")

    @njit(inline="always")
    def _transpose16(src, soff, sstride, dst, doff, dstride):
        raise RuntimeError("the SIMD path needs AVX-512")

    @njit(inline="always")
    def _simd_encode_local(K, R, W, srcT, loc, thr, doff, coff, C, idx):
        raise RuntimeError("the SIMD encoder needs AVX-512")


@njit(inline="always")
def _simd_block(X, out, n0, nb, meta, dims, loc, thr, lutP, sb, bufA, bufB, idx):
    L = meta.shape[0]
    R = 1 if nb <= 16 else 4
    nr = 16 * R
    D0 = X.shape[1]
    # the block, transposed: rows of bufA are input columns, contiguous over rows
    # 16 x 16 tiles transposed in registers; the edges element by element, 16 columns
    # at a time so the 16 rows of bufA being written stay in L1
    r16 = nb - nb % 16
    d16 = D0 - D0 % 16
    for r0 in range(0, r16, 16):
        for d0 in range(0, d16, 16):
            _transpose16(X, (n0 + r0) * D0 + d0, D0, bufA, d0 * BLOCK_SIMD + r0, BLOCK_SIMD)
    for d0 in range(0, D0, 16):                   # the ragged edges, 16 columns at a time
        d1 = min(D0, d0 + 16)
        rstart = r16 if d1 - d0 == 16 else 0
        for r in range(rstart, nb):
            for d in range(d0, d1):
                bufA[d, r] = X[n0 + r, d]
    src = bufA
    dst = bufB
    for l in range(L):
        W = meta[l, _W]
        if W == 0:
            _simd_encode_k(meta[l, _NN] + 1, R, src, dims, thr, meta[l, _DOFF], meta[l, _C],
                           idx)
        else:
            _simd_encode_local(meta[l, _NN] + 1, R, W, src, loc, thr, meta[l, _DOFF],
                               meta[l, _COFF], meta[l, _C], idx)
        C = meta[l, _C]
        _simd_lookup(meta[l, _NN] + 1, R, lutP, meta[l, _LOFF], idx, (C + 3) // 4,
                     meta[l, _M], sb, meta[l, _SOFF], dst)
        src, dst = dst, src
    M = meta[L - 1, _M]
    for r in range(nb):
        for m in range(M):
            out[n0 + r, m] = src[m, r]


@njit(cache=True, nogil=True)
def _simd_serial(X, Xbits, out, meta, dims, loc, thr, lutP, sb, fbuf, ibuf, check):
    # fbuf (tasks, 2, D, BLOCK_SIMD) float32, ibuf (tasks, groups * 4 * BLOCK_SIMD) uint8:
    # scratch kept by the caller across calls (allocating these 100s of KB per call went
    # through mmap and page faults: half the time of a batch of one)
    N = X.shape[0]
    bad = 0
    for n0 in range(0, N, BLOCK_SIMD):
        nb = min(BLOCK_SIMD, N - n0)
        if check and _nonfinite(Xbits, n0, nb):
            bad = 1
        _simd_block(X, out, n0, nb, meta, dims, loc, thr, lutP, sb, fbuf[0, 0], fbuf[0, 1],
                    ibuf[0])
    return bad


@njit(cache=True, nogil=True, parallel=True)
def _simd_parallel(X, Xbits, out, meta, dims, loc, thr, lutP, sb, fbuf, ibuf, check, ntasks):
    # ntasks tasks, each with its own scratch, take the blocks t, t + ntasks, ...
    N = X.shape[0]
    nblocks = (N + BLOCK_SIMD - 1) // BLOCK_SIMD
    bad = np.zeros(ntasks, dtype=np.int64)
    for t in prange(ntasks):
        for b in range(t, nblocks, ntasks):
            n0 = b * BLOCK_SIMD
            if check and _nonfinite(Xbits, n0, min(BLOCK_SIMD, N - n0)):
                bad[t] = 1
            _simd_block(X, out, n0, min(BLOCK_SIMD, N - n0), meta, dims, loc, thr, lutP, sb,
                        fbuf[t, 0], fbuf[t, 1], ibuf[t])
    return bad.max()


def _pack_simd(layers, meta, ndims):
    """The SIMD path's arrays: (meta with 10 columns, lutP, loc).

    lutP: flat uint8, per layer (M, G, 4K) (see the comment above), offsets in
    meta[:, _LOFF]. loc: flat int32 of ``ndims`` entries laid out as the packed dims (so
    with its padding), then the column lists: for a layer whose trees each test at most
    W = 4 or 8 distinct columns (meta[:, _W]; 0 otherwise), ``loc[doff + c*(K-1) + node]``
    is the node's column as an index into tree c's list ``loc[coff + c*W : ...+W]``
    (meta[:, _COFF]), padded with its first column."""
    meta = np.concatenate([meta, np.zeros((meta.shape[0], 2), dtype=np.int64)], axis=1)
    parts = []
    off = 0
    loc = [np.zeros(ndims, dtype=np.int32)]
    coff = ndims
    for l, layer in enumerate(layers):
        lut = layer["lut"]
        C, K, M = lut.shape
        G = (C + 3) // 4
        pad = np.zeros((4 * G, K, M), dtype=np.uint8)
        pad[:C] = lut
        parts.append(np.ascontiguousarray(pad.reshape(G, 4, K, M).transpose(3, 0, 1, 2)).ravel())
        meta[l, _LOFF] = off
        off += parts[-1].size
        dims = np.asarray(layer["dims"])
        uniq = [np.unique(row) for row in dims]
        most = max(u.size for u in uniq)
        # the column-list encoder where it was measured faster (ns per row and codebook,
        # Zen 4): W = 4 at depth 5 0.84 vs 1.36, depth 6 1.1 vs 2.4; W = 8 at depth 6 1.7
        # vs 2.4, but at depth 4 1.03 vs 0.94 and depth 5 the same
        W = 4 if most <= 4 else 8 if most <= 8 and K == 64 else 0
        meta[l, _W] = W
        if W:
            cols = np.empty((C, W), dtype=np.int32)
            doff = int(meta[l, _DOFF])
            for c, u in enumerate(uniq):
                cols[c, :u.size] = u
                cols[c, u.size:] = u[0]
                loc[0][doff + c * (K - 1): doff + (c + 1) * (K - 1)] = np.searchsorted(u, dims[c])
            meta[l, _COFF] = coff
            loc.append(cols.ravel())
            coff += cols.size
    return meta, np.concatenate(parts), np.concatenate(loc)


# ----------------------------------------------------------------------------- front end

def _depth_of(nnodes, what):
    K = nnodes + 1
    depth = K.bit_length() - 1
    if nnodes < 1 or (1 << depth) != K or depth > MAX_DEPTH:
        raise ValueError(f"{what}: a tree of depth d in 1..{MAX_DEPTH} has 2**d - 1 nodes; "
                         f"got {nnodes} nodes")
    return depth


def _array(layer, key, l, dtype, ndim):
    if not isinstance(layer, dict):
        raise TypeError(f"layer {l} must be a dict with keys dims, thresholds, lut, scale, "
                        f"bias; got {type(layer).__name__}")
    if key not in layer:
        raise ValueError(f"layer {l} has no {key!r}")
    a = layer[key]
    if not isinstance(a, np.ndarray):
        raise TypeError(f"layer {l} {key} must be a NumPy array; got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"layer {l} {key} must be {np.dtype(dtype).name}; got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"layer {l} {key} must be {ndim}-D; got shape {a.shape}")
    return a


def _check_layer(layer, l, d_in):
    """Checks one layer against its input width; returns (C, K, M)."""
    dims = _array(layer, "dims", l, np.int32, 2)
    thr = _array(layer, "thresholds", l, np.float32, 2)
    lut = _array(layer, "lut", l, np.uint8, 3)
    scale = _array(layer, "scale", l, np.float32, 1)
    bias = _array(layer, "bias", l, np.float32, 1)
    C, nn = dims.shape
    if C < 1:
        raise ValueError(f"layer {l} has no codebooks: dims shape {dims.shape}")
    _depth_of(nn, f"layer {l} dims {dims.shape}")
    if thr.shape != dims.shape:
        raise ValueError(f"layer {l} thresholds shape {thr.shape} != dims shape {dims.shape}")
    if np.isnan(thr).any():             # -inf (folded ReLU) and +inf (no split) are fine
        raise ValueError(f"layer {l} thresholds hold NaN")
    if lut.shape[:2] != (C, nn + 1) or lut.shape[2] < 1:
        raise ValueError(f"layer {l} lut shape {lut.shape}; expected ({C}, {nn + 1}, M >= 1)")
    M = lut.shape[2]
    if scale.shape != (M,) or bias.shape != (M,):
        raise ValueError(f"layer {l} scale {scale.shape} and bias {bias.shape} must be ({M},)")
    if d_in is not None and (dims.min() < 0 or dims.max() >= d_in):
        raise ValueError(f"layer {l} dims must be columns in 0..{d_in - 1} (its input width); "
                         f"got {dims.min()}..{dims.max()}")
    if dims.min() < 0:
        raise ValueError(f"layer {l} dims must be >= 0; got {dims.min()}")
    return C, nn + 1, M


def _pack(layers, d0=None):
    """(meta, dims, thr, lut, sb, d_in) flat contiguous copies of the layers' arrays."""
    if isinstance(layers, dict) or not hasattr(layers, "__len__") or len(layers) == 0:
        raise ValueError("layers must be a non-empty list of layer dicts")
    meta = np.zeros((len(layers), _NMETA), dtype=np.int64)
    d_in = d0
    offs = [0, 0, 0]
    for l, layer in enumerate(layers):
        C, K, M = _check_layer(layer, l, d_in)
        if l == 0:
            d0 = int(layer["dims"].max()) + 1 if d_in is None else d_in
        meta[l] = (C, K - 1, K.bit_length() - 1, M, d0 if l == 0 else d_in,
                   offs[0], offs[1], offs[2])
        offs[0] += C * (K - 1)
        offs[1] += C * K * M
        offs[2] += 2 * M
        d_in = M
    # _PAD spare entries at the end: the SIMD gather encoder loads a level's 16 (or 32)
    # entries at once, past the last tree's last node
    dims = np.concatenate([np.ascontiguousarray(x["dims"]).ravel() for x in layers]
                          + [np.zeros(_PAD, dtype=np.int32)])
    thr = np.concatenate([np.ascontiguousarray(x["thresholds"]).ravel() for x in layers]
                         + [np.zeros(_PAD, dtype=np.float32)])
    lut = np.concatenate([np.ascontiguousarray(x["lut"]).ravel() for x in layers])
    sb = np.concatenate([np.concatenate([x["scale"], x["bias"]]) for x in layers])
    return meta, dims, thr, lut, sb.astype(np.float32), d0


def _check_X(X, d0):
    if not isinstance(X, np.ndarray):
        raise TypeError(f"X must be a NumPy array; got {type(X).__name__}")
    if X.dtype != np.float32:
        raise TypeError(f"X must be float32; got {X.dtype}")
    if X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(f"X must be (N >= 1, D) ; got shape {X.shape}")
    if d0 is not None and X.shape[1] != d0:
        raise ValueError(f"X has {X.shape[1]} columns; the chain's first layer reads {d0}")
    if not X.flags.c_contiguous:
        raise ValueError("X must be C-contiguous")


def _threads():
    return numba.get_num_threads()


# rows x sum_l C_l * M_l (byte lookups) below which a batch runs on one thread: starting a
# parallel region costs about as much as ~2^22 lookups (tens of microseconds when the other
# cores are busy), so a small layer (digits: C * M = 320) stays serial at 400 rows
_PARALLEL_WORK = 1 << 22


def _run(X, out, meta, dims, thr, lut, sb, check=False, serial_rows=0):
    N = X.shape[0]
    Xbits = X.view(np.uint32)
    # one block: no thread count to read (get_num_threads costs 0.7 us, 7% of a batch of 1)
    if N <= max(BLOCK, serial_rows) or _threads() <= 1:
        bad = _chain_serial(X, Xbits, out, meta, dims, thr, lut, sb, check)
    else:
        ntasks = min(_threads(), (N + BLOCK - 1) // BLOCK)
        bad = _chain_parallel(X, Xbits, out, meta, dims, thr, lut, sb, check, ntasks)
    if bad:
        raise ValueError("X holds NaN or Inf")
    return out


def _run_simd(X, out, meta, dims, loc, thr, lutP, sb, scratch, check=False, serial_rows=0):
    N = X.shape[0]
    ntasks = (1 if N <= max(BLOCK_SIMD, serial_rows)
              else min(_threads(), (N + BLOCK_SIMD - 1) // BLOCK_SIMD))
    fbuf, ibuf = scratch(ntasks)
    Xbits = X.view(np.uint32)
    if ntasks == 1:
        bad = _simd_serial(X, Xbits, out, meta, dims, loc, thr, lutP, sb, fbuf, ibuf, check)
    else:
        bad = _simd_parallel(X, Xbits, out, meta, dims, loc, thr, lutP, sb, fbuf, ibuf, check,
                             ntasks)
    if bad:
        raise ValueError("X holds NaN or Inf")
    return out


class ChainCPU:
    """A chain of 8-bit LUT layers, packed once, run by one Numba call per batch.

    Parameters
    ----------
    layers : list of dicts, one per layer, with NumPy arrays
        ``dims`` (C, K-1) int32, ``thresholds`` (C, K-1) float32, ``lut`` (C, K, M) uint8,
        ``scale`` (M,) float32, ``bias`` (M,) float32; K = 2**depth, depth 1..10. Layer
        l > 0 reads the M columns of layer l-1 (its dims must lie in 0..M_{l-1}-1).
    d_in : int, optional
        Columns of the chain's input; by default 1 + the largest column layer 0 tests.

    Calling ``chain(X, out=None)`` with X (N, d_in) float32 C-contiguous (finite: the
    caller checks) returns (N, M_last) float32, bitwise the reference applied layer by
    layer. ``out`` (N, M_last) float32 C-contiguous may be given; otherwise one output
    array is cached per N and reused (the result is overwritten by the next call of the
    same N: copy it to keep it). The scratch buffers are kept too, so one ChainCPU must
    not be called from two Python threads at once (make one per thread).
    """

    def __init__(self, layers, d_in=None, simd=None):
        if d_in is not None:
            if isinstance(d_in, bool) or not isinstance(d_in, (int, np.integer)) or d_in < 1:
                raise ValueError(f"d_in must be a positive int; got {d_in!r}")
            d_in = int(d_in)
        if simd not in (None, True, False):
            raise ValueError(f"simd must be None (pick), True or False; got {simd!r}")
        self.meta, self.dims, self.thr, self.lut, self.sb, self.d_in = _pack(layers, d_in)
        self.m_out = int(self.meta[-1, _M])
        work = int((self.meta[:, _C] * self.meta[:, _M]).sum())
        self._serial_rows = _PARALLEL_WORK // max(work, 1)
        fits = all(int(k) + 1 in _SIMD_K for k in self.meta[:, _NN])
        if simd and not (_SIMD and fits):
            raise ValueError("simd=True needs a CPU with AVX-512 VBMI and VNNI "
                             f"(this one: {_SIMD}) and every layer's K in {_SIMD_K} "
                             f"(got {[int(k) + 1 for k in self.meta[:, _NN]]})")
        self.simd = bool(_SIMD and fits) if simd is None else simd
        self.small_n = 0
        if self.simd:
            # the SIMD path reads the re-laid LUT; batches of at most small_n rows (the
            # SIMD path works on 16 rows at least) take the plain loops and its LUT
            self.meta_simd, self.lut_simd, self.loc = _pack_simd(layers, self.meta,
                                                                 self.dims.size)
            # (measured crossovers, MLP shapes: 5 rows at K = 16, 9 at 32, 14+ at 64)
            self.small_n = {16: 4, 32: 8, 64: 12}[int(self.meta[:, _NN].max()) + 1]
            self._fbuf = np.empty((0, 2, 0, BLOCK_SIMD), dtype=np.float32)
            self._ibuf = np.empty((0, 0), dtype=np.uint8)
        self._out = {}

    def _scratch(self, ntasks):
        # grown to the most tasks seen, then reused by every call
        if self._fbuf.shape[0] < ntasks:
            maxd = max(self.d_in, int(self.meta[:, _M].max()))
            maxc = int(self.meta[:, _C].max()) + 3
            self._fbuf = np.empty((ntasks, 2, maxd, BLOCK_SIMD), dtype=np.float32)
            self._ibuf = np.empty((ntasks, maxc * BLOCK_SIMD), dtype=np.uint8)
        return self._fbuf, self._ibuf

    @property
    def n_layers(self):
        return int(self.meta.shape[0])

    def warm_up(self):
        """Compile (or load from Numba's cache) every kernel this chain may call: one call
        of 1 row and one of 2 * BLOCK_SIMD rows of zeros at the current thread count. The
        first compile on a machine takes tens of seconds; later processes load it."""
        for n in (1, 2 * BLOCK_SIMD):
            self(np.zeros((n, self.d_in), dtype=np.float32), out=np.empty((n, self.m_out),
                                                                         dtype=np.float32))
        return self

    def __call__(self, X, out=None, check_finite=False):
        """Y (N, M_last) float32 for X (N, d_in) float32 C-contiguous; ``check_finite``:
        raise ValueError "X holds NaN or Inf" (each block of X is scanned as the kernel
        reads it; the outputs are then meaningless)."""
        _check_X(X, self.d_in)
        N = X.shape[0]
        if out is None:
            out = self._out.get(N)
            if out is None:
                out = self._out[N] = np.empty((N, self.m_out), dtype=np.float32)
        elif not (isinstance(out, np.ndarray) and out.dtype == np.float32
                  and out.shape == (N, self.m_out) and out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous float32 array of shape "
                             f"({N}, {self.m_out})")
        if self.simd and N > self.small_n:
            return _run_simd(X, out, self.meta_simd, self.dims, self.loc, self.thr,
                             self.lut_simd, self.sb, self._scratch, check_finite,
                             self._serial_rows)
        return _run(X, out, self.meta, self.dims, self.thr, self.lut, self.sb, check_finite,
                    self._serial_rows)


def encode_lookup_q_cpu(A, dims, thresholds, lut, scale, bias, out=None):
    """One layer: ``lookup_q(encode_tree(A, dims, thresholds), lut, scale, bias)``.

    Parameters
    ----------
    A : (N, D) float32 C-contiguous, finite (not checked here)
    dims : (C, K-1) int32, columns in 0..D-1
    thresholds : (C, K-1) float32
    lut : (C, K, M) uint8
    scale, bias : (M,) float32
    out : (N, M) float32 C-contiguous, optional

    Returns
    -------
    Y : (N, M) float32
    """
    layer = {"dims": dims, "thresholds": thresholds, "lut": lut, "scale": scale, "bias": bias}
    if not isinstance(A, np.ndarray):
        raise TypeError(f"A must be a NumPy array; got {type(A).__name__}")
    if A.ndim != 2:
        raise ValueError(f"A must be 2-D; got shape {A.shape}")
    C, K, M = _check_layer(layer, 0, A.shape[1])
    _check_X(A, None)
    if _SIMD and K in _SIMD_K and A.shape[0] >= _SIMD_MIN_ROWS_ONE_LAYER:
        # enough rows to pay for re-laying the LUT (one pass over it) on every call;
        # a caller with many calls keeps a ChainCPU([layer]) instead
        return ChainCPU([layer], d_in=A.shape[1], simd=True)(A, out=out)
    meta = np.array([[C, K - 1, K.bit_length() - 1, M, A.shape[1], 0, 0, 0]], dtype=np.int64)
    sb = np.concatenate([scale, bias])
    if out is None:
        out = np.empty((A.shape[0], M), dtype=np.float32)
    elif not (isinstance(out, np.ndarray) and out.dtype == np.float32
              and out.shape == (A.shape[0], M) and out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float32 array of shape ({A.shape[0]}, {M})")
    return _run(A, out, meta, np.ascontiguousarray(dims).ravel(),
                np.ascontiguousarray(thresholds).ravel(), np.ascontiguousarray(lut).ravel(), sb)
