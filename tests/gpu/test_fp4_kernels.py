"""The CUDA kernels of csrc/fp4.cu against the numpy reference, bit for bit, on torch and CuPy inputs.

Skipped (with the reason) where no GPU is visible. Every check compares bytes: data, scales, global
scale, and the dequantized values (NaN positions equal, every other bit equal).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from conftest import need_gpus

import fp4ccl
from fp4ccl.formats import dequantize_packed, packed_layout, quantize_packed, reference as ref, unpack_packed

F32 = np.float32
NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


@pytest.fixture(autouse=True)
def _gpu():
    need_gpus(1)


# ------------------------------------------------------------------------------ helpers
def to_device(x: np.ndarray, framework: str):
    if framework == "torch":
        import torch
        if x.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16).cuda()
        return torch.from_numpy(x.copy()).cuda()
    import cupy
    return cupy.asarray(x)


def to_host(a) -> np.ndarray:
    if a is None:
        return None
    if type(a).__module__.startswith("torch"):
        import torch
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            return a.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return a.numpy()
    import cupy
    return cupy.asnumpy(a)


def sync():
    import cupy
    cupy.cuda.runtime.deviceSynchronize()


def make_input(rng, rows: int, K: int, dtype: str, kind: str) -> np.ndarray:
    npdt = NP_DTYPES[dtype]
    fin = ml_dtypes.finfo(npdt)
    x = rng.standard_normal((rows, K)) * 10.0 ** rng.uniform(-2, 2, size=(rows, 1))
    if kind == "adversarial" and rows:
        nb = K // 16
        ties = rng.choice([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 3.0], size=(rows, K))
        ties = ties * rng.choice([-1.0, 1.0], size=(rows, K)) * np.repeat(2.0 ** rng.integers(-6, 6, size=(rows, nb)), 16, 1)
        cat = np.repeat(rng.integers(0, 8, size=(rows, nb)), 16, axis=1)
        x = np.where(cat == 1, ties, x)
        x = np.where(cat == 2, 0.0, x)
        x = np.where(cat == 3, rng.integers(-3, 4, size=(rows, K)) * float(fin.smallest_subnormal), x)
        x = np.where(cat == 4, rng.uniform(-1, 1, size=(rows, K)) * float(fin.max) / 2, x)
        x = np.where(cat == 5, rng.uniform(-1, 1, size=(rows, K)) * float(fin.tiny) * 4, x)
        special = (cat == 6) & (rng.random((rows, K)) < 0.1)
        x = np.where(special, rng.choice([np.nan, np.inf, -np.inf], size=(rows, K)), x)
    with np.errstate(over="ignore"):
        return x.astype(npdt)


def assert_same_float_bits(got: np.ndarray, want: np.ndarray):
    assert got.shape == want.shape
    gn, wn = np.isnan(got.astype(F32)), np.isnan(want.astype(F32))
    np.testing.assert_array_equal(gn, wn)
    ui = {1: np.uint8, 2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
    g, w = got.view(ui)[~gn], want.astype(got.dtype).view(ui)[~wn]
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, f"{bad.size} values differ, first at {bad[:5]}: {g[bad[:5]]} vs {w[bad[:5]]}"


def check_against_reference(q, xh: np.ndarray, fmt: str, layout: str, amax=None, rounding="nearest", seed=None):
    rows = int(np.prod(xh.shape[:-1]))
    K = xh.shape[-1]
    d, s, g = ref.quantize_2d(xh.reshape(rows, K), fmt, amax, rounding, seed)
    np.testing.assert_array_equal(to_host(q.data).reshape(rows, K // 2), d)
    sc = to_host(q.scales)
    if layout == "linear":
        np.testing.assert_array_equal(sc.reshape(rows, K // ref.BLOCK_SIZE[fmt]), s)
    else:
        np.testing.assert_array_equal(sc, ref.swizzle(s))
    if fmt == "nvfp4":
        assert to_host(q.global_scale).reshape(-1).view(np.uint32)[0] == np.array([g], F32).view(np.uint32)[0]
    return d, s, g


NV_SHAPES = [(0, 16), (1, 16), (1, 8192), (7, 48), (7, 4080), (1000, 144)]
MX_SHAPES = [(0, 32), (1, 32), (1, 8192), (7, 96), (7, 4064), (1000, 160)]
CASES = [(fw, dt) for fw in ("torch", "cupy") for dt in ("bfloat16", "float16", "float32") if (fw, dt) != ("cupy", "bfloat16")]


# ------------------------------------------------------------------------------ bit-exact sweeps
@pytest.mark.parametrize("kind", ["random", "adversarial"])
@pytest.mark.parametrize("framework,dtype", CASES)
@pytest.mark.parametrize("layout", ["linear", "swizzled"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_quantize_dequantize_bit_exact(rng, fmt, layout, framework, dtype, kind):
    shapes = NV_SHAPES if fmt == "nvfp4" else MX_SHAPES
    if framework == "torch" and dtype == "bfloat16":
        shapes = shapes + [(1000, 8192)]
    for rows, K in shapes:
        xh = make_input(rng, rows, K, dtype, kind)
        x = to_device(xh, framework)
        q = fp4ccl.quantize(x, fmt, scale_layout=layout)
        assert type(q.data).__module__.split(".")[0] == framework
        d, s, g = check_against_reference(q, xh, fmt, layout)
        for out_dt in ("bfloat16", "float16", "float32"):
            y = to_host(q.dequantize(out_dt))
            if framework == "cupy" and out_dt == "bfloat16":
                y = y.view(ml_dtypes.bfloat16)
            want = ref.dequantize_2d(d, s, g, fmt, K, NP_DTYPES[out_dt])
            assert_same_float_bits(y.reshape(rows, K), want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_nvfp4_amax_below_the_data_crosses_the_clamp_shortcut(rng, dtype):
    """The NVFP4 kernel skips the per-element clamp to 6 when a block's max maps below 7; an amax under
    the data's pushes blocks to either side of 7 (and mixes both in one warp): still bit-exact."""
    xh = make_input(rng, 64, 512, dtype, "random")
    x = to_device(xh, "torch")
    true = float(ref.amax(xh))
    for k in (1.0, 1.04, 1.08, 1.12, 1.17, 1.25, 1.5, 3.0):
        q = fp4ccl.quantize(x, "nvfp4", amax=true / k)
        check_against_reference(q, xh, "nvfp4", "linear", amax=np.float32(true / k))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_amax_given_as_float_and_device_scalar(rng, fmt, dtype):
    import torch
    xh = make_input(rng, 33, 256, dtype, "adversarial")
    x = to_device(xh, "torch")
    for amax in (3.25, torch.tensor(3.25, device="cuda"), torch.tensor([3.25], device="cuda", dtype=torch.float64)):
        q = fp4ccl.quantize(x, fmt, amax=amax, scale_layout="swizzled")
        check_against_reference(q, xh, fmt, "swizzled", amax=3.25)
    q = fp4ccl.quantize(x, fmt, amax=0.0)
    check_against_reference(q, xh, fmt, "linear", amax=0.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_tensor_amax(rng, dtype):
    for rows, K in ((1, 16), (1000, 4096), (3, 48)):
        xh = make_input(rng, rows, K, dtype, "adversarial")
        a = fp4ccl.formats.amax(to_device(xh, "torch"))
        assert a.shape == () and to_host(a) == ref.amax(xh)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_amax_partials_cover_x_and_write_nothing_else(rng, dtype):
    """The per-block maxima fp4ccl.quantize reads instead of a zeroed word: their max is the tensor
    amax, each is finite and >= 0, and nothing past the count is written."""
    import torch
    from fp4ccl.formats import kernels
    for rows, K in ((1, 16), (3, 48), (1000, 4096), (4096, 4096)):
        xh = make_input(rng, rows, K, dtype, "adversarial")
        x = to_device(xh, "torch")
        n = kernels.amax_partials_count(x.device.index, dtype, x.numel())
        assert n >= 1
        out = torch.full((n + 8,), float("nan"), device=x.device)
        got = kernels.amax_partials(x.device.index, x.data_ptr(), dtype, x.numel(), out.data_ptr(),
                                    torch.cuda.current_stream().cuda_stream)
        assert got == n
        parts = out[:n].cpu().numpy()
        assert np.isfinite(parts).all() and (parts >= 0).all()
        assert np.float32(parts.max()) == ref.amax(xh), (rows, K)
        assert torch.isnan(out[n:]).all(), "amax_partials wrote past its count"
    assert kernels.amax_partials_count(0, dtype, 0) == 0


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("framework,dtype", CASES)
def test_stochastic_rounding_bit_exact_and_replayable(rng, seed, fmt, framework, dtype):
    for rows, K in ((7, 96), (300, 512)):
        xh = make_input(rng, rows, K, dtype, "random")
        x = to_device(xh, framework)
        q1 = fp4ccl.quantize(x, fmt, rounding="stochastic", seed=seed)
        q2 = fp4ccl.quantize(x, fmt, rounding="stochastic", seed=seed)
        check_against_reference(q1, xh, fmt, "linear", rounding="stochastic", seed=seed)
        np.testing.assert_array_equal(to_host(q1.data), to_host(q2.data))


def test_stochastic_rounding_unbiased_on_gpu(rng):
    import torch
    xh = rng.uniform(-5.5, 5.5, size=(1, 64)).astype(F32)
    xh[0, ::16] = 6.0
    x = to_device(xh, "torch")
    n = 4000
    acc = torch.zeros_like(x, dtype=torch.float64)
    for s in range(n):
        acc += fp4ccl.quantize(x, amax=2688.0, rounding="stochastic", seed=s + 1).dequantize("float32")
    err = to_host(acc / n) - xh
    assert np.abs(err).max() < 5 / np.sqrt(n)


def _seed_array(value: int, framework: str):
    """A one-element int64 array on the GPU holding the bits of the unsigned 64-bit value. The tests pass
    it as a temporary on purpose: the call holds the only reference, and must keep it until its kernels
    are enqueued (dropped earlier, its word went to the amax partials, which the kernel read as the seed)."""
    return to_device(np.array([value], np.uint64).view(np.int64), framework)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("framework,dtype", [("torch", "bfloat16"), ("cupy", "float32"), ("torch", "float16")])
def test_a_device_seed_gives_the_int_seeds_bytes(rng, seed, fmt, framework, dtype):
    """seed=<one-element int64 array on x's device>, read by the kernel when it runs, quantizes to the
    bytes of the same int seed: both scale layouts, the packed form, and an input large enough for the
    NVFP4 quantize to start as a programmatic dependent of the amax pass."""
    for rows, K in ((7, 96), (300, 512), (4096, 1024)):
        xh = make_input(rng, rows, K, dtype, "random")
        x = to_device(xh, framework)
        for value in (seed, 2**64 - 1 - seed):
            for layout in ("linear", "swizzled"):
                want = fp4ccl.quantize(x, fmt, scale_layout=layout, rounding="stochastic", seed=value)
                got = fp4ccl.quantize(x, fmt, scale_layout=layout, rounding="stochastic",
                                      seed=_seed_array(value, framework))
                for part in ("data", "scales", "global_scale"):
                    np.testing.assert_array_equal(to_host(getattr(got, part)), to_host(getattr(want, part)),
                                                  err_msg=f"{part} {rows}x{K} {layout} seed {value}")
            lay = packed_layout(rows, K, fmt)
            bufs = [to_device(np.zeros(lay.total_bytes, np.uint8), framework) for _ in range(2)]
            quantize_packed(x, bufs[0], [(0, rows, 0)], fmt, rounding="stochastic", seed=value)
            quantize_packed(x, bufs[1], [(0, rows, 0)], fmt, rounding="stochastic", seed=_seed_array(value, framework))
            np.testing.assert_array_equal(to_host(bufs[1]), to_host(bufs[0]), err_msg=f"packed {rows}x{K}")
    with pytest.raises(ValueError, match="must be on x's device"):
        fp4ccl.quantize(x, fmt, rounding="stochastic", seed=np.array([1], np.int64))
    with pytest.raises(ValueError, match="x is on the host"):
        fp4ccl.quantize(xh.astype(F32), fmt, rounding="stochastic", seed=_seed_array(1, framework))


def test_device_seed_dtypes_and_alignment(rng):
    """A torch uint64 seed on the GPU gives the int seed's bytes; a seed word that is not 8-byte aligned
    is refused (the kernel's 64-bit load of it would fault and end the context)."""
    import cupy
    import torch
    xh = make_input(rng, 16, 64, "float32", "random")
    x = to_device(xh, "torch")
    value = 2**63 + 12345
    want = fp4ccl.quantize(x, rounding="stochastic", seed=value)
    got = fp4ccl.quantize(x, rounding="stochastic", seed=torch.tensor(value, dtype=torch.uint64, device="cuda"))
    np.testing.assert_array_equal(to_host(got.data), to_host(want.data))
    raw = cupy.zeros(16, cupy.uint8)
    odd = cupy.ndarray((1,), cupy.int64, memptr=raw.data + 1)
    with pytest.raises(ValueError, match="8-byte aligned"):
        fp4ccl.quantize(to_device(xh, "cupy"), rounding="stochastic", seed=odd)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_a_device_seed_advanced_between_graph_replays(rng, seed, fmt):
    """Captured once with a seed tensor that the graph itself advances, every replay rounds with the next
    seed: replay k gives the bytes of seed + k, and the mean over replays is unbiased (a captured int seed
    would give every replay the same rounding)."""
    import torch
    xh = rng.uniform(-5.5, 5.5, size=(64, 64)).astype(F32)
    xh[:, ::16] = 6.0
    x = to_device(xh, "torch")
    seed_t = torch.tensor(seed, dtype=torch.int64, device="cuda")
    fp4ccl.quantize(x, fmt, amax=2688.0, rounding="stochastic", seed=seed_t)   # compiles before the capture
    torch.cuda.synchronize()
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        q = fp4ccl.quantize(x, fmt, amax=2688.0, rounding="stochastic", seed=seed_t)
        decoded = q.dequantize("float32")
        seed_t.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    n = 2000
    acc = torch.zeros_like(x, dtype=torch.float64)
    for k in range(n):
        graph.replay()
        if k < 3:
            torch.cuda.synchronize()
            want = fp4ccl.quantize(x, fmt, amax=2688.0, rounding="stochastic", seed=seed + k)
            np.testing.assert_array_equal(to_host(q.data), to_host(want.data), err_msg=f"replay {k}")
        acc += decoded
    torch.cuda.synchronize()
    assert int(seed_t) == seed + n
    err = to_host(acc / n) - xh
    assert np.abs(err).max() < 5 / np.sqrt(n), f"mean error {np.abs(err).max():.3g} over {n} replays"


# ------------------------------------------------------------------------------ packed forms
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("framework,dtype", [("torch", "bfloat16"), ("cupy", "float32"), ("torch", "float16")])
def test_packed_forms_bit_exact(rng, fmt, framework, dtype):
    K = 160 if fmt == "mxfp4" else 144
    counts = [5, 0, 17, 1, 0, 40, 3, 9, 2, 11]            # 10 segments: two launches of at most 8
    rows = sum(counts)
    xh = make_input(rng, rows, K, dtype, "adversarial")
    segs, off, r0 = [], 0, 0
    for n in counts:
        segs.append((r0, n, off))
        off += packed_layout(n, K, fmt).total_bytes + 16 * int(rng.integers(0, 3))
        r0 += n
    perm = rng.permutation(len(segs))                     # buffer order need not follow row order
    segs = [segs[i] for i in perm]
    host_buf = np.full(off, 0xCD, np.uint8)
    ref.quantize_packed(xh.reshape(rows, K), host_buf, segs, fmt)
    buf = to_device(host_buf.copy(), framework)
    buf[...] = 0xCD
    quantize_packed(to_device(xh, framework), buf, segs, fmt)
    np.testing.assert_array_equal(to_host(buf), host_buf)
    for out_dt in ("bfloat16", "float32"):
        store = "uint16" if (framework == "cupy" and out_dt == "bfloat16") else out_dt
        want = ref.dequantize_packed(host_buf, segs, K, fmt, np.zeros((rows, K), NP_DTYPES[out_dt]))
        if framework == "torch":
            import torch
            out = torch.full((rows, K), float("nan"), dtype=getattr(torch, out_dt), device="cuda")
        else:
            import cupy
            out = cupy.full((rows, K), 0xFFFF if store == "uint16" else np.nan, dtype=store)
        dequantize_packed(buf, segs, K, fmt, out)
        got = to_host(out)
        if store == "uint16":
            got = got.view(ml_dtypes.bfloat16)
        assert_same_float_bits(got, want)
    u = unpack_packed(buf, [(n, o) for _, n, o in segs], K, fmt)
    hu = unpack_packed(host_buf, [(n, o) for _, n, o in segs], K, fmt)
    np.testing.assert_array_equal(to_host(u.data), hu.data)
    np.testing.assert_array_equal(to_host(u.scales), hu.scales)
    if fmt == "nvfp4":
        assert to_host(u.global_scale) == hu.global_scale


def test_packed_with_shared_device_amax(rng):
    import torch
    xh = make_input(rng, 64, 256, "bfloat16", "random")
    x = to_device(xh, "torch")
    amax = torch.tensor(17.0, device="cuda")
    segs = [(0, 32, 0), (32, 32, packed_layout(32, 256, "nvfp4").total_bytes)]
    buf = torch.zeros(2 * packed_layout(32, 256, "nvfp4").total_bytes, dtype=torch.uint8, device="cuda")
    quantize_packed(x, buf, segs, amax=amax)
    host = np.zeros(buf.numel(), np.uint8)
    ref.quantize_packed(xh, host, segs, "nvfp4", 17.0)
    np.testing.assert_array_equal(to_host(buf), host)


# ------------------------------------------------------------------------------ streams and graphs
def test_runs_on_the_callers_stream_without_host_sync(rng):
    import time

    import torch
    xh = make_input(rng, 512, 1024, "bfloat16", "random")
    x = to_device(xh, "torch")
    later = to_device(make_input(rng, 512, 1024, "bfloat16", "random"), "torch")
    side = torch.cuda.Stream()
    fp4ccl.quantize(x).dequantize()                       # warm-up: JIT load and occupancy queries
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)                    # ~0.1 s of GPU time on the side stream only
        x.copy_(later)                                    # ordered after the sleep, on `side`
        t0 = time.perf_counter()
        q = fp4ccl.quantize(x)                            # the current stream is `side`
        y = q.dequantize()
        t1 = time.perf_counter()
    assert t1 - t0 < 0.05, "quantize/dequantize waited for the GPU"
    assert not side.query()
    side.synchronize()
    d, s, g = check_against_reference(q, to_host(later), "nvfp4", "linear")
    assert_same_float_bits(to_host(y), ref.dequantize_2d(d, s, g, "nvfp4", 1024, ml_dtypes.bfloat16))
    # stream= overrides the current stream
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(to_device(xh, "torch"))
    q2 = fp4ccl.quantize(x, "mxfp4", stream=side)
    side.synchronize()
    check_against_reference(q2, xh, "mxfp4", "linear")


