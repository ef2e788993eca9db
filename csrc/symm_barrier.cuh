// The device side of the symmetric-memory barrier (signal pads, epochs): included by csrc/symm.cu,
// whose kernels run it as a barrier of their own, and by csrc/fp4.cu, whose one-launch FP4 gather
// runs it between quantizing and decoding. The pad protocol is described at the top of symm.cu.
// The including file defines u64.
#pragma once

#ifndef __CUDACC_RTC__
#include <cstdio>  // NVRTC has printf built in; nvcc (used to check this file offline) needs the header
#endif


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
