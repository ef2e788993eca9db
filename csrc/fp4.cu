// NVFP4 / MXFP4 codec kernels for fp4ccl.
//
// Compiled at run time by fp4ccl/jit.py through NVRTC, so this file includes no system headers (NVRTC
// ships no C++ standard library and the cuda_fp16/bf16 headers are not needed: conversions are one PTX
// instruction each); its one header, sync.cuh, jit.py hands to NVRTC. It also compiles with nvcc
// (tests/test_csrc_compiles.py) as a syntax gate.
//
// The arithmetic follows docs/FP4.md ("Exact arithmetic", "Scale layouts") operation for operation,
// in fp32 with IEEE rounding (no fast-math, no FTZ, explicit __fmul_rn so nothing is contracted),
// because the numpy reference in fp4ccl/formats/reference.py is the oracle and the two must agree bit
// for bit. docs/FP4.md explains each bit trick below and the packed wire layout.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#ifndef __CUDACC_RTC__
#include <cstdio>  // NVRTC has printf built in; nvcc (the offline syntax gate) needs the header
#endif
#include "sync.cuh"

#define FP4_MAXSEG 8
#define FP4_FLT_MAX 3.402823466e+38f
#define FP4_THREADS 256

// Kernel parameters describing up to FP4_MAXSEG independent row ranges; blockIdx.y picks one.
// Passed by value (a one-element numpy structured array on the Python side), so a launch needs no
// device-side table and stays capturable in a CUDA graph. All fields are 64-bit so the C layout and
// the numpy layout agree without padding rules.
//   quantize:   src = first FP4 block of x, data/scale/gs = destination addresses
//   dequantize: src = first FP4 block of out, data/scale/gs = source addresses
struct SegTable {
    u64 units[FP4_MAXSEG];  // FP4 blocks in the segment
    u64 src[FP4_MAXSEG];
    u64 data[FP4_MAXSEG];
    u64 scale[FP4_MAXSEG];
    u64 gs[FP4_MAXSEG];     // address of the fp32 global decode scale, 0 when absent (MXFP4)
};

struct Seg { u64 units, src, data, scale, gs; };

__device__ __forceinline__ Seg pick_segment(const SegTable& t) {
    // Constant indices after unrolling keep the table in the parameter bank (no local-memory copy).
    Seg s = {0, 0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < FP4_MAXSEG; ++i) {
        if (i == (int)blockIdx.y) {
            s.units = t.units[i]; s.src = t.src[i]; s.data = t.data[i]; s.scale = t.scale[i]; s.gs = t.gs[i];
        }
    }
    return s;
}

// ---------------------------------------------------------------- conversions
__device__ __forceinline__ void f16x2_to_f32(u32 w, float& lo, float& hi) {
    asm("{.reg .f16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi) : "r"(w));
}

// Unpacks one 16-byte vector of the input into fp32 (exact for every input type).
template <typename In> struct Loader;
template <> struct Loader<u16> {  // bfloat16 bits
    static constexpr int PER_VEC = 8;
    static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
        }
    }
    static __device__ __forceinline__ u32 signs8(const uint4* v, int j);
};
struct Half {};  // tag: float16 bits
template <> struct Loader<Half> {
    static constexpr int PER_VEC = 8;
    static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
        f16x2_to_f32(v.x, f[0], f[1]); f16x2_to_f32(v.y, f[2], f[3]);
        f16x2_to_f32(v.z, f[4], f[5]); f16x2_to_f32(v.w, f[6], f[7]);
    }
    static __device__ __forceinline__ u32 signs8(const uint4* v, int j);
};
template <> struct Loader<float> {
    static constexpr int PER_VEC = 4;
    static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
        f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
        f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
    }
    static __device__ __forceinline__ u32 signs8(const uint4* v, int j);
};

// Two fp32 values rounded (nearest-even) and packed into one 32-bit word, element `lo` in the low half.
template <typename Out> struct Storer;
template <> struct Storer<u16> {
    static constexpr int PER_VEC = 8;
    static __device__ __forceinline__ u32 pack2(float lo, float hi) {
        u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
    }
};
template <> struct Storer<Half> {
    static constexpr int PER_VEC = 8;
    static __device__ __forceinline__ u32 pack2(float lo, float hi) {
        u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
    }
};
template <> struct Storer<float> { static constexpr int PER_VEC = 4; };

// max that propagates NaN (fmaxf would drop it and hide a non-finite block)
__device__ __forceinline__ float max_nan(float a, float b) {
    float r; asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
}

// Streaming (evict-first) stores: a kernel never reads its outputs back.
__device__ __forceinline__ void st_cs(void* p, u32 v) {
    asm volatile("st.global.cs.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_cs(void* p, u16 v) {
    asm volatile("st.global.cs.u16 [%0], %1;" :: "l"(p), "h"(v) : "memory");
}

// fp32 in [0, 448] -> E4M3 code, round to nearest even. Normal range: round the 23-bit mantissa to 3
// bits on the integer bits (a carry into the exponent is the right answer), then rebias 127 -> 7.
// Below 2^-6 E4M3 is subnormal with step 2^-9: s * 512 is exact and adding 2^23 rounds it to an integer.
__device__ __forceinline__ u32 e4m3_rne(float s) {
    if (s < 0.015625f) return __float_as_uint(fmaf(s, 512.0f, 8388608.0f)) - 0x4B000000u;
    const u32 u = __float_as_uint(s);
    return ((u + 0x7FFFFu + ((u >> 20) & 1u)) >> 20) - (120u << 3);
}

// Any E4M3 byte -> fp32 (0x7F / 0xFF are NaN), the decode of the stored block scale.
__device__ __forceinline__ float e4m3_to_f32(u32 code) {
    const u32 mag = code & 0x7Fu;
    float f;
    if (mag == 0x7Fu) f = __uint_as_float(0x7FC00000u);
    else if (mag >= 8u) f = __uint_as_float((mag << 20) + (120u << 23));
    else f = (float)mag * 0.001953125f;  // subnormal: mag * 2^-9, exact
    return (code & 0x80u) ? -f : f;
}

// E8M0 byte -> fp32: 2^(b-127); b = 0 is the fp32 subnormal 2^-127; 0xFF is NaN.
__device__ __forceinline__ float e8m0_to_f32(u32 b) {
    if (b == 0xFFu) return __uint_as_float(0x7FC00000u);
    if (b == 0u) return __uint_as_float(0x00400000u);
    return __uint_as_float(b << 23);
}

// |y| clamped to [0, 6] -> E2M1 magnitude code (0..7), round to nearest even.
// E2M1 is a float with 1 mantissa bit and exponent bias 1. For v >= 1 round the fp32 mantissa to one
// bit on the integer bits; subtracting 0x3F000000 first maps 1.0 to code 2 (see docs/FP4.md).
// For v < 1 the E2M1 grid is uniform with step 0.5: 2v + 2^23 rounds 2v to an integer (0, 1 or 2).
__device__ __forceinline__ u32 e2m1_rne(float v) {
    const u32 u = __float_as_uint(v);
    const u32 cn = (u - 0x3F000000u + 0x1FFFFFu + ((u >> 22) & 1u)) >> 22;
    const u32 cs = __float_as_uint(fmaf(v, 2.0f, 8388608.0f)) - 0x4B000000u;
    return v < 1.0f ? cs : cn;
}

// Round-to-nearest E2M1 for 8 elements at once, mostly on the FMA pipe. On sm_90 the integer/compare
// pipe (ALU) retires half as many instructions per clock as the FMA pipe, and the integer trick above
// costs ~7 ALU instructions per element, which made bf16 quantize ALU-bound. Here, for v = min(|y|, 6):
// the E2M1 grid has step 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6], so with M = 2^23 (ulp 1) the code is
// round(2v) on [0, 2), round(v) + 2 on [2, 4) and round(v/2) + 4 on [4, 6]; each candidate is one
// fp32 operation whose single rounding is RNE to an integer, and the right one is always the smallest
// (the lines 2v, v + 2, v/2 + 4 cross at 2 and 4, and rounding is monotonic), so two mins pick it.
// The candidates' bits are 0x4B000000 + code; summing bits << 4i with integer multiply-adds (FMA pipe)
// and subtracting the constant part, sum(0x4B000000 << 4i) mod 2^32 = 0xFB000000, packs the 8 codes.
// docs/FP4.md and tests/test_fp4_reference.py check the identity against ml_dtypes.
// CLAMP = false skips the min with 6, for callers that know |y| < 7: on [6, 7) the third candidate
// already gives code 7, and the per-element min was ~7% of an NVFP4 quantize's instructions.
#ifndef FP4_NV_CLAMP_SHORTCUT
#define FP4_NV_CLAMP_SHORTCUT 1
#endif
template <bool CLAMP = true>
__device__ __forceinline__ u32 e2m1_rn_bits(float y) {
    const float v = CLAMP ? fminf(fabsf(y), 6.0f) : fabsf(y);
    const float a = __fmaf_rn(v, 2.0f, 8388608.0f);
    const float b = __fadd_rn(v, 8388610.0f);
    const float c = __fmaf_rn(v, 0.5f, 8388612.0f);
    return __float_as_uint(fminf(fminf(a, b), c));
}
__device__ __forceinline__ u32 mad_u32(u32 a, u32 b, u32 c) {
    u32 r; asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel)); return r;
}
// Magnitude nibbles of 8 elements (element i in bits 4i..4i+2), sign bits still zero.
// (For 4 elements the same constant holds: the terms i >= 2 vanish mod 2^32.)
template <int N, bool CLAMP = true>
__device__ __forceinline__ u32 e2m1_rn_pack(const float* y) {
    u32 acc = e2m1_rn_bits<CLAMP>(y[0]);
#pragma unroll
    for (int i = 1; i < N; ++i) acc = mad_u32(e2m1_rn_bits<CLAMP>(y[i]), 1u << (4 * i), acc);
    return acc - 0xFB000000u;
}
// The E2M1 sign bits (bit 4i+3 for element i) of 8 elements, from 4 bytes s = [s0 s1 s2 s3] and
// t = [s4 .. s7] that are 0xFF where the element is negative (prmt's sign-replicate selectors).
__device__ __forceinline__ u32 sign_nibbles(u32 s, u32 t) {
    const u32 even = prmt(s, t, 0x6420u), odd = prmt(s, t, 0x7531u);   // [s0 s2 s4 s6], [s1 s3 s5 s7]
    return (even & 0x08080808u) | (odd & 0x80808080u);
}
// Sign bytes of 4 consecutive inputs held in one 16-byte vector (bf16/fp16: 8 per vector, so two
// calls cover it) or in four fp32 words.
__device__ __forceinline__ u32 sign_bytes_16bit(u32 w0, u32 w1) { return prmt(w0, w1, 0xFDB9u); }
__device__ __forceinline__ u32 sign_bytes_f32(u32 w0, u32 w1, u32 w2, u32 w3) {
    return prmt(prmt(w0, w1, 0x00FBu), prmt(w2, w3, 0x00FBu), 0x5410u);
}

