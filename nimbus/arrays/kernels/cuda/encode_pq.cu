// PQ encoder (op encode_pq, 16 centroids per subspace); source:
// cuda.source("encode_pq_kernel").
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
