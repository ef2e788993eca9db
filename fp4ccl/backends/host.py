"""The host (CPU) backend: the Communicator's API on numpy arrays and CPU torch tensors.

Every collective is built from two data-plane primitives, a variable-size all-gather and a
variable-size all-to-all of bytes, plus point-to-point send/recv. Reductions run in numpy in rank
order, so every rank computes the identical result. Two transports carry the bytes:
- `MpiTransport` when the job's exchange is MPI (mpi4py nonblocking buffer calls, polled);
- `BlobTransport` otherwise: files in /dev/shm when every rank shares the host, or values in the
  TCP store across hosts. A blob is published under a name every rank can derive, so readers never
  need a separate handshake; one barrier per collective tells the writer its blob may go.

Every message carries a header (`_HEADER`): the call, dtype, byte count, op, root and a checksum of
the v-collectives' counts, as its sender saw them. A rank compares each header and part length it
receives with its own, once the exchange round is complete, so ranks that disagree get a ValueError
wherever the disagreement is visible, and none is left waiting for a peer that gave up early.

Inside a group, sends go out at once (they never block) and recvs wait for the outermost
group_end, so the calls of a group may come in any order, as in NCCL. Collectives inside a group
still run at once: they only wait for peers to reach the same collective, and nothing before them
in a group blocks.

Every wait for a peer is bounded by FP4CCL_TIMEOUT (600 s when unset, 0 = forever). A wait that
runs out raises CommTimeoutError naming the call, its number on this communicator and the rank, and
the backend refuses every later call with CommClosedError, since its calls no longer line up with
its peers'. abort() never waits: it cancels pending MPI sends, and a wait for a peer in another thread
ends with CommClosedError. destroy() first waits, at most the timeout, until the peers have taken this
rank's sends; interpreter exit without destroy() leaves the unread ones for their readers.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import math
import os
import socket
import struct
import tempfile
import threading
import time
import uuid
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .._arrays import ArrayInfo, host_view, numpy_dtype
from .._timeout import ENV_TIMEOUT, env_timeout
from ..bootstrap.exchange import Exchange, MPIExchange, StoreExchange, polled_get
from ..errors import CommClosedError, CommTimeoutError

_U8 = np.dtype(np.uint8)
# From this size all_reduce splits into reduce-scatter + all-gather (two exchanges, 1/n the arithmetic).
SPLIT_ALL_REDUCE_BYTES = 1 << 20
# How long a host wait lasts when FP4CCL_TIMEOUT is unset.
DEFAULT_TIMEOUT = 600.0

# The header of every message: call, op, root, dtype, byte count, checksum of the counts. Padded to
# 48 bytes so a payload read right after it keeps the 16-byte alignment numpy's loops prefer.
_HEADER = struct.Struct("<BBi16sqI14x")
HEADER_BYTES = _HEADER.size
_CALLS = ("all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "all_to_all", "all_gatherv",
          "reduce_scatterv", "send", "all_gatherv_bytes", "alltoallv_bytes")
_CALL_CODE = {c: i for i, c in enumerate(_CALLS)}
_OPS = ("", "sum", "prod", "max", "min", "avg")
_OP_CODE = {o: i for i, o in enumerate(_OPS)}
# Why a wait for a peer ends when abort() runs in another thread.
_ABORTED = "the communicator was aborted (abort()) while this rank waited for a peer"
# Send buffers of aborted MPI communicators: MPI may still read a cancelled send's buffer, so it
# must outlive the communicator (a leak, but only after an abort).
_ABANDONED: list = []


def _as_bytes(a: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a contiguous array (copies only if it is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(_U8)


def _header(call: str, dtype: str = "", nbytes: int = 0, op: str = "", root: int = -1,
            counts: Optional[Sequence[int]] = None) -> bytes:
    crc = zlib.crc32(np.asarray(counts, np.int64).tobytes()) if counts is not None else 0
    return _HEADER.pack(_CALL_CODE[call], _OP_CODE[op], root, dtype.encode(), nbytes, crc)


def _disagreement(what: str, me: int, peer: int, mine: bytes, theirs: bytes) -> str:
    """Why the header `theirs` from `peer` does not match this rank's `mine`, for an error message."""
    m_call, m_op, m_root, m_dtype, m_nbytes, m_crc = _HEADER.unpack(mine)
    t_call, t_op, t_root, t_dtype, t_nbytes, t_crc = _HEADER.unpack(theirs)
    m_dtype, t_dtype = m_dtype.rstrip(b"\0").decode(), t_dtype.rstrip(b"\0").decode()
    if m_call != t_call:
        return (f"{what}: rank {peer} called {_CALLS[t_call]} at this point, rank {me} {_CALLS[m_call]}; "
                f"every rank must call the same collectives in the same order")
    if m_crc != t_crc:
        split = ("" if t_nbytes != m_nbytes else
                 "; the totals agree but the rows are split differently")
        return (f"{what}: rank {peer}'s sizes add up to {t_nbytes} bytes of {t_dtype}, rank {me}'s to {m_nbytes} "
                f"bytes of {m_dtype}{split}; every rank must pass the same sizes")
    if (m_dtype, m_nbytes) != (t_dtype, t_nbytes):
        rule = ("a recv's buffer must match its send's in bytes and dtype" if _CALLS[m_call] == "send" else
                "every rank must pass the same shape and dtype")
        return (f"{what}: rank {peer} sent {t_nbytes} bytes of {t_dtype}, rank {me} expects {m_nbytes} bytes "
                f"of {m_dtype}; {rule}")
    if m_op != t_op:
        return f"{what}: rank {peer} passed op='{_OPS[t_op]}', rank {me} op='{_OPS[m_op]}'"
    return f"{what}: rank {peer} passed root={t_root}, rank {me} root={m_root}"


