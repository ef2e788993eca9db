"""Symmetric memory: the same-size buffer on every rank of a node, mapped into every peer.

`symmetric_empty(comm, shape, dtype)` is collective. Each rank makes one allocation holding its data,
a signal pad (one uint64 per rank) and a small table of the peers' pad addresses, and every rank maps
every peer's allocation: by default through CUDA virtual memory management (`fp4ccl.vmm`: cuMemCreate,
shared as a file descriptor over a Unix socket), else through cudaMalloc and CUDA IPC handles carried by
the communicator's bootstrap exchange (`FP4CCL_SYMM_ALLOC`). `buf.local` and `buf.peer(r)` are views
(torch tensors when torch is importable, otherwise CuPy arrays) of this rank's and rank r's data;
`buf.barrier(stream)` enqueues a device-side barrier through the signal pads (csrc/symm.cu).

Rules the code relies on:
- allocation and `free()` are collective and must be called in the same order on every rank;
- ranks on another host cannot be mapped: allocation raises `SymmetricMemoryUnavailable` on every
  rank (callers such as fp4ccl.overlap check `same_node(comm)` first and fall back to NCCL);
- barriers on one buffer are issued in the same order on every rank (each carries an epoch);
- views must not be used after `free()`; free waits for this device's pending work first.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _arrays
from ._log import get_logger
from ._timeout import env_timeout
from .errors import Fp4cclError

log = get_logger("fp4ccl.symmetric")

_ALIGN = 256
_EXTRAS_KEY = "fp4ccl.symmetric"


class SymmetricMemoryUnavailable(Fp4cclError):
    """Symmetric memory cannot span this communicator (ranks on different hosts, or no CUDA)."""


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def node_identity() -> str:
    """Hostname plus kernel boot id: two ranks with equal identities can share CUDA IPC handles."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def _node_facts(comm) -> Tuple[bool, int]:
    """(every rank on this host, the lowest compute capability among the ranks' GPUs, e.g. 90; 0 where a
    rank has none): one exchange, collective on the first call, then cached in comm._extras."""
    extras = getattr(comm, "_extras", None)
    cached = extras.get("fp4ccl.node_facts") if extras is not None else None
    if cached is not None:
        return cached.value
    arch = 0
    if getattr(comm, "device", None) is not None:
        from .jit import _arch_of
        arch = _arch_of(comm.device)
    parts = [b.decode().rsplit("|", 1) for b in comm._exchange.all_gather_bytes(f"{node_identity()}|{arch}".encode())]
    hosts = {ident for ident, _ in parts}
    value = (len(hosts) == 1, min(int(a) for _, a in parts))
    if not value[0]:
        log.info("ranks span %d hosts: symmetric memory is off for this communicator", len(hosts))
    if extras is not None:
        extras["fp4ccl.node_facts"] = _Cached(value)
    return value


def same_node(comm) -> bool:
    """Whether every rank of `comm` runs on this host (collective on the first call, then cached)."""
    return _node_facts(comm)[0]


def min_arch(comm) -> int:
    """The lowest compute capability among the GPUs of `comm`'s ranks (e.g. 90), 0 where a rank has no
    GPU: a kernel that every rank must launch alike (fp4ccl.one_launch) is chosen by it, so GPUs of
    different generations never pick different forms. Collective on the first call, then cached."""
    return _node_facts(comm)[1]


class _Cached:
    """A cached value kept in comm._extras (which calls close() on destroy)."""

    def __init__(self, value):
        self.value = value

    def close(self) -> None:
        pass


# -- device code --------------------------------------------------------------------------------------

_MODULES: Dict[int, Any] = {}
_MODULES_LOCK = threading.Lock()


def kernels(device: int):
    """csrc/symm.cu loaded on `device` through fp4ccl.jit (disk cache shared by the node's ranks)."""
    with _MODULES_LOCK:
        mod = _MODULES.get(device)
        if mod is None:
            from . import jit
            mod = jit.load_module("symm.cu", device)
            with _cupy_device(device):
                mod.get_function("fp4ccl_symm_barrier")  # compile now, not inside the first collective
            _MODULES[device] = mod
        return mod


