// Float LUT lookup (op lookup, byte codes, float32 or float16 LUT); source:
// cuda.source("lookup_kernel").
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