// Sign bits of elements 8j..8j+7 of a block held in 16-byte vectors v (see sign_nibbles).
__device__ __forceinline__ u32 Loader<u16>::signs8(const uint4* v, int j) {
    return sign_nibbles(sign_bytes_16bit(v[j].x, v[j].y), sign_bytes_16bit(v[j].z, v[j].w));
}
__device__ __forceinline__ u32 Loader<Half>::signs8(const uint4* v, int j) {
    return sign_nibbles(sign_bytes_16bit(v[j].x, v[j].y), sign_bytes_16bit(v[j].z, v[j].w));
}
__device__ __forceinline__ u32 Loader<float>::signs8(const uint4* v, int j) {
    const uint4 a = v[2 * j], b = v[2 * j + 1];
    return sign_nibbles(sign_bytes_f32(a.x, a.y, a.z, a.w), sign_bytes_f32(b.x, b.y, b.z, b.w));
}

// Counter-based random bits: a function of (seed, element index) alone, so a run replays exactly
// and does not depend on the launch shape. murmur3's finalizer as the mixer.
__device__ __forceinline__ u32 fmix32(u32 h) {
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16; return h;
}
__device__ __forceinline__ u32 sr_bits(u32 k1, u32 k2, u64 idx) {
    const u32 h = fmix32(((u32)idx * 0x9E3779B9u) ^ k1);
    return fmix32(h ^ (u32)(idx >> 32) ^ k2);
}

// |y| clamped to [0, 6] -> E2M1 code rounded up with probability (v - lo) / (hi - lo).
__device__ __forceinline__ u32 e2m1_sr(float v, u32 rnd) {
    u32 lo_code; float lo, inv_step;
    if (v < 1.0f) {
        lo_code = (v < 0.5f) ? 0u : 1u; lo = lo_code ? 0.5f : 0.0f; inv_step = 2.0f;
    } else {
        lo_code = (__float_as_uint(v) - 0x3F000000u) >> 22;   // truncation on the E2M1 grid
        lo = __uint_as_float((lo_code << 22) + 0x3F000000u);
        inv_step = lo_code < 4u ? 2.0f : (lo_code < 6u ? 1.0f : (lo_code < 7u ? 0.5f : 0.0f));
    }
    const float frac = __fmul_rn(v - lo, inv_step);          // exact: Sterbenz, power-of-two scale
    const float u = (float)(rnd >> 8) * 5.9604644775390625e-08f;  // [0, 1) in steps of 2^-24
    return lo_code + (u < frac ? 1u : 0u);
}

// Byte offset of block scale (r, c) in the swizzled layout: 128x4 tiles of 512 bytes, tiles ordered by
// row block then column block; inside a tile (r % 32) * 16 + ((r % 128) / 32) * 4 + c % 4.
__device__ __forceinline__ u64 swizzle_offset(u32 r, u32 c, u32 ncols_pad) {
    const u64 tile = (u64)(r >> 7) * (ncols_pad >> 2) + (c >> 2);
    return tile * 512u + (r & 31u) * 16u + ((r >> 5) & 3u) * 4u + (c & 3u);
}

// ---------------------------------------------------------------- amax
// max |x| over the finite elements; result atomically max-ed into *out (which the caller zeroed).
// Non-negative floats order like their bit patterns as signed ints, hence atomicMax on int.
template <typename In>
__device__ __forceinline__ void amax_vec(const uint4& v, float& m) {
    float f[Loader<In>::PER_VEC];
    Loader<In>::unpack(v, f);
#pragma unroll
    for (int j = 0; j < Loader<In>::PER_VEC; ++j) {
        const float a = fabsf(f[j]);
        m = (a <= FP4_FLT_MAX) ? fmaxf(m, a) : m;   // NaN and Inf fail the compare
    }
}

// The pass walks x from its end to its start. Quantize, which follows it on the stream, walks from the
// start, so its first reads find what the amax pass read last still in L2 (50 MB on an H100/H200): for
// inputs of a few L2 sizes the second read of x is partly free. See docs/FP4.md for the measurement.
#ifndef FP4_AMAX_REVERSE
#define FP4_AMAX_REVERSE 1
#endif
#ifndef FP4_AMAX_STEP
#define FP4_AMAX_STEP 8
#endif
// This thread's max |x| over the finite elements of x[first], x[first + stride], ... (0 if none).
template <typename In>
__device__ __forceinline__ float amax_thread(const uint4* __restrict__ x, u64 nvec, u64 first, u64 stride) {
    float m = 0.0f;
    const uint4* xr = FP4_AMAX_REVERSE ? x + nvec - 1 : x;   // element i is xr[dir * i]
    const long long dir = FP4_AMAX_REVERSE ? -1 : 1;
    // FP4_AMAX_STEP independent 16-byte loads per step, the last step's predicated (a missing vector is
    // zeros, which leave the max alone): one load in flight per thread left DRAM latency exposed, and
    // a remainder loop of single loads left the last few round trips exposed.
    constexpr int S = FP4_AMAX_STEP;
    for (u64 i = first; i < nvec; i += S * stride) {
        uint4 v[S];
#pragma unroll
        for (int u = 0; u < S; ++u) {
            const u64 j = i + (u64)u * stride;
            v[u] = j < nvec ? __ldg(xr + dir * (long long)j) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < S; ++u) amax_vec<In>(v[u], m);
    }
    return m;
}

// The max of m over the block, valid in every lane of warp 0 (every thread must call it).
__device__ __forceinline__ float block_max(float m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    __shared__ float warp_max[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_max[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = lane < (int)(blockDim.x >> 5) ? warp_max[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    }
    return m;
}

// per_block == 0: *out = max(*out, the max over x), out zeroed by the caller. per_block != 0: out[b] =
// the max over block b's share of x, for every block b of the grid: no zeroed word, so no memset node
// before the pass, and quantize takes the max of the gridDim.x partials (quant_amax).
template <typename In>
__device__ void amax_body(const uint4* __restrict__ x, u64 nvec, float* out, u32 per_block) {
#if __CUDA_ARCH__ >= 900
    // A quantize launched after this pass with programmatic stream serialization may start its blocks
    // as this grid's blocks retire (they wait in quant_amax for the partials): the tail of this pass
    // and the launch of the next overlap.
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    const float m = block_max(amax_thread<In>(x, nvec, (u64)blockIdx.x * blockDim.x + threadIdx.x,
                                              (u64)gridDim.x * blockDim.x));
    if (threadIdx.x != 0) return;
    if (per_block) out[blockIdx.x] = m;
    else if (m > 0.0f) atomicMax((int*)out, __float_as_int(m));
}

// ---------------------------------------------------------------- quantize
// The global encode scale from amax: S_enc = 448 * 6 / amax capped at FLT_MAX; amax == 0 -> 1.
// An amax that is not a finite non-negative number (only possible from a device scalar, which cannot
// be checked without a sync) is treated like 0; the reference does the same.
__device__ __forceinline__ float nvfp4_senc(float amax) {
    if (!(amax > 0.0f && amax <= FP4_FLT_MAX)) return 1.0f;
    return fminf(__fdiv_rn(2688.0f, amax), FP4_FLT_MAX);
}

// The stochastic-rounding seed of a launch: `seed` itself, or, with seed_ptr set, seed + seed_mul * *seed_ptr
// (mod 2^64), read when the kernel runs: a seed the caller keeps in device memory and advances between the
// replays of a CUDA graph (fp4ccl/formats/seeds.py). Read after the programmatic-dependent wait, if any.
__device__ __forceinline__ u64 launch_seed(u64 seed, const u64* seed_ptr, u64 seed_mul) {
    return seed_ptr ? seed + seed_mul * *seed_ptr : seed;
}

// What every quantize thread derives once from the launch arguments.
struct QuantCtx {
    float sdec, senc6;   // NVFP4: S_dec and S_enc * (1/6)
    u32 k1, k2;          // stochastic rounding keys
};
template <bool NV>
__device__ __forceinline__ QuantCtx quant_ctx(float amax, u64 seed, const Seg& seg) {
    QuantCtx c;
    c.sdec = 1.0f; c.senc6 = 0.0f;
    if (NV) {
        const float senc = nvfp4_senc(amax);
        c.sdec = __frcp_rn(senc);
        c.senc6 = __fmul_rn(senc, 1.0f / 6.0f);
        if (seg.gs && blockIdx.x == 0 && threadIdx.x == 0) *(float*)seg.gs = c.sdec;
    }
    c.k1 = fmix32((u32)seed);
    c.k2 = fmix32((u32)(seed >> 32) + 0x7F4A7C15u);
    return c;
}

// Block scale byte of a finite block with max |x| = m, and the multiplier that maps x into E2M1 range.
template <bool NV>
__device__ __forceinline__ float block_scale(float m, const QuantCtx& c, u32& sbyte) {
    if (NV) {
        sbyte = e4m3_rne(fminf(__fmul_rn(m, c.senc6), 448.0f));
        // a code of a value in [0, 448]: 0x00..0x7E, never negative or NaN, so e4m3_to_f32's checks drop
        const float bsf = sbyte >= 8u ? __uint_as_float((sbyte << 20) + (120u << 23)) : (float)sbyte * 0.001953125f;
        return fminf(__frcp_rn(__fmul_rn(bsf, c.sdec)), FP4_FLT_MAX);
    }
    const u32 e = __float_as_uint(m) >> 23;           // biased exponent of bamax
    sbyte = e > 2u ? e - 2u : 0u;                     // floor(log2 bamax) - 2 + 127, clamped
    return __uint_as_float((254u - sbyte) << 23);     // 2^-e, exact, always a normal float
}

// Sign bits (bit 4i+3 of element i) of the elements of one 16-byte input vector.
template <typename In> __device__ __forceinline__ u32 signs_vec(const uint4& v) {
    return sign_nibbles(sign_bytes_16bit(v.x, v.y), sign_bytes_16bit(v.z, v.w));
}
template <> __device__ __forceinline__ u32 signs_vec<float>(const uint4& v) {
    return sign_nibbles(sign_bytes_f32(v.x, v.y, v.z, v.w), 0u);
}

// N values f[j] * mult stochastically rounded to E2M1 (element j draws the random bits of element
// idx0 + j), packed a nibble each from bit 0 up.
template <int N>
__device__ __forceinline__ u32 e2m1_sr_pack(const float* f, float mult, const QuantCtx& c, u64 idx0) {
    u32 w = 0u;
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float y = __fmul_rn(f[j], mult);
        u32 q = e2m1_sr(fminf(fabsf(y), 6.0f), sr_bits(c.k1, c.k2, idx0 + j));
        q |= (__float_as_uint(y) >> 28) & 8u;
        w |= q << (j * 4);
    }
    return w;
}

// One FP4 block of BS elements (16 for NVFP4, 32 for MXFP4) from its BS / PER_VEC 16-byte input vectors:
// its packed nibbles w (BS / 8 words) and its scale byte. blk: the block's index in x (stochastic
// rounding draws from the element index).
template <typename In, int BS, bool NV, bool SR>
__device__ __forceinline__ void quant_block_bits(const uint4* v, u64 blk, const QuantCtx& c, u32* w, u32& sbyte) {
    constexpr int PV = Loader<In>::PER_VEC;
    constexpr int NVEC = BS / PV;
    float f[BS];
#pragma unroll
    for (int j = 0; j < NVEC; ++j) Loader<In>::unpack(v[j], f + j * PV);
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < BS; ++j) m = max_nan(m, fabsf(f[j]));
#pragma unroll
    for (int j = 0; j < BS / 8; ++j) w[j] = 0u;
    if (!(m <= FP4_FLT_MAX)) {
        sbyte = NV ? 0x7Fu : 0xFFu;   // NaN scale; the block's data stays 0
    } else {
        const float mult = block_scale<NV>(m, c, sbyte);
        if constexpr (SR) {
#pragma unroll
            for (int j = 0; j < BS / 8; ++j) w[j] = e2m1_sr_pack<8>(f + 8 * j, mult, c, blk * BS + 8 * j);
        } else {
            // mult > 0 (or +0), so y has x's sign: the sign bits come straight from the loaded bytes
            float y[BS];
#pragma unroll
            for (int j = 0; j < BS; ++j) y[j] = __fmul_rn(f[j], mult);
            // NVFP4: |y| <= m * mult (rounding is monotonic), and that is below 6.4 unless the block
            // scale is an E4M3 subnormal or the caller's amax is below the data's, so the clamp can
            // almost always go (MXFP4 blocks reach up to 8, often past 7: no such shortcut)
            if (NV && FP4_NV_CLAMP_SHORTCUT && __fmul_rn(m, mult) < 7.0f) {
#pragma unroll
                for (int j = 0; j < BS / 8; ++j) w[j] = e2m1_rn_pack<8, false>(y + 8 * j) | Loader<In>::signs8(v, j);
            } else {
#pragma unroll
                for (int j = 0; j < BS / 8; ++j) w[j] = e2m1_rn_pack<8>(y + 8 * j) | Loader<In>::signs8(v, j);
            }
        }
    }
}

