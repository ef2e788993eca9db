"""The numpy reference codec against hand-checked values, and the kernels' bit tricks (ported to numpy)
against ml_dtypes, so a wrong trick in csrc/fp4.cu shows up on a machine without a GPU."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fp4ccl.formats import packed_layout, reference as ref, swizzle_offset
from fp4ccl.formats.reference import E2M1_GRID

F32 = np.float32
E2M1 = ml_dtypes.float4_e2m1fn
E4M3 = ml_dtypes.float8_e4m3fn
U32 = np.uint32


def q_nv(x, amax=None, rounding="nearest", seed=None):
    return ref.quantize_2d(np.asarray(x, dtype=F32).reshape(1, -1), "nvfp4", amax, rounding, seed)


def q_mx(x, rounding="nearest", seed=None):
    return ref.quantize_2d(np.asarray(x, dtype=F32).reshape(1, -1), "mxfp4", None, rounding, seed)


def nibbles(data):
    d = np.asarray(data).reshape(-1)
    out = np.empty(d.size * 2, dtype=np.uint8)
    out[0::2], out[1::2] = d & 0xF, d >> 4
    return out


# ------------------------------------------------------------------------------ E2M1 values and ties
# With amax = 448 * 6 (S_enc = 1) and a block whose max is 6, the block scale is exactly 1 and
# enc == 1, so the elements are rounded as given.
TIES = [(0.25, 0x0), (0.75, 0x2), (1.25, 0x2), (1.75, 0x4), (2.5, 0x4), (3.5, 0x6), (5.0, 0x6)]


@pytest.mark.parametrize("value,code", TIES)
def test_every_e2m1_tie_rounds_half_even(value, code):
    for sign, sbit in ((1, 0), (-1, 8)):
        blk = np.zeros(16, F32)
        blk[0], blk[1] = 6.0, sign * value
        data, scales, s_dec = q_nv(blk, amax=2688.0)
        assert scales[0, 0] == 0x38 and s_dec == 1.0          # E4M3 1.0
        assert nibbles(data)[1] == code | sbit, (value, sign)
        data, scales, _ = q_mx(np.concatenate([blk, np.zeros(16, F32)]))
        assert scales[0, 0] == 127                            # 2^0
        assert nibbles(data)[1] == code | sbit


def test_exact_values_and_nibble_order():
    vals = np.array([0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6, 0], F32)
    data, scales, _ = q_nv(vals, amax=2688.0)
    assert list(nibbles(data)) == [1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15, 0]
    assert data[0, 0] == 0x21 and data[0, 3] == 0x07         # element 2j in the low nibble
    back = ref.dequantize_2d(data, scales, 1.0, "nvfp4", 16, np.float32)
    np.testing.assert_array_equal(back.reshape(-1), vals)


def test_off_tie_values_round_to_nearest():
    blk = np.zeros(16, F32)
    blk[0] = 6.0
    blk[1:8] = [np.nextafter(F32(0.25), F32(1)), np.nextafter(F32(0.75), F32(0)), 1.3, 1.7, 2.6, 3.4, 5.01]
    data, _, _ = q_nv(blk, amax=2688.0)
    assert list(nibbles(data)[1:8]) == [1, 1, 3, 3, 5, 5, 7]


# ------------------------------------------------------------------------------ scales
def test_e4m3_scale_saturates_at_448():
    x = np.full(16, 100.0, F32)
    data, scales, s_dec = q_nv(x, amax=1.0)                   # S_enc = 2688: s = 100 * 448 >> 448
    assert scales[0, 0] == 0x7E                               # 448, never NaN
    assert s_dec == F32(1) / F32(2688)
    assert (nibbles(data) == 7).all()                         # clamped to 6


def test_nvfp4_global_scale_and_block_scale_arithmetic():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(64).astype(F32) * 3
    data, scales, s_dec = q_nv(x)
    amax = np.abs(x).max()
    s_enc = F32(2688) / F32(amax)
    assert s_dec == F32(1) / s_enc
    bamax = np.abs(x.reshape(4, 16)).max(1)
    expect = np.minimum(bamax * (s_enc * (F32(1) / F32(6))), F32(448)).astype(E4M3).view(np.uint8)
    np.testing.assert_array_equal(scales[0], expect)


def test_zero_blocks_and_zero_tensor():
    x = np.zeros(32, F32)
    x[16:] = np.linspace(-1, 1, 16)
    data, scales, s_dec = q_nv(x)
    assert scales[0, 0] == 0 and (data[0, :8] == 0).all()
    d2, s2, g2 = q_nv(np.zeros(16, F32))
    assert g2 == 1.0 and s2[0, 0] == 0 and (d2 == 0).all()
    d3, s3, _ = q_mx(np.zeros(32, F32))
    assert s3[0, 0] == 0 and (d3 == 0).all()
    assert (ref.dequantize_2d(d2, s2, g2, "nvfp4", 16, np.float32) == 0).all()


@pytest.mark.parametrize("bamax,stored", [(6.0, 127), (4.0, 127), (7.99, 127), (8.0, 128), (1.0, 125), (0.75, 124),
                                          (2.0 ** -130, 0), (1e-45, 0), (2.0 ** -125, 0), (2.0 ** -124, 1),
                                          (float(np.finfo(np.float32).max), 252), (0.0, 0)])
def test_mxfp4_exponent_extraction(bamax, stored):
    x = np.zeros(32, F32)
    x[5] = bamax
    _, scales, _ = q_mx(x)
    assert scales[0, 0] == stored


def test_nan_and_inf_blocks_are_isolated():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 64)).astype(F32)
    for bad in (np.nan, np.inf, -np.inf):
        for fmt, bs, nan_scale in (("nvfp4", 16, 0x7F), ("mxfp4", 32, 0xFF)):
            y = x.copy()
            y[1, 3] = bad
            z = x.copy()
            z[1, :bs] = 0
            dy, sy, gy = ref.quantize_2d(y, fmt)
            dz, sz, gz = ref.quantize_2d(z, fmt)
            assert sy[1, 0] == nan_scale and (dy[1, :bs // 2] == 0).all()
            sy[1, 0], sz[1, 0] = 0, 0
            np.testing.assert_array_equal(dy, dz)             # other blocks and the global scale unchanged
            np.testing.assert_array_equal(sy, sz)
            assert gy == gz
            sy[1, 0] = nan_scale
            out = ref.dequantize_2d(dy, sy, gy, fmt, 64, np.float32)
            assert np.isnan(out[1, :bs]).all() and np.isfinite(np.delete(out.reshape(-1), np.s_[64:64 + bs])).all()
    assert ref.amax(np.array([np.nan, -np.inf, 3.0, -5.0], F32)) == 5.0


def test_subnormal_inputs():
    sub = np.array([1e-45, -3e-44, 1e-40, 0, 2e-39, -1e-39, 5e-41, 7e-42] * 2, F32)
    data, scales, s_dec = q_nv(sub)
    assert np.isfinite(s_dec) and s_dec > 0
    back = ref.dequantize_2d(data, scales, s_dec, "nvfp4", 16, np.float32).reshape(-1)
    assert np.isfinite(back).all()
    assert (np.sign(back) * np.sign(sub) >= 0).all()
    d, s, _ = q_mx(np.concatenate([sub, sub]))
    assert s[0, 0] == 0
    for dt in (np.float16, ml_dtypes.bfloat16):                # subnormals of the narrow input types
        tiny = np.array([ml_dtypes.finfo(dt).smallest_subnormal] * 16, dtype=dt)
        d, s, g = ref.quantize_2d(tiny.reshape(1, 16), "nvfp4")
        back = ref.dequantize_2d(d, s, g, "nvfp4", 16, np.float32)
        assert np.allclose(back, tiny.astype(F32), rtol=0.07)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("log_range", [(-30, -20), (-3, 3), (20, 30), (-33, 33)])
def test_round_trip_error_bound(rng, fmt, log_range):
    rows, K = 64, 256
    bs = ref.BLOCK_SIZE[fmt]
    # one magnitude per tensor, rows spread over 1.5 decades: NVFP4's E4M3 block scales under a single
    # global scale cover a limited range (448 down to 2^-9), the format's documented limit
    mag = 10.0 ** rng.uniform(*log_range) * 10.0 ** rng.uniform(-1.5, 0, size=(rows, 1))
    x = (rng.standard_normal((rows, K)) * mag).astype(F32)
    data, scales, s_dec = ref.quantize_2d(x, fmt)
    back = ref.dequantize_2d(data, scales, s_dec, fmt, K, np.float32)
    err = np.abs(back - x).reshape(rows, K // bs, bs).max(-1)
    bamax = np.abs(x).reshape(rows, K // bs, bs).max(-1)
    # half an E2M1 step at the top (1 of 6) plus the block scale's own rounding; MX scales round up to
    # a power of two, so its top step is relative to 2^(e+2) <= 4 * bamax / 4.
    bound = bamax * (0.3 if fmt == "mxfp4" else 0.2)
    assert (err <= bound).all(), float((err / bamax).max())
    rel = np.linalg.norm((back - x).astype(np.float64)) / np.linalg.norm(x.astype(np.float64))
    assert rel < (0.2 if fmt == "mxfp4" else 0.12), rel


# ------------------------------------------------------------------------------ layouts
def test_swizzle_positions_by_hand():
    assert swizzle_offset(0, 0, 4) == 0
    assert swizzle_offset(0, 3, 4) == 3
    assert swizzle_offset(1, 0, 4) == 16
    assert swizzle_offset(31, 2, 4) == 31 * 16 + 2
    assert swizzle_offset(32, 0, 4) == 4
    assert swizzle_offset(97, 1, 4) == 16 + 3 * 4 + 1
    assert swizzle_offset(0, 4, 8) == 512                   # next column tile
    assert swizzle_offset(128, 0, 8) == 2 * 512             # next row tile (2 column tiles per row tile)
    assert swizzle_offset(128, 0, 5) == 2 * 512             # 5 columns pad to 8


def test_swizzle_round_trip_and_zero_padding(rng):
    for rows, ncols in ((1, 1), (7, 3), (130, 5), (256, 8)):
        s = rng.integers(1, 256, size=(rows, ncols), dtype=np.uint8)
        flat = ref.swizzle(s)
        assert flat.size == -(-rows // 128) * 128 * (-(-ncols // 4) * 4)
        assert (flat != 0).sum() == rows * ncols             # every pad byte is zero
        np.testing.assert_array_equal(ref.unswizzle(flat, rows, ncols), s)


def test_packed_layout_values():
    assert packed_layout(0, 16, "nvfp4") == (0, 0, 0, 16)
    assert packed_layout(1, 16, "nvfp4") == (0, 16, 32, 48)
    assert packed_layout(3, 64, "nvfp4") == (0, 96, 112, 128)  # 96 data, 12 scales -> 112, gs -> 128
    assert packed_layout(3, 64, "mxfp4") == (0, 96, 112, 112)
    assert packed_layout(0, 32, "mxfp4").total_bytes == 0
    for rows in range(0, 40, 3):
        for K in (16, 48, 4096):
            lay = packed_layout(rows, K, "nvfp4")
            assert lay.scale_off % 16 == 0 and lay.gs_off % 16 == 0 and lay.total_bytes % 16 == 0
            assert lay.scale_off >= rows * K // 2 and lay.gs_off >= lay.scale_off + rows * K // 16


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_packed_round_trip_matches_plain(rng, fmt):
    K = 96 if fmt == "mxfp4" else 48
    x = rng.standard_normal((20, K)).astype(F32)
    segs, off = [], 0
    for r0, n in ((0, 5), (5, 0), (5, 11), (16, 4)):
        segs.append((r0, n, off))
        off += packed_layout(n, K, fmt).total_bytes
    buf = np.full(off, 0xAB, dtype=np.uint8)
    ref.quantize_packed(x, buf, segs, fmt)
    data, scales, s_dec = ref.quantize_2d(x, fmt)
    for r0, n, o in segs:
        d, s, g = ref.read_packed(buf, n, K, fmt, o)
        np.testing.assert_array_equal(d, data[r0:r0 + n])
        np.testing.assert_array_equal(s, scales[r0:r0 + n])
        if fmt == "nvfp4":
            assert g == s_dec
    out = np.full((20, K), np.nan, F32)
    ref.dequantize_packed(buf, segs, K, fmt, out)
    np.testing.assert_array_equal(out, ref.dequantize_2d(data, scales, s_dec, fmt, K, F32))


# ------------------------------------------------------------------------------ stochastic rounding
def test_stochastic_rounding_is_replayable(rng, seed):
    x = rng.standard_normal((8, 64)).astype(F32)
    a = ref.quantize_2d(x, "nvfp4", None, "stochastic", seed)
    b = ref.quantize_2d(x, "nvfp4", None, "stochastic", seed)
    c = ref.quantize_2d(x, "nvfp4", None, "stochastic", seed + 1)
    np.testing.assert_array_equal(a[0], b[0])
    assert (a[0] != c[0]).any()
    np.testing.assert_array_equal(a[1], c[1])                 # scales do not depend on the draw
    # a row range draws like the same rows of the whole tensor
    part = ref.quantize_2d(x[3:6], "nvfp4", ref.amax(x), "stochastic", seed, index_base=3 * 64)
    np.testing.assert_array_equal(part[0], a[0][3:6])


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_stochastic_rounding_is_unbiased(rng, fmt):
    bs = ref.BLOCK_SIZE[fmt]
    x = rng.uniform(-5.5, 5.5, size=(1, 4 * bs)).astype(F32)
    x[0, ::bs] = 6.0                                          # fixes every block's scale
    amax = 2688.0
    n = 3000
    acc = np.zeros(x.shape, np.float64)
    for s in range(n):
        d, sc, g = ref.quantize_2d(x, fmt, amax, "stochastic", s * 7919 + 1)
        acc += ref.dequantize_2d(d, sc, g, fmt, x.shape[1], F32)
    mean_err = acc / n - x
    # per element the draw's std is <= step/2 = 1: the mean of n draws is within 5/sqrt(n) nearly surely
    assert np.abs(mean_err).max() < 5 / np.sqrt(n), np.abs(mean_err).max()
    rn = ref.dequantize_2d(*ref.quantize_2d(x, fmt, amax), fmt, x.shape[1], F32)
    assert np.abs(rn - x).mean() > 10 * np.abs(mean_err).mean()  # nearest rounding is biased per element


def test_sr_bits_are_uniform_and_seeded():
    idx = np.arange(1 << 16, dtype=np.uint64)
    a, b = ref.sr_bits(1, idx), ref.sr_bits(2, idx)
    assert (a != b).mean() > 0.99
    top = a >> 28
    counts = np.bincount(top, minlength=16)
    assert counts.min() > 0.9 * (len(idx) / 16)
    assert ref.sr_bits(5, np.array([2**40 + 3], np.uint64))[0] != ref.sr_bits(5, np.array([3], np.uint64))[0]


# ------------------------------------------------------------------------------ the kernels' tricks in numpy
def e2m1_rne_like_kernel(v):
    u = v.view(U32)
    cn = (u - U32(0x3F000000) + U32(0x1FFFFF) + ((u >> U32(22)) & U32(1))) >> U32(22)
    cs = (v * F32(2) + F32(8388608.0)).view(U32) - U32(0x4B000000)   # 2v is exact: same as fmaf
    return np.where(v < 1, cs, cn)


def e4m3_rne_like_kernel(s):
    u = s.view(U32)
    sub = (s * F32(512) + F32(8388608.0)).view(U32) - U32(0x4B000000)
    norm = ((u + U32(0x7FFFF) + ((u >> U32(20)) & U32(1))) >> U32(20)) - U32(120 << 3)
    return np.where(s < F32(0.015625), sub, norm)


def e4m3_to_f32_like_kernel(code):
    code = code.astype(U32)
    norm = ((code << U32(20)) + U32(120 << 23)).view(F32)
    return np.where(code >= 8, norm, code.astype(F32) * F32(2.0 ** -9))


def _sample_bits(lo_bits, hi_bits, rng, n=2_000_000):
    every = np.arange(lo_bits, hi_bits + 1, 997, dtype=np.uint64).astype(U32)
    rand = rng.integers(lo_bits, hi_bits + 1, size=n, dtype=np.uint64).astype(U32)
    return np.concatenate([every, rand]).view(F32)


def test_kernel_e2m1_trick_matches_ml_dtypes(rng):
    v = _sample_bits(0, 0x40C00000, rng)                      # every 997th fp32 in [0, 6] plus random ones
    edges = np.concatenate([[F32(t) for t in E2M1_GRID], [F32(t) for t, _ in TIES]]).astype(F32)
    near = np.concatenate([edges, np.nextafter(edges, F32(0)), np.nextafter(edges, F32(7))])
    v = np.concatenate([v, np.clip(near, 0, 6).astype(F32), np.array([0, 1e-45, 6], F32)])
    np.testing.assert_array_equal(e2m1_rne_like_kernel(v), v.astype(E2M1).view(np.uint8) & 7)


def test_kernel_e4m3_trick_matches_ml_dtypes(rng):
    s = _sample_bits(0, 0x43E00000, rng)                      # [0, 448]
    np.testing.assert_array_equal(e4m3_rne_like_kernel(s), s.astype(E4M3).view(np.uint8))
    codes = np.arange(0x7F, dtype=np.uint8)
    np.testing.assert_array_equal(e4m3_to_f32_like_kernel(codes), codes.view(E4M3).astype(F32))


def test_kernel_mx_scale_trick_matches_frexp(rng):
    b = _sample_bits(0, 0x7F7FFFFF, rng, n=200_000)
    e = b.view(U32) >> U32(23)
    stored = np.where(e > 2, e - 2, 0)
    for i in range(0, b.size, 50_000):
        chunk = b[i:i + 50_000]
        x = np.zeros((chunk.size, 32), F32)
        x[:, 0] = chunk
        _, scales, _ = ref.quantize_2d(x, "mxfp4")
        np.testing.assert_array_equal(scales[:, 0], stored[i:i + 50_000])
    # 2^-e as the kernel builds it equals 1 / 2^e from ml_dtypes for every stored value
    st = np.arange(253, dtype=U32)                            # stored values the quantizer can produce
    mult = ((U32(254) - st) << U32(23)).view(F32)
    np.testing.assert_array_equal(mult, F32(1) / st.astype(np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(F32))


def test_kernel_sr_trick_matches_reference(rng, seed):
    v = np.concatenate([rng.uniform(0, 6, 100_000).astype(F32), E2M1_GRID, np.array([6, 0.5, 0.25], F32)])
    rnd = ref.sr_bits(seed, np.arange(v.size, dtype=np.uint64))
    # the kernel's e2m1_sr, operation for operation
    u = v.view(U32)
    lo_code = np.where(v < 1, (v >= 0.5).astype(U32), (u - U32(0x3F000000)) >> U32(22))
    lo = np.where(v < 1, lo_code.astype(F32) * F32(0.5), ((lo_code << U32(22)) + U32(0x3F000000)).view(F32))
    inv = np.select([lo_code < 4, lo_code < 6, lo_code < 7], [F32(2), F32(1), F32(0.5)], F32(0)).astype(F32)
    frac = ((v - lo) * inv).astype(F32)
    ur = (rnd >> U32(8)).astype(F32) * F32(2.0 ** -24)
    kernel = lo_code + (ur < frac)
    reference = ref._e2m1_codes(v, "stochastic", seed, np.arange(v.size, dtype=np.uint64)) & 7
    np.testing.assert_array_equal(kernel, reference)


def e2m1_min3_like_kernel(y):
    """csrc/fp4.cu e2m1_rn_bits: the smallest of three one-rounding candidates (2v, v + 2, v/2 + 4 on a
    2^23 grid), bits 0x4B000000 + code. v * 2 and v * 0.5 are exact for v >= 2^-125, so the numpy form
    rounds once like fmaf."""
    v = np.minimum(np.abs(y), F32(6))
    m = F32(8388608.0)
    a = v * F32(2) + m
    b = v + F32(8388610.0)
    c = v * F32(0.5) + F32(8388612.0)
    return np.minimum(np.minimum(a, b), c).astype(F32).view(U32)


def test_kernel_min3_e2m1_trick_matches_ml_dtypes(rng):
    # every fp32 in [0, 6] and +Inf were also checked against the integer trick above, exhaustively,
    # by a host C++ build of both functions (2^31 inputs, 0 mismatches) when the trick was introduced
    v = _sample_bits(0x02000000, 0x7F800000, rng)             # >= 2^-123 up to +Inf (the clamp)
    edges = np.concatenate([[F32(t) for t in E2M1_GRID], [F32(t) for t, _ in TIES]]).astype(F32)
    near = np.concatenate([edges, np.nextafter(edges, F32(0)), np.nextafter(edges, F32(7))])
    v = np.concatenate([v, np.clip(near, 0, 6).astype(F32), np.array([0, 6, 6.5, 7, 1e30], F32)])
    want = np.clip(v, 0, 6).astype(E2M1).view(np.uint8) & 7
    np.testing.assert_array_equal(e2m1_min3_like_kernel(v) - U32(0x4B000000), want)
    np.testing.assert_array_equal(e2m1_min3_like_kernel(-v) - U32(0x4B000000), want)


def _prmt(a, b, sel):
    """PTX prmt.b32 default mode: byte k of the result is byte (sel >> 4k) & 7 of {b:a}, or that byte's
    sign bit replicated when (sel >> 4k) & 8."""
    src = (int(b) << 32) | int(a)
    out = 0
    for k in range(4):
        s = (sel >> (4 * k)) & 0xF
        byte = (src >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def test_kernel_nibble_packing_with_signs(rng):
    """e2m1_rn_pack<8> + sign_nibbles (csrc/fp4.cu) build the same word as quantize_2d for 8 elements of
    bf16 and fp32 input: multiply-add packing less 0xFB000000, signs by prmt sign-replication."""
    for trial in range(300):
        x = (rng.standard_normal(8) * 2.0 ** rng.integers(-3, 3)).astype(F32)
        x[rng.random(8) < 0.2] = F32(-0.0)
        for kind in ("bf16", "f32"):
            xs = x.astype(ml_dtypes.bfloat16) if kind == "bf16" else x
            y = xs.astype(F32)                                # mult = 1: y = x
            acc = 0
            for i, bits in enumerate(e2m1_min3_like_kernel(y)):
                acc = (acc + int(bits) * 16 ** i) % 2**32
            mag = (acc - 0xFB000000) % 2**32
            if kind == "bf16":
                w = xs.view(np.uint16).astype(np.uint64)
                words = [int(w[2 * k] | (w[2 * k + 1] << np.uint64(16))) for k in range(4)]
                s, t = _prmt(words[0], words[1], 0xFDB9), _prmt(words[2], words[3], 0xFDB9)
            else:
                w = [int(b) for b in xs.view(U32)]
                s = _prmt(_prmt(w[0], w[1], 0x00FB), _prmt(w[2], w[3], 0x00FB), 0x5410)
                t = _prmt(_prmt(w[4], w[5], 0x00FB), _prmt(w[6], w[7], 0x00FB), 0x5410)
            sign = (_prmt(s, t, 0x6420) & 0x08080808) | (_prmt(s, t, 0x7531) & 0x80808080)
            word = mag | sign
            codes = np.clip(y, -6, 6).astype(E2M1).view(np.uint8) & 0xF
            want = sum(int(c) << (4 * i) for i, c in enumerate(codes))
            assert word == want, (kind, x, hex(word), hex(want))


# ------------------------------------------------------------------------------ dequantize and sum
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_dequantize_sum_is_the_ordered_fp32_sum(rng, fmt):
    K, rows, n = 64, 5, 6
    parts = [ref.quantize_2d((rng.standard_normal((rows, K)) * 10.0 ** rng.uniform(-3, 3)).astype(F32), fmt)
             for _ in range(n)]
    datas, scales, gss = zip(*parts)
    got = ref.dequantize_sum(datas, scales, gss, fmt, K, F32)
    acc = np.zeros((rows, K), F32)
    for d, s, g in parts:
        acc = (acc + ref.dequantize_2d(d, s, g, fmt, K, F32)).astype(F32)
    np.testing.assert_array_equal(got.view(U32), acc.view(U32))
    bf = ref.dequantize_sum(datas, scales, gss, fmt, K, ml_dtypes.bfloat16)
    np.testing.assert_array_equal(bf.view(np.uint16), acc.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert not ref.dequantize_sum([], [], [], fmt, K, F32).size
    # the order is part of the definition: fp32 addition is not associative
    big = np.zeros((1, K), F32)
    big[0, 0] = 1e8
    small = np.zeros((1, K), F32)
    small[0, 0] = 3.0
    q = [ref.quantize_2d(v, "nvfp4") for v in (big, small, -big)]
    d, s, g = zip(*q)
    assert ref.dequantize_sum(d, s, g, "nvfp4", K, F32)[0, 0] == 0.0
    d, s, g = zip(*[q[0], q[2], q[1]])
    assert ref.dequantize_sum(d, s, g, "nvfp4", K, F32)[0, 0] == 3.0
    with pytest.raises(ValueError, match="one of each"):
        ref.dequantize_sum(d, s[:2], g, "nvfp4", K, F32)
