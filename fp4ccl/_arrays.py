"""One adapter for every array framework fp4ccl accepts: torch, CuPy and numpy.

Everything below the Communicator sees an `ArrayInfo` (pointer, shape, canonical dtype name,
device, framework) and never imports a framework itself. Frameworks are imported lazily, only when
an object of theirs shows up, so `import fp4ccl` stays free of torch/CuPy/CUDA. The checks of the
scalar arguments that sit beside arrays in every call (integers, flags) live here too.
"""
from __future__ import annotations

import math
import operator
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


@dataclass(slots=True)
class ArrayInfo:
    """What the lower layers need to know about an array, and the array itself (`obj`).

    A slotted, non-frozen dataclass: built once or more per collective, so construction must cost
    no more than plain attribute stores (a frozen dataclass pays object.__setattr__ per field).
    Treat it as immutable all the same; `dataclasses.replace` still makes modified copies.
    """

    obj: Any
    framework: str          # "torch" | "cupy" | "numpy"
    ptr: int                # address of element 0 (0 for empty arrays is allowed)
    shape: tuple
    dtype: str              # canonical name, see ITEMSIZE
    device: Optional[int]   # CUDA ordinal, or None for host memory
    contiguous: bool
    writeable: bool = True  # False for a read-only numpy array (torch and CuPy have no such flag)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

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
    dt = _TORCH_OF_NAME.get(name)
    if dt is None:
        dt = getattr(torch, name, None)
        if dt is None:
            raise TypeError(f"this torch has no dtype {name!r}")
        _TORCH_OF_NAME[name] = dt
    return dt


# Per-call lookups keyed by objects the frameworks hand back (type(x), x.dtype): a dict probe is far
# cheaper than the string work dtype_name() does. Filled lazily, so no framework is imported here.
_TORCH_NAMES: dict = {}     # torch.dtype -> canonical name
_TORCH_OF_NAME: dict = {}   # canonical name -> torch.dtype
_HANDLERS: dict = {}        # type(x) -> the describe function for its framework
_TORCH_DEVICES: dict = {}   # ordinal (None: cpu) -> torch.device


def _torch_names(torch) -> dict:
    if not _TORCH_NAMES:
        for name in ITEMSIZE:
            dt = getattr(torch, name, None)
            if isinstance(dt, torch.dtype):
                _TORCH_NAMES[dt] = name
    return _TORCH_NAMES


def _describe_torch(x, name: str) -> ArrayInfo:
    if x.is_sparse:
        raise TypeError(f"{name}: sparse tensors are not supported")
    if x.is_cuda:
        dev = x.get_device()  # the ordinal itself, never None for a CUDA tensor
    elif x.is_cpu:
        dev = None
    else:
        raise TypeError(f"{name}: tensors on {x.device.type} are not supported (cpu or cuda)")
    dt = x.dtype
    dtype = _TORCH_NAMES.get(dt)
    if dtype is None:
        dtype = dtype_name(dt)  # raises the TypeError naming it when unsupported
    return ArrayInfo(x, "torch", x.data_ptr(), tuple(x.shape), dtype, dev, x.is_contiguous())


def _describe_cupy(x, name: str) -> ArrayInfo:
    dtype = _NAME_OF_NUMPY.get(x.dtype)
    if dtype is None:
        dtype = dtype_name(x.dtype)
    return ArrayInfo(x, "cupy", int(x.data.ptr), tuple(x.shape), dtype, int(x.device.id), bool(x.flags.c_contiguous))


def _describe_numpy(x, name: str) -> ArrayInfo:
    dtype = _NAME_OF_NUMPY.get(x.dtype)
    if dtype is None:
        dtype = dtype_name(x.dtype)
    flags = x.flags
    return ArrayInfo(x, "numpy", x.__array_interface__["data"][0], x.shape, dtype, None, bool(flags.c_contiguous),
                     bool(flags.writeable))


def _handler(cls, x, name: str):
    """The describe function for objects of type `cls`, cached; a TypeError naming `name` if none."""
    mod = cls.__module__.split(".")[0]
    if mod == "torch":
        import torch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected an array or tensor, got {cls.__name__}")
        _torch_names(torch)
        fn = _describe_torch
    elif mod == "cupy":
        fn = _describe_cupy
    elif isinstance(x, np.ndarray):
        fn = _describe_numpy
    else:
        raise TypeError(f"{name}: expected a torch tensor, CuPy array or numpy array, got {cls.__name__}")
    _HANDLERS[cls] = fn
    return fn


def describe(x: Any, name: str = "x") -> ArrayInfo:
    """Describe a torch tensor, CuPy array or numpy array; TypeError naming `name` for anything else."""
    cls = type(x)
    fn = _HANDLERS.get(cls)
    if fn is None:
        fn = _handler(cls, x, name)
    try:
        return fn(x, name)
    except TypeError as err:
        if str(err).startswith("unsupported dtype"):   # dtype_name cannot know which argument it was
            raise TypeError(f"{name}: {err}") from None
        raise


def empty(like: ArrayInfo, shape: Sequence[int], dtype: Optional[str] = None) -> Any:
    """A new uninitialised array in `like`'s framework and on its device."""
    return new(like, tuple(int(s) for s in shape), dtype)[0]


