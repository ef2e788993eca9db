// Device side of fp4ccl's symmetric memory (fp4ccl/symmetric.py) and overlap (fp4ccl/overlap.py).
//
// Compiled at run time (NVRTC through CuPy), so no CUDA headers are included: half and bfloat16
// conversions go through PTX cvt instructions, which every sm_80+ part has.
//
// Signal pads: every symmetric buffer carries, in the same IPC-shared allocation, a pad of
// `world` uint64 slots. Slot p of rank r's pad holds the highest barrier epoch that rank p has
// announced to rank r. A barrier with epoch e stores e into slot `rank` of every peer's pad with
// system-scope release semantics (so everything this rank wrote before, including earlier copies
// and kernels on the stream, is visible to a peer that observes the flag), then spins on its own
// pad with system-scope acquire loads until every peer has announced at least e. Epochs only grow,
// so pads never need resetting between barriers.

#ifndef __CUDACC_RTC__
#include <cstdio>  // NVRTC has printf built in; nvcc (used to check this file offline) needs the header
#endif

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ void st_release_sys(u64* addr, u64 value) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(addr), "l"(value) : "memory");
}

__device__ __forceinline__ u64 ld_acquire_sys(const u64* addr) {
    u64 value;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(addr) : "memory");
    return value;
}

__device__ __forceinline__ u64 global_timer_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// One block, one thread per rank. `pads[p]` is rank p's pad as mapped in this process.
// timeout_ns == 0 waits forever; otherwise a peer that never arrives traps the kernel, which
// surfaces as a CUDA error on this rank instead of a silent hang.
extern "C" __global__ void fp4ccl_symm_barrier(const u64* __restrict__ pads, int rank, int world, u64 epoch,
                                               u64 timeout_ns) {
    const int peer = threadIdx.x;
    if (peer >= world || peer == rank) return;
    u64* theirs = reinterpret_cast<u64*>(pads[peer]);
    const u64* mine = reinterpret_cast<const u64*>(pads[rank]);
    // The stream's earlier work (copies into our buffer, kernels) finished before this kernel
    // started; the system fence makes those writes visible before peers can see the flag.
    __threadfence_system();
    st_release_sys(theirs + rank, epoch);
    const u64 start = timeout_ns ? global_timer_ns() : 0;
    unsigned int backoff = 32;
    while (ld_acquire_sys(mine + peer) < epoch) {
        __nanosleep(backoff);
        if (backoff < 1024) backoff <<= 1;
        if (timeout_ns && global_timer_ns() - start > timeout_ns) {
            printf("fp4ccl: symmetric-memory barrier timed out on rank %d waiting for rank %d (epoch %llu, "
                   "the peer announced %llu); a rank skipped or reordered a collective call\n",
                   rank, peer, epoch, ld_acquire_sys(mine + peer));
            __trap();
        }
    }
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// out[i] = scale * sum_s in[s * slot_stride + i], accumulated in fp32 and rounded once.
// The slots are the partial products other ranks pushed into this rank's symmetric buffer.
// 16-byte vector loads when n, slot_stride and both pointers allow it; a scalar loop otherwise.
#define FP4CCL_SUM_SLOTS_16(NAME, TO_F32, FROM_F32)                                                         \
    extern "C" __global__ void NAME(u16* __restrict__ out, const u16* __restrict__ in, long long n,          \
                                    int nslots, long long slot_stride, float scale) {                       \
        const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;                             \
        const long long nthreads = (long long)gridDim.x * blockDim.x;                                       \
        const bool vec = ((n | slot_stride) & 7) == 0 && (((unsigned long long)out | (unsigned long long)in) & 15) == 0; \
        if (vec) {                                                                                           \
            for (long long v = tid; v < n / 8; v += nthreads) {                                              \
                float acc[8];                                                                                \
                _Pragma("unroll") for (int k = 0; k < 8; ++k) acc[k] = 0.f;                                  \
                for (int s = 0; s < nslots; ++s) {                                                           \
                    const uint4 w = reinterpret_cast<const uint4*>(in + s * slot_stride)[v];                 \
                    const u32 words[4] = {w.x, w.y, w.z, w.w};                                               \
                    _Pragma("unroll") for (int k = 0; k < 4; ++k) {                                          \
                        acc[2 * k] += TO_F32((u16)(words[k] & 0xffffu));                                     \
                        acc[2 * k + 1] += TO_F32((u16)(words[k] >> 16));                                     \
                    }                                                                                        \
                }                                                                                            \
                u32 packed[4];                                                                               \
                _Pragma("unroll") for (int k = 0; k < 4; ++k) packed[k] =                                    \
                    (u32)FROM_F32(acc[2 * k] * scale) | ((u32)FROM_F32(acc[2 * k + 1] * scale) << 16);       \
                reinterpret_cast<uint4*>(out)[v] = make_uint4(packed[0], packed[1], packed[2], packed[3]);   \
            }                                                                                                \
        } else {                                                                                             \
            for (long long i = tid; i < n; i += nthreads) {                                                  \
                float acc = 0.f;                                                                             \
                for (int s = 0; s < nslots; ++s) acc += TO_F32(in[s * slot_stride + i]);                     \
                out[i] = FROM_F32(acc * scale);                                                              \
            }                                                                                                \
        }                                                                                                    \
    }

FP4CCL_SUM_SLOTS_16(fp4ccl_sum_slots_bf16, bf16_to_f32, f32_to_bf16)
FP4CCL_SUM_SLOTS_16(fp4ccl_sum_slots_f16, f16_to_f32, f32_to_f16)

extern "C" __global__ void fp4ccl_sum_slots_f32(float* __restrict__ out, const float* __restrict__ in, long long n,
                                                int nslots, long long slot_stride, float scale) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nthreads = (long long)gridDim.x * blockDim.x;
    for (long long i = tid; i < n; i += nthreads) {
        float acc = 0.f;
        for (int s = 0; s < nslots; ++s) acc += in[s * slot_stride + i];
        out[i] = acc * scale;
    }
}
