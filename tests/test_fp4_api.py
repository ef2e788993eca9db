"""fp4ccl.quantize / dequantize / packed forms on host arrays: dispatch, validation, bad input, the
JIT loader's cache logic. The GPU paths are in tests/gpu/test_fp4_kernels.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

import pytest

import fp4ccl
from fp4ccl import jit
from fp4ccl.formats import FP4Tensor, packed_layout, reference as ref
from fp4ccl.formats import dequantize_packed, quantize_packed, unpack_packed

REPO = Path(__file__).resolve().parent.parent


def test_import_touches_no_gpu_framework():
    code = ("import sys, fp4ccl, fp4ccl.formats, fp4ccl.jit; fp4ccl.quantize; "
            "bad = [m for m in ('torch', 'cupy', 'cupy_backends') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("layout", ["linear", "swizzled"])
def test_numpy_round_trip_matches_reference(rng, dtype, fmt, layout):
    x = rng.standard_normal((2, 3, 64)).astype(dtype)
    q = fp4ccl.quantize(x, fmt, scale_layout=layout)
    assert isinstance(q, FP4Tensor) and q.shape == (2, 3, 64) and q.dtype == np.dtype(dtype).name
    assert q.data.shape == (2, 3, 32) and q.data.dtype == np.uint8
    d, s, g = ref.quantize_2d(x.reshape(6, 64), fmt)
    np.testing.assert_array_equal(q.data.reshape(6, 32), d)
    if layout == "linear":
        assert q.scales.shape == (2, 3, 64 // ref.BLOCK_SIZE[fmt])
        np.testing.assert_array_equal(q.scales.reshape(6, -1), s)
    else:
        np.testing.assert_array_equal(q.scales, ref.swizzle(s))
    if fmt == "nvfp4":
        assert q.global_scale.shape == () and q.global_scale.dtype == np.float32 and q.global_scale == g
    else:
        assert q.global_scale is None
    y = q.dequantize()
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    np.testing.assert_array_equal(y.reshape(6, 64), ref.dequantize_2d(d, s, g, fmt, 64, dtype))
    assert fp4ccl.dequantize(q, "float32").dtype == np.float32
    assert q.typed_scales().dtype == (ml_dtypes.float8_e4m3fn if fmt == "nvfp4" else ml_dtypes.float8_e8m0fnu)


def test_torch_cpu_in_torch_out_with_zero_copy_views(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((4, 32)).astype(np.float32)).to(torch.bfloat16)
    q = fp4ccl.quantize(x, amax=torch.tensor(5.0))
    assert isinstance(q.data, torch.Tensor) and isinstance(q.global_scale, torch.Tensor)
    y = q.dequantize()
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    if hasattr(torch, "float4_e2m1fn_x2"):
        v = q.typed_data()
        assert v.dtype == torch.float4_e2m1fn_x2 and v.data_ptr() == q.data.data_ptr()
    if hasattr(torch, "float8_e4m3fn"):
        assert q.typed_scales().data_ptr() == q.scales.data_ptr()
    xn = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    d, s, g = ref.quantize_2d(xn, "nvfp4", 5.0)
    np.testing.assert_array_equal(q.data.numpy(), d)


def test_amax_forms_agree(rng):
    x = rng.standard_normal((3, 32)).astype(np.float32)
    a = fp4ccl.quantize(x, amax=7.5)
    for form in (np.float32(7.5), np.array(7.5), np.array([7.5], np.float32)):
        b = fp4ccl.quantize(x, amax=form)
        np.testing.assert_array_equal(a.data, b.data)
        assert a.global_scale == b.global_scale
    assert fp4ccl.formats.amax(x) == np.abs(x).max()
    m = fp4ccl.quantize(x, "mxfp4", amax=123.0)            # amax means nothing to MXFP4
    np.testing.assert_array_equal(m.data, fp4ccl.quantize(x, "mxfp4").data)


def test_empty_tensors_work():
    for fmt, K in (("nvfp4", 16), ("mxfp4", 64)):
        x = np.zeros((0, K), np.float32)
        for layout in ("linear", "swizzled"):
            q = fp4ccl.quantize(x, fmt, scale_layout=layout)
            assert q.data.shape == (0, K // 2)
            y = q.dequantize()
            assert y.shape == (0, K)
    q = fp4ccl.quantize(np.zeros((3, 0, 32), np.float32))
    assert q.dequantize().shape == (3, 0, 32)


def test_out_is_written_in_place(rng):
    x = rng.standard_normal((5, 48)).astype(np.float32)
    out = FP4Tensor(np.zeros((5, 24), np.uint8), np.zeros((5, 3), np.uint8), np.zeros((), np.float32), "nvfp4", (5, 48))
    r = fp4ccl.quantize(x, out=out)
    assert r is out
    q = fp4ccl.quantize(x)
    np.testing.assert_array_equal(out.data, q.data)
    np.testing.assert_array_equal(out.scales, q.scales)
    assert out.global_scale == q.global_scale
    res = np.empty((5, 48), np.float16)
    assert fp4ccl.dequantize(q, "float16", out=res) is res
    np.testing.assert_array_equal(res, q.dequantize("float16"))


# ------------------------------------------------------------------------------ bad input
def test_k_not_a_multiple_of_the_block_names_k_and_block():
    with pytest.raises(ValueError, match=r"K=24.*block size 16"):
        fp4ccl.quantize(np.zeros((2, 24), np.float32))
    with pytest.raises(ValueError, match=r"K=48.*block size 32"):
        fp4ccl.quantize(np.zeros((2, 48), np.float32), "mxfp4")


def test_bad_dtypes_and_shapes():
    with pytest.raises(TypeError, match="int32"):
        fp4ccl.quantize(np.zeros((2, 16), np.int32))
    with pytest.raises(TypeError, match="float64"):
        fp4ccl.quantize(np.zeros((2, 16), np.float64))
    with pytest.raises(ValueError, match="0-dim"):
        fp4ccl.quantize(np.array(1.0, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        fp4ccl.quantize(np.zeros((32, 32), np.float32)[:, ::2])
    with pytest.raises(TypeError):
        fp4ccl.quantize([1.0] * 16)
    with pytest.raises(ValueError, match="format"):
        fp4ccl.quantize(np.zeros((1, 16), np.float32), "fp4")
    with pytest.raises(ValueError, match="scale_layout"):
        fp4ccl.quantize(np.zeros((1, 16), np.float32), scale_layout="tiled")
    with pytest.raises(ValueError, match="rounding"):
        fp4ccl.quantize(np.zeros((1, 16), np.float32), rounding="up")
    q = fp4ccl.quantize(np.ones((1, 16), np.float32))
    with pytest.raises(TypeError, match="dequantize to"):
        fp4ccl.dequantize(q, "int8")
    with pytest.raises(TypeError, match="FP4Tensor"):
        fp4ccl.dequantize(np.zeros(8, np.uint8))


def test_stochastic_needs_a_seed():
    x = np.ones((1, 16), np.float32)
    with pytest.raises(ValueError, match="seed"):
        fp4ccl.quantize(x, rounding="stochastic")
    with pytest.raises(ValueError, match="seed"):
        fp4ccl.quantize(x, rounding="stochastic", seed=-1)
    for bad in (True, 2.0, "9", 2**64):
        with pytest.raises(ValueError, match="seed"):
            fp4ccl.quantize(x, rounding="stochastic", seed=bad)
    a = fp4ccl.quantize(x * 0.3, rounding="stochastic", seed=9, amax=6.0)
    b = fp4ccl.quantize(x * 0.3, rounding="stochastic", seed=9, amax=6.0)
    np.testing.assert_array_equal(a.data, b.data)


def _signed64(v):
    return v - 2**64 if v >= 2**63 else v


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_seed_arrays_on_the_host_give_the_int_seeds_bytes(fmt):
    """A one-element int64/uint64 seed array is read at the call on the host: the bytes of the same int
    seed (a negative int64 as its unsigned bits), for quantize and quantize_packed alike."""
    x = (np.random.default_rng(3).standard_normal((4, 64)) * 3).astype(np.float32)
    arrays = [lambda v: np.array([_signed64(v)], np.int64), lambda v: np.array(v, np.uint64)]
    try:
        import torch
        arrays.append(lambda v: torch.tensor(_signed64(v), dtype=torch.int64))
    except ImportError:
        pass
    lay = packed_layout(4, 64, fmt)
    for value in (0, 5, 2**63 + 11, 2**64 - 1):
        want = fp4ccl.quantize(x, fmt, rounding="stochastic", seed=value)
        want_buf = quantize_packed(x, np.zeros(lay.total_bytes, np.uint8), [(0, 4, 0)], fmt, rounding="stochastic",
                                   seed=value)
        for make in arrays:
            got = fp4ccl.quantize(x, fmt, rounding="stochastic", seed=make(value))
            np.testing.assert_array_equal(np.asarray(got.data), want.data)
            np.testing.assert_array_equal(np.asarray(got.scales), want.scales)
            buf = quantize_packed(x, np.zeros(lay.total_bytes, np.uint8), [(0, 4, 0)], fmt, rounding="stochastic",
                                  seed=make(value))
            np.testing.assert_array_equal(buf, want_buf)
    other = fp4ccl.quantize(x, fmt, rounding="stochastic", seed=np.array([6], np.int64))
    assert not np.array_equal(other.data, fp4ccl.quantize(x, fmt, rounding="stochastic", seed=5).data)
    for bad in (np.array([1.0]), np.array([1, 2], np.int64), np.array([1], np.int32), np.zeros((1, 2), np.uint64)):
        with pytest.raises(ValueError, match="one int64 or uint64 element"):
            fp4ccl.quantize(x, fmt, rounding="stochastic", seed=bad)
    # with rounding to nearest a seed is not read at all, as an int seed changes nothing there
    np.testing.assert_array_equal(fp4ccl.quantize(x, fmt, seed=np.array([1.0])).data, fp4ccl.quantize(x, fmt).data)


def test_a_device_seed_derives_as_the_int_arithmetic():
    """What the kernels compute from a derived DeviceSeed (add + mul * value, mod 2**64) is the int seed
    the same derivation gives, so a seed array replays an int seed's bytes in every collective form."""
    from fp4ccl.fp4_collectives import _mix
    from fp4ccl.formats.seeds import DeviceSeed, derive, kernel_args
    rng = np.random.default_rng(11)
    for _ in range(200):
        value = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        rank, peer = (int(v) for v in rng.integers(0, 8, 2))
        add, ptr, mul = kernel_args(_mix(DeviceSeed(4096, 0), rank, peer))
        assert ptr == 4096 and (add + mul * value) % 2**64 == _mix(value, rank, peer)
        m1, a1, m2, a2 = (int(v) for v in rng.integers(0, 2**63, 4))
        add, _, mul = kernel_args(derive(derive(DeviceSeed(8, 0), m1, a1), m2, a2))
        assert (add + mul * value) % 2**64 == derive(derive(value, m1, a1), m2, a2)
    assert kernel_args(5) == (5, 0, 0) and kernel_args(None) == (0, 0, 0)


