"""CuPy RawKernels for the op table (NVIDIA GPUs).

Imported by :mod:`nimbus.arrays.kernels` the first time a CuPy array needs a
kernel; CuPy itself is reached only through :func:`nimbus.arrays.backend.cupy`
inside the launchers, never at import time. Each kernel is CUDA C++ compiled by
NVRTC on its first launch and cached per (kernel, substitutions, device): the
substitutions are the element types (float32 or float16 input/output, float32
or float16 LUT) and compile-time sizes (codebooks, column tile, rows per
thread, tree depth, buckets per codebook), one source per kernel. Kernel
semantics are exactly those of :mod:`.reference` (codes bit for bit, sums to
float32 rounding; 8-bit LUT sums exactly in integers).

Ops
---
``encode_tree``, ``encode_pq``, ``lookup``, ``lookup_q``, ``lookup_backward`` (the
table's), plus ``encode_lookup_q``: MADDNESS applied in one kernel (tree encode
into shared memory, then the 8-bit LUT sums), so the codes never reach device
memory. ``lookup``/``lookup_q``/``encode_lookup_q`` take an ``out_dtype``
(float32 or float16) so float16 I/O needs no extra cast pass.

Trees of any depth d in 1..8 (dims (C, 2**d - 1), the depth read off the shape; each
depth a ``TREE_DEPTH`` substitution) and LUTs of any K in 1..256 buckets (K read off
the LUT; an ``NK`` substitution) are handled; depth 4 / K = 16 compile to the same code
as before other sizes existed. The fused ``encode_lookup_q`` kernels are depth 4 only
(other depths run the encode and lookup kernels). LUTs whose narrowest column tile does
not fit in shared memory are read through L1/L2 by fallback kernels.

Every launcher makes its arguments contiguous with the exact dtype, passes
scalars as ``np.int32``/``np.uint32``, checks shapes (``ValueError``/``TypeError``
naming them), reads limits (multiprocessors, shared memory) off the device and
picks another variant, or the reference, when a configuration would not fit:
a launch never fails for size. Kernels clamp every index they read from user
data (columns of A, codes), so even unchecked bad values cannot read outside
their arrays.

NaN/Inf: the encoders (``FUSED_FINITE_CHECK``) check A in the same pass that
reads it and raise ``ValueError`` like :func:`nimbus.arrays.validate.finite_or_raise`;
the raise needs one device-to-host read of a flag after the kernel (a
synchronisation). ``check_finite=False`` skips that read (the benchmark's kernel
timings do).
"""
from __future__ import annotations

import numpy as np

from .. import backend, validate
from . import cuda_mma, reference

FUSED_FINITE_CHECK = frozenset({"encode_tree", "encode_pq", "encode_lookup_q"})

NT = 256                 # threads per block of every kernel unless a config says otherwise
_LUT_TILE_BUDGET = 64 * 1024   # bytes of LUT per block that keep 2-3 blocks on an SM
_ENCODE_TILE_BUDGET = 32 * 1024  # bytes of A staged per encode block
_MAX_INT32 = 2 ** 31 - 1

# --------------------------------------------------------------------------- source
# One CUDA C++ source per kernel family; the header of #defines is the only thing that
# differs between variants. No CUDA header is included (NVRTC needs none): half
# precision is handled as raw 16-bit words converted with cvt instructions.
_PRELUDE = r"""
#ifndef TREE_DEPTH
#define TREE_DEPTH 4             // tree depth d: 2^d leaves, 2^d - 1 heap-ordered nodes
#endif
#define TNODES ((1 << TREE_DEPTH) - 1)
#ifndef NK
#define NK 16                    // buckets (LUT rows) per codebook: K, 1..256
#endif
// Bucket of the code byte in bits sh.. of w: codes >= NK never index past a LUT (taken
// mod NK: a mask when NK is a power of two, as CuPy's indexing wraps).
#if (NK & (NK - 1)) == 0
#define BUCKET(w, sh) (((w) >> (sh)) & (u32)(NK - 1))
#else
#define BUCKET(w, sh) ((((w) >> (sh)) & 255u) % (u32)NK)
#endif
// Warp groups: GROUPS independent teams of GT threads in one block (the fused kernel's
// "virtual blocks", which share the block's LUT); GTID is a thread's index in its team.
#ifndef GROUPS
#define GROUPS 1
#endif
#define GT (NT / GROUPS)
#if GROUPS == 1
#define GTID threadIdx.x
#else
#define GTID (threadIdx.x % GT)
#endif
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float h2f(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 f2h(float f) {          // round to nearest even, as astype
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(u16 x) { return h2f(x); }
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(u16* p, float v) { *p = f2h(v); }

// Non-finite detection on raw words: an all-ones exponent plus one carries into the sign
// bit, so `acc |= (w & EXP) + ONE` keeps bit 31 (bit 15 too for half pairs) iff some value
// was NaN or Inf. Three integer ops per word, no float compare.
__device__ __forceinline__ u32 nonfinite_bits(float x) {
    return ((__float_as_uint(x) & 0x7F800000u) + 0x00800000u) & 0x80000000u;
}
__device__ __forceinline__ u32 nonfinite_bits(u16 x) {
    return ((((u32)x) & 0x7C00u) + 0x0400u) & 0x8000u;
}
__device__ __forceinline__ u32 nonfinite_word(u32 w) {
#if IN_SIZE == 4
    return ((w & 0x7F800000u) + 0x00800000u) & 0x80000000u;
#else
    return ((w & 0x7C007C00u) + 0x04000400u) & 0x80008000u;
#endif
}

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16-byte global -> shared copies; asynchronous (cp.async, sm_80+) when USE_CP_ASYNC so a
// block can have a whole tile in flight without staging it through registers.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
#if USE_CP_ASYNC
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_u32(dst)), "l"(src) : "memory");
#else
    *(uint4*)dst = *(const uint4*)src;
#endif
}
// 4- and 8-byte asynchronous copies; `valid` false copies nothing and zero-fills dst.
__device__ __forceinline__ void copy4(void* dst, const void* src, bool valid) {
#if USE_CP_ASYNC
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0) : "memory");
#else
    *(u32*)dst = valid ? *(const u32*)src : 0u;
#endif
}
__device__ __forceinline__ void copy8(void* dst, const void* src, bool valid) {
#if USE_CP_ASYNC
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 8 : 0) : "memory");
#else
    *(uint2*)dst = valid ? *(const uint2*)src : make_uint2(0u, 0u);
#endif
}
__device__ __forceinline__ void async_commit() {
#if USE_CP_ASYNC
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void async_wait_all() {
#if USE_CP_ASYNC
    asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}
__device__ __forceinline__ void async_wait_prev() {     // all groups but the newest
#if USE_CP_ASYNC
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}
#ifdef NSTAGE
__device__ __forceinline__ void async_wait_pipeline() { // all but the newest NSTAGE-1
#if USE_CP_ASYNC
    asm volatile("cp.async.wait_group %0;" :: "n"(NSTAGE - 1) : "memory");
#endif
}
#endif

// Stage `nbytes` contiguous bytes at dst: 16-byte asynchronous copies when `vec` (both
// addresses 16-byte aligned), the tail (and everything when not `vec`) byte by byte.
__device__ __forceinline__ void stage_bytes(u8* dst, const u8* __restrict__ src, int nbytes,
                                            int vec) {
    int done = 0;
    if (vec) {
        const int n16 = nbytes >> 4;
        for (int i = threadIdx.x; i < n16; i += NT) copy16((uint4*)dst + i, (const uint4*)src + i);
        done = n16 << 4;
    }
    for (int i = done + threadIdx.x; i < nbytes; i += NT) dst[i] = src[i];
}

// Stage `nrows` consecutive rows of A (row-major, D columns) at `dst`. `vec`: the source
// is 16-byte aligned and a row is a whole number of 16-byte units.
__device__ __forceinline__ void stage_rows(IN_T* dst, const IN_T* __restrict__ src, int nrows,
                                           int D, int vec) {
    if (vec) {
        const int n16 = (nrows * D * IN_SIZE) >> 4;
        for (int i = GTID; i < n16; i += GT) copy16((uint4*)dst + i, (const uint4*)src + i);
    } else {
        const int n = nrows * D;
        for (int i = GTID; i < n; i += GT) dst[i] = src[i];
    }
    async_commit();
}

// NaN/Inf bits of a staged tile (this thread's share), read back from shared memory.
__device__ __forceinline__ u32 scan_tile(const IN_T* tile, int nrows, int D, int vec) {
    u32 bad = 0;
    if (vec) {
        const int n16 = (nrows * D * IN_SIZE) >> 4;
        for (int i = GTID; i < n16; i += GT) {
            const uint4 w = ((const uint4*)tile)[i];
            bad |= nonfinite_word(w.x) | nonfinite_word(w.y) | nonfinite_word(w.z)
                 | nonfinite_word(w.w);
        }
    } else {
        const int n = nrows * D;
        for (int i = GTID; i < n; i += GT) bad |= nonfinite_bits(tile[i]);
    }
    return bad;
}

// Leaf reached by one row in one tree of depth TREE_DEPTH: heap-ordered nodes, right iff
// x > t (strictly: x == t goes left, as in learning). dims are already clamped to [0, D).
__device__ __forceinline__ u8 tree_leaf(const IN_T* row, const int* dims, const float* thr) {
    int node = 0;
#pragma unroll
    for (int l = 0; l < TREE_DEPTH; ++l)
        node = 2 * node + 1 + (to_f32(row[dims[node]]) > thr[node] ? 1 : 0);
    return (u8)(node - TNODES);
}

// Codes of a staged batch: thread t encodes the (row, tree) pairs t, t + NT, ... of the
// ``nrb`` x ``ncb`` batch into ``codes`` (row stride ``cp``); rows >= ``nr`` get code 0.
// Inlined with compile-time nrb/ncb, so p / ncb stays a constant division.
__device__ __forceinline__ void encode_batch(const IN_T* tile, int nr, int D, u8* codes, int cp,
                                             int nrb, int ncb, const int* dims_s,
                                             const float* thr_s) {
    for (int p = GTID; p < nrb * ncb; p += GT) {
        const int r = p / ncb, c = p - r * ncb;
        codes[r * cp + c] = r < nr ? tree_leaf(tile + r * D, dims_s + c * TNODES,
                                                       thr_s + c * TNODES)
                                   : (u8)0;
    }
}

__device__ __forceinline__ void stage_trees(int* dims_s, float* thr_s, const int* __restrict__ dims,
                                            const float* __restrict__ thr, int ntrees, int D) {
    for (int i = threadIdx.x; i < ntrees * TNODES; i += NT) {
        const unsigned d = (unsigned)dims[i];          // negative -> huge -> clamped
        dims_s[i] = (int)(d < (unsigned)D ? d : (unsigned)(D - 1));
        thr_s[i] = thr[i];
    }
}
"""

