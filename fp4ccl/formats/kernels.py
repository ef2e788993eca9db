"""Launchers for the CUDA kernels in csrc/fp4.cu (compiled by fp4ccl.jit).

Everything takes raw device pointers and a raw cudaStream_t, so torch tensors and CuPy arrays go
through the same code. No launch syncs the host; nothing allocates except the caller.

The FP4 collectives call these several times per collective, so a launch must cost little Python.
Per (thread, device, kernel) the launcher keeps one argument block that it fills in place: a ctypes
struct whose field addresses form the `void**` that cuLaunchKernel reads (the fast path, through the
CUfunction handle CuPy exposes as `Function.ptr`), or the one-element numpy table CuPy passes by value
(the fallback). Both are safe to reuse as soon as the launch call returned: cuLaunchKernel copies the
parameter values when it enqueues the launch (CuPy itself only wraps the numpy table's buffer address,
`CNumpyArray` in cupy/cuda/function.pyx, and hands it to cuLaunchKernel). Thread-local, so concurrent
launches from several threads never share one. `FP4CCL_LAUNCH=cupy` forces the CuPy path.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .. import jit
from .._cuda import StreamRef, runtime as _rt
from .._log import get_logger
from .seeds import Seed, kernel_args

_log = get_logger("fp4ccl.kernels")

SOURCE = "fp4.cu"
THREADS = 256        # FP4_THREADS in csrc/fp4.cu
MAXSEG = 8           # FP4_MAXSEG in csrc/fp4.cu
MAXSUM = 128         # FP4_MAXSUM in csrc/fp4.cu: contributions per dequantize_sum launch
_FIELDS = ("units", "src", "data", "scale", "gs")
# Mirrors `struct SegTable` (five arrays of MAXSEG u64); passed by value as a one-element array.
SEG_DTYPE = np.dtype([(f, "<u8", (MAXSEG,)) for f in _FIELDS])
# Mirrors `struct SumTable` (data, scale, gs: three arrays of MAXSUM u64).
SUM_DTYPE = np.dtype([(f, "<u8", (MAXSUM,)) for f in ("data", "scale", "gs")])
_IN_NAME = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
_FMT_NAME = {"nvfp4": "nv", "mxfp4": "mx"}
_LAYOUT_NAME = {"linear": "lin", "swizzled": "swz"}
_ROUND_NAME = {"nearest": "rn", "stochastic": "sr"}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
_BLOCK = {"nvfp4": 16, "mxfp4": 32}

# kernel name per option tuple, built once (f-strings per call were a measurable part of a launch)
_QUANT_NAMES = {(f, t, lay, r): f"fp4_quant_{fn}_{tn}_{ln}_{rn}"
                for f, fn in _FMT_NAME.items() for t, tn in _IN_NAME.items()
                for lay, ln in _LAYOUT_NAME.items() for r, rn in _ROUND_NAME.items()}
_DEQUANT_NAMES = {(f, t, lay): f"fp4_dequant_{fn}_{tn}_{ln}"
                  for f, fn in _FMT_NAME.items() for t, tn in _IN_NAME.items() for lay, ln in _LAYOUT_NAME.items()}
_SUM_NAMES = {(f, t): f"fp4_dqsum_{fn}_{tn}" for f, fn in _FMT_NAME.items() for t, tn in _IN_NAME.items()}
_AMAX_NAMES = {t: f"fp4_amax_{tn}" for t, tn in _IN_NAME.items()}
_SMALL_NAMES = {t: f"fp4_quant_small_nv_{tn}" for t, tn in _IN_NAME.items()}
SMALL_CTAS = 8       # FP4_SMALL_CTAS in csrc/fp4.cu: the cluster (and grid) of quantize_small_nvfp4
SMALL_MIN_ARCH = 90  # thread-block clusters
_LL_NAMES = {(f, t): f"fp4_gather_ll_{fn}_{tn}" for f, fn in _FMT_NAME.items() for t, tn in _IN_NAME.items()}
_RS_LL_NAMES = {(f, t, r): f"fp4_rs_ll_{fn}_{tn}_{rn}" for f, fn in _FMT_NAME.items() for t, tn in _IN_NAME.items()
                for r, rn in _ROUND_NAME.items()}
LL_CLUSTER = 8       # FP4_LL_CLUSTER in csrc/fp4.cu: CTAs per cluster of gather_ll and reduce_scatter_ll
LL_MAXRANKS = 8      # FP4_LL_MAXRANKS
LL_MAXCTAS = 32      # FP4_LL_MAXCTAS: its grid; flag words per source rank and half, epoch counters

# argument kinds of each kernel family, in C order; "seg"/"sum" is the by-value table
_SIGNATURES = {
    "amax": ("u64", "u64", "u64", "u32"),
    "quant": ("u64", "u32", "u64", "u32", "f32", "u64", "u64", "u64", "u32", "seg"),
    "dequant": ("u64", "u32", "u32", "seg"),
    "dqsum": ("u64", "u32", "u32", "u32", "sum"),
    "qsmall": ("u64", "u64", "u32", "seg"),
    "gll": ("u64", "u64", "u64", "u64", "u64", "u64", "u64", "u32", "u32", "ll"),
    "rsll": ("u64", "u64", "u64", "u64", "u64", "u64", "u32", "u32", "ll"),
    # kernels of other modules launched through launcher() (csrc/symm.cu, csrc/vcopy.cu)
    "symm_barrier_dev": ("u64", "i32", "i32", "u64", "u64"),
    "symm_barrier_checked": ("u64", "i32", "i32", "u64", "u32", "u64", "u64"),
    "vcopy": ("vtab",),
}
VCOPY_MAXSEG = 128   # VCOPY_MAXSEG in csrc/vcopy.cu: segments per launch (src, dst, nbytes arrays)
# u64 words of each by-value table ("ll": LLTable's five arrays, then seed_ptr, seed_mul, err and sig)
_TABLES = {"seg": 5 * MAXSEG, "sum": 3 * MAXSUM, "vtab": 3 * VCOPY_MAXSEG, "ll": 5 * LL_MAXRANKS + 4}
_CTYPES = {"u64": ctypes.c_uint64, "u32": ctypes.c_uint32, "i32": ctypes.c_int32, "f32": ctypes.c_float,
           **{k: ctypes.c_uint64 * n for k, n in _TABLES.items()}}
_NUMPY = {"u64": np.uint64, "u32": np.uint32, "i32": np.int32, "f32": np.float32}

_lock = threading.Lock()
_functions: Dict[Tuple[int, str], object] = {}
_grids: Dict[Tuple[int, str], int] = {}
_tls = threading.local()




# ------------------------------------------------------------------------------ the driver entry point
_driver = None          # ctypes cuLaunchKernel, False when unavailable or disabled


def _cu_launch():
    global _driver
    if _driver is None:
        fn = False
        if os.environ.get("FP4CCL_LAUNCH", "").lower() != "cupy":
            try:
                lib = ctypes.CDLL("libcuda.so.1")
                fn = lib.cuLaunchKernel
                # CUresult cuLaunchKernel(CUfunction f, unsigned gridDimX, gridDimY, gridDimZ,
                #     unsigned blockDimX, blockDimY, blockDimZ, unsigned sharedMemBytes, CUstream hStream,
                #     void** kernelParams, void** extra)
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p, ctypes.c_void_p,
                                                                          ctypes.c_void_p]
            except (OSError, AttributeError) as exc:
                _log.info("cuLaunchKernel through ctypes unavailable (%s); launching through CuPy", exc)
                fn = False
        _driver = fn
    return _driver


# CUlaunchAttribute (an id, padding to 8 bytes, a 64-byte value union) and CUlaunchConfig of cuda.h
class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("nattrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6     # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_driver_ex = None       # ctypes cuLaunchKernelEx, False when unavailable or disabled


def _cu_launch_ex():
    """cuLaunchKernelEx, for programmatic dependent launches; False where it is missing, where launches
    go through CuPy, or where FP4CCL_PDL=0."""
    global _driver_ex
    if _driver_ex is None:
        fn = False
        if _cu_launch() and os.environ.get("FP4CCL_PDL", "1") != "0":
            try:
                fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
                # CUresult cuLaunchKernelEx(const CUlaunchConfig*, CUfunction, void** kernelParams, void** extra)
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            except (OSError, AttributeError) as exc:
                _log.info("cuLaunchKernelEx unavailable (%s); no programmatic dependent launches", exc)
                fn = False
        _driver_ex = fn
    return _driver_ex


def set_launch_mode(mode: str) -> None:
    """'ctypes' (cuLaunchKernel through ctypes, the default where libcuda loads) or 'cupy' (CuPy's
    Function.__call__). For the bench and tests; FP4CCL_LAUNCH=cupy sets it from the environment."""
    global _driver, _driver_ex
    if mode not in ("ctypes", "cupy"):
        raise ValueError(f"mode: expected 'ctypes' or 'cupy', got {mode!r}")
    _driver_ex = None
    if mode == "cupy":
        _driver = False
    else:
        _driver = None
        os.environ.pop("FP4CCL_LAUNCH", None)
        if _cu_launch() is False:
            raise RuntimeError("cuLaunchKernel is not reachable through ctypes (libcuda.so.1 did not load)")


def launch_mode() -> str:
    return "ctypes" if _cu_launch() else "cupy"


class _Launch:
    """One kernel on one device, for one thread: its function, grid cap and a reusable argument block."""

    __slots__ = ("fn", "fptr", "cap", "vals", "params", "table", "np_args", "np_table", "block", "config")

    def __init__(self, device: int, name: str, kind: str, fn=None, block: int = THREADS):
        own = fn is None
        self.fn = _function(device, name) if own else fn
        self.fptr = int(self.fn.ptr)
        self.block = block
        self.cap = _resident_blocks(device, name, self.fn) if own else 0
        sig = _SIGNATURES[kind]
        self.vals = [_CTYPES[k]() for k in sig]
        self.params = (ctypes.c_void_p * len(sig))(*[ctypes.addressof(v) for v in self.vals])
        self.table = None
        self.np_table = None
        if sig[-1] in _TABLES:
            self.table = np.ctypeslib.as_array(self.vals[-1])       # a view: writes land in the ctypes block
            self.np_table = np.zeros(1, dtype=np.dtype([("t", "<u8", (_TABLES[sig[-1]],))]))
        self.np_args = [_NUMPY[k] for k in sig if k in _NUMPY]
        self.config = None

    def after_previous_kernel(self, device: int, gx: int, gy: int, stream: int, *scalars) -> None:
        """Like a call, but as a programmatic dependent launch (sm_90+): the grid may start while the
        kernel before it on the stream is finishing, so the kernel must wait (griddepcontrol.wait)
        before it reads what that kernel wrote. A plain launch where that is unavailable."""
        ex = _driver_ex if _driver_ex is not None else _cu_launch_ex()
        if ex and _current_device() == device:
            if self.config is None:
                attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
                self.config = (_LaunchConfig(block=(ctypes.c_uint * 3)(self.block, 1, 1), nattrs=1), attr)
                self.config[0].attrs = ctypes.pointer(attr)
            cfg = self.config[0]
            for i, v in enumerate(scalars):
                self.vals[i].value = v
            cfg.grid[0], cfg.grid[1], cfg.grid[2] = gx, gy, 1
            cfg.stream = stream
            if ex(ctypes.byref(cfg), self.fptr, self.params, None) == 0:
                return
        self(device, gx, gy, stream, *scalars)

    def __call__(self, device: int, gx: int, gy: int, stream: int, *scalars) -> None:
        vals = self.vals
        for i, v in enumerate(scalars):
            vals[i].value = v
        cu = _driver if _driver is not None else _cu_launch()
        if cu:
            cur = _current_device()
            if cur == device:
                if cu(self.fptr, gx, gy, 1, self.block, 1, 1, 0, stream, self.params, None) == 0:
                    return
            # another device is current, or no context on this thread yet: CuPy sets both up
        self._cupy(device, gx, gy, stream, scalars)

    def _cupy(self, device, gx, gy, stream, scalars) -> None:
        import cupy
        args = [t(v) for t, v in zip(self.np_args, scalars)]
        if self.table is not None:
            self.np_table.view(np.uint64)[:] = self.table
            args.append(self.np_table)
        with cupy.cuda.Device(device):
            self.fn((gx, gy, 1), (self.block, 1, 1), tuple(args), 0, StreamRef(stream))




def _current_device() -> int:
    return _rt().getDevice()


def launcher(device: int, name: str, kind: str, load_function=None, block: int = THREADS) -> _Launch:
    """The cached (per thread and device) fast launcher of kernel `name`: one of csrc/fp4.cu, or, with
    `load_function` (called once; returns its CuPy Function), of another csrc module. `kind` names its
    argument signature in _SIGNATURES. Call it as la(device, grid_x, grid_y, stream, *scalars) after
    filling la.table."""
    cache = getattr(_tls, "launch", None)
    if cache is None:
        cache = _tls.launch = {}
    key = (device, name)
    la = cache.get(key)
    if la is None:
        la = cache[key] = _Launch(device, name, kind, load_function() if load_function else None, block)
    return la


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


def kernel_names() -> List[str]:
    """Every kernel name csrc/fp4.cu must export (tests check the list against the source)."""
    names = [f"fp4_amax_{t}" for t in _IN_NAME.values()]
    for f in _FMT_NAME.values():
        for t in _IN_NAME.values():
            for lay in _LAYOUT_NAME.values():
                names += [f"fp4_quant_{f}_{t}_{lay}_{r}" for r in _ROUND_NAME.values()]
                names.append(f"fp4_dequant_{f}_{t}_{lay}")
    return (names + list(_SUM_NAMES.values()) + list(_SMALL_NAMES.values()) + list(_LL_NAMES.values())
            + list(_RS_LL_NAMES.values()))


# ------------------------------------------------------------------------------ copies
def memset(device: int, ptr: int, value: int, nbytes: int, stream: int) -> None:
    if nbytes:
        runtime = _rt()
        if runtime.getDevice() == device:
            runtime.memsetAsync(ptr, value, nbytes, stream)
            return
        import cupy
        with cupy.cuda.Device(device):
            runtime.memsetAsync(int(ptr), int(value), int(nbytes), int(stream))


def memcpy(device: int, dst: int, src: int, nbytes: int, stream: int) -> None:
    if nbytes:
        runtime = _rt()
        if runtime.getDevice() == device:
            runtime.memcpyAsync(dst, src, nbytes, runtime.memcpyDeviceToDevice, stream)
            return
        import cupy
        with cupy.cuda.Device(device):
            runtime.memcpyAsync(int(dst), int(src), int(nbytes), runtime.memcpyDeviceToDevice, int(stream))


# ------------------------------------------------------------------------------ kernels
def amax(device: int, x_ptr: int, in_dtype: str, numel: int, out_ptr: int, stream: int) -> None:
    """*out = max |x| over finite elements (fp32). numel * itemsize must be a multiple of 16 bytes."""
    memset(device, out_ptr, 0, 4, stream)
    nvec = numel * _ITEMSIZE[in_dtype] // 16
    if nvec:
        la = launcher(device, _AMAX_NAMES[in_dtype], "amax")
        la(device, _amax_grid(la, nvec), 1, stream, x_ptr, nvec, out_ptr, 0)


def amax_partials_count(device: int, in_dtype: str, numel: int, limit: int = 0) -> int:
    """How many fp32 values amax_partials() writes for `numel` elements (0 for an empty x)."""
    nvec = numel * _ITEMSIZE[in_dtype] // 16
    return _amax_grid(launcher(device, _AMAX_NAMES[in_dtype], "amax"), nvec, limit) if nvec else 0


def amax_partials(device: int, x_ptr: int, in_dtype: str, numel: int, out_ptr: int, stream: int,
                  limit: int = 0) -> int:
    """out[0:n] = the max |x| over finite elements of n disjoint shares of x, n =
    amax_partials_count(...) (at most `limit` when given), returned; their max is amax()'s result. Needs
    no zeroed word, so it is one graph node where amax() is two; quantize(amax_ptr=out, amax_n=n) takes
    the max itself."""
    nvec = numel * _ITEMSIZE[in_dtype] // 16
    if nvec == 0:
        return 0
    la = launcher(device, _AMAX_NAMES[in_dtype], "amax")
    gx = _amax_grid(la, nvec, limit)
    la(device, gx, 1, stream, x_ptr, nvec, out_ptr, 1)
    return gx


def _amax_grid(la: "_Launch", nvec: int, limit: int = 0) -> int:
    return min(-(-nvec // THREADS), la.cap, limit or la.cap)


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


def _fill_segments(table: np.ndarray, chunk) -> int:
    """Writes (units, src, data, scale, gs) of each segment into the flat u64 view of a SegTable (field
    f of segment j at f * MAXSEG + j); returns the largest `units`. Entries past len(chunk) keep stale
    values: the kernel reads only entry blockIdx.y < len(chunk)."""
    most = 0
    for j, (units, src, data, scale, gs) in enumerate(chunk):
        table[j] = units
        table[MAXSEG + j] = src
        table[2 * MAXSEG + j] = data
        table[3 * MAXSEG + j] = scale
        table[4 * MAXSEG + j] = gs
        if units > most:
            most = units
    return most


def _grid(units: int, cap: int, nseg: int) -> int:
    per_seg = cap // nseg if nseg > 1 else cap
    return max(1, min(-(-units // THREADS), max(1, per_seg)))


def quantize(device: int, x_ptr: int, in_dtype: str, K: int, format: str, layout: str, rounding: str,
             seed: Seed, amax_ptr: int, amax_value: float, segments: Sequence[Tuple[int, int, int, int, int]],
             ncols_pad: int, stream: int, amax_n: int = 1) -> None:
    """Quantize FP4 blocks of x into each segment's (data, scale, gs) addresses.

    seed: stochastic rounding's, an int or a DeviceSeed (read by the kernel when it runs).
    segments: (units, src_block, data_ptr, scale_ptr, gs_ptr): `units` FP4 blocks of x starting at block
    `src_block` (= row_start * K / block); gs_ptr 0 writes no global scale (MXFP4).
    amax_ptr: device address of the NVFP4 amax as amax_n fp32 values whose max is taken (one scalar, or
    amax_partials()'s output); 0: use amax_value. ncols_pad: swizzled layout only.
    """
    if amax_ptr and amax_n < 1:
        raise ValueError(f"amax_n={amax_n}: a device amax needs at least one value")
    la = launcher(device, _QUANT_NAMES[(format, in_dtype, layout, rounding)], "quant")
    seed, seed_ptr, seed_mul = kernel_args(seed)
    n = len(segments)
    for i in range(0, n, MAXSEG):
        chunk = segments[i:i + MAXSEG] if n > MAXSEG else segments
        most = _fill_segments(la.table, chunk)
        # after amax_partials the first launch may overlap that pass's tail (it waits for the partials)
        go = la.after_previous_kernel if amax_n > 1 and i == 0 and _sm90(device) else la
        go(device, _grid(most, la.cap, len(chunk)), len(chunk), stream,
           x_ptr, K, amax_ptr, amax_n, amax_value, seed, seed_ptr, seed_mul, ncols_pad)


@functools.lru_cache(maxsize=None)
def _sm90(device: int) -> bool:
    return jit._arch_of(device) >= 90


@functools.lru_cache(maxsize=None)
def has_quantize_small(device: int) -> bool:
    """Whether quantize_small_nvfp4 runs on `device` (sm_90 and newer)."""
    return jit._arch_of(device) >= SMALL_MIN_ARCH


def quantize_small_nvfp4(device: int, x_ptr: int, in_dtype: str, numel: int, K: int,
                         segment: Tuple[int, int, int, int, int], stream: int) -> None:
    """NVFP4 quantize (linear scales, round to nearest) with the amax of all `numel` elements of x
    computed in the same launch: one thread-block cluster, no zeroed scratch word, so one graph node
    instead of three. Bit-identical to amax() then quantize(). For inputs of up to a few hundred KB
    (the cluster is 8 blocks); sm_90+ (has_quantize_small). segment: as quantize()'s."""
    la = launcher(device, _SMALL_NAMES[in_dtype], "qsmall")
    _fill_segments(la.table, (segment,))
    la(device, SMALL_CTAS, 1, stream, x_ptr, numel * _ITEMSIZE[in_dtype] // 16, K)


def gather_ll(device: int, format: str, x_ptr: int, dtype: str, numel: int, out_ptr: int, units: Sequence[int],
              first: Sequence[int], regions: Sequence[int], flags: Sequence[int], counters: int,
              seg_stride: int, scale_off: int, rank: int, timeout_ns: int, stream: int, check=(0, 0)) -> None:
    """One launch of the whole FP4 gather (csrc/fp4.cu, gather_ll_body; NVFP4 with per-rank global
    scales, or MXFP4): quantize this rank's `numel` elements of x (`dtype`, out's too), NVFP4 with their
    own amax, store them into this rank's segment of every rank's region (`regions[r]`: two halves of
    one `seg_stride`-byte segment per rank, scales at `scale_off` in each), flag them in `flags[r]`, wait
    for every rank's flags and decode all of them into out. units[s] / first[s]: FP4 blocks of rank s
    and where in out they go. counters: this rank's LL_MAXCTAS epoch counters. check: (the call's
    24-bit signature, the host-mapped word a peer's other signature is reported into, or 0). sm_90+ on
    every rank; the caller (fp4ccl.one_launch.serves) checks that and everything else."""
    la = launcher(device, _LL_NAMES[(format, dtype)], "gll")
    _fill_ll_table(la.table, units, first, regions, flags, check=check)
    la(device, LL_MAXCTAS, 1, stream, x_ptr, numel * _ITEMSIZE[dtype] // 16, out_ptr, counters, seg_stride,
       scale_off, timeout_ns, rank, len(units))


def reduce_scatter_ll(device: int, format: str, x_ptr: int, dtype: str, out_ptr: int, units: Sequence[int],
                      first: Sequence[int], regions: Sequence[int], flags: Sequence[int], counters: int,
                      seg_stride: int, scale_off: int, rank: int, rounding: str, seeds: Sequence[Seed],
                      timeout_ns: int, stream: int, check=(0, 0)) -> None:
    """One launch of the whole FP4 reduce-scatter (csrc/fp4.cu, reduce_scatter_ll_body), over the
    buffer, flags and counters of gather_ll: chunk q of x (units[q] FP4 blocks from block first[q], the
    rows rank q owns) is quantized as a tensor of its own (NVFP4: its own amax; `rounding`, with seeds[q]
    when stochastic) into this rank's segment of regions[q]; this rank's chunk from every rank is then
    decoded and summed in rank order in fp32 and rounded once into out (x's dtype). sm_90+ on every rank;
    fp4ccl.one_launch checks that and the rest. Device seeds must all be derived with one multiplier
    from one word (fp4_collectives derives them so). check: as gather_ll's."""
    la = launcher(device, _RS_LL_NAMES[(format, dtype, rounding)], "rsll")
    args = [kernel_args(s) for s in seeds]
    where = {(ptr, mul) for _, ptr, mul in args}
    if len(where) > 1:
        raise ValueError(f"reduce_scatter_ll: the chunks' seeds come from {len(where)} sources; one launch reads one")
    _fill_ll_table(la.table, units, first, regions, flags, [a[0] for a in args], *(where.pop() if where else (0, 0)),
                   check=check)
    la(device, LL_MAXCTAS, 1, stream, x_ptr, out_ptr, counters, seg_stride, scale_off, timeout_ns, rank, len(units))


def _fill_ll_table(t, units, first, regions, flags, seeds=(), seed_ptr=0, seed_mul=0, check=(0, 0)) -> None:
    """The by-value LLTable: units, first, region, flags and seed arrays of LL_MAXRANKS words each, then
    the device seed's address and multiplier (0, 0: the seeds as they are), the mismatch report word's
    address and the call's signature (check = (signature, address))."""
    t[:] = 0
    for k, column in enumerate((units, first, regions, flags, seeds)):
        t[k * LL_MAXRANKS:k * LL_MAXRANKS + len(column)] = column
    sig, err = check
    t[5 * LL_MAXRANKS:] = (seed_ptr, seed_mul, err, sig)


def dequantize(device: int, out_ptr: int, out_dtype: str, K: int, format: str, layout: str,
               segments: Sequence[Tuple[int, int, int, int, int]], ncols_pad: int, stream: int) -> None:
    """Decode each segment's (data, scale, gs) into FP4 blocks of out.

    segments: (units, dst_block, data_ptr, scale_ptr, gs_ptr): `units` blocks written from block
    `dst_block` of out on; gs_ptr is the fp32 S_dec to decode with (NVFP4; ignored for MXFP4)."""
    la = launcher(device, _DEQUANT_NAMES[(format, out_dtype, layout)], "dequant")
    n = len(segments)
    for i in range(0, n, MAXSEG):
        chunk = segments[i:i + MAXSEG] if n > MAXSEG else segments
        most = _fill_segments(la.table, chunk)
        la(device, _grid(most, la.cap, len(chunk)), len(chunk), stream, out_ptr, K, ncols_pad)


def dequantize_sum(device: int, out_ptr: int, out_dtype: str, K: int, format: str, units: int,
                   contributions: Sequence[Tuple[int, int, int]], stream: int) -> None:
    """out blocks [0, units) = round_once_to(out_dtype, acc), acc the fp32 sum, in order c = 0, 1, ...,
    of contribution c decoded exactly as `dequantize(..., "float32")` decodes it, from acc = 0.0f.

    contributions: (data_ptr, scale_ptr, gs_ptr) each, a linear-layout FP4 tensor of `units` blocks
    (gs_ptr: its fp32 S_dec; 0 for MXFP4). K is only checked against the block size: the kernel works on
    whole blocks. Up to MAXSUM (128) contributions per launch; more need out_dtype "float32" (the
    launches chain through out, which then holds the exact fp32 running sum). Capturable in a CUDA graph:
    the addresses travel by value in the launch, nothing is copied from the host."""
    if format not in _BLOCK:
        raise ValueError(f"format: expected 'nvfp4' or 'mxfp4', got {format!r}")
    if K % _BLOCK[format]:
        raise ValueError(f"K={K} is not a multiple of the {format} block size {_BLOCK[format]}")
    if out_dtype not in _IN_NAME:
        raise TypeError(f"out_dtype: expected one of {', '.join(_IN_NAME)}, got {out_dtype!r}")
    n = len(contributions)
    if n > MAXSUM and out_dtype != "float32":
        raise ValueError(f"dequantize_sum: {n} contributions is more than {MAXSUM} per launch, which only a "
                         "float32 output can chain; sum into a float32 buffer and convert once")
    if units <= 0:
        return
    if units >= 2**31:
        raise ValueError(f"units={units}: the kernel indexes blocks with 32-bit integers; split it")
    la = launcher(device, _SUM_NAMES[(format, out_dtype)], "dqsum")
    gx = _grid(units, la.cap, 1)
    t = la.table
    for i in range(0, max(n, 1), MAXSUM):
        chunk = contributions[i:i + MAXSUM] if n > MAXSUM else contributions
        for j, (d, s, g) in enumerate(chunk):
            t[j] = d
            t[MAXSUM + j] = s
            t[2 * MAXSUM + j] = g
        la(device, gx, 1, stream, out_ptr, units, len(chunk), 1 if i else 0)
