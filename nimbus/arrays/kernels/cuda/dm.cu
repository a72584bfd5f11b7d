// Differentiable MADDNESS kernels and the kernels for codes wider than a byte
// (dm_cuda.py); compiled as one module per (device, DEPTH) with "#define DEPTH d" in
// front.
#define NL (1 << DEPTH)          // leaves per tree
#define NN (NL - 1)              // internal nodes, heap order
#if DEPTH > 8
typedef unsigned short code_t;   // 512 or 1024 leaves: uint16 codes
#else
typedef unsigned char code_t;
#endif

// Thread mapping: thread -> one (row, codebook) pair, codebook fastest, so a warp walks
// the trees of one row and that row's values stay in L1.
extern "C" __global__ void dm_encode(const float* __restrict__ A, const int* __restrict__ dims,
                                     const float* __restrict__ thr, code_t* __restrict__ codes,
                                     long long N, int D, int C)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C) return;
    long long n = i / C;
    int c = (int)(i - n * C);
    const float* a = A + n * D;
    const int* dc = dims + c * NN;
    const float* tc = thr + c * NN;
    int node = 0;
#pragma unroll
    for (int l = 0; l < DEPTH; ++l) node = 2 * node + 1 + (a[dc[node]] > tc[node] ? 1 : 0);
    codes[i] = (code_t)(node - NN);
}

// Thread mapping: thread -> output column m (x), blockIdx.y strides over rows: LUT rows
// are read coalesced, a row's codes are broadcast loads; codebooks summed in order from 0.
// Codes are taken mod NL (a mask) so that no code reads past its codebook's LUT.
extern "C" __global__ void dm_lookup(const code_t* __restrict__ codes,
                                     const float* __restrict__ lut, float* __restrict__ Y,
                                     long long N, int C, int M)
{
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    for (long long n = blockIdx.y; n < N; n += gridDim.y) {
        const code_t* cd = codes + n * C;
        float acc = 0.f;
        for (int c = 0; c < C; ++c) acc += lut[((long long)c * NL + (cd[c] & (NL - 1))) * M + m];
        Y[n * M + m] = acc;
    }
}

// Thread mapping: as dm_lookup, four adjacent output columns (one float4) per thread
// (M % 4 == 0).
extern "C" __global__ void dm_lookup4(const code_t* __restrict__ codes,
                                      const float4* __restrict__ lut, float4* __restrict__ Y,
                                      long long N, int C, int M4)
{
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M4) return;
    for (long long n = blockIdx.y; n < N; n += gridDim.y) {
        const code_t* cd = codes + n * C;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int c = 0; c < C; ++c) {
            float4 v = lut[((long long)c * NL + (cd[c] & (NL - 1))) * M4 + m];
            acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
        }
        Y[n * M4 + m] = acc;
    }
}

// Thread mapping: as dm_lookup (thread -> output column, blockIdx.y strides over rows).
// 8-bit LUT sums, exact in int32 (C * 255 < 2^31 for any C the shapes allow), then
// isum * scale + bias rounded as the reference does (no fused multiply-add).
extern "C" __global__ void dm_lookup_q(const code_t* __restrict__ codes,
                                       const unsigned char* __restrict__ lut_q,
                                       const float* __restrict__ scale,
                                       const float* __restrict__ bias, float* __restrict__ Y,
                                       long long N, int C, int M)
{
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const float sm = scale[m], bm = bias[m];
    for (long long n = blockIdx.y; n < N; n += gridDim.y) {
        const code_t* cd = codes + n * C;
        int acc = 0;
        for (int c = 0; c < C; ++c) acc += lut_q[((long long)c * NL + (cd[c] & (NL - 1))) * M + m];
        Y[n * M + m] = __fadd_rn(__fmul_rn((float)acc, sm), bm);
    }
}

