"""quantize / dequantize and the packed (wire-buffer) forms: validation, then the numpy reference for
host arrays or the CUDA kernels for GPU arrays, on the caller's stream, outputs in the input's framework.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .. import _arrays
from . import reference as ref
from .seeds import call_seed
from .tensor import (BLOCK_SIZE, FORMATS, INPUT_DTYPES, ROUNDINGS, SCALE_LAYOUTS, FP4Tensor, GatheredFP4Tensor,
                     check_format, check_k, packed_layout, scale_nbytes, swizzled_shape)

_MAX_UNITS = 2**31  # the kernels index a segment's FP4 blocks with 32-bit integers (grid stride included)


# ------------------------------------------------------------------------------ validation
def _check_input(x: Any, format: str, name: str = "x") -> Tuple[_arrays.ArrayInfo, int, int]:
    info = _arrays.describe(x, name)
    if info.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name}: dtype {info.dtype} is not supported; expected one of {', '.join(INPUT_DTYPES)}")
    if len(info.shape) == 0:
        raise ValueError(f"{name}: a 0-dim tensor cannot be quantized; it needs a last dimension K")
    if not info.contiguous:
        raise ValueError(f"{name}: must be contiguous (call .contiguous() / ascontiguousarray first)")
    K = info.shape[-1]
    check_k(K, format)
    rows = math.prod(info.shape[:-1])
    return info, rows, K


def _check_options(format: str, scale_layout: str, rounding: str) -> None:
    check_format(format)
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout: expected one of {', '.join(SCALE_LAYOUTS)}, got {scale_layout!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding: expected one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def _check_units(rows: int, K: int, format: str, what: str = "x") -> None:
    if rows * (K // BLOCK_SIZE[format]) > _MAX_UNITS:
        raise ValueError(f"{what}: {rows} rows x K={K} is more than 2**31 {format} blocks in one segment; split it")


def _is_scalar(a: Any) -> bool:
    return isinstance(a, numbers.Real) or (isinstance(a, np.ndarray) and a.size == 1) or isinstance(a, np.generic)


def _nvfp4_only(format: str, amax: Any) -> Any:
    """amax as quantize reads it: MXFP4 has no global scale and ignores it (unchecked, on the host as the
    GPU path always did)."""
    return amax if format == "nvfp4" else None


def _host_amax(amax: Any) -> Optional[float]:
    if amax is None:
        return None
    if _is_scalar(amax):
        v = float(np.asarray(amax).reshape(()))
    else:
        info = _arrays.describe(amax, "amax")
        if info.is_cuda:
            raise TypeError("amax: a GPU array cannot be used with host (CPU) input")
        if info.size != 1:
            raise ValueError(f"amax: expected one element, got shape {info.shape}")
        v = float(_arrays.host_view(info).astype(np.float32).reshape(()))
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"amax: expected a finite number >= 0, got {v}")
    return v


def _amax_source(format: str, amax: Any, info: _arrays.ArrayInfo, stream: int) -> Tuple[int, int, float, Any]:
    """(device address of the amax or 0, how many fp32 values there to take the max of, host value, what
    must stay alive) for a GPU quantize: the caller's amax, or (NVFP4, none given) per-block partial
    maxima computed now on `stream` (no zeroed word to memset: one graph node fewer)."""
    if format != "nvfp4":
        return 0, 0, 0.0, None
    if amax is not None:
        return _device_amax(amax, info)
    from . import kernels
    n = kernels.amax_partials_count(info.device, info.dtype, info.size)
    if n == 0:
        return 0, 0, 0.0, None          # empty x: amax 0, S_enc 1
    keep = _arrays.empty(info, (n,), "float32")
    ptr = _arrays.describe(keep).ptr
    kernels.amax_partials(info.device, info.ptr, info.dtype, info.size, ptr, stream)
    return ptr, n, 0.0, keep


def _device_amax(amax: Any, info: _arrays.ArrayInfo) -> Tuple[int, int, float, Any]:
    """(device pointer or 0, values there, host value, keep-alive) for the kernels' amax arguments."""
    if _is_scalar(amax):
        return 0, 0, _host_amax(amax), None
    ai = _arrays.describe(amax, "amax")
    if ai.size != 1:
        raise ValueError(f"amax: expected one element, got shape {ai.shape}")
    if ai.device != info.device:
        raise ValueError(f"amax: on {ai.where()}, but x is on {info.where()}")
    obj = amax
    if ai.dtype != "float32" or not ai.contiguous:
        if ai.framework == "torch":
            obj = amax.reshape(()).to(dtype=__import__("torch").float32).contiguous()
        else:
            obj = amax.reshape(()).astype(np.float32)
        ai = _arrays.describe(obj, "amax")
    return ai.ptr, 1, 0.0, obj