def test_cupy_current_stream(rng):
    import cupy
    xh = make_input(rng, 64, 512, "float16", "random")
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        x = cupy.asarray(xh)
        q = fp4ccl.quantize(x, scale_layout="swizzled")
        y = q.dequantize("float32")
    s.synchronize()
    d, sc, g = check_against_reference(q, xh, "nvfp4", "swizzled")
    assert_same_float_bits(cupy.asnumpy(y), ref.dequantize_2d(d, sc, g, "nvfp4", 512, F32))


@pytest.mark.parametrize("amax_kind", ["float", "device", "computed"])
def test_cuda_graph_capture(rng, amax_kind):
    import torch
    xh = make_input(rng, 256, 2048, "bfloat16", "random")
    x = to_device(xh, "torch")
    amax = {"float": 11.0, "device": torch.tensor(11.0, device="cuda"), "computed": None}[amax_kind]
    out = fp4ccl.quantize(x, amax=amax)                   # warm-up: compiles and loads outside the capture
    y = out.dequantize("float32")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fp4ccl.quantize(x, amax=amax, out=out)
        fp4ccl.dequantize(out, "float32", out=y)
    for _ in range(2):
        xh = make_input(rng, 256, 2048, "bfloat16", "random")
        x.copy_(to_device(xh, "torch"))
        g.replay()
        torch.cuda.synchronize()
        d, s, gs = check_against_reference(out, xh, "nvfp4", "linear", amax=None if amax is None else 11.0)
        assert_same_float_bits(to_host(y), ref.dequantize_2d(d, s, gs, "nvfp4", 2048, F32))