// One thread quantizes one block per iteration: BS inputs in 16-byte loads, BS/2 data bytes out with
// one 8- or 16-byte store, and one scale byte.
template <typename In, int BS, bool NV, bool SWZ, bool SR>
__device__ __forceinline__ void quant_block(const uint4* v, u32 l, u32 nbc, const QuantCtx& c, u32 ncols_pad,
                                            const Seg& seg) {
    u8* scale_out = (u8*)seg.scale;
    u32 w[BS / 8];
    u32 sbyte;
    quant_block_bits<In, BS, NV, SR>(v, seg.src + l, c, w, sbyte);
    if constexpr (BS == 16) *(uint2*)(seg.data + (u64)l * 8u) = make_uint2(w[0], w[1]);
    else *(uint4*)(seg.data + (u64)l * 16u) = make_uint4(w[0], w[1], w[2], w[3]);
    if (SWZ) scale_out[swizzle_offset(l / nbc, l % nbc, ncols_pad)] = (u8)sbyte;
    else scale_out[l] = (u8)sbyte;
}

template <typename In, int BS, bool NV, bool SWZ, bool SR>
__device__ void quant_body(const uint4* __restrict__ x, u32 K, const QuantCtx& c, u32 ncols_pad, const Seg& seg) {
    constexpr int NVEC = BS / Loader<In>::PER_VEC;
    const u32 nbc = K / BS;
    const u32 units = (u32)seg.units;
    // (loading two blocks per step before quantizing either was slower: more registers, fewer warps)
    for (u32 l = blockIdx.x * blockDim.x + threadIdx.x; l < units; l += gridDim.x * blockDim.x) {
        uint4 v[NVEC];
#pragma unroll
        for (int j = 0; j < NVEC; ++j) v[j] = __ldg(x + (seg.src + l) * NVEC + j);
        quant_block<In, BS, NV, SWZ, SR>(v, l, nbc, c, ncols_pad, seg);
    }
}

// G = BS / PV consecutive lanes share one block, one 16-byte vector each, so every warp load reads 512
// contiguous bytes. Used for MXFP4 from fp32, where one thread per block strides 128 bytes between
// lanes: each load instruction then touches 32 different 128-byte lines, and that path ran at 73-82% of
// the copy; here 86-95% (H200, 2026-11-21). For the other formats and types every lane computing the
// block scale costs more than it saves (68-86% against 85-99%). The block max takes log2(G) shuffles;
// each lane quantizes its PV elements and stores PV/2 bytes; the group's first lane stores the scale
// byte. U vectors per lane per step, all loaded before use (U = 2 beat 4).
template <typename In, int BS, bool NV, bool SWZ, bool SR, int U>
__device__ void quant_lanes_body(const uint4* __restrict__ x, u32 K, const QuantCtx& c, u32 ncols_pad, const Seg& seg) {
    constexpr int PV = Loader<In>::PER_VEC;
    constexpr int G = BS / PV;
    constexpr u32 PER = 32u * U;
    const u32 nbc = K / BS;
    const u64 nv = seg.units * G;
    const u64 xv0 = seg.src * G;
    const u32 lane = threadIdx.x & 31u;
    const u64 nsteps = (nv + PER - 1) / PER;
    const u32 nwarps = (gridDim.x * blockDim.x) >> 5;
    u8* scale_out = (u8*)seg.scale;
    // warp-uniform loop: the shuffles need every lane; lanes past the end load zeros and store nothing
    for (u64 s = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; s < nsteps; s += nwarps) {
        const u64 base = s * PER;
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u64 vi = base + u * 32u + lane;
            v[u] = vi < nv ? __ldg(x + xv0 + vi) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u64 vi = base + u * 32u + lane;
            float f[PV];
            Loader<In>::unpack(v[u], f);
            float m = 0.0f;
#pragma unroll
            for (int j = 0; j < PV; ++j) m = max_nan(m, fabsf(f[j]));
#pragma unroll
            for (int o = 1; o < G; o <<= 1) m = max_nan(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
            u32 w = 0u, sbyte;
            if (!(m <= FP4_FLT_MAX)) {
                sbyte = NV ? 0x7Fu : 0xFFu;
            } else {
                const float mult = block_scale<NV>(m, c, sbyte);
                if constexpr (SR) {
                    w = e2m1_sr_pack<PV>(f, mult, c, (xv0 + vi) * PV);
                } else {
                    float y[PV];
#pragma unroll
                    for (int j = 0; j < PV; ++j) y[j] = __fmul_rn(f[j], mult);
                    w = e2m1_rn_pack<PV>(y) | signs_vec<In>(v[u]);
                }
            }
            if (vi < nv) {
                if constexpr (PV == 8) st_cs((void*)(seg.data + vi * 4u), w);
                else st_cs((void*)(seg.data + vi * 2u), (u16)w);
                if (vi % G == 0) {
                    const u64 l = vi / G;
                    if (SWZ) scale_out[swizzle_offset((u32)(l / nbc), (u32)(l % nbc), ncols_pad)] = (u8)sbyte;
                    else scale_out[l] = (u8)sbyte;
                }
            }
        }
    }
}

// The tensor amax for NVFP4 quantize: amax_val when amax_ptr is null, else the max of the amax_n fp32
// values at amax_ptr (one device scalar, or the per-block partials of amax_body). Every thread of the
// block must call it.
__device__ __forceinline__ float quant_amax(const float* amax_ptr, u32 amax_n, float amax_val) {
    if (!amax_ptr) return amax_val;
#if __CUDA_ARCH__ >= 900
    // Launched as a programmatic dependent of the amax pass, the block may run before that pass has
    // finished: wait for it (and its writes) here. Without that launch attribute this returns at once.
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    if (amax_n <= 1) return *amax_ptr;
    float m = 0.0f;
    for (u32 i = threadIdx.x; i < amax_n; i += blockDim.x) m = fmaxf(m, amax_ptr[i]);
    __shared__ float total;
    m = block_max(m);
    if (threadIdx.x == 0) total = m;
    __syncthreads();
    return total;
}

template <typename In, int BS, bool NV, bool SWZ, bool SR>
__device__ void quant_kernel(const uint4* __restrict__ x, u32 K, const float* amax_ptr, u32 amax_n, float amax_val,
                             u64 seed, const u64* seed_ptr, u64 seed_mul, u32 ncols_pad, const SegTable& t) {
    const Seg seg = pick_segment(t);
    const float amax = NV ? quant_amax(amax_ptr, amax_n, amax_val) : 0.0f;
    const QuantCtx c = quant_ctx<NV>(amax, SR ? launch_seed(seed, seed_ptr, seed_mul) : 0, seg);
    if constexpr (!NV && Loader<In>::PER_VEC == 4) quant_lanes_body<In, BS, NV, SWZ, SR, 2>(x, K, c, ncols_pad, seg);
    else quant_body<In, BS, NV, SWZ, SR>(x, K, c, ncols_pad, seg);
}

// ---------------------------------------------------------------- dequantize
// Position of chunk `sub` of lane `owner` in a warp's staging area. The XOR spreads the 8 lanes of one
// 16-byte shared-memory phase over 8 distinct bank groups for any chunks-per-lane CH in {2, 4, 8}, both
// when a lane writes its own chunks and when the warp reads them back in order.
template <int CH>
__device__ __forceinline__ u32 stage_pos(u32 owner, u32 sub) {
    return owner * CH + (sub ^ ((owner / (8 / CH)) & (CH - 1)));
}

// Output bytes of one FP4 block and the 16-byte chunks they make.
template <typename Out, int BS> struct OutBlock {
    static constexpr int BYTES = BS * (Storer<Out>::PER_VEC == 4 ? 4 : 2);
    static constexpr int CH = BYTES / 16;
};

// The E2M1 values (sign in bit 3), built by every block in shared memory: a per-element lookup is one
// broadcast-free shared load (16 words, 16 banks) instead of several integer instructions.
__device__ __forceinline__ void fill_e2m1_lut(float* lut) {
    if (threadIdx.x < 16) {
        const u32 c = threadIdx.x & 7u;
        const float mag = c < 2u ? 0.5f * (float)c : __uint_as_float((c << 22) + 0x3F000000u);
        lut[threadIdx.x] = threadIdx.x & 8u ? -mag : mag;
    }
}

// Byte offsets 4 * nibble into the 16-float LUT for the 8 nibbles of a data word: even nibbles in the
// bytes of e, odd ones in o; one prmt then extracts each (0.5 + 1 integer instructions per element,
// against ~2.3 for a shift, a mask and the address arithmetic in the SASS of dequantize_sum). With it
// the 4-way dequantize_sum went from 71-73% to 75-77% of the copy (NVFP4) and from 72-79% to 85-91%
// (MXFP4), H200 2026-11-21.
struct NibOffs { u32 e, o; };
__device__ __forceinline__ NibOffs nib_offsets(u32 w) { return {(w << 2) & 0x3C3C3C3Cu, (w >> 2) & 0x3C3C3C3Cu}; }
__device__ __forceinline__ float lut_at(const float* lut, const NibOffs& n, int i) {
    return *(const float*)((const char*)lut + prmt((i & 1) ? n.o : n.e, 0u, 0x4440u | (u32)(i >> 1)));
}
// f[i] = E2M1 value of nibble i of the packed block d, times sc (one rounding).
template <int BS, typename P>
__device__ __forceinline__ void decode_block(const P& d, const float* lut, float sc, float* f) {
#pragma unroll
    for (int j = 0; j < BS / 8; ++j) {
        const NibOffs n = nib_offsets(d.word(j));
#pragma unroll
        for (int i = 0; i < 8; ++i) f[8 * j + i] = __fmul_rn(lut_at(lut, n, i), sc);
    }
}