def _cupy_device(device: int):
    import cupy
    return cupy.cuda.Device(device)


_EXT_STREAMS: Dict[Tuple[int, int], Any] = {}


def launch(device: int, name: str, grid, block, args, stream: int) -> None:
    """Launch kernel `name` of csrc/symm.cu on the raw stream handle `stream`."""
    import cupy
    fn = kernels(device).get_function(name)
    ext = _EXT_STREAMS.get((device, stream))
    if ext is None:
        with cupy.cuda.Device(device):
            ext = _EXT_STREAMS[(device, stream)] = cupy.cuda.ExternalStream(stream, device)
    with cupy.cuda.Device(device):
        fn(grid, block, args, stream=ext)


# -- stream memory operations (barrier without SMs) ---------------------------------------------------

_CU_STREAM_WAIT_VALUE_GEQ = 0x0
_CU_STREAM_WRITE_VALUE_DEFAULT = 0x0   # with a fence first: the stream's earlier writes become visible
_CU_ATTR_64_BIT_STREAM_MEM_OPS = 122
_MEMOPS: Dict[int, Any] = {}


class _MemOps:
    """cuStreamWriteValue64 / cuStreamWaitValue64 from libcuda, or None where the device lacks them."""

    def __init__(self, lib, write, wait):
        self.lib, self.write, self.wait = lib, write, wait


def _memops(device: int) -> Optional[_MemOps]:
    if device in _MEMOPS:
        return _MEMOPS[device]
    ops = None
    try:
        import ctypes
        lib = ctypes.CDLL("libcuda.so.1")
        value = ctypes.c_int(0)
        lib.cuDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        rc = lib.cuDeviceGetAttribute(ctypes.byref(value), _CU_ATTR_64_BIT_STREAM_MEM_OPS, device)
        if rc == 0 and value.value:
            fns = []
            for name in ("cuStreamWriteValue64_v2", "cuStreamWaitValue64_v2"):
                fn = getattr(lib, name)
                fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                fns.append(fn)
            ops = _MemOps(lib, *fns)
        else:
            log.info("cuda:%d has no 64-bit stream memory operations (rc %d): kernel barriers", device, rc)
    except (OSError, AttributeError) as err:
        log.info("stream memory operations unavailable (%s): kernel barriers", err)
    _MEMOPS[device] = ops
    return ops


BARRIER_MODES = ("kernel", "memop")
# memop measured faster or even on 4 x H200 (docs/OVERLAP.md): 0.233 against 0.346 ms (ag+mm, M = 2048),
# 0.202 against 0.313 (mm+rs, M = 2048); at M >= 8192 the two were within 4% either way.
DEFAULT_BARRIER = "memop"


def barrier_mode() -> str:
    """FP4CCL_SYMM_BARRIER: 'memop' (default: stream memory operations, no SM needed, so the barrier is
    never queued behind a matmul holding every SM; no timeout) or 'kernel' (one warp; traps after
    FP4CCL_TIMEOUT, so a rank that skips a call gives an error instead of a hang)."""
    mode = os.environ.get("FP4CCL_SYMM_BARRIER", "").lower() or DEFAULT_BARRIER
    if mode not in BARRIER_MODES:
        raise ValueError(f"FP4CCL_SYMM_BARRIER={mode!r} is not one of {', '.join(BARRIER_MODES)}")
    return mode


ALLOC_MODES = ("auto", "vmm", "ipc")


def alloc_mode() -> str:
    """FP4CCL_SYMM_ALLOC: how symmetric buffers are made and shared. 'auto' (default): CUDA VMM
    (cuMemCreate, shared as file descriptors) where every rank supports it, else cudaMalloc + CUDA IPC;
    'vmm': VMM or an error; 'ipc': cudaMalloc + CUDA IPC."""
    mode = os.environ.get("FP4CCL_SYMM_ALLOC", "").lower() or "auto"
    if mode not in ALLOC_MODES:
        raise ValueError(f"FP4CCL_SYMM_ALLOC={mode!r} is not one of {', '.join(ALLOC_MODES)}")
    return mode


