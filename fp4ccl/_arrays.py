"""One adapter for every array framework fp4ccl accepts: torch, CuPy and numpy.

Everything below the Communicator sees an `ArrayInfo` (pointer, shape, canonical dtype name,
device, framework) and never imports a framework itself. Frameworks are imported lazily, only when
an object of theirs shows up, so `import fp4ccl` stays free of torch/CuPy/CUDA.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import ml_dtypes
import numpy as np

# Canonical dtype names, the currency between layers.
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int8": 1, "int32": 4, "int64": 8, "uint8": 1, "uint32": 4, "uint64": 8,
    "int16": 2, "uint16": 2, "bool": 1,
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")

_NUMPY_DTYPES = {
    "float64": np.dtype(np.float64), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2), "int8": np.dtype(np.int8), "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32), "int64": np.dtype(np.int64), "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}
_NAME_OF_NUMPY = {v: k for k, v in _NUMPY_DTYPES.items()}


@dataclass(frozen=True)
class ArrayInfo:
    """What the lower layers need to know about an array, and the array itself (`obj`)."""

    obj: Any
    framework: str          # "torch" | "cupy" | "numpy"
    ptr: int                # address of element 0 (0 for empty arrays is allowed)
    shape: tuple
    dtype: str              # canonical name, see ITEMSIZE
    device: Optional[int]   # CUDA ordinal, or None for host memory
    contiguous: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    @property
    def is_cuda(self) -> bool:
        return self.device is not None

    def where(self) -> str:
        return f"cuda:{self.device}" if self.device is not None else "cpu"


def numpy_dtype(name: str) -> np.dtype:
    """The numpy (ml_dtypes) dtype for a canonical dtype name."""
    try:
        return _NUMPY_DTYPES[name]
    except KeyError:
        raise TypeError(f"unsupported dtype {name!r}; supported: {', '.join(_NUMPY_DTYPES)}") from None


def dtype_name(dtype: Any) -> str:
    """Canonical name for a numpy/ml_dtypes/torch/CuPy dtype object or a string."""
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        if name in ITEMSIZE:
            return name
        aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16",
                   "float": "float32", "double": "float64", "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}
        if name in aliases:
            return aliases[name]
        raise TypeError(f"unsupported dtype {dtype!r}; supported: {', '.join(ITEMSIZE)}")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return dtype_name(str(dtype))
    try:
        return _NAME_OF_NUMPY[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TypeError(f"unsupported dtype {dtype!r}; supported: {', '.join(ITEMSIZE)}") from None


def _torch_dtype(torch, name: str):
    dt = getattr(torch, name, None)
    if dt is None:
        raise TypeError(f"this torch has no dtype {name!r}")
    return dt


def describe(x: Any, name: str = "x") -> ArrayInfo:
    """Describe a torch tensor, CuPy array or numpy array; TypeError naming `name` for anything else."""
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        import torch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected an array or tensor, got {type(x).__name__}")
        if x.is_sparse:
            raise TypeError(f"{name}: sparse tensors are not supported")
        dev = x.device.index if x.device.type == "cuda" else None
        if x.device.type not in ("cuda", "cpu"):
            raise TypeError(f"{name}: tensors on {x.device.type} are not supported (cpu or cuda)")
        if dev is None and x.device.type == "cuda":
            dev = torch.cuda.current_device()
        return ArrayInfo(x, "torch", x.data_ptr(), tuple(x.shape), dtype_name(x.dtype), dev, x.is_contiguous())
    if mod == "cupy":
        return ArrayInfo(x, "cupy", int(x.data.ptr), tuple(x.shape), dtype_name(x.dtype), int(x.device.id),
                         bool(x.flags.c_contiguous))
    if isinstance(x, np.ndarray):
        return ArrayInfo(x, "numpy", int(x.ctypes.data), tuple(x.shape), dtype_name(x.dtype), None,
                         bool(x.flags.c_contiguous))
    raise TypeError(f"{name}: expected a torch tensor, CuPy array or numpy array, got {type(x).__name__}")


def empty(like: ArrayInfo, shape: Sequence[int], dtype: Optional[str] = None) -> Any:
    """A new uninitialised array in `like`'s framework and on its device."""
    dtype = dtype or like.dtype
    shape = tuple(int(s) for s in shape)
    if like.framework == "torch":
        import torch
        return torch.empty(shape, dtype=_torch_dtype(torch, dtype), device=like.obj.device)
    if like.framework == "cupy":
        import cupy
        with cupy.cuda.Device(like.device):
            return cupy.empty(shape, dtype=numpy_dtype(dtype))
    return np.empty(shape, dtype=numpy_dtype(dtype))


def host_view(info: ArrayInfo) -> np.ndarray:
    """A numpy array sharing memory with a host (CPU) array; bf16/fp8 torch tensors keep their dtype."""
    if info.device is not None:
        raise TypeError(f"host_view needs a host array, got one on {info.where()}")
    if info.framework == "numpy":
        return info.obj
    t = info.obj
    if info.dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import torch
        raw = t.view(torch.int16 if info.itemsize == 2 else torch.uint8)
        return raw.numpy().view(numpy_dtype(info.dtype))
    return t.numpy()


def current_stream(info: ArrayInfo, stream: Any = None) -> int:
    """The CUDA stream handle to enqueue on: `stream` if given, else the framework's current stream."""
    if stream is not None:
        return stream_handle(stream)
    if info.framework == "torch":
        import torch
        return int(torch.cuda.current_stream(info.obj.device).cuda_stream)
    if info.framework == "cupy":
        import cupy
        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def stream_handle(stream: Any) -> int:
    """A raw cudaStream_t from an int, a torch.cuda.Stream or a CuPy stream."""
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr"):  # torch, CuPy
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise TypeError(f"stream: expected an int handle, torch.cuda.Stream or cupy Stream, got {type(stream).__name__}")


def as_cupy(info: ArrayInfo):
    """A zero-copy CuPy view of a GPU array (bf16 viewed as uint16, fp8 as uint8: CuPy lacks them)."""
    import cupy
    if info.framework == "cupy":
        return info.obj
    raw_dtype = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}.get(info.dtype)
    dtype = np.dtype(raw_dtype) if raw_dtype else numpy_dtype(info.dtype)
    nbytes = info.nbytes
    mem = cupy.cuda.UnownedMemory(info.ptr, nbytes, info.obj, device_id=info.device)
    return cupy.ndarray(info.shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))
