// Fused tree encode + 8-bit lookup (op encode_lookup_q, depth 4); source:
// cuda.source("encode_lookup_q_kernel") = prelude + lookup_q_core.cuh + this file.
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