def _fd_timeout() -> float:
    """Seconds a rank waits for a peer's descriptor: the barrier's timeout, at most 600 (a peer is at
    most one host exchange behind, so this only bounds a crashed peer)."""
    seconds = barrier_timeout_ns() / 1e9
    return min(seconds, 600.0) if seconds > 0 else 600.0


def _close_all(fds: List[int], fdx) -> None:
    for f in fds:
        if f >= 0:
            os.close(f)
    if fdx is not None:
        fdx.close()


def barrier_timeout_ns() -> int:
    """How long a device-side barrier waits for a peer before trapping (FP4CCL_TIMEOUT seconds, 0 = forever)."""
    seconds = env_timeout(unset=600.0)
    return int(seconds * 1e9) if seconds > 0 else 0


# -- views ----------------------------------------------------------------------------------------------

def _view(ptr: int, shape: Tuple[int, ...], dtype: str, device: int, owner: Any):
    """A torch tensor (or CuPy array without torch) over raw device memory, on `device`."""
    import cupy
    nbytes = math.prod(shape) * _arrays.ITEMSIZE[dtype]
    mem = cupy.cuda.UnownedMemory(ptr, max(nbytes, 1), owner, device_id=device)
    raw = cupy.ndarray((nbytes,), dtype=np.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
    if "torch" in sys.modules or _torch_importable():
        import torch
        # DLPack carries CuPy's device id; __cuda_array_interface__ would ask the driver, which may
        # name the peer's device for IPC-mapped memory.
        t = torch.from_dlpack(raw)
        return t.view(getattr(torch, dtype)).view(shape)
    raw_dtype = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}.get(dtype)
    return raw.view(np.dtype(raw_dtype) if raw_dtype else _arrays.numpy_dtype(dtype)).reshape(shape)


_TORCH_OK: Optional[bool] = None


def _torch_importable() -> bool:
    global _TORCH_OK
    if _TORCH_OK is None:
        try:
            import torch  # noqa: F401
            _TORCH_OK = True
        except ImportError:
            _TORCH_OK = False
    return _TORCH_OK


# -- the buffer -----------------------------------------------------------------------------------------

class _Registry:
    """Live buffers of one communicator, freed (collectively, in allocation order) by comm.destroy()."""

    def __init__(self):
        self.live: Dict[int, "SymmetricBuffer"] = {}
        self.serial = 0

    def close(self) -> None:
        for key in sorted(self.live):
            buf = self.live.get(key)
            if buf is not None:
                buf.free()
        self.live.clear()


def _registry(comm) -> Optional[_Registry]:
    extras = getattr(comm, "_extras", None)
    if extras is None:
        return None
    reg = extras.get(_EXTRAS_KEY)
    if reg is None:
        reg = extras[_EXTRAS_KEY] = _Registry()
    return reg