_ENCODE_TREE = r"""
// Thread mapping: a block stages `rows` consecutive rows of A (all D columns) in shared
// memory, then thread t computes the (row, codebook) pairs t, t + NT, ... of the tile
// (consecutive threads write consecutive code bytes); blocks stride over row tiles.
extern "C" __global__ void __launch_bounds__(NT)
encode_tree_tile(const IN_T* __restrict__ A, const int* __restrict__ dims,
                 const float* __restrict__ thr, u8* __restrict__ codes, int* __restrict__ flag,
                 int N, int D, int C, int rows, int a_vec)
{
    extern __shared__ __align__(16) u8 smem[];
    int* dims_s = (int*)smem;
    float* thr_s = (float*)(smem + C * TNODES * 4);
    IN_T* tile = (IN_T*)(smem + ((C * TNODES * 8 + 15) & ~15));
    stage_trees(dims_s, thr_s, dims, thr, C, D);
    u32 bad = 0;
    const long long ntiles = ((long long)N + rows - 1) / rows;
    for (long long t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const long long r0 = t * rows;
        const int nr = (int)((long long)N - r0 < rows ? (long long)N - r0 : rows);
        __syncthreads();                 // previous tile consumed; trees staged
        stage_rows(tile, A + r0 * D, nr, D, a_vec);
        async_wait_all();
        __syncthreads();
        bad |= scan_tile(tile, nr, D, a_vec);
        encode_batch(tile, nr, D, codes + r0 * C, C, nr, C, dims_s, thr_s);
    }
    if (bad) atomicOr(flag, 1);
}

// Thread mapping: thread -> one (row, codebook) pair, grid-stride; reads A, dims and
// thresholds from global memory. Fallback for rows too wide for shared memory.
extern "C" __global__ void __launch_bounds__(NT)
encode_tree_direct(const IN_T* __restrict__ A, const int* __restrict__ dims,
                   const float* __restrict__ thr, u8* __restrict__ codes, int* __restrict__ flag,
                   int N, int D, int C)
{
    u32 bad = 0;
    const long long total = (long long)N * C;
    for (long long p = (long long)blockIdx.x * NT + threadIdx.x; p < total;
         p += (long long)gridDim.x * NT) {
        const long long n = p / C;
        const int c = (int)(p - n * C);
        const IN_T* row = A + n * D;
        int node = 0;
        for (int l = 0; l < TREE_DEPTH; ++l) {
            unsigned d = (unsigned)dims[c * TNODES + node];
            d = d < (unsigned)D ? d : (unsigned)(D - 1);
            node = 2 * node + 1 + (to_f32(row[d]) > thr[c * TNODES + node] ? 1 : 0);
        }
        codes[p] = (u8)(node - TNODES);
        if (c == 0) for (int j = 0; j < D; ++j) bad |= nonfinite_bits(row[j]);
    }
    if (bad) atomicOr(flag, 1);
}
"""

_ENCODE_PQ = r"""
// Thread mapping: blockIdx.y is the codebook c, thread -> row (blocks stride over rows).
// All threads of a block read the same centroid entries (broadcast loads); each thread
// keeps its row's 16 squared distances in registers. Ties keep the lowest k (argmin).
extern "C" __global__ void __launch_bounds__(NT)
encode_pq_kernel(const IN_T* __restrict__ A, const float* __restrict__ cent,
                 const int* __restrict__ starts, u8* __restrict__ codes, int* __restrict__ flag,
                 int N, int D, int C, int W)
{
    const int c = blockIdx.y;
    const int s = starts[c], w = starts[c + 1] - s;   // checked on the host: 0 <= w <= W
    const float* cc = cent + (long long)c * 16 * W;
    u32 bad = 0;
    for (long long n = (long long)blockIdx.x * NT + threadIdx.x; n < N;
         n += (long long)gridDim.x * NT) {
        const IN_T* a = A + n * D + s;
        float d[16];
#pragma unroll
        for (int k = 0; k < 16; ++k) d[k] = 0.f;
        for (int j = 0; j < w; ++j) {
            const IN_T raw = a[j];
            bad |= nonfinite_bits(raw);
            const float x = to_f32(raw);
#pragma unroll
            for (int k = 0; k < 16; ++k) {
                const float e = x - cc[k * W + j];
                d[k] = __fadd_rn(d[k], __fmul_rn(e, e));
            }
        }
        int best = 0;
        float bd = d[0];
#pragma unroll
        for (int k = 1; k < 16; ++k)
            if (d[k] < bd) { bd = d[k]; best = k; }
        codes[n * C + c] = (u8)best;
    }
    if (bad) atomicOr(flag, 1);
}
"""