def test_bad_amax():
    x = np.ones((1, 16), np.float32)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="amax"):
            fp4ccl.quantize(x, amax=bad)
    with pytest.raises(ValueError, match="one element"):
        fp4ccl.quantize(x, amax=np.ones(2, np.float32))


def test_wrong_out_sizes():
    x = np.ones((4, 32), np.float32)
    good = dict(data=np.zeros((4, 16), np.uint8), scales=np.zeros((4, 2), np.uint8), global_scale=np.zeros((), np.float32))
    for key, bad in (("data", np.zeros((4, 15), np.uint8)), ("scales", np.zeros((4, 3), np.uint8)),
                     ("global_scale", np.zeros(2, np.float32)), ("data", np.zeros((4, 16), np.int8))):
        arrays = {**good, key: bad}
        with pytest.raises(ValueError):
            fp4ccl.quantize(x, out=FP4Tensor(arrays["data"], arrays["scales"], arrays["global_scale"], "nvfp4", (4, 32)))
    with pytest.raises(ValueError, match="shape"):
        fp4ccl.quantize(x, out=FP4Tensor(good["data"], good["scales"], good["global_scale"], "nvfp4", (2, 64)))
    with pytest.raises(ValueError, match="mxfp4"):
        fp4ccl.quantize(x, "mxfp4", out=FP4Tensor(good["data"], good["scales"], good["global_scale"], "nvfp4", (4, 32)))
    q = fp4ccl.quantize(x)
    with pytest.raises(ValueError, match="shape"):
        fp4ccl.dequantize(q, out=np.zeros((4, 31), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        fp4ccl.dequantize(q, out=np.zeros((4, 32), np.float16))


# ------------------------------------------------------------------------------ packed forms
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_packed_api_round_trip(rng, fmt):
    K = 64
    x = rng.standard_normal((10, K)).astype(np.float32)
    counts = [3, 0, 4, 3]
    segs, off, r0 = [], 0, 0
    for n in counts:
        segs.append((r0, n, off))
        off += packed_layout(n, K, fmt).total_bytes
        r0 += n
    buf = np.zeros(off, np.uint8)
    assert quantize_packed(x, buf, segs, fmt) is buf
    q = fp4ccl.quantize(x, fmt)
    out = np.zeros((10, K), np.float32)
    dequantize_packed(buf, segs, K, fmt, out)
    np.testing.assert_array_equal(out, q.dequantize())
    u = unpack_packed(buf, [(n, o) for _, n, o in segs], K, fmt, dtype="float32")
    np.testing.assert_array_equal(u.data, q.data)
    np.testing.assert_array_equal(u.scales, q.scales)
    if fmt == "nvfp4":
        assert u.global_scale == q.global_scale


def test_packed_bad_segments():
    x = np.ones((4, 32), np.float32)
    buf = np.zeros(packed_layout(4, 32, "nvfp4").total_bytes, np.uint8)
    with pytest.raises(ValueError, match="outside"):
        quantize_packed(x, buf, [(2, 3, 0)])
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_packed(x, buf, [(0, 1, 8)])
    with pytest.raises(ValueError, match="bytes"):
        quantize_packed(x, buf, [(0, 4, 16)])
    with pytest.raises(TypeError, match="uint8"):
        quantize_packed(x, buf.view(np.int8), [(0, 4, 0)])
    with pytest.raises(TypeError, match="row_start"):
        quantize_packed(x, buf, [(0, 4)])
    with pytest.raises(ValueError, match="K=32"):
        dequantize_packed(buf, [(0, 4, 0)], 32, "nvfp4", np.zeros((4, 16), np.float32))


# ------------------------------------------------------------------------------ jit (no GPU needed)
def test_csrc_found_from_a_source_checkout():
    d = jit.csrc_dir()
    assert (d / "fp4.cu").is_file()
    assert "fp4.cu" in jit.source_files()
    assert not (REPO / "csrc" / "__init__.py").exists()


def test_cache_key_covers_source_arch_and_versions():
    src = jit.source_files()
    k = jit.cache_key("fp4.cu", 90, "cubin", (13, 0), src)
    assert k != jit.cache_key("fp4.cu", 100, "cubin", (13, 0), src)
    assert k != jit.cache_key("fp4.cu", 90, "cubin", (13, 1), src)
    assert k != jit.cache_key("fp4.cu", 90, "ptx", (13, 0), src)
    changed = dict(src)
    changed["fp4.cu"] += "\n// edit"
    assert k != jit.cache_key("fp4.cu", 90, "cubin", (13, 0), changed)
    assert k == jit.cache_key("fp4.cu", 90, "cubin", (13, 0), dict(src))
    assert jit.choose_target(90, (75, 80, 90, 100)) == ("cubin", 90)
    assert jit.choose_target(130, (75, 90, 120)) == ("ptx", 120)
    with pytest.raises(RuntimeError):
        jit.choose_target(70, (75, 90))


def test_kernel_names_exist_in_the_source():
    from fp4ccl.formats import kernels
    text = (REPO / "csrc" / "fp4.cu").read_text()
    names = kernels.kernel_names()
    # ... the one-launch gather and reduce-scatter of both formats
    assert len(names) == 3 + 2 * 3 * 2 * 3 + 2 * 3 + 3 + 2 * 3 + 2 * 3 * 2
    assert len(set(names)) == len(names)
    for macro in ("FP4_AMAX(", "FP4_QUANT_ALL(nv", "FP4_QUANT_ALL(mx", "FP4_DEQUANT_ALL(nv", "FP4_DEQUANT_ALL(mx",
                  "FP4_DQSUM(nv, bf16", "FP4_DQSUM(mx, f32", "FP4_QUANT_SMALL(f32", "FP4_GATHER_LL_ALL(nv",
                  "FP4_GATHER_LL_ALL(mx", "FP4_RS_LL_ALL(nv", "FP4_RS_LL_ALL(mx", "FP4_RS_LL(FMT, BS, NV, f32, float, sr"):
        assert macro in text
    for macro, value in (("FP4_LL_CLUSTER", kernels.LL_CLUSTER), ("FP4_LL_MAXRANKS", kernels.LL_MAXRANKS),
                         ("FP4_LL_MAXCTAS", kernels.LL_MAXCTAS)):
        assert f"#define {macro} {value}" in text
    assert kernels.LL_MAXCTAS % kernels.LL_CLUSTER == 0      # the grid is whole clusters
    assert kernels.SEG_DTYPE.itemsize == 5 * 8 * kernels.MAXSEG
    assert f"#define FP4_SMALL_CTAS {kernels.SMALL_CTAS}" in text
    # the by-value tables must fit the 4 KB kernel parameter space with the scalar arguments
    assert f"#define FP4_MAXSUM {kernels.MAXSUM}" in text and f"#define FP4_MAXSEG {kernels.MAXSEG}" in text
    assert kernels.SUM_DTYPE.itemsize == 3 * 8 * kernels.MAXSUM and kernels.SUM_DTYPE.itemsize + 32 <= 4096


def _c_kind(param: str) -> str:
    """The _SIGNATURES kind of one C parameter declaration of csrc/fp4.cu."""
    decl = param.replace("__restrict__", "").replace("__grid_constant__", "").replace("const ", "").split()
    if "*" in param:
        return "u64"
    return {"u64": "u64", "u32": "u32", "int": "i32", "float": "f32", "SegTable": "seg", "SumTable": "sum",
            "LLTable": "ll"}[decl[0]]


@pytest.mark.parametrize("macro,kind", [("FP4_AMAX", "amax"), ("FP4_QUANT", "quant"), ("FP4_DEQUANT", "dequant"),
                                        ("FP4_DQSUM", "dqsum"), ("FP4_QUANT_SMALL", "qsmall"),
                                        ("FP4_GATHER_LL", "gll"), ("FP4_RS_LL", "rsll")])
def test_launcher_signatures_match_the_kernels(macro, kind):
    """The launchers pass arguments by position through cuLaunchKernel: a kernel parameter added in
    csrc/fp4.cu but not in _SIGNATURES would shift every later argument, silently."""
    from fp4ccl.formats import kernels
    text = (REPO / "csrc" / "fp4.cu").read_text()
    m = re.search(r"#define " + macro + r"\(.*?\)(.*?)\{", text, re.S)
    assert m, f"no #define {macro}( in csrc/fp4.cu"
    body = m.group(1).replace("\\\n", " ")
    params = re.search(r"\w+##\w*\s*\((.*)\)\s*$", body, re.S) or re.search(r"\(([^()]*)\)\s*$", body, re.S)
    kinds = tuple(_c_kind(p.strip()) for p in params.group(1).split(","))
    assert kinds == kernels._SIGNATURES[kind], f"{macro}: C parameters {kinds} != _SIGNATURES[{kind!r}]"


def test_the_one_launch_table_matches_the_struct():
    """The one-launch kernels take struct LLTable by value, filled word by word by _fill_ll_table:
    its u64 fields in order (arrays of FP4_LL_MAXRANKS, then scalars) must be _TABLES["ll"] words."""
    from fp4ccl.formats import kernels
    text = (REPO / "csrc" / "fp4.cu").read_text()
    body = re.search(r"struct LLTable \{(.*?)\};", text, re.S).group(1)
    words = 0
    for decl in re.sub(r"//[^\n]*", "", body).split(";"):
        decl = decl.strip()
        if not decl:
            continue
        assert decl.startswith("u64 "), decl
        for name in decl[4:].split(","):
            words += kernels.LL_MAXRANKS if "[FP4_LL_MAXRANKS]" in name else 1
    assert words == kernels._TABLES["ll"] == 5 * kernels.LL_MAXRANKS + 4
    table = np.zeros(kernels._TABLES["ll"], np.uint64)
    kernels._fill_ll_table(table, [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], 4096, 77, check=(0xABCDEF, 0x7000))
    assert list(table[4 * kernels.LL_MAXRANKS:4 * kernels.LL_MAXRANKS + 2]) == [9, 10]
    assert list(table[-4:]) == [4096, 77, 0x7000, 0xABCDEF]   # seed_ptr, seed_mul, err, sig
    kernels._fill_ll_table(table, [1], [3], [5], [7])
    assert list(table[-4:]) == [0, 0, 0, 0]


def test_launch_config_structs_match_cuda_h(tmp_path):
    """cuLaunchKernelEx reads CUlaunchConfig / CUlaunchAttribute from memory ctypes lays out: compare
    sizes and offsets with the C compiler's, where cuda.h and a C compiler are here."""
    import ctypes
    import shutil
    from fp4ccl.formats import kernels
    cc = shutil.which("cc") or shutil.which("gcc")
    heads = [p for p in ([os.environ.get("CUDA_HOME", "")] + sorted(Path("/usr/local").glob("cuda*"), reverse=True))
             if p and (Path(p) / "include" / "cuda.h").exists()]
    if not cc or not heads:
        pytest.skip("no C compiler or no cuda.h (CUDA_HOME, /usr/local/cuda*) to compare against")
    src = tmp_path / "sz.c"
    src.write_text('#include <cuda.h>\n#include <stdio.h>\n#include <stddef.h>\nint main(void) {\n'
                   'printf("%zu %zu %zu %zu %zu %zu %zu %d\\n", sizeof(CUlaunchAttribute), '
                   'offsetof(CUlaunchAttribute, value), sizeof(CUlaunchConfig), offsetof(CUlaunchConfig, sharedMemBytes), '
                   'offsetof(CUlaunchConfig, hStream), offsetof(CUlaunchConfig, attrs), offsetof(CUlaunchConfig, numAttrs), '
                   '(int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);\nreturn 0;\n}\n')
    exe = tmp_path / "sz"
    subprocess.run([cc, f"-I{Path(heads[0]) / 'include'}", str(src), "-o", str(exe)], check=True)
    got = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    A, C = kernels._LaunchAttribute, kernels._LaunchConfig
    ours = [ctypes.sizeof(A), A.value.offset, ctypes.sizeof(C), C.shared.offset, C.stream.offset, C.attrs.offset,
            C.nattrs.offset, kernels._PROGRAMMATIC_STREAM_SERIALIZATION]
    assert [int(v) for v in got] == ours


def test_fill_segments_writes_the_struct_layout_in_place():
    from fp4ccl.formats import kernels
    table = np.full(5 * kernels.MAXSEG, 7, dtype=np.uint64)
    most = kernels._fill_segments(table, [(3, 10, 100, 200, 300), (9, 20, 101, 201, 0)])
    assert most == 9
    view = table.view(kernels.SEG_DTYPE)[0]
    assert list(view["units"][:2]) == [3, 9] and list(view["src"][:2]) == [10, 20]
    assert list(view["data"][:2]) == [100, 101] and list(view["scale"][:2]) == [200, 201]
    assert list(view["gs"][:2]) == [300, 0]
    assert kernels._grid(0, 528, 1) == 1 and kernels._grid(10**9, 528, 1) == 528 and kernels._grid(10**9, 528, 8) == 66


def test_launcher_of_another_module_passes_its_arguments_and_table(monkeypatch):
    """kernels.launcher(): the symmetric-memory barrier's and vcopy's arguments reach cuLaunchKernel
    as the kernel declares them (int32 rank/world, u64 addresses, the by-value segment table)."""
    import ctypes
    from fp4ccl.formats import kernels
    seen = []

    def cu(fptr, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        seen.append((fptr, gx, gy, bx, stream, params))
        return 0

    class Fn:
        ptr = 0xF00D
    monkeypatch.setattr(kernels, "_driver", cu)
    monkeypatch.setattr(kernels, "_current_device", lambda: 3)
    monkeypatch.setattr(kernels._tls, "launch", {}, raising=False)
    la = kernels.launcher(3, "fp4ccl_symm_barrier_dev", "symm_barrier_dev", Fn, 64)
    assert kernels.launcher(3, "fp4ccl_symm_barrier_dev", "symm_barrier_dev", None, 64) is la   # cached
    la(3, 1, 1, 0x5, 0x1000, 2, 4, 0x2000, 7 * 10**9)
    fptr, gx, gy, bx, stream, params = seen[-1]
    assert (fptr, gx, gy, bx, stream) == (0xF00D, 1, 1, 64, 0x5)
    p = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
    assert ctypes.c_uint64.from_address(p[0]).value == 0x1000
    assert ctypes.c_int32.from_address(p[1]).value == 2 and ctypes.c_int32.from_address(p[2]).value == 4
    assert ctypes.c_uint64.from_address(p[3]).value == 0x2000
    assert ctypes.c_uint64.from_address(p[4]).value == 7 * 10**9
    lv = kernels.launcher(3, "vcopy_segments", "vcopy", Fn, 256)
    lv.table[:3] = [11, 12, 13]
    lv.table[kernels.VCOPY_MAXSEG] = 21
    lv(3, 9, 3, 0x6)
    params = ctypes.cast(seen[-1][5], ctypes.POINTER(ctypes.c_void_p))
    block = (ctypes.c_uint64 * (3 * kernels.VCOPY_MAXSEG)).from_address(params[0])
    assert list(block[:3]) == [11, 12, 13] and block[kernels.VCOPY_MAXSEG] == 21
    assert seen[-1][1:4] == (9, 3, 256)


def test_dequantize_sum_validates_before_touching_the_gpu():
    from fp4ccl.formats import kernels
    with pytest.raises(ValueError, match="K=40"):
        kernels.dequantize_sum(0, 0, "float32", 40, "nvfp4", 10, [], 0)
    with pytest.raises(ValueError, match="float32"):
        kernels.dequantize_sum(0, 0, "bfloat16", 64, "nvfp4", 10, [(0, 0, 0)] * (kernels.MAXSUM + 1), 0)
    with pytest.raises(TypeError, match="out_dtype"):
        kernels.dequantize_sum(0, 0, "int8", 64, "nvfp4", 10, [], 0)
    with pytest.raises(ValueError, match="format"):
        kernels.dequantize_sum(0, 0, "float32", 64, "fp8", 10, [], 0)
    kernels.dequantize_sum(0, 0, "float32", 64, "mxfp4", 0, [(1, 2, 0)], 0)   # nothing to do: no launch


def test_segment_tables_split_by_eight_and_keep_field_order():
    from fp4ccl.formats import kernels
    segs = [(i + 1, 10 * i, 1000 + i, 2000 + i, 3000 + i) for i in range(10)]   # (units, src, data, scale, gs)
    tables = list(kernels._tables(segs))
    assert [(n, most) for _, n, most in tables] == [(8, 8), (2, 10)]
    t, n, _ = tables[1]
    assert list(t["src"][0][:n]) == [80, 90] and list(t["units"][0][:n]) == [9, 10]
    assert list(t["data"][0][:n]) == [1008, 1009] and list(t["scale"][0][:n]) == [2008, 2009]
    assert list(t["gs"][0][:n]) == [3008, 3009] and not t["units"][0][n:].any()
    raw = t.view(np.uint64).reshape(-1)                   # the C struct: five arrays of MAXSEG u64
    assert raw[0] == 9 and raw[kernels.MAXSEG] == 80 and raw[4 * kernels.MAXSEG] == 3008


def _nvrtc_available() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC (CuPy + libnvrtc) is not installed here")
def test_nvrtc_compile_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4CCL_CACHE_DIR", str(tmp_path))
    binary = jit.compiled_binary("fp4.cu", 90)
    files = [p for p in tmp_path.iterdir() if p.suffix == ".cubin"]
    assert len(files) == 1 and files[0].read_bytes() == jit._pack(binary) and "sm90" in files[0].name
    assert binary.startswith(b"\x7fELF")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    files[0].write_bytes(jit._pack(b"sentinel"))          # a second call reads the cache, not NVRTC
    assert jit.compiled_binary("fp4.cu", 90) == b"sentinel"
    files[0].write_bytes(b"sentinel")                     # a damaged entry is compiled again
    assert jit.compiled_binary("fp4.cu", 90) == binary


# ------------------------------------------------------------------------------ argument types
def test_non_integer_segment_fields_rows_and_k_are_type_errors():
    """A float row start, row count, byte offset or K is refused (int() would truncate 0.5 to 0), and so
    is a bool, as every other count of the library (True would quietly mean 1)."""
    x = np.ones((4, 32), np.float32)
    buf = np.zeros(1024, np.uint8)
    out = np.zeros((4, 32), np.float32)
    for seg in ((0.5, 2, 0), (0, 2.0, 0), (0, 2, 16.0), ("0", 2, 0), (False, 2, 0), (0, np.bool_(True), 0)):
        with pytest.raises(TypeError, match=r"segments\[0\]"):
            quantize_packed(x, buf, [seg])
        with pytest.raises(TypeError, match=r"segments\[0\]"):
            dequantize_packed(buf, [seg], 32, "nvfp4", out)
    with pytest.raises(TypeError, match=r"segments\[0\]"):
        unpack_packed(buf, [(2.0, 0)], 32, "nvfp4")
    for fn in (lambda s: quantize_packed(x, buf, s), lambda s: dequantize_packed(buf, s, 32, "nvfp4", out),
               lambda s: unpack_packed(buf, s, 32, "nvfp4")):
        with pytest.raises(TypeError, match="segments: expected a sequence"):
            fn(None)
    with pytest.raises(TypeError, match=r"K must be an integer, got 32\.0"):
        dequantize_packed(buf, [(0, 4, 0)], 32.0, "nvfp4", out)
    with pytest.raises(TypeError, match=r"rows must be an integer, got 4\.5"):
        packed_layout(4.5, 32, "nvfp4")
    quantize_packed(x, buf, [(np.int64(0), np.int32(4), np.uint16(0))])   # numpy integers are integers


def test_read_only_outputs_are_refused_by_name():
    x = np.ones((4, 32), np.float32)
    q = fp4ccl.quantize(x)
    ro = np.zeros((4, 32), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is a read-only numpy array"):
        q.dequantize(out=ro)
    buf = np.zeros(packed_layout(4, 32, "nvfp4").total_bytes, np.uint8)
    quantize_packed(x, buf, [(0, 4, 0)])
    with pytest.raises(ValueError, match="out is a read-only numpy array"):
        dequantize_packed(buf, [(0, 4, 0)], 32, "nvfp4", ro)
    buf.flags.writeable = False
    dequantize_packed(buf, [(0, 4, 0)], 32, "nvfp4", np.zeros((4, 32), np.float32))   # buf is only read there
    with pytest.raises(ValueError, match="buf is a read-only numpy array"):
        quantize_packed(x, buf, [(0, 4, 0)])
    for field in ("data", "scales", "global_scale"):
        arrays = {f: getattr(q, f).copy() for f in ("data", "scales", "global_scale")}
        arrays[field].flags.writeable = False
        with pytest.raises(ValueError, match=f"out.{field} is a read-only numpy array"):
            fp4ccl.quantize(x, out=FP4Tensor(arrays["data"], arrays["scales"], arrays["global_scale"], "nvfp4",
                                             (4, 32)))


def test_an_nvfp4_tensor_without_a_global_scale_names_the_field():
    q = fp4ccl.quantize(np.ones((4, 32), np.float32))
    with pytest.raises(TypeError, match=r"q\.global_scale: expected"):
        FP4Tensor(q.data, q.scales, None, "nvfp4", q.shape).dequantize()


def test_mxfp4_ignores_amax_on_the_host_too():
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    want = fp4ccl.quantize(x, "mxfp4")
    n = packed_layout(4, 32, "mxfp4").total_bytes
    buf, ref_buf = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    quantize_packed(x, ref_buf, [(0, 4, 0)], "mxfp4")
    for amax in (-1.0, float("nan"), np.ones(2, np.float32)):
        got = fp4ccl.quantize(x, "mxfp4", amax=amax)
        np.testing.assert_array_equal(got.data, want.data)
        np.testing.assert_array_equal(got.scales, want.scales)
        quantize_packed(x, buf, [(0, 4, 0)], "mxfp4", amax=amax)
        np.testing.assert_array_equal(buf, ref_buf)