class SymmetricBuffer:
    """One same-size device buffer per rank, each mapped into every rank of the node (see module doc)."""

    def __init__(self, comm, shape: Tuple[int, ...], dtype: str):
        self.comm = comm
        self.shape = shape
        self.dtype = dtype
        self.nbytes = math.prod(shape) * _arrays.ITEMSIZE[dtype]
        self.rank = comm.rank
        self.world = comm.size
        self.device = comm.device
        self.pad_offset = _align(max(self.nbytes, 1))
        self.table_offset = self.pad_offset + _align(8 * self.world)
        # the 'device' and 'checked' barriers' epoch, then the 'checked' one's word 'this rank saw a mismatch'
        self.counter_offset = self.table_offset + _align(8 * self.world)
        self.alloc_bytes = self.counter_offset + _ALIGN
        self._base = 0
        self._peer_base: List[int] = [0] * self.world
        self._views: Dict[int, Any] = {}
        self._epoch = 0
        self._last_barrier = 0       # cudaEvent_t that orders barriers issued on different streams
        self._serial = -1
        self._freed = True
        self.kind = "ipc"            # how the memory was made and shared: "ipc" (cudaMalloc) or "vmm"
        self._own = None             # vmm.Mapping of our allocation (vmm)
        self._peer_maps: List[Any] = [None] * self.world   # vmm.Mapping of each peer's (vmm)
        self._fd_prefix = ""

    # -- collective lifecycle -----------------------------------------------------------------------
    @classmethod
    def allocate(cls, comm, shape, dtype, zeroed: bool = False) -> "SymmetricBuffer":
        """Collective. `zeroed`: the data starts as zeros on every rank before any peer can map it (flags
        that peers write into it must never start as garbage that looks like a signal)."""
        check_open = getattr(comm, "_check_open", None)
        if check_open is not None:
            check_open()
        if comm.device is None:
            raise SymmetricMemoryUnavailable(
                f"symmetric memory needs CUDA devices; this communicator's backend is '{comm.backend}'")
        shape = _normalize_shape(shape)
        dtype = _arrays.dtype_name(dtype)
        self = cls(comm, shape, dtype)
        self._allocate(zeroed)
        return self

    def _allocate(self, zeroed: bool = False) -> None:
        import cupy
        from cupy.cuda import runtime
        ex = self.comm._exchange
        use_vmm = self._agree_on_vmm()
        error = ""
        handle = b""
        fd = -1
        fdx = None
        if use_vmm:
            from . import vmm
        try:
            with cupy.cuda.Device(self.device):
                if use_vmm:
                    runtime.free(0)   # the device's primary context must be current for the driver calls
                    self._own = vmm.Mapping.create(self.device, self.alloc_bytes)
                    self._base = self._own.ptr
                else:
                    self._base = runtime.malloc(self.alloc_bytes)
                # Pads start at epoch 0; zeroed and synchronized before any peer can learn the handle.
                start = 0 if zeroed else self.pad_offset
                runtime.memset(self._base + start, 0, self.alloc_bytes - start)
                runtime.deviceSynchronize()
                if use_vmm:
                    fd = self._own.export_fd()
                    handle = struct.pack("<Q", self._own.size)
                else:
                    handle = runtime.ipcGetMemHandle(self._base)
            if use_vmm:
                # bound before the exchange below, so every peer can send to us once it has returned
                fdx = vmm.FdExchange(self._fd_prefix, self.rank, self.world, _fd_timeout())
                fdx.bind()
        except Exception as err:  # noqa: BLE001 - reported to every rank below, then raised everywhere
            error = f"{type(err).__name__}: {err}"
        meta = json.dumps({"shape": list(self.shape), "dtype": self.dtype, "nbytes": self.nbytes,
                           "node": node_identity(), "device": self.device, "error": error}).encode()
        parts = ex.all_gather_bytes(struct.pack("<I", len(meta)) + meta + handle)
        metas, handles = [], []
        for part in parts:
            (n,) = struct.unpack_from("<I", part)
            metas.append(json.loads(part[4:4 + n]))
            handles.append(bytes(part[4 + n:]))
        problem = _allocation_problem(metas)
        if problem is not None:
            _close_all([fd], fdx)
            self._free_local_only()
            raise problem
        opened_error = ""
        try:
            with cupy.cuda.Device(self.device):
                if use_vmm:
                    self._open_vmm(fdx.exchange(fd), handles)
                else:
                    for p in range(self.world):
                        self._peer_base[p] = self._base if p == self.rank else runtime.ipcOpenMemHandle(handles[p])
        except Exception as err:  # noqa: BLE001 - agreed on below
            opened_error = f"{type(err).__name__}: {err}"
        finally:
            _close_all([fd], fdx)
        statuses = [s.decode() for s in ex.all_gather_bytes(opened_error.encode())]
        failed = [(r, s) for r, s in enumerate(statuses) if s]
        if failed:
            self._teardown()
            detail = "; ".join(f"rank {r}: {s}" for r, s in failed)
            raise SymmetricMemoryUnavailable(
                f"symmetric_empty: mapping the peers' buffers ({self.kind}) failed ({detail})")
        table = np.array([b + self.pad_offset for b in self._peer_base], dtype=np.uint64)
        with cupy.cuda.Device(self.device):
            runtime.memcpy(self._base + self.table_offset, table.ctypes.data, table.nbytes, runtime.memcpyHostToDevice)
            self._last_barrier = runtime.eventCreateWithFlags(runtime.eventDisableTiming)
        self._freed = False
        reg = _registry(self.comm)
        if reg is not None:
            self._serial = reg.serial
            reg.serial += 1
            reg.live[self._serial] = self
        log.debug("symmetric buffer %s %s: %d bytes on cuda:%d (%s)", self.shape, self.dtype, self.nbytes,
                  self.device, self.kind)

    def _agree_on_vmm(self) -> bool:
        """Whether this allocation uses CUDA VMM: FP4CCL_SYMM_ALLOC allows it and every rank supports it.
        Also fixes the socket names of the descriptor exchange (one host round trip per allocation)."""
        mode = alloc_mode()
        self.kind = "ipc"
        if self.world == 1 or mode == "ipc":
            return False
        from . import vmm
        able = vmm.supported(self.device)
        token = os.urandom(8).hex()
        votes = self.comm._exchange.all_gather_bytes(b"%d:%s" % (able, token.encode()))
        everyone = all(v.startswith(b"1:") for v in votes)
        if not everyone:
            which = [r for r, v in enumerate(votes) if not v.startswith(b"1:")]
            if mode == "vmm":
                raise SymmetricMemoryUnavailable(f"FP4CCL_SYMM_ALLOC=vmm, but ranks {which} cannot export CUDA VMM "
                                                 f"allocations as file descriptors")
            log.info("ranks %s cannot share CUDA VMM allocations: symmetric buffers use CUDA IPC", which)
            return False
        # rank 0's token names the sockets of this allocation: unique per job and per allocation
        self._fd_prefix = f"fp4ccl-symm-{votes[0].split(b':')[1].decode()}"
        self.kind = "vmm"
        return True

    def _open_vmm(self, fds: List[int], handles: List[bytes]) -> None:
        from . import vmm
        self._peer_maps = [None] * self.world
        try:
            for p in range(self.world):
                if p == self.rank:
                    self._peer_base[p] = self._base
                    continue
                (size,) = struct.unpack("<Q", handles[p])
                self._peer_maps[p] = vmm.Mapping.import_fd(self.device, fds[p], size)
                self._peer_base[p] = self._peer_maps[p].ptr
        finally:
            # the imported handles keep the memory; the descriptors are not needed any more
            _close_all([f for p, f in enumerate(fds) if p != self.rank], None)

    def free(self) -> None:
        """Release the buffer on every rank (collective): close peer mappings, barrier, free, barrier."""
        if self._freed:
            return
        self._teardown()
        reg = _registry(self.comm)
        if reg is not None:
            reg.live.pop(self._serial, None)

    def _teardown(self) -> None:
        import cupy
        from cupy.cuda import runtime
        ex = self.comm._exchange
        self._freed = True
        self._views.clear()
        with cupy.cuda.Device(self.device):
            # Our own queued copies and kernels may still read peers' memory or write theirs.
            runtime.deviceSynchronize()
            for p, ptr in enumerate(self._peer_base):
                if p != self.rank and ptr:
                    if self.kind == "vmm":
                        if self._peer_maps[p] is not None:
                            self._peer_maps[p].release()
                    else:
                        runtime.ipcCloseMemHandle(ptr)
            self._peer_base = [0] * self.world
            self._peer_maps = [None] * self.world
        ex.barrier()  # every peer has synchronized and unmapped us: nothing can touch our memory now
        self._free_local_only()
        ex.barrier()

    def _free_local_only(self) -> None:
        import cupy
        from cupy.cuda import runtime
        with cupy.cuda.Device(self.device):
            if self._last_barrier:
                runtime.eventDestroy(self._last_barrier)
                self._last_barrier = 0
            if self._own is not None:
                self._own.release()
                self._own = None
            elif self._base:
                runtime.free(self._base)
            self._base = 0

    def __enter__(self) -> "SymmetricBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self):
        if not getattr(self, "_freed", True):
            # Freeing here would not be collective: a peer may still be reading this memory.
            log.warning("SymmetricBuffer %s dropped without free(); its memory stays mapped until "
                        "comm.destroy()", getattr(self, "shape", "?"))

    def __repr__(self) -> str:
        state = "freed" if self._freed else f"cuda:{self.device}"
        return f"<SymmetricBuffer shape={self.shape} dtype={self.dtype} rank={self.rank}/{self.world} {state}>"

    # -- access -------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._freed:
            raise Fp4cclError("this symmetric buffer was freed")

    def ptr(self, rank: Optional[int] = None) -> int:
        """Address (in this process) of rank's data; this rank's by default."""
        self._check()
        return self._peer_base[self.rank if rank is None else self._rank_index(rank)]

    def signal_pad_ptr(self, rank: Optional[int] = None) -> int:
        self._check()
        return self._peer_base[self.rank if rank is None else self._rank_index(rank)] + self.pad_offset

    def _rank_index(self, rank: int) -> int:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.world:
            raise ValueError(f"rank={rank!r} is out of range for a communicator of size {self.world}")
        return rank

    def peer(self, rank: int):
        """A view of rank's buffer (this rank's own when rank == self.rank); reads and writes go over NVLink."""
        self._check()
        r = self._rank_index(rank)
        view = self._views.get(r)
        if view is None:
            view = self._views[r] = _view(self._peer_base[r], self.shape, self.dtype, self.device, self)
        return view

    @property
    def local(self):
        return self.peer(self.rank)

    def view(self, rank: int, offset: int, shape: Sequence[int], dtype: Any):
        """A view of `shape`/`dtype` at byte `offset` into rank's buffer (for workspaces carved into parts)."""
        self._check()
        shape = _normalize_shape(shape)
        dtype = _arrays.dtype_name(dtype)
        nbytes = math.prod(shape) * _arrays.ITEMSIZE[dtype]
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"view of {nbytes} bytes at offset {offset} overruns the {self.nbytes}-byte buffer")
        return _view(self._peer_base[self._rank_index(rank)] + offset, shape, dtype, self.device, self)

    # -- device-side barrier ------------------------------------------------------------------------
    def barrier(self, stream: Any = None, mode: Optional[str] = None, check: Optional[Tuple[int, int]] = None) -> None:
        """Enqueue a barrier over every rank on `stream` (default: the current stream); returns at once.

        Work enqueued on `stream` after it sees every write any rank enqueued (on the stream it
        barriered on) before its own barrier. Collective: same order on every rank. `mode` 'kernel'
        or 'memop' (default: FP4CCL_SYMM_BARRIER); both write the same pads, so ranks may differ.
        `mode='device'`: a kernel that keeps the epoch on the device, so the barrier can be captured in
        a CUDA graph and replayed; a buffer whose barriers are 'device' must use no other mode.
        `mode='checked'` with `check=(signature, report address)`: the 'device' barrier that also
        compares a 24-bit call signature between the ranks and reports a mismatch into the 8-byte
        host-mapped word at the address (csrc/symm.cu, fp4ccl_symm_barrier_checked); a buffer whose
        barriers are 'checked' must use no other mode.
        """
        self._check()
        from cupy.cuda import runtime
        handle = _stream_handle(stream, self.device)
        mode = mode or barrier_mode()
        if mode == "checked":
            if self.world > 1:
                from .formats import kernels as fp4_kernels
                dev = self.device
                la = fp4_kernels.launcher(dev, "fp4ccl_symm_barrier_checked", "symm_barrier_checked",
                                          lambda: kernels(dev).get_function("fp4ccl_symm_barrier_checked"),
                                          _round_up_warp(self.world))
                sig, report = check
                la(dev, 1, 1, handle, self._base + self.table_offset, self.rank, self.world,
                   self._base + self.counter_offset, sig, report, barrier_timeout_ns())
            return
        if mode == "device":
            if self.world > 1:
                # through the ctypes launcher: the CuPy call with numpy arguments cost ~8 us of host time,
                # most of a small symmetric-memory collective's own
                from .formats import kernels as fp4_kernels
                dev = self.device
                la = fp4_kernels.launcher(dev, "fp4ccl_symm_barrier_dev", "symm_barrier_dev",
                                          lambda: kernels(dev).get_function("fp4ccl_symm_barrier_dev"),
                                          _round_up_warp(self.world))
                la(dev, 1, 1, handle, self._base + self.table_offset, self.rank, self.world,
                   self._base + self.counter_offset, barrier_timeout_ns())
            return
        self._epoch += 1
        if self.world == 1:
            return
        import cupy
        with cupy.cuda.Device(self.device):
            # Epochs must reach each pad in order even when barriers go to different streams.
            runtime.streamWaitEvent(handle, self._last_barrier, 0)
            ops = _memops(self.device) if mode == "memop" else None
            if ops is None or not self._memop_barrier(ops, handle):
                launch(self.device, "fp4ccl_symm_barrier", (1,), (_round_up_warp(self.world),),
                       (np.uint64(self._base + self.table_offset), np.int32(self.rank), np.int32(self.world),
                        np.uint64(self._epoch), np.uint64(barrier_timeout_ns())), handle)
            runtime.eventRecord(self._last_barrier, handle)

    def _memop_barrier(self, ops: _MemOps, handle: int) -> bool:
        """The barrier as front-end stream operations: no block to schedule, so it cannot wait for a
        matmul's SMs. No timeout (a missing peer blocks the stream). False if the driver refused the
        first write, so the caller falls back to the kernel for this epoch (same pads, same meaning)."""
        e = self._epoch
        for i in range(1, self.world):
            p = (self.rank + i) % self.world
            rc = ops.write(handle, self._peer_base[p] + self.pad_offset + 8 * self.rank, e,
                           _CU_STREAM_WRITE_VALUE_DEFAULT)
            if rc:
                if i == 1:
                    log.warning("cuStreamWriteValue64 to a peer failed (CUresult %d): kernel barriers from now", rc)
                    _MEMOPS[self.device] = None
                    return False
                raise Fp4cclError(f"cuStreamWriteValue64 failed mid-barrier (CUresult {rc})")
        own = self._base + self.pad_offset
        for i in range(1, self.world):
            p = (self.rank + i) % self.world
            rc = ops.wait(handle, own + 8 * p, e, _CU_STREAM_WAIT_VALUE_GEQ)
            if rc:
                raise Fp4cclError(f"cuStreamWaitValue64 failed (CUresult {rc})")
        return True