// One 16-byte chunk of output from its Storer<Out>::PER_VEC fp32 values (4 for fp32, 8 rounded to 16 bits).
template <typename Out>
__device__ __forceinline__ uint4 out_chunk(const float* f) {
    if constexpr (Storer<Out>::PER_VEC == 4) {
        return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
    } else {
        return make_uint4(Storer<Out>::pack2(f[0], f[1]), Storer<Out>::pack2(f[2], f[3]),
                          Storer<Out>::pack2(f[4], f[5]), Storer<Out>::pack2(f[6], f[7]));
    }
}

// Stages one block's BS decoded fp32 values (rounded to Out) as this lane's chunks.
template <typename Out, int BS>
__device__ __forceinline__ void stage_block(const float* f, u32 lane, uint4* my_stage) {
    constexpr int CH = OutBlock<Out, BS>::CH;
#pragma unroll
    for (int j = 0; j < CH; ++j) my_stage[stage_pos<CH>(lane, (u32)j)] = out_chunk<Out>(f + j * Storer<Out>::PER_VEC);
}

// decode_block + stage_block eight values at a time, so only 8 decoded floats are live instead of BS
// (the MXFP4 dequantize to fp32 used 64-79 registers with all 32 live, which capped it at 3-4 blocks
// per SM).
template <typename Out, int BS, typename P>
__device__ __forceinline__ void decode_stage_block(const P& d, const float* lut, float sc, u32 lane, uint4* my_stage) {
    constexpr int CH = OutBlock<Out, BS>::CH;
    constexpr int PV = Storer<Out>::PER_VEC;
#pragma unroll
    for (int j = 0; j < BS / 8; ++j) {
        const NibOffs n = nib_offsets(d.word(j));
        float f[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = __fmul_rn(lut_at(lut, n, i), sc);
#pragma unroll
        for (int k = 0; k < 8 / PV; ++k) my_stage[stage_pos<CH>(lane, (u32)(j * (8 / PV) + k))] = out_chunk<Out>(f + k * PV);
    }
}

// Streaming (evict-first) stores for the dequantized output, which this kernel writes once and never
// reads (0: plain stores). Measured on the H200 (bench/RESULTS.md run 20, with FP4_DQB_EVICT_FIRST):
// MXFP4 to fp32 at 256 MiB 84.7 -> 85.5% of the copy, at 1 GiB 85.6 -> 86.5%, bf16 within noise or up.
#ifndef FP4_DQ_STORE_CS
#define FP4_DQ_STORE_CS 1
#endif
// The warp writes back the staged output of its 32 blocks (fewer at the end), in order.
template <typename Out, int BS>
__device__ __forceinline__ void flush_stage(uint4* dst, u32 nblocks, u32 lane, const uint4* my_stage) {
    constexpr int CH = OutBlock<Out, BS>::CH;
    const u32 nchunks = nblocks * CH;
#pragma unroll
    for (int j = 0; j < CH; ++j) {
        const u32 c = (u32)j * 32u + lane;
        if (c < nchunks) {
            const uint4 v = my_stage[stage_pos<CH>(c / CH, c % CH)];
            if (FP4_DQ_STORE_CS) __stcs(dst + c, v); else dst[c] = v;
        }
    }
}

template <int BS> struct Packed;
template <> struct Packed<16> {
    uint2 d;
    __device__ __forceinline__ void load(u64 data, u32 l) { d = __ldg((const uint2*)(data + (u64)l * 8u)); }
    __device__ __forceinline__ void load_cg(const u8* data, u64 l) { d = __ldcg((const uint2*)(data + l * 8u)); }
    __device__ __forceinline__ static void store(u8* data, u64 l, const u32* w) {
        *(uint2*)(data + l * 8u) = make_uint2(w[0], w[1]);
    }
    __device__ __forceinline__ u32 word(int i) const { return i == 0 ? d.x : d.y; }
};
template <> struct Packed<32> {
    uint4 d;
    __device__ __forceinline__ void load(u64 data, u32 l) { d = __ldg((const uint4*)(data + (u64)l * 16u)); }
    __device__ __forceinline__ void load_cg(const u8* data, u64 l) { d = __ldcg((const uint4*)(data + l * 16u)); }
    __device__ __forceinline__ static void store(u8* data, u64 l, const u32* w) {
        *(uint4*)(data + l * 16u) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    __device__ __forceinline__ u32 word(int i) const { return i == 0 ? d.x : (i == 1 ? d.y : (i == 2 ? d.z : d.w)); }
};

// MXFP4 (and NVFP4 before sm_90, see dequant_bulk_body).
// One thread decodes one FP4 block per warp chunk, FP4_DQ_UNROLL chunks per loop step (NVFP4) with every load
// issued before the first use (8-16 bytes per load: one block in flight per thread was too little to
// cover DRAM latency). Its 32-128 output bytes are staged in shared memory and written back by the
// whole warp in order, so each store instruction covers 512 contiguous bytes (a thread storing its own
// block would touch 32 sectors, half-filled, per instruction).
// Each dequantize loop step issues the next step's loads before it decodes and stores its own, so a
// thread always has a step's loads in flight (1 turns it on; 0 loads each step at its start).
#ifndef FP4_DQ_PREFETCH
#define FP4_DQ_PREFETCH 1
#endif
#ifndef FP4_DQ_UNROLL
#define FP4_DQ_UNROLL 2
#endif

// The segment's global decode scale S_dec (NVFP4; 1 where the segment has none, and for MXFP4).
template <bool NV>
__device__ __forceinline__ float decode_scale(const Seg& seg) {
    return (NV && seg.gs) ? *(const float*)seg.gs : 1.0f;
}

// The factor a block's E2M1 values are multiplied by: its scale byte decoded (E4M3 times the segment's
// S_dec for NVFP4, E8M0 for MXFP4), one rounding.
template <bool NV>
__device__ __forceinline__ float block_decode_scale(u32 sbyte, float sdec) {
    return NV ? __fmul_rn(e4m3_to_f32(sbyte), sdec) : e8m0_to_f32(sbyte);
}

template <typename Out, int BS, bool NV, bool SWZ>
__device__ void dequant_body(u8* out, u32 K, u32 ncols_pad, const SegTable& t) {
    constexpr int OBYTES = OutBlock<Out, BS>::BYTES;
    constexpr int CH = OutBlock<Out, BS>::CH;
    constexpr int U = BS == 16 ? FP4_DQ_UNROLL : 1;   // an MXFP4 block is already a 16-byte load
    __shared__ uint4 stage[FP4_THREADS / 32][32 * CH];
    __shared__ float lut[16];
    fill_e2m1_lut(lut);
    __syncthreads();
    const Seg seg = pick_segment(t);
    const float sdec = decode_scale<NV>(seg);
    const u32 nbc = K / BS;
    const u32 units = (u32)seg.units;
    const u8* scale_in = (const u8*)seg.scale;
    const u32 lane = threadIdx.x & 31u;
    uint4* my_stage = stage[threadIdx.x >> 5];
    const u32 warp_base = blockIdx.x * blockDim.x * U + (threadIdx.x & ~31u) * U;
    const u32 step = gridDim.x * blockDim.x * U;
    Packed<BS> d[U];
    u32 sb[U];
    auto load_step = [&](u32 base, Packed<BS>* dd, u32* ss) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u32 l = base + 32u * u + lane;
            if (l < units) {
                dd[u].load(seg.data, l);
                ss[u] = SWZ ? __ldg(scale_in + swizzle_offset(l / nbc, l % nbc, ncols_pad)) : __ldg(scale_in + l);
            }
        }
    };
    if (warp_base < units) load_step(warp_base, d, sb);
    // warp-uniform loop: every lane reaches the __syncwarp()s, lanes past the end only skip the work
    for (u32 base = warp_base; base < units; base += step) {
        // the next step's loads are issued before this step's decode and stores (FP4_DQ_PREFETCH)
        Packed<BS> dn[U];
        u32 sbn[U];
        const bool more = base + step > base && base + step < units;   // (no u32 wrap)
        if (FP4_DQ_PREFETCH && more) load_step(base + step, dn, sbn);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u32 b0 = base + 32u * u;
            if (b0 >= units) break;   // warp-uniform
            if (b0 + lane < units) {
                const float sc = block_decode_scale<NV>(sb[u], sdec);
                decode_stage_block<Out, BS>(d[u], lut, sc, lane, my_stage);
            }
            __syncwarp();
            flush_stage<Out, BS>((uint4*)(out + (seg.src + b0) * (u64)OBYTES),
                                 units - b0 < 32u ? units - b0 : 32u, lane, my_stage);
            __syncwarp();
        }
        if (more) {
            if (FP4_DQ_PREFETCH) {
#pragma unroll
                for (int u = 0; u < U; ++u) { d[u] = dn[u]; sb[u] = sbn[u]; }
            } else {
                load_step(base + step, d, sb);
            }
        }
    }
}

