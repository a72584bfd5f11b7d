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
// Work split of the lookup: P = R * Mp / 16 (row, 16-column group) pairs. P >= NT: each
// thread owns up to RPT pairs over all codebooks. P < NT (small tiles, narrow layers): S =
// NT / P threads share a pair, each summing every S-th codebook, and the partial sums meet
// in shared memory by atomicAdd (integer sums: the order does not change the result).
//
// Byte sums: a 16-byte LUT load holds 16 output columns; __byte_perm spreads its bytes into
// 16-bit lanes of 8 words, so one add sums two columns. A lane holds 257 * 255 at most, so
// the lanes are widened into 32-bit totals after at most 256 codebooks (every chunk).
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

// One layer, as built by runtime_cuda.py (64 bytes, same field order there).
struct Layer {
    const int2* tree;      // (C, K-1) {column of the input, float bits of the threshold}
    const u8* lut;         // (C, K, Mp) uint8, columns M..Mp-1 zero
    const float* scale;    // (Mp,)
    const float* bias;     // (Mp,)
    int C, depth, M, Mp;   // codebooks, tree depth (K = 2^depth), outputs, outputs padded to 16
    int D, pad0, pad1, pad2;   // input columns
};

// What changes per call (24 bytes, written before each launch).
struct Params {
    const float* X;        // (N, D0) float32, row-major
    float* Y;              // (N, M_last) float32, row-major
    int flag;              // set to 1 when X holds NaN or Inf (the host zeroes it)
    int pad;
};

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

