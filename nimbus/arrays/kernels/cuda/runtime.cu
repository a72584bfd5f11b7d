// Whole-chain inference of a converted network (nimbus.arrays.kernels.runtime_cuda.ChainCUDA).
//
// One launch runs every layer of the chain for a tile of R consecutive rows: per layer, the
// block encodes its rows under the layer's trees (codes in shared memory), sums the 8-bit
// LUT rows of those codes exactly in integers, and writes y = float(isum) * scale + bias
// (two roundings, __fmul_rn then __fadd_rn, as the reference) into shared memory, where
// the next layer's encoder reads it; only the last layer writes device memory. Between
// layers nothing leaves the SM, so the chain costs one read of X and one write of Y.
//
// LUT access, per layer (decided in the kernel from R and the layer's sizes):
//   staged  (R >= K and one codebook's LUT fits a chunk): chunks of CB codebooks are copied
//           into shared memory by cp.async, double buffered (the copy of chunk i + 1 runs
//           while chunk i is summed; chunk 0 while the rows are encoded). Each tile reads
//           the whole LUT once from L2, which is cheaper than R rows' scattered reads
//           once R >= K.
//   direct  (small tiles, deep trees): each row's LUT rows are read straight from global
//           memory (L2-resident across calls), 16 bytes per load.
// The encoder stores, per (row, tree), the byte offset of its LUT row in the layer's LUT
// (c K Mp + leaf Mp), so that a lookup is one shared load and one add per codebook.
// Work split of the lookup: P = R * Mp / 16 (row, 16-column group) pairs. P > NT / 2:
// each thread owns up to RPT pairs over all codebooks. Else (small tiles, narrow layers)
// S = 2^k consecutive lanes of one warp share a pair (S the largest power of two <= 32
// with S P <= NT), each summing every S-th codebook, and the partial sums meet by a
// reduce-scatter of warp shuffles (reduce_pair): each lane ends with whole sums of
// 16 / S columns and writes them; no shared atomics, no extra barrier (integer sums: the
// order does not change the result).
//
// Byte sums: a 16-byte LUT load holds 16 output columns; __byte_perm spreads its bytes into
// 16-bit lanes of 8 words, so one add sums two columns. A lane holds 257 * 255 at most, so
// the lanes are flushed (widened into 32-bit totals, or reduced across the lanes of a
// pair, whose sums stay below 65536 as well) after at most 256 codebooks.
//
// NaN/Inf in X (`check`): 0 not looked for; 1 (CHECK_FLAG) the kernel sets Params.flag,
// which the host reads with a sync and raises on; 2 (CHECK_ROWS) every output of a row
// whose input holds one is written as NaN (one-row tiles: the OR of the threads' findings,
// taken by the barrier after X is read; larger tiles: a per-row flag in shared memory,
// set while the tile of X is read), so the call needs no sync and no row's result is
// silently wrong.
//
// Inputs that change per call (X, Y and the NaN/Inf flag) live in a Params block in
// device memory, written by one 24-byte copy before each graph launch, so a CUDA graph
// captured once per batch size reads any X and writes a fresh Y without copies.
//
// Defines: NT threads per block (256), RPT pairs per thread at most (1, 2 or 4).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef NT
#define NT 256
#endif
#ifndef RPT
#define RPT 4
#endif

// One layer, as built by runtime_cuda.py (80 bytes, same field order there).
struct Layer {
    const int2* tree;      // (C, K-1) {column of the input, float bits of the threshold}
    const u8* lut;         // (C, K, Mp) uint8, columns M..Mp-1 zero
    const float* scale;    // (Mp,)
    const float* bias;     // (Mp,)
    int C, depth, M, Mp;   // codebooks, tree depth (K = 2^depth), outputs, outputs padded to 16
    int D, kpad;           // input columns; C K rounded up to 32 (chain_mma_kernel)
    const u8* lutb;        // chain_mma_kernel's LUT in operand order (kpad / 32 steps)
    const u8* treeb;       // the trees compact for chain_mma_kernel: (C, K-1) float thresholds,
                           // then (C, K-1) uint16 columns, each part padded to 16 bytes
    int tree_bytes, pad3;  // bytes of treeb (0: none)
};

// What changes per call (24 bytes, written before each launch).
struct Params {
    const float* X;        // (N, D0) float32, row-major
    float* Y;              // (N, M_last) float32, row-major
    int flag;              // set to 1 when X holds NaN or Inf (the host zeroes it)
    int pad;
};

#define CHECK_FLAG 1
#define CHECK_ROWS 2

__device__ __forceinline__ u32 nonfinite(float v) {
    return (__float_as_uint(v) & 0x7F800000u) == 0x7F800000u;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void copy16(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src)
                 : "memory");
#else
    *(uint4*)dst = *(const uint4*)src;
#endif
}
__device__ __forceinline__ void async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void async_wait_all() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}
__device__ __forceinline__ void async_wait_prev() {   // all groups but the newest
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}

// Start copying `nbytes` (a multiple of 16, both addresses 16-byte aligned) into shared memory.
__device__ __forceinline__ void stage(u8* dst, const u8* __restrict__ src, int nbytes) {
    for (int i = threadIdx.x; i < (nbytes >> 4); i += NT) copy16(dst + 16 * i, src + 16 * i);
    async_commit();
}

__device__ __forceinline__ void add_bytes(u32 (&a)[8], const uint4 w) {
    a[0] += __byte_perm(w.x, 0, 0x4140); a[1] += __byte_perm(w.x, 0, 0x4342);
    a[2] += __byte_perm(w.y, 0, 0x4140); a[3] += __byte_perm(w.y, 0, 0x4342);
    a[4] += __byte_perm(w.z, 0, 0x4140); a[5] += __byte_perm(w.z, 0, 0x4342);
    a[6] += __byte_perm(w.w, 0, 0x4140); a[7] += __byte_perm(w.w, 0, 0x4342);
}

