// Prelude of every kernel source of cuda.py (prepended by cuda.source()): types, half
// conversions, NaN/Inf bits, async copies, row and tree staging, the tree encode.
#ifndef TREE_DEPTH
#define TREE_DEPTH 4             // tree depth d: 2^d leaves, 2^d - 1 heap-ordered nodes
#endif
#define TNODES ((1 << TREE_DEPTH) - 1)
#ifndef NK
#define NK 16                    // buckets (LUT rows) per codebook: K, 1..256
#endif
// Bucket of the code byte in bits sh.. of w: codes >= NK never index past a LUT (taken
// mod NK: a mask when NK is a power of two, as CuPy's indexing wraps).
#if (NK & (NK - 1)) == 0
#define BUCKET(w, sh) (((w) >> (sh)) & (u32)(NK - 1))
#else
#define BUCKET(w, sh) ((((w) >> (sh)) & 255u) % (u32)NK)
#endif
// Warp groups: GROUPS independent teams of GT threads in one block (the fused kernel's
// "virtual blocks", which share the block's LUT); GTID is a thread's index in its team.
#ifndef GROUPS
#define GROUPS 1
#endif
#define GT (NT / GROUPS)
#if GROUPS == 1
#define GTID threadIdx.x
#else
#define GTID (threadIdx.x % GT)
#endif
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float h2f(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 f2h(float f) {          // round to nearest even, as astype
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(u16 x) { return h2f(x); }
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(u16* p, float v) { *p = f2h(v); }

// Non-finite detection on raw words: an all-ones exponent plus one carries into the sign
// bit, so `acc |= (w & EXP) + ONE` keeps bit 31 (bit 15 too for half pairs) iff some value
// was NaN or Inf. Three integer ops per word, no float compare.
__device__ __forceinline__ u32 nonfinite_bits(float x) {
    return ((__float_as_uint(x) & 0x7F800000u) + 0x00800000u) & 0x80000000u;
}
__device__ __forceinline__ u32 nonfinite_bits(u16 x) {
    return ((((u32)x) & 0x7C00u) + 0x0400u) & 0x8000u;
}
__device__ __forceinline__ u32 nonfinite_word(u32 w) {
#if IN_SIZE == 4
    return ((w & 0x7F800000u) + 0x00800000u) & 0x80000000u;
#else
    return ((w & 0x7C007C00u) + 0x04000400u) & 0x80008000u;
#endif
}

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16-byte global -> shared copies; asynchronous (cp.async, sm_80+) when USE_CP_ASYNC so a
// block can have a whole tile in flight without staging it through registers.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
#if USE_CP_ASYNC
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_u32(dst)), "l"(src) : "memory");
#else
    *(uint4*)dst = *(const uint4*)src;
#endif
}
// 4- and 8-byte asynchronous copies; `valid` false copies nothing and zero-fills dst.
__device__ __forceinline__ void copy4(void* dst, const void* src, bool valid) {
#if USE_CP_ASYNC
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0) : "memory");
#else
    *(u32*)dst = valid ? *(const u32*)src : 0u;
#endif
}
__device__ __forceinline__ void copy8(void* dst, const void* src, bool valid) {
#if USE_CP_ASYNC
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 8 : 0) : "memory");
#else
    *(uint2*)dst = valid ? *(const uint2*)src : make_uint2(0u, 0u);
