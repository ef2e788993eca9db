"""The CUDA runtime pieces fp4ccl drives directly (through CuPy), resolved on first use."""
from __future__ import annotations

_runtime = None


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
