// 8-bit LUT lookup (op lookup_q, byte codes); source: cuda.source("lookup_q_kernel") =
// prelude + lookup_q_core.cuh + this file.
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