# The 8-bit lookup core, shared by lookup_q_kernel and the fused encode_lookup_q_kernel.
_LOOKUP_Q_CORE = r"""
#define TPR (MT / 16)            // threads per row: each owns 16 columns of the tile
#define RG (GT / TPR)            // rows a block (a warp group) works on at once
#define RB (RG * RPT)            // rows per batch
#define CP ((NCB + 3) & ~3)      // codes row stride in shared memory: whole 32-bit words
#define CH (16 / OUT_SIZE)       // output columns per 16-byte store: 4 (fp32) or 8 (fp16)
#define NCHK (16 / CH)           // 16-byte stores per thread and row
#define LUT_BYTES (NCB * NK * MT)

// LUT tile in shared memory: [NCB][NK][MT] bytes. Within a LUT row, thread tr's 16 bytes
// sit together at 16*tr (one 16-byte load), and byte s of them is output column
// (s / CH) * TPR * CH + tr * CH + s % CH of the tile: each thread's outputs are NCHK
// chunks of CH adjacent columns, so a warp's 16-byte stores fill whole segments.
#define SLOT_COL(tr, s) (((s) / CH) * (TPR * CH) + (tr) * CH + ((s) % CH))

// Issue the copies of the tile's LUT (asynchronous in units of `unit` = 8 or 4 bytes, a
// divisor of M and CH given by the launcher; unit 1: synchronous bytes). Columns past M
// are zero.
__device__ __forceinline__ void load_lut_q_tile(u8* lut_s, const u8* __restrict__ lut_q, int M,
                                                int m0, int unit) {
    if (unit >= 4) {
        const int per_row = MT / unit;
        for (int i = threadIdx.x; i < NCB * NK * per_row; i += NT) {
            const int ck = i / per_row, j = (i - ck * per_row) * unit;   // tile column
            const int ch = j / CH, q = ch / TPR, tr = ch - q * TPR;
            u8* dst = lut_s + ck * MT + tr * 16 + q * CH + (j - ch * CH);
            const bool ok = m0 + j < M;            // a unit is wholly inside or outside
            const u8* src = ok ? lut_q + (long long)ck * M + m0 + j : lut_q;
            if (unit == 8) copy8(dst, src, ok); else copy4(dst, src, ok);
        }
    } else {
        for (int i = threadIdx.x; i < NCB * NK * MT; i += NT) {
            const int ck = i / MT, j = i - ck * MT;
            const int ch = j / CH, q = ch / TPR, tr = ch - q * TPR;
            lut_s[ck * MT + tr * 16 + q * CH + (j - ch * CH)] =
                m0 + j < M ? lut_q[(long long)ck * M + m0 + j] : (u8)0;
        }
    }
}

// Codes of rows [r0, r0 + nr) into a [RB][CP] buffer. `vec` (CP == NCB, aligned): one
// contiguous asynchronous copy; else byte by byte (padding columns are left at 0).
__device__ __forceinline__ void stage_codes(u8* dst, const u8* __restrict__ codes, long long r0,
                                            int nr, int vec) {
    const u8* src = codes + r0 * NCB;
    if (vec) {
        stage_bytes(dst, src, nr * NCB, 1);
    } else {
        for (int i = threadIdx.x; i < nr * NCB; i += NT) {
            const int r = i / NCB, c = i - r * NCB;
            dst[r * CP + c] = src[i];
        }
    }
}

// Exact float of an integer sum below 2^23 without the (quarter-rate) I2F instruction:
// the integer becomes the mantissa of 2^23 + x, and 2^23 is subtracted exactly.
__device__ __forceinline__ float u2f_exact(u32 x) {
#if NCB * 255 < 8388608
    return __fsub_rn(__uint_as_float(0x4B000000u | x), 8388608.0f);
#else
    return __uint2float_rn(x);
#endif
}

__device__ __forceinline__ void mad_u32(u32& acc, u32 x, u32 one) {
    asm("mad.lo.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(x), "r"(one));
}
__device__ __forceinline__ void mad_wide(u64& acc, u32 x, u32 one) {
    asm("mad.wide.u32 %0, %1, %2, %0;" : "+l"(acc) : "r"(x), "r"(one));
}

// Accumulation of 4 LUT bytes (one word, columns b0..b3) of two codebooks (x0, x1).
// ACC_MODE 0: byte_perm spreads bytes into 16-bit lanes, IADD3 adds both codebooks.
// ACC_MODE 1: the same spread, the adds as IMAD (x * one + acc, `one` a runtime 1) so
//             they run on the FMA pipe beside the byte_perms on the integer pipe.
// ACC_MODE 2: even bytes masked into 16-bit lanes (LOP3 + IADD3); whole words summed in
//             64 bits with IMAD.WIDE; odd lanes = (whole - even) >> 8 at the end.
// 16-bit lanes are exact for up to 257 codebooks; the caller flushes every 256.
__device__ __forceinline__ void acc_word(u32& a0, u32& a1, u64& aw, u32 x0, u32 x1, u32 one) {
#if ACC_MODE == 0
    a0 += __byte_perm(x0, 0, 0x4140) + __byte_perm(x1, 0, 0x4140);
    a1 += __byte_perm(x0, 0, 0x4342) + __byte_perm(x1, 0, 0x4342);
#elif ACC_MODE == 1
    mad_u32(a0, __byte_perm(x0, 0, 0x4140), one); mad_u32(a0, __byte_perm(x1, 0, 0x4140), one);
    mad_u32(a1, __byte_perm(x0, 0, 0x4342), one); mad_u32(a1, __byte_perm(x1, 0, 0x4342), one);
#else
    a0 += (x0 & 0x00FF00FFu) + (x1 & 0x00FF00FFu);
    mad_wide(aw, x0, one); mad_wide(aw, x1, one);
#endif
}

// Store CH adjacent outputs at p (all inside the row): the widest stores p's alignment
// allows (16, 8 or 4 bytes; single values otherwise), so rows whose byte length is not a
// multiple of 16 (float16 with M = 100, say) still use wide stores where they can.
__device__ __forceinline__ void store_chunk(float* p, const float* v) {
    const unsigned a = (unsigned)(unsigned long long)p;
    if ((a & 15u) == 0) {
        *(float4*)p = make_float4(v[0], v[1], v[2], v[3]);
    } else if ((a & 7u) == 0) {
        *(float2*)p = make_float2(v[0], v[1]);
        *(float2*)(p + 2) = make_float2(v[2], v[3]);
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) p[e] = v[e];
    }
}
__device__ __forceinline__ void store_chunk(u16* p, const float* v) {
    u32 w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = (u32)f2h(v[2 * k]) | ((u32)f2h(v[2 * k + 1]) << 16);
    const unsigned a = (unsigned)(unsigned long long)p;
    if ((a & 15u) == 0) {
        *(uint4*)p = make_uint4(w[0], w[1], w[2], w[3]);
    } else if ((a & 7u) == 0) {
        *(uint2*)p = make_uint2(w[0], w[1]);
        *(uint2*)(p + 4) = make_uint2(w[2], w[3]);
    } else if ((a & 3u) == 0) {
#pragma unroll
        for (int k = 0; k < 4; ++k) *(u32*)(p + 2 * k) = w[k];
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) { p[2 * k] = (u16)(w[k] & 0xFFFFu); p[2 * k + 1] = (u16)(w[k] >> 16); }
    }
}

// Sums over codebooks [cb, ce) (at most 256: 16-bit lanes stay exact) of rows rg + RG*i,
// i < RPT, 16 columns each for thread tr, added to tot[i][slot].
__device__ __forceinline__ void lookup_q_chunk(u32 (&tot)[RPT][16], const u8* lut_t,
        const u8* codes_s, int rg, int cb, int ce, u32 one) {
    u32 a[RPT][8];
    u64 aw[RPT][4];
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) a[i][j] = 0u;
#pragma unroll
        for (int j = 0; j < 4; ++j) aw[i][j] = 0ull;
    }
    PRAGMA_UNROLL_C
    for (int c = cb; c < ce; c += 4) {
        u32 cw[RPT];
#pragma unroll
        for (int i = 0; i < RPT; ++i) cw[i] = *(const u32*)(codes_s + (rg + RG * i) * CP + c);
#pragma unroll
        for (int k = 0; k < 4; k += 2) {
            if (c + k < ce) {
                const bool two = c + k + 1 < ce;
#pragma unroll
                for (int i = 0; i < RPT; ++i) {
                    const u32 k0 = BUCKET(cw[i], 8 * k);        // memory safe
                    const uint4 w0 = *(const uint4*)(lut_t + ((c + k) * NK + k0) * MT);
                    uint4 w1 = make_uint4(0u, 0u, 0u, 0u);
                    if (two) {
                        const u32 k1 = BUCKET(cw[i], 8 * k + 8);
                        w1 = *(const uint4*)(lut_t + ((c + k + 1) * NK + k1) * MT);
                    }
                    acc_word(a[i][0], a[i][1], aw[i][0], w0.x, w1.x, one);
                    acc_word(a[i][2], a[i][3], aw[i][1], w0.y, w1.y, one);
                    acc_word(a[i][4], a[i][5], aw[i][2], w0.z, w1.z, one);
                    acc_word(a[i][6], a[i][7], aw[i][3], w0.w, w1.w, one);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {          // word q holds slots 4q .. 4q+3
#if ACC_MODE == 2
            const u32 ev = a[i][2 * q];
            const u32 od = (u32)((aw[i][q] - (u64)ev) >> 8);
            tot[i][4 * q + 0] += ev & 0xFFFFu;  tot[i][4 * q + 2] += ev >> 16;
            tot[i][4 * q + 1] += od & 0xFFFFu;  tot[i][4 * q + 3] += od >> 16;
#else
            const u32 lo = a[i][2 * q], hi = a[i][2 * q + 1];
            tot[i][4 * q + 0] += lo & 0xFFFFu;  tot[i][4 * q + 1] += lo >> 16;
            tot[i][4 * q + 2] += hi & 0xFFFFu;  tot[i][4 * q + 3] += hi >> 16;
#endif
        }
    }
}

// Rows rg + RG*i (i < RPT) of the batch, 16 columns each for thread tr: integer sums of
// the 8-bit LUT over all codebooks, then y = isum * scale + bias (two roundings, as the
// reference), stored as OUT_T. Scale and bias of the thread's slot s are sc[s * SB_STRIDE],
// bi[s * SB_STRIDE] (registers: stride 1; shared memory: stride TPR).
template <int SB_STRIDE>
__device__ __forceinline__ void lookup_q_rows(const u8* lut_s, const float* sc, const float* bi,
        const u8* codes_s, OUT_T* __restrict__ Y, long long row0, int nr, int M, int m0,
        u32 one) {
    const int tr = GTID % TPR, rg = GTID / TPR;
    const u8* lut_t = lut_s + tr * 16;
    u32 tot[RPT][16];
#pragma unroll
    for (int i = 0; i < RPT; ++i)
#pragma unroll
        for (int s = 0; s < 16; ++s) tot[i][s] = 0u;
#if NCB <= 256
    lookup_q_chunk(tot, lut_t, codes_s, rg, 0, NCB, one);      // constant bounds: full unroll
#else
    for (int cb = 0; cb < NCB; cb += 256)
        lookup_q_chunk(tot, lut_t, codes_s, rg, cb, cb + 256 < NCB ? cb + 256 : NCB, one);
#endif
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        const int r = rg + RG * i;
        if (r < nr) {
            OUT_T* yrow = Y + (row0 + r) * (long long)M;
#pragma unroll
            for (int q = 0; q < NCHK; ++q) {
                const int m = m0 + q * (TPR * CH) + tr * CH;   // first column of this chunk
                float v[CH];
#pragma unroll
                for (int e = 0; e < CH; ++e)
                    v[e] = __fadd_rn(__fmul_rn(u2f_exact(tot[i][q * CH + e]),
                                               sc[(q * CH + e) * SB_STRIDE]),
                                     bi[(q * CH + e) * SB_STRIDE]);
                if (m + CH <= M) {
                    store_chunk(yrow + m, v);
                } else {
#pragma unroll
                    for (int e = 0; e < CH; ++e) if (m + e < M) put(yrow + m + e, v[e]);
                }
            }
        }
    }
}

// Scale and bias of the tile in shared memory, slot-interleaved: slot s of thread tr at
// s * TPR + tr (scale) and MT + s * TPR + tr (bias), so the lanes of a warp read adjacent
// words (no bank conflicts); 0 past M.
__device__ __forceinline__ void load_scale_bias_smem(float* sb_s, const float* __restrict__ scale,
                                                     const float* __restrict__ bias, int M, int m0) {
    for (int j = threadIdx.x; j < MT; j += NT) {
        const int ch = j / CH, q = ch / TPR, tr = ch - q * TPR;
        const int pos = (q * CH + (j - ch * CH)) * TPR + tr;
        sb_s[pos] = m0 + j < M ? scale[m0 + j] : 0.f;
        sb_s[MT + pos] = m0 + j < M ? bias[m0 + j] : 0.f;
    }
}

// Scale and bias of thread tr's 16 slots (0 past M), kept in registers.
__device__ __forceinline__ void load_scale_bias(float* sc, float* bi, const float* __restrict__ scale,
                                                const float* __restrict__ bias, int M, int m0) {
    const int tr = threadIdx.x % TPR;
#pragma unroll
    for (int s = 0; s < 16; ++s) {
        const int m = m0 + SLOT_COL(tr, s);
        sc[s] = m < M ? scale[m] : 0.f;
        bi[s] = m < M ? bias[m] : 0.f;
    }
}
"""

_LOOKUP_Q = r"""
// Thread mapping: blockIdx.y picks a tile of MT columns, whose 8-bit LUT (all codebooks)
// the block keeps in shared memory; blocks stride over batches of RB rows (blockIdx.x);
// thread t owns 16 columns (t % TPR) of rows t / TPR + RG * i, i < RPT. The codes of the
// next batch arrive by cp.async while the current batch is summed (two buffers).
extern "C" __global__ void __launch_bounds__(NT)
lookup_q_kernel(const u8* __restrict__ codes, const u8* __restrict__ lut_q,
                const float* __restrict__ scale, const float* __restrict__ bias,
                OUT_T* __restrict__ Y, int N, int M, u32 one, int lut_unit, int codes_vec)
{
    extern __shared__ __align__(16) u8 smem[];
    u8* lut_s = smem;
    float* sb_s = (float*)(smem + LUT_BYTES);
    u8* cbuf0 = smem + LUT_BYTES + 8 * MT;
    u8* cbuf1 = cbuf0 + (RB * CP + 15) / 16 * 16;
    const int m0 = blockIdx.y * MT;
    const int nbatch = (N + RB - 1) / RB;
    for (int i = threadIdx.x; i < 2 * ((RB * CP + 15) / 16 * 16); i += NT) cbuf0[i] = 0;
    __syncthreads();                     // zeroed before the asynchronous copies land
    load_lut_q_tile(lut_s, lut_q, M, m0, lut_unit);
    load_scale_bias_smem(sb_s, scale, bias, M, m0);      // registers would cost occupancy
    const float* sc = sb_s + threadIdx.x % TPR;
    const float* bi = sb_s + MT + threadIdx.x % TPR;
    int b = blockIdx.x;
    if (b < nbatch) {
        const long long r0 = (long long)b * RB;
        const int nr = (int)((long long)N - r0 < RB ? (long long)N - r0 : RB);
        stage_codes(cbuf0, codes, r0, nr, codes_vec);
    }
    async_commit();
    for (int it = 0; b < nbatch; ++it, b += gridDim.x) {
        u8* cur = (it & 1) ? cbuf1 : cbuf0;
        u8* nxt = (it & 1) ? cbuf0 : cbuf1;
        __syncthreads();                 // every thread is done with nxt (batch it - 1)
        const int bn = b + gridDim.x;
        if (bn < nbatch) {
            const long long rn = (long long)bn * RB;
            stage_codes(nxt, codes, rn, (int)((long long)N - rn < RB ? (long long)N - rn : RB),
                        codes_vec);
        }
        async_commit();
        async_wait_prev();
        __syncthreads();                 // cur (and on the first pass the LUT) has landed
        const long long row0 = (long long)b * RB;
        const int nr = (int)((long long)N - row0 < RB ? (long long)N - row0 : RB);
        lookup_q_rows<TPR>(lut_s, sc, bi, cur, Y, row0, nr, M, m0, one);
    }
}
"""

