"""Device memory through CUDA's virtual memory management (cuMemCreate / cuMemMap), shareable with other
processes of the node as a POSIX file descriptor, and the descriptor passing itself.

The alternative to cudaMalloc + cudaIpcGetMemHandle for symmetric buffers: on 4 x H200 a copy-engine
pull from a peer's buffer kept its speed beside a matmul when the buffer came from torch's symmetric
memory (made this way) and lost up to a third when it came from cudaMalloc / IPC (bench/RESULTS.md
runs 21 and 22).

Descriptors cross processes over abstract-namespace Unix datagram sockets with SCM_RIGHTS: every rank
binds `\\0<prefix>-<rank>`, then sends its descriptor to every peer's address; datagrams queue at the
receiver, so no rank has to accept connections in a thread. Everything here is driver API through
ctypes (libcuda), called with the device's primary context current (the caller's cupy Device scope).
"""
from __future__ import annotations

import array
import ctypes
import os
import socket
import struct
from typing import List

from ._cuda import driver_function
from ._log import get_logger

log = get_logger(__name__)

_PINNED = 1               # CU_MEM_ALLOCATION_TYPE_PINNED
_POSIX_FD = 1             # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_LOCATION_DEVICE = 1      # CU_MEM_LOCATION_TYPE_DEVICE
_READWRITE = 3            # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
_GRANULARITY_RECOMMENDED = 1
_ATTR_VMM = 102           # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
_ATTR_POSIX_FD = 103      # CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _Prop(ctypes.Structure):
    """CUmemAllocationProp."""
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    """CUmemAccessDesc."""
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class VmmError(RuntimeError):
    """A driver call of the VMM path failed; `status` is its CUresult."""

    def __init__(self, call: str, status: int):
        super().__init__(f"{call} failed (CUresult {status})")
        self.call, self.status = call, status


_SIGNATURES = {
    "cuDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
    "cuMemGetAllocationGranularity": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(_Prop), ctypes.c_int],
    "cuMemCreate": [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.POINTER(_Prop), ctypes.c_uint64],
    "cuMemAddressReserve": [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64,
                            ctypes.c_uint64],
    "cuMemMap": [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64],
    "cuMemSetAccess": [ctypes.c_uint64, ctypes.c_size_t, ctypes.POINTER(_AccessDesc), ctypes.c_size_t],
    "cuMemExportToShareableHandle": [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64],
    "cuMemImportFromShareableHandle": [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_int],
    "cuMemUnmap": [ctypes.c_uint64, ctypes.c_size_t],
    "cuMemAddressFree": [ctypes.c_uint64, ctypes.c_size_t],
    "cuMemRelease": [ctypes.c_uint64],
}


class _Driver:
    """The VMM calls of libcuda as attributes (lib.cuMemCreate(...)), typed on first use."""

    def __getattr__(self, name: str):
        return driver_function(name, _SIGNATURES[name])


def _driver() -> _Driver:
    """The driver's VMM calls; OSError / AttributeError where there is no driver or it lacks them."""
    lib = _Driver()
    for name in _SIGNATURES:
        getattr(lib, name)
    return lib


def _check(call: str, rc: int) -> None:
    if rc:
        raise VmmError(call, rc)


def supported(device: int) -> bool:
    """Whether `device` can make VMM allocations exportable as POSIX file descriptors."""
    try:
        lib = _driver()
    except (OSError, AttributeError) as err:
        log.info("CUDA VMM unavailable (%s): symmetric buffers use cudaMalloc and CUDA IPC", err)
        return False
    for attr in (_ATTR_VMM, _ATTR_POSIX_FD):
        value = ctypes.c_int(0)
        if lib.cuDeviceGetAttribute(ctypes.byref(value), attr, device) or not value.value:
            return False
    return True


def _prop(device: int) -> _Prop:
    prop = _Prop()
    prop.type = _PINNED
    prop.requestedHandleTypes = _POSIX_FD
    prop.location.type = _LOCATION_DEVICE
    prop.location.id = device
    return prop