class MpiTransport:
    """Data plane over mpi4py: nonblocking buffer calls polled to completion, so the timeout bounds each wait."""

    _TAG = 7

    def __init__(self, mpi_comm, timeout: float):
        self.comm = mpi_comm
        self.size = mpi_comm.Get_size()
        self.timeout = timeout
        self._pending = []  # (request, buffer kept alive until the send completes)
        self._prune_at = 64
        self.aborted = False  # set by abort(), maybe from another thread: ends this transport's waits
        # MPI forbids two threads using one request at once: while a thread tests requests, an abort() from
        # another leaves the cancelling to it (_check_waiting).
        self._lock = threading.Lock()
        self._waiting = False

    def _wait(self, requests: list, what: str) -> None:
        from mpi4py import MPI
        with self._lock:
            if self.aborted:
                raise CommClosedError(f"{_ABORTED} ({what})")
            self._waiting = True
        try:
            # Polled like MPICH's own blocking waits, yielding the core to other ranks between tests.
            deadline = time.monotonic() + self.timeout
            while not MPI.Request.Testall(requests):
                self._check_waiting(deadline, f"MPI {what} did not complete")
                os.sched_yield()
        finally:
            with self._lock:
                self._waiting = False

    def _check_waiting(self, deadline: float, what: str) -> None:
        if self.aborted:
            self._cancel_pending()   # here, in the thread that was using the requests
            raise CommClosedError(f"{_ABORTED} ({what})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {self.timeout:g} s ({ENV_TIMEOUT})")

    @staticmethod
    def _records(header: bytes, sizes: Sequence[int]) -> np.ndarray:
        """One (header, payload size) record per destination, as uint8 rows."""
        rows = b"".join(header + struct.pack("<q", s) for s in sizes)
        return np.frombuffer(rows, _U8).reshape(len(sizes), HEADER_BYTES + 8)

    @staticmethod
    def _parse(records: np.ndarray) -> Tuple[List[bytes], np.ndarray]:
        headers = [r[:HEADER_BYTES].tobytes() for r in records]
        return headers, np.ascontiguousarray(records[:, HEADER_BYTES:]).view(np.int64).reshape(-1)

    def all_gatherv(self, header: bytes, data: np.ndarray) -> List[Tuple[bytes, np.ndarray]]:
        from mpi4py import MPI
        mine = self._records(header, [data.size])
        records = np.empty((self.size, mine.shape[1]), _U8)
        self._wait([self.comm.Iallgather(mine, records)], "all-gather of sizes")
        headers, counts = self._parse(records)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        out = np.empty(int(counts.sum()), dtype=_U8)
        self._wait([self.comm.Iallgatherv(data, [out, counts.tolist(), displs.tolist(), MPI.BYTE])], "all-gather")
        return [(h, out[d:d + c]) for h, d, c in zip(headers, displs, counts)]

    def alltoallv(self, header: bytes, parts: Sequence[np.ndarray]) -> List[Tuple[bytes, np.ndarray]]:
        from mpi4py import MPI
        scounts = np.array([p.size for p in parts], dtype=np.int64)
        mine = self._records(header, scounts)
        records = np.empty_like(mine)
        self._wait([self.comm.Ialltoall(mine, records)], "all-to-all of sizes")
        headers, rcounts = self._parse(records)
        sdispl = np.concatenate([[0], np.cumsum(scounts)[:-1]]).astype(np.int64)
        rdispl = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).astype(np.int64)
        send = np.concatenate(parts) if parts else np.empty(0, _U8)
        out = np.empty(int(rcounts.sum()), dtype=_U8)
        self._wait([self.comm.Ialltoallv([send, scounts.tolist(), sdispl.tolist(), MPI.BYTE],
                                         [out, rcounts.tolist(), rdispl.tolist(), MPI.BYTE])], "all-to-all")
        return [(h, out[d:d + c]) for h, d, c in zip(headers, rdispl, rcounts)]

    def send(self, header: bytes, data: np.ndarray, peer: int) -> None:
        # Buffered and non-blocking, like a stream-ordered ncclSend: a ring of sends then
        # receives must not deadlock on MPI's rendezvous protocol.
        buf = np.empty(HEADER_BYTES + data.size, _U8)
        buf[:HEADER_BYTES] = np.frombuffer(header, _U8)
        buf[HEADER_BYTES:] = data
        if len(self._pending) >= self._prune_at:
            self._prune()
        self._pending.append((self.comm.Isend(buf, dest=peer, tag=self._TAG), buf))

    def recv(self, peer: int) -> Tuple[bytes, np.ndarray]:
        from mpi4py import MPI
        status = MPI.Status()
        deadline = time.monotonic() + self.timeout
        while (message := self.comm.Improbe(source=peer, tag=self._TAG, status=status)) is None:
            self._check_waiting(deadline, f"no message from rank {peer}")
            os.sched_yield()
        buf = np.empty(status.Get_count(MPI.BYTE), _U8)
        self._wait([message.Irecv(buf)], f"recv from rank {peer}")
        return buf[:HEADER_BYTES].tobytes(), buf[HEADER_BYTES:]

    def _prune(self) -> None:
        """Drop the sends that have completed, so a long run of sends does not pile up buffers (tested
        again only once the list has doubled: amortised O(1) per send)."""
        self._pending = [(req, buf) for req, buf in self._pending if not req.Test()]
        self._prune_at = max(64, 2 * len(self._pending))

    def barrier(self) -> None:
        self._prune()
        self._wait([self.comm.Ibarrier()], "barrier")

    def close(self) -> None:
        """Wait for the pending sends (at most the timeout, then abandon them and raise TimeoutError)."""
        try:
            self._wait([req for req, _ in self._pending], f"{len(self._pending)} pending send(s)")
        except TimeoutError:
            self.abort()
            raise
        self._pending.clear()

    def abort(self) -> None:
        """Cancel and free the pending sends without waiting for them (or, while another thread waits on
        requests, have that thread do it)."""
        with self._lock:
            self.aborted = True
            if self._waiting:
                return
        self._cancel_pending()

    def _cancel_pending(self) -> None:
        for req, buf in self._pending:
            for step in (req.Cancel, req.Free):
                try:
                    step()
                except Exception:  # noqa: BLE001 - best effort: the request may have completed meanwhile
                    pass
            _ABANDONED.append(buf)
        self._pending.clear()