_ENCODE_LOOKUP_Q = r"""
// Barrier of a thread's warp group (the whole block when GROUPS == 1).
__device__ __forceinline__ void group_sync() {
#if GROUPS == 1
    __syncthreads();
#else
    asm volatile("bar.sync %0, %1;" :: "r"((int)(threadIdx.x / GT) + 1), "n"(GT) : "memory");
#endif
}

// Thread mapping: blockIdx.y picks a tile of MT columns (its 8-bit LUT stays in shared
// memory). The block's GROUPS warp groups of GT threads are independent "virtual blocks"
// sharing that LUT (own A buffers, codes and barriers), so one group's loads wait while
// another sums; virtual blocks stride over batches of RB rows. Rows of A arrive in shared
// memory by cp.async NSTAGE-1 batches ahead (NSTAGE buffers); per batch, thread t of a
// group checks its share of the tile for NaN/Inf and encodes the (row, tree) pairs t,
// t + GT, ... into the group's codes; then thread t sums 16 columns (t % TPR) of rows
// t / TPR + RG * i, i < RPT, as lookup_q_kernel does.
extern "C" __global__ void __launch_bounds__(NT, 1)    // 1 block/SM: the registers may all go
encode_lookup_q_kernel(const IN_T* __restrict__ A, const int* __restrict__ dims,
                       const float* __restrict__ thr, const u8* __restrict__ lut_q,
                       const float* __restrict__ scale, const float* __restrict__ bias,
                       OUT_T* __restrict__ Y, int* __restrict__ flag,
                       int N, int D, int M, u32 one, int a_vec, int lut_unit)
{
    extern __shared__ __align__(16) u8 smem[];
    u8* lut_s = smem;
    int* dims_s = (int*)(smem + LUT_BYTES);
    float* thr_s = (float*)(smem + LUT_BYTES + NCB * TNODES * 4);
    const int head = (LUT_BYTES + NCB * TNODES * 8 + 15) / 16 * 16;
    const int codes_bytes = (RB * CP + 15) / 16 * 16;
    const int tile_bytes = (RB * D * IN_SIZE + 15) & ~15;
    const int g = GROUPS == 1 ? 0 : (int)(threadIdx.x / GT);
    u8* codes_s = smem + head + g * (codes_bytes + NSTAGE * tile_bytes);
    const int off_tiles = head + g * (codes_bytes + NSTAGE * tile_bytes) + codes_bytes;

    const int m0 = blockIdx.y * MT;
    const int nbatch = (N + RB - 1) / RB;
    const int vb = blockIdx.x * GROUPS + g, nvb = gridDim.x * GROUPS;     // virtual block
    for (int i = GTID; i < RB * CP; i += GT) codes_s[i] = 0;   // padding stays 0
    stage_trees(dims_s, thr_s, dims, thr, NCB, D);
    load_lut_q_tile(lut_s, lut_q, M, m0, lut_unit);
    float sc[16], bi[16];
    load_scale_bias(sc, bi, scale, bias, M, m0);
#pragma unroll
    for (int s = 0; s < NSTAGE - 1; ++s) {        // group s: batch s (group 0 also the LUT)
        const int bs = vb + s * nvb;
        if (bs < nbatch) {
            const long long r0 = (long long)bs * RB;
            stage_rows((IN_T*)(smem + off_tiles + s * tile_bytes), A + r0 * D,
                       (int)((long long)N - r0 < RB ? (long long)N - r0 : RB), D, a_vec);
        } else {
            async_commit();
        }
    }
#if GROUPS > 1
    // the LUT, trees and zeroed codes were staged by the whole block: wait for every
    // thread's copies once (group barriers alone would not cover the other groups')
    async_wait_all();
    __syncthreads();
#endif
    u32 bad = 0;
    int b = vb;
    for (int it = 0; b < nbatch; ++it, b += nvb) {
        // the buffer refilled here was read by the encode of batch it - 1, which ended
        // before that iteration's second barrier
        const int bp = b + (NSTAGE - 1) * nvb;
        if (bp < nbatch) {
            const long long rp = (long long)bp * RB;
            stage_rows((IN_T*)(smem + off_tiles + ((it + NSTAGE - 1) % NSTAGE) * tile_bytes),
                       A + rp * D, (int)((long long)N - rp < RB ? (long long)N - rp : RB), D,
                       a_vec);
        } else {
            async_commit();                        // an empty group keeps the count uniform
        }
        async_wait_pipeline();
        group_sync();                  // batch it has landed; lookups of it - 1 are done
        const IN_T* cur = (const IN_T*)(smem + off_tiles + (it % NSTAGE) * tile_bytes);
        const long long row0 = (long long)b * RB;
        const int nr = (int)((long long)N - row0 < RB ? (long long)N - row0 : RB);
        bad |= scan_tile(cur, nr, D, a_vec);
        encode_batch(cur, nr, D, codes_s, CP, RB, NCB, dims_s, thr_s);
        group_sync();
        lookup_q_rows<1>(lut_s, sc, bi, codes_s, Y, row0, nr, M, m0, one);
    }
    async_wait_all();
    if (bad) atomicOr(flag, 1);
}
"""

_LOOKUP_F = r"""
#define VL (16 / LUT_SIZE)       // columns per thread: one 16-byte LUT load (4 fp32, 8 fp16)
#define TPR (MT / VL)
#define RG (NT / TPR)
#define RB (RG * RPT)
#define CP ((NCB + 3) & ~3)

__device__ __forceinline__ void add_lut(float* acc, uint4 w) {
#if LUT_SIZE == 4
    acc[0] += __uint_as_float(w.x); acc[1] += __uint_as_float(w.y);
    acc[2] += __uint_as_float(w.z); acc[3] += __uint_as_float(w.w);
#else
    const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        acc[2 * j] += h2f((u16)(ws[j] & 0xFFFFu));
        acc[2 * j + 1] += h2f((u16)(ws[j] >> 16));
    }
#endif
}

// Thread mapping: blockIdx.y picks a tile of MT columns whose LUT (all codebooks) the block
// keeps in shared memory; blocks stride over batches of RB rows; thread t owns VL adjacent
// columns (t % TPR) of rows t / TPR + RG * i, i < RPT. Sums run over codebooks in order
// from 0, as the reference's, so float32 results are identical.
extern "C" __global__ void __launch_bounds__(NT)
lookup_kernel(const u8* __restrict__ codes, const LUT_T* __restrict__ lut,
              OUT_T* __restrict__ Y, int N, int M, int lut_vec, int y_vec)
{
    extern __shared__ __align__(16) u8 smem[];
    LUT_T* lut_s = (LUT_T*)smem;
    u8* codes_s = smem + NCB * NK * MT * LUT_SIZE;
    const int m0 = blockIdx.y * MT;
    const int nv = MT / VL;
    for (int i = threadIdx.x; i < NCB * NK * nv; i += NT) {
        const int ck = i / nv, v = i - ck * nv;
        const int m = m0 + v * VL;
        const LUT_T* src = lut + (long long)ck * M + m;
        LUT_T* dst = lut_s + ck * MT + v * VL;
        if (lut_vec) {
            *(uint4*)dst = m < M ? *(const uint4*)src : make_uint4(0u, 0u, 0u, 0u);
        } else {
#pragma unroll
            for (int e = 0; e < VL; ++e) dst[e] = m + e < M ? src[e] : (LUT_T)0;
        }
    }
    const int tr = threadIdx.x % TPR, rg = threadIdx.x / TPR;
    const LUT_T* lut_t = lut_s + tr * VL;
    const int nbatch = (N + RB - 1) / RB;
    for (int b = blockIdx.x; b < nbatch; b += gridDim.x) {
        const long long row0 = (long long)b * RB;
        const int nr = (int)((long long)N - row0 < RB ? (long long)N - row0 : RB);
        __syncthreads();
        const u8* src = codes + row0 * NCB;
        for (int i = threadIdx.x; i < RB * CP; i += NT) {
            const int r = i / CP, c = i - r * CP;
            codes_s[i] = (r < nr && c < NCB) ? (u8)BUCKET((u32)src[r * NCB + c], 0) : (u8)0;
        }
        __syncthreads();
        float acc[RPT][VL];
#pragma unroll
        for (int i = 0; i < RPT; ++i)
#pragma unroll
            for (int e = 0; e < VL; ++e) acc[i][e] = 0.f;
        PRAGMA_UNROLL_C
        for (int c = 0; c < NCB; ++c) {
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                const int k = codes_s[(rg + RG * i) * CP + c];
                add_lut(acc[i], *(const uint4*)(lut_t + (c * NK + k) * MT));
            }
        }
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const int r = rg + RG * i;
            if (r >= nr) continue;
            OUT_T* yrow = Y + (row0 + r) * (long long)M;
            const int m = m0 + tr * VL;
            if (y_vec && m + VL <= M) {
#if OUT_SIZE == 4
#pragma unroll
                for (int e = 0; e < VL; e += 4)
                    *(float4*)(yrow + m + e) = make_float4(acc[i][e], acc[i][e + 1], acc[i][e + 2], acc[i][e + 3]);
#else
#pragma unroll
                for (int e = 0; e < VL; e += 4) {
                    uint2 o;
                    o.x = (u32)f2h(acc[i][e]) | ((u32)f2h(acc[i][e + 1]) << 16);
                    o.y = (u32)f2h(acc[i][e + 2]) | ((u32)f2h(acc[i][e + 3]) << 16);
                    *(uint2*)(yrow + m + e) = o;
                }
#endif
            } else {
#pragma unroll
                for (int e = 0; e < VL; ++e) if (m + e < M) put(yrow + m + e, acc[i][e]);
            }
        }
    }
}
"""

