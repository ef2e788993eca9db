// Memory-ordering primitives shared by the kernels that signal across ranks through symmetric memory
// (csrc/symm.cu's barrier, csrc/fp4.cu's one-launch gather). Included by NVRTC from the header list
// fp4ccl/jit.py passes, and by nvcc from csrc/ (tests/test_csrc_compiles.py).
#pragma once

// A system-scope release store: every write this thread made, or saw through a barrier or a fence,
// before the store is visible to whoever observes the value with an acquire load, on any GPU.
__device__ __forceinline__ void st_release_sys(unsigned long long* addr, unsigned long long value) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(addr), "l"(value) : "memory");
}

__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* addr) {
    unsigned long long value;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(addr) : "memory");
    return value;
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