// Lane word 2q holds columns 4q (low half) and 4q+1, word 2q+1 columns 4q+2 and 4q+3.
__device__ __forceinline__ void widen(u32 (&t)[16], u32 (&a)[8]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        t[4 * q + 0] += a[2 * q] & 0xFFFFu;      t[4 * q + 1] += a[2 * q] >> 16;
        t[4 * q + 2] += a[2 * q + 1] & 0xFFFFu;  t[4 * q + 3] += a[2 * q + 1] >> 16;
        a[2 * q] = 0u; a[2 * q + 1] = 0u;
    }
}

// Leaf of one row under one tree of depth D <= 4: the whole tree is read in one round of
// independent loads, then walked in registers (one load latency instead of D dependent
// ones; small tiles, where nothing else hides that latency). X_GLOBAL: xr in global memory.
// e[LO + idx] for idx < 2^LEV, by a tree of selects on idx's bits (constant indices only,
// so that e stays in registers).
template <int LO, int LEV>
struct Pick {
    static __device__ __forceinline__ int2 get(const int2 (&e)[15], int idx) {
        const int half = 1 << (LEV - 1);
        const int2 hi = Pick<LO + half, LEV - 1>::get(e, idx);
        const int2 lo = Pick<LO, LEV - 1>::get(e, idx);
        return (idx & half) ? hi : lo;
    }
};
template <int LO>
struct Pick<LO, 0> {
    static __device__ __forceinline__ int2 get(const int2 (&e)[15], int) { return e[LO]; }
};

template <int D, bool X_GLOBAL>
__device__ __forceinline__ int walk_whole(const int2* __restrict__ t, const float* xr) {
    int2 e[15];
#pragma unroll
    for (int i = 0; i < (1 << D) - 1; ++i) e[i] = __ldg(t + i);
    int node = 0;
#define NIMBUS_LEVEL(LEV)                                                                    \
    if (LEV < D) {                                                                           \
        const int2 f = Pick<(1 << LEV) - 1, LEV>::get(e, node - ((1 << LEV) - 1));            \
        const float v = X_GLOBAL ? __ldg(xr + f.x) : xr[f.x];                                \
        node = 2 * node + 1 + (v > __int_as_float(f.y) ? 1 : 0);                             \
    }
    NIMBUS_LEVEL(0) NIMBUS_LEVEL(1) NIMBUS_LEVEL(2) NIMBUS_LEVEL(3)
#undef NIMBUS_LEVEL
    return node - ((1 << D) - 1);
}

// Leaf of one row under one tree (heap order, right iff x > threshold).
template <bool X_GLOBAL>
__device__ __forceinline__ int walk(const int2* __restrict__ t, int depth, const float* xr) {
    switch (depth) {
        case 1: return walk_whole<1, X_GLOBAL>(t, xr);
        case 2: return walk_whole<2, X_GLOBAL>(t, xr);
        case 3: return walk_whole<3, X_GLOBAL>(t, xr);
        case 4: return walk_whole<4, X_GLOBAL>(t, xr);
        default: break;
    }
    int node = 0;
    for (int lev = 0; lev < depth; ++lev) {
        const int2 e = __ldg(t + node);
        const float v = X_GLOBAL ? __ldg(xr + e.x) : xr[e.x];
        node = 2 * node + 1 + (v > __int_as_float(e.y) ? 1 : 0);
    }
    return node - ((1 << depth) - 1);
}

// Byte sums of codebooks c0 + s, c0 + s + S, ... (< c0 + cn, cn <= 256) for this thread's
// pairs, added into a's 16-bit lanes (the caller flushes them before 256 codebooks).
// codes[rowoff + c] holds c K Mp + leaf Mp, the byte offset of the LUT row in the layer's
// LUT (the encoder's product, done once per row and tree, not once per pair); `base` is
// the LUT (direct reads, global memory) or the staged chunk (SHARED, codebook c0 at its
// start; sub = c0 K Mp). The loads of U codebooks are issued before any of their adds
// (predicated, zeros past the end), so a thread waits for one round of loads per U
// codebooks: an unrolled loop with a remainder would run the last iterations one load
// latency each, which at batch 1 is most of the kernel's time (12 of a 196-codebook
// layer's 13 reads). U: codebooks per round (the caller takes 4 where no thread has more,
// so that narrow layers do not run 16 mostly empty slots).
template <bool SHARED, int U>
__device__ __forceinline__ void sum_chunk(u32 (&a)[RPT][8], const u8* base, u32 sub,
                                          const u32* codes, int c0, int cn, int s, int S,
                                          const int (&rowoff)[RPT], const int (&col)[RPT],
                                          const bool (&ok)[RPT]) {
    for (int cc0 = s; cc0 < cn; cc0 += U * S) {
        uint4 w[RPT][U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int cc = cc0 + u * S;
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                w[i][u] = make_uint4(0u, 0u, 0u, 0u);
                if (ok[i] && cc < cn) {
                    const uint4* p = (const uint4*)(base + (codes[rowoff[i] + c0 + cc] - sub + col[i]));
                    w[i][u] = SHARED ? *p : __ldg(p);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int i = 0; i < RPT; ++i) add_bytes(a[i], w[i][u]);
    }
}

// One pair's 16 column sums, spread over the S = 2^KK (1 <= KK <= 5) consecutive lanes that
// share the pair as 8 words of 16-bit lanes each (word i: columns 2i, 2i + 1; no carry, a
// flush covers at most 256 codebooks of 255), meet by a reduce-scatter: at step j the lanes
// 2^j apart swap half of their words (shfl_xor) and each keeps the sum of the other half.
// After KK steps lane s holds the whole sums of columns [2 off, 2 off + 16 / S) (KK <= 3),
// or of column 2 off + b3 (KK >= 4; at KK = 5 lanes s and s ^ 16 hold the same one), where
// b_j = bit j of s and off = 4 b0 + 2 b1 + b2 (the terms with j < KK). They are added into
// cs[0 ..); a is zeroed. Every lane of the warp calls it. KK is a template parameter so
// that the steps are straight-line code (reduce_any picks it).
template <int KK>
__device__ __forceinline__ void reduce_pair(u32 (&cs)[8], u32 (&a)[8], int s) {
#pragma unroll
    for (int j = 0; j < 3 && j < KK; ++j) {
        const bool up = (s >> j) & 1;
#pragma unroll
        for (int i = 0; i < (4 >> j); ++i) {
            const u32 lo = a[i], hi = a[i + (4 >> j)];
            a[i] = (up ? hi : lo) + __shfl_xor_sync(0xffffffffu, up ? lo : hi, 1 << j);
        }
    }
    if (KK <= 3) {
#pragma unroll
        for (int i = 0; i < (8 >> KK); ++i) { cs[2 * i] += a[i] & 0xFFFFu; cs[2 * i + 1] += a[i] >> 16; }
    } else {
        // the word's two columns: keep one, send the other (a byte permute picks either
        // half by the lane's bit 3, no select)
        const u32 sel = (s & 8) ? 0x4432u : 0x4410u;   // keep: high half if b3, else low
        const u32 keep = __byte_perm(a[0], 0u, sel), send = __byte_perm(a[0], 0u, sel ^ 0x0022u);
        u32 v = keep + __shfl_xor_sync(0xffffffffu, send, 8);
        if (KK == 5) v += __shfl_xor_sync(0xffffffffu, v, 16);
        cs[0] += v;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] = 0u;
}

__device__ __forceinline__ void reduce_any(u32 (&cs)[8], u32 (&a)[8], int s, int k) {
    switch (k) {
        case 1: reduce_pair<1>(cs, a, s); break;
        case 2: reduce_pair<2>(cs, a, s); break;
        case 3: reduce_pair<3>(cs, a, s); break;
        case 4: reduce_pair<4>(cs, a, s); break;
        default: reduce_pair<5>(cs, a, s); break;
    }
}

// a float in shared memory at the generic address p (ld.shared: the generic load of a
// pointer that may be either space costs more)
__device__ __forceinline__ float lds_f32(const float* p) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(smem_addr(p)));
    return v;
}

