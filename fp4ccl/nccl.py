"""NCCL through ctypes: library discovery, the one function table, the one status checker, enums.

Nothing here touches the library at import time: `load()` (or anything that needs a symbol) finds
and opens it on first use and caches the result. Loading needs no GPU — ncclGetVersion,
ncclGetUniqueId and the error strings work on a CPU-only machine, which is what CI exercises.

Every ncclResult_t-returning function is wrapped by `check`, installed as the ctypes `errcheck`
hook: the success path costs one integer test, and a failure becomes an `NcclError` carrying the
status, its enum name, ncclGetErrorString, ncclGetLastError and the call's name.
"""
from __future__ import annotations

import ctypes
import os
import threading
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_ubyte, c_void_p
from typing import Dict, Optional, Tuple

from fp4ccl._log import get_logger
from fp4ccl.errors import Fp4cclError, NcclError

__all__ = [
    "NcclLoadError", "NcclLibrary", "UniqueId", "load", "available", "library_path", "version",
    "version_code", "has", "check", "error_string", "get_unique_id", "supports_fp8", "datatype",
    "redop", "reduce_dtypes", "move_dtypes", "RESULT_NAMES", "DTYPES", "OPS", "ENV_LIBRARY",
]

ENV_LIBRARY = "FP4CCL_NCCL_LIBRARY"
_log = get_logger("fp4ccl.nccl")


class NcclLoadError(Fp4cclError):
    """No usable libnccl was found (or the one named by FP4CCL_NCCL_LIBRARY could not be opened)."""


# --------------------------------------------------------------------------------------------
# Types and enums (values are NCCL's ABI, stable across 2.x)

NCCL_UNIQUE_ID_BYTES = 128


class UniqueId(ctypes.Structure):
    """ncclUniqueId: 128 opaque bytes that rank 0 creates and every rank passes to ncclCommInitRank."""

    # c_ubyte rather than c_char: a c_char array field reads back truncated at the first NUL.
    _fields_ = [("internal", c_ubyte * NCCL_UNIQUE_ID_BYTES)]

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "UniqueId":
        data = bytes(data)
        if len(data) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id is {NCCL_UNIQUE_ID_BYTES} bytes, got {len(data)}")
        return cls.from_buffer_copy(data)

    def __eq__(self, other) -> bool:
        return isinstance(other, UniqueId) and bytes(self) == bytes(other)

    def __repr__(self) -> str:
        return f"UniqueId({bytes(self)[:8].hex()}...)"


class _Comm(c_void_p):
    """ncclComm_t as an argument type. A distinct subclass so the checker can find which argument
    is the communicator (for ncclGetLastError) from the table alone."""


RESULT_NAMES = {
    0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError", 3: "ncclInternalError",
    4: "ncclInvalidArgument", 5: "ncclInvalidUsage", 6: "ncclRemoteError", 7: "ncclInProgress",
    8: "ncclTimeout",
}
SUCCESS, IN_PROGRESS = 0, 7

# ncclDataType_t for every canonical dtype name NCCL has a type for.
DTYPES = {
    "int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
    "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9,
    "float8_e4m3fn": 10, "float8_e5m2": 11,
}
_FP8 = ("float8_e4m3fn", "float8_e5m2")
_UINT8 = DTYPES["uint8"]
# ncclFloat8e4m3/e5m2 exist from NCCL 2.24; an older library would reject (or misread) 10 and 11.
FP8_SINCE = (2, 24, 0)

# ncclRedOp_t; ncclAvg exists from 2.10.
OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}

# --------------------------------------------------------------------------------------------
# The function table: (name, restype, argtypes, since). `since` None means required (present in
# every NCCL fp4ccl supports, >= 2.12); a version tuple marks a newer symbol, loaded only when the
# library exports it — ask `has(name)` before using it.

_R = c_int  # ncclResult_t
_VP = c_void_p
_PVP = POINTER(c_void_p)