def _aligned(info: _arrays.ArrayInfo, name: str) -> _arrays.ArrayInfo:
    """GPU inputs are read with 16-byte loads; a view at an odd offset is copied once."""
    if info.ptr % 16 == 0:
        return info
    copy = info.obj.clone() if info.framework == "torch" else info.obj.copy()
    return _arrays.describe(copy, name)


def _wrap_host(arr: np.ndarray, like: _arrays.ArrayInfo):
    """A numpy result in the framework of the host input `like` (numpy, or CPU torch)."""
    if like.framework == "numpy":
        return arr
    import torch
    if arr.dtype == np.dtype(_arrays.numpy_dtype("bfloat16")):
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _out_dtype_name(dtype: Any, default: str) -> str:
    name = _arrays.dtype_name(dtype) if dtype is not None else default
    if name not in INPUT_DTYPES:
        raise TypeError(f"dtype: can dequantize to {', '.join(INPUT_DTYPES)}, not {name}")
    return name


def _check_buffer(buf: Any, like: _arrays.ArrayInfo, name: str = "buf") -> _arrays.ArrayInfo:
    bi = _arrays.describe(buf, name)
    if bi.dtype != "uint8":
        raise TypeError(f"{name}: expected a uint8 buffer, got {bi.dtype}")
    if not bi.contiguous:
        raise ValueError(f"{name}: must be contiguous")
    if bi.device != like.device:
        raise ValueError(f"{name}: on {bi.where()}, but the tensor is on {like.where()}")
    if bi.is_cuda and bi.ptr % 16:
        raise ValueError(f"{name}: a GPU buffer must be 16-byte aligned (address {bi.ptr:#x})")
    return bi


def _segment_fields(segments, fields: Tuple[str, ...]) -> list:
    """segments as a list of int tuples, one int per name in `fields`; a TypeError naming the segment
    for anything else (a float included: int() would truncate a row start of 0.5 to 0; a bool too, as
    everywhere else a count is taken: _arrays.as_int)."""
    what = f"({', '.join(fields)})"
    try:
        segments = list(segments)
    except TypeError:
        raise TypeError(f"segments: expected a sequence of {what} tuples, got {segments!r}") from None
    out = []
    for i, seg in enumerate(segments):
        try:
            values = tuple(_arrays.as_int(v, "") for v in seg)
        except TypeError:   # not a sequence, or a field that is no integer
            values = ()
        if len(values) != len(fields):
            raise TypeError(f"segments[{i}]: expected {what} as integers, got {seg!r}")
        out.append(values)
    return out


def _check_segments(segments, rows: int, K: int, format: str, nbytes: int, what: str):
    segs = []
    for i, (r0, n, off) in enumerate(_segment_fields(segments, ("row_start", "row_count", "byte_offset"))):
        if r0 < 0 or n < 0 or r0 + n > rows:
            raise ValueError(f"segments[{i}]: rows [{r0}, {r0 + n}) are outside the {rows} rows of {what}")
        if off < 0 or off % 16:
            raise ValueError(f"segments[{i}]: byte_offset {off} must be a non-negative multiple of 16")
        total = packed_layout(n, K, format).total_bytes
        if off + total > nbytes:
            raise ValueError(f"segments[{i}]: needs bytes [{off}, {off + total}) but buf has {nbytes}")
        _check_units(n, K, format, f"segments[{i}]")
        segs.append((r0, n, off))
    return segs


