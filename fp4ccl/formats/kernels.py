"""Launchers for the CUDA kernels in csrc/fp4.cu (compiled by fp4ccl.jit, launched through CuPy).

Everything takes raw device pointers and a raw cudaStream_t, so torch tensors and CuPy arrays go
through the same code. No launch syncs the host; nothing allocates except the caller.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .. import jit

SOURCE = "fp4.cu"
THREADS = 256        # FP4_THREADS in csrc/fp4.cu
MAXSEG = 8           # FP4_MAXSEG in csrc/fp4.cu
_FIELDS = ("units", "src", "data", "scale", "gs")
# Mirrors `struct SegTable` (five arrays of MAXSEG u64); passed by value as a one-element array.
SEG_DTYPE = np.dtype([(f, "<u8", (MAXSEG,)) for f in _FIELDS])
_IN_NAME = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
_FMT_NAME = {"nvfp4": "nv", "mxfp4": "mx"}
_LAYOUT_NAME = {"linear": "lin", "swizzled": "swz"}
_ROUND_NAME = {"nearest": "rn", "stochastic": "sr"}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}

_lock = threading.Lock()
_functions: Dict[Tuple[int, str], object] = {}
_grids: Dict[Tuple[int, str], int] = {}


class _StreamRef:
    """What CuPy's Function.__call__ reads a stream from (only `.ptr`), for a raw handle."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = int(ptr)


def _function(device: int, name: str):
    key = (device, name)
    fn = _functions.get(key)
    if fn is None:
        with _lock:
            fn = _functions.get(key)
            if fn is None:
                fn = jit.load_module(SOURCE, device).get_function(name)
                _functions[key] = fn
    return fn


def _resident_blocks(device: int, name: str, fn) -> int:
    """Blocks that fit on the whole GPU at once: the grid-stride kernels launch exactly that many."""
    key = (device, name)
    n = _grids.get(key)
    if n is None:
        import cupy
        from cupy_backends.cuda.api import driver, runtime
        with cupy.cuda.Device(device):
            per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, THREADS, 0)
            sms = runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device)
        n = max(1, per_sm) * sms
        _grids[key] = n
    return n


def _launch(device: int, name: str, grid_x_for, nseg: int, args, stream: int) -> None:
    import cupy
    fn = _function(device, name)
    gx = max(1, min(grid_x_for, max(1, _resident_blocks(device, name, fn) // nseg)))
    with cupy.cuda.Device(device):
        fn((gx, nseg, 1), (THREADS, 1, 1), args, 0, _StreamRef(stream))


def kernel_names() -> List[str]:
    """Every kernel name csrc/fp4.cu must export (tests check the list against the source)."""
    names = [f"fp4_amax_{t}" for t in _IN_NAME.values()]
    for f in _FMT_NAME.values():
        for t in _IN_NAME.values():
            for lay in _LAYOUT_NAME.values():
                names += [f"fp4_quant_{f}_{t}_{lay}_{r}" for r in _ROUND_NAME.values()]
                names.append(f"fp4_dequant_{f}_{t}_{lay}")
    return names


def memset(device: int, ptr: int, value: int, nbytes: int, stream: int) -> None:
    if nbytes:
        import cupy
        from cupy_backends.cuda.api import runtime
        with cupy.cuda.Device(device):
            runtime.memsetAsync(int(ptr), int(value), int(nbytes), int(stream))


def memcpy(device: int, dst: int, src: int, nbytes: int, stream: int) -> None:
    if nbytes:
        import cupy
        from cupy_backends.cuda.api import runtime
        with cupy.cuda.Device(device):
            runtime.memcpyAsync(int(dst), int(src), int(nbytes), runtime.memcpyDeviceToDevice, int(stream))


def amax(device: int, x_ptr: int, in_dtype: str, numel: int, out_ptr: int, stream: int) -> None:
    """*out = max |x| over finite elements (fp32). numel * itemsize must be a multiple of 16 bytes."""
    memset(device, out_ptr, 0, 4, stream)
    nbytes = numel * _ITEMSIZE[in_dtype]
    if nbytes == 0:
        return
    nvec = nbytes // 16
    args = (np.uint64(x_ptr), np.uint64(nvec), np.uint64(out_ptr))
    _launch(device, f"fp4_amax_{_IN_NAME[in_dtype]}", -(-nvec // THREADS), 1, args, stream)


def _tables(segments: Sequence[Tuple[int, int, int, int, int]]):
    """One SegTable per MAXSEG segments; a segment is (units, src_block, data, scale, gs), the field
    order of `struct SegTable`."""
    for i in range(0, max(len(segments), 1), MAXSEG):
        chunk = segments[i:i + MAXSEG]
        t = np.zeros(1, dtype=SEG_DTYPE)
        for j, (units, src, data, scale, gs) in enumerate(chunk):
            for f, v in (("src", src), ("units", units), ("data", data), ("scale", scale), ("gs", gs)):
                t[f][0, j] = int(v)
        yield t, len(chunk), max((int(s[0]) for s in chunk), default=0)


def quantize(device: int, x_ptr: int, in_dtype: str, K: int, format: str, layout: str, rounding: str,
             seed: int, amax_ptr: int, amax_value: float, segments: Sequence[Tuple[int, int, int, int, int]],
             ncols_pad: int, stream: int) -> None:
    """Quantize FP4 blocks of x into each segment's (data, scale, gs) addresses.

    segments: (units, src_block, data_ptr, scale_ptr, gs_ptr): `units` FP4 blocks of x starting at block
    `src_block` (= row_start * K / block); gs_ptr 0 writes no global scale (MXFP4).
    amax_ptr: device address of an fp32 amax (0: use amax_value). ncols_pad: swizzled layout only.
    """
    name = f"fp4_quant_{_FMT_NAME[format]}_{_IN_NAME[in_dtype]}_{_LAYOUT_NAME[layout]}_{_ROUND_NAME[rounding]}"
    for table, nseg, most in _tables(list(segments)):
        if nseg == 0:
            return
        args = (np.uint64(x_ptr), np.uint32(K), np.uint64(amax_ptr), np.float32(amax_value),
                np.uint64(seed & (2**64 - 1)), np.uint32(ncols_pad), table)
        _launch(device, name, -(-most // THREADS), nseg, args, stream)


def dequantize(device: int, out_ptr: int, out_dtype: str, K: int, format: str, layout: str,
               segments: Sequence[Tuple[int, int, int, int, int]], ncols_pad: int, stream: int) -> None:
    """Decode each segment's (data, scale, gs) into FP4 blocks of out.

    segments: (units, dst_block, data_ptr, scale_ptr, gs_ptr): `units` blocks written from block
    `dst_block` of out on; gs_ptr is the fp32 S_dec to decode with (NVFP4; ignored for MXFP4)."""
    name = f"fp4_dequant_{_FMT_NAME[format]}_{_IN_NAME[out_dtype]}_{_LAYOUT_NAME[layout]}"
    for table, nseg, most in _tables(list(segments)):
        if nseg == 0:
            return
        args = (np.uint64(out_ptr), np.uint32(K), np.uint32(ncols_pad), table)
        _launch(device, name, -(-most // THREADS), nseg, args, stream)