// NVFP4 on sm_90+: each step decodes FP4_DQB_SLICES x 256 consecutive 16-byte output chunks (thread t:
// chunk t of each slice, from 4 or 2 data bytes) into a shared-memory tile, and one thread writes the
// tile out with one bulk asynchronous copy (cp.async.bulk, the TMA engine): the output leaves the SM as
// 8 KB transfers instead of 16-byte vector stores, while the SM goes on with the next step's loads.
// Two tiles alternate. On the H200 (2026-11-21) this took NVFP4 to bf16 from 82.8/85.0/85.4% of
// the copy (64 MiB/256 MiB/1 GiB, dequant_body) to 84.9/86.5/87.3%, to fp32 from 81.6/85.0/85.6% to
// 84.3/85.4/85.8%; for MXFP4 it was no better than dequant_body (82.5-87.2%), which MXFP4 keeps.
#ifndef FP4_DQB_SLICES
#define FP4_DQB_SLICES 4
#endif
// Slices per tile for fp32 output, tunable apart from 16-bit output. 2 measured (run 20, H200): 64 MiB
// 84.8 -> 83.5% of the copy, 256 MiB 85.4 -> 86.1%, 1 GiB 85.7 -> 86.0%; 1 with 8 blocks per SM lost
// 4-7 points. So fp32 keeps the 16-bit count.
#ifndef FP4_DQB_SLICES_F32
#define FP4_DQB_SLICES_F32 FP4_DQB_SLICES
#endif
// The tile stores carry an L2 evict-first policy (1), like the streaming stores above (0: none).
// NVFP4 to fp32 at 256 MiB 84.0 -> 85.2% of the copy, at 1 GiB 85.3 -> 86.3% (run 20).
#ifndef FP4_DQB_EVICT_FIRST
#define FP4_DQB_EVICT_FIRST 1
#endif
// A thread decodes whole FP4 blocks (one 8-byte data load, one scale load) instead of 16-byte output
// chunks (fp32: four 2-byte data loads and four scale loads per block; 16-bit: two of 4 bytes each).
// The count of small loads was what held NVFP4 to fp32 at ~85% of the copy: same call on one H200
// (bench/RESULTS.md run 32), fp32 86.3/85.9/87.1 -> 89.6/87.8/88.5% at 64 MiB/256 MiB/1 GiB, bf16
// 88.0/88.1/87.7 -> 87.3/89.3/89.6%. 0 restores the chunk loads. Needs the slice count
// (FP4_DQB_SLICES_F32 / FP4_DQB_SLICES) to be a multiple of the chunks per block (4 / 2).
#ifndef FP4_DQB_F32_BLOCK
#define FP4_DQB_F32_BLOCK 1
#endif
#ifndef FP4_DQB_16_BLOCK
#define FP4_DQB_16_BLOCK 1
#endif
template <bool B> struct DqbWord { typedef u32 T; };   // per-thread load: a chunk's nibbles
template <> struct DqbWord<true> { typedef u64 T; };   // or a whole FP4 block's
template <typename Out> __device__ __forceinline__ u32 load_chunk_nibbles(u64 data, u64 chunk) {
    if constexpr (Storer<Out>::PER_VEC == 8) return __ldg((const u32*)data + chunk);
    else return (u32)__ldg((const u16*)data + chunk);
}
template <typename Out>
__device__ __forceinline__ uint4 decode_chunk(u32 nib, float sc, const float* lut) {
    constexpr int E = Storer<Out>::PER_VEC;
    float f[E];
#pragma unroll
    for (int i = 0; i < E; ++i) f[i] = __fmul_rn(lut[(nib >> (4 * i)) & 15u], sc);
    if constexpr (E == 4) {
        return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
    } else {
        return make_uint4(Storer<Out>::pack2(f[0], f[1]), Storer<Out>::pack2(f[2], f[3]),
                          Storer<Out>::pack2(f[4], f[5]), Storer<Out>::pack2(f[6], f[7]));
    }
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

template <typename Out, int BS, bool NV, bool SWZ>
__device__ void dequant_bulk_body(u8* out, u32 K, u32 ncols_pad, const SegTable& t) {
#if __CUDA_ARCH__ >= 900
    constexpr int E = Storer<Out>::PER_VEC;
    constexpr int CPB = BS / E;           // chunks per FP4 block
    constexpr int U = sizeof(Out) == 4 ? FP4_DQB_SLICES_F32 : FP4_DQB_SLICES;
    constexpr u32 TILE = U * FP4_THREADS; // chunks per tile
    // FP4_DQB_*_BLOCK: per slice, thread t decodes FP4 block t (CPB chunks) of UL = U / CPB block slices
    constexpr bool BLK = NV && BS == 16 && (sizeof(Out) == 4 ? FP4_DQB_F32_BLOCK : FP4_DQB_16_BLOCK);
    static_assert(!BLK || U % CPB == 0, "FP4_DQB_*_BLOCK needs the slice count to be a multiple of CPB");
    constexpr int UL = BLK ? U / CPB : U;  // loads (chunks or blocks) per thread per step
    typedef typename DqbWord<BLK>::T W;
    __shared__ __align__(128) uint4 tile[2][TILE];
    __shared__ float lut[16];
    fill_e2m1_lut(lut);
    __syncthreads();
    const Seg seg = pick_segment(t);
    const float sdec = decode_scale<NV>(seg);
    const u32 nbc = K / BS;
    const u64 nch = seg.units * CPB;
    const u8* scale_in = (const u8*)seg.scale;
    uint4* dst = (uint4*)(out + seg.src * BS * (u64)(16 / E));
    auto load_scale = [&](u64 l) -> u32 {
        return SWZ ? __ldg(scale_in + swizzle_offset((u32)(l / nbc), (u32)(l % nbc), ncols_pad)) : __ldg(scale_in + l);
    };
    auto load_step = [&](u64 t0, W* nib, u32* sb) {
#pragma unroll
        for (int u = 0; u < UL; ++u) {
            if constexpr (BLK) {
                // block b = chunks 4b..4b+3 (2b, 2b+1): data bytes 8b..8b+7, 8-byte aligned like Packed<16>
                const u64 b = t0 / CPB + (u64)u * FP4_THREADS + threadIdx.x;
                if (b < seg.units) { nib[u] = __ldg((const u64*)seg.data + b); sb[u] = load_scale(b); }
            } else {
                const u64 ch = t0 + (u64)u * FP4_THREADS + threadIdx.x;
                if (ch < nch) { nib[u] = load_chunk_nibbles<Out>(seg.data, ch); sb[u] = load_scale(ch / CPB); }
            }
        }
    };
    const u64 gstep = (u64)gridDim.x * TILE;
    u64 policy = 0;
    if (FP4_DQB_EVICT_FIRST) asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    W nib[UL];
    u32 sb[UL];
    if ((u64)blockIdx.x * TILE < nch) load_step((u64)blockIdx.x * TILE, nib, sb);
    u32 it = 0;
    for (u64 t0 = (u64)blockIdx.x * TILE; t0 < nch; t0 += gstep, ++it) {
        // the next step's loads are issued before this step's decode, barrier and store (FP4_DQ_PREFETCH)
        W nibn[UL];
        u32 sbn[UL];
        const bool more = t0 + gstep < nch;
        if (FP4_DQ_PREFETCH && more) load_step(t0 + gstep, nibn, sbn);
        uint4* buf = tile[it & 1u];
        // the copy issued from this tile two steps ago must have finished reading it
        if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        __syncthreads();
#pragma unroll
        for (int u = 0; u < UL; ++u) {
            if constexpr (BLK) {
                if (t0 / CPB + (u64)u * FP4_THREADS + threadIdx.x < seg.units) {
                    const float sc = block_decode_scale<NV>(sb[u], sdec);
                    uint4* blk = buf + (u * FP4_THREADS + threadIdx.x) * CPB;
                    // A 16-byte shared store is served 8 threads (128 bytes) at a time: rotating the chunk
                    // order by t / (8 / CPB) puts those 8 threads on 8 distinct 16-byte bank groups
                    // (same order for all: 2 (fp32) or 4 (16-bit) of them would share each group).
#pragma unroll
                    for (int k = 0; k < CPB; ++k) {
                        const u32 j = ((u32)k + threadIdx.x / (8u / CPB)) & (CPB - 1u);
                        blk[j] = decode_chunk<Out>((u32)(nib[u] >> (j * (64u / CPB))), sc, lut);
                    }
                }
            } else {
                const u64 ch = t0 + (u64)u * FP4_THREADS + threadIdx.x;
                if (ch < nch) {
                    const float sc = block_decode_scale<NV>(sb[u], sdec);
                    buf[u * FP4_THREADS + threadIdx.x] = decode_chunk<Out>(nib[u], sc, lut);
                }
            }
        }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   // generic-proxy writes -> the bulk copy
        __syncthreads();
        if (threadIdx.x == 0) {
            const u64 n = nch - t0 < TILE ? nch - t0 : TILE;
            if (FP4_DQB_EVICT_FIRST) {
                asm volatile("cp.async.bulk.global.shared::cta.bulk_group.L2::cache_hint [%0], [%1], %2, %3;"
                             :: "l"(dst + t0), "r"(smem_addr(buf)), "r"((u32)n * 16u), "l"(policy) : "memory");
            } else {
                asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                             :: "l"(dst + t0), "r"(smem_addr(buf)), "r"((u32)n * 16u) : "memory");
            }
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        }
        if (more) {
            if (FP4_DQ_PREFETCH) {
#pragma unroll
                for (int u = 0; u < UL; ++u) { nib[u] = nibn[u]; sb[u] = sbn[u]; }
            } else {
                load_step(t0 + gstep, nib, sb);
            }
        }
    }
    if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#else
    dequant_body<Out, BS, NV, SWZ>(out, K, ncols_pad, t);
#endif
}

// ---------------------------------------------------------------- dequantize and sum
// The FP4 reduce-scatter's receive side: out block l = round_once(sum over c = 0..n-1, in order, of
// contribution c's block l decoded to fp32 exactly as dequantize decodes it). One launch reads every
// contribution once and writes the output once; the sum never leaves registers.
// Up to FP4_MAXSUM contributions per launch, their addresses passed by value (3 KB of the 4 KB kernel
// parameter space) as a __grid_constant__ struct, so a loop index reads it from the parameter bank with
// no local-memory copy and no device-side table. `accumulate` (fp32 output only) starts from out
// instead of 0, which chains launches for more contributions with the same result.
#define FP4_MAXSUM 128
struct SumTable {
    u64 data[FP4_MAXSUM];
    u64 scale[FP4_MAXSUM];
    u64 gs[FP4_MAXSUM];      // fp32 S_dec of each contribution (NVFP4); unused for MXFP4
};

#define FP4_SUM_BATCH 4      // contributions whose loads are issued together
template <typename Out, int BS, bool NV>
__device__ void dqsum_body(u8* out, u32 units, u32 n, u32 accumulate, const SumTable& t) {
    constexpr int OBYTES = OutBlock<Out, BS>::BYTES;
    constexpr int CH = OutBlock<Out, BS>::CH;
    __shared__ uint4 stage[FP4_THREADS / 32][32 * CH];
    __shared__ float lut[16];
    __shared__ float sdec[FP4_MAXSUM];
    fill_e2m1_lut(lut);
    for (u32 c = threadIdx.x; c < n; c += blockDim.x) sdec[c] = NV ? *(const float*)t.gs[c] : 1.0f;
    __syncthreads();
    const u32 lane = threadIdx.x & 31u;
    uint4* my_stage = stage[threadIdx.x >> 5];
    for (u32 base = blockIdx.x * blockDim.x + (threadIdx.x & ~31u); base < units; base += gridDim.x * blockDim.x) {
        const u32 l = base + lane;
        if (l < units) {
            float acc[BS];
            if (Storer<Out>::PER_VEC == 4 && accumulate) {   // fp32 output only (the launcher checks)
                const float4* prev = (const float4*)(out + (u64)l * OBYTES);
#pragma unroll
                for (int j = 0; j < BS / 4; ++j) {
                    const float4 p = prev[j];
                    acc[4 * j] = p.x; acc[4 * j + 1] = p.y; acc[4 * j + 2] = p.z; acc[4 * j + 3] = p.w;
                }
            } else {
#pragma unroll
                for (int i = 0; i < BS; ++i) acc[i] = 0.0f;
            }
            for (u32 c0 = 0; c0 < n; c0 += FP4_SUM_BATCH) {
                Packed<BS> d[FP4_SUM_BATCH];
                u32 sb[FP4_SUM_BATCH];
#pragma unroll
                for (int k = 0; k < FP4_SUM_BATCH; ++k) {
                    if (c0 + k < n) {
                        d[k].load(t.data[c0 + k], l);
                        sb[k] = __ldg((const u8*)t.scale[c0 + k] + l);
                    }
                }
#pragma unroll
                for (int k = 0; k < FP4_SUM_BATCH; ++k) {
                    if (c0 + k < n) {
                        const float sc = block_decode_scale<NV>(sb[k], sdec[c0 + k]);
                        float f[BS];
                        decode_block<BS>(d[k], lut, sc, f);
#pragma unroll
                        for (int i = 0; i < BS; ++i) acc[i] = __fadd_rn(acc[i], f[i]);
                    }
                }
            }
            stage_block<Out, BS>(acc, lane, my_stage);
        }
        __syncwarp();
        flush_stage<Out, BS>((uint4*)(out + (u64)base * OBYTES), units - base < 32u ? units - base : 32u, lane, my_stage);
        __syncwarp();
    }
}

