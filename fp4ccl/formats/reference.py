"""The numpy reference codec for NVFP4 and MXFP4: the host path and the oracle for the CUDA kernels.

Built on ml_dtypes' float4_e2m1fn, float8_e4m3fn and float8_e8m0fnu casts (round to nearest even),
with every fp32 operation in the order docs/FP4.md ("Exact arithmetic") gives, so that csrc/fp4.cu
can match it bit for bit. Arrays here are plain numpy: 2-D [rows, K] views in, uint8 out.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

from .tensor import BLOCK_SIZE, check_k, packed_layout, swizzle_offset, swizzled_shape

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
E2M1 = ml_dtypes.float4_e2m1fn
E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu
NV_SCALE_NAN = 0x7F
MX_SCALE_NAN = 0xFF
# the E2M1 magnitudes, from ml_dtypes rather than a hand-written table
E2M1_GRID = np.arange(8, dtype=np.uint8).view(E2M1).astype(F32)


def amax(x: np.ndarray) -> np.float32:
    """max |x| over the finite elements (0 when there are none), in fp32."""
    a = np.abs(np.asarray(x).astype(F32, copy=False))
    a = a[np.isfinite(a)]
    return F32(a.max()) if a.size else F32(0)


def global_scales(amax_value) -> Tuple[np.float32, np.float32]:
    """(S_enc, S_dec) for NVFP4. S_enc = 448 * 6 / amax capped at FLT_MAX; amax == 0 gives 1. An amax
    that is not a finite non-negative number is treated like 0 (the kernels do the same)."""
    a = F32(amax_value)
    if not (a > 0 and a <= FLT_MAX):
        s_enc = F32(1)
    else:
        with np.errstate(over="ignore", divide="ignore"):
            s_enc = np.minimum(F32(448) * F32(6) / a, FLT_MAX)
    with np.errstate(divide="ignore", over="ignore"):
        s_dec = F32(1) / s_enc
    return F32(s_enc), F32(s_dec)


# ------------------------------------------------------------------------------ random bits
_M1, _M2, _GOLD = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35), np.uint32(0x9E3779B9)


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * _M1
    h = h ^ (h >> np.uint32(13))
    h = h * _M2
    return h ^ (h >> np.uint32(16))


def sr_bits(seed: int, index: np.ndarray) -> np.ndarray:
    """32 random bits per element, a function of (seed, flat element index) alone (see docs/FP4.md)."""
    seed = int(seed) & (2**64 - 1)
    with np.errstate(over="ignore"):
        k1 = _fmix32(np.uint32(seed & 0xFFFFFFFF))
        k2 = _fmix32(np.uint32(((seed >> 32) + 0x7F4A7C15) & 0xFFFFFFFF))
        idx = np.asarray(index, dtype=np.uint64)
        lo = (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        hi = (idx >> np.uint64(32)).astype(np.uint32)
        h = _fmix32((lo * _GOLD) ^ k1)
        return _fmix32(h ^ hi ^ k2)


def _e2m1_codes(y: np.ndarray, rounding: str, seed: Optional[int], index: Optional[np.ndarray]) -> np.ndarray:
    """fp32 y -> E2M1 nibbles (sign in bit 3) of clamp(y, -6, 6)."""
    y = np.clip(y, F32(-6), F32(6))
    if rounding == "nearest":
        return y.astype(E2M1).view(np.uint8) & np.uint8(0xF)
    v = np.abs(y)
    lo_code = np.searchsorted(E2M1_GRID, v, side="right") - 1
    hi_code = np.minimum(lo_code + 1, 7)
    lo, hi = E2M1_GRID[lo_code], E2M1_GRID[hi_code]
    step = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(step > 0, (v - lo) / np.where(step > 0, step, F32(1)), F32(0)).astype(F32)
    u = (sr_bits(seed, index) >> np.uint32(8)).astype(F32) * F32(2.0 ** -24)
    code = (lo_code + (u < frac)).astype(np.uint8)
    return code | (np.signbit(y).astype(np.uint8) << np.uint8(3))


def quantize_2d(x: np.ndarray, format: str, amax_value=None, rounding: str = "nearest",
                seed: Optional[int] = None, index_base: int = 0):
    """Quantize a [rows, K] array. Returns (data uint8 [rows, K/2], scales uint8 [rows, K/bs] linear,
    S_dec fp32 or None). `index_base` is the flat index of x[0, 0] in the tensor it came from (it feeds
    the stochastic-rounding generator, so a row range quantizes like the whole tensor)."""
    rows, K = x.shape
    bs = check_k(K, format)
    nb = K // bs
    xf = x.astype(F32, copy=False).reshape(rows, nb, bs)
    finite = np.isfinite(xf).all(axis=-1)
    with np.errstate(invalid="ignore"):
        bamax = np.where(finite, np.abs(xf).max(axis=-1, initial=F32(0)), F32(0)).astype(F32)
    s_dec = None
    with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
        if format == "nvfp4":
            s_enc, s_dec = global_scales(amax(x) if amax_value is None else amax_value)
            s = np.minimum(bamax * (s_enc * (F32(1) / F32(6))), F32(448))
            scales = s.astype(E4M3).view(np.uint8)
            enc = np.minimum(F32(1) / (scales.view(E4M3).astype(F32) * s_dec), FLT_MAX)
            y = xf * enc[..., None]
            nan_scale = NV_SCALE_NAN
        else:
            _, ex = np.frexp(bamax)                          # bamax = m * 2^ex, m in [0.5, 1)
            e = np.clip(ex.astype(np.int64) - 1 - 2, -127, 127)
            scales = np.where(bamax > 0, e + 127, 0).astype(np.uint8)
            y = xf / scales.view(E8M0).astype(F32)[..., None]
            nan_scale = MX_SCALE_NAN
        index = None
        if rounding == "stochastic":
            index = index_base + np.arange(rows * K, dtype=np.uint64).reshape(rows, nb, bs)
        codes = _e2m1_codes(y.astype(F32), rounding, seed, index)
    codes = np.where(finite[..., None], codes, np.uint8(0)).reshape(rows, K)
    scales = np.where(finite, scales, np.uint8(nan_scale)).astype(np.uint8)
    data = (codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))).astype(np.uint8)
    return data, scales, s_dec


def dequantize_2d(data: np.ndarray, scales: np.ndarray, s_dec, format: str, K: int, dtype) -> np.ndarray:
    """Decode [rows, K/2] data with linear [rows, K/bs] scales to a [rows, K] array of `dtype`."""
    rows = data.shape[0]
    bs = check_k(K, format)
    codes = np.empty((rows, K), dtype=np.uint8)
    codes[:, 0::2] = data & np.uint8(0xF)
    codes[:, 1::2] = data >> np.uint8(4)
    q = codes.view(E2M1).astype(F32).reshape(rows, K // bs, bs)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if format == "nvfp4":
            sc = scales.view(E4M3).astype(F32) * F32(s_dec)
        else:
            sc = scales.view(E8M0).astype(F32)
        out = (q * sc.reshape(rows, K // bs)[..., None]).reshape(rows, K)
        return out.astype(dtype)


def dequantize_sum(datas: Sequence[np.ndarray], scaless: Sequence[np.ndarray], s_decs: Sequence, format: str,
                   K: int, dtype) -> np.ndarray:
    """The FP4 reduce-scatter's sum: acc = 0 (fp32); for c in order: acc += dequantize_2d(c, float32);
    then one rounding to `dtype`. datas[c] [rows, K/2], scaless[c] linear [rows, K/bs], s_decs[c] the
    S_dec (None for MXFP4). The fused GPU kernel (kernels.dequantize_sum) matches this bit for bit."""
    if not (len(datas) == len(scaless) == len(s_decs)):
        raise ValueError(f"dequantize_sum: {len(datas)} data, {len(scaless)} scale and {len(s_decs)} global-scale "
                         "arrays; expected one of each per contribution")
    rows = datas[0].shape[0] if len(datas) else 0
    acc = np.zeros((rows, K), dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):
        for d, s, g in zip(datas, scaless, s_decs):
            acc = acc + dequantize_2d(d, s, g, format, K, F32)
        return acc.astype(dtype)


def swizzle(scales: np.ndarray) -> np.ndarray:
    """Linear [rows, ncols] scales -> the flat swizzled layout (zero padded)."""
    rows, ncols = scales.shape
    if rows == 0:
        return np.zeros(0, dtype=np.uint8)
    pr, pc = swizzled_shape(rows, ncols)
    out = np.zeros(pr * pc, dtype=np.uint8)
    r, c = np.meshgrid(np.arange(rows), np.arange(ncols), indexing="ij")
    out[swizzle_offset(r, c, ncols)] = scales
    return out


def unswizzle(flat: np.ndarray, rows: int, ncols: int) -> np.ndarray:
    """The flat swizzled layout -> linear [rows, ncols]."""
    if rows == 0:
        return np.zeros((0, ncols), dtype=np.uint8)
    r, c = np.meshgrid(np.arange(rows), np.arange(ncols), indexing="ij")
    return np.asarray(flat).reshape(-1)[swizzle_offset(r, c, ncols)]


# ------------------------------------------------------------------------------ packed form
def quantize_packed(x2d: np.ndarray, buf: np.ndarray, segments: Sequence[Tuple[int, int, int]], format: str,
                    amax_value=None, rounding: str = "nearest", seed: Optional[int] = None) -> None:
    """Quantize row ranges of x2d [rows, K] into the uint8 buffer `buf`: segment (row_start, row_count,
    byte_offset) gets packed_layout(row_count, K, format) at byte_offset. The global scale (NVFP4)
    comes from `amax_value`, or from the amax of the whole x2d."""
    K = x2d.shape[1]
    if format == "nvfp4" and amax_value is None:
        amax_value = amax(x2d)
    for r0, n, off in segments:
        lay = packed_layout(n, K, format)
        data, scales, s_dec = quantize_2d(x2d[r0:r0 + n], format, amax_value, rounding, seed, index_base=r0 * K)
        buf[off:off + data.size] = data.reshape(-1)
        buf[off + lay.scale_off:off + lay.scale_off + scales.size] = scales.reshape(-1)
        if format == "nvfp4":
            if s_dec is None:
                s_dec = global_scales(amax_value)[1]
            buf[off + lay.gs_off:off + lay.gs_off + 4] = np.array([s_dec], dtype=F32).view(np.uint8)


def read_packed(buf: np.ndarray, row_count: int, K: int, format: str, byte_offset: int):
    """(data [n, K/2], scales [n, K/bs], S_dec or None) views of one packed segment."""
    bs = check_k(K, format)
    lay = packed_layout(row_count, K, format)
    o = byte_offset
    data = buf[o:o + row_count * K // 2].reshape(row_count, K // 2)
    scales = buf[o + lay.scale_off:o + lay.scale_off + row_count * K // bs].reshape(row_count, K // bs)
    s_dec = buf[o + lay.gs_off:o + lay.gs_off + 4].view(F32)[0] if format == "nvfp4" else None
    return data, scales, s_dec


def dequantize_packed(buf: np.ndarray, segments: Sequence[Tuple[int, int, int]], K: int, format: str,
                      out2d: np.ndarray) -> np.ndarray:
    """Decode packed segments (row_start_in_out, row_count, byte_offset) into rows of out2d [R, K]."""
    for r0, n, off in segments:
        data, scales, s_dec = read_packed(buf, n, K, format, off)
        out2d[r0:r0 + n] = dequantize_2d(data, scales, s_dec, format, K, out2d.dtype)
    return out2d


__all__ = ["amax", "global_scales", "sr_bits", "quantize_2d", "dequantize_2d", "dequantize_sum", "swizzle", "unswizzle",
           "quantize_packed", "read_packed", "dequantize_packed", "BLOCK_SIZE", "E2M1_GRID"]
