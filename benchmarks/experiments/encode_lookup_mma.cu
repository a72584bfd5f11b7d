// Experiment (not used by the library): the fused MADDNESS apply with the lookup as a
// one-hot x LUT product on the integer tensor cores. Compiled by mma_fused.py after the
// library's nimbus/arrays/kernels/cuda/prelude.cuh.
#define NWARP (NT / 32)
#define NCS (MT / 32)            // column slices of 32 columns (one warp each per row group)
#define WPS (NWARP / NCS)        // row groups: warps per column slice
#define RB (16 * WPS * MPW)      // rows per batch: MPW m-tiles of 16 rows per warp
#define NKS ((NCB + 1) / 2)      // k-steps of 32 = two codebooks
#define CP ((NCB + 3) & ~3)      // codes row stride in shared memory (whole words)
#if OUT_SIZE == 2
#define COLGRP(n) (n)
#else
#define COLGRP(n) (((n) >> 1) + 4 * ((n) & 1))
#endif

__device__ __forceinline__ void async_wait_ahead() {    // all but the newest NSTAGE-2
#if USE_CP_ASYNC
    asm volatile("cp.async.wait_group %0;" :: "n"(NSTAGE - 2) : "memory");
#endif
}

__device__ __forceinline__ void mma_u8(u32 (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Bytes 4t..4t+3 of the 16-byte one-hot vector of the code in byte b of w8 (which holds
// 8 * code per byte); t32 = 32 t. shl clamps shift amounts >= 32 (negative ones too, as
// unsigned) to a zero result.
__device__ __forceinline__ u32 onehot4(u32 w8, int b, int t32) {
    const u32 s = __byte_perm(w8, 0u, 0x4440 + b) - (u32)t32;
    u32 r;
    asm("shl.b32 %0, %1, %2;" : "=r"(r) : "r"(1u), "r"(s));
    return r;
}

// 4 LUT bytes of row (c, k), columns m..m+3 (0 past M), little-endian in one word.
__device__ __forceinline__ u32 lut_word(const u8* __restrict__ lut_q, int c, int k, int m,
                                        int M, int vec) {
    const u8* p = lut_q + (long long)(c * 16 + k) * M + m;
    if (vec) return m < M ? __ldg((const unsigned int*)p) : 0u;   // M % 4 == 0, aligned
    u32 w = 0u;
#pragma unroll
    for (int e = 0; e < 4; ++e)
        if (m + e < M) w |= (u32)__ldg(p + e) << (8 * e);
    return w;
}

__device__ __forceinline__ u32 pack_h2(float lo, float hi) {     // two round-to-nearest halves
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 4 adjacent outputs at p, all inside the row: the widest stores p's alignment allows.
__device__ __forceinline__ void store4(float* p, const float* v) {
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
__device__ __forceinline__ void store4(u16* p, const float* v) {
    const u32 w0 = pack_h2(v[0], v[1]), w1 = pack_h2(v[2], v[3]);
    const unsigned a = (unsigned)(unsigned long long)p;
    if ((a & 7u) == 0) {
        *(uint2*)p = make_uint2(w0, w1);
    } else if ((a & 3u) == 0) {
        *(u32*)p = w0; *(u32*)(p + 2) = w1;
    } else {
        p[0] = (u16)(w0 & 0xFFFFu); p[1] = (u16)(w0 >> 16);
        p[2] = (u16)(w1 & 0xFFFFu); p[3] = (u16)(w1 >> 16);
    }
}

// First row and row count of local batch i of a block whose rows are [rb, re).
#define BATCH_ROW(i) (rb + (long long)(i) * RB)
#define BATCH_NR(i) ((int)(re - BATCH_ROW(i) < RB ? re - BATCH_ROW(i) : RB))

// Thread mapping: blockIdx.y picks a tile of MT output columns; block x owns the
// contiguous rows [N*x/gridDim.x, N*(x+1)/gridDim.x), in batches of RB rows. Warp w owns
// the 32 columns 32 * (w % NCS) of the tile (their LUT lives in its registers) and the
// m-tiles (16 rows) w / NCS + WPS * p, p < MPW, of every batch; within an m-tile, lane
// 4g + t holds rows g, g + 8 and output columns 4G(2t)..+3, 4G(2t+1)..+3 of its slice.
// For the encode, thread t checks its share of a batch's A tile for NaN/Inf and computes
// the (row, tree) pairs t, t + NT, ... into shared-memory codes. A tiles arrive by
// cp.async NSTAGE-1 batches ahead; codes are double-buffered and batch i+1 is encoded in
// the same phase as batch i is summed (one barrier per batch).
extern "C" __global__ void __launch_bounds__(NT, 1)
encode_lookup_mma_kernel(const IN_T* __restrict__ A, const int* __restrict__ dims,
                         const float* __restrict__ thr, const u8* __restrict__ lut_q,
                         const float* __restrict__ scale, const float* __restrict__ bias,
                         OUT_T* __restrict__ Y, int* __restrict__ flag, int N, int D, int M,
                         int a_vec, int lut_vec, int y_vec)
{
    extern __shared__ __align__(16) u8 smem[];
    float* sb_s = (float*)smem;                               // scale [MT], bias [MT]
    int* dims_s = (int*)(smem + 8 * MT);
    float* thr_s = (float*)(smem + 8 * MT + NCB * 60);
    const int off_codes = (8 * MT + NCB * 120 + 15) & ~15;
    u8* codes_s = smem + off_codes;                           // [2][RB][CP]
    const int off_tiles = off_codes + ((2 * RB * CP + 15) & ~15);
    const int tile_bytes = (RB * D * IN_SIZE + 15) & ~15;
#define TILE(i) ((IN_T*)(smem + off_tiles + ((i) % NSTAGE) * tile_bytes))

    const int m0 = blockIdx.y * MT;
    const long long rb = (long long)N * blockIdx.x / gridDim.x;
    const long long re = (long long)N * (blockIdx.x + 1) / gridDim.x;
    const int nmine = (int)((re - rb + RB - 1) / RB);

#pragma unroll
    for (int s = 0; s < NSTAGE - 1; ++s) {      // group s: batch s
        if (s < nmine) stage_rows(TILE(s), A + BATCH_ROW(s) * D, BATCH_NR(s), D, a_vec);
        else async_commit();
    }
    for (int i = threadIdx.x; i < 2 * RB * CP; i += NT) codes_s[i] = 0;   // padding stays 0
    for (int j = threadIdx.x; j < MT; j += NT) {
        sb_s[j] = m0 + j < M ? scale[m0 + j] : 0.f;
        sb_s[MT + j] = m0 + j < M ? bias[m0 + j] : 0.f;
    }
    stage_trees(dims_s, thr_s, dims, thr, NCB, D);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int ws = warp % NCS, wr = warp / NCS;
    const int scol = m0 + ws * 32;                            // first column of the slice
    // B fragments: LUT rows 4t..4t+3 (+16) of column 4G(g) + j of the slice, n-tile j
    u32 breg[NKS][4][2];
    {
        const int mc = scol + 4 * COLGRP(g);
#pragma unroll
        for (int ks = 0; ks < NKS; ++ks) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int c = 2 * ks + h;
                u32 w[4];
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    w[i] = c < NCB ? lut_word(lut_q, c, 4 * t + i, mc, M, lut_vec) : 0u;
                const u32 x0 = __byte_perm(w[0], w[1], 0x5140), x1 = __byte_perm(w[0], w[1], 0x7362);
                const u32 y0 = __byte_perm(w[2], w[3], 0x5140), y1 = __byte_perm(w[2], w[3], 0x7362);
                breg[ks][0][h] = __byte_perm(x0, y0, 0x5410);
                breg[ks][1][h] = __byte_perm(x0, y0, 0x7632);
                breg[ks][2][h] = __byte_perm(x1, y1, 0x5410);
                breg[ks][3][h] = __byte_perm(x1, y1, 0x7632);
            }
        }
    }
    const int col0 = scol + 4 * COLGRP(2 * t), col1 = scol + 4 * COLGRP(2 * t + 1);
    const bool slice_live = scol < M;                         // warp-uniform

    async_wait_ahead();
    __syncthreads();                  // batch 0, trees, scale/bias and zeroed codes ready
    u32 bad = 0;
    if (nmine > 0) {
        const int nr = BATCH_NR(0);
        bad |= scan_tile(TILE(0), nr, D, a_vec);
        encode_batch(TILE(0), nr, D, codes_s, CP, RB, NCB, dims_s, thr_s);
    }
    for (int it = 0; it < nmine; ++it) {
        // the buffer refilled here held batch it-1, encoded before the previous barrier
        const int ip = it + NSTAGE - 1;
        if (ip < nmine) stage_rows(TILE(ip), A + BATCH_ROW(ip) * D, BATCH_NR(ip), D, a_vec);
        else async_commit();
        async_wait_ahead();
        __syncthreads();              // batch it+1 landed; codes of it written; it-1 summed
        if (it + 1 < nmine) {         // encode one batch ahead
            const IN_T* cur = TILE(it + 1);
            const int nr = BATCH_NR(it + 1);
            u8* cn = codes_s + ((it + 1) & 1) * (RB * CP);
            bad |= scan_tile(cur, nr, D, a_vec);
            encode_batch(cur, nr, D, cn, CP, RB, NCB, dims_s, thr_s);
        }
        if (!slice_live) continue;
        const u8* cc = codes_s + (it & 1) * (RB * CP);
        const long long row0 = BATCH_ROW(it);
        const int nr = BATCH_NR(it);
#pragma unroll 1
        for (int p = 0; p < MPW; ++p) {
            const int rbase = (wr + WPS * p) * 16;
            if (rbase >= nr) break;                           // warp-uniform
            u32 acc[4][4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[j][q] = 0x4B000000u;   // 2^23 as float bits
            const u32* cw0 = (const u32*)(cc + (rbase + g) * CP);
            const u32* cw1 = (const u32*)(cc + (rbase + g + 8) * CP);
#pragma unroll
            for (int ks = 0; ks < NKS; ++ks) {
                const u32 x0 = cw0[ks >> 1] << 3, x1 = cw1[ks >> 1] << 3;   // 8 * code
                const int b = 2 * (ks & 1);
                u32 a[4];
                a[0] = onehot4(x0, b, 32 * t);
                a[1] = onehot4(x1, b, 32 * t);
                a[2] = onehot4(x0, b + 1, 32 * t);
                a[3] = onehot4(x1, b + 1, 32 * t);
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_u8(acc[j], a, breg[ks][j][0], breg[ks][j][1]);
            }
            // 2^23 + isum read as a float is exact; y = isum * scale + bias, two roundings.
            // Column chunk k (4 columns at colk) of rows g and g + 8: acc[j][k + 2h].
            u32 hw[2][2];                 // float16: chunk 0 packed, stored with chunk 1
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const int colk = k ? col1 : col0;
                const float4 sc = *(const float4*)(sb_s + colk - m0);
                const float4 bi = *(const float4*)(sb_s + MT + colk - m0);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = rbase + g + 8 * h;
                    float v[4];
                    v[0] = __fadd_rn(__fmul_rn(__fsub_rn(__uint_as_float(acc[0][k + 2 * h]), 8388608.0f), sc.x), bi.x);
                    v[1] = __fadd_rn(__fmul_rn(__fsub_rn(__uint_as_float(acc[1][k + 2 * h]), 8388608.0f), sc.y), bi.y);
                    v[2] = __fadd_rn(__fmul_rn(__fsub_rn(__uint_as_float(acc[2][k + 2 * h]), 8388608.0f), sc.z), bi.z);
                    v[3] = __fadd_rn(__fmul_rn(__fsub_rn(__uint_as_float(acc[3][k + 2 * h]), 8388608.0f), sc.w), bi.w);
                    if (r >= nr) continue;
                    OUT_T* yrow = Y + (row0 + r) * (long long)M;
#if OUT_SIZE == 2
                    if (y_vec && col0 + 8 <= M) {            // col1 == col0 + 4
                        if (k == 0) {
                            hw[h][0] = pack_h2(v[0], v[1]); hw[h][1] = pack_h2(v[2], v[3]);
                        } else {
                            *(uint4*)(yrow + col0) = make_uint4(hw[h][0], hw[h][1],
                                                                pack_h2(v[0], v[1]), pack_h2(v[2], v[3]));
                        }
                        continue;
                    }
#else
                    if (y_vec && colk + 4 <= M) {
                        *(float4*)(yrow + colk) = make_float4(v[0], v[1], v[2], v[3]);
                        continue;
                    }
#endif
                    if (colk + 4 <= M) store4(yrow + colk, v);
                    else for (int e = 0; e < 4; ++e) if (colk + e < M) put(yrow + colk + e, v[e]);
                }
            }
        }
    }
    async_wait_all();
    if (bad) atomicOr(flag, 1);
#undef TILE
}