_LOOKUP_BACKWARD = r"""
// Thread mapping: block (blockIdx.x: 32 columns, blockIdx.y: a chunk of rows,
// blockIdx.z: a group of CB codebooks); warp w owns codebooks w, w + NT/32, ... of the
// group and lane l column 32 * blockIdx.x + l, so every (codebook, bucket, column)
// accumulator in shared memory has a single owner thread (no races, no barriers); the
// chunk's partial sums are then added to the output with atomicAdd. Codes >= NK add
// nothing, as in the reference.
extern "C" __global__ void __launch_bounds__(NT)
lookup_backward_kernel(const u8* __restrict__ codes, const float* __restrict__ g,
                       float* __restrict__ out, int N, int C, int M, int rows_per_chunk, int CB)
{
    extern __shared__ __align__(16) float acc_s[];      // [CB][NK][32]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m = blockIdx.x * 32 + lane;
    const int c0 = blockIdx.z * CB;
    const int ncb = C - c0 < CB ? C - c0 : CB;
    for (int cl = warp; cl < ncb; cl += NT / 32)
#if NK <= 16
#pragma unroll
#else
#pragma unroll 16
#endif
        for (int k = 0; k < NK; ++k) acc_s[(cl * NK + k) * 32 + lane] = 0.f;
    const long long r0 = (long long)blockIdx.y * rows_per_chunk;
    const long long r1 = r0 + rows_per_chunk < (long long)N ? r0 + rows_per_chunk : (long long)N;
#if NK <= 16
#pragma unroll 4
    for (long long n = r0; n < r1; ++n) {
        const float gv = m < M ? g[n * M + m] : 0.f;
        const u8* cr = codes + n * C + c0;
        for (int cl = warp; cl < ncb; cl += NT / 32) {
            const u32 k = cr[cl];
            if (k < NK) acc_s[(cl * NK + k) * 32 + lane] += gv;
        }
    }
#else
    // K floats per (codebook, column) leave room for few warps per multiprocessor, so
    // each warp issues the loads of RQ rows before their read-modify-writes
#define RQ 16
    for (long long n0 = r0; n0 < r1; n0 += RQ) {
        float gv[RQ];
#pragma unroll
        for (int q = 0; q < RQ; ++q) gv[q] = (m < M && n0 + q < r1) ? g[(n0 + q) * M + m] : 0.f;
        for (int cl = warp; cl < ncb; cl += NT / 32) {
            u32 kq[RQ];
#pragma unroll
            for (int q = 0; q < RQ; ++q)
                kq[q] = n0 + q < r1 ? (u32)codes[(n0 + q) * C + c0 + cl] : (u32)NK;
#pragma unroll
            for (int q = 0; q < RQ; ++q)
                if (kq[q] < NK) acc_s[(cl * NK + kq[q]) * 32 + lane] += gv[q];
        }
    }
#endif
    if (m < M)
        for (int cl = warp; cl < ncb; cl += NT / 32)
#if NK <= 16
#pragma unroll
#else
#pragma unroll 16
#endif
            for (int k = 0; k < NK; ++k) {
                const float v = acc_s[(cl * NK + k) * 32 + lane];
                if (v != 0.f) atomicAdd(out + ((long long)(c0 + cl) * NK + k) * M + m, v);
            }
}
"""

_LOOKUP_GLOBAL = r"""
// Add the 4 LUT entries at p (columns m..m+3 of one LUT row; the first n exist) to acc:
// integers for the 8-bit LUT, float32 otherwise. `vec`: one aligned 4-entry load.
__device__ __forceinline__ void add4(u32* acc, const u8* __restrict__ p, int n, int vec) {
    if (vec) {
        const u32 w = __ldg((const unsigned int*)p);
        acc[0] += w & 0xFFu; acc[1] += (w >> 8) & 0xFFu; acc[2] += (w >> 16) & 0xFFu;
        acc[3] += w >> 24;
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) if (e < n) acc[e] += __ldg(p + e);
    }
}
__device__ __forceinline__ void add4(float* acc, const float* __restrict__ p, int n, int vec) {
    float v[4];
    if (vec) {
        const float4 w = __ldg((const float4*)p);
        v[0] = w.x; v[1] = w.y; v[2] = w.z; v[3] = w.w;
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = e < n ? __ldg(p + e) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = __fadd_rn(acc[e], v[e]);
}
__device__ __forceinline__ void add4(float* acc, const u16* __restrict__ p, int n, int vec) {
    float v[4];
    if (vec) {
        const uint2 w = __ldg((const uint2*)p);
        v[0] = h2f((u16)(w.x & 0xFFFFu)); v[1] = h2f((u16)(w.x >> 16));
        v[2] = h2f((u16)(w.y & 0xFFFFu)); v[3] = h2f((u16)(w.y >> 16));
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = e < n ? h2f(__ldg(p + e)) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = __fadd_rn(acc[e], v[e]);
}
// Output value of column m: two roundings for the 8-bit LUT, as the reference
// (float(isum) * scale + bias); the float sum as it is.
__device__ __forceinline__ float finish(u32 isum, const float* scale, const float* bias, int m) {
    return __fadd_rn(__fmul_rn(__uint2float_rn(isum), scale[m]), bias[m]);
}
__device__ __forceinline__ float finish(float sum, const float*, const float*, int) { return sum; }

#if LUT_Q                        // 8-bit LUT, exact u32 sums (C * 255 < 2^32)
typedef u8 ENTRY_T;
typedef u32 ACC_T;
#else                            // float LUT, float32 sums over codebooks in order from 0
typedef LUT_T ENTRY_T;
typedef float ACC_T;
#endif

// Fallback for LUTs whose narrowest column tile does not fit in shared memory (many
// codebooks x buckets): the LUT is read through L1/L2. Thread mapping: thread -> (row, 4
// adjacent columns), column groups fastest, grid-stride over all (row, group) pairs, so
// the threads of a row read adjacent entries of one LUT row per codebook and the row's
// codes are broadcast loads. `vec`: M % 4 == 0 and the LUT is aligned for one 4-entry
// load. scale and bias are read only for the 8-bit LUT.
extern "C" __global__ void __launch_bounds__(NT)
lookup_global_kernel(const u8* __restrict__ codes, const ENTRY_T* __restrict__ lut,
                     const float* __restrict__ scale, const float* __restrict__ bias,
                     OUT_T* __restrict__ Y, int N, int M, int C, int vec)
{
    const int ng = (M + 3) >> 2;
    const long long total = (long long)N * ng;
    for (long long p = (long long)blockIdx.x * NT + threadIdx.x; p < total;
         p += (long long)gridDim.x * NT) {
        const long long n = p / ng;
        const int m = (int)(p - n * ng) * 4;
        const int nv = M - m < 4 ? M - m : 4;
        const u8* cr = codes + n * C;
        ACC_T acc[4] = {0, 0, 0, 0};
        for (int c = 0; c < C; ++c)
            add4(acc, lut + ((long long)c * NK + BUCKET((u32)__ldg(cr + c), 0)) * M + m, nv, vec);
        OUT_T* y = Y + n * M + m;
#pragma unroll
        for (int e = 0; e < 4; ++e) if (e < nv) put(y + e, finish(acc[e], scale, bias, m + e));
    }
}
"""

_SPIN = r"""
// Thread mapping: one thread; busy-waits `cycles` clock ticks (keeps the device busy
// while the host queues the calls a benchmark times).
extern "C" __global__ void spin_kernel(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""

_FAMILIES = {
    "encode_tree_tile": _ENCODE_TREE, "encode_tree_direct": _ENCODE_TREE,
    "encode_pq_kernel": _ENCODE_PQ,
    "lookup_q_kernel": _LOOKUP_Q_CORE + _LOOKUP_Q,
    "encode_lookup_q_kernel": _LOOKUP_Q_CORE + _ENCODE_LOOKUP_Q,
    "encode_lookup_mma_kernel": cuda_mma.SOURCE,
    "lookup_kernel": _LOOKUP_F,
    "lookup_backward_kernel": _LOOKUP_BACKWARD,
    "lookup_global_kernel": _LOOKUP_GLOBAL,
    "spin_kernel": _SPIN,
}

_CTYPES = {np.dtype(np.float32): ("float", 4), np.dtype(np.float16): ("u16", 2)}


def source(name, **defs):
    """Full CUDA source of kernel ``name`` for the substitutions ``defs``.

    ``defs`` keys: ``IN`` / ``OUT`` / ``LUT`` (numpy dtypes float32/float16), ``NT``,
    ``MT``, ``RPT``, ``NCB``, ``ACC_MODE``, ``NSTAGE``, ``MPW``, ``USE_CP_ASYNC``,
    ``UNROLL_C`` (0 = full), ``TREE_DEPTH`` (default 4), ``NK`` (buckets, default 16).
    """
    defs = dict(defs)
    lines = []
    for role in ("IN", "OUT", "LUT"):
        dt = defs.pop(role, np.float32)
        ctype, size = _CTYPES[np.dtype(dt)]
        lines.append(f"#define {role}_T {ctype}")
        lines.append(f"#define {role}_SIZE {size}")
    unroll = defs.pop("UNROLL_C", 0)
    defs.setdefault("NT", NT)
    defs.setdefault("USE_CP_ASYNC", 1)
    for k, v in defs.items():
        lines.append(f"#define {k} {int(v)}")
    body = _FAMILIES[name].replace("PRAGMA_UNROLL_C",
                                   "#pragma unroll" if not unroll else f"#pragma unroll {int(unroll)}")
    return "\n".join(lines) + "\n" + _PRELUDE + body


# --------------------------------------------------------------------------- compile cache
_kernel_cache = {}       # (name, device id, substitutions) -> cupy.RawKernel


def _kernel(name, device_id, **defs):
    """The compiled kernel ``name`` for ``defs`` on device ``device_id`` (compiled once)."""
    key = (name, int(device_id), tuple(sorted((k, str(np.dtype(v)) if k in ("IN", "OUT", "LUT")
                                                else int(v)) for k, v in defs.items())))
    k = _kernel_cache.get(key)
    if k is None:
        cp = backend.cupy()
        k = cp.RawKernel(source(name, **defs), name)
        _kernel_cache[key] = k
    return k


def cache_info():
    """Compiled kernels so far: a list of (name, device id, substitutions) keys."""
    return list(_kernel_cache)


_props = {}


def device_info(device_id):
    """Limits of a device that the launchers plan with (cached).

    Returns
    -------
    dict: ``sms`` multiprocessors, ``smem_block`` / ``smem_optin`` / ``smem_sm`` shared
    memory bytes (default per block, opt-in per block, per multiprocessor), ``regs_sm``,
    ``cc`` compute capability as 10*major+minor, ``clock_khz`` SM clock.
    """
    p = _props.get(device_id)
    if p is None:
        rt = backend.cupy().cuda.runtime

        def attr(code, default):
            try:
                return int(rt.deviceGetAttribute(code, device_id))
            except Exception:       # an attribute this runtime does not know
                return default
        # cudaDeviceAttr codes: 16 multiprocessors, 8 shared per block, 97 opt-in shared per
        # block, 81 shared per multiprocessor, 82 registers per multiprocessor, 75/76 compute
        # capability, 13 clock rate (kHz)
        p = dict(sms=attr(16, 1), smem_block=attr(8, 48 * 1024), smem_optin=attr(97, 48 * 1024),
                 smem_sm=attr(81, 64 * 1024), regs_sm=attr(82, 65536),
                 cc=attr(75, 7) * 10 + attr(76, 0), clock_khz=attr(13, 0))
        p["smem_optin"] = max(p["smem_optin"], p["smem_block"])
        _props[device_id] = p
    return p


_smem_raised = {}        # (kernel object id, device) -> dynamic shared-memory limit set


def _launch(kern, grid, block, args, smem, dev):
    """Launch with ``smem`` dynamic shared bytes, raising the kernel's limit when needed."""
    if smem > 48 * 1024:
        if smem > dev["smem_optin"]:
            raise ValueError(f"internal: {smem} bytes of shared memory exceed the device "
                             f"limit {dev['smem_optin']}")
        key = (id(kern), backend.cupy().cuda.Device().id)
        if _smem_raised.get(key, 0) < smem:
            kern.max_dynamic_shared_size_bytes = int(smem)
            _smem_raised[key] = smem
    kern(tuple(int(g) for g in grid), (int(block), 1, 1), args, shared_mem=int(smem))