@pytest.mark.parametrize("pdl", [True, False], ids=["pdl", "plain"])
def test_quantize_waits_for_the_amax_pass(rng, monkeypatch, pdl):
    """quantize may start as a programmatic dependent of the amax pass (sm_90+); it must still see every
    partial maximum. The pass walks x from its end, so the largest |x|, at element 0, is in the last
    share it finishes: a quantize that did not wait would read a stale partial and a wrong scale."""
    import torch
    from fp4ccl.formats import kernels
    if not pdl:
        monkeypatch.setattr(kernels, "_driver_ex", False)
    elif kernels.launch_mode() == "ctypes" and torch.cuda.get_device_capability()[0] >= 9:
        assert kernels._cu_launch_ex(), "cuLaunchKernelEx should be reachable on sm_90+"
    rows, K = 2048, 4096
    x = torch.empty(rows, K, dtype=torch.bfloat16, device="cuda")
    out = fp4ccl.quantize(x.normal_())                    # warm-up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fp4ccl.quantize(x, out=out)
    for trial in range(4):
        xh = make_input(rng, rows, K, "bfloat16", "random")
        xh[0, 0] = ml_dtypes.bfloat16(1000.0 + trial)     # the tensor amax, read last by the pass
        x.copy_(to_device(xh, "torch"))
        if trial % 2:
            g.replay()
        else:
            fp4ccl.quantize(x, out=out)
        torch.cuda.synchronize()
        check_against_reference(out, xh, "nvfp4", "linear")