// ---------------------------------------------------------------- small NVFP4 quantize, amax included
// For the small gathers of decode-time dispatch the amax pass, its zeroed result word and the quantize
// were three graph nodes of ~1-2 us each around a few microseconds of work. Here one launch of one
// thread-block cluster does all three: the cluster's CTAs are co-scheduled by the hardware, so its
// barrier cannot deadlock the way a grid-wide spin could; each CTA's max goes through distributed
// shared memory (or each CTA reads all of a small x itself, see cluster_amax_ranges). x is read twice,
// the second time from L2 (the path is for inputs of a few hundred KB). NVFP4, linear scales, round to
// nearest: what an FP4 gather with per-rank global scales quantizes.
#define FP4_SMALL_CTAS 8
__device__ __forceinline__ void cluster_barrier() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// *p in the shared memory of CTA `cta` of this cluster
__device__ __forceinline__ float ld_cluster_f32(const float* p, u32 cta) {
    u32 remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(p)), "r"(cta));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

// The max |x| of each of n consecutive ranges of x, range q = FP4 blocks [first[q], first[q] + blocks[q])
// of `vpb` 16-byte vectors each (first[q + 1] = first[q] + blocks[q]), into amax_out[q] (shared memory)
// of every CTA of this cluster. One pass: a thread's loads of every range are in flight together (a
// pass per range costs a load round trip and a block reduction each, which decode sizes feel);
// each CTA reduces its share, the shares meet through distributed shared memory. Up to
// FP4_LOCAL_AMAX_VECS vectors in all, every CTA reads all of x itself instead and no cluster barrier is
// needed: two of them cost more than the few extra loads there. Measured on 4 x H200 (bench/RESULTS.md
// run 108, one-launch collectives, GPU time per call): the NVFP4 gather at 8-32 KiB per rank 7.8-8.0 us
// against 8.9 through the cluster, at 64 KiB (4096 vectors) 8.9 against 9.1; the reduce-scatter at 32
// KiB of x (2048 vectors) 10.1 against 10.3, at 64 KiB 10.9 against 10.4. Every thread must call it.
#define FP4_CLUSTER_MAXRANGES 8
#ifndef FP4_LOCAL_AMAX_VECS
#define FP4_LOCAL_AMAX_VECS 2048
#endif
template <typename In>
__device__ void cluster_amax_ranges(const uint4* __restrict__ x, const u64* first, const u64* blocks, u32 vpb, u32 n,
                                    float* amax_out) {
    __shared__ float part[FP4_CLUSTER_MAXRANGES];
    __shared__ float warp_part[32][FP4_CLUSTER_MAXRANGES];
    u32 cta, ctas;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(cta));
    asm("mov.u32 %0, %%cluster_nctarank;" : "=r"(ctas));
    float m[FP4_CLUSTER_MAXRANGES];
#pragma unroll
    for (int q = 0; q < FP4_CLUSTER_MAXRANGES; ++q) m[q] = 0.0f;
    const u64 lo = first[0] * vpb, hi = (first[n - 1] + blocks[n - 1]) * vpb;
    const bool local = hi - lo <= FP4_LOCAL_AMAX_VECS;   // the same in every CTA
    if (local) {
        cta = 0;
        ctas = 1;
    }
    const u64 stride = (u64)ctas * blockDim.x;
    constexpr int S = FP4_AMAX_STEP;
    // A thread's vectors k only grow, so it keeps the max of the range it is in (cur, range qc, which ends
    // at vector qend) and files it into m[qc] when k passes qend: a compare per vector. (Testing every
    // range for every vector made the reduce-scatter's amax pass ALU-bound: with it the one-launch NVFP4
    // reduce-scatter took 20.6 us at 1 MiB of x, 16.2 without, and 10.8 with no amax pass at all; run 108.)
    u32 qc = 0;
    u64 qend = (first[0] + blocks[0]) * vpb;
    float cur = 0.0f;
    auto file = [&]() {
#pragma unroll
        for (int q = 0; q < FP4_CLUSTER_MAXRANGES; ++q) m[q] = (u32)q == qc ? fmaxf(m[q], cur) : m[q];
        cur = 0.0f;
    };
    for (u64 i = lo + (u64)cta * blockDim.x + threadIdx.x; i < hi; i += S * stride) {
        uint4 v[S];
#pragma unroll
        for (int u = 0; u < S; ++u) {
            const u64 k = i + (u64)u * stride;
            v[u] = k < hi ? __ldg(x + k) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < S; ++u) {
            const u64 k = i + (u64)u * stride;
            if (k >= hi) break;
            while (k >= qend) {   // rare: into a later range (skipping empty ones)
                file();
                ++qc;
                qend = (first[qc] + blocks[qc]) * vpb;
            }
            amax_vec<In>(v[u], cur);
        }
    }
    file();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int q = 0; q < FP4_CLUSTER_MAXRANGES; ++q) {
        if ((u32)q < n) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) m[q] = fmaxf(m[q], __shfl_xor_sync(0xFFFFFFFFu, m[q], o));
            if (lane == 0) warp_part[warp][q] = m[q];
        }
    }
    __syncthreads();
    if (threadIdx.x < n) {
        float a = 0.0f;
        for (u32 w = 0; w < (blockDim.x >> 5); ++w) a = fmaxf(a, warp_part[w][threadIdx.x]);
        (local ? amax_out : part)[threadIdx.x] = a;
    }
    if (local) {
        __syncthreads();   // amax_out visible to the whole CTA
        return;
    }
    cluster_barrier();   // every CTA's parts written and visible cluster-wide
    // One remote load per (range, CTA), all in flight together; lanes [q * ctas, (q + 1) * ctas) then
    // reduce range q with shuffles (ctas, the cluster's size, is a power of two of at most 8).
    if (threadIdx.x < 2 * 32) {   // warps 0 and 1 whole: the shuffles need every lane
        const u32 q = threadIdx.x / ctas, c = threadIdx.x % ctas;
        float a = q < n ? ld_cluster_f32(&part[q], c) : 0.0f;
        for (u32 o = ctas >> 1; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xFFFFFFFFu, a, o));
        if (c == 0 && q < n) amax_out[q] = a;
    }
    cluster_barrier();   // amax_out visible to the whole CTA; no CTA exits while a peer reads its parts
}

// The max |x| over all nvec 16-byte vectors of x, in every thread of every CTA of this cluster.
template <typename In>
__device__ float cluster_amax(const uint4* __restrict__ x, u64 nvec) {
    __shared__ float amax;
    const u64 zero = 0;
    cluster_amax_ranges<In>(x, &zero, &nvec, 1u, 1u, &amax);
    return amax;
}

template <typename In>
__device__ void quant_small_body(const uint4* __restrict__ x, u64 nvec, u32 K, const SegTable& t) {
    const float amax = cluster_amax<In>(x, nvec);   // the grid is one cluster
    const Seg seg = pick_segment(t);
    const QuantCtx c = quant_ctx<true>(amax, 0, seg);
    quant_body<In, 16, true, false, false>(x, K, c, 0u, seg);
}

// ---------------------------------------------------------------- small FP4 gather, one launch
// The FP4 gather of decode-time sizes as one kernel and no barrier (fp4ccl/one_launch.py,
// docs/VCOLLECTIVES.md), over a symmetric buffer of its own: every rank's region holds, per parity, one
// segment per source rank (FP4 data, then scales). Every rank runs the same grid, FP4_LL_MAXCTAS CTAs
// in clusters of FP4_LL_CLUSTER; CTA j of every rank owns share j of every rank's FP4 blocks (share j
// of n blocks: [n j / G, n (j + 1) / G)). For NVFP4 each cluster computes the amax of the local x whole
// (the same value in every cluster: max is exact); then CTA j quantizes share j of the local rows and
// stores it into this rank's segment in every rank's region, its own included. One flag word per
// (source, CTA) in each receiver then says "share j of source s has landed": 16 bits of the epoch and 16
// of the call's signature in its high half (ll_exchange_flags), the source's fp32 S_dec (1 for MXFP4) in
// its low half, stored with release semantics after a system fence, so a receiver that reads the epoch
// with an acquire load sees the data. CTA j waits for share
// j's flag of every source and decodes those shares from local memory: nothing is read over NVLink.
// Epochs: CTA j counts its launches in counters[j] (this rank's memory); every launch has the same grid,
// so all counts agree, on every rank. The call's parity (epoch & 1) picks the half of the regions and
// flags, so calls alternate halves on the device, in a CUDA graph too. A half is rewritten two calls
// later at the earliest: a sender starts call e + 2 only after it saw every receiver's flags of call
// e + 1, which each receiver stores only after its call e ended, reads included. So equality with the
// expected epoch is an exact test, and nothing is overwritten while it is read.
#define FP4_LL_CLUSTER 8
#define FP4_LL_MAXRANKS 8
#define FP4_LL_MAXCTAS 32   // the grid: 4 clusters
struct LLTable {
    u64 units[FP4_LL_MAXRANKS];    // FP4 blocks of each source rank's rows
    u64 first[FP4_LL_MAXRANKS];    // the FP4 block of out where they start
    u64 region[FP4_LL_MAXRANKS];   // rank r's segments (both halves), as mapped here
    u64 flags[FP4_LL_MAXRANKS];    // rank r's flag words (both halves: [half][source][FP4_LL_MAXCTAS])
    u64 seed[FP4_LL_MAXRANKS];     // the reduce-scatter's stochastic rounding: chunk q's seed, or with
    u64 seed_ptr, seed_mul;        // seed_ptr set, seed[q] + seed_mul * *seed_ptr (launch_seed)
    u64 err;                       // host-mapped word for a mismatch report (0: none), as the checked
    u64 sig;                       // barrier's (csrc/symm.cu); sig: the call's 24-bit signature
};

// One FP4 block's BS decoded values, rounded to Out, to dst (16-byte aligned).
template <typename Out, int BS>
__device__ __forceinline__ void store_block(u8* dst, const float* f) {
#pragma unroll
    for (int j = 0; j < OutBlock<Out, BS>::CH; ++j) ((uint4*)dst)[j] = out_chunk<Out>(f + j * Storer<Out>::PER_VEC);
}

__device__ __forceinline__ void ll_share(u64 units, u32 j, u32 G, u64& lo, u64& hi) {
    lo = units * j / G;
    hi = units * (j + 1) / G;
}