def _blocks_per_sm(kern, nthreads, smem, dev):
    """Resident blocks per multiprocessor allowed by threads, registers and shared memory."""
    try:
        regs = max(int(kern.num_regs), 1)
    except Exception:
        regs = 64
    by_threads = 2048 // nthreads
    by_regs = dev["regs_sm"] // (((regs + 7) // 8 * 8) * nthreads)
    by_smem = dev["smem_sm"] // (smem + 1024) if smem else by_threads
    return max(1, min(by_threads, by_regs, by_smem))


# --------------------------------------------------------------------------- validation
def _require_cupy(**arrays):
    """All arrays CuPy on one device: that device's id."""
    dev = None
    for name, a in arrays.items():
        if not backend.is_cupy(a):
            raise TypeError(f"{name} must be a CuPy array here (got {type(a).__name__}); "
                            "move every input to one library first")
        if dev is None:
            dev = a.device.id
        elif a.device.id != dev:
            raise ValueError(f"{name} is on device {a.device.id} but the other inputs are on "
                             f"device {dev}")
    return dev


def _rows(A, name="A"):
    """A as a contiguous 2-D float32 or float16 CuPy array."""
    cp = backend.cupy()
    if A.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x columns), got shape {tuple(A.shape)}")
    kind = A.dtype.kind
    if kind == "b" or kind == "c" or kind not in "iuf":
        raise TypeError(f"{name} has dtype {A.dtype}; expected real numbers")
    dt = np.float16 if A.dtype == np.float16 else np.float32
    return cp.ascontiguousarray(A, dtype=dt)


def _c(a, dtype):
    return backend.cupy().ascontiguousarray(a, dtype=dtype)


def _aligned(*arrays):
    return all(a.data.ptr % 16 == 0 for a in arrays)


_dims_ok = {}            # (pointer, C, D) -> True once checked (see _check_dims)


def _check_dims(dims, D):
    """Raise ValueError unless every tested column is in [0, D).

    The answer is cached per (device pointer, shape, D), since learned dims do not change;
    the kernels clamp columns anyway, so a later in-place change to out-of-range values
    cannot read outside A (it gives wrong codes instead)."""
    key = (dims.data.ptr, dims.shape, D)
    if key in _dims_ok:
        return
    lo, hi = int(dims.min()), int(dims.max())
    if lo < 0 or hi >= D:
        raise ValueError(f"dims must be column indices in [0, {D}) for A with {D} columns; "
                         f"got values from {lo} to {hi}")
    if len(_dims_ok) > 1024:
        _dims_ok.clear()
    _dims_ok[key] = True


def _tree_args(A, dims, thresholds):
    """(device id, A, dims, thresholds, depth) with the arrays contiguous, exact dtypes."""
    dev = _require_cupy(A=A, dims=dims, thresholds=thresholds)
    A = _rows(A)
    depth = reference.check_tree(dims, thresholds, reference.BYTE_DEPTH)   # ValueError
    if dims.dtype.kind not in "iu":
        raise TypeError(f"dims must hold integer column indices, got dtype {dims.dtype}")
    if thresholds.dtype.kind != "f":
        raise TypeError(f"thresholds must be floating point, got dtype {thresholds.dtype}")
    dims = _c(dims, np.int32)
    thresholds = _c(thresholds, np.float32)
    if A.shape[0] > _MAX_INT32 or A.shape[1] > _MAX_INT32 // 2:
        raise ValueError(f"A has shape {tuple(A.shape)}: too large for the GPU kernels")
    if dims.shape[0]:
        _check_dims(dims, A.shape[1])
    return dev, A, dims, thresholds, depth


def _lut_q_args(lut_q, scale, bias, C):
    if lut_q.ndim != 3 or lut_q.shape[0] != C:
        raise ValueError(f"lut_q must have shape (C={C}, K, M), got {tuple(lut_q.shape)}")
    if lut_q.dtype != np.uint8:
        raise TypeError(f"lut_q must have dtype uint8, got {lut_q.dtype}")
    M = lut_q.shape[2]
    for name, v in (("scale", scale), ("bias", bias)):
        if v.shape != (M,):
            raise ValueError(f"{name} must have shape ({M},) to match lut_q {tuple(lut_q.shape)}, "
                             f"got {tuple(v.shape)}")
    return _c(lut_q, np.uint8), _c(scale, np.float32), _c(bias, np.float32)


def _out_dtype(out_dtype):
    dt = np.dtype(out_dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise TypeError(f"out_dtype must be float32 or float16, got {dt}")
    return dt


def _codes(codes, C=None):
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, C), got shape {tuple(codes.shape)}")
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must have dtype uint8, got {codes.dtype}")
    if C is not None and codes.shape[1] != C:
        raise ValueError(f"codes have {codes.shape[1]} codebooks (shape {tuple(codes.shape)}) "
                         f"but the LUT has {C}")
    if codes.shape[0] > _MAX_INT32:
        raise ValueError(f"codes have {codes.shape[0]} rows: too many for the GPU kernels")
    return _c(codes, np.uint8)


def _raise_if_flagged(flag, A):
    if int(flag.get()[0]):
        validate.finite_or_raise(A, "A")      # names the first bad entry
        raise ValueError("A contains NaN or Inf")   # (not reached: the check above raises)


# --------------------------------------------------------------------------- configs
def _pow2_at_least(x):
    p = 1
    while p < x:
        p *= 2
    return p


