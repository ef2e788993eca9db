// Segmented device-to-device copy for the padded v-collectives (fp4ccl/vcollectives.py).
//
// The padded all_gatherv compacts `size` slots of a workspace into the output and the padded
// reduce_scatterv spreads `size` parts of the input into padded slots: one independent byte range
// per rank. One launch of this kernel replaces one cudaMemcpyAsync per range, which on a
// latency-bound call cost a host API call and a GPU launch gap each.
//
// The table travels by value in the kernel parameters (no device-side table to allocate or
// upload), so a launch is capturable in a CUDA graph. __grid_constant__ lets blockIdx.y index it
// in the parameter bank directly instead of copying the whole table into local memory.
// Ranges must not overlap one another (sources may alias sources; no destination may alias
// anything else), which the callers guarantee: workspace and user buffers are distinct.

#define VCOPY_MAXSEG 128   // segments per launch; Python's VCOPY_MAXSEG must match
#define VCOPY_THREADS 256  // block size the launcher uses
#define VCOPY_UNROLL 4     // independent loads in flight per thread per iteration

typedef unsigned long long u64;

// All fields 64-bit, so the C layout equals the numpy structured dtype on the Python side.
struct VcopyTable {
    u64 src[VCOPY_MAXSEG];
    u64 dst[VCOPY_MAXSEG];
    u64 nbytes[VCOPY_MAXSEG];
};

// n words of type T, grid-strided; the unrolled part keeps several loads outstanding, which is
// what a bandwidth-bound copy needs with one block per segment slice.
template <typename T>
__device__ __forceinline__ void copy_words(const T* __restrict__ s, T* __restrict__ d, u64 n, u64 tid,
                                           u64 stride) {
    u64 i = tid;
    for (; i + (VCOPY_UNROLL - 1) * stride < n; i += VCOPY_UNROLL * stride) {
        T v[VCOPY_UNROLL];
#pragma unroll
        for (int k = 0; k < VCOPY_UNROLL; ++k) v[k] = s[i + k * stride];
#pragma unroll
        for (int k = 0; k < VCOPY_UNROLL; ++k) d[i + k * stride] = v[k];
    }
    for (; i < n; i += stride) d[i] = s[i];
}

extern "C" __global__ void __launch_bounds__(VCOPY_THREADS)
vcopy_segments(const __grid_constant__ VcopyTable t) {
    const unsigned seg = blockIdx.y;
    const u64 n = t.nbytes[seg];
    if (n == 0) return;
    const u64 sa = t.src[seg], da = t.dst[seg];
    const unsigned char* src = (const unsigned char*)sa;
    unsigned char* dst = (unsigned char*)da;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;

    // The widest word both addresses reach together after skipping the same head of bytes: 16 when
    // they agree modulo 16 (the usual case: 16-byte aligned buffers and row offsets), else 8, 4, 2
    // or single bytes.
    const u64 mis = sa ^ da;
    const u64 w = (mis & 15) == 0 ? 16 : (mis & 7) == 0 ? 8 : (mis & 3) == 0 ? 4 : (mis & 1) == 0 ? 2 : 1;
    u64 head = (w - (sa & (w - 1))) & (w - 1);
    if (head > n) head = n;
    const u64 words = (n - head) / w;
    const u64 body_end = head + words * w;

    for (u64 i = tid; i < head; i += stride) dst[i] = src[i];
    for (u64 i = body_end + tid; i < n; i += stride) dst[i] = src[i];
    const unsigned char* s = src + head;
    unsigned char* d = dst + head;
    switch (w) {
        case 16: copy_words((const uint4*)s, (uint4*)d, words, tid, stride); break;
        case 8: copy_words((const u64*)s, (u64*)d, words, tid, stride); break;
        case 4: copy_words((const unsigned int*)s, (unsigned int*)d, words, tid, stride); break;
        case 2: copy_words((const unsigned short*)s, (unsigned short*)d, words, tid, stride); break;
        default: copy_words(s, d, words, tid, stride); break;
    }
}