def _round_up_warp(n: int) -> int:
    return max(32, (n + 31) // 32 * 32)


def _stream_handle(stream: Any, device: int) -> int:
    if stream is not None:
        return _arrays.stream_handle(stream)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_stream(device).cuda_stream)
    import cupy
    with cupy.cuda.Device(device):
        return int(cupy.cuda.get_current_stream().ptr)


def _normalize_shape(shape) -> Tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    return shape


def _allocation_problem(metas: List[dict]) -> Optional[Exception]:
    """The error every rank raises when the gathered allocation requests disagree (None if they agree)."""
    errors = [(r, m["error"]) for r, m in enumerate(metas) if m["error"]]
    if errors:
        detail = "; ".join(f"rank {r}: {e}" for r, e in errors)
        return Fp4cclError(f"symmetric_empty: allocation failed ({detail})")
    nodes = [m["node"] for m in metas]
    if len(set(nodes)) > 1:
        groups: Dict[str, List[int]] = {}
        for r, n in enumerate(nodes):
            groups.setdefault(n.split("/")[0], []).append(r)
        detail = "; ".join(f"ranks {v} on {k}" for k, v in groups.items())
        return SymmetricMemoryUnavailable(
            f"symmetric memory needs every rank on one host, but {detail} (CUDA IPC does not cross hosts; "
            f"use the NCCL collectives)")
    requests = [(tuple(m["shape"]), m["dtype"]) for m in metas]
    if len(set(requests)) > 1:
        detail = ", ".join(f"rank {r}: {s} {d}" for r, (s, d) in enumerate(requests))
        return ValueError(f"symmetric_empty: every rank must request the same shape and dtype, got {detail}")
    return None


def symmetric_empty(comm, shape, dtype="uint8") -> SymmetricBuffer:
    """Allocate a symmetric buffer on every rank (collective; see SymmetricBuffer). Contents start undefined."""
    return SymmetricBuffer.allocate(comm, shape, dtype)
