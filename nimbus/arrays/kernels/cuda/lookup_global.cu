// Lookups reading the LUT through L1/L2, for LUTs too large for shared memory; source:
// cuda.source("lookup_global_kernel").
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