_TABLE = [
    # ncclResult_t ncclGetVersion(int *version);
    ("ncclGetVersion", _R, [POINTER(c_int)], None),
    # ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId);
    ("ncclGetUniqueId", _R, [POINTER(UniqueId)], None),
    # ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
    ("ncclCommInitRank", _R, [_PVP, c_int, UniqueId, c_int], None),
    # ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank,
    #                                     ncclConfig_t* config);
    ("ncclCommInitRankConfig", _R, [_PVP, c_int, UniqueId, c_int, _VP], (2, 14, 0)),
    # ncclResult_t ncclCommFinalize(ncclComm_t comm);
    ("ncclCommFinalize", _R, [_Comm], (2, 14, 0)),
    # ncclResult_t ncclCommDestroy(ncclComm_t comm);
    ("ncclCommDestroy", _R, [_Comm], None),
    # ncclResult_t ncclCommAbort(ncclComm_t comm);
    ("ncclCommAbort", _R, [_Comm], None),
    # const char* ncclGetErrorString(ncclResult_t result);
    ("ncclGetErrorString", c_char_p, [c_int], None),
    # const char* ncclGetLastError(ncclComm_t comm);
    ("ncclGetLastError", c_char_p, [_Comm], (2, 13, 0)),
    # ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError);
    ("ncclCommGetAsyncError", _R, [_Comm, POINTER(c_int)], None),
    # ncclResult_t ncclCommCount(const ncclComm_t comm, int* count);
    ("ncclCommCount", _R, [_Comm, POINTER(c_int)], None),
    # ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device);
    ("ncclCommCuDevice", _R, [_Comm, POINTER(c_int)], None),
    # ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank);
    ("ncclCommUserRank", _R, [_Comm, POINTER(c_int)], None),
    # ncclResult_t ncclRedOpCreatePreMulSum(ncclRedOp_t *op, void *scalar, ncclDataType_t datatype,
    #                                       ncclScalarResidence_t residence, ncclComm_t comm);
    ("ncclRedOpCreatePreMulSum", _R, [POINTER(c_int), _VP, c_int, c_int, _Comm], None),
    # ncclResult_t ncclRedOpDestroy(ncclRedOp_t op, ncclComm_t comm);
    ("ncclRedOpDestroy", _R, [c_int, _Comm], None),
    # ncclResult_t ncclCommRegister(const ncclComm_t comm, void* buff, size_t size, void** handle);
    ("ncclCommRegister", _R, [_Comm, _VP, c_size_t, _PVP], (2, 19, 0)),
    # ncclResult_t ncclCommDeregister(const ncclComm_t comm, void* handle);
    ("ncclCommDeregister", _R, [_Comm, _VP], (2, 19, 0)),
    # ncclResult_t ncclCommWindowRegister(ncclComm_t comm, void* buff, size_t size, ncclWindow_t* win,
    #                                     int winFlags);
    ("ncclCommWindowRegister", _R, [_Comm, _VP, c_size_t, _PVP, c_int], (2, 27, 0)),
    # ncclResult_t ncclCommWindowDeregister(ncclComm_t comm, ncclWindow_t win);
    ("ncclCommWindowDeregister", _R, [_Comm, _VP], (2, 27, 0)),
    # ncclResult_t ncclMemAlloc(void** ptr, size_t size);
    ("ncclMemAlloc", _R, [_PVP, c_size_t], (2, 19, 0)),
    # ncclResult_t ncclMemFree(void *ptr);
    ("ncclMemFree", _R, [_VP], (2, 19, 0)),
    # ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
    #                            ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
    ("ncclAllReduce", _R, [_VP, _VP, c_size_t, c_int, c_int, _Comm, _VP], None),
    # ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
    #                            int root, ncclComm_t comm, cudaStream_t stream);
    ("ncclBroadcast", _R, [_VP, _VP, c_size_t, c_int, c_int, _Comm, _VP], None),
    # ncclResult_t ncclReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
    #                         ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream);
    ("ncclReduce", _R, [_VP, _VP, c_size_t, c_int, c_int, c_int, _Comm, _VP], None),
    # ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
    #                            ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
    ("ncclAllGather", _R, [_VP, _VP, c_size_t, c_int, _Comm, _VP], None),
    # ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
    #                                ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
    ("ncclReduceScatter", _R, [_VP, _VP, c_size_t, c_int, c_int, _Comm, _VP], None),
    # ncclResult_t ncclAlltoAll(const void* sendbuff, void* recvbuff, size_t count,
    #                           ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
    ("ncclAlltoAll", _R, [_VP, _VP, c_size_t, c_int, _Comm, _VP], (2, 28, 0)),
    # ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer,
    #                       ncclComm_t comm, cudaStream_t stream);
    ("ncclSend", _R, [_VP, c_size_t, c_int, c_int, _Comm, _VP], None),
    # ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer,
    #                       ncclComm_t comm, cudaStream_t stream);
    ("ncclRecv", _R, [_VP, c_size_t, c_int, c_int, _Comm, _VP], None),
    # ncclResult_t ncclGroupStart();
    ("ncclGroupStart", _R, [], None),
    # ncclResult_t ncclGroupEnd();
    ("ncclGroupEnd", _R, [], None),
]