// Leaf of one row under one tree staged compact in shared memory (thresholds `th`, columns
// `dm`, heap order, right iff x > threshold): shared loads are short, so a plain walk.
template <bool X_GLOBAL>
__device__ __forceinline__ int walk_compact(const float* th, const u16* dm, int depth,
                                            const float* xr) {
    int node = 0;
    for (int lev = 0; lev < depth; ++lev) {
        const float v = X_GLOBAL ? __ldg(xr + dm[node]) : xr[dm[node]];
        node = 2 * node + 1 + (v > th[node] ? 1 : 0);
    }
    return node - ((1 << depth) - 1);
}

// What one layer's lookup needs (chain_kernel, below).
struct Look {
    const u8* lut;           // the layer's LUT, global memory
    u8* lutbuf;              // the two staged chunks (staged only)
    const u32* codes;        // (R, Cs) LUT row offsets
    const float* scale;      // (Mp,) and (Mp,): shared memory where `trees`, else global
    const float* bias;
    float* dst;              // act (row stride Hs) or, last layer, Y + r0 M (row stride M)
    const int* rowbad;       // CHECK_ROWS row flags (R > 1)
    int Cs, C, per, Mp, M, G, P, S, k, CB, nch, nr, stride, chunk_bytes;
    bool staged, nan_rows, bad1, trees;
};

__device__ __forceinline__ float out_value(const Look& q, u32 isum, int m, bool nan) {
    const float sc = q.trees ? lds_f32(q.scale + m) : __ldg(q.scale + m);
    const float bi = q.trees ? lds_f32(q.bias + m) : __ldg(q.bias + m);
    return nan ? __int_as_float(0x7FC00000) : __fadd_rn(__fmul_rn(__uint2float_rn(isum), sc), bi);
}