def _q_config(C, M, dev, mt=None, rpt=None, nt=NT, budget=_LUT_TILE_BUDGET, acc_mode=1, K=16):
    """(MT, RPT, RB, smem) for the 8-bit lookup kernel, or None when it does not fit.

    MT (column tile): the widest power of two from 16 to 512 columns whose LUT (C x K x MT
    bytes) fits ``budget`` bytes and that M needs; RPT rows per thread (1 past 256
    codebooks, where 32-bit totals take the registers); RB rows per batch.
    """
    if rpt is None:      # scheme 2 keeps 64-bit sums: half the rows per thread
        rpt = 1 if C > 256 else (2 if acc_mode == 2 else 4)
    if mt is None:
        mt = 16
        top = min(512, max(16, _pow2_at_least(M)), nt * 16)
        while mt * 2 <= top and C * K * mt * 2 <= budget:
            mt *= 2
    if mt % 16 or mt & (mt - 1) or mt // 16 > nt:
        raise ValueError(f"column tile {mt} must be a power of two from 16 to {nt * 16}")
    rb = nt // (mt // 16) * rpt
    smem = C * K * mt + 8 * mt + 2 * ((rb * ((C + 3) // 4 * 4) + 15) // 16 * 16)  # LUT, scale
    # and bias, two code buffers
    if smem > dev["smem_optin"]:
        return None
    return mt, rpt, rb, smem


def _lut_unit(lut_q, M, out_dt):
    """Bytes per asynchronous LUT copy: 8 or 4 when that divides M, the output chunk (4
    columns for float32 output, 8 for float16) and the LUT's address; else 1 (bytes)."""
    ch = 16 // out_dt.itemsize
    for unit in (8, 4):
        if unit <= ch and M % unit == 0 and lut_q.data.ptr % unit == 0:
            return unit
    return 1


def _unroll_c(C):
    return 0 if C <= 64 else 4


# --------------------------------------------------------------------------- encoders
def encode_tree(A, dims, thresholds, *, check_finite=True):
    """Codes of the rows of A under C trees of depth d (see :func:`.reference.encode_tree`).

    The depth is read off ``dims.shape[1] = 2**d - 1`` (1 <= d <= 8); each depth is its
    own compiled kernel (a ``TREE_DEPTH`` substitution), so depth 4 runs the same code as
    before trees of other depths existed.

    Parameters
    ----------
    A : (N, D) float32 or float16 CuPy array (other real dtypes are cast to float32)
    dims : (C, 2**d - 1) int32, columns in [0, D)
    thresholds : (C, 2**d - 1) float32
    check_finite : bool, raise ValueError if A holds NaN/Inf (one flag read: a sync)

    Returns
    -------
    codes : (N, C) uint8, leaves 0 .. 2**d - 1
    """
    cp = backend.cupy()
    dev_id, A, dims, thresholds, depth = _tree_args(A, dims, thresholds)
    N, D = A.shape
    C = dims.shape[0]
    codes = cp.empty((N, C), dtype=np.uint8)
    if N == 0 or C == 0:
        if check_finite and A.size:
            validate.finite_or_raise(A, "A")
        return codes
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        flag = cp.zeros(1, dtype=np.int32)
        isz = A.itemsize
        head = (C * (2 ** depth - 1) * 8 + 15) // 16 * 16        # the trees' dims, thresholds
        rows = max(1, min(64, _ENCODE_TILE_BUDGET // (D * isz)))
        smem = head + (rows * D * isz + 15) // 16 * 16
        if smem <= dev["smem_optin"]:
            a_vec = int(_aligned(A) and (D * isz) % 16 == 0)
            kern = _kernel("encode_tree_tile", dev_id, IN=A.dtype, USE_CP_ASYNC=dev["cc"] >= 80,
                           TREE_DEPTH=depth)
            ntiles = (N + rows - 1) // rows
            grid = min(ntiles, dev["sms"] * _blocks_per_sm(kern, NT, smem, dev) * 4)
            _launch(kern, (grid,), NT, (A, dims, thresholds, codes, flag, np.int32(N),
                                        np.int32(D), np.int32(C), np.int32(rows),
                                        np.int32(a_vec)), smem, dev)
        else:
            kern = _kernel("encode_tree_direct", dev_id, IN=A.dtype, USE_CP_ASYNC=0,
                           TREE_DEPTH=depth)
            grid = min((N * C + NT - 1) // NT, dev["sms"] * 32)
            _launch(kern, (grid,), NT, (A, dims, thresholds, codes, flag, np.int32(N),
                                        np.int32(D), np.int32(C)), 0, dev)
        if check_finite:
            _raise_if_flagged(flag, A)
    return codes


def encode_pq(A, centroids, starts, *, check_finite=True):
    """Nearest-centroid codes per subspace (see :func:`.reference.encode_pq`).

    Parameters
    ----------
    A : (N, D) float32 or float16 CuPy array
    centroids : (C, 16, W) float32, zero padded past each subspace's width
    starts : (C + 1,) int (NumPy or CuPy), subspace c is columns starts[c]:starts[c+1]
    check_finite : bool, raise ValueError if A holds NaN/Inf

    Returns
    -------
    codes : (N, C) uint8
    """
    cp = backend.cupy()
    dev_id = _require_cupy(A=A, centroids=centroids)
    A = _rows(A)
    if centroids.ndim != 3:
        raise ValueError(f"centroids must have shape (C, K, W), got {tuple(centroids.shape)}")
    C, K, W = centroids.shape
    st = np.asarray(backend.to_host(starts)).astype(np.int64).ravel()
    N, D = A.shape
    if st.shape != (C + 1,):
        raise ValueError(f"starts must have C + 1 = {C + 1} entries, got {st.shape[0]}")
    widths = np.diff(st)
    if st[0] < 0 or st[-1] > D or (widths < 0).any() or (widths > W).any():
        raise ValueError(f"starts must rise from >= 0 to <= D={D} in steps of at most W={W}; "
                         f"got {st.tolist()}")
    if K != 16 or C > 65535 or N > _MAX_INT32 or N == 0 or C == 0:
        if check_finite and A.size:
            validate.finite_or_raise(A, "A")
        return reference.encode_pq(A, centroids, starts)
    codes = cp.empty((N, C), dtype=np.uint8)
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        flag = cp.zeros(1, dtype=np.int32)
        cent = _c(centroids, np.float32)
        st_d = cp.asarray(st.astype(np.int32))
        kern = _kernel("encode_pq_kernel", dev_id, IN=A.dtype, USE_CP_ASYNC=0)
        gx = min((N + NT - 1) // NT, max(1, dev["sms"] * 8 // C + 1))
        _launch(kern, (gx, C), NT, (A, cent, st_d, codes, flag, np.int32(N), np.int32(D),
                                    np.int32(C), np.int32(W)), 0, dev)
        if check_finite:
            # columns outside every subspace are not read by this kernel: check them too
            if st[0] > 0 or st[-1] < D or (widths == 0).any():
                validate.finite_or_raise(A, "A")
            _raise_if_flagged(flag, A)
    return codes


# --------------------------------------------------------------------------- lookups
def _lookup_global(codes, lut, scale, bias, Y, dev_id, dev, K):
    """Launch the L1/L2 fallback ``lookup_global_kernel`` into Y (the LUT tile did not fit
    in shared memory): the 8-bit LUT with ``scale``/``bias`` when lut is uint8, else the
    float LUT (scale and bias None)."""
    N, C = codes.shape
    M = Y.shape[1]
    vec = int(M % 4 == 0 and lut.data.ptr % (4 * lut.itemsize) == 0)
    quant = lut.dtype == np.uint8
    defs = dict(LUT_Q=1) if quant else dict(LUT_Q=0, LUT=lut.dtype)
    kern = _kernel("lookup_global_kernel", dev_id, OUT=Y.dtype, NK=K, **defs)
    if not quant:
        scale = bias = lut           # not read
    total = N * ((M + 3) // 4)
    grid = max(1, min((total + NT - 1) // NT, dev["sms"] * 16))
    _launch(kern, (grid,), NT, (codes, lut, scale, bias, Y, np.int32(N), np.int32(M),
                                np.int32(C), np.int32(vec)), 0, dev)
    return Y


def lookup_q(codes, lut_q, scale, bias, out_dtype=np.float32, *, acc_mode=1, mt=None,
             rpt=None):
    """8-bit LUT sums, exact in integers, then ``isum * scale + bias``.

    The LUT's column tile (C x K x MT bytes) is kept in shared memory; when even the
    narrowest tile (MT = 16) does not fit (C * K above about 14000 on an H100, e.g. K = 256
    with C >= 57), a kernel that reads the LUT through L1/L2 runs instead (slower).

    Parameters
    ----------
    codes : (N, C) uint8 CuPy array (values are taken mod K, as CuPy's reference indexes,
        when K is a power of two; mod K in general)
    lut_q : (C, K, M) uint8, any K in 1..256
    scale, bias : (M,) float32
    out_dtype : float32 or float16
    acc_mode, mt, rpt : kernel variant (accumulation scheme 0/1/2, column tile, rows per
        thread); defaults are the measured best

    Returns
    -------
    Y : (N, M) out_dtype
    """
    cp = backend.cupy()
    dev_id = _require_cupy(codes=codes, lut_q=lut_q, scale=scale, bias=bias)
    out_dt = _out_dtype(out_dtype)
    if lut_q.ndim != 3:
        raise ValueError(f"lut_q must have shape (C, K, M), got {tuple(lut_q.shape)}")
    C, K = lut_q.shape[0], reference.lut_buckets(lut_q, reference.BYTE_DEPTH)
    codes = _codes(codes, C)
    lut_q, scale, bias = _lut_q_args(lut_q, scale, bias, C)
    N, M = codes.shape[0], lut_q.shape[2]
    Y = cp.empty((N, M), dtype=out_dt)
    if N == 0 or M == 0:
        return Y
    if C == 0:
        Y[...] = bias[None, :].astype(out_dt)
        return Y
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        cfg = None
        for r in ([rpt] if rpt else [None, 2, 1]):      # fewer rows: smaller code buffers
            cfg = cfg or _q_config(C, M, dev, mt, r, acc_mode=acc_mode, K=K)
        if cfg is None or (M + cfg[0] - 1) // cfg[0] > 65535:
            return _lookup_global(codes, lut_q, scale, bias, Y, dev_id, dev, K)
        MT, RPT, RB, smem = cfg
        codes_vec = int(C % 4 == 0 and _aligned(codes))
        kern = _kernel("lookup_q_kernel", dev_id, OUT=out_dt, NCB=C, MT=MT, RPT=RPT, NK=K,
                       ACC_MODE=acc_mode, USE_CP_ASYNC=dev["cc"] >= 80, UNROLL_C=_unroll_c(C))
        gy = (M + MT - 1) // MT
        nbatch = (N + RB - 1) // RB
        per_sm = _blocks_per_sm(kern, NT, smem, dev)
        gx = max(1, min(nbatch, -(-dev["sms"] * per_sm // gy)))
        _launch(kern, (gx, gy), NT, (codes, lut_q, scale, bias, Y, np.int32(N), np.int32(M),
                                     np.uint32(1), np.int32(_lut_unit(lut_q, M, out_dt)),
                                     np.int32(codes_vec)), smem, dev)
    return Y


def lookup(codes, lut, out_dtype=np.float32, *, mt=None, rpt=4):
    """Float LUT sums ``Y[n] = sum_c lut[c, codes[n, c]]`` in float32, codebooks in order.

    As :func:`lookup_q`: the LUT's column tile in shared memory, or, when even the narrowest
    tile does not fit, a kernel reading the LUT through L1/L2 (same sums, same order).

    Parameters
    ----------
    codes : (N, C) uint8 CuPy array (values taken mod K)
    lut : (C, K, M) float32 or float16 (accumulated in float32), any K in 1..256
    out_dtype : float32 or float16

    Returns
    -------
    Y : (N, M) out_dtype
    """
    cp = backend.cupy()
    dev_id = _require_cupy(codes=codes, lut=lut)
    out_dt = _out_dtype(out_dtype)
    if lut.ndim != 3:
        raise ValueError(f"lut must have shape (C, K, M), got {tuple(lut.shape)}")
    if lut.dtype.kind != "f":
        raise TypeError(f"lut must be floating point, got dtype {lut.dtype}")
    C, K, M = lut.shape
    K = reference.lut_buckets(lut, reference.BYTE_DEPTH)
    codes = _codes(codes, C)
    N = codes.shape[0]
    lut_dt = np.dtype(np.float16) if lut.dtype == np.float16 else np.dtype(np.float32)
    lut = _c(lut, lut_dt)
    Y = cp.empty((N, M), dtype=out_dt)
    if N == 0 or M == 0:
        return Y
    if C == 0:
        Y[...] = 0
        return Y
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        vl = 16 // lut_dt.itemsize
        if mt is None:
            mt = vl
            top = min(max(vl, _pow2_at_least(M)), NT * vl)
            while mt * 2 <= top and C * K * mt * 2 * lut_dt.itemsize <= _LUT_TILE_BUDGET:
                mt *= 2
        tpr = mt // vl
        rb = NT // tpr * rpt
        smem = C * K * mt * lut_dt.itemsize + (rb * ((C + 3) // 4 * 4) + 15) // 16 * 16
        if smem > dev["smem_optin"] or (M + mt - 1) // mt > 65535:
            return _lookup_global(codes, lut, None, None, Y, dev_id, dev, K)
        lut_vec = int(_aligned(lut) and M % vl == 0)
        y_vec = int(_aligned(Y) and (M * out_dt.itemsize) % 16 == 0)
        kern = _kernel("lookup_kernel", dev_id, OUT=out_dt, LUT=lut_dt, NCB=C, MT=mt, RPT=rpt,
                       NK=K, UNROLL_C=_unroll_c(C))
        gy = (M + mt - 1) // mt
        nbatch = (N + rb - 1) // rb
        gx = max(1, min(nbatch, -(-dev["sms"] * _blocks_per_sm(kern, NT, smem, dev) // gy)))
        _launch(kern, (gx, gy), NT, (codes, lut, Y, np.int32(N), np.int32(M), np.int32(lut_vec),
                                     np.int32(y_vec)), smem, dev)
    return Y


def lookup_backward(codes, grad_Y, nbuckets=16):
    """Scatter-add of gradient rows into LUT buckets (see :func:`.reference.lookup_backward`).

    Per block, a (codebooks x K x 32 columns) float accumulator in shared memory; the
    group of codebooks shrinks as K grows (16 at K <= 16, 1 at K = 256, where 7 of a
    block's 8 warps idle: correct, not fast).

    Parameters
    ----------
    codes : (N, C) uint8 CuPy array (codes >= K add nothing, as in the reference)
    grad_Y : (N, M) float32
    nbuckets : int, K in 1..256

    Returns
    -------
    grad_lut : (C, K, M) float32
    """
    cp = backend.cupy()
    dev_id = _require_cupy(codes=codes, grad_Y=grad_Y)
    codes = _codes(codes)
    if grad_Y.ndim != 2 or grad_Y.shape[0] != codes.shape[0]:
        raise ValueError(f"grad_Y must have shape (N={codes.shape[0]}, M), got "
                         f"{tuple(grad_Y.shape)}")
    K = reference.check_nbuckets(nbuckets, reference.BYTE_DEPTH)
    g = _c(grad_Y, np.float32)
    N, C = codes.shape
    M = g.shape[1]
    out = cp.zeros((C, K, M), dtype=np.float32)
    if N == 0 or C == 0 or M == 0:
        return out
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        # 16 codebooks of 16 buckets: 32 KB of accumulators; more buckets, fewer codebooks
        CB = max(1, min(C, 16, 16 * 16 // K))
        gx, gz = (M + 31) // 32, (C + CB - 1) // CB
        if gx > 65535 * 1024 or gz > 65535:
            return reference.lookup_backward(codes, g, K)
        want = dev["sms"] * 8
        gy = max(1, min(65535, (N + 15) // 16, -(-want // (gx * gz))))
        rows = (N + gy - 1) // gy
        gy = (N + rows - 1) // rows
        kern = _kernel("lookup_backward_kernel", dev_id, NK=K)
        _launch(kern, (gx, gy, gz), NT, (codes, g, out, np.int32(N), np.int32(C), np.int32(M),
                                         np.int32(rows), np.int32(CB)), CB * K * 32 * 4, dev)
    return out


# --------------------------------------------------------------------------- fused apply
def _fused_config(C, M, D, in_size, dev, mt=None, rpt=None, nstage=None, groups=1):
    """(NT, MT, RPT, RB, NSTAGE, smem) of the fused simt kernel, or None when it would not fit.

    Float32 input first tries 1 row per thread and 4 stages of A tiles at the widest
    column tile that allows them: at 65536 x 512 x 512, C = 16 on an H100 this was
    0.106 ms with 256-column tiles against 0.117 ms with one 512-column tile and 2
    stages; float16 input lost with 256-column tiles (0.082 against 0.0625 ms).
    Otherwise: the fewest column tiles (each tile re-encodes its rows), then 2 stages,
    then 2 rows per thread; the budget is the device's opt-in shared memory per block.
    ``groups``: warp groups per block (each with its own codes and A buffers; RB is then
    a group's batch)."""
    tops = [mt] if mt else [t for t in (512, 256, 128, 64, 32, 16)
                            if t <= max(16, _pow2_at_least(M))]
    cp_ = (C + 3) // 4 * 4
    cands = []
    if in_size == 4 and mt is None and rpt is None and nstage is None:
        cands += [(t, 4, 1) for t in tops]
    for t in tops:
        for ns in ([nstage] if nstage else [2, 3]):
            for r in ([rpt] if rpt else ([1] if C > 256 else [2, 1])):
                cands.append((t, ns, r))
    for t, ns, r in cands:
        nt = 512 if t // 16 >= 32 else NT
        if t // 16 > nt // groups or ns < 2:
            continue
        rb = nt // groups // (t // 16) * r
        head = (C * 16 * t + C * 120 + 15) // 16 * 16
        smem = head + groups * ((rb * cp_ + 15) // 16 * 16
                                + ns * ((rb * D * in_size + 15) // 16 * 16))
        if smem <= dev["smem_optin"]:
            return nt, t, r, rb, ns, smem
    return None


def encode_lookup_q(A, dims, thresholds, lut_q, scale, bias, out_dtype=np.float32, *,
                    mode="auto", engine="auto", acc_mode=1, mt=None, rpt=None, nstage=None,
                    mpw=None, groups=None, check_finite=True):
    """MADDNESS apply: ``lookup_q(encode_tree(A, dims, thresholds), lut_q, scale, bias)``.

    Parameters
    ----------
    A : (N, D) float32 or float16 CuPy array
    dims : (C, K - 1) int32; thresholds : (C, K - 1) float32: trees of depth d, K = 2**d
        leaves, 1 <= d <= 8 (read off the shape)
    lut_q : (C, K, M) uint8; scale, bias : (M,) float32
    out_dtype : float32 or float16
    mode : "auto" (the fused kernel when its tiles fit in shared memory and either M
        fits one column tile or C <= 16; else the encode and lookup kernels), "fused" or
        "split". The fused kernels exist for depth 4 (K = 16) only: for other depths
        every mode, "fused" included, runs the encode and lookup kernels (as "fused" also
        does at K = 16 when the fused tiles do not fit)
    engine : fused kernel: "simt" (LUT in shared memory, byte sums on the integer pipe),
        "mma" (the lookup as a one-hot x LUT product on the integer tensor cores, LUT in
        registers; C <= 16, compute capability >= 8.0, else simt) or "auto" (simt: mma
        was measured slower, see benchmarks/NOTES_gpu.md)
    acc_mode, mt, rpt : simt variant (see :func:`lookup_q`); nstage: A tile buffers
        (mma: the most it may keep, default as many as fit, up to 6); mpw: mma m-tiles
        (16 rows) per warp and batch; groups: simt kernel with this many independent
        warp groups per block sharing the LUT (1, 2 or 4). None: 4 for float16 input,
        2 for float32 (H100, 65536 x 512 x 512, C = 16: fp16 0.0583 ms with 4 groups,
        0.0593 with 2, 0.0625 with 1; fp32 0.1048 ms with 2, 0.1061 with 1), 1 where a
        grouped plan does not fit
    check_finite : bool, raise ValueError if A holds NaN/Inf

    Returns
    -------
    Y : (N, M) out_dtype
    """
    cp = backend.cupy()
    dev_id = _require_cupy(A=A, dims=dims, thresholds=thresholds, lut_q=lut_q, scale=scale,
                           bias=bias)
    validate.check_choice(mode, "mode", ("auto", "fused", "split"))
    validate.check_choice(engine, "engine", ("auto", "mma", "simt"))
    validate.check_choice(groups, "groups", (None, 1, 2, 4))
    out_dt = _out_dtype(out_dtype)
    dev_id, A, dims, thresholds, depth = _tree_args(A, dims, thresholds)
    C = dims.shape[0]
    lut_q, scale, bias = _lut_q_args(lut_q, scale, bias, C)
    if lut_q.shape[1] != 2 ** depth:
        raise ValueError(f"lut_q {tuple(lut_q.shape)} must have K = {2 ** depth} buckets, one per "
                         f"leaf of the depth-{depth} trees (dims {tuple(dims.shape)})")
    N, D = A.shape
    M = lut_q.shape[2]
    cfg = None
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        if mode != "split" and depth == 4 and C > 0 and N > 0 and M > 0:
            mcfg = None
            if engine == "mma":
                mcfg = cuda_mma.config(C, M, D, A.itemsize, dev, nstage, mpw)
                if mcfg is not None and (M + mcfg[1] - 1) // mcfg[1] > 65535:
                    mcfg = None
            if mcfg is not None:
                return _encode_lookup_mma(A, dims, thresholds, lut_q, scale, bias, out_dt,
                                          mcfg, dev, dev_id, check_finite)
            if groups is None:      # one group waits on its loads while another sums
                groups = 4 if A.itemsize == 2 else 2
                cfg = _fused_config(C, M, D, A.itemsize, dev, mt, rpt, nstage, groups)
                if cfg is None:
                    groups = 1
            if cfg is None:
                cfg = _fused_config(C, M, D, A.itemsize, dev, mt, rpt, nstage, groups)
            # measured (H100, bench_gpu, 16 shapes): fused wins when M fits one column tile
            # or C <= 16; with more codebooks the LUT tile narrows, every tile re-encodes
            # its rows, and the encode + lookup kernels win
            if cfg is not None and mode == "auto":
                if (M + cfg[1] - 1) // cfg[1] > 1 and C > 16:
                    cfg = None
            if cfg is not None and (M + cfg[1] - 1) // cfg[1] > 65535:
                cfg = None
        if cfg is None:
            codes = encode_tree(A, dims, thresholds, check_finite=check_finite)
            return lookup_q(codes, lut_q, scale, bias, out_dt, acc_mode=acc_mode, mt=mt,
                            rpt=rpt)
        nt, MT, RPT, RB, NS, smem = cfg
        Y = cp.empty((N, M), dtype=out_dt)
        flag = cp.zeros(1, dtype=np.int32)
        a_vec = int(_aligned(A) and (D * A.itemsize) % 16 == 0)
        kern = _kernel("encode_lookup_q_kernel", dev_id, IN=A.dtype, OUT=out_dt, NT=nt, NCB=C,
                       MT=MT, RPT=RPT, NSTAGE=NS, ACC_MODE=acc_mode,
                       USE_CP_ASYNC=dev["cc"] >= 80, UNROLL_C=_unroll_c(C),
                       **({"GROUPS": groups} if groups > 1 else {}))
        gy = (M + MT - 1) // MT
        nbatch = (N + RB - 1) // RB
        gx = max(1, min(-(-nbatch // groups),
                        -(-dev["sms"] * _blocks_per_sm(kern, nt, smem, dev) // gy)))
        _launch(kern, (gx, gy), nt, (A, dims, thresholds, lut_q, scale, bias, Y, flag,
                                     np.int32(N), np.int32(D), np.int32(M), np.uint32(1),
                                     np.int32(a_vec), np.int32(_lut_unit(lut_q, M, out_dt))),
                smem, dev)
        if check_finite:
            _raise_if_flagged(flag, A)
    return Y


def _encode_lookup_mma(A, dims, thresholds, lut_q, scale, bias, out_dt, cfg, dev, dev_id,
                       check_finite):
    """Launch ``encode_lookup_mma_kernel`` with the plan ``cfg`` (see :func:`cuda_mma.config`)."""
    cp = backend.cupy()
    N, D = A.shape
    C, _, M = lut_q.shape
    nt, MT, MPW, RB, NS, smem = cfg
    Y = cp.empty((N, M), dtype=out_dt)
    flag = cp.zeros(1, dtype=np.int32)
    a_vec = int(_aligned(A) and (D * A.itemsize) % 16 == 0)
    lut_vec = int(M % 4 == 0 and lut_q.data.ptr % 4 == 0)
    y_vec = int(_aligned(Y) and (M * out_dt.itemsize) % 16 == 0)
    kern = _kernel("encode_lookup_mma_kernel", dev_id, IN=A.dtype, OUT=out_dt, NT=nt, NCB=C,
                   MT=MT, MPW=MPW, NSTAGE=NS, USE_CP_ASYNC=1)
    gy = (M + MT - 1) // MT
    gx = max(1, min((N + RB - 1) // RB, -(-dev["sms"] * _blocks_per_sm(kern, nt, smem, dev) // gy)))
    _launch(kern, (gx, gy), nt, (A, dims, thresholds, lut_q, scale, bias, Y, flag, np.int32(N),
                                 np.int32(D), np.int32(M), np.int32(a_vec), np.int32(lut_vec),
                                 np.int32(y_vec)), smem, dev)
    if check_finite:
        _raise_if_flagged(flag, A)
    return Y


def spin(cycles, device_id=None):
    """Keep the current device busy for ``cycles`` clock ticks (benchmark helper)."""
    cp = backend.cupy()
    dev_id = cp.cuda.Device().id if device_id is None else device_id
    kern = _kernel("spin_kernel", dev_id)
    kern((1,), (1,), (np.int64(cycles),))
