"""The host (CPU) backend: the Communicator's API on numpy arrays and CPU torch tensors.

Every collective is built from two data-plane primitives, a variable-size all-gather and a
variable-size all-to-all of bytes, plus point-to-point send/recv. Reductions run in numpy in rank
order, so every rank computes the identical result. Two transports carry the bytes:
- `MpiTransport` when the job's exchange is MPI (mpi4py buffer calls);
- `BlobTransport` otherwise: files in /dev/shm when every rank shares the host, or values in the
  TCP store across hosts. A blob is published under a name every rank can derive, so readers never
  need a separate handshake; one barrier per collective tells the writer its blob may go.

Inside a group, sends go out at once (they never block) and recvs wait for the outermost
group_end, so the calls of a group may come in any order, as in NCCL. Collectives inside a group
still run at once: they only wait for peers to reach the same collective, and nothing before them
in a group blocks.

Waits for peers are bounded by FP4CCL_TIMEOUT (600 s when unset, 0 = forever). A wait that runs
out raises CommTimeoutError naming the call, its number on this communicator and the rank, and the
backend refuses every later call with CommClosedError, since its calls no longer line up with its
peers'.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import math
import os
import socket
import tempfile
import time
import uuid
from typing import List, Optional, Sequence

import numpy as np

from .._arrays import ArrayInfo, host_view, numpy_dtype
from .._timeout import ENV_TIMEOUT, env_timeout
from ..bootstrap.exchange import Exchange, MPIExchange, StoreExchange
from ..errors import CommClosedError, CommTimeoutError

_U8 = np.dtype(np.uint8)
# From this size all_reduce splits into reduce-scatter + all-gather (two exchanges, 1/n the arithmetic).
SPLIT_ALL_REDUCE_BYTES = 1 << 20
# How long a host wait lasts when FP4CCL_TIMEOUT is unset.
DEFAULT_TIMEOUT = 600.0


def _as_bytes(a: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a contiguous array (copies only if it is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(_U8)


class MpiTransport:
    """Data plane over mpi4py buffer calls."""

    def __init__(self, mpi_comm):
        self.comm = mpi_comm
        self._pending = []  # (request, buffer kept alive until the send completes)

    def all_gatherv(self, data: np.ndarray) -> List[np.ndarray]:
        from mpi4py import MPI
        size = self.comm.Get_size()
        counts = np.zeros(size, dtype=np.int64)
        self.comm.Allgather(np.array([data.size], dtype=np.int64), counts)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        out = np.empty(int(counts.sum()), dtype=_U8)
        self.comm.Allgatherv(data, [out, counts.tolist(), displs.tolist(), MPI.BYTE])
        return [out[d:d + c] for d, c in zip(displs, counts)]

    def alltoallv(self, parts: Sequence[np.ndarray]) -> List[np.ndarray]:
        from mpi4py import MPI
        size = self.comm.Get_size()
        scounts = np.array([p.size for p in parts], dtype=np.int64)
        rcounts = np.zeros(size, dtype=np.int64)
        self.comm.Alltoall(scounts, rcounts)
        sdispl = np.concatenate([[0], np.cumsum(scounts)[:-1]]).astype(np.int64)
        rdispl = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).astype(np.int64)
        send = np.concatenate(parts) if parts else np.empty(0, _U8)
        out = np.empty(int(rcounts.sum()), dtype=_U8)
        self.comm.Alltoallv([send, scounts.tolist(), sdispl.tolist(), MPI.BYTE],
                            [out, rcounts.tolist(), rdispl.tolist(), MPI.BYTE])
        return [out[d:d + c] for d, c in zip(rdispl, rcounts)]

    def send(self, data: np.ndarray, peer: int) -> None:
        # Buffered and non-blocking, like a stream-ordered ncclSend: a ring of sends then
        # receives must not deadlock on MPI's rendezvous protocol.
        buf = data.copy()
        self._pending.append((self.comm.Isend(buf, dest=peer, tag=7), buf))

    def recv(self, nbytes: int, peer: int) -> np.ndarray:
        from mpi4py import MPI
        out = np.empty(nbytes, dtype=_U8)
        status = MPI.Status()
        self.comm.Recv(out, source=peer, tag=7, status=status)
        got = status.Get_count(MPI.BYTE)
        if got != nbytes:
            raise ValueError(f"recv from rank {peer}: expected {nbytes} bytes, the peer sent {got}")
        return out

    def flush(self) -> None:
        for req, _ in self._pending:
            req.Wait()
        self._pending.clear()

    def barrier(self) -> None:
        self.flush()
        self.comm.Barrier()

    def close(self) -> None:
        self.flush()


class ShmBlobs:
    """Blobs as files in /dev/shm (same host), readable by this user only; written under a temporary
    name, then renamed into place. Each rank removes the files it wrote at close() or, failing
    that, when the interpreter exits; fp4ccl-run removes a killed job's by their prefix."""

    def __init__(self, name: str, timeout: float, directory: Optional[str] = None):
        base = directory or os.environ.get("FP4CCL_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        self.prefix = os.path.join(base, f"fp4ccl-{name}-")
        self.timeout = timeout
        self._mine = set()
        self._prune_at = 256
        atexit.register(self.close)

    def put(self, name: str, data: np.ndarray) -> None:
        path = self.prefix + name
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(memoryview(data))
            self._mine.add(path)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if len(self._mine) >= self._prune_at:
            # Point-to-point blobs are deleted by their reader, so forget the ones already gone.
            self._mine = {p for p in self._mine if os.path.exists(p)}
            self._prune_at = max(256, 2 * len(self._mine))

    def get(self, name: str) -> np.ndarray:
        path = self.prefix + name
        deadline = time.monotonic() + self.timeout
        pause = 2e-5
        while True:
            try:
                with open(path, "rb") as f:
                    return np.frombuffer(f.read(), dtype=_U8)
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no data at {path} after {self.timeout:g} s ({ENV_TIMEOUT}; a peer is "
                                       f"missing or ranks called different collectives)") from None
                time.sleep(pause)
                pause = min(pause * 2, 2e-3)

    def delete(self, name: str) -> None:
        path = self.prefix + name
        self._mine.discard(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        for path in self._mine:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._mine.clear()
        atexit.unregister(self.close)


class StoreBlobs:
    """Blobs as values in the TCP store (ranks on different hosts); `get` blocks until the value is set."""

    def __init__(self, store, name: str, timeout: float):
        self.store = store
        self.prefix = f"fp4ccl-host/{name}/"
        self.timeout = timeout

    def put(self, name: str, data: np.ndarray) -> None:
        self.store.set(self.prefix + name, data.tobytes())

    def get(self, name: str) -> np.ndarray:
        return np.frombuffer(self.store.get(self.prefix + name, timeout=self.timeout), dtype=_U8)

    def delete(self, name: str) -> None:
        self.store.delete(self.prefix + name)

    def close(self) -> None:
        pass


class BlobTransport:
    """Data plane over named blobs; collectives advance a shared sequence number in step."""

    def __init__(self, exchange: Exchange, blobs):
        self.exchange = exchange
        self.blobs = blobs
        self.rank, self.size = exchange.rank, exchange.size
        self._seq = 0
        self._sent = {}
        self._received = {}

    def _round(self, publish: dict) -> tuple:
        self._seq += 1
        names = []
        for dst, data in publish.items():
            name = f"c{self._seq}.{self.rank}.{dst}"
            self.blobs.put(name, data)
            names.append(name)
        return self._seq, names

    def _release(self, names: List[str]) -> None:
        self.exchange.barrier()  # every reader is done: our blobs may go
        for name in names:
            self.blobs.delete(name)

    def all_gatherv(self, data: np.ndarray) -> List[np.ndarray]:
        seq, names = self._round({"all": data})
        parts = [data if r == self.rank else self.blobs.get(f"c{seq}.{r}.all") for r in range(self.size)]
        self._release(names)
        return parts

    def alltoallv(self, parts: Sequence[np.ndarray]) -> List[np.ndarray]:
        seq, names = self._round({d: p for d, p in enumerate(parts) if d != self.rank})
        got = [parts[s] if s == self.rank else self.blobs.get(f"c{seq}.{s}.{self.rank}") for s in range(self.size)]
        self._release(names)
        return got

    def send(self, data: np.ndarray, peer: int) -> None:
        n = self._sent.get(peer, 0)
        self._sent[peer] = n + 1
        self.blobs.put(f"p{self.rank}.{peer}.{n}", data)

    def recv(self, nbytes: int, peer: int) -> np.ndarray:
        n = self._received.get(peer, 0)
        self._received[peer] = n + 1
        name = f"p{peer}.{self.rank}.{n}"
        data = self.blobs.get(name)
        self.blobs.delete(name)  # the receiver owns a point-to-point blob once read
        if data.size != nbytes:
            raise ValueError(f"recv from rank {peer}: expected {nbytes} bytes, the peer sent {data.size}")
        return data

    def barrier(self) -> None:
        self.exchange.barrier()

    def close(self) -> None:
        self.blobs.close()


def _job_name() -> str:
    """This job's part of the shared-memory file names: FP4CCL_JOB_ID (set by fp4ccl-run), else 'nojob'."""
    job = os.environ.get("FP4CCL_JOB_ID") or "nojob"
    if "/" in job:
        raise ValueError(f"FP4CCL_JOB_ID={job!r} must not contain '/' (it names files in shared memory)")
    return job


def make_transport(exchange: Exchange, timeout: float = math.inf):
    """Pick the host data plane for this exchange: MPI, shared memory on one host, or the store;
    `timeout` (seconds, inf = forever) bounds each of its waits for a peer."""
    if isinstance(exchange, MPIExchange):
        return MpiTransport(exchange.comm)
    # Rank 0's job name and a fresh id for this communicator, so every rank derives the same file names.
    mine = f"{_job_name()}-{uuid.uuid4().hex}".encode() if exchange.rank == 0 else None
    name = exchange.broadcast_bytes(mine, 0).decode()
    hosts = set(exchange.all_gather_bytes(socket.gethostname().encode()))
    if len(hosts) == 1:
        return BlobTransport(exchange, ShmBlobs(name, timeout))
    if isinstance(exchange, StoreExchange):
        return BlobTransport(exchange, StoreBlobs(exchange.store, name, timeout))
    raise RuntimeError("the host backend across several hosts needs MPI (mpirun/srun with mpi4py) or fp4ccl-run's store")


def _reduce(arrays: Sequence[np.ndarray], op: str, size: int) -> np.ndarray:
    if op == "avg" and arrays[0].dtype.kind not in "iub":
        # Like NCCL's pre-multiplied sum: each part divided by n, added in float64, rounded once, so an
        # average that fits the dtype never overflows on the way.
        out = functools.reduce(np.add, (a.astype(np.float64) / size for a in arrays))
        return out.astype(arrays[0].dtype)
    ufunc = {"sum": np.add, "avg": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}[op]
    out = functools.reduce(ufunc, arrays)
    if op == "avg":
        out = (out / np.asarray(size, dtype=out.dtype)).astype(out.dtype)
    return out


def _call(name: str):
    """Count the call and turn a wait that ran out into CommTimeoutError; refuse calls once one has."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args):
            if self._refusal:
                raise CommClosedError(self._refusal)
            self._seq += 1
            seq = self._seq
            try:
                return method(self, *args)
            except TimeoutError as err:
                label = f"recv from rank {args[1]}" if name == "recv" else name
                raise self._timed_out(label, f"call #{seq}", seq, err) from err
        return run
    return wrap


class HostBackend:
    """Collectives on host memory; calls are synchronous (they return once the result is in place)."""

    name = "host"

    def __init__(self, exchange: Exchange, transport=None, timeout: Optional[float] = None):
        self.exchange = exchange
        self.rank, self.size = exchange.rank, exchange.size
        self.timeout = env_timeout(unset=DEFAULT_TIMEOUT) if timeout is None else float(timeout)
        self.transport = transport if transport is not None else (
            _SelfTransport() if exchange.size == 1 else make_transport(exchange, self.timeout or math.inf))
        self._seq = 0        # calls made on this communicator; error messages name them
        self._depth = 0      # open groups
        self._deferred = []  # the open group's recvs: (seq, peer, destination bytes)
        self._refusal = ""   # why later calls are refused, once the backend is unusable

    def _timed_out(self, call: str, where: str, seq: int, err: BaseException) -> CommTimeoutError:
        """The error for a wait that ran out; from now on the backend refuses calls, since its calls no
        longer line up with its peers' (it may have published data for a call they never made)."""
        self._refusal = (f"the host communicator of rank {self.rank} was aborted after a timeout in {call} "
                         f"({where}): its calls no longer line up with its peers'; create a new Communicator")
        self._deferred.clear()
        self.transport.close()
        out = CommTimeoutError(
            f"host backend: {call} ({where}) on rank {self.rank} of {self.size} timed out: {err}. Ranks probably "
            f"disagree on the sequence of collectives, or one of them died; the communicator cannot be used any more")
        out.rank, out.call, out.seq = self.rank, call, seq
        return out

    def _typed(self, raw: np.ndarray, info: ArrayInfo, shape=None) -> np.ndarray:
        return raw.view(numpy_dtype(info.dtype)).reshape(shape if shape is not None else (-1,))

    @_call("all_reduce")
    def all_reduce(self, send: ArrayInfo, recv: ArrayInfo, op: str, stream=0) -> None:
        if send.nbytes < SPLIT_ALL_REDUCE_BYTES or self.size == 1:
            parts = self.transport.all_gatherv(_as_bytes(host_view(send)))
            host_view(recv).reshape(-1)[...] = _reduce([self._typed(p, send) for p in parts], op, self.size)
            return
        # Large arrays: each rank reduces one slice (same rank order per element, so the result is
        # bit-identical), then the slices are gathered; n times less arithmetic per rank.
        flat = host_view(send).reshape(-1)
        cuts = [len(c) for c in np.array_split(np.arange(flat.size), self.size)]
        bounds = np.cumsum(cuts)[:-1]
        got = self.transport.alltoallv([_as_bytes(c) for c in np.split(flat, bounds)])
        mine = _reduce([self._typed(p, send) for p in got], op, self.size)
        slices = self.transport.all_gatherv(_as_bytes(mine))
        np.concatenate(slices, out=host_view(recv).reshape(-1).view(_U8))

    @_call("broadcast")
    def broadcast(self, send: ArrayInfo, recv: ArrayInfo, root: int, stream=0) -> None:
        mine = _as_bytes(host_view(send)) if self.rank == root else np.empty(0, _U8)
        parts = self.transport.all_gatherv(mine)
        if self.rank != root or recv.ptr != send.ptr:
            host_view(recv).reshape(-1).view(_U8)[...] = parts[root]

    @_call("reduce")
    def reduce(self, send: ArrayInfo, recv: Optional[ArrayInfo], op: str, root: int, stream=0) -> None:
        empty = np.empty(0, _U8)
        parts = [empty] * self.size
        parts[root] = _as_bytes(host_view(send))
        got = self.transport.alltoallv(parts)
        if self.rank == root:
            host_view(recv).reshape(-1)[...] = _reduce([self._typed(p, send) for p in got], op, self.size)

    @_call("all_gather")
    def all_gather(self, send: ArrayInfo, recv: ArrayInfo, stream=0) -> None:
        self._all_gather(send, recv)

    def _all_gather(self, send: ArrayInfo, recv: ArrayInfo) -> None:
        parts = self.transport.all_gatherv(_as_bytes(host_view(send)))
        flat = host_view(recv).reshape(-1).view(_U8)
        offset = 0
        for p in parts:
            flat[offset:offset + p.size] = p
            offset += p.size

    @_call("reduce_scatter")
    def reduce_scatter(self, send: ArrayInfo, recv: ArrayInfo, op: str, stream=0) -> None:
        chunks = np.split(_as_bytes(host_view(send)), self.size)
        got = self.transport.alltoallv(chunks)
        host_view(recv).reshape(-1)[...] = _reduce([self._typed(p, send) for p in got], op, self.size)

    @_call("all_to_all")
    def all_to_all(self, send: ArrayInfo, recv: ArrayInfo, stream=0) -> None:
        got = self.transport.alltoallv(np.split(_as_bytes(host_view(send)), self.size))
        np.concatenate(got, out=host_view(recv).reshape(-1).view(_U8))

    @_call("all_gatherv")
    def all_gatherv(self, send: ArrayInfo, recv: ArrayInfo, counts: Sequence[int], stream=0) -> None:
        self._all_gather(send, recv)  # the gather already concatenates parts of any size

    @_call("reduce_scatterv")
    def reduce_scatterv(self, send: ArrayInfo, recv: ArrayInfo, counts: Sequence[int], op: str, stream=0) -> None:
        cuts = np.cumsum(counts)[:-1] * send.itemsize
        got = self.transport.alltoallv(np.split(_as_bytes(host_view(send)), cuts))
        host_view(recv).reshape(-1)[...] = _reduce([self._typed(p, send) for p in got], op, self.size)

    @_call("all_gatherv_bytes")
    def all_gatherv_bytes(self, data: np.ndarray) -> List[np.ndarray]:
        return self.transport.all_gatherv(data)

    @_call("alltoallv_bytes")
    def alltoallv_bytes(self, parts: Sequence[np.ndarray]) -> List[np.ndarray]:
        return self.transport.alltoallv(list(parts))

    @_call("send")
    def send(self, buf: ArrayInfo, peer: int, stream=0) -> None:
        self.transport.send(_as_bytes(host_view(buf)), peer)

    @_call("recv")
    def recv(self, buf: ArrayInfo, peer: int, stream=0) -> None:
        out = host_view(buf).reshape(-1).view(_U8)
        if self._depth:
            self._deferred.append((self._seq, peer, out))
        else:
            out[...] = self.transport.recv(out.size, peer)

    def group_start(self) -> None:
        if self._refusal:
            raise CommClosedError(self._refusal)
        self._depth += 1

    def group_end(self) -> None:
        if self._depth == 0:
            raise RuntimeError("group_end() without a matching group_start()")
        self._depth -= 1
        if self._depth:
            return
        deferred, self._deferred = self._deferred, []
        failures = []
        for seq, peer, out in deferred:
            # Every recv runs even after one failed, so no peer's send is left unmatched.
            try:
                out[...] = self.transport.recv(out.size, peer)
            except ValueError as err:
                failures.append(err)
            except TimeoutError as err:
                raise self._timed_out(f"recv from rank {peer}", f"call #{seq}, run at group_end", seq, err) from err
        if failures:
            raise failures[0]

    @_call("barrier")
    def barrier(self, stream=0) -> None:
        if self._depth:
            raise RuntimeError("barrier() inside a group: the group's recvs only run at group_end(), "
                               "so the barrier could not wait for them")
        self.transport.barrier()

    def destroy(self) -> None:
        self._deferred.clear()
        self._depth = 0
        if not self._refusal:
            self._refusal = f"the host communicator of rank {self.rank} was destroyed; create a new Communicator"
        self.transport.close()

    def abort(self) -> None:
        self._deferred.clear()
        self._depth = 0
        if not self._refusal:
            self._refusal = f"the host communicator of rank {self.rank} was aborted; create a new Communicator"
        self.transport.close()


class _SelfTransport:
    """The data plane of a one-rank job, where a send can only go to oneself."""

    def __init__(self):
        self._queue = []

    def all_gatherv(self, data):
        return [data]

    def alltoallv(self, parts):
        return list(parts)

    def send(self, data, peer):
        self._queue.append(data.copy())

    def recv(self, nbytes, peer):
        if not self._queue:
            raise RuntimeError("recv from rank 0 in a 1-rank job with no matching send before it")
        data = self._queue.pop(0)
        if data.size != nbytes:
            raise ValueError(f"recv from rank 0: expected {nbytes} bytes, the send had {data.size}")
        return data

    def barrier(self):
        pass

    def close(self):
        self._queue.clear()