// The layer's sums and outputs for this thread. SHARE (S > 1): lane s of the S = 2^k
// consecutive lanes of pair tid / S sums every S-th codebook and the lanes meet by
// reduce_pair; else thread tid owns pairs tid, tid + NT, ... over every codebook.
// Outputs y = float(isum) * scale + bias (two roundings, as the reference) go to dst;
// rows whose input held NaN or Inf get NaN (nan_rows: the last layer of CHECK_ROWS).
template <bool SHARE>
__device__ __forceinline__ void lookup(const Look& q) {
    const int tid = threadIdx.x;
    const int S = SHARE ? q.S : 1, k = SHARE ? q.k : 0;
    const int s = SHARE ? tid & (S - 1) : 0;
    int row[RPT], col[RPT], rowoff[RPT];
    bool ok[RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        const int pi = SHARE ? tid >> k : tid + NT * i;
        row[i] = q.G == q.P ? 0 : pi / q.G;           // (no division for one-row tiles)
        col[i] = (pi - row[i] * q.G) * 16;
        rowoff[i] = row[i] * q.Cs;
        ok[i] = (!SHARE || i == 0) && pi < q.P && row[i] < q.nr;
    }
    // warps with no pair skip the sums (the same for the whole warp)
    const bool wbusy = !SHARE || ((tid & ~31) >> k) < q.P;
    u32 a[RPT][8];
#pragma unroll
    for (int i = 0; i < RPT; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) a[i][j] = 0u;
    // SHARE: cs, this lane's columns (reduce_pair); else tot (the other is dead code)
    u32 cs[8], tot[RPT][16];
#pragma unroll
    for (int j = 0; j < 8; ++j) cs[j] = 0u;
#pragma unroll
    for (int i = 0; i < RPT; ++i)
#pragma unroll
        for (int j = 0; j < 16; ++j) tot[i][j] = 0u;

    int since = 0;                                  // codebooks in a's lanes
    for (int ch = 0; ch < q.nch; ++ch) {
        const int c0 = ch * q.CB, cn = min(q.CB, q.C - c0);
        if (q.staged) {
            if (ch + 1 < q.nch) {
                stage(q.lutbuf + ((ch + 1) & 1) * q.chunk_bytes,
                      q.lut + (unsigned long long)(c0 + q.CB) * q.per, min(q.CB, q.C - c0 - q.CB) * q.per);
                async_wait_prev();
            } else {
                async_wait_all();
            }
            __syncthreads();               // chunk ch has landed for every thread
            if (wbusy)
                sum_chunk<true, 2>(a, q.lutbuf + (ch & 1) * q.chunk_bytes, (u32)c0 * q.per,
                                   q.codes, c0, cn, s, S, rowoff, col, ok);
            __syncthreads();               // done reading it before it is refilled
        } else if (wbusy) {
            // direct reads go to L2: as many in flight as a thread has codebooks here (only
            // shared pairs, the small tiles, get the long rounds: code size, not speed, for
            // the rest)
            if (!SHARE || RPT > 1)
                sum_chunk<false, 2>(a, q.lut, 0u, q.codes, c0, cn, s, S, rowoff, col, ok);
            else if (cn <= 4 * S)
                sum_chunk<false, 4>(a, q.lut, 0u, q.codes, c0, cn, s, S, rowoff, col, ok);
            else
                sum_chunk<false, 16>(a, q.lut, 0u, q.codes, c0, cn, s, S, rowoff, col, ok);
        }
        // flush the 16-bit lanes before they could hold more than 256 codebooks
        since += cn;
        if (wbusy && (ch + 1 == q.nch || since + q.CB > 256)) {
            if (SHARE) {
                reduce_any(cs, a[0], s, k);
            } else {
#pragma unroll
                for (int i = 0; i < RPT; ++i) widen(tot[i], a[i]);
            }
            since = 0;
        }
    }

    if (SHARE) {
        // this lane's columns (reduce_pair): 16 / S from 2 off, or one at 2 off + b3; both
        // are col + the low 4 bits of s reversed (s < 16 for every lane that writes)
        if (!ok[0] || (k == 5 && (s & 16))) return;
        const int m0 = col[0] + (int)(__brev((u32)s) >> 28);
        float* dst = q.dst + row[0] * q.stride;
        const bool nan = q.nan_rows && (q.G == q.P ? q.bad1 : q.rowbad[row[0]]);
        if (k > 3) {
            if (m0 < q.M) dst[m0] = out_value(q, cs[0], m0, nan);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (j < (16 >> k) && m0 + j < q.M) dst[m0 + j] = out_value(q, cs[j], m0 + j, nan);
        }
    } else {
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            if (!ok[i]) continue;
            float* dst = q.dst + row[i] * q.stride;
            const bool nan = q.nan_rows && (q.G == q.P ? q.bad1 : q.rowbad[row[i]]);
#pragma unroll
            for (int j = 0; j < 16; ++j)
                if (col[i] + j < q.M) dst[col[i] + j] = out_value(q, tot[i][j], col[i] + j, nan);
        }
    }
}

