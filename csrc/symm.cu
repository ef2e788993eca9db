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

#include "sync.cuh"

// Thread `peer` of the block announces `epoch` to that peer and waits until the peer announced at
// least as much to us. `pads[p]` is rank p's pad as mapped in this process. timeout_ns == 0 waits
// forever; otherwise a peer that never arrives traps the kernel, which surfaces as a CUDA error on
// this rank instead of a silent hang.
__device__ __forceinline__ void announce_and_wait(const u64* __restrict__ pads, int rank, int world, u64 epoch,
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
        if (backoff < 256) backoff <<= 1;   // a waiter wakes within ~0.25 us of its flag
        if (timeout_ns && global_timer_ns() - start > timeout_ns) {
            printf("fp4ccl: symmetric-memory barrier timed out on rank %d waiting for rank %d (epoch %llu, "
                   "the peer announced %llu); a rank skipped or reordered a collective call\n",
                   rank, peer, epoch, ld_acquire_sys(mine + peer));
            __trap();
        }
    }
}

// One block, one thread per rank; the host counts the epochs.
extern "C" __global__ void fp4ccl_symm_barrier(const u64* __restrict__ pads, int rank, int world, u64 epoch,
                                               u64 timeout_ns) {
    announce_and_wait(pads, rank, world, epoch, timeout_ns);
}

// The same barrier with the epoch kept on the device: `counter` (in this rank's allocation) holds the
// last epoch this rank used; the kernel takes the next one and stores it back. A CUDA graph that
// contains this kernel therefore gets a fresh epoch on every replay, where a host-side epoch would be
// frozen into the graph. Every barrier on one buffer must be of this kind (the host counts none).
extern "C" __global__ void fp4ccl_symm_barrier_dev(const u64* __restrict__ pads, int rank, int world,
                                                   u64* counter, u64 timeout_ns) {
    __shared__ u64 epoch;
    if (threadIdx.x == 0) epoch = *counter + 1;
    __syncthreads();
    announce_and_wait(pads, rank, world, epoch, timeout_ns);
    __syncthreads();
    if (threadIdx.x == 0) *counter = epoch;
}

// The device barrier that also checks that every rank is in the same call. Each rank's pad word is
// (epoch << 24) | sig, where sig is 24 bits of a hash of what the ranks must agree on (the call's op and
// sizes; fp4ccl/symm_collectives.py). Epoch and signature travel in one 64-bit store, so a waiter never
// pairs one barrier's epoch with the next one's signature. A waiter that finds its peer at the same epoch
// with another signature records the disagreement in `err` (host-mapped: the host reads it at its next
// call without a sync) and poisons every peer's pad. A poisoned word is above every epoch, so no rank
// waits on this buffer again, and each records the poison in its own `err`. Of two ranks that disagree,
// the one that reads the other's word first finds it still at this epoch (the other cannot pass before
// reading ours), so at least one of them sees the mismatch. `counter[0]` is the epoch kept on the device
// (as in fp4ccl_symm_barrier_dev); `counter[1]` is set once this rank saw a disagreement or a poison,
// and from then on it announces the poison and waits for no one: the communicator is broken and its
// results are void. Every barrier on a buffer that uses this kernel must use it.
#define CHECK_SIG_BITS 24
#define CHECK_SIG_MASK ((1ull << CHECK_SIG_BITS) - 1)
#define CHECK_POISON (~0ull)

// err: kind (4 bits: 1 = the peer's signature differs, 2 = the peer poisoned us) | peer (12) | the peer's
// signature (24) | ours (24). The first report stays: later ones only repeat the news.
__device__ __forceinline__ void report_disagreement(u64* err, u64 kind, int peer, u64 theirs, u64 mine) {
    if (*reinterpret_cast<volatile u64*>(err) == 0)
        st_release_sys(err, (kind << 60) | ((u64)(peer & 0xfff) << 48) | ((theirs & CHECK_SIG_MASK) << 24) | mine);
}

