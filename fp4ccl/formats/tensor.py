"""FP4Tensor and the layouts shared by the numpy reference and the CUDA kernels.

Nothing here imports a framework: arrays are whatever the producer made (numpy, torch or CuPy).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Tuple

from .._arrays import as_int

FORMATS = ("nvfp4", "mxfp4")
BLOCK_SIZE = {"nvfp4": 16, "mxfp4": 32}
SCALE_LAYOUTS = ("linear", "swizzled")
ROUNDINGS = ("nearest", "stochastic")
INPUT_DTYPES = ("bfloat16", "float16", "float32")
ALIGN = 16  # every segment of a packed FP4 tensor starts on a 16-byte boundary


def check_format(format: str) -> int:
    """The block size of `format`; ValueError naming the accepted formats otherwise."""
    try:
        return BLOCK_SIZE[format]
    except (KeyError, TypeError):
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}") from None


def check_k(K: int, format: str) -> int:
    bs = check_format(format)
    if as_int(K, "K") <= 0 or K % bs:
        raise ValueError(f"{format}: the last dimension K={K} must be a positive multiple of the block size {bs}")
    return bs


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class PackedLayout(NamedTuple):
    """Byte offsets, from a segment's start, of one packed FP4 tensor of `rows` x K (see docs/FP4.md)."""

    data_off: int     # always 0: rows * K / 2 bytes of packed E2M1, row-major
    scale_off: int    # rows * K / block bytes of linear block scales
    gs_off: int       # nvfp4: 4 bytes, the fp32 global decode scale S_dec; mxfp4: == total_bytes (none)
    total_bytes: int  # the segment's size, a multiple of 16


# On every collective call's path; a pure function of its arguments. typed: 4 and 4.0 compare equal, so an
# untyped cache would answer packed_layout(4.0, ...) from packed_layout(4, ...) instead of refusing it.
@functools.lru_cache(maxsize=4096, typed=True)
def packed_layout(rows: int, K: int, format: str) -> PackedLayout:
    """The packed wire layout of a [rows, K] FP4 tensor: [data | scales | global scale], each segment
    16-byte aligned, total a multiple of 16 so segments of several tensors can follow each other."""
    bs = check_k(K, format)
    if as_int(rows, "rows") < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    data = rows * K // 2
    scale_off = _align(data)
    gs_off = _align(scale_off + rows * K // bs)
    total = gs_off + (ALIGN if format == "nvfp4" else 0)
    return PackedLayout(0, scale_off, gs_off, total)


def swizzled_shape(rows: int, ncols: int) -> Tuple[int, int]:
    """(rows padded to 128, scale columns padded to 4) of the swizzled layout."""
    return (-(-rows // 128) * 128, -(-ncols // 4) * 4)


def scale_nbytes(rows: int, ncols: int, layout: str) -> int:
    if layout == "linear":
        return rows * ncols
    r, c = swizzled_shape(rows, ncols)
    return r * c if rows else 0


def swizzle_offset(r, c, ncols: int):
    """Byte offset of block scale (r, c) in the swizzled layout (ints or integer numpy arrays)."""
    ncols_pad = -(-ncols // 4) * 4
    tile = (r // 128) * (ncols_pad // 4) + c // 4
    return tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


@dataclass
class FP4Tensor:
    """A quantized tensor: packed E2M1 data, one scale byte per block, and (NVFP4) a global scale.

    data:         uint8 [..., K/2]; byte j of a row holds element 2j in its low nibble, 2j+1 in the high
    scales:       uint8; linear [..., K/block] (E4M3 for nvfp4, E8M0 for mxfp4) or the swizzled flat layout
    global_scale: nvfp4: a 0-d fp32 array holding S_dec (the decode factor) in the data's framework and
                  on its device, so nothing syncs the host; mxfp4: None
    format:       "nvfp4" | "mxfp4"
    shape:        the logical shape [..., K]
    scale_layout: "linear" | "swizzled"
    dtype:        canonical name of the dtype the tensor was quantized from (dequantize's default)
    """

    data: Any
    scales: Any
    global_scale: Any
    format: str
    shape: Tuple[int, ...]
    scale_layout: str = "linear"
    dtype: str = "float32"

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE[self.format]

    @property
    def K(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def nbytes(self) -> int:
        n = self.rows * self.K // 2 + scale_nbytes(self.rows, self.K // self.block_size, self.scale_layout)
        return n + (4 if self.format == "nvfp4" else 0)

    def dequantize(self, dtype: Optional[Any] = None, *, out: Any = None, stream: Any = None):
        """Decode to `dtype` (default: the dtype it was quantized from); see fp4ccl.dequantize."""
        from .api import dequantize
        return dequantize(self, dtype, out=out, stream=stream)

    # Zero-copy typed views -------------------------------------------------------------------
    def typed_data(self):
        """`data` viewed as torch.float4_e2m1fn_x2 (torch only, where torch has that dtype)."""
        import torch
        if not isinstance(self.data, torch.Tensor) or not hasattr(torch, "float4_e2m1fn_x2"):
            raise TypeError("typed_data needs torch tensors and a torch with float4_e2m1fn_x2")
        return self.data.view(torch.float4_e2m1fn_x2)

    def typed_scales(self):
        """`scales` viewed as float8_e4m3fn (nvfp4) or float8_e8m0fnu (mxfp4): a torch view where torch
        has the dtype, an ml_dtypes view for numpy; TypeError for CuPy (no fp8 dtypes)."""
        name = "float8_e4m3fn" if self.format == "nvfp4" else "float8_e8m0fnu"
        mod = type(self.scales).__module__.split(".")[0]
        if mod == "torch":
            import torch
            dt = getattr(torch, name, None)
            if dt is None:
                raise TypeError(f"this torch has no {name}")
            return self.scales.view(dt)
        if mod == "numpy":
            import ml_dtypes
            return self.scales.view(getattr(ml_dtypes, name))
        raise TypeError(f"typed_scales: {mod} arrays have no {name} dtype; use .scales (uint8)")

    def __repr__(self) -> str:
        return (f"FP4Tensor(format={self.format!r}, shape={tuple(self.shape)}, scale_layout={self.scale_layout!r}, "
                f"dtype={self.dtype!r}, data={type(self.data).__module__.split('.')[0]})")


@dataclass(repr=False)
class GatheredFP4Tensor(FP4Tensor):
    """An FP4 tensor gathered from several ranks: rows [row_offsets[r], row_offsets[r+1]) came from rank r.

    NVFP4 with per-rank global scales: `global_scale` is an fp32 array of one S_dec per rank; with one
    shared scale, a 0-d array as in FP4Tensor. MXFP4: None.
    """

    row_offsets: Tuple[int, ...] = ()

    def dequantize(self, dtype: Optional[Any] = None, *, out: Any = None, stream: Any = None):
        """Decode every rank's rows with that rank's global scale; see fp4ccl.dequantize."""
        from .api import dequantize
        return dequantize(self, dtype, out=out, stream=stream)