// Grid: ceil(N / R) blocks of NT threads; block b runs rows [b R, b R + R) through every
// layer. Dynamic shared memory: `pre` bytes (the prefetch block, below; rounded up to 128
// bytes), 2 * chunk_bytes (LUT chunks; 0 when no layer stages), R x Hs floats
// (activations), R x Cs uint32 LUT row offsets (rounded to 16 bytes), xst floats (the tile
// of X, R x D0, copied in once where the host found room, else 0: read in place), then
// with check == CHECK_ROWS and R > 1 R int row flags. The cp.async destinations (the block,
// the chunks) keep the 128-byte alignment of their sources: a copy whose shared address
// is off by 16 bytes cost a quarter more L2 sectors and 4 us at batch 256 (ncu).
// pre0: the bytes of the block that layer 0 needs (its descriptor part and layer 0's).
// The prefetch block (runtime_cuda._prefetch_block), copied by cp.async as the kernel
// starts, while X is read: the L layer descriptors (always: every layer's set-up then
// reads shared memory), then, where pre is larger than them, per layer its trees compact
// (float thresholds, uint16 columns) and its scale and bias. Nothing that does not depend
// on the data then waits on L2 inside the chain: at batch 1 a layer costs one round of LUT
// loads instead of four (descriptor, tree, LUT, scale and bias).
// two blocks per SM up to RPT = 2 (ptxas, left to itself at RPT = 1, chose 64 registers
// and spilled)
extern "C" __global__ void __launch_bounds__(NT, RPT <= 2 ? 2 : 1)
chain_kernel(const Layer* __restrict__ layers, int L, Params* prm, int N, int D0, int R, int Hs,
             int Cs, int chunk_bytes, int check, int xst, const u8* __restrict__ pre_src, int pre,
             int pre0)
{
    extern __shared__ __align__(128) u8 smem[];
    u8* pbuf = smem;
    u8* lutbuf = pbuf + ((pre + 127) & ~127);
    float* act = (float*)(lutbuf + 2 * chunk_bytes);
    u32* codes = (u32*)(act + R * Hs);
    float* xbuf = (float*)(codes + ((R * Cs + 3) & ~3));
    int* rowbad = (int*)(xbuf + xst);

    const int tid = threadIdx.x;
    // the prefetch block lands while X is read: layer 0's part first (awaited before the
    // chain starts), the other layers' during layer 0
    stage(pbuf, pre_src, pre0);
    stage(pbuf + pre0, pre_src + pre0, pre - pre0);
    const float* __restrict__ X = prm->X;
    float* __restrict__ Y = prm->Y;
    const long long r0 = (long long)blockIdx.x * R;
    const int nr = (int)((long long)N - r0 < R ? (long long)N - r0 : R);
    // CHECK_ROWS with one row: the row's flag is the OR over the threads, taken by the
    // barrier after X is read (no flags in shared memory, no extra barrier)
    const bool rowflags = check == CHECK_ROWS && R > 1;

    if (rowflags) {
        for (int i = tid; i < R; i += NT) rowbad[i] = 0;
        __syncthreads();
    }
    u32 bad = 0;
    if (check || xst) {   // this tile of X, read once in full (into xbuf where it has room)
        const float* xs = X + r0 * D0;
        const int n = nr * D0;
        int done = 0;
        if ((((u64)xs) & 15u) == 0) {
            const int n4 = n >> 2;
            for (int i = tid; i < n4; i += NT) {
                const float4 v = __ldg((const float4*)xs + i);
                const u32 b4 = nonfinite(v.x) | nonfinite(v.y) | nonfinite(v.z) | nonfinite(v.w);
                if (b4 && rowflags) {     // rare: mark the row(s) of the bad values
                    if (nonfinite(v.x)) atomicOr(rowbad + (4 * i) / D0, 1);
                    if (nonfinite(v.y)) atomicOr(rowbad + (4 * i + 1) / D0, 1);
                    if (nonfinite(v.z)) atomicOr(rowbad + (4 * i + 2) / D0, 1);
                    if (nonfinite(v.w)) atomicOr(rowbad + (4 * i + 3) / D0, 1);
                }
                bad |= b4;
                if (xst) ((float4*)xbuf)[i] = v;
            }
            done = n4 << 2;
        }
        for (int i = done + tid; i < n; i += NT) {
            const float v = __ldg(xs + i);
            if (nonfinite(v) && rowflags) atomicOr(rowbad + i / D0, 1);
            bad |= nonfinite(v);
            if (xst) xbuf[i] = v;
        }
        if (check == CHECK_FLAG && bad) atomicOr(&prm->flag, 1);
    }
    async_wait_prev();
    if (check == CHECK_ROWS && R == 1) bad = __syncthreads_or(bad);
    else __syncthreads();
    int poff = (L * (int)sizeof(Layer) + 15) & ~15;   // this layer's part of the block
    const bool trees = pre > poff;                     // trees, scales, biases prefetched

    for (int l = 0; l < L; ++l) {
        const Layer ly = ((const Layer*)pbuf)[l];
        const int depth = ly.depth, K = 1 << depth, nodes = K - 1, C = ly.C, Mp = ly.Mp;
        const float* th_s = (const float*)(pbuf + poff);
        poff += (C * nodes * 4 + 15) & ~15;
        const u16* dm_s = (const u16*)(pbuf + poff);
        poff += (C * nodes * 2 + 15) & ~15;
        const bool last = l == L - 1;
        Look q;
        q.lut = ly.lut;
        q.lutbuf = lutbuf;
        q.codes = codes;
        q.scale = trees ? (const float*)(pbuf + poff) : ly.scale;
        q.bias = trees ? (const float*)(pbuf + poff + 4 * Mp) : ly.bias;
        poff += 8 * Mp;
        q.dst = last ? Y + r0 * ly.M : act;
        q.stride = last ? ly.M : Hs;
        q.rowbad = rowbad;
        q.nan_rows = last && check == CHECK_ROWS;
        q.trees = trees;
        q.bad1 = bad != 0;
        q.Cs = Cs; q.C = C; q.Mp = Mp; q.M = ly.M; q.nr = nr; q.chunk_bytes = chunk_bytes;
        q.per = K * Mp;                                // bytes of one codebook's LUT
        q.G = Mp >> 4;
        q.P = R * q.G;
        // S = 2^k lanes share a pair where there are fewer pairs than threads: the largest
        // power of two (at most 32, one warp) with S P <= NT
        q.k = q.P >= NT ? 0 : min(5, (31 - __clz(NT)) - (32 - __clz(q.P - 1)));
        q.S = 1 << q.k;
        q.staged = K <= R && q.per <= chunk_bytes;
        q.CB = q.staged ? min(min(C, chunk_bytes / q.per), 256) : min(C, 256);
        q.nch = q.staged ? (C + q.CB - 1) / q.CB : (C + 255) >> 8;
        if (q.staged) stage(lutbuf, ly.lut, q.CB * q.per);  // chunk 0 lands during the encode

        // encode: thread t takes the (row, tree) pairs t, t + NT, ... (trees fastest) and
        // stores the LUT row offset c K Mp + leaf Mp
        for (int e = tid; e < nr * C; e += NT) {
            const int r = nr == 1 ? 0 : e / C, c = e - r * C;    // (no division at batch 1)
            int leaf;
            if (trees) {
                const float* th = th_s + c * nodes;
                const u16* dm = dm_s + c * nodes;
                if (l > 0) leaf = walk_compact<false>(th, dm, depth, act + r * Hs);
                else if (xst) leaf = walk_compact<false>(th, dm, depth, xbuf + r * D0);
                else leaf = walk_compact<true>(th, dm, depth, X + (r0 + r) * D0);
            } else {
                const int2* __restrict__ t = ly.tree + (unsigned long long)c * nodes;
                if (l > 0) leaf = walk<false>(t, depth, act + r * Hs);
                else if (xst) leaf = walk<false>(t, depth, xbuf + r * D0);
                else leaf = walk<true>(t, depth, X + (r0 + r) * D0);
            }
            codes[r * Cs + c] = (u32)c * q.per + (u32)leaf * Mp;
        }
        __syncthreads();

        if (q.S > 1) lookup<true>(q);
        else lookup<false>(q);
        if (l == 0) async_wait_all();   // the other layers' part of the prefetch block
        __syncthreads();          // act complete, the LUT buffers free
    }
}