// f(q, l) for each FP4 block l of this CTA's share j of units[q], q < n. Where the shares hold at most
// a block per thread in all (decode sizes), they are walked as one flat sequence, a block per thread:
// one after the other, most threads idled and each share cost a load round trip (the gather at 8-64
// KiB per rank 9.1-9.2 us flat against 10.0-10.6, the reduce-scatter 11.7-12.4 against 12.7-13.6;
// bench/RESULTS.md run 104). Larger shares go one after the other, which measured faster there
// (the gather at 256 KiB per rank 11.0 us against 12.2 flat).
#ifndef FP4_LL_FLAT
#define FP4_LL_FLAT 1   // 0: always one share after the other (for benches)
#endif
template <typename F>
__device__ __forceinline__ void ll_for_shares(const u64* units, u32 n, u32 j, u32 G, F f) {
    u64 lo[FP4_LL_MAXRANKS], len[FP4_LL_MAXRANKS], total = 0;
#pragma unroll
    for (int q = 0; q < FP4_LL_MAXRANKS; ++q) {
        u64 hi = 0;
        lo[q] = 0;
        if ((u32)q < n) ll_share(units[q], j, G, lo[q], hi);
        len[q] = hi - lo[q];
        total += len[q];
    }
    if (FP4_LL_FLAT && total <= blockDim.x) {
        if (threadIdx.x >= total) return;
        u64 r = threadIdx.x;
#pragma unroll
        for (int q = 0; q < FP4_LL_MAXRANKS; ++q) {
            if (r < len[q]) {
                f((u32)q, lo[q] + r);
                return;
            }
            r -= len[q];
        }
        return;
    }
#pragma unroll
    for (int q = 0; q < FP4_LL_MAXRANKS; ++q)
        for (u64 l = lo[q] + threadIdx.x; l < lo[q] + len[q]; l += blockDim.x) f((u32)q, l);
}

// What a one-launch call derives from its epoch (whose low 32 bits tag its flags): the half, by
// parity, of every region and of the flag words it uses.
struct LLCall {
    u64 epoch;
    u64 half_off;   // bytes from a region's start to this call's half
    u64 flag0;      // CTA j's flag word of source 0 in this call's half (source s: + s * FP4_LL_MAXCTAS)
};
__device__ __forceinline__ LLCall ll_call(u64 epoch, u32 world, u64 seg_stride, u32 j) {
    const u64 half = epoch & 1u;
    return {epoch, half * world * seg_stride, half * FP4_LL_MAXRANKS * FP4_LL_MAXCTAS + j};
}

// Source `source`'s segment in rank r's region, this call's half (as mapped here).
__device__ __forceinline__ u8* ll_segment(const LLTable& t, const LLCall& call, u32 r, u32 source, u64 seg_stride) {
    return (u8*)t.region[r] + call.half_off + source * seg_stride;
}

// Thread `peer` of CTA j, after the CTA's stores into every rank's region: flag this CTA's share as
// landed in rank peer's flags, then wait for peer's flag of the same share here and return the S_dec it
// carries. A flag word: 16 bits of the epoch (a flag holds this call's epoch or the one two calls back,
// never older, so 16 bits tell them apart), the low 16 bits of the call's signature, and the fp32 S_dec
// for its receiver. A peer's flag at this epoch with another signature means the ranks are in different
// calls (their sizes disagree, say): reported into t.err as the checked barrier does (kind 3: only 16
// bits of the peer's signature), and the call goes on, so no rank waits in vain; its results are void.
// Traps after timeout_ns (0: never).
__device__ __forceinline__ float ll_exchange_flags(const LLTable& t, const LLCall& call, u32 rank, u32 peer,
                                                   float sdec, u64 timeout_ns, u32 j, const char* op) {
    const u64 flag0 = call.flag0;
    const u32 tag = (u32)call.epoch & 0xffffu, sig16 = (u32)t.sig & 0xffffu;
    __threadfence_system();
    st_release_sys((u64*)t.flags[peer] + flag0 + rank * FP4_LL_MAXCTAS,
                   ((u64)tag << 48) | ((u64)sig16 << 32) | __float_as_uint(sdec));
    const u64* mine = (const u64*)t.flags[rank] + flag0 + peer * FP4_LL_MAXCTAS;
    const u64 start = timeout_ns ? global_timer_ns() : 0;
    u64 seen;
    while ((u32)((seen = ld_acquire_sys(mine)) >> 48) != tag) {
        __nanosleep(32);
        if (timeout_ns && global_timer_ns() - start > timeout_ns) {
            printf("fp4ccl: FP4 %s timed out on rank %u waiting for rank %u's rows (share %u, epoch tag %u, the flag "
                   "holds %u); a rank skipped or reordered a collective call\n",
                   op, rank, peer, j, tag, (u32)(seen >> 48));
            __trap();
        }
    }
    const u32 theirs = (u32)(seen >> 32) & 0xffffu;
    if (theirs != sig16 && t.err) {
        u64* err = (u64*)t.err;
        if (*reinterpret_cast<volatile u64*>(err) == 0)
            st_release_sys(err, (3ull << 60) | ((u64)(peer & 0xfff) << 48) | ((u64)theirs << 24) | (t.sig & 0xffffffu));
    }
    return __uint_as_float((u32)seen);
}

// FP4 block l of segment `seg`, written by other GPUs during this kernel: .cg loads, never from the
// non-coherent L1 paths.
template <int BS>
__device__ __forceinline__ void ll_load_block(const u8* seg, u64 scale_off, u64 l, Packed<BS>& d, u32& sbyte) {
    d.load_cg(seg, l);
    sbyte = __ldcg(seg + scale_off + l);
}

// Quantized block l (packed words w, scale byte sbyte) into segment `seg`.
template <int BS>
__device__ __forceinline__ void ll_store_block(u8* seg, u64 scale_off, u64 l, const u32* w, u32 sbyte) {
    Packed<BS>::store(seg, l, w);
    seg[scale_off + l] = (u8)sbyte;
}

template <typename In, typename Out, int BS, bool NV>
__device__ void gather_ll_body(const uint4* __restrict__ x, u64 nvec, u8* out, u64* counters, u64 seg_stride,
                               u64 scale_off, u64 timeout_ns, u32 rank, u32 world, const LLTable& t) {
    constexpr int NVEC = BS / Loader<In>::PER_VEC;
    constexpr int OBYTES = OutBlock<Out, BS>::BYTES;
    __shared__ u64 epoch_s;
    __shared__ float lut[16];
    __shared__ float sdec_s[FP4_LL_MAXRANKS];
    const u32 j = blockIdx.x, G = gridDim.x;
    if (threadIdx.x == 0) epoch_s = counters[j] + 1;
    fill_e2m1_lut(lut);
    float amax = 0.0f;   // MXFP4 has no tensor scale
    if (NV) amax = cluster_amax<In>(x, nvec);   // its cluster barriers also publish epoch_s and lut
    else __syncthreads();
    const LLCall call = ll_call(epoch_s, world, seg_stride, j);
    const Seg none = {0, 0, 0, 0, 0};
    const QuantCtx c = quant_ctx<NV>(amax, 0, none);
    u64 lo, hi;
    ll_share(t.units[rank], j, G, lo, hi);
    for (u64 l = lo + threadIdx.x; l < hi; l += blockDim.x) {
        uint4 v[NVEC];
#pragma unroll
        for (int k = 0; k < NVEC; ++k) v[k] = __ldg(x + l * NVEC + k);
        u32 w[BS / 8], sbyte;
        quant_block_bits<In, BS, NV, false>(v, l, c, w, sbyte);
        for (u32 r = 0; r < world; ++r)
            ll_store_block<BS>(ll_segment(t, call, r, rank, seg_stride), scale_off, l, w, sbyte);
    }
    __syncthreads();   // the CTA's stores precede thread r's fence and flag (cumulativity)
    if (threadIdx.x < world)
        sdec_s[threadIdx.x] = ll_exchange_flags(t, call, rank, threadIdx.x, c.sdec, timeout_ns, j, "gather");
    __syncthreads();   // every source's share has landed (the acquire above, then this barrier)
    ll_for_shares(t.units, world, j, G, [&](u32 s, u64 l) {
        Packed<BS> d;
        u32 sbyte;
        ll_load_block<BS>(ll_segment(t, call, rank, s, seg_stride), scale_off, l, d, sbyte);
        float f[BS];
        decode_block<BS>(d, lut, block_decode_scale<NV>(sbyte, sdec_s[s]), f);
        store_block<Out, BS>(out + (t.first[s] + l) * OBYTES, f);
    });
    if (threadIdx.x == 0) counters[j] = call.epoch;
}

// ---------------------------------------------------------------- small FP4 reduce-scatter, one launch
// The FP4 reduce-scatter of decode-time sizes as one kernel (fp4ccl/one_launch.py) over the one-launch
// gather's buffer, flags and epochs: the same grid and the same exchange (CTA j of every rank flags
// share j to every rank and waits for share j from every rank), so the two kernels share counters and
// halves in any interleaving, and the gather's argument for the halves holds as is. Here t.units[q] /
// t.first[q] are the FP4 blocks of chunk q of x (the rows rank q owns) and where in x they start.
// For NVFP4 each cluster computes every chunk's amax (a chunk is a tensor of its own). CTA j quantizes
// share j of chunk q (with seed t.seed[q] when stochastic) into this rank's segment of rank q's region,
// and flags it to q with chunk q's S_dec (1 for MXFP4). Then CTA j sums share j of this rank's chunk
// from every source's segment, decoded and added in rank order in fp32 from 0, and rounds once: what
// dequantize_sum computes.
template <typename T, int BS, bool NV, bool SR>
__device__ void reduce_scatter_ll_body(const uint4* __restrict__ x, u8* out, u64* counters, u64 seg_stride,
                                       u64 scale_off, u64 timeout_ns, u32 rank, u32 world, const LLTable& t) {
    constexpr int NVEC = BS / Loader<T>::PER_VEC;
    constexpr int OBYTES = OutBlock<T, BS>::BYTES;
    __shared__ u64 epoch_s;
    __shared__ float lut[16];
    __shared__ float amax_s[FP4_LL_MAXRANKS];
    __shared__ float sdec_s[FP4_LL_MAXRANKS];
    __shared__ QuantCtx ctx_s[FP4_LL_MAXRANKS];
    const u32 j = blockIdx.x, G = gridDim.x;
    if (threadIdx.x == 0) epoch_s = counters[j] + 1;
    fill_e2m1_lut(lut);
    // (the amax pass's barriers also publish epoch_s and lut)
    if (NV) cluster_amax_ranges<T>(x, t.first, t.units, NVEC, world, amax_s);
    else __syncthreads();
    const LLCall call = ll_call(epoch_s, world, seg_stride, j);
    if (threadIdx.x < world) {   // each chunk's scales and random keys, once
        const Seg none = {0, 0, 0, 0, 0};
        const u64 seed = SR ? launch_seed(t.seed[threadIdx.x], (const u64*)t.seed_ptr, t.seed_mul) : 0;
        ctx_s[threadIdx.x] = quant_ctx<NV>(NV ? amax_s[threadIdx.x] : 0.0f, seed, none);
    }
    __syncthreads();
    ll_for_shares(t.units, world, j, G, [&](u32 q, u64 l) {
        const u64 b = t.first[q] + l;   // the block's index in x: stochastic rounding draws from it
        uint4 v[NVEC];
#pragma unroll
        for (int k = 0; k < NVEC; ++k) v[k] = __ldg(x + b * NVEC + k);
        const QuantCtx c = ctx_s[q];
        u32 w[BS / 8], sbyte;
        quant_block_bits<T, BS, NV, SR>(v, b, c, w, sbyte);
        ll_store_block<BS>(ll_segment(t, call, q, rank, seg_stride), scale_off, l, w, sbyte);
    });
    __syncthreads();   // the CTA's stores precede thread q's fence and flag (cumulativity)
    if (threadIdx.x < world)   // chunk q's S_dec goes to rank q
        sdec_s[threadIdx.x] = ll_exchange_flags(t, call, rank, threadIdx.x, ctx_s[threadIdx.x].sdec, timeout_ns, j,
                                                "reduce-scatter");
    __syncthreads();   // every source's share has landed
    u64 lo, hi;
    ll_share(t.units[rank], j, G, lo, hi);
    for (u64 l = lo + threadIdx.x; l < hi; l += blockDim.x) {
        // every contribution's loads first, so their round trips overlap, then the sum in rank order
        Packed<BS> d[FP4_LL_MAXRANKS];
        u32 sb[FP4_LL_MAXRANKS];
#pragma unroll
        for (int s = 0; s < FP4_LL_MAXRANKS; ++s) {
            if ((u32)s < world)
                ll_load_block<BS>(ll_segment(t, call, rank, s, seg_stride), scale_off, l, d[s], sb[s]);
        }
        float acc[BS];
#pragma unroll
        for (int i = 0; i < BS; ++i) acc[i] = 0.0f;
#pragma unroll
        for (int s = 0; s < FP4_LL_MAXRANKS; ++s) {
            if ((u32)s < world) {
                float f[BS];
                decode_block<BS>(d[s], lut, block_decode_scale<NV>(sb[s], sdec_s[s]), f);
#pragma unroll
                for (int i = 0; i < BS; ++i) acc[i] = __fadd_rn(acc[i], f[i]);
            }
        }
        store_block<T, BS>(out + l * OBYTES, acc);
    }
    if (threadIdx.x == 0) counters[j] = call.epoch;
}