def check_tensor(q: FP4Tensor, name: str = "q") -> Tuple[_arrays.ArrayInfo, _arrays.ArrayInfo, int, int]:
    """(data, scales, rows, K) of the FP4Tensor q once its arrays fit its shape, format and scale layout
    as quantize makes them (NVFP4: a global scale too): what dequantize and the gather of an FP4Tensor
    check before they read q, so neither invents nor drops rows."""
    if not q.shape:
        raise ValueError(f"{name}: shape () has no last dimension K")
    bs = check_k(q.shape[-1], q.format)
    di = _arrays.describe(q.data, f"{name}.data")
    si = _arrays.describe(q.scales, f"{name}.scales")
    K, rows = q.shape[-1], math.prod(q.shape[:-1])
    if di.nbytes != rows * K // 2 or si.nbytes != scale_nbytes(rows, K // bs, q.scale_layout):
        raise ValueError(f"{name}: data has {di.nbytes} bytes and scales {si.nbytes} bytes, which do not fit "
                         f"shape {tuple(q.shape)} ({q.format}, {q.scale_layout})")
    if q.format == "nvfp4":
        _arrays.describe(q.global_scale, f"{name}.global_scale")   # None is a TypeError naming the field
    return di, si, rows, K


# ------------------------------------------------------------------------------ amax
def amax(x: Any, *, stream: Any = None):
    """max |x| over the finite elements (local), as fp32: a 0-d array on x's device (no host sync) for GPU
    input, a numpy float32 for host input. This is what a MAX all-reduce shares for a common scale."""
    info = _arrays.describe(x, "x")
    if info.dtype not in INPUT_DTYPES:
        raise TypeError(f"x: dtype {info.dtype} is not supported; expected one of {', '.join(INPUT_DTYPES)}")
    if not info.contiguous:
        raise ValueError("x: must be contiguous")
    if not info.is_cuda:
        return ref.amax(_arrays.host_view(info))
    if info.nbytes % 16:
        raise ValueError(f"x: the GPU amax reads 16-byte vectors; {info.nbytes} bytes is not a multiple of 16")
    info = _aligned(info, "x")
    from . import kernels
    out = _arrays.empty(info, (), "float32")
    s = _arrays.current_stream(info, stream)
    kernels.amax(info.device, info.ptr, info.dtype, info.size, _arrays.describe(out).ptr, s)
    return out