// Thread mapping: dm_lookup_q for M % 4 == 0, four adjacent output columns per thread
// (one 4-byte load per LUT row).
extern "C" __global__ void dm_lookup_q4(const code_t* __restrict__ codes,
                                        const uchar4* __restrict__ lut_q,
                                        const float4* __restrict__ scale,
                                        const float4* __restrict__ bias, float4* __restrict__ Y,
                                        long long N, int C, int M4)
{
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M4) return;
    const float4 sm = scale[m], bm = bias[m];
    for (long long n = blockIdx.y; n < N; n += gridDim.y) {
        const code_t* cd = codes + n * C;
        int a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (int c = 0; c < C; ++c) {
            const uchar4 v = lut_q[((long long)c * NL + (cd[c] & (NL - 1))) * M4 + m];
            a0 += v.x; a1 += v.y; a2 += v.z; a3 += v.w;
        }
        Y[n * M4 + m] = make_float4(__fadd_rn(__fmul_rn((float)a0, sm.x), bm.x),
                                    __fadd_rn(__fmul_rn((float)a1, sm.y), bm.y),
                                    __fadd_rn(__fmul_rn((float)a2, sm.z), bm.z),
                                    __fadd_rn(__fmul_rn((float)a3, sm.w), bm.w));
    }
}

// Thread mapping: thread -> one (row, codebook) pair, writes the single 1 of its one-hot
// block of K entries.
extern "C" __global__ void dm_onehot(const code_t* __restrict__ codes,
                                     float* __restrict__ onehot, long long N, int C)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C) return;
    long long n = i / C;
    int c = (int)(i - n * C);
    const int k = codes[i];
    if (k < NL) onehot[n * (NL * C) + c * NL + k] = 1.f;    // codes >= K add nothing
}