def new(like: ArrayInfo, shape: tuple, dtype: Optional[str] = None):
    """(array, its ArrayInfo): `empty` without describing the result again. `shape`: a tuple of ints."""
    dtype = dtype or like.dtype
    fw = like.framework
    if fw == "torch":
        import torch
        dev = like.device
        where = _TORCH_DEVICES.get(dev)
        if where is None:
            where = _TORCH_DEVICES[dev] = torch.device("cpu" if dev is None else f"cuda:{dev}")
        tdt = _TORCH_OF_NAME.get(dtype) or _torch_dtype(torch, dtype)
        # Sizes as separate arguments: torch parses them faster than one tuple (not for 0-d).
        obj = torch.empty(*shape, dtype=tdt, device=where) if shape else torch.empty(shape, dtype=tdt, device=where)
        return obj, ArrayInfo(obj, "torch", obj.data_ptr(), shape, dtype, dev, True)
    if fw == "cupy":
        import cupy
        if cupy.cuda.runtime.getDevice() == like.device:
            obj = cupy.empty(shape, dtype=numpy_dtype(dtype))
        else:
            with cupy.cuda.Device(like.device):
                obj = cupy.empty(shape, dtype=numpy_dtype(dtype))
        return obj, ArrayInfo(obj, "cupy", int(obj.data.ptr), shape, dtype, like.device, True)
    obj = np.empty(shape, dtype=numpy_dtype(dtype))
    return obj, ArrayInfo(obj, "numpy", obj.__array_interface__["data"][0], shape, dtype, None, True)


def mark_written(x: Any) -> None:
    """Tell torch's autograd that our kernels write into the torch tensor x (a no-op for other arrays).

    Writes through a data pointer are invisible to autograd: without this, a backward pass that saved x
    earlier would use the new values silently, where a torch in-place op makes it fail loudly."""
    if x.__class__.__module__.startswith("torch"):
        sys.modules["torch"].autograd.graph.increment_version(x)   # x is a tensor: torch is imported


def check_writeable(info: ArrayInfo, name: str) -> None:
    """For an array a call writes into: ValueError for a read-only numpy array; a torch tensor is marked
    as modified in place (mark_written)."""
    if not info.writeable:
        raise ValueError(f"{name} is a read-only numpy array (flags.writeable is False), but this call "
                         f"writes into it")
    mark_written(info.obj)


def check_flag(value: Any, name: str) -> None:
    """TypeError unless value is True, False (a numpy bool too) or None: bool("no") is True, so a flag
    given as anything else would be read as set."""
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")


def as_int(value: Any, name: str) -> int:
    """value as an int: any integral type (int, numpy integer, 0-d integer tensor), through operator.index;
    a TypeError naming `name` for anything else. A float is refused (int() would truncate a row start of
    0.5 to 0), and so is bool, for ranks and row counts alike: True would quietly mean 1."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def host_view(info: ArrayInfo) -> np.ndarray:
    """A numpy array sharing memory with a host (CPU) array; bf16/fp8 torch tensors keep their dtype."""
    if info.device is not None:
        raise TypeError(f"host_view needs a host array, got one on {info.where()}")
    if info.framework == "numpy":
        return info.obj
    t = info.obj
    if t.requires_grad:  # numpy() refuses such tensors; fp4ccl only moves their data, as on the GPU
        t = t.detach()
    if info.dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import torch
        raw = t.view(torch.int16 if info.itemsize == 2 else torch.uint8)
        return raw.numpy().view(numpy_dtype(info.dtype))
    return t.numpy()


def current_stream(info: ArrayInfo, stream: Any = None) -> int:
    """The CUDA stream handle to enqueue on: `stream` if given, else the framework's current stream."""
    if stream is not None:
        return stream_handle(stream)
    fw = info.framework
    if fw == "torch":
        if info.device is None:  # not a CUDA array: let torch say what it makes of that
            import torch
            return int(torch.cuda.current_stream(info.obj.device).cuda_stream)
        return torch_current_stream(info.device)
    if fw == "cupy":
        return (_cupy_stream or _resolve_cupy_stream())()
    return 0


# Resolved on first use. torch.cuda.current_stream() builds a Stream object per call (microseconds);
# the raw getter returns the handle itself. Kept behind a fallback: it is torch-internal.
_torch_stream = None
_cupy_stream = None


def _resolve_torch_stream():
    global _torch_stream
    import torch
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        _torch_stream = raw
    else:
        _torch_stream = torch_stream_public
    return _torch_stream


def torch_current_stream(device: int) -> int:
    """The raw handle of torch's current stream on `device` (the fast getter where torch has it)."""
    return (_torch_stream or _resolve_torch_stream())(device)


def torch_stream_public(device: int) -> int:
    """The current torch stream of `device` through the public API (the raw getter's fallback)."""
    import torch
    return int(torch.cuda.current_stream(device).cuda_stream)


def _resolve_cupy_stream():
    global _cupy_stream
    import cupy
    get = cupy.cuda.get_current_stream

    def ptr() -> int:
        return get().ptr
    _cupy_stream = ptr
    return ptr


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