# ------------------------------------------------------------------------------ quantize
def quantize(x: Any, format: str = "nvfp4", *, amax: Any = None, scale_layout: str = "linear",
             rounding: str = "nearest", seed: Any = None, out: Optional[FP4Tensor] = None,
             stream: Any = None) -> FP4Tensor:
    """Quantize x [..., K] (bf16, fp16 or fp32) to NVFP4 or MXFP4 along the last dimension (local).

    amax: NVFP4 only: the value the global scale is derived from (a float, or a one-element array on
          x's device, e.g. the result of a MAX all-reduce, read without a host sync); default: the
          tensor's own amax over finite elements. Ignored for MXFP4.
    scale_layout: "linear" ([..., K/block]) or "swizzled" (flat, what Blackwell FP4 GEMMs read).
    rounding: "nearest" (even) or "stochastic" (needs seed; the same seed replays the same bytes).
    seed: an int in [0, 2**64), or a one-element int64 array on x's device that the kernel reads when it
          runs (for CUDA graphs: advance it between replays; see fp4ccl.formats.seeds).
    out: an FP4Tensor to write into (same format, shape and layout; arrays on x's device).
    stream: GPU only; default the framework's current stream.
    """
    _check_options(format, scale_layout, rounding)
    info, rows, K = _check_input(x, format)
    seed = call_seed(rounding, seed, info)
    amax = _nvfp4_only(format, amax)
    bs = BLOCK_SIZE[format]
    nbc = K // bs
    lead = info.shape[:-1]
    if out is not None:
        _check_out_tensor(out, info, format, scale_layout)
    if not info.is_cuda:
        return _quantize_host(info, rows, K, format, amax, scale_layout, rounding, seed, out)
    _check_units(rows, K, format)
    info = _aligned(info, "x")
    if out is None:
        data = _arrays.empty(info, lead + (K // 2,), "uint8")
        scales = (_arrays.empty(info, lead + (nbc,), "uint8") if scale_layout == "linear"
                  else _arrays.empty(info, (scale_nbytes(rows, nbc, "swizzled"),), "uint8"))
        gs = _arrays.empty(info, (), "float32") if format == "nvfp4" else None
        out = FP4Tensor(data, scales, gs, format, tuple(info.shape), scale_layout, info.dtype)
    else:
        out.dtype = info.dtype
    from . import kernels
    dev = info.device
    s = _arrays.current_stream(info, stream)
    di, si = _arrays.describe(out.data, "out.data"), _arrays.describe(out.scales, "out.scales")
    gptr = _arrays.describe(out.global_scale, "out.global_scale").ptr if format == "nvfp4" else 0
    amax_ptr, amax_n, amax_val, keep = _amax_source(format, amax, info, s)
    ncols_pad = 0
    if scale_layout == "swizzled":
        ncols_pad = swizzled_shape(rows, nbc)[1]
        if si.nbytes > rows * nbc:  # the padding must read as zeros
            kernels.memset(dev, si.ptr, 0, si.nbytes, s)
    kernels.quantize(dev, info.ptr, info.dtype, K, format, scale_layout, rounding, seed,
                     amax_ptr, amax_val, [(rows * nbc, 0, di.ptr, si.ptr, gptr)], ncols_pad, s, amax_n)
    del keep  # stream-ordered allocators make freeing after the enqueue safe
    return out


def _check_out_tensor(out: FP4Tensor, info: _arrays.ArrayInfo, format: str, layout: str) -> None:
    if not isinstance(out, FP4Tensor):
        raise TypeError(f"out: expected an FP4Tensor, got {type(out).__name__}")
    if out.format != format or out.scale_layout != layout:
        raise ValueError(f"out: is {out.format}/{out.scale_layout}, the call asks for {format}/{layout}")
    if tuple(out.shape) != tuple(info.shape):
        raise ValueError(f"out: has shape {tuple(out.shape)}, x has {tuple(info.shape)}")
    rows, K = math.prod(info.shape[:-1]), info.shape[-1]
    nbc = K // BLOCK_SIZE[format]
    want = {"out.data": rows * K // 2, "out.scales": scale_nbytes(rows, nbc, layout)}
    for name, arr in (("out.data", out.data), ("out.scales", out.scales)):
        a = _arrays.describe(arr, name)
        if a.dtype != "uint8" or not a.contiguous:
            raise ValueError(f"{name}: expected a contiguous uint8 array, got {a.dtype}")
        if a.nbytes != want[name]:
            raise ValueError(f"{name}: has {a.nbytes} bytes, expected {want[name]}")
        if a.device != info.device:
            raise ValueError(f"{name}: on {a.where()}, x on {info.where()}")
        _arrays.check_writeable(a, name)
    if format == "nvfp4":
        g = _arrays.describe(out.global_scale, "out.global_scale")
        if g.dtype != "float32" or g.size != 1 or g.device != info.device:
            raise ValueError(f"out.global_scale: expected one float32 on {info.where()}, got {g.dtype} {g.shape} "
                             f"on {g.where()}")
        _arrays.check_writeable(g, "out.global_scale")


def _quantize_host(info, rows, K, format, amax, layout, rounding, seed, out):
    x2d = _arrays.host_view(info).reshape(rows, K)
    data, scales, s_dec = ref.quantize_2d(x2d, format, _host_amax(amax), rounding, seed)
    lead = info.shape[:-1]
    data = data.reshape(lead + (K // 2,))
    scales = scales.reshape(lead + (K // BLOCK_SIZE[format],)) if layout == "linear" else ref.swizzle(scales)
    gs = np.array(s_dec, dtype=np.float32) if format == "nvfp4" else None
    if out is not None:
        _arrays.host_view(_arrays.describe(out.data)).reshape(-1)[:] = data.reshape(-1)
        _arrays.host_view(_arrays.describe(out.scales)).reshape(-1)[:] = scales.reshape(-1)
        if gs is not None:
            _arrays.host_view(_arrays.describe(out.global_scale)).reshape(-1)[:] = gs
        out.dtype = info.dtype
        return out
    return FP4Tensor(_wrap_host(data, info), _wrap_host(scales, info),
                     _wrap_host(gs, info) if gs is not None else None, format, tuple(info.shape), layout, info.dtype)


# ------------------------------------------------------------------------------ dequantize
def dequantize(q: FP4Tensor, dtype: Any = None, *, out: Any = None, stream: Any = None):
    """Decode an FP4Tensor (local) to bf16, fp16 or fp32 (default: the dtype it was quantized from), in the
    framework and on the device of q.data. CuPy has no bfloat16: there a bf16 result is a uint16 array
    of bf16 bit patterns."""
    if not isinstance(q, FP4Tensor):
        raise TypeError(f"q: expected an FP4Tensor, got {type(q).__name__}")
    if isinstance(q, GatheredFP4Tensor):   # rows from several ranks, each with its own global scale
        return dequantize_gathered(q, dtype, out=out, stream=stream)
    di, si, rows, K = check_tensor(q)
    name = _out_dtype_name(dtype, q.dtype)
    nbc = K // BLOCK_SIZE[q.format]
    if not di.is_cuda:
        scales = _arrays.host_view(si).reshape(-1)
        scales = (scales.reshape(rows, nbc) if q.scale_layout == "linear" else ref.unswizzle(scales, rows, nbc))
        s_dec = (float(_arrays.host_view(_arrays.describe(q.global_scale, "q.global_scale")).reshape(-1)[0])
                 if q.format == "nvfp4" else None)
        res = ref.dequantize_2d(_arrays.host_view(di).reshape(rows, K // 2), scales, s_dec, q.format, K,
                                _arrays.numpy_dtype(name)).reshape(q.shape)
        if out is not None:
            oi = _check_out_array(out, tuple(q.shape), name, di)
            _arrays.host_view(oi)[...] = res
            return out
        return _wrap_host(res, di)
    from . import kernels
    if out is None:
        out = _new_output(di, tuple(q.shape), name)
    oi = _check_out_array(out, tuple(q.shape), name, di)
    gptr = _arrays.describe(q.global_scale, "q.global_scale").ptr if q.format == "nvfp4" else 0
    ncols_pad = swizzled_shape(rows, nbc)[1] if q.scale_layout == "swizzled" else 0
    kernels.dequantize(di.device, oi.ptr, name, K, q.format, q.scale_layout,
                       [(rows * nbc, 0, di.ptr, si.ptr, gptr)], ncols_pad, _arrays.current_stream(di, stream))
    return out


def dequantize_gathered(q: GatheredFP4Tensor, dtype=None, *, out=None, stream=None):
    """Decode a GatheredFP4Tensor (local), each rank's rows with its own global scale (what dequantize() does
    for one)."""
    dtype = _out_dtype_name(dtype, q.dtype)
    info = _arrays.describe(q.data, "q.data")
    inner = math.prod(q.shape[1:-1])
    K = q.K
    if out is None:
        out = _new_output(info, tuple(q.shape), dtype)
    oinfo = _check_out_array(out, tuple(q.shape), dtype, info)
    bs = BLOCK_SIZE[q.format]
    starts = [o * inner for o in q.row_offsets]
    if info.device is None:
        o2 = _arrays.host_view(oinfo).reshape(-1, K)
        d2 = _arrays.host_view(info).reshape(-1, K // 2)
        s2 = _arrays.host_view(_arrays.describe(q.scales, "q.scales")).reshape(-1, K // bs)
        gs = None if q.global_scale is None else _arrays.host_view(_arrays.describe(q.global_scale, "q.global_scale"))
        for r in range(len(starts) - 1):
            a, b = starts[r], starts[r + 1]
            s_dec = None if gs is None else (np.float32(gs[r]) if np.ndim(gs) else np.float32(gs))
            o2[a:b] = ref.dequantize_2d(d2[a:b], s2[a:b], s_dec, q.format, K, o2.dtype)
        return out
    from . import kernels
    dptr, sptr = info.ptr, _arrays.describe(q.scales).ptr
    gptr = _arrays.describe(q.global_scale).ptr if q.global_scale is not None else 0
    per_rank = q.global_scale is not None and len(_arrays.describe(q.global_scale).shape) == 1
    segs = []
    for r in range(len(starts) - 1):
        a, b = starts[r], starts[r + 1]
        gs = (gptr + 4 * r if per_rank else gptr) if gptr else 0
        segs.append(((b - a) * K // bs, a * K // bs, dptr + a * K // 2, sptr + a * K // bs, gs))
    kernels.dequantize(info.device, oinfo.ptr, dtype, K, q.format, "linear", [s for s in segs if s[0]], 0,
                       _arrays.current_stream(oinfo, stream))
    return out


def _new_output(like: _arrays.ArrayInfo, shape: Tuple[int, ...], dtype: str):
    """A decode's output in like's framework and device; CuPy has no bfloat16, so there bf16 is uint16 bits."""
    return _arrays.empty(like, shape, "uint16" if (like.framework == "cupy" and dtype == "bfloat16") else dtype)


def _check_out_array(out: Any, shape: Tuple[int, ...], dtype: str, like: _arrays.ArrayInfo) -> _arrays.ArrayInfo:
    oi = _arrays.describe(out, "out")
    ok_dtype = oi.dtype == dtype or (oi.framework == "cupy" and dtype == "bfloat16" and oi.dtype == "uint16")
    if not ok_dtype:
        raise TypeError(f"out: dtype {oi.dtype}, expected {dtype}")
    if oi.size != math.prod(shape) or (oi.shape and oi.shape[-1] != shape[-1]):
        raise ValueError(f"out: shape {oi.shape} does not hold shape {shape}")
    if not oi.contiguous:
        raise ValueError("out: must be contiguous")
    if oi.device != like.device:
        raise ValueError(f"out: on {oi.where()}, the FP4 data on {like.where()}")
    if oi.is_cuda and oi.ptr % 16:
        raise ValueError("out: a GPU output must be 16-byte aligned")
    _arrays.check_writeable(oi, "out")
    return oi


# ------------------------------------------------------------------------------ packed (wire) forms
def quantize_packed(x: Any, buf: Any, segments: Sequence[Tuple[int, int, int]], format: str = "nvfp4", *,
                    amax: Any = None, rounding: str = "nearest", seed: Any = None,
                    stream: Any = None):
    """Quantize row ranges of x (viewed as [rows, K]) straight into the uint8 buffer `buf` (local).

    segments: (row_start, row_count, byte_offset) each; the segment is written at byte_offset with
    the layout packed_layout(row_count, K, format) (data | linear scales | S_dec), offsets multiples
    of 16. One launch handles up to 8 segments. NVFP4: every segment uses the global scale of `amax`,
    by default the amax of the whole x; each segment carries a copy of S_dec. Stochastic rounding
    indexes elements by their position in x, so a row range quantizes exactly as in quantize(x).
    Returns buf.
    """
    _check_options(format, "linear", rounding)
    info, rows, K = _check_input(x, format)
    seed = call_seed(rounding, seed, info)
    amax = _nvfp4_only(format, amax)
    bi = _check_buffer(buf, info)
    _arrays.check_writeable(bi, "buf")
    segs = _check_segments(segments, rows, K, format, bi.nbytes, "x")
    if not info.is_cuda:
        ref.quantize_packed(_arrays.host_view(info).reshape(rows, K), _arrays.host_view(bi).reshape(-1), segs,
                            format, _host_amax(amax), rounding, seed)
        return buf
    from . import kernels
    info = _aligned(info, "x")
    dev, s = info.device, _arrays.current_stream(info, stream)
    nbc = K // BLOCK_SIZE[format]
    amax_ptr, amax_n, amax_val, keep = _amax_source(format, amax, info, s)
    launch = []
    for r0, n, off in segs:
        lay = packed_layout(n, K, format)
        base = bi.ptr + off
        launch.append((n * nbc, r0 * nbc, base, base + lay.scale_off, base + lay.gs_off if format == "nvfp4" else 0))
    kernels.quantize(dev, info.ptr, info.dtype, K, format, "linear", rounding, seed, amax_ptr, amax_val,
                     launch, 0, s, amax_n)
    del keep
    return buf


def dequantize_packed(buf: Any, segments: Sequence[Tuple[int, int, int]], K: int, format: str, out: Any, *,
                      stream: Any = None):
    """Decode packed segments of `buf` (local) into rows of `out` ([R, K] or [..., K]; bf16, fp16 or fp32, or
    uint16 for bf16 on CuPy). segments: (row_start_in_out, row_count, byte_offset). Returns out."""
    check_k(K, format)
    oi = _arrays.describe(out, "out")
    if len(oi.shape) == 0 or oi.shape[-1] != K:
        raise ValueError(f"out: last dimension must be K={K}, got shape {oi.shape}")
    name = oi.dtype
    if oi.framework == "cupy" and name == "uint16":
        name = "bfloat16"
    if name not in INPUT_DTYPES:
        raise TypeError(f"out: dtype {oi.dtype}; expected one of {', '.join(INPUT_DTYPES)}")
    if not oi.contiguous:
        raise ValueError("out: must be contiguous")
    _arrays.check_writeable(oi, "out")
    bi = _check_buffer(buf, oi)
    rows = math.prod(oi.shape[:-1])
    segs = _check_segments(segments, rows, K, format, bi.nbytes, "out")
    if not oi.is_cuda:
        o2 = _arrays.host_view(oi).reshape(rows, K)
        ref.dequantize_packed(_arrays.host_view(bi).reshape(-1), segs, K, format, o2)
        return out
    if oi.ptr % 16:
        raise ValueError("out: a GPU output must be 16-byte aligned")
    from . import kernels
    nbc = K // BLOCK_SIZE[format]
    launch = []
    for r0, n, off in segs:
        lay = packed_layout(n, K, format)
        base = bi.ptr + off
        launch.append((n * nbc, r0 * nbc, base, base + lay.scale_off, base + lay.gs_off if format == "nvfp4" else 0))
    kernels.dequantize(oi.device, oi.ptr, name, K, format, "linear", launch, 0, _arrays.current_stream(oi, stream))
    return out


def unpack_packed(buf: Any, segments: Sequence[Tuple[int, int, int]], K: int, format: str, *,
                  dtype: str = "bfloat16", stream: Any = None) -> FP4Tensor:
    """Gather packed segments (row_count, byte_offset) of one buffer (local) into one linear-layout
    FP4Tensor of [sum(row_count), K], rows in segment order, by byte copies on `stream`. NVFP4: the global scale is
    the first segment's, right when all segments share one (global_scale="shared" in the collectives);
    the per-segment values stay readable at byte_offset + packed_layout(...).gs_off."""
    bs = check_k(K, format)
    segs = _segment_fields(segments, ("row_count", "byte_offset"))
    bi = _arrays.describe(buf, "buf")
    if bi.dtype != "uint8" or not bi.contiguous:
        raise TypeError("buf: expected a contiguous uint8 buffer")
    rows = sum(n for n, _ in segs)
    for i, (n, off) in enumerate(segs):
        if off < 0 or off % 16 or off + packed_layout(n, K, format).total_bytes > bi.nbytes:
            raise ValueError(f"segments[{i}]: ({n} rows at byte {off}) does not fit the {bi.nbytes}-byte buf")
    data = _arrays.empty(bi, (rows, K // 2), "uint8")
    scales = _arrays.empty(bi, (rows, K // bs), "uint8")
    gs = _arrays.empty(bi, (), "float32") if format == "nvfp4" else None
    if not bi.is_cuda:
        hb = _arrays.host_view(bi).reshape(-1)
        hd, hs = _arrays.host_view(_arrays.describe(data)), _arrays.host_view(_arrays.describe(scales))
        r = 0
        for n, off in segs:
            d, sc, s_dec = ref.read_packed(hb, n, K, format, off)
            hd[r:r + n], hs[r:r + n] = d, sc
            r += n
        if gs is not None:
            first = segs[0] if segs else (0, 0)
            _arrays.host_view(_arrays.describe(gs))[...] = (ref.read_packed(hb, first[0], K, format, first[1])[2]
                                                            if segs else np.float32(1))
        return FP4Tensor(data, scales, gs, format, (rows, K), "linear", _arrays.dtype_name(dtype))
    from . import kernels
    s = _arrays.current_stream(bi, stream)
    dptr, sptr = _arrays.describe(data).ptr, _arrays.describe(scales).ptr
    r = 0
    for n, off in segs:
        lay = packed_layout(n, K, format)
        kernels.memcpy(bi.device, dptr + r * K // 2, bi.ptr + off, n * K // 2, s)
        kernels.memcpy(bi.device, sptr + r * (K // bs), bi.ptr + off + lay.scale_off, n * (K // bs), s)
        r += n
    if gs is not None:
        gptr = _arrays.describe(gs).ptr
        if segs:
            n, off = segs[0]
            kernels.memcpy(bi.device, gptr, bi.ptr + off + packed_layout(n, K, format).gs_off, 4, s)
        else:
            gs.fill_(1.0) if bi.framework == "torch" else gs.fill(1.0)
    return FP4Tensor(data, scales, gs, format, (rows, K), "linear", _arrays.dtype_name(dtype))


__all__ = ["quantize", "dequantize", "amax", "quantize_packed", "dequantize_packed", "unpack_packed",
           "packed_layout", "FP4Tensor", "FORMATS"]