# Which argument is the communicator, per function (None: the call has none).
_COMM_ARG = {name: next((i for i, t in enumerate(args) if t is _Comm), None) for name, _, args, _ in _TABLE}


# --------------------------------------------------------------------------------------------
# Discovery

def _wheel_library(dist_name: str) -> Optional[str]:
    """libnccl.so.2 shipped by a pip distribution, located from its file list (no import needed)."""
    from importlib import metadata
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "libnccl.so.2":
            path = str(dist.locate_file(f))
            if os.path.exists(path):
                return path
    return None


def _process_library() -> Optional[str]:
    """A libnccl the process already mapped (e.g. torch's), read from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)  # address perms offset dev inode [path]
                path = fields[5].strip() if len(fields) == 6 else ""
                base = os.path.basename(path)
                # libnccl.so / libnccl.so.2 / libnccl.so.2.21.5, but not plugins like libnccl-net.so.
                if base.startswith("libnccl.so") and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


def _open(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path)


def _locate() -> Tuple[ctypes.CDLL, str, str]:
    """Find and open libnccl; returns (handle, path, how it was found). The one discovery function.

    Order: $FP4CCL_NCCL_LIBRARY (no fallback when set: the user asked for that file); the
    nvidia-nccl-cu13 then -cu12 wheels (the install's extras take one of them: both install
    nvidia/nccl/lib/libnccl.so.2, so there is nothing to choose between in one site-packages); a libnccl
    the process already loaded; libnccl.so.2 through the dynamic loader's search path.
    """
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        try:
            return _open(explicit), explicit, ENV_LIBRARY
        except OSError as e:
            raise NcclLoadError(f"{ENV_LIBRARY}={explicit!r} could not be loaded: {e}. Point {ENV_LIBRARY} "
                                f"at a libnccl.so.2, or unset it to search the pip wheels and the loader path") from e
    tried = []
    candidates = [(lambda d=d: _wheel_library(d), f"pip package {d}") for d in ("nvidia-nccl-cu13", "nvidia-nccl-cu12")]
    candidates.append((_process_library, "already loaded by this process"))
    for find, how in candidates:
        path = find()
        if path is None:
            tried.append(f"{how}: not found")
            continue
        try:
            return _open(path), path, how
        except OSError as e:
            tried.append(f"{how}: {path}: {e}")
    try:
        return _open("libnccl.so.2"), "libnccl.so.2", "dynamic loader"
    except OSError as e:
        tried.append(f"dynamic loader: libnccl.so.2: {e}")
    raise NcclLoadError("no NCCL library found; tried " + "; ".join(tried) +
                        f". Install nvidia-nccl-cu13 (or -cu12), or set {ENV_LIBRARY} to the path of libnccl.so.2")


# --------------------------------------------------------------------------------------------
# The loaded library

class NcclLibrary:
    """An opened libnccl: each table entry as an attribute (e.g. `lib.ncclAllReduce`), checked."""

    def __init__(self, handle: ctypes.CDLL, path: str, how: str):
        self.path = path
        self.how = how
        self.handle = handle
        self._present = set()
        missing = []
        for name, restype, argtypes, since in _TABLE:
            try:
                fn = getattr(handle, name)
            except AttributeError:
                if since is None:
                    missing.append(name)
                setattr(self, name, None)
                continue
            fn.restype = restype
            fn.argtypes = argtypes
            if restype is _R:
                fn.errcheck = _errcheck
            setattr(self, name, fn)
            self._present.add(name)
        if missing:
            raise NcclLoadError(f"{path} lacks {', '.join(missing)}: NCCL too old for fp4ccl (needs >= 2.12); "
                                f"set {ENV_LIBRARY} to a newer libnccl.so.2")
        v = c_int()
        self.ncclGetVersion(ctypes.byref(v))
        self.version_code = v.value
        self.version = _decode_version(v.value)
        self.fp8 = self.version >= FP8_SINCE

    def has(self, name: str) -> bool:
        return name in self._present


def _decode_version(code: int) -> Tuple[int, int, int]:
    # NCCL_VERSION(X,Y,Z) is X*1000+Y*100+Z up to 2.8, then X*10000+Y*100+Z.
    if code >= 10000:
        return code // 10000, (code % 10000) // 100, code % 100
    return code // 1000, (code % 1000) // 100, code % 100


_lib: Optional[NcclLibrary] = None
_lock = threading.Lock()


def load() -> NcclLibrary:
    """The process-wide NcclLibrary, opened on first call; raises NcclLoadError when none is usable."""
    global _lib
    lib = _lib
    if lib is not None:
        return lib
    with _lock:
        if _lib is None:
            handle, path, how = _locate()
            lib = NcclLibrary(handle, path, how)
            _log.info("NCCL %d.%d.%d loaded from %s (%s)", *lib.version, path, how)
            _lib = lib
        return _lib


def available() -> bool:
    """Whether a usable libnccl can be loaded (does not say whether a GPU is present)."""
    try:
        load()
        return True
    except NcclLoadError as e:
        _log.info("NCCL unavailable: %s", e)
        return False


def library_path() -> str:
    return load().path


def version() -> Tuple[int, int, int]:
    """(major, minor, patch) of the loaded NCCL."""
    return load().version


def version_code() -> int:
    """The loaded NCCL's version as ncclGetVersion reports it (e.g. 23203 for 2.32.3)."""
    return load().version_code