// ------------------------------------------------------------------------------------------
// chain_mma_kernel: the same chain, the lookup sums on the tensor cores (sm_80 and later).
//
// A layer's sums isum[n, m] = sum_c lut[c, code[n, c], m] are the product of the one-hot
// matrix of the codes, (rows, C K) with one 1 per codebook, and the LUT as a (C K, M)
// matrix. The kernel builds the one-hot operand in registers from the codes (never
// stored) and multiplies it by the LUT with mma.sync m16n8k32 u8 x u8 -> s32: exact
// integers, the same sums as the reference in any order. K = 2^depth >= 4, so each group
// of 4 consecutive k of an operand register lies in one codebook.
//
// Thread mapping: NTM threads (512 or 256: 16 or 8 warps, one or two blocks per SM) per
// block of R rows (32, 64 or 128). Encode: thread t walks the (row, tree) pairs t, t + NTM,
// ... four at a time (independent loads in flight), trees fastest; the first layer reads
// X from shared memory, where groups of rows are first copied (coalesced 16-byte loads,
// the NaN/Inf check on the way) into the activation buffer, which is free until the first
// layer's outputs. Lookup: warp w owns the task (row group w % (R/32), column group
// w / (R/32)): 32 rows (two m16 tiles) x 64 columns (eight n8 tiles) over every k;
// R/32 x ceil(Mp/64) <= NTM/32 tasks (the host picks R so). The LUT reaches shared memory in
// chunks of k32 steps by cp.async, double buffered, already in the operand order (see
// runtime_cuda._mma_lut): per step, per pair of n8 tiles, per lane, 16 bytes {b0, b1 of
// tile 2p, b0, b1 of tile 2p + 1}, so each lane's operands for two tiles are one 16-byte
// load and a warp's loads are 512 contiguous bytes (no bank conflict).
// Codes live in shared memory as 8 x code in uint16 pairs: word (c / 2) * Rs + r holds
// codebooks c & ~1 (low half) and c | 1 of row r (Rs = R + 2), so that one 32-bit read
// gives both codebooks of a K = 16 step, and 8 rows' reads fall in distinct banks. The
// operand word of 4 one-hot bytes is then one shift: 1 << (8 code - 32 w), which PTX's
// shl clamps to 0 when the code lies outside the group (the amount, as unsigned, >= 32).

#ifndef NTM
#define NTM 512
#endif

__device__ __forceinline__ void stage_n(u8* dst, const u8* __restrict__ src, int nbytes) {
    for (int i = threadIdx.x; i < (nbytes >> 4); i += NTM) copy16(dst + 16 * i, src + 16 * i);
    async_commit();
}

// 4 one-hot bytes for k = 4 w .. 4 w + 3 of one codebook, from code8 = 8 code and
// w32 = 32 w: byte (code & 3) is 1 iff code lies in that group (PTX shl gives 0 for
// amounts >= 32, which a negative difference is as unsigned).
__device__ __forceinline__ u32 onehot4(u32 code8, u32 w32) {
    u32 r;
    asm("shl.b32 %0, 1, %1;" : "=r"(r) : "r"(code8 - w32));
    return r;
}

__device__ __forceinline__ void mma_u8(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

// One k32 step of a warp's task: its two m16 row tiles (A operands a) times its ntl (even,
// <= 8) n8 column tiles, whose B operands for tiles 2p and 2p + 1 are the 16 bytes bp[32 p].
__device__ __forceinline__ void mma_tiles(int (&acc)[2][8][4], const u32 (&a)[2][4],
                                          const uint4* bp, int ntl) {
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        if (2 * p < ntl) {
            const uint4 b = bp[p * 32];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mma_u8(acc[i][2 * p], a[i], b.x, b.y);
                mma_u8(acc[i][2 * p + 1], a[i], b.z, b.w);
            }
        }
    }
}

// Codes of rows [0, nr) under the layer's trees into the code pairs (see above); x from X
// (global, row stride D0) when GLOBAL, else from shared memory (row stride `stride`).
// Each thread walks 4 (row, tree) pairs at once: 4 independent chains of loads in flight.
// Rows fastest: a warp's 32 lanes walk one tree for 32 rows, so its node loads touch one or
// two sectors (trees fastest, 32 trees, they touched 32) and, with an odd row stride, its
// input reads fall in distinct banks.
// TREES_SHARED: the compact trees (ly.treeb's layout) are at `tbuf` in shared memory;
// else the nodes are read from ly.tree (L1/L2).
template <bool GLOBAL, bool TREES_SHARED>
__device__ __forceinline__ void encode_pairs(const Layer& ly, const float* __restrict__ x,
                                             int stride, int nr, u16* codes, int Rs,
                                             const u8* tbuf) {
    constexpr int U = 4;
    const float* tthr = (const float*)tbuf;
    const u16* tdim = (const u16*)(tbuf + ((ly.C * ((1 << ly.depth) - 1) * 4 + 15) & ~15));
    const int C = ly.C, depth = ly.depth, nodes = (1 << depth) - 1, total = nr * C;
    for (int q0 = threadIdx.x; q0 < total; q0 += U * NTM) {
        int node[U], r[U], c[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int q = min(q0 + u * NTM, total - 1);
            c[u] = q / nr; r[u] = q - c[u] * nr; node[u] = 0;
        }
        for (int lev = 0; lev < depth; ++lev) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                int2 e;
                if (TREES_SHARED) {
                    const int at = c[u] * nodes + node[u];
                    e = make_int2(tdim[at], __float_as_int(tthr[at]));
                } else {
                    e = __ldg(ly.tree + (unsigned long long)c[u] * nodes + node[u]);
                }
                const float v = GLOBAL ? __ldg(x + (long long)r[u] * stride + e.x)
                                       : x[r[u] * stride + e.x];
                node[u] = 2 * node[u] + 1 + (v > __int_as_float(e.y) ? 1 : 0);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (q0 + u * NTM < total)
                codes[2 * ((c[u] >> 1) * Rs + r[u]) + (c[u] & 1)] = (u16)((node[u] - nodes) << 3);
    }
}

