"""The CUDA runtime pieces fp4ccl drives directly (through CuPy), and the driver calls CuPy does not
bind (through ctypes), resolved on first use."""
from __future__ import annotations

import ctypes
from typing import Dict, Sequence

_runtime = None
_driver_lib = None
_driver_fns: Dict[str, object] = {}


def runtime():
    """CuPy's binding of the CUDA runtime API (imported on first use: no CUDA work at import)."""
    global _runtime
    if _runtime is None:
        from cupy_backends.cuda.api import runtime as rt
        _runtime = rt
    return _runtime


class StreamRef:
    """What CuPy's Function.__call__ reads a stream from (only `.ptr`), for a raw handle."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = int(ptr)


def driver_function(name: str, argtypes: Sequence):
    """The libcuda entry point `name` with these argument types, returning a CUresult (int).
    Raises OSError without a driver library, AttributeError when the driver lacks the call."""
    global _driver_lib
    fn = _driver_fns.get(name)
    if fn is None:
        if _driver_lib is None:
            _driver_lib = ctypes.CDLL("libcuda.so.1")
        fn = getattr(_driver_lib, name)
        fn.argtypes = list(argtypes)
        fn.restype = ctypes.c_int
        _driver_fns[name] = fn
    return fn


# CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY: kernels keep the priority of the stream they were
# captured from, instead of all taking the priority of the stream the graph is launched into.
_USE_NODE_PRIORITY = 8


def instantiate_graph(graph: int) -> int:
    """An executable graph of `graph` whose kernels run at the priorities they were captured with."""
    exe = ctypes.c_void_p()
    fn = driver_function("cuGraphInstantiateWithFlags",
                         [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_ulonglong])
    rc = fn(ctypes.byref(exe), ctypes.c_void_p(graph), _USE_NODE_PRIORITY)
    if rc:
        raise RuntimeError(f"cuGraphInstantiateWithFlags failed (CUresult {rc})")
    return int(exe.value)