def shm_prefix(job: str, directory: Optional[str] = None) -> str:
    """The path prefix of a job's shared-memory files: fp4ccl-<job>-... in `directory`, FP4CCL_SHM_DIR,
    /dev/shm or the temp dir, the first there is. fp4ccl-run removes a killed job's files by it."""
    base = directory or os.environ.get("FP4CCL_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    return os.path.join(base, f"fp4ccl-{job}-")


def _polls(timeout: float, timed_out, check_open):
    """Yield at once, then again after each pause (20 us, doubling up to 2 ms) while `timeout` seconds
    have not passed since the first; then raise timed_out(). check_open() runs before each pause, so an
    abort() from another thread ends the wait. For loops that poll files for a peer."""
    deadline = time.monotonic() + timeout
    pause = 2e-5
    while True:
        yield
        check_open()
        if time.monotonic() > deadline:
            raise timed_out()
        time.sleep(pause)
        pause = min(pause * 2, 2e-3)


class ShmBlobs:
    """Blobs as files in /dev/shm (same host), readable by this user only; written under a temporary
    name, then renamed into place. Each rank removes the files it wrote at close() (its transport's
    close or abort, or interpreter exit); fp4ccl-run removes a killed job's by their prefix."""

    def __init__(self, name: str, timeout: float, directory: Optional[str] = None):
        self.prefix = shm_prefix(name, directory)
        self.timeout = timeout
        self._mine = set()
        self._lock = threading.Lock()
        self._prune_at = 256
        self.closed = False

    def put(self, name: str, header: bytes, data: np.ndarray) -> None:
        path = self.prefix + name
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(memoryview(data))
            with self._lock:
                self._mine.add(path)  # before the rename: an interrupt cannot leave a file nobody removes
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if len(self._mine) >= self._prune_at:
            # Point-to-point blobs are deleted by their reader, so forget the ones already gone.
            with self._lock:
                self._mine = {p for p in self._mine if os.path.exists(p)}
                self._prune_at = max(256, 2 * len(self._mine))
        self._check_open()

    def _check_open(self) -> None:
        """CommClosedError once close() has run, maybe in another thread (abort()): a wait for a peer ends
        here, after removing what this thread wrote once close() had taken the files."""
        if self.closed:
            self._remove_mine()
            raise CommClosedError(_ABORTED)

    def get(self, name: str) -> np.ndarray:
        path = self.prefix + name
        missing = lambda: TimeoutError(f"no data at {path} after {self.timeout:g} s ({ENV_TIMEOUT})")  # noqa: E731
        for _ in _polls(self.timeout, missing, self._check_open):
            try:
                with open(path, "rb", buffering=0) as f:
                    out = np.empty(os.fstat(f.fileno()).st_size, _U8)  # aligned, unlike f.read()'s bytes
                    view, done = memoryview(out), 0
                    while done < out.size:  # one read returns at most 2 GiB
                        n = f.readinto(view[done:])
                        if not n:
                            raise OSError(f"{path} ended after {done} of {out.size} bytes")
                        done += n
                    return out
            except FileNotFoundError:
                pass

    def barrier(self, tag: int, rank: int, size: int) -> None:
        """Return once every rank has entered barrier `tag` (TimeoutError after the timeout).

        Each rank leaves an empty file for each peer, takes (unlinks) the one each peer left for it, and
        returns once its own have been taken as well. Every file has one reader, who removes it, so a
        rank may destroy its communicator or exit right after the barrier without removing a signal a
        slower peer still waits for, and the barrier leaves no file behind. (One marker per rank, read by
        every peer, would need one more round to learn when it may go.)"""
        peers = [p for p in range(size) if p != rank]
        untaken = {p: f"{self.prefix}b{tag}.{rank}.{p}" for p in peers}  # ours, until their reader unlinks them
        waiting = {p: f"{self.prefix}b{tag}.{p}.{rank}" for p in peers}  # theirs, until we unlink them
        sent = list(untaken.values())
        for path in sent:
            with self._lock:   # as in put: abort() in another thread may be going through the set
                self._mine.add(path)  # before it exists: abort() after a timeout removes the ones left untaken
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        late = lambda: TimeoutError(_barrier_timeout(self.timeout, sorted(set(waiting) | set(untaken))))  # noqa: E731
        for _ in _polls(self.timeout, late, self._check_open):
            for peer, path in list(waiting.items()):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    del waiting[peer]
            untaken = {peer: path for peer, path in untaken.items() if os.path.exists(path)}
            if not waiting and not untaken:
                break
        with self._lock:
            self._mine.difference_update(sent)

    def delete(self, name: str) -> None:
        path = self.prefix + name
        with self._lock:
            self._mine.discard(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def wait_taken(self, last: dict) -> None:
        """Return once the blob named last[peer] is gone for every peer (its reader deleted it); TimeoutError
        after the timeout."""
        paths = {peer: self.prefix + name for peer, name in last.items()}
        late = lambda: TimeoutError(  # noqa: E731
            f"rank(s) {', '.join(map(str, sorted(paths)))} did not receive this rank's messages within "
            f"{self.timeout:g} s ({ENV_TIMEOUT})")
        for _ in _polls(self.timeout, late, self._check_open):
            paths = {peer: path for peer, path in paths.items() if os.path.exists(path)}
            if not paths:
                return

    def close(self, keep: str = "") -> None:
        """Remove this rank's blobs, but those whose names start with `keep` (when given)."""
        self.closed = True  # first: a wait in another thread then removes what it writes after this
        self._remove_mine(self.prefix + keep if keep else None)

    def _remove_mine(self, keep: Optional[str] = None) -> None:
        with self._lock:   # another thread may be adding to the set (a put in flight when abort() runs)
            mine = [p for p in self._mine if keep is None or not p.startswith(keep)]
            self._mine.difference_update(mine)
        for path in mine:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def drop(self, pattern: str) -> None:
        """Remove the blobs whose names match the glob `pattern`, whoever wrote them."""
        for path in glob.glob(glob.escape(self.prefix) + pattern):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class StoreBlobs:
    """Blobs as values in the TCP store (ranks on different hosts); `get` blocks until the value is set."""

    def __init__(self, store, name: str, timeout: float):
        self.store = store
        self.prefix = f"fp4ccl-host/{name}/"
        self.timeout = timeout
        self._rounds: Optional[StoreExchange] = None   # the barrier's, made on its first call
        self.closed = False

    def put(self, name: str, header: bytes, data: np.ndarray) -> None:
        self.store.set(self.prefix + name, header + data.tobytes())

    def _check_open(self) -> None:
        if self.closed:
            raise CommClosedError(_ABORTED)

    def get(self, name: str) -> np.ndarray:
        # waited in slices, so that abort() in another thread ends it promptly
        key = self.prefix + name
        try:
            return np.frombuffer(polled_get(self.store, key, self.timeout, self._check_open), dtype=_U8)
        except TimeoutError:
            raise TimeoutError(f"no data at {key} after {self.timeout:g} s ({ENV_TIMEOUT})") from None

    def delete(self, name: str) -> None:
        self.store.delete(self.prefix + name)

    def wait_taken(self, last: dict) -> None:
        pass  # the store keeps a value until its reader deletes it, whether or not this rank is still there

    def barrier(self, tag: int, rank: int, size: int) -> None:
        """Return once every rank has entered barrier `tag` (TimeoutError after the timeout): the store
        exchange's barrier under this transport's prefix and timeout, which numbers its rounds in the
        same step as the tags, and whose waits, polled, end at close() in another thread."""
        if self._rounds is None:
            self._rounds = StoreExchange(self.store, rank, size, prefix=self.prefix + "bar", timeout=self.timeout,
                                         interrupt=self._check_open)
        try:
            self._rounds.barrier()
        except TimeoutError as err:
            raise TimeoutError(_barrier_timeout(self.timeout)) from err

    def close(self, keep: str = "") -> None:
        self.closed = True   # values stay in the store for readers to take (and delete)

    def drop(self, pattern: str) -> None:
        pass   # the store lists no keys; a value nobody reads stays until the store goes


class BlobTransport:
    """Data plane over named blobs; collectives advance a shared sequence number in step."""

    def __init__(self, exchange: Exchange, blobs):
        self.exchange = exchange
        self.blobs = blobs
        self.rank, self.size = exchange.rank, exchange.size
        self._seq = 0
        self._barriers = 0
        self._sent = {}
        self._received = {}
        self._pid = os.getpid()
        atexit.register(self._at_exit)

    def _round(self, header: bytes, publish: dict) -> tuple:
        self._seq += 1
        names = []
        for dst, data in publish.items():
            name = f"c{self._seq}.{self.rank}.{dst}"
            self.blobs.put(name, header, data)
            names.append(name)
        return self._seq, names

    def _get(self, name: str) -> Tuple[bytes, np.ndarray]:
        blob = self.blobs.get(name)
        return blob[:HEADER_BYTES].tobytes(), blob[HEADER_BYTES:]

    def _release(self, names: List[str]) -> None:
        self.barrier()  # every reader is done: our blobs may go
        for name in names:
            self.blobs.delete(name)

    def all_gatherv(self, header: bytes, data: np.ndarray) -> List[Tuple[bytes, np.ndarray]]:
        seq, names = self._round(header, {"all": data})
        parts = [(header, data) if r == self.rank else self._get(f"c{seq}.{r}.all") for r in range(self.size)]
        self._release(names)
        return parts

    def alltoallv(self, header: bytes, parts: Sequence[np.ndarray]) -> List[Tuple[bytes, np.ndarray]]:
        seq, names = self._round(header, {d: p for d, p in enumerate(parts) if d != self.rank})
        got = [(header, parts[s]) if s == self.rank else self._get(f"c{seq}.{s}.{self.rank}")
               for s in range(self.size)]
        self._release(names)
        return got

    def send(self, header: bytes, data: np.ndarray, peer: int) -> None:
        n = self._sent.get(peer, 0)
        self._sent[peer] = n + 1
        self.blobs.put(_p2p_name(self.rank, peer, n), header, data)

    def recv(self, peer: int) -> Tuple[bytes, np.ndarray]:
        n = self._received.get(peer, 0)
        self._received[peer] = n + 1
        name = _p2p_name(peer, self.rank, n)
        got = self._get(name)
        self.blobs.delete(name)  # the receiver owns a point-to-point blob once read
        return got

    def barrier(self) -> None:
        # Made of the blobs' own timed waits, not the exchange's barrier: those of torch.distributed and
        # of a store client wait as long as their library or client says, not FP4CCL_TIMEOUT.
        self._barriers += 1
        self.blobs.barrier(self._barriers, self.rank, self.size)

    def close(self) -> None:
        """Release the blobs once the peers have taken this rank's point-to-point ones (TimeoutError after
        the timeout): removed sooner, a send this rank made would never arrive."""
        try:
            # A rank reads a sender's blobs in order, deleting each: once the last to a peer is gone, all are.
            self.blobs.wait_taken({peer: _p2p_name(self.rank, peer, n - 1) for peer, n in self._sent.items()
                                   if peer != self.rank})
        finally:
            self.abort()

    def abort(self, keep: str = "") -> None:
        atexit.unregister(self._at_exit)
        # Messages to this rank that it will never read: a peer's destroy() waits for them to go.
        self.blobs.drop(_p2p_name("*", self.rank, "*"))
        self.blobs.close(keep)

    def _at_exit(self) -> None:
        """At interpreter exit, for a communicator never destroyed: remove this rank's blobs but the sends its
        peers have not read yet, which their readers remove as they take them (fp4ccl-run removes what is
        left when the job ends). No wait here: a rank ending with sys.exit(1) or an exception must not hold
        the job up while its peers wait for it."""
        if os.getpid() != self._pid:  # a forked child inherits the handler, not the files
            return
        self.abort(keep=_p2p_from(self.rank))


def _p2p_from(sender) -> str:
    """The name prefix of every point-to-point blob `sender` writes."""
    return f"p{sender}."


def _p2p_name(sender, receiver, n) -> str:
    """The n-th point-to-point blob from sender to receiver (any of them "*" in a glob pattern)."""
    return f"{_p2p_from(sender)}{receiver}.{n}"


def _barrier_timeout(timeout: float, late: Sequence[int] = ()) -> str:
    """Why a barrier of the blob transport gave up; `late`: the ranks it was still waiting for, if known."""
    who = f"; still waiting for rank(s) {', '.join(map(str, late))}" if late else ""
    return f"not every rank reached the barrier within {timeout:g} s ({ENV_TIMEOUT}{who})"


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
        return MpiTransport(exchange.comm, timeout)
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
    """The reduction of equal-length parts (HostBackend._check saw to that: numpy never broadcasts here)."""
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


def _call(method):
    """Count the call and turn a wait that ran out into CommTimeoutError; refuse calls once one has."""
    name = method.__name__

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


class HostBackend:
    """Collectives on host memory; calls are synchronous (they return once the result is in place)."""

    name = "host"

    def __init__(self, exchange: Exchange, transport=None, timeout: Optional[float] = None):
        self.exchange = exchange
        self.rank, self.size = exchange.rank, exchange.size
        self.timeout = env_timeout(unset=DEFAULT_TIMEOUT) if timeout is None else float(timeout)
        wait = self.timeout or math.inf
        self.transport = transport if transport is not None else (
            _SelfTransport() if exchange.size == 1 else make_transport(exchange, wait))
        self._seq = 0        # calls made on this communicator; error messages name them
        self._depth = 0      # open groups
        self._deferred = []  # the open group's recvs: (seq, peer, header, destination bytes)
        self._sends = 0      # sends made on this communicator
        self._marks = []     # per open group: (recvs deferred, sends made) before it opened
        self._held = {}      # peer -> the message a refused recv left for the next recv from that peer
        self._refusal = ""   # why later calls are refused, once the backend is unusable

    # -- checks and failures ------------------------------------------------------------------------
    def _check(self, what: str, mine: bytes, got: Sequence[Tuple[bytes, np.ndarray]],
               expect: Optional[Sequence[int]], ranks: Optional[Sequence[int]] = None,
               seq: Optional[int] = None) -> List[np.ndarray]:
        """The parts of `got` (from `ranks`, default every rank in order), once each header equals
        `mine` and each part has the byte count in `expect` (None: any); otherwise a ValueError naming
        the call, its number and the first peer that differs."""
        for i, (header, part) in enumerate(got):
            if header != mine or (expect is not None and part.size != expect[i]):
                peer = ranks[i] if ranks is not None else i
                call = f"{what} (call #{self._seq if seq is None else seq})"
                if header != mine:
                    raise ValueError(_disagreement(call, self.rank, peer, mine, header))
                raise ValueError(f"{call}: rank {peer} sent {part.size} bytes, rank {self.rank} expects {expect[i]}")
        return [part for _, part in got]

    def _timed_out(self, call: str, where: str, seq: int, err: BaseException) -> CommTimeoutError:
        """The error for a wait that ran out; from now on the backend refuses calls, since its calls no
        longer line up with its peers' (it may have published data for a call they never made)."""
        self._refusal = (f"the host communicator of rank {self.rank} was aborted after a timeout in {call} "
                         f"({where}): its calls no longer line up with its peers'; create a new Communicator")
        self._deferred.clear()
        self.transport.abort()
        out = CommTimeoutError(
            f"host backend: {call} ({where}) on rank {self.rank} of {self.size} timed out: {err}. Ranks probably "
            f"disagree on the sequence of collectives, or one of them died; the communicator cannot be used any more")
        out.rank, out.call, out.seq = self.rank, call, seq
        return out

    def _typed(self, raw: np.ndarray, info: ArrayInfo, shape=None) -> np.ndarray:
        return raw.view(numpy_dtype(info.dtype)).reshape(shape if shape is not None else (-1,))

    def _reduced(self, parts: Sequence[np.ndarray], info: ArrayInfo, op: str) -> np.ndarray:
        return _reduce([self._typed(p, info) for p in parts], op, self.size)

    # -- collectives --------------------------------------------------------------------------------
    @_call
    def all_reduce(self, send: ArrayInfo, recv: ArrayInfo, op: str, stream=0) -> None:
        header = _header("all_reduce", send.dtype, send.nbytes, op)
        if send.nbytes < SPLIT_ALL_REDUCE_BYTES or self.size == 1:
            got = self.transport.all_gatherv(header, _as_bytes(host_view(send)))
            parts = self._check("all_reduce", header, got, [send.nbytes] * self.size)
            host_view(recv).reshape(-1)[...] = self._reduced(parts, send, op)
            return
        # Large arrays: each rank reduces one slice (same rank order per element, so the result is
        # bit-identical), then the slices are gathered; n times less arithmetic per rank.
        flat = host_view(send).reshape(-1)
        cuts = [len(c) for c in np.array_split(np.arange(flat.size), self.size)]
        bounds = np.cumsum(cuts)[:-1]
        got = self.transport.alltoallv(header, [_as_bytes(c) for c in np.split(flat, bounds)])
        mine = self._reduced(self._check("all_reduce", header, got, [cuts[self.rank] * send.itemsize] * self.size),
                             send, op)
        got = self.transport.all_gatherv(header, _as_bytes(mine))
        slices = self._check("all_reduce", header, got, [c * send.itemsize for c in cuts])
        np.concatenate(slices, out=host_view(recv).reshape(-1).view(_U8))

    @_call
    def broadcast(self, send: ArrayInfo, recv: ArrayInfo, root: int, stream=0) -> None:
        header = _header("broadcast", send.dtype, send.nbytes, root=root)
        mine = _as_bytes(host_view(send)) if self.rank == root else np.empty(0, _U8)
        expect = [send.nbytes if r == root else 0 for r in range(self.size)]
        parts = self._check("broadcast", header, self.transport.all_gatherv(header, mine), expect)
        if self.rank != root or recv.ptr != send.ptr:
            host_view(recv).reshape(-1).view(_U8)[...] = parts[root]

    @_call
    def reduce(self, send: ArrayInfo, recv: Optional[ArrayInfo], op: str, root: int, stream=0) -> None:
        header = _header("reduce", send.dtype, send.nbytes, op, root)
        empty = np.empty(0, _U8)
        parts = [empty] * self.size
        parts[root] = _as_bytes(host_view(send))
        expect = [send.nbytes if self.rank == root else 0] * self.size
        got = self._check("reduce", header, self.transport.alltoallv(header, parts), expect)
        if self.rank == root:
            host_view(recv).reshape(-1)[...] = self._reduced(got, send, op)

    @_call
    def all_gather(self, send: ArrayInfo, recv: ArrayInfo, stream=0) -> None:
        self._gather_into("all_gather", _header("all_gather", send.dtype, send.nbytes), send, recv,
                          [send.nbytes] * self.size)

    @_call
    def reduce_scatter(self, send: ArrayInfo, recv: ArrayInfo, op: str, stream=0) -> None:
        header = _header("reduce_scatter", send.dtype, send.nbytes, op)
        got = self.transport.alltoallv(header, np.split(_as_bytes(host_view(send)), self.size))
        parts = self._check("reduce_scatter", header, got, [recv.nbytes] * self.size)
        host_view(recv).reshape(-1)[...] = self._reduced(parts, send, op)

    @_call
    def all_to_all(self, send: ArrayInfo, recv: ArrayInfo, stream=0) -> None:
        header = _header("all_to_all", send.dtype, send.nbytes)
        got = self.transport.alltoallv(header, np.split(_as_bytes(host_view(send)), self.size))
        parts = self._check("all_to_all", header, got, [send.nbytes // self.size] * self.size)
        np.concatenate(parts, out=host_view(recv).reshape(-1).view(_U8))

    @_call
    def all_gatherv(self, send: ArrayInfo, recv: ArrayInfo, counts: Sequence[int], stream=0) -> None:
        self._gather_into("all_gatherv", _header("all_gatherv", send.dtype, recv.nbytes, counts=counts), send, recv,
                          [c * send.itemsize for c in counts])

    def _gather_into(self, what: str, header: bytes, send: ArrayInfo, recv: ArrayInfo, expect: Sequence[int]) -> None:
        """Every rank's send, checked against `expect` (bytes per rank), concatenated into recv in rank order."""
        got = self.transport.all_gatherv(header, _as_bytes(host_view(send)))
        np.concatenate(self._check(what, header, got, expect), out=host_view(recv).reshape(-1).view(_U8))

    @_call
    def reduce_scatterv(self, send: ArrayInfo, recv: ArrayInfo, counts: Sequence[int], op: str, stream=0) -> None:
        header = _header("reduce_scatterv", send.dtype, send.nbytes, op, counts=counts)
        cuts = np.cumsum(counts)[:-1] * send.itemsize
        got = self.transport.alltoallv(header, np.split(_as_bytes(host_view(send)), cuts))
        parts = self._check("reduce_scatterv", header, got, [recv.nbytes] * self.size)
        host_view(recv).reshape(-1)[...] = self._reduced(parts, send, op)

    @_call
    def all_gatherv_bytes(self, data: np.ndarray) -> List[np.ndarray]:
        header = _header("all_gatherv_bytes")
        return self._check("all_gatherv_bytes", header, self.transport.all_gatherv(header, data), None)

    @_call
    def alltoallv_bytes(self, parts: Sequence[np.ndarray], what: str = "alltoallv_bytes") -> List[np.ndarray]:
        """Part p to rank p, one part from every rank back. Every rank must send the same part sizes (rank p
        gets parts of size len(parts[p]) from all): a rank that differs gets a ValueError on every rank,
        naming `what`."""
        counts = [int(p.size) for p in parts]
        header = _header("alltoallv_bytes", "uint8", sum(counts), counts=counts)
        return self._check(what, header, self.transport.alltoallv(header, list(parts)), None)

    # -- point to point and groups ------------------------------------------------------------------
    @_call
    def send(self, buf: ArrayInfo, peer: int, stream=0) -> None:
        self.transport.send(_header("send", buf.dtype, buf.nbytes), _as_bytes(host_view(buf)), peer)
        self._sends += 1

    @_call
    def recv(self, buf: ArrayInfo, peer: int, stream=0) -> None:
        header = _header("send", buf.dtype, buf.nbytes)  # what the matching send's header must say
        out = host_view(buf).reshape(-1).view(_U8)
        if self._depth:
            self._deferred.append((self._seq, peer, header, out))
        else:
            self._recv_into(self._seq, peer, header, out)

    def _recv_into(self, seq: int, peer: int, header: bytes, out: np.ndarray) -> None:
        got = self._held.pop(peer, None)
        if got is None:
            got = self.transport.recv(peer)
        try:
            (data,) = self._check(f"recv from rank {peer}", header, [got], [out.size], [peer], seq)
        except ValueError:
            # Kept for the next recv from this peer: a recv retried with the right buffer gets this message,
            # not the one after it.
            self._held[peer] = got
            raise
        out[...] = data

    def group_start(self) -> None:
        if self._refusal:
            raise CommClosedError(self._refusal)
        self._depth += 1
        self._marks.append((len(self._deferred), self._sends))

    def group_end(self, abandon: bool = False) -> None:
        """Close a group; at the outermost, run its recvs. `abandon` (the group's block raised): drop the recvs
        this group deferred instead, so the block's error surfaces now rather than as a wait for sends the
        peers may never make; if it had deferred recvs or sent anything, the communicator then refuses later
        calls (CommClosedError)."""
        if self._depth == 0:
            raise RuntimeError("group_end() without a matching group_start()")
        self._depth -= 1
        deferred_before, sends_before = self._marks.pop()
        done = [what for what, hit in (("queuing receives", len(self._deferred) > deferred_before),
                                       ("sending", self._sends > sends_before)) if hit]
        if abandon and done:
            # Messages carry no call number: peers' sends for the dropped recvs may be on their way, and a
            # peer whose group was abandoned too never takes ours, so a later recv on either side would take
            # such a message for its own. No call may follow.
            del self._deferred[deferred_before:]
            self._refusal = (f"the host communicator of rank {self.rank} was closed when a 'with comm.group():' "
                             f"block raised after {' and '.join(done)}: the group's messages would reach later "
                             f"calls; create a new Communicator")
        if self._depth:
            return
        deferred, self._deferred = self._deferred, []
        failures, refused = [], set()
        for seq, peer, header, out in deferred:
            # Every recv runs even after one failed, so no peer's send is left unmatched; but none after a
            # refused one from the same peer, whose message it would take out of order.
            if peer in refused:
                failures.append(ValueError(
                    f"recv from rank {peer} (call #{seq}): not run, since an earlier recv from rank {peer} in this "
                    f"group was refused; its message and the later ones wait for the next recvs from rank {peer}"))
                continue
            try:
                self._recv_into(seq, peer, header, out)
            except ValueError as err:
                failures.append(err)
                refused.add(peer)
            except TimeoutError as err:
                raise self._timed_out(f"recv from rank {peer}", f"call #{seq}, run at group_end", seq, err) from err
        if failures:
            raise failures[0]

    @_call
    def barrier(self, stream=0) -> None:
        if self._depth:
            raise RuntimeError("barrier() inside a group: the group's recvs only run at group_end(), "
                               "so the barrier could not wait for them")
        self.transport.barrier()

    # -- teardown -----------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Release the transport once the peers have taken its sends (bounded by the timeout)."""
        self._forget()
        if self._refusal:
            self.transport.abort()
            return
        self._refusal = f"the host communicator of rank {self.rank} was destroyed; create a new Communicator"
        try:
            self.transport.close()
        except TimeoutError as err:
            raise self._timed_out("destroy", "waiting for this rank's sends", self._seq, err) from err

    def abort(self) -> None:
        """Release the transport now, abandoning pending sends and the open group's recvs; a wait for a peer
        in another thread ends with CommClosedError."""
        self._forget()
        if not self._refusal:
            self._refusal = f"the host communicator of rank {self.rank} was aborted; create a new Communicator"
        self.transport.abort()

    def _forget(self) -> None:
        """Drop the open groups and the messages held for recvs (the communicator is going)."""
        self._deferred.clear()
        self._marks.clear()
        self._depth = 0
        self._held.clear()


class _SelfTransport:
    """The data plane of a one-rank job, where a send can only go to oneself."""

    def __init__(self):
        self._queue = []

    def all_gatherv(self, header, data):
        return [(header, data)]

    def alltoallv(self, header, parts):
        return [(header, p) for p in parts]

    def send(self, header, data, peer):
        self._queue.append((header, data.copy()))

    def recv(self, peer):
        if not self._queue:
            raise RuntimeError("recv from rank 0 in a 1-rank job with no matching send before it")
        return self._queue.pop(0)

    def barrier(self):
        pass

    def close(self):
        self._queue.clear()

    abort = close