extern "C" __global__ void fp4ccl_symm_barrier_checked(const u64* __restrict__ pads, int rank, int world,
                                                       u64* counter, u32 sig, u64* err, u64 timeout_ns) {
    __shared__ u64 epoch;
    __shared__ int entered_poisoned;
    // Set by whichever thread finds a poison or a mismatch: then no thread waits any longer, since a
    // peer that raised at its next call will never come (and may not have poisoned us itself).
    __shared__ volatile int stop;
    if (threadIdx.x == 0) {
        epoch = counter[0] + 1;
        entered_poisoned = counter[1] != 0;
        stop = entered_poisoned;
    }
    __syncthreads();
    const int peer = threadIdx.x;
    const u64 mine_sig = sig & CHECK_SIG_MASK;
    if (peer < world && peer != rank) {
        u64* theirs = reinterpret_cast<u64*>(pads[peer]);
        const u64* mine = reinterpret_cast<const u64*>(pads[rank]);
        __threadfence_system();
        st_release_sys(theirs + rank, entered_poisoned ? CHECK_POISON : (epoch << CHECK_SIG_BITS) | mine_sig);
        const u64 start = timeout_ns ? global_timer_ns() : 0;
        unsigned int backoff = 32;
        u64 seen = 0;
        while (!stop && ((seen = ld_acquire_sys(mine + peer)) >> CHECK_SIG_BITS) < epoch) {
            __nanosleep(backoff);
            if (backoff < 256) backoff <<= 1;
            if (timeout_ns && global_timer_ns() - start > timeout_ns) {
                printf("fp4ccl: symmetric-memory barrier timed out on rank %d waiting for rank %d (epoch %llu, "
                       "the peer announced %llu); a rank skipped or reordered a collective call\n",
                       rank, peer, epoch, seen >> CHECK_SIG_BITS);
                __trap();
            }
        }
        // (a wait ended by `stop` leaves `seen` below the epoch: neither branch)
        if (!entered_poisoned && seen == CHECK_POISON) {
            report_disagreement(err, 2, peer, 0, mine_sig);
            stop = 1;
        } else if (!entered_poisoned && (seen >> CHECK_SIG_BITS) == epoch && (seen & CHECK_SIG_MASK) != mine_sig) {
            report_disagreement(err, 1, peer, seen, mine_sig);
            for (int p = 0; p < world; ++p)
                if (p != rank) st_release_sys(reinterpret_cast<u64*>(pads[p]) + rank, CHECK_POISON);
            stop = 1;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        counter[0] = epoch;
        if (stop) counter[1] = 1;
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

// Element types of the summing kernels: storage type, widening to fp32, rounding back.
struct Bf16 {
    typedef u16 T;
    __device__ static float to_f32(u16 h) { return bf16_to_f32(h); }
    __device__ static u16 from_f32(float f) { return f32_to_bf16(f); }
};
struct F16 {
    typedef u16 T;
    __device__ static float to_f32(u16 h) { return f16_to_f32(h); }
    __device__ static u16 from_f32(float f) { return f32_to_f16(f); }
};
struct F32 {
    typedef float T;
    __device__ static float to_f32(float f) { return f; }
    __device__ static float from_f32(float f) { return f; }
};

// out[i] = scale * sum over s < nsrc of src(s)[i], accumulated in fp32 in source order and rounded
// once. 16-byte vector loads when n and every address allow it (the usual case), scalar otherwise.
// With sources in peers' memory the loads cross NVLink; several sources per thread keep enough of
// them in flight.
template <class E, class Src>
__device__ __forceinline__ void sum_sources(typename E::T* __restrict__ out, const Src& src, int nsrc, long long n,
                                            float scale) {
    typedef typename E::T T;
    constexpr int PER = 16 / sizeof(T);
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nthreads = (long long)gridDim.x * blockDim.x;
    unsigned long long addr_bits = (unsigned long long)out;
    for (int s = 0; s < nsrc; ++s) addr_bits |= (unsigned long long)src(s);
    if (n % PER == 0 && (addr_bits & 15) == 0) {
        for (long long v = tid; v < n / PER; v += nthreads) {
            float acc[PER];
#pragma unroll
            for (int k = 0; k < PER; ++k) acc[k] = 0.f;
            for (int s = 0; s < nsrc; ++s) {
                const uint4 w = reinterpret_cast<const uint4*>(src(s))[v];
                const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
                for (int k = 0; k < PER; ++k) acc[k] += E::to_f32(e[k]);
            }
            uint4 packed;
            T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
            for (int k = 0; k < PER; ++k) o[k] = E::from_f32(acc[k] * scale);
            reinterpret_cast<uint4*>(out)[v] = packed;
        }
    } else {
        for (long long i = tid; i < n; i += nthreads) {
            float acc = 0.f;
            for (int s = 0; s < nsrc; ++s) acc += E::to_f32(reinterpret_cast<const T*>(src(s))[i]);
            out[i] = E::from_f32(acc * scale);
        }
    }
}

// Sources at a fixed stride in one buffer: the partial products other ranks pushed into this rank's
// symmetric buffer (fp4ccl/overlap.py, matmul_reduce_scatter). slot_stride counts elements.
template <class E>
struct StridedSlots {
    const typename E::T* base;
    long long stride;
    __device__ const typename E::T* operator()(int s) const { return base + s * stride; }
};

#define FP4CCL_SUM_SLOTS(NAME, E)                                                                        \
    extern "C" __global__ void NAME(E::T* __restrict__ out, const E::T* __restrict__ in, long long n,     \
                                    int nslots, long long slot_stride, float scale) {                    \
        sum_sources<E>(out, StridedSlots<E>{in, slot_stride}, nslots, n, scale);                          \
    }

FP4CCL_SUM_SLOTS(fp4ccl_sum_slots_bf16, Bf16)
FP4CCL_SUM_SLOTS(fp4ccl_sum_slots_f16, F16)
FP4CCL_SUM_SLOTS(fp4ccl_sum_slots_f32, F32)

// Sources anywhere, by address: the same rows of every rank's symmetric slot (fp4ccl/symm_collectives.py,
// reduce_scatterv). The table travels by value in the launch parameters, as in vcopy.cu.
#define FP4CCL_MAX_SOURCES 8  // Python's MAX_SOURCES must match

struct SourceTable {
    u64 src[FP4CCL_MAX_SOURCES];
};

struct TableSources {
    const SourceTable* t;
    __device__ const void* operator()(int s) const { return reinterpret_cast<const void*>(t->src[s]); }
};

#define FP4CCL_SUM_SOURCES(NAME, E)                                                                      \
    extern "C" __global__ void NAME(E::T* __restrict__ out, const __grid_constant__ SourceTable t, int nsrc, \
                                    long long n, float scale) {                                           \
        sum_sources<E>(out, TableSources{&t}, nsrc, n, scale);                                            \
    }

FP4CCL_SUM_SOURCES(fp4ccl_sum_sources_bf16, Bf16)
FP4CCL_SUM_SOURCES(fp4ccl_sum_sources_f16, F16)
FP4CCL_SUM_SOURCES(fp4ccl_sum_sources_f32, F32)