#endif
}
__device__ __forceinline__ void async_commit() {
#if USE_CP_ASYNC
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void async_wait_all() {
#if USE_CP_ASYNC
    asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}
__device__ __forceinline__ void async_wait_prev() {     // all groups but the newest
#if USE_CP_ASYNC
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}
#ifdef NSTAGE
__device__ __forceinline__ void async_wait_pipeline() { // all but the newest NSTAGE-1
#if USE_CP_ASYNC
    asm volatile("cp.async.wait_group %0;" :: "n"(NSTAGE - 1) : "memory");
#endif
}
#endif

// Stage `nbytes` contiguous bytes at dst: 16-byte asynchronous copies when `vec` (both
// addresses 16-byte aligned), the tail (and everything when not `vec`) byte by byte.
__device__ __forceinline__ void stage_bytes(u8* dst, const u8* __restrict__ src, int nbytes,
                                            int vec) {
    int done = 0;
    if (vec) {
        const int n16 = nbytes >> 4;
        for (int i = threadIdx.x; i < n16; i += NT) copy16((uint4*)dst + i, (const uint4*)src + i);
        done = n16 << 4;
    }
    for (int i = done + threadIdx.x; i < nbytes; i += NT) dst[i] = src[i];
}

// Stage `nrows` consecutive rows of A (row-major, D columns) at `dst`. `vec`: the source
// is 16-byte aligned and a row is a whole number of 16-byte units.
__device__ __forceinline__ void stage_rows(IN_T* dst, const IN_T* __restrict__ src, int nrows,
                                           int D, int vec) {
    if (vec) {
        const int n16 = (nrows * D * IN_SIZE) >> 4;
        for (int i = GTID; i < n16; i += GT) copy16((uint4*)dst + i, (const uint4*)src + i);
    } else {
        const int n = nrows * D;
        for (int i = GTID; i < n; i += GT) dst[i] = src[i];
    }
    async_commit();
}

// NaN/Inf bits of a staged tile (this thread's share), read back from shared memory.
__device__ __forceinline__ u32 scan_tile(const IN_T* tile, int nrows, int D, int vec) {
    u32 bad = 0;
    if (vec) {
        const int n16 = (nrows * D * IN_SIZE) >> 4;
        for (int i = GTID; i < n16; i += GT) {
            const uint4 w = ((const uint4*)tile)[i];
            bad |= nonfinite_word(w.x) | nonfinite_word(w.y) | nonfinite_word(w.z)
                 | nonfinite_word(w.w);
        }
    } else {
        const int n = nrows * D;
        for (int i = GTID; i < n; i += GT) bad |= nonfinite_bits(tile[i]);
    }
    return bad;
}

// Leaf reached by one row in one tree of depth TREE_DEPTH: heap-ordered nodes, right iff
// x > t (strictly: x == t goes left, as in learning). dims are already clamped to [0, D).
__device__ __forceinline__ u8 tree_leaf(const IN_T* row, const int* dims, const float* thr) {
    int node = 0;
#pragma unroll
    for (int l = 0; l < TREE_DEPTH; ++l)
        node = 2 * node + 1 + (to_f32(row[dims[node]]) > thr[node] ? 1 : 0);
    return (u8)(node - TNODES);
}

// Codes of a staged batch: thread t encodes the (row, tree) pairs t, t + NT, ... of the
// ``nrb`` x ``ncb`` batch into ``codes`` (row stride ``cp``); rows >= ``nr`` get code 0.
// Inlined with compile-time nrb/ncb, so p / ncb stays a constant division.
__device__ __forceinline__ void encode_batch(const IN_T* tile, int nr, int D, u8* codes, int cp,
                                             int nrb, int ncb, const int* dims_s,
                                             const float* thr_s) {
    for (int p = GTID; p < nrb * ncb; p += GT) {
        const int r = p / ncb, c = p - r * ncb;
        codes[r * cp + c] = r < nr ? tree_leaf(tile + r * D, dims_s + c * TNODES,
                                                       thr_s + c * TNODES)
                                   : (u8)0;
    }
}

__device__ __forceinline__ void stage_trees(int* dims_s, float* thr_s, const int* __restrict__ dims,
                                            const float* __restrict__ thr, int ntrees, int D) {
    for (int i = threadIdx.x; i < ntrees * TNODES; i += NT) {
        const unsigned d = (unsigned)dims[i];          // negative -> huge -> clamped
        dims_s[i] = (int)(d < (unsigned)D ? d : (unsigned)(D - 1));
        thr_s[i] = thr[i];
    }
}
