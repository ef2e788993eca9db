"""FP4 formats: NVFP4 and MXFP4 quantize/dequantize, FP4Tensor, and the packed wire layout.

numpy (and CPU torch) arrays go through the numpy reference codec in `reference`; torch/CuPy arrays
on a GPU through the CUDA kernels in csrc/fp4.cu. Importing this package touches no GPU framework.
"""
from .api import amax, dequantize, dequantize_packed, quantize, quantize_packed, unpack_packed
from .tensor import (BLOCK_SIZE, FORMATS, INPUT_DTYPES, ROUNDINGS, SCALE_LAYOUTS, FP4Tensor, GatheredFP4Tensor,
                     PackedLayout,
                     packed_layout, scale_nbytes, swizzle_offset, swizzled_shape)

__all__ = ["quantize", "dequantize", "amax", "FP4Tensor", "GatheredFP4Tensor", "quantize_packed", "dequantize_packed", "unpack_packed",
           "packed_layout", "PackedLayout", "BLOCK_SIZE", "FORMATS", "INPUT_DTYPES", "ROUNDINGS", "SCALE_LAYOUTS",
           "scale_nbytes", "swizzle_offset", "swizzled_shape"]