def _map(device: int, handle: int, size: int) -> int:
    """Reserve a VA range for `size` bytes, map `handle` there, grant `device` read-write access."""
    lib = _driver()
    ptr = ctypes.c_uint64(0)
    _check("cuMemAddressReserve", lib.cuMemAddressReserve(ctypes.byref(ptr), size, 0, 0, 0))
    try:
        _check("cuMemMap", lib.cuMemMap(ptr.value, size, 0, handle, 0))
        desc = _AccessDesc()
        desc.location.type = _LOCATION_DEVICE
        desc.location.id = device
        desc.flags = _READWRITE
        rc = lib.cuMemSetAccess(ptr.value, size, ctypes.byref(desc), 1)
        if rc:
            lib.cuMemUnmap(ptr.value, size)
            raise VmmError("cuMemSetAccess", rc)
    except VmmError:
        lib.cuMemAddressFree(ptr.value, size)
        raise
    return ptr.value


class Mapping:
    """Physical memory (own or imported) mapped at `ptr` for `size` bytes in this process."""

    def __init__(self, handle: int, ptr: int, size: int):
        self.handle, self.ptr, self.size = handle, ptr, size

    @classmethod
    def create(cls, device: int, nbytes: int) -> "Mapping":
        lib = _driver()
        prop = _prop(device)
        gran = ctypes.c_size_t(0)
        _check("cuMemGetAllocationGranularity",
               lib.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), _GRANULARITY_RECOMMENDED))
        g = max(int(gran.value), 1)
        size = (max(nbytes, 1) + g - 1) // g * g
        handle = ctypes.c_uint64(0)
        _check("cuMemCreate", lib.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(prop), 0))
        return cls._mapped(device, handle.value, size)

    @classmethod
    def import_fd(cls, device: int, fd: int, size: int) -> "Mapping":
        """Map a peer's allocation received as `fd` (the caller closes fd)."""
        lib = _driver()
        handle = ctypes.c_uint64(0)
        _check("cuMemImportFromShareableHandle",
               lib.cuMemImportFromShareableHandle(ctypes.byref(handle), ctypes.c_void_p(fd), _POSIX_FD))
        return cls._mapped(device, handle.value, size)

    @classmethod
    def _mapped(cls, device: int, handle: int, size: int) -> "Mapping":
        """`handle` mapped for `device`; the handle is released if mapping fails."""
        try:
            return cls(handle, _map(device, handle, size), size)
        except VmmError:
            _driver().cuMemRelease(handle)
            raise

    def export_fd(self) -> int:
        """A new file descriptor for this allocation (the caller closes it)."""
        fd = ctypes.c_int(-1)
        _check("cuMemExportToShareableHandle",
               _driver().cuMemExportToShareableHandle(ctypes.byref(fd), self.handle, _POSIX_FD, 0))
        return fd.value

    def release(self) -> None:
        """Unmap and release (the physical memory goes once every process released its handle)."""
        if not self.ptr:
            return
        lib = _driver()
        ptr, size, handle = self.ptr, self.size, self.handle
        self.ptr = self.handle = 0
        for call, rc in (("cuMemUnmap", lib.cuMemUnmap(ptr, size)), ("cuMemAddressFree", lib.cuMemAddressFree(ptr, size)),
                         ("cuMemRelease", lib.cuMemRelease(handle))):
            if rc:
                log.warning("%s failed (CUresult %d) while freeing a symmetric buffer", call, rc)


class FdExchange:
    """Abstract Unix datagram sockets that move one file descriptor from every rank to every other.

    bind() first on every rank, then (after the ranks agree that all are bound) exchange()."""

    def __init__(self, prefix: str, rank: int, world: int, timeout: float):
        self.prefix, self.rank, self.world = prefix, rank, world
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)

    def _address(self, rank: int) -> str:
        return f"\0{self.prefix}-{rank}"

    def bind(self) -> None:
        self.sock.bind(self._address(self.rank))

    def exchange(self, fd: int) -> List[int]:
        """fd to every peer; returns every rank's descriptor (our own `fd` at our index)."""
        for i in range(1, self.world):
            p = (self.rank + i) % self.world
            # sendmsg itself: socket.send_fds drops its address argument before Python 3.12
            self.sock.sendmsg([struct.pack("<i", self.rank)],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self._address(p))
        fds = [-1] * self.world
        fds[self.rank] = fd
        for _ in range(self.world - 1):
            msg, got, _flags, _addr = socket.recv_fds(self.sock, 16, 1)
            (sender,) = struct.unpack("<i", msg[:4])
            if not got or not 0 <= sender < self.world or fds[sender] != -1:
                for f in got:
                    os.close(f)
                raise OSError(f"unexpected descriptor message from rank {sender}")
            fds[sender] = got[0]
        return fds

    def close(self) -> None:
        self.sock.close()