# ------------------------------------------------------------------------------ GPU-side validation
def test_gpu_bad_input():
    import torch
    x = torch.zeros(4, 48, device="cuda")
    with pytest.raises(ValueError, match="K=48"):
        fp4ccl.quantize(x, "mxfp4")
    with pytest.raises(ValueError, match="contiguous"):
        fp4ccl.quantize(torch.zeros(32, 32, device="cuda").t())
    with pytest.raises(TypeError, match="int32"):
        fp4ccl.quantize(torch.zeros(2, 16, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="one element"):
        fp4ccl.quantize(x, amax=np.ones(3))
    with pytest.raises(ValueError, match="amax"):
        fp4ccl.quantize(x, amax=torch.tensor(1.0))         # a CPU amax for a GPU tensor
    q = fp4ccl.quantize(x)
    with pytest.raises(ValueError, match="shape"):
        fp4ccl.dequantize(q, out=torch.zeros(4, 47, device="cuda"))
    e = fp4ccl.quantize(torch.zeros(0, 64, device="cuda"), "mxfp4", scale_layout="swizzled")
    assert e.dequantize().shape == (0, 64)


def test_misaligned_view_is_handled(rng):
    import torch
    xh = make_input(rng, 9, 64, "float32", "random")
    big = torch.zeros(9 * 64 + 1, device="cuda")
    view = big[1:].view(9, 64)                            # 4-byte offset: not 16-byte aligned
    view.copy_(to_device(xh, "torch"))
    check_against_reference(fp4ccl.quantize(view), xh, "nvfp4", "linear")


# ------------------------------------------------------------------------------ dequantize and sum
def _contributions(rng, n, rows, K, fmt, kind="random"):
    """n FP4 tensors of [rows, K] on the GPU (torch), each with its own global scale, and host copies."""
    import torch
    qs, host = [], []
    for c in range(n):
        xh = make_input(rng, rows, K, "float32", kind if c % 3 == 1 else "random")
        q = fp4ccl.quantize(to_device(xh, "torch"), fmt)
        qs.append(q)
        host.append((to_host(q.data), to_host(q.scales).reshape(rows, K // ref.BLOCK_SIZE[fmt]),
                     F32(to_host(q.global_scale)) if fmt == "nvfp4" else None))
    torch.cuda.synchronize()
    return qs, host


def _sum_on_gpu(qs, out, fmt, K, stream=None):
    import torch
    from fp4ccl.formats import kernels
    rows = out.shape[0]
    contrib = [(q.data.data_ptr(), q.scales.data_ptr(), q.global_scale.data_ptr() if fmt == "nvfp4" else 0)
               for q in qs]
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[out.dtype]
    s = stream if stream is not None else torch.cuda.current_stream().cuda_stream
    kernels.dequantize_sum(out.device.index, out.data_ptr(), name, K, fmt, rows * K // ref.BLOCK_SIZE[fmt],
                           contrib, s)


@pytest.mark.parametrize("out_dt", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_dequantize_sum_bit_exact(rng, fmt, out_dt):
    import torch
    # (7 x 112 / 16 and 1 x 16 / 16 blocks: odd counts, which leave an NVFP4 thread one block of its pair)
    for n, rows, K in ((1, 7, 96), (4, 33, 224), (13, 100, 512), (64, 3, 4064 if fmt == "nvfp4" else 4032),
                       (3, 7, 112 if fmt == "nvfp4" else 224), (5, 1, 16 if fmt == "nvfp4" else 32)):
        qs, host = _contributions(rng, n, rows, K, fmt, "adversarial")
        out = torch.full((rows, K), float("nan"), dtype=getattr(torch, out_dt), device="cuda")
        _sum_on_gpu(qs, out, fmt, K)
        want = ref.dequantize_sum(*zip(*host), fmt, K, NP_DTYPES[out_dt])
        assert_same_float_bits(to_host(out), want)


@pytest.mark.parametrize("out_dt", ["bfloat16", "float16"])
def test_dequantize_sum_past_one_grid_step(rng, out_dt):
    """Enough blocks that each thread block of the NVFP4 sum loops several times over its grid
    steps, ending in a partial one; 5 contributions leave a partial batch."""
    import torch
    K = 8208                       # 513 blocks a row: an odd total
    rows = 2053                    # ~1.05M blocks: several grid steps of the sum at its residency on 132 SMs
    qs, host = _contributions(rng, 5, rows, K, "nvfp4")
    out = torch.full((rows + 1, K), float("nan"), dtype=getattr(torch, out_dt), device="cuda")
    _sum_on_gpu(qs, out[:rows], "nvfp4", K)
    torch.cuda.synchronize()
    got = to_host(out)
    assert np.isnan(got[rows].astype(np.float32)).all(), "the sum wrote past its last block"
    assert_same_float_bits(got[:rows], ref.dequantize_sum(*zip(*host), "nvfp4", K, NP_DTYPES[out_dt]))


@pytest.mark.parametrize("out_dt", ["bfloat16", "float32"])
def test_dequantize_sum_of_unaligned_contributions(rng, out_dt):
    """Contributions that start one row into their tensors: NVFP4 data 8-byte but not 16-byte aligned,
    scales at odd addresses (K = 16: one block a row), mixed with aligned ones in one launch."""
    import torch
    from fp4ccl.formats import kernels
    rows, K = 301, 16
    qs, host = _contributions(rng, 4, rows + 1, K, "nvfp4")
    contrib, want_in = [], []
    for i, (q, (d, sc, gs)) in enumerate(zip(qs, host)):
        skip = i % 2                                      # contributions 1 and 3 start at row 1
        contrib.append((q.data.data_ptr() + skip * K // 2, q.scales.data_ptr() + skip * K // 16,
                        q.global_scale.data_ptr()))
        want_in.append((d[skip:skip + rows], sc[skip:skip + rows], gs))
    out = torch.full((rows + 1, K), float("nan"), dtype=getattr(torch, out_dt), device="cuda")
    kernels.dequantize_sum(out.device.index, out.data_ptr(), out_dt, K, "nvfp4", rows * K // 16, contrib,
                           torch.cuda.current_stream().cuda_stream)
    got = to_host(out)
    assert np.isnan(got[rows].astype(np.float32)).all(), "the sum wrote past its last block"
    assert_same_float_bits(got[:rows], ref.dequantize_sum(*zip(*want_in), "nvfp4", K, NP_DTYPES[out_dt]))


def test_dequantize_sum_chains_past_128_in_fp32_and_refuses_otherwise(rng):
    import torch
    from fp4ccl.formats import kernels
    n, rows, K = kernels.MAXSUM + 9, 5, 64
    qs, host = _contributions(rng, n, rows, K, "nvfp4")
    out = torch.full((rows, K), float("nan"), dtype=torch.float32, device="cuda")
    _sum_on_gpu(qs, out, "nvfp4", K)
    assert_same_float_bits(to_host(out), ref.dequantize_sum(*zip(*host), "nvfp4", K, F32))
    with pytest.raises(ValueError, match="float32"):
        _sum_on_gpu(qs, torch.empty((rows, K), dtype=torch.bfloat16, device="cuda"), "nvfp4", K)
    empty = torch.full((rows, K), float("nan"), dtype=torch.bfloat16, device="cuda")
    _sum_on_gpu([], empty, "nvfp4", K)                    # no contribution: zeros
    assert not empty.float().abs().sum().item() and not torch.isnan(empty).any()


def test_dequantize_sum_in_a_cuda_graph(rng):
    import torch
    rows, K, n = 256, 1024, 4
    qs, _ = _contributions(rng, n, rows, K, "nvfp4")
    out = torch.empty((rows, K), dtype=torch.bfloat16, device="cuda")
    _sum_on_gpu(qs, out, "nvfp4", K)                      # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _sum_on_gpu(qs, out, "nvfp4", K)
    for _ in range(2):
        host = []
        for q in qs:                                      # new contents in the same buffers
            xh = make_input(rng, rows, K, "bfloat16", "random")
            fp4ccl.quantize(to_device(xh, "torch"), out=q)
        torch.cuda.synchronize()
        for q in qs:
            host.append((to_host(q.data), to_host(q.scales), F32(to_host(q.global_scale))))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert_same_float_bits(to_host(out), ref.dequantize_sum(*zip(*host), "nvfp4", K, ml_dtypes.bfloat16))


# ------------------------------------------------------------------------------ launch paths
def test_launch_paths_agree_and_work_from_a_fresh_thread(rng):
    import threading

    import torch
    from fp4ccl.formats import kernels
    assert kernels.launch_mode() == "ctypes"              # libcuda loads on a GPU machine: the fast path
    xh = make_input(rng, 300, 512, "bfloat16", "adversarial")
    x = to_device(xh, "torch")
    fast = fp4ccl.quantize(x, scale_layout="swizzled")
    try:
        kernels.set_launch_mode("cupy")
        slow = fp4ccl.quantize(x, scale_layout="swizzled")
    finally:
        kernels.set_launch_mode("ctypes")
    torch.cuda.synchronize()
    np.testing.assert_array_equal(to_host(fast.data), to_host(slow.data))
    np.testing.assert_array_equal(to_host(fast.scales), to_host(slow.scales))
    got = {}

    def work():                                           # a thread that never touched CUDA before
        got["q"] = fp4ccl.quantize(x, "mxfp4")
        torch.cuda.synchronize()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    check_against_reference(got["q"], xh, "mxfp4", "linear")


# ------------------------------------------------------------------------------ one-launch small NVFP4 quantize
@pytest.mark.parametrize("kind", ["random", "adversarial", "zeros"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("rows, K", [(1, 16), (7, 48), (33, 256), (1000, 144), (3, 8192), (2048, 1024)])
def test_quantize_small_nvfp4_is_the_amax_kernel_then_quantize(rng, kind, dtype, rows, K):
    """The cluster kernel (amax through distributed shared memory, then quantize) against the reference
    with the amax computed, byte for byte; outputs pre-filled so an unwritten byte shows. The last
    shape (4 MiB of fp32) is far above the size the collectives use it for: it must stay exact."""
    import torch
    from fp4ccl.formats import kernels
    if not kernels.has_quantize_small(torch.cuda.current_device()):
        pytest.skip("thread-block clusters need sm_90 or newer")
    xh = make_input(rng, rows, K, dtype, "random" if kind == "zeros" else kind)
    if kind == "zeros":
        xh = np.zeros_like(xh)
    x = to_device(xh, "torch")
    data = torch.full((rows, K // 2), 0xAB, dtype=torch.uint8, device="cuda")
    scales = torch.full((rows, K // 16), 0xAB, dtype=torch.uint8, device="cuda")
    gs = torch.full((1,), float("nan"), dtype=torch.float32, device="cuda")
    kernels.quantize_small_nvfp4(x.device.index, x.data_ptr(), dtype, rows * K, K,
                                 (rows * K // 16, 0, data.data_ptr(), scales.data_ptr(), gs.data_ptr()),
                                 torch.cuda.current_stream().cuda_stream)
    d, s, g = ref.quantize_2d(xh, "nvfp4", None)
    np.testing.assert_array_equal(to_host(data), d)
    np.testing.assert_array_equal(to_host(scales), s)
    assert to_host(gs).view(np.uint32)[0] == np.array([g], F32).view(np.uint32)[0]


def test_quantize_small_nvfp4_in_a_cuda_graph_sees_fresh_data(rng):
    """Captured once, replayed on new contents: the amax is recomputed by every replay."""
    import torch
    from fp4ccl.formats import kernels
    if not kernels.has_quantize_small(torch.cuda.current_device()):
        pytest.skip("thread-block clusters need sm_90 or newer")
    rows, K = 64, 512
    x = torch.empty(rows, K, dtype=torch.bfloat16, device="cuda")
    data = torch.empty(rows, K // 2, dtype=torch.uint8, device="cuda")
    scales = torch.empty(rows, K // 16, dtype=torch.uint8, device="cuda")
    gs = torch.empty(1, dtype=torch.float32, device="cuda")
    seg = (rows * K // 16, 0, data.data_ptr(), scales.data_ptr(), gs.data_ptr())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        kernels.quantize_small_nvfp4(x.device.index, x.data_ptr(), "bfloat16", rows * K, K, seg, s.cuda_stream)
    torch.cuda.current_stream().wait_stream(s)
    for scale in (1.0, 1e-3, 250.0):
        xh = (rng.standard_normal((rows, K)) * scale).astype(ml_dtypes.bfloat16)
        x.copy_(to_device(xh, "torch"))
        g.replay()
        torch.cuda.synchronize()
        d, sc, gsc = ref.quantize_2d(xh, "nvfp4", None)
        np.testing.assert_array_equal(to_host(data), d)
        np.testing.assert_array_equal(to_host(scales), sc)
        assert to_host(gs)[0] == np.float32(gsc)