// Sums of codebooks c0 + s, c0 + s + S, ... (< c0 + cn, cn <= 256) for this thread's pairs.
// SHARED: `lut` is the staged chunk (codebook c0 at its start); else the layer's LUT in
// global memory.
template <bool SHARED>
__device__ __forceinline__ void sum_chunk(u32 (&tot)[RPT][16], const u8* lut, const u16* codes,
                                          int Cs, int c0, int cn, int s, int S, int K, int Mp,
                                          const int (&row)[RPT], const int (&col)[RPT],
                                          const bool (&ok)[RPT]) {
    u32 a[RPT][8];
#pragma unroll
    for (int i = 0; i < RPT; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) a[i][j] = 0u;
    const u8* base = SHARED ? lut : lut + (unsigned long long)c0 * K * Mp;
#pragma unroll 2
    for (int cc = s; cc < cn; cc += S) {
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            if (ok[i]) {
                const u32 code = codes[row[i] * Cs + c0 + cc];
                const uint4* p = (const uint4*)(base + ((unsigned long long)cc * K + code) * Mp + col[i]);
                add_bytes(a[i], SHARED ? *p : __ldg(p));
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RPT; ++i) widen(tot[i], a[i]);
}

// Grid: ceil(N / R) blocks of NT threads; block b runs rows [b R, b R + R) through every
// layer. Dynamic shared memory: 2 * chunk_bytes (LUT chunks; 0 when no layer stages), R x Hs
// floats (activations), R x Cs uint16 codes (rounded to 16 bytes), then R x Mp uint32
// partial sums for the layers with P < NT.
extern "C" __global__ void __launch_bounds__(NT)
chain_kernel(const Layer* __restrict__ layers, int L, Params* prm, int N, int D0, int R, int Hs,
             int Cs, int chunk_bytes, int check)
{
    extern __shared__ __align__(16) u8 smem[];
    u8* lutbuf = smem;
    float* act = (float*)(smem + 2 * chunk_bytes);
    u16* codes = (u16*)(act + R * Hs);
    u32* part = (u32*)(codes + ((R * Cs + 7) & ~7));

    const float* __restrict__ X = prm->X;
    float* __restrict__ Y = prm->Y;
    const int tid = threadIdx.x;
    const long long r0 = (long long)blockIdx.x * R;
    const int nr = (int)((long long)N - r0 < R ? (long long)N - r0 : R);

    if (check) {       // this tile of X, read once in full (it also warms L1 for the encode)
        const float* xs = X + r0 * D0;
        const int n = nr * D0;
        u32 bad = 0;
        int done = 0;
        if ((((u64)xs) & 15u) == 0) {
            const int n4 = n >> 2;
            for (int i = tid; i < n4; i += NT) {
                const float4 v = __ldg((const float4*)xs + i);
                bad |= nonfinite(v.x) | nonfinite(v.y) | nonfinite(v.z) | nonfinite(v.w);
            }
            done = n4 << 2;
        }
        for (int i = done + tid; i < n; i += NT) bad |= nonfinite(__ldg(xs + i));
        if (bad) atomicOr(&prm->flag, 1);
    }

    for (int l = 0; l < L; ++l) {
        const Layer ly = layers[l];
        const int K = 1 << ly.depth, nodes = K - 1, C = ly.C, Mp = ly.Mp, M = ly.M;
        const int G = Mp >> 4, P = R * G;
        const int S = P >= NT ? 1 : NT / P;
        const int per = K * Mp;                       // bytes of one codebook's LUT
        const bool staged = K <= R && per <= chunk_bytes;
        const int CB = staged ? min(min(C, chunk_bytes / per), 256) : min(C, 256);
        const int nch = (C + CB - 1) / CB;
        if (staged) stage(lutbuf, ly.lut, CB * per);  // chunk 0 lands during the encode
        if (S > 1)
            for (int i = tid; i < R * Mp; i += NT) part[i] = 0u;

        // encode: thread t takes the (row, tree) pairs t, t + NT, ... (trees fastest)
        for (int q = tid; q < nr * C; q += NT) {
            const int r = q / C, c = q - r * C;
            const int2* __restrict__ t = ly.tree + (unsigned long long)c * nodes;
            int node = 0;
            if (l == 0) {
                const float* xr = X + (r0 + r) * D0;
                for (int lev = 0; lev < ly.depth; ++lev) {
                    const int2 e = __ldg(t + node);
                    node = 2 * node + 1 + (__ldg(xr + e.x) > __int_as_float(e.y) ? 1 : 0);
                }
            } else {
                const float* xr = act + r * Hs;
                for (int lev = 0; lev < ly.depth; ++lev) {
                    const int2 e = __ldg(t + node);
                    node = 2 * node + 1 + (xr[e.x] > __int_as_float(e.y) ? 1 : 0);
                }
            }
            codes[r * Cs + c] = (u16)(node - nodes);
        }
        __syncthreads();

        // this thread's pairs (row, first column of its 16) and its codebook slice
        int row[RPT], col[RPT];
        bool ok[RPT];
        const int s = S > 1 ? tid / P : 0;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const int pi = S > 1 ? tid % P : tid + NT * i;
            row[i] = pi / G;
            col[i] = (pi - row[i] * G) * 16;
            ok[i] = (S > 1 ? (i == 0 && s < S) : pi < P) && row[i] < nr;
        }
        u32 tot[RPT][16];
#pragma unroll
        for (int i = 0; i < RPT; ++i)
#pragma unroll
            for (int j = 0; j < 16; ++j) tot[i][j] = 0u;

        for (int ch = 0; ch < nch; ++ch) {
            const int c0 = ch * CB, cn = min(CB, C - c0);
            if (staged) {
                if (ch + 1 < nch) {
                    stage(lutbuf + ((ch + 1) & 1) * chunk_bytes, ly.lut + (unsigned long long)(c0 + CB) * per,
                          min(CB, C - c0 - CB) * per);
                    async_wait_prev();
                } else {
                    async_wait_all();
                }
                __syncthreads();               // chunk ch has landed for every thread
                sum_chunk<true>(tot, lutbuf + (ch & 1) * chunk_bytes, codes, Cs, c0, cn, s, S,
                                K, Mp, row, col, ok);
                __syncthreads();               // done reading it before it is refilled
            } else {
                sum_chunk<false>(tot, ly.lut, codes, Cs, c0, cn, s, S, K, Mp, row, col, ok);
            }
        }

        // y = float(isum) * scale + bias, into act (the next layer's input) or Y
        const bool last = l == L - 1;
        if (S == 1) {
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                if (!ok[i]) continue;
                float* dst = last ? Y + (r0 + row[i]) * M : act + row[i] * Hs;
#pragma unroll
                for (int j = 0; j < 16; ++j) {
                    const int m = col[i] + j;
                    if (m < M)
                        dst[m] = __fadd_rn(__fmul_rn(__uint2float_rn(tot[i][j]), __ldg(ly.scale + m)),
                                           __ldg(ly.bias + m));
                }
            }
        } else {
            if (ok[0]) {
#pragma unroll
                for (int j = 0; j < 16; ++j)
                    if (tot[0][j]) atomicAdd(part + row[0] * Mp + col[0] + j, tot[0][j]);
            }
            __syncthreads();
            for (int e = tid; e < nr * Mp; e += NT) {
                const int r = e / Mp, m = e - r * Mp;
                if (m < M) {
                    const float y = __fadd_rn(__fmul_rn(__uint2float_rn(part[e]), __ldg(ly.scale + m)),
                                              __ldg(ly.bias + m));
                    if (last) Y[(r0 + r) * M + m] = y; else act[r * Hs + m] = y;
                }
            }
        }
        __syncthreads();          // act complete, part and the LUT buffers free
    }
}
