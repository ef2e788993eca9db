"""Host-side byte exchange between the ranks of a job: over MPI, a key-value store, or a torch ProcessGroup.

Exchanges carry small control data (NCCL unique ids, sizes, IPC handles, hostnames); the host
backend's data plane lives in backends/host.py.
"""
from __future__ import annotations

import datetime
import math
import struct
import time
from typing import Callable, List, Optional

import numpy as np


class Exchange:
    """All-gather, broadcast and barrier of host bytes; every method is collective over the job."""

    rank: int
    size: int

    def all_gather_bytes(self, data: bytes) -> List[bytes]:
        raise NotImplementedError

    def broadcast_bytes(self, data: Optional[bytes], root: int) -> bytes:
        raise NotImplementedError

    def barrier(self) -> None:
        """Return once every rank has called it, waiting as long as the exchange's own bound (a store
        exchange's timeout, else its store client's; MPI's and torch.distributed's as their library
        does). The host backend's end-of-call barrier is not this one: its transport has its own, which
        FP4CCL_TIMEOUT bounds over every exchange."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class SingleExchange(Exchange):
    """The exchange of a one-rank job: nothing to talk to."""

    rank, size = 0, 1

    def all_gather_bytes(self, data: bytes) -> List[bytes]:
        return [bytes(data)]

    def broadcast_bytes(self, data: Optional[bytes], root: int) -> bytes:
        if root != 0:
            raise ValueError(f"root={root} out of range for a 1-rank job")
        return bytes(data or b"")

    def barrier(self) -> None:
        pass


class MPIExchange(Exchange):
    """Exchange over an mpi4py communicator, with buffer-based calls (nothing is pickled).

    It works on a duplicate of the caller's communicator (collective, like every way to build one), so
    fp4ccl's messages, the host backend's tagged sends included, never match the caller's own receives
    and the caller's never match fp4ccl's."""

    def __init__(self, mpi_comm):
        self.comm = mpi_comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def all_gather_bytes(self, data: bytes) -> List[bytes]:
        from mpi4py import MPI
        counts = np.zeros(self.size, dtype=np.int64)
        self.comm.Allgather(np.array([len(data)], dtype=np.int64), counts)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        send = np.frombuffer(bytes(data), dtype=np.uint8)
        self.comm.Allgatherv(send, [recv, counts.tolist(), displs.tolist(), MPI.BYTE])
        return [recv[d:d + c].tobytes() for d, c in zip(displs, counts)]

    def broadcast_bytes(self, data: Optional[bytes], root: int) -> bytes:
        n = np.array([len(data) if self.rank == root else 0], dtype=np.int64)
        self.comm.Bcast(n, root=root)
        buf = np.frombuffer(bytes(data), dtype=np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self.comm.Bcast(buf, root=root)
        return buf.tobytes()

    def barrier(self) -> None:
        self.comm.Barrier()

    def close(self) -> None:
        from mpi4py import MPI
        comm, self.comm = self.comm, None
        if comm is not None and not MPI.Is_finalized():
            comm.Free()


# A polled get waits in the store server in slices this long, checking between slices whether to stop.
POLL_SLICE_S = 0.25


def polled_get(store, key: str, timeout: float, interrupt: Callable[[], None]) -> bytes:
    """store.get(key), waited in POLL_SLICE_S slices with interrupt() called before each, so that a
    close or abort in another thread (which interrupt() turns into an exception) ends the wait within a
    slice. TimeoutError after `timeout` seconds (math.inf: never)."""
    deadline = time.monotonic() + timeout
    while True:
        interrupt()
        left = deadline - time.monotonic()
        try:
            return store.get(key, timeout=max(0.0, min(POLL_SLICE_S, left)))
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise


class StoreExchange(Exchange):
    """Exchange through a key-value store (fp4ccl's TCP store, or torch's TCPStore).

    Keys are namespaced by a per-exchange prefix and a sequence number that every rank advances in
    step; the last rank to finish with a round deletes its keys, so the store does not grow. With
    `interrupt`, every wait is a polled_get() that calls it between slices (the host backend's abort).
    """

    def __init__(self, store, rank: int, size: int, prefix: str = "fp4ccl", timeout: Optional[float] = None,
                 interrupt: Optional[Callable[[], None]] = None):
        self.store = store
        self.rank = rank
        self.size = size
        self.prefix = prefix
        self.timeout = timeout
        self.interrupt = interrupt
        self._seq = 0

    def _next(self, what: str) -> str:
        self._seq += 1
        return f"{self.prefix}/{what}/{self._seq}"

    def _get(self, key: str) -> bytes:
        if self.interrupt is not None:
            return polled_get(self.store, key, self.timeout or math.inf, self.interrupt)
        return self.store.get(key, timeout=self.timeout) if self.timeout else self.store.get(key)

    def _finish(self, base: str, keys: List[str]) -> None:
        if self.store.add(f"{base}/done", 1) == self.size:
            for key in keys + [f"{base}/done"]:
                self.store.delete(key)

    def all_gather_bytes(self, data: bytes) -> List[bytes]:
        base = self._next("ag")
        self.store.set(f"{base}/{self.rank}", bytes(data))
        keys = [f"{base}/{r}" for r in range(self.size)]
        out = [self._get(k) for k in keys]
        self._finish(base, keys)
        return out

    def broadcast_bytes(self, data: Optional[bytes], root: int) -> bytes:
        if not 0 <= root < self.size:
            raise ValueError(f"root={root} out of range for world size {self.size}")
        base = self._next("bc")
        if self.rank == root:
            self.store.set(f"{base}/v", bytes(data or b""))
        out = self._get(f"{base}/v")
        self._finish(base, [f"{base}/v"])
        return out

    def barrier(self) -> None:
        base = self._next("bar")
        if self.store.add(f"{base}/in", 1) == self.size:
            self.store.set(f"{base}/go", b"1")   # the last to arrive lets the others go, and need not wait
        else:
            self._get(f"{base}/go")
        self._finish(base, [f"{base}/in", f"{base}/go"])


def torch_timedelta(seconds: float) -> datetime.timedelta:
    """A timeout in seconds as torch.distributed takes it; torch has no wait-forever: a century stands
    for math.inf."""
    return datetime.timedelta(days=36500) if math.isinf(seconds) else datetime.timedelta(seconds=seconds)


class TorchStoreAdapter:
    """Gives torch.distributed's Store the method names StoreExchange uses."""

    def __init__(self, store):
        self._store = store

    def set(self, key: str, value: bytes) -> None:
        self._store.set(key, value)

    def get(self, key: str, timeout: Optional[float] = None) -> bytes:
        """The value of key once set; timeout: seconds (math.inf: forever), default the torch store's own
        (for the program's default store, its process group's). TimeoutError when it runs out."""
        if timeout is not None:
            span = torch_timedelta(timeout)
            # A span other than the store's own costs a wait before the get: one more round trip.
            if span != self._store.timeout:
                try:
                    self._store.wait([key], span)
                except RuntimeError as err:   # torch's DistStoreError on a timeout; check the key rather than parse
                    if not self._store.check([key]):
                        raise self._not_set(key, timeout) from err
        try:
            return bytes(self._store.get(key))
        except RuntimeError as err:
            if self._store.check([key]):
                raise
            raise self._not_set(key, self._store.timeout.total_seconds()) from err

    @staticmethod
    def _not_set(key: str, timeout: float) -> TimeoutError:
        return TimeoutError(f"get({key!r}): not set within {timeout:g} s in torch.distributed's store")

    def add(self, key: str, delta: int) -> int:
        return int(self._store.add(key, delta))

    def delete(self, key: str) -> None:
        self._store.delete_key(key)


class TorchGroupExchange(Exchange):
    """Exchange over a torch.distributed ProcessGroup, with tensors (never all_gather_object's pickle)."""

    def __init__(self, group=None):
        import torch.distributed as dist
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            import torch
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            import torch
            self.device = torch.device("cpu")

    def all_gather_bytes(self, data: bytes) -> List[bytes]:
        import torch
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(n) for _ in range(self.size)]
        self.dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s.item()) for s in sizes]
        width = max(sizes + [1])
        mine = torch.zeros(width, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        mine = mine.to(self.device)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        self.dist.all_gather(parts, mine, group=self.group)
        return [bytes(p[:s].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]

    def broadcast_bytes(self, data: Optional[bytes], root: int) -> bytes:
        return self.all_gather_bytes(data if self.rank == root else b"")[root]

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)


def pack_ints(*values: int) -> bytes:
    """Fixed-width little-endian encoding of small integer tuples for exchanges."""
    return struct.pack(f"<{len(values)}q", *values)


def unpack_ints(data: bytes) -> tuple:
    return struct.unpack(f"<{len(data) // 8}q", data)