// Grid: ceil(N / R) blocks of NTM threads. Dynamic shared memory: 2 * chunk_bytes (LUT
// chunks), R x Hs floats (activations; Hs = 1 mod 32 so that the walks of 32 rows read
// distinct banks), ceil(Cs / 2) x Rs uint16 pairs of codes (rounded to 16 bytes), then with
// check == CHECK_ROWS R int row flags.
extern "C" __global__ void __launch_bounds__(NTM, 512 / NTM)
chain_mma_kernel(const Layer* __restrict__ layers, int L, Params* prm, int N, int D0, int R,
                 int Hs, int Cs, int chunk_bytes, int check)
{
    extern __shared__ __align__(128) u8 smem[];
    u8* lutbuf = smem;
    float* act = (float*)(smem + 2 * chunk_bytes);
    u16* codes = (u16*)(act + R * Hs);
    const int Rs = R + 2;
    int* rowbad = (int*)((u8*)codes + ((((Cs + 1) >> 1) * Rs * 4 + 15) & ~15));

    const float* __restrict__ X = prm->X;
    float* __restrict__ Y = prm->Y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const long long r0 = (long long)blockIdx.x * R;
    const int nr = (int)((long long)N - r0 < R ? (long long)N - r0 : R);

    // rows of X per group copied into the activation buffer, row stride XS = 1 mod 32
    // (distinct banks for the walks of 32 rows); 0: X too wide, read in place
    const int XS = D0 + ((33 - (D0 & 31)) & 31);
    const int XR = min(R, (R * Hs) / XS);
    if (check == CHECK_ROWS) {
        for (int i = tid; i < R; i += NTM) rowbad[i] = 0;
        __syncthreads();
    }
    if (check && XR == 0) {
        const float* xs = X + r0 * D0;
        const int n = nr * D0;
        u32 bad = 0;
        int done = 0;
        if ((((u64)xs) & 15u) == 0) {
            const int n4 = n >> 2;
            for (int i = tid; i < n4; i += NTM) {
                const float4 v = __ldg((const float4*)xs + i);
                const u32 b4 = nonfinite(v.x) | nonfinite(v.y) | nonfinite(v.z) | nonfinite(v.w);
                if (b4 && check == CHECK_ROWS) {     // rare: mark the row(s) of the bad values
                    if (nonfinite(v.x)) atomicOr(rowbad + (4 * i) / D0, 1);
                    if (nonfinite(v.y)) atomicOr(rowbad + (4 * i + 1) / D0, 1);
                    if (nonfinite(v.z)) atomicOr(rowbad + (4 * i + 2) / D0, 1);
                    if (nonfinite(v.w)) atomicOr(rowbad + (4 * i + 3) / D0, 1);
                }
                bad |= b4;
            }
            done = n4 << 2;
        }
        for (int i = done + tid; i < n; i += NTM) {
            const u32 b = nonfinite(__ldg(xs + i));
            if (b && check == CHECK_ROWS) atomicOr(rowbad + i / D0, 1);
            bad |= b;
        }
        if (bad && check == CHECK_FLAG) atomicOr(&prm->flag, 1);
    }

    const int nrg = R >> 5;
    for (int l = 0; l < L; ++l) {
        const Layer ly = layers[l];
        const int depth = ly.depth, Mp = ly.Mp, M = ly.M;
        const int nsteps = ly.kpad >> 5;
        const int step_bytes = Mp * 32;
        const int SB = min(nsteps, chunk_bytes / step_bytes);
        const int nch = (nsteps + SB - 1) / SB;
        // the trees into the second LUT buffer where they fit (it is free until the first
        // chunk after chunk 0), then chunk 0, which lands during the encode
        u8* tbuf = lutbuf + chunk_bytes;
        const bool ts = ly.tree_bytes > 0 && ly.tree_bytes <= chunk_bytes;
        if (ts) stage_n(tbuf, ly.treeb, ly.tree_bytes);
        stage_n(lutbuf, ly.lutb, SB * step_bytes);
        if (ts) {
            async_wait_prev();
            __syncthreads();                            // the trees have landed
        }
        if (l > 0) {
            if (ts) encode_pairs<false, true>(ly, act, Hs, nr, codes, Rs, tbuf);
            else encode_pairs<false, false>(ly, act, Hs, nr, codes, Rs, tbuf);
        } else if (XR == 0) {
            if (ts) encode_pairs<true, true>(ly, X + r0 * D0, D0, nr, codes, Rs, tbuf);
            else encode_pairs<true, false>(ly, X + r0 * D0, D0, nr, codes, Rs, tbuf);
        } else {
            u32 bad = 0;
            for (int x0 = 0; x0 < nr; x0 += XR) {
                const int xn = min(XR, nr - x0);
                // warp w copies rows w, w + NTM/32, ...: coalesced 16-byte reads that pass L1
                // (__ldcg: streamed once; L1 keeps the trees), scalar stores at stride XS
                for (int rr = warp; rr < xn; rr += NTM / 32) {
                    const float* xs = X + (r0 + x0 + rr) * D0;
                    float* dst = act + rr * XS;
                    const u32 before = bad;
                    bad = 0;
                    int done = 0;
                    if ((((u64)xs) & 15u) == 0) {
                        const int n4 = D0 >> 2;
                        for (int i = lane; i < n4; i += 32) {
                            const float4 v = __ldcg((const float4*)xs + i);
                            if (check)
                                bad |= nonfinite(v.x) | nonfinite(v.y) | nonfinite(v.z) | nonfinite(v.w);
                            dst[4 * i] = v.x; dst[4 * i + 1] = v.y;
                            dst[4 * i + 2] = v.z; dst[4 * i + 3] = v.w;
                        }
                        done = n4 << 2;
                    }
                    for (int i = done + lane; i < D0; i += 32) {
                        const float v = __ldcg(xs + i);
                        if (check) bad |= nonfinite(v);
                        dst[i] = v;
                    }
                    if (bad && check == CHECK_ROWS) atomicOr(rowbad + x0 + rr, 1);
                    bad |= before;
                }
                __syncthreads();                        // the rows have landed
                if (ts) encode_pairs<false, true>(ly, act, XS, xn, codes + 2 * x0, Rs, tbuf);
                else encode_pairs<false, false>(ly, act, XS, xn, codes + 2 * x0, Rs, tbuf);
                __syncthreads();                        // read before the next group lands
            }
            if (bad && check == CHECK_FLAG) atomicOr(&prm->flag, 1);
        }

        if (ts) __syncthreads();   // every walk done before chunk 1 overwrites the trees
        const int ncg = (Mp + 63) >> 6;
        const bool busy = warp < nrg * ncg;
        const int rb = (warp % nrg) * 32, cg = warp / nrg;
        const int ntl = busy ? min(8, (Mp - cg * 64) >> 3) : 0;     // n8 tiles (even)
        int acc[2][8][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

        for (int ch = 0; ch < nch; ++ch) {
            const int s0 = ch * SB, sn = min(SB, nsteps - s0);
            if (ch + 1 < nch) {
                stage_n(lutbuf + ((ch + 1) & 1) * chunk_bytes,
                        ly.lutb + (unsigned long long)(s0 + SB) * step_bytes,
                        min(SB, nsteps - s0 - SB) * step_bytes);
                async_wait_prev();
            } else {
                async_wait_all();
            }
            __syncthreads();      // chunk ch (and, at ch 0, the codes) visible to every warp
            if (busy && depth == 4) {
                // K = 16 (the default recipe): step s covers codebooks 2s and 2s + 1, whose
                // codes are the halves of one code word, at k offset 4t in both: the general
                // step's index arithmetic folds away (ncu: the step was issue-bound, ~100
                // other instructions beside its 16 mma)
                const u8* buf = lutbuf + (ch & 1) * chunk_bytes + (cg * 4 * 32 + lane) * 16;
                const u32 w = 32u * (u32)t;
                const u32* cw = (const u32*)codes + s0 * Rs + rb + g;
                for (int ss = 0; ss < sn; ++ss, cw += Rs, buf += step_bytes) {
                    u32 a[2][4];
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const u32 pa = cw[16 * i], pb = cw[16 * i + 8];
                        a[i][0] = onehot4(pa & 0xFFFFu, w);
                        a[i][1] = onehot4(pb & 0xFFFFu, w);
                        a[i][2] = onehot4(pa >> 16, w);
                        a[i][3] = onehot4(pb >> 16, w);
                    }
                    mma_tiles(acc, a, (const uint4*)buf, ntl);
                }
            } else if (busy) {
                const u8* buf = lutbuf + (ch & 1) * chunk_bytes + (cg * 4 * 32 + lane) * 16;
                for (int ss = 0; ss < sn; ++ss) {
                    const int k0 = (s0 + ss) * 32 + 4 * t, k1 = k0 + 16;
                    const int c0 = k0 >> depth, c1 = k1 >> depth;
                    const u32 w0 = (k0 & ((1 << depth) - 1)) << 3, w1 = (k1 & ((1 << depth) - 1)) << 3;
                    const u32 h0 = (c0 & 1) << 4, h1 = (c1 & 1) << 4;
                    const u32* cw0 = (const u32*)codes + (c0 >> 1) * Rs + rb + g;
                    const u32* cw1 = (const u32*)codes + (c1 >> 1) * Rs + rb + g;
                    const bool same = (c0 >> 1) == (c1 >> 1);
                    u32 a[2][4];
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const u32 pa = cw0[16 * i], pb = cw0[16 * i + 8];
                        const u32 qa = same ? pa : cw1[16 * i], qb = same ? pb : cw1[16 * i + 8];
                        a[i][0] = onehot4((pa >> h0) & 0xFFFFu, w0);
                        a[i][1] = onehot4((pb >> h0) & 0xFFFFu, w0);
                        a[i][2] = onehot4((qa >> h1) & 0xFFFFu, w1);
                        a[i][3] = onehot4((qb >> h1) & 0xFFFFu, w1);
                    }
                    mma_tiles(acc, a, (const uint4*)(buf + ss * step_bytes), ntl);
                }
            }
            __syncthreads();      // done with this buffer before it is refilled
        }

        // y = float(isum) * scale + bias, into act (the next layer's input) or Y
        const bool last = l == L - 1;
        if (busy) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                if (j < ntl) {
                    const int m = cg * 64 + 8 * j + 2 * t;
                    const float s0f = __ldg(ly.scale + m), s1f = __ldg(ly.scale + m + 1);
                    const float b0f = __ldg(ly.bias + m), b1f = __ldg(ly.bias + m + 1);
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const int row = rb + 16 * i + g + 8 * h;
                            const float y0 = __fadd_rn(__fmul_rn(__int2float_rn(acc[i][j][2 * h]), s0f), b0f);
                            const float y1 = __fadd_rn(__fmul_rn(__int2float_rn(acc[i][j][2 * h + 1]), s1f), b1f);
                            if (last) {
                                if (row < nr) {
                                    float* dst = Y + (r0 + row) * M + m;
                                    const bool nan = check == CHECK_ROWS && rowbad[row];
                                    if (m < M) dst[0] = nan ? __int_as_float(0x7FC00000) : y0;
                                    if (m + 1 < M) dst[1] = nan ? __int_as_float(0x7FC00000) : y1;
                                }
                            } else {
                                act[row * Hs + m] = y0;
                                act[row * Hs + m + 1] = y1;
                            }
                        }
                    }
                }
            }
        }
        __syncthreads();          // act complete before the next layer's encoder reads it
    }
}