#if DEPTH <= 4
#define NB_ROWS 8
// Thread mapping: block = 32 codebook lanes (threadIdx.x; codebook blockIdx.y * 32 + lane)
// x NB_ROWS row groups (threadIdx.y); a thread takes rows_per_thread rows of its codebook.
// Trees of up to 16 leaves: a thread keeps one (row, codebook)'s nodes and leaves in
// registers (fully unrolled).
extern "C" __global__ void __launch_bounds__(32 * NB_ROWS)
dm_node_backward(const float* __restrict__ A, const int* __restrict__ dims,
                 const float* __restrict__ thr, const float* __restrict__ inv_tau,
                 const float* __restrict__ G, float* __restrict__ gA,
                 float* __restrict__ gT_part, long long N, int D, int C, float inv_temp,
                 int rows_per_thread, int want_a)
{
    __shared__ float red[NB_ROWS][NN][33];          // padded: lanes hit distinct banks
    float etab[DEPTH + 1];
#pragma unroll
    for (int q = 0; q <= DEPTH; ++q) etab[q] = __expf(-2.f * q * inv_temp);
    const int lane = threadIdx.x;
    const int c = blockIdx.y * 32 + lane;
    const bool active = c < C;
    float gt[NN];
#pragma unroll
    for (int j = 0; j < NN; ++j) gt[j] = 0.f;
    if (active) {
        const int* dc = dims + c * NN;
        const float* tc = thr + c * NN;
        const float* ic = inv_tau + c * NN;
        for (int r = 0; r < rows_per_thread; ++r) {
            long long n = ((long long)blockIdx.x * rows_per_thread + r) * NB_ROWS + threadIdx.y;
            if (n >= N) break;
            const float* a = A + n * D;
            float s[NN], diff[NN];
#pragma unroll
            for (int j = 0; j < NN; ++j) {
                diff[j] = a[dc[j]] - tc[j];
                s[j] = diff[j] > 0.f ? 1.f : -1.f;   // x > t, as the encoder decides
            }
            // softmax(b / T) over the NL leaves; b = s @ P^T = DEPTH - 2 * (nodes on the
            // leaf's path the row disagrees with), so exp((b - DEPTH) / T) is one of
            // DEPTH + 1 values
            float p[NL];
            float sum = 0.f;
#pragma unroll
            for (int k = 0; k < NL; ++k) {
                int miss = 0;
                int node = 0;
#pragma unroll
                for (int l = 0; l < DEPTH; ++l) {
                    int bit = (k >> (DEPTH - 1 - l)) & 1;
                    miss += (s[node] > 0.f) != (bit == 1);
                    node = 2 * node + 1 + bit;
                }
                p[k] = etab[miss];
                sum += p[k];
            }
            const float inv_sum = 1.f / sum;
            float gk[NL];
#if NL >= 4
            const float4* g4 = reinterpret_cast<const float4*>(G + n * (long long)(NL * C) + (long long)c * NL);
#pragma unroll
            for (int q = 0; q < NL / 4; ++q) {
                float4 v = g4[q];
                gk[4 * q] = v.x; gk[4 * q + 1] = v.y; gk[4 * q + 2] = v.z; gk[4 * q + 3] = v.w;
            }
#else
            const float* g1 = G + n * (long long)(NL * C) + (long long)c * NL;
#pragma unroll
            for (int k = 0; k < NL; ++k) gk[k] = g1[k];
#endif
            float pg = 0.f;
#pragma unroll
            for (int k = 0; k < NL; ++k) { p[k] *= inv_sum; pg += p[k] * gk[k]; }
            // node gradient = (sum of leaf grads right of it) - (left of it), bottom-up
            float sub[2 * NN + 1];
#pragma unroll
            for (int k = 0; k < NL; ++k) sub[NN + k] = p[k] * (gk[k] - pg) * inv_temp;
            float gs[NN];
#pragma unroll
            for (int j = NN - 1; j >= 0; --j) {
                gs[j] = sub[2 * j + 2] - sub[2 * j + 1];
                sub[j] = sub[2 * j + 1] + sub[2 * j + 2];
            }
#pragma unroll
            for (int j = 0; j < NN; ++j) {
                // tanh'(z) = 1 - tanh(z)^2 = 4u / (1 + u)^2 with u = exp(-2|z|)
                float u = __expf(-2.f * fabsf(diff[j] * ic[j]));
                float gx = gs[j] * (4.f * u / ((1.f + u) * (1.f + u))) * ic[j];
                if (want_a) atomicAdd(gA + n * D + dc[j], gx);
                gt[j] -= gx;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < NN; ++j) red[threadIdx.y][j][lane] = gt[j];
    __syncthreads();
    if (threadIdx.y == 0 && active) {
        for (int j = 0; j < NN; ++j) {
            float t = 0.f;
            for (int y = 0; y < NB_ROWS; ++y) t += red[y][j][lane];
            gT_part[((long long)blockIdx.x * C + c) * NN + j] = t;
        }
    }
}
#else
// warps per block: the per-warp shared arrays take about 18 * NL bytes, so deeper trees
// take fewer warps to stay under the 48 KiB of static shared memory per block
#if DEPTH <= 8
#define NW 8
#elif DEPTH == 9
#define NW 4
#else
#define NW 1
#endif
// Trees of 32 to 1024 leaves: a warp per (row, codebook), O(NL) work, the per-row arrays
// in shared memory (K floats per thread would not fit in registers). Block: NW warps on
// codebook blockIdx.y; warp w takes rows r0 + w, r0 + w + NW, ... of the block's
// rows_per_block rows. Per row: the node differences x - t (lanes stride over nodes);
// the misses (path nodes whose decision disagrees with the leaf's direction) top-down,
// level by level; the leaves' softmax weights exp(-2 * miss / T) (b - DEPTH = -2 * miss)
// and leaf gradients gb, with warp-shuffle sums; the subtree sums bottom-up, each node's
// gradient right minus left. A node is always handled by the same lane, so the per-warp
// threshold-gradient sums need no atomics; they are summed over the block's warps into
// one partial per block (deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Thread mapping: a warp per (row, codebook); NW warps per block on codebook blockIdx.y,
// warp w taking rows r0 + w, r0 + w + NW, ... of the block's rows (details above).
extern "C" __global__ void __launch_bounds__(32 * NW)
dm_node_backward_warp(const float* __restrict__ A, const int* __restrict__ dims,
                      const float* __restrict__ thr, const float* __restrict__ inv_tau,
                      const float* __restrict__ G, float* __restrict__ gA,
                      float* __restrict__ gT_part, long long N, int D, int C, float inv_temp,
                      int rows_per_block, int want_a)
{
    __shared__ int dims_s[NN];
    __shared__ float thr_s[NN], itau_s[NN];
    __shared__ float diff_s[NW][NN];
    __shared__ float sub_s[NW][2 * NN + 1];          // node sums, then leaves at NN + k
    __shared__ float gt_s[NW][NN];
    __shared__ unsigned char miss_s[NW][2 * NN + 1];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int c = blockIdx.y;
    for (int j = threadIdx.x; j < NN; j += 32 * NW) {
        dims_s[j] = dims[c * NN + j];
        thr_s[j] = thr[c * NN + j];
        itau_s[j] = inv_tau[c * NN + j];
    }
    for (int j = lane; j < NN; j += 32) gt_s[w][j] = 0.f;
    __syncthreads();
    float* diff = diff_s[w];
    float* sub = sub_s[w];
    unsigned char* miss = miss_s[w];
    const long long r0 = (long long)blockIdx.x * rows_per_block;
    const long long r1 = r0 + rows_per_block < N ? r0 + rows_per_block : N;
    for (long long n = r0 + w; n < r1; n += NW) {
        const float* a = A + n * D;
        for (int j = lane; j < NN; j += 32) diff[j] = a[dims_s[j]] - thr_s[j];
        if (lane == 0) miss[0] = 0;
        __syncwarp();
#pragma unroll
        for (int l = 0; l < DEPTH; ++l) {             // top-down: level l's children
            for (int t = lane; t < (1 << l); t += 32) {
                const int j = (1 << l) - 1 + t;
                const unsigned char m = miss[j];
                const int right = diff[j] > 0.f;      // x > t, as the encoder decides
                miss[2 * j + 1] = m + right;          // the left child disagrees if right
                miss[2 * j + 2] = m + 1 - right;
            }
            __syncwarp();
        }
        const float* g = G + n * (long long)(NL * C) + (long long)c * NL;
        float e[NL / 32], gk[NL / 32];
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < NL / 32; ++i) {
            const int k = lane + 32 * i;
            e[i] = __expf(-2.f * (int)miss[NN + k] * inv_temp);
            gk[i] = g[k];
            sum += e[i];
        }
        const float inv_sum = 1.f / warp_sum(sum);
        float pg = 0.f;
#pragma unroll
        for (int i = 0; i < NL / 32; ++i) { e[i] *= inv_sum; pg += e[i] * gk[i]; }
        pg = warp_sum(pg);
#pragma unroll
        for (int i = 0; i < NL / 32; ++i) sub[NN + lane + 32 * i] = e[i] * (gk[i] - pg) * inv_temp;
        __syncwarp();
#pragma unroll
        for (int l = DEPTH - 1; l >= 0; --l) {        // bottom-up: level l from level l + 1
            for (int t = lane; t < (1 << l); t += 32) {
                const int j = (1 << l) - 1 + t;
                const float lf = sub[2 * j + 1], rt = sub[2 * j + 2];
                sub[j] = lf + rt;
                const float ic = itau_s[j];
                // tanh'(z) = 1 - tanh(z)^2 = 4u / (1 + u)^2 with u = exp(-2|z|)
                const float u = __expf(-2.f * fabsf(diff[j] * ic));
                const float gx = (rt - lf) * (4.f * u / ((1.f + u) * (1.f + u))) * ic;
                if (want_a) atomicAdd(gA + n * D + dims_s[j], gx);
                gt_s[w][j] -= gx;
            }
            __syncwarp();
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < NN; j += 32 * NW) {
        float t = 0.f;
        for (int y = 0; y < NW; ++y) t += gt_s[y][j];
        gT_part[((long long)blockIdx.x * C + c) * NN + j] = t;
    }
}
#endif
