// LUT gradient scatter-add (op lookup_backward, byte codes); source:
// cuda.source("lookup_backward_kernel").
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