// ---------------------------------------------------------------- entry points (extern "C": stable names)
// Names: fp4_amax_<in>, fp4_quant_<fmt>_<in>_<layout>_<rounding>, fp4_dequant_<fmt>_<out>_<layout>;
// <in>/<out> in {bf16, f16, f32}, <fmt> in {nv, mx}, <layout> in {lin, swz}, <rounding> in {rn, sr}.
#define FP4_AMAX(NAME, IN) \
    extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_amax_##NAME(const uint4* x, u64 nvec, float* out, u32 per_block) { \
        amax_body<IN>(x, nvec, out, per_block); }
FP4_AMAX(bf16, u16)
FP4_AMAX(f16, Half)
FP4_AMAX(f32, float)

#define FP4_QUANT(FMT, NAME, IN, BS, NV, LAY, SWZ, RND, SR) \
    extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_quant_##FMT##_##NAME##_##LAY##_##RND( \
        const uint4* x, u32 K, const float* amax_ptr, u32 amax_n, float amax_val, u64 seed, const u64* seed_ptr, \
        u64 seed_mul, u32 ncols_pad, const SegTable t) { \
        quant_kernel<IN, BS, NV, SWZ, SR>(x, K, amax_ptr, amax_n, amax_val, seed, seed_ptr, seed_mul, ncols_pad, t); }
#define FP4_QUANT_ALL(FMT, BS, NV) \
    FP4_QUANT(FMT, bf16, u16, BS, NV, lin, false, rn, false) FP4_QUANT(FMT, bf16, u16, BS, NV, lin, false, sr, true) \
    FP4_QUANT(FMT, bf16, u16, BS, NV, swz, true, rn, false)  FP4_QUANT(FMT, bf16, u16, BS, NV, swz, true, sr, true) \
    FP4_QUANT(FMT, f16, Half, BS, NV, lin, false, rn, false) FP4_QUANT(FMT, f16, Half, BS, NV, lin, false, sr, true) \
    FP4_QUANT(FMT, f16, Half, BS, NV, swz, true, rn, false)  FP4_QUANT(FMT, f16, Half, BS, NV, swz, true, sr, true) \
    FP4_QUANT(FMT, f32, float, BS, NV, lin, false, rn, false) FP4_QUANT(FMT, f32, float, BS, NV, lin, false, sr, true) \
    FP4_QUANT(FMT, f32, float, BS, NV, swz, true, rn, false)  FP4_QUANT(FMT, f32, float, BS, NV, swz, true, sr, true)
FP4_QUANT_ALL(nv, 16, true)
FP4_QUANT_ALL(mx, 32, false)

// Blocks per SM the register allocation must allow (__launch_bounds__): for fp32 output, 6 took the
// dequantize kernels from 83-85% to 85-89% of the copy (H200, 2026-11-21); for 16-bit output it
// made them slower (no cap).
// fp4_quant_small_nv_<in>(x, nvec, K, table): launch exactly FP4_SMALL_CTAS blocks, one segment. sm_90+.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define FP4_QUANT_SMALL(NAME, IN) \
    extern "C" __global__ void __cluster_dims__(FP4_SMALL_CTAS, 1, 1) __launch_bounds__(FP4_THREADS) \
    fp4_quant_small_nv_##NAME(const uint4* x, u64 nvec, u32 K, const SegTable t) { quant_small_body<IN>(x, nvec, K, t); }
FP4_QUANT_SMALL(bf16, u16) FP4_QUANT_SMALL(f16, Half) FP4_QUANT_SMALL(f32, float)

// fp4_gather_ll_<fmt>_<t>(x, nvec, out, counters, seg_stride, scale_off, timeout_ns, rank, world, table):
// x and out of one type (the gather decodes to x's dtype); launch FP4_LL_MAXCTAS blocks; see
// gather_ll_body. sm_90+. (MXFP4 needs no cluster, but shares the grid, and so the epochs, of NVFP4.)
#define FP4_GATHER_LL(FMT, BS, NV, NAME, T) \
    extern "C" __global__ void __cluster_dims__(FP4_LL_CLUSTER, 1, 1) __launch_bounds__(FP4_THREADS) \
    fp4_gather_ll_##FMT##_##NAME(const uint4* x, u64 nvec, u8* out, u64* counters, u64 seg_stride, u64 scale_off, \
                                 u64 timeout_ns, u32 rank, u32 world, const __grid_constant__ LLTable t) { \
        gather_ll_body<T, T, BS, NV>(x, nvec, out, counters, seg_stride, scale_off, timeout_ns, rank, world, t); }
#define FP4_GATHER_LL_ALL(FMT, BS, NV) \
    FP4_GATHER_LL(FMT, BS, NV, bf16, u16) FP4_GATHER_LL(FMT, BS, NV, f16, Half) FP4_GATHER_LL(FMT, BS, NV, f32, float)
FP4_GATHER_LL_ALL(nv, 16, true)
FP4_GATHER_LL_ALL(mx, 32, false)

// fp4_rs_ll_<fmt>_<t>_<rn|sr>(x, out, counters, seg_stride, scale_off, timeout_ns, rank, world, table): x
// and out of one type; launch FP4_LL_MAXCTAS blocks; see reduce_scatter_ll_body. sm_90+.
#define FP4_RS_LL(FMT, BS, NV, NAME, T, RND, SR) \
    extern "C" __global__ void __cluster_dims__(FP4_LL_CLUSTER, 1, 1) __launch_bounds__(FP4_THREADS) \
    fp4_rs_ll_##FMT##_##NAME##_##RND(const uint4* x, u8* out, u64* counters, u64 seg_stride, u64 scale_off, \
                                     u64 timeout_ns, u32 rank, u32 world, const __grid_constant__ LLTable t) { \
        reduce_scatter_ll_body<T, BS, NV, SR>(x, out, counters, seg_stride, scale_off, timeout_ns, rank, world, t); }
#define FP4_RS_LL_ALL(FMT, BS, NV) \
    FP4_RS_LL(FMT, BS, NV, bf16, u16, rn, false) FP4_RS_LL(FMT, BS, NV, f16, Half, rn, false) \
    FP4_RS_LL(FMT, BS, NV, f32, float, rn, false) FP4_RS_LL(FMT, BS, NV, bf16, u16, sr, true) \
    FP4_RS_LL(FMT, BS, NV, f16, Half, sr, true) FP4_RS_LL(FMT, BS, NV, f32, float, sr, true)
FP4_RS_LL_ALL(nv, 16, true)
FP4_RS_LL_ALL(mx, 32, false)
#endif

#ifndef FP4_DQ_MINB_F32
#define FP4_DQ_MINB_F32 6
#endif
#ifndef FP4_DQ_MINB_16
#define FP4_DQ_MINB_16 1
#endif
#define FP4_DQ_MINB_u16 FP4_DQ_MINB_16
#define FP4_DQ_MINB_Half FP4_DQ_MINB_16
#define FP4_DQ_MINB_float FP4_DQ_MINB_F32
#define FP4_DEQUANT(FMT, NAME, OUT, BS, NV, LAY, SWZ, BODY) \
    extern "C" __global__ void __launch_bounds__(FP4_THREADS, FP4_DQ_MINB_##OUT) fp4_dequant_##FMT##_##NAME##_##LAY( \
        u8* out, u32 K, u32 ncols_pad, const SegTable t) { \
        BODY<OUT, BS, NV, SWZ>(out, K, ncols_pad, t); }
#define FP4_DEQUANT_ALL(FMT, BS, NV, BODY) \
    FP4_DEQUANT(FMT, bf16, u16, BS, NV, lin, false, BODY) FP4_DEQUANT(FMT, bf16, u16, BS, NV, swz, true, BODY) \
    FP4_DEQUANT(FMT, f16, Half, BS, NV, lin, false, BODY) FP4_DEQUANT(FMT, f16, Half, BS, NV, swz, true, BODY) \
    FP4_DEQUANT(FMT, f32, float, BS, NV, lin, false, BODY) FP4_DEQUANT(FMT, f32, float, BS, NV, swz, true, BODY)
FP4_DEQUANT_ALL(nv, 16, true, dequant_bulk_body)
FP4_DEQUANT_ALL(mx, 32, false, dequant_body)

// fp4_dqsum_<fmt>_<out>(out, units, n, accumulate, table): see dqsum_body.
#define FP4_DQSUM(FMT, NAME, OUT, BS, NV) \
    extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_dqsum_##FMT##_##NAME( \
        u8* out, u32 units, u32 n, u32 accumulate, const __grid_constant__ SumTable t) { \
        dqsum_body<OUT, BS, NV>(out, units, n, accumulate, t); }
FP4_DQSUM(nv, bf16, u16, 16, true) FP4_DQSUM(nv, f16, Half, 16, true) FP4_DQSUM(nv, f32, float, 16, true)
FP4_DQSUM(mx, bf16, u16, 32, false) FP4_DQSUM(mx, f16, Half, 32, false) FP4_DQSUM(mx, f32, float, 32, false)
