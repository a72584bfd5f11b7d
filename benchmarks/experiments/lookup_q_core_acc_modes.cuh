// Experiment (not used by the library): the 8-bit lookup core as it was when it had three
// accumulation schemes (ACC_MODE 0/1/2; the library keeps scheme 1). Compiled by
// acc_modes.py in place of nimbus/arrays/kernels/cuda/lookup_q_core.cuh.
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
