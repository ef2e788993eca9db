"""fp4ccl: collective communication for GPU jobs that move low-precision (FP4) data."""
from __future__ import annotations

__version__ = "0.1.0"

# Public names resolve lazily so that `import fp4ccl` never touches torch, CuPy, CUDA or NCCL.
_LAZY = {
    "init": "fp4ccl.communicator",
    "Communicator": "fp4ccl.communicator",
    "NcclError": "fp4ccl.errors",
    "Fp4cclError": "fp4ccl.errors",
    "CommTimeoutError": "fp4ccl.errors",
    "CommClosedError": "fp4ccl.errors",
    "CallMismatchError": "fp4ccl.errors",
    "quantize": "fp4ccl.formats",
    "dequantize": "fp4ccl.formats",
    "FP4Tensor": "fp4ccl.formats",
    "GatheredFP4Tensor": "fp4ccl.formats",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fp4ccl' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