def has(name: str) -> bool:
    """Whether the loaded NCCL exports `name` (for the optional, newer symbols of the table)."""
    return load().has(name)


# --------------------------------------------------------------------------------------------
# The checker

def error_string(status: int) -> str:
    text = load().ncclGetErrorString(status)
    return text.decode(errors="replace") if text else ""


def check(status: int, call: str, comm=None) -> int:
    """Raise NcclError for a non-success status; return it otherwise. Every NCCL call ends here."""
    if status == SUCCESS:
        return status
    lib = load()
    name = RESULT_NAMES.get(status, f"ncclResult_{status}")
    text = error_string(status)
    last = ""
    if lib.ncclGetLastError is not None:
        raw = lib.ncclGetLastError(comm)
        last = raw.decode(errors="replace").strip() if raw else ""
    raise NcclError(status, name, text, last, call)


def _errcheck(status, func, args):
    # ctypes calls this after every ncclResult_t function; keep the success path to one test.
    if status:
        call = func.__name__
        pos = _COMM_ARG.get(call)
        check(status, call, args[pos] if pos is not None else None)
    return status


# --------------------------------------------------------------------------------------------
# Convenience wrappers and the dtype/op maps

def get_unique_id() -> UniqueId:
    uid = UniqueId()
    load().ncclGetUniqueId(ctypes.byref(uid))
    return uid


def supports_fp8() -> bool:
    """Whether the loaded NCCL has native float8 types (2.24+), needed to reduce fp8 data."""
    return load().fp8


def datatype(name: str, reduce: bool = False, fp8: Optional[bool] = None) -> int:
    """ncclDataType_t for a canonical dtype name.

    fp8 maps to NCCL's own fp8 types from 2.24; with an older NCCL it travels as uint8, which is
    only legal when nothing is reduced — a reduction then raises TypeError.
    """
    if name in _FP8 and not (load().fp8 if fp8 is None else fp8):
        if reduce:
            raise TypeError(f"dtype {name} cannot be reduced: the loaded NCCL has no native fp8 types "
                            f"(they need NCCL >= {'.'.join(map(str, FP8_SINCE))}); only copying collectives "
                            f"can move it, as bytes")
        return _UINT8
    try:
        return DTYPES[name]
    except KeyError:
        what = "reduce" if reduce else "communicate"
        raise TypeError(f"NCCL cannot {what} dtype {name!r}; supported: {', '.join(DTYPES)}") from None


def redop(name: str) -> int:
    """ncclRedOp_t for "sum", "prod", "max", "min" or "avg"."""
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {name!r}") from None


def reduce_dtypes(fp8: Optional[bool] = None) -> Dict[str, int]:
    """dtype name -> ncclDataType_t for the dtypes NCCL can reduce (`fp8`: native fp8 types, by
    default whether the loaded NCCL has them)."""
    fp8 = load().fp8 if fp8 is None else fp8
    return {k: v for k, v in DTYPES.items() if fp8 or k not in _FP8}


def move_dtypes(fp8: Optional[bool] = None) -> Dict[str, Tuple[int, int]]:
    """dtype name -> (ncclDataType_t, elements per array element) for copying collectives.

    Copies never look at values, so dtypes NCCL has no type for (bool, int16, uint16, and fp8 on
    an old NCCL) travel as uint8 with the count scaled by their itemsize.
    """
    from fp4ccl._arrays import ITEMSIZE
    fp8 = load().fp8 if fp8 is None else fp8
    table = {}
    for name, size in ITEMSIZE.items():
        if name in DTYPES and (fp8 or name not in _FP8):
            table[name] = (DTYPES[name], 1)
        else:
            table[name] = (_UINT8, size)
    return table
