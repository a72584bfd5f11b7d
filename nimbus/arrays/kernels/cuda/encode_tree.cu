// Tree encoders (op encode_tree, codes of trees of depth TREE_DEPTH <= 8); source:
// cuda.source("encode_tree_tile" | "encode_tree_direct").
// Thread mapping: a block stages `rows` consecutive rows of A (all D columns) in shared
// memory, then thread t computes the (row, codebook) pairs t, t + NT, ... of the tile
// (consecutive threads write consecutive code bytes); blocks stride over row tiles.
extern "C" __global__ void __launch_bounds__(NT)
encode_tree_tile(const IN_T* __restrict__ A, const int* __restrict__ dims,
                 const float* __restrict__ thr, u8* __restrict__ codes, int* __restrict__ flag,
                 int N, int D, int C, int rows, int a_vec)
{
    extern __shared__ __align__(16) u8 smem[];
    int* dims_s = (int*)smem;
    float* thr_s = (float*)(smem + C * TNODES * 4);
    IN_T* tile = (IN_T*)(smem + ((C * TNODES * 8 + 15) & ~15));
    stage_trees(dims_s, thr_s, dims, thr, C, D);
    u32 bad = 0;
    const long long ntiles = ((long long)N + rows - 1) / rows;
    for (long long t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const long long r0 = t * rows;
        const int nr = (int)((long long)N - r0 < rows ? (long long)N - r0 : rows);
        __syncthreads();                 // previous tile consumed; trees staged
        stage_rows(tile, A + r0 * D, nr, D, a_vec);
        async_wait_all();
        __syncthreads();
        bad |= scan_tile(tile, nr, D, a_vec);
        encode_batch(tile, nr, D, codes + r0 * C, C, nr, C, dims_s, thr_s);
    }
    if (bad) atomicOr(flag, 1);
}

// Thread mapping: thread -> one (row, codebook) pair, grid-stride; reads A, dims and
// thresholds from global memory. Fallback for rows too wide for shared memory.
extern "C" __global__ void __launch_bounds__(NT)
encode_tree_direct(const IN_T* __restrict__ A, const int* __restrict__ dims,
                   const float* __restrict__ thr, u8* __restrict__ codes, int* __restrict__ flag,
                   int N, int D, int C)
{
    u32 bad = 0;
    const long long total = (long long)N * C;
    for (long long p = (long long)blockIdx.x * NT + threadIdx.x; p < total;
         p += (long long)gridDim.x * NT) {
        const long long n = p / C;
        const int c = (int)(p - n * C);
        const IN_T* row = A + n * D;
        int node = 0;
        for (int l = 0; l < TREE_DEPTH; ++l) {
            unsigned d = (unsigned)dims[c * TNODES + node];
            d = d < (unsigned)D ? d : (unsigned)(D - 1);
            node = 2 * node + 1 + (to_f32(row[d]) > thr[c * TNODES + node] ? 1 : 0);
        }
        codes[p] = (u8)(node - TNODES);
        if (c == 0) for (int j = 0; j < D; ++j) bad |= nonfinite_bits(row[j]);
    }
    if (bad) atomicOr(flag, 1);
}
