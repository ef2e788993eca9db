"""The NCCL backend: one NCCL communicator per rank, collectives enqueued on the caller's stream.

The Communicator has already validated shapes, dtypes and devices, so the hot path here is a dtype
lookup, one lock and one ctypes call: with FP4CCL_TIMEOUT unset it adds about a microsecond or two
on top of NCCL's own enqueue cost.

Hang detection (FP4CCL_TIMEOUT=<seconds>, or `timeout=`): a daemon watchdog thread polls
ncclCommGetAsyncError and, for every enqueued collective (or outermost group), a CUDA event
recorded right after it on the same stream. If an event is not reached within the timeout, a call
stays blocked inside NCCL on the host for longer than that, or NCCL reports an asynchronous error,
the watchdog aborts the communicator (which also unblocks the stuck kernels and any host thread
waiting on them) and records the call's name, sequence number and this rank. Every later call
raises CommTimeoutError carrying them. The clock for a collective starts when it is enqueued or
when the previous tracked collective was seen complete, whichever is later, so a timeout must
exceed the longest run of other work queued ahead of a collective on its stream.
Not watched: ncclCommInitRank (it waits for every rank; the exchange's own timeout bounds the id
hand-over before it) and destroy()'s ncclCommFinalize — use abort() for a teardown that cannot hang.
Collectives enqueued while their stream is being captured into a CUDA graph are not tracked.
"""
from __future__ import annotations

import collections
import ctypes
import threading
import time
from dataclasses import dataclass
from typing import Optional

from fp4ccl import _cuda, nccl
from fp4ccl._log import get_logger
from fp4ccl._timeout import ENV_TIMEOUT, env_timeout
from fp4ccl.errors import CommClosedError, CommTimeoutError, Fp4cclError, NcclError

_log = get_logger("fp4ccl.backends.nccl")

_FLOAT32 = nccl.DTYPES["float32"]
_SUM = nccl.OPS["sum"]
_OPS = dict(nccl.OPS)
_CUDA_ERROR_NOT_READY = 600
# How long an abort waits for a call in progress on another thread to leave NCCL before aborting
# underneath it (NCCL supports ncclCommAbort from another thread precisely to unblock such calls).
_ABORT_LOCK_WAIT = 1.0


_CU_STREAM_CAPTURE_MODE_RELAXED = 2


def _relax_capture_mode() -> None:
    """Put the calling thread in relaxed stream-capture mode. The watchdog polls events of eager calls
    while the caller's threads may be capturing a CUDA graph; in the default (global) mode, CUDA counts
    such a query from any thread as unsafe and invalidates every global-mode capture in the process
    (torch.cuda.graph's default). The events it polls were never recorded into a capture, so relaxed
    mode is exact here."""
    try:
        fn = _cuda.driver_function("cuThreadExchangeStreamCaptureMode", [ctypes.POINTER(ctypes.c_int)])
    except (OSError, AttributeError) as e:
        _log.info("cuThreadExchangeStreamCaptureMode unavailable (%s): the NCCL watchdog's event polls "
                  "can invalidate a CUDA-graph capture in global mode", e)
        return
    mode = ctypes.c_int(_CU_STREAM_CAPTURE_MODE_RELAXED)
    status = fn(ctypes.byref(mode))
    if status != 0:
        _log.info("cuThreadExchangeStreamCaptureMode failed (CUresult %d): the NCCL watchdog's event polls "
                  "can invalidate a CUDA-graph capture in global mode", status)


@dataclass(frozen=True)
class WatchdogFailure:
    """What the watchdog saw before it aborted the communicator."""

    rank: int
    size: int
    device: int
    call: str         # the collective's name, e.g. "all_reduce" or "group(broadcast x4)"
    seq: int          # its sequence number on this communicator (1 = first call)
    reason: str

    def error(self) -> CommTimeoutError:
        err = CommTimeoutError(
            f"NCCL communicator aborted on rank {self.rank} of {self.size} (cuda:{self.device}) during "
            f"{self.call} (call #{self.seq}): {self.reason}. Ranks probably disagree on the sequence of "
            f"collectives, or one of them died; the communicator cannot be used any more")
        err.rank, err.call, err.seq = self.rank, self.call, self.seq
        return err


class NcclBackend:
    """Backend interface of docs/ARCHITECTURE.md over one NCCL communicator on `device`.

    Construction is collective: rank 0 creates the unique id, `exchange.broadcast_bytes` hands it
    to every rank, and all ranks join ncclCommInitRank (which blocks until everyone has arrived).
    """

    name = "nccl"

    def __init__(self, exchange, rank: int, size: int, device: int, timeout: Optional[float] = None):
        import cupy

        if not 0 <= rank < size:
            raise ValueError(f"rank={rank} is out of range for size={size}")
        self.rank, self.size, self.device = int(rank), int(size), int(device)
        self.timeout = env_timeout(unset=0.0) if timeout is None else float(timeout)
        lib = nccl.load()
        cupy.cuda.Device(self.device).use()

        uid_bytes = b""
        failure = None
        if self.rank == 0:
            try:
                uid_bytes = nccl.get_unique_id().to_bytes()
            except NcclError as e:
                failure = e  # still broadcast, so the other ranks fail instead of waiting forever
        uid_bytes = exchange.broadcast_bytes(uid_bytes if self.rank == 0 else None, 0)
        if failure is not None:
            raise failure
        if not uid_bytes:
            raise Fp4cclError(f"rank {self.rank}: rank 0 could not create the NCCL unique id (see its error)")
        handle = ctypes.c_void_p()
        lib.ncclCommInitRank(ctypes.byref(handle), self.size, nccl.UniqueId.from_bytes(uid_bytes), self.rank)
        with cupy.cuda.Device(self.device):
            self._barrier_buf = cupy.zeros(1, dtype=cupy.float32)
        self._attach(lib, handle.value, cupy.cuda.runtime, int(self._barrier_buf.data.ptr))

    @classmethod
    def _from_handle(cls, lib, comm: int, rank: int, size: int, device: int, runtime, barrier_ptr: int,
                     timeout: float = 0.0) -> "NcclBackend":
        """A backend over an existing communicator, with the NCCL library and CUDA runtime given
        explicitly (anything with CuPy's runtime functions): the seam the CPU tests use."""
        self = cls.__new__(cls)
        self.rank, self.size, self.device = int(rank), int(size), int(device)
        self.timeout = float(timeout)
        self._attach(lib, comm, runtime, barrier_ptr)
        return self

    def _attach(self, lib, comm: int, runtime, barrier_ptr: int) -> None:
        self._lib = lib
        self._rt = runtime
        self._cuda_error = runtime.CUDARuntimeError
        self._barrier_ptr = barrier_ptr

        # Communicator state. `_comm` is the raw ncclComm_t (int); None once destroyed or aborted.
        self._comm: Optional[int] = comm
        self._call_lock = threading.Lock()   # held around every NCCL call that uses the communicator
        self._state_lock = threading.Lock()  # guards the one-time hand-over of `_comm` to teardown
        self._closed = ""                    # "destroyed" | "aborted" once `_comm` is None
        self._failure: Optional[WatchdogFailure] = None
        self._seq = 0
        self._depth = 0

        # Function objects and dtype maps fetched once: the hot path does no table lookups by name.
        self._f_all_reduce = lib.ncclAllReduce
        self._f_broadcast = lib.ncclBroadcast
        self._f_reduce = lib.ncclReduce
        self._f_all_gather = lib.ncclAllGather
        self._f_reduce_scatter = lib.ncclReduceScatter
        self._f_all_to_all = lib.ncclAlltoAll if lib.has("ncclAlltoAll") else None
        self._f_send = lib.ncclSend
        self._f_recv = lib.ncclRecv
        self._f_group_start = lib.ncclGroupStart
        self._f_group_end = lib.ncclGroupEnd
        self._fp8 = lib.fp8
        self._red = nccl.reduce_dtypes(lib.fp8)
        self._move = nccl.move_dtypes(lib.fp8)

        # Watchdog state (only used when timeout > 0).
        self._watch = self.timeout > 0
        self._inflight = None                 # (seq, name, t0) while the host is inside an NCCL call
        self._pending = collections.deque()   # [seq, name, event, t_start], oldest first
        self._events = []                     # recycled CUDA events
        self._group_streams = set()
        self._group_calls = []
        self._stop = threading.Event()
        self._thread = None
        if self._watch:
            self._thread = threading.Thread(target=self._watchdog, name=f"fp4ccl-nccl-watchdog-r{self.rank}",
                                            daemon=True)
            self._thread.start()
        _log.info("NCCL communicator up: rank %d/%d on cuda:%d (NCCL %d.%d.%d, watchdog %s)", self.rank,
                  self.size, self.device, *lib.version, f"{self.timeout:g}s" if self._watch else "off")

    # -- introspection ------------------------------------------------------------------------------
    @property
    def comm(self) -> int:
        """The raw ncclComm_t; raises once the communicator is closed."""
        comm = self._comm
        if comm is None:
            self._raise_closed()
        return comm

    @property
    def closed(self) -> bool:
        return self._comm is None

    @property
    def failure(self) -> Optional[WatchdogFailure]:
        """What made the watchdog abort the communicator, or None."""
        return self._failure

    def _raise_closed(self):
        if self._failure is not None:
            raise self._failure.error()
        raise CommClosedError(f"the NCCL communicator of rank {self.rank} was {self._closed or 'closed'}; "
                              f"create a new Communicator")

    # -- the one enqueue path -----------------------------------------------------------------------
    def _enqueue(self, fn, name, stream, *args):
        with self._call_lock:
            comm = self._comm
            if comm is None:
                self._raise_closed()
            self._seq += 1
            if not self._watch:
                fn(*args, comm, stream)
                return
            seq = self._seq
            self._watched(seq, name, fn, *args, comm, stream)
            if self._depth:
                self._group_streams.add(stream)
                self._group_calls.append((seq, name))
            else:
                self._track(stream, seq, name)

    def _watched(self, seq, label, fn, *args):
        """Run one NCCL call the watchdog can see in flight; if the watchdog aborted the communicator
        meanwhile, raise its error (which names the call and rank) rather than NCCL's."""
        self._inflight = (seq, label, time.monotonic())
        try:
            fn(*args)
        except NcclError as e:
            if self._failure is not None:
                raise self._failure.error() from e
            raise
        finally:
            self._inflight = None

    def _track(self, stream, seq, name):
        rt = self._rt
        # Graph capture: an event recorded into a capture is not something the watchdog can poll.
        try:
            if rt.streamIsCapturing(stream):
                return
        except self._cuda_error:
            return  # the legacy stream while another stream captures: not trackable either
        events = self._events
        ev = events.pop() if events else self._new_event()
        rt.eventRecord(ev, stream)
        self._pending.append([seq, name, ev, time.monotonic()])

    def _new_event(self):
        # Events belong to the device current at creation; the caller may have switched devices.
        rt = self._rt
        current = rt.getDevice()
        if current != self.device:
            rt.setDevice(self.device)
        try:
            return rt.eventCreateWithFlags(rt.eventDisableTiming)
        finally:
            if current != self.device:
                rt.setDevice(current)

    # -- collectives ------------------------------------------------------------------------------
    def all_reduce(self, send, recv, op, stream):
        dt = self._red.get(send.dtype)
        if dt is None:
            dt = nccl.datatype(send.dtype, reduce=True, fp8=self._fp8)  # raises the TypeError saying why
        self._enqueue(self._f_all_reduce, "all_reduce", stream, send.ptr, recv.ptr, send.size, dt, _OPS[op])

    def broadcast(self, send, recv, root, stream):
        dt, scale = self._move[recv.dtype]
        sptr = send.ptr if send is not None else recv.ptr
        self._enqueue(self._f_broadcast, "broadcast", stream, sptr, recv.ptr, recv.size * scale, dt, root)

    def reduce(self, send, recv, op, root, stream):
        dt = self._red.get(send.dtype)
        if dt is None:
            dt = nccl.datatype(send.dtype, reduce=True, fp8=self._fp8)
        # recvbuff is only written on root; elsewhere any valid pointer will do.
        rptr = recv.ptr if recv is not None else send.ptr
        self._enqueue(self._f_reduce, "reduce", stream, send.ptr, rptr, send.size, dt, _OPS[op], root)

    def all_gather(self, send, recv, stream):
        dt, scale = self._move[send.dtype]
        self._enqueue(self._f_all_gather, "all_gather", stream, send.ptr, recv.ptr, send.size * scale, dt)

    def reduce_scatter(self, send, recv, op, stream):
        dt = self._red.get(send.dtype)
        if dt is None:
            dt = nccl.datatype(send.dtype, reduce=True, fp8=self._fp8)
        self._enqueue(self._f_reduce_scatter, "reduce_scatter", stream, send.ptr, recv.ptr, recv.size, dt, _OPS[op])

    def all_to_all(self, send, recv, stream):
        dt, scale = self._move[send.dtype]
        count = send.size * scale // self.size
        if self._f_all_to_all is not None:
            self._enqueue(self._f_all_to_all, "all_to_all", stream, send.ptr, recv.ptr, count, dt)
            return
        # NCCL < 2.28 has no ncclAlltoAll: one grouped send/recv pair per peer.
        chunk = send.nbytes // self.size
        self.group_start()
        try:
            for peer in range(self.size):
                self._enqueue(self._f_send, "all_to_all", stream, send.ptr + peer * chunk, count, dt, peer)
                self._enqueue(self._f_recv, "all_to_all", stream, recv.ptr + peer * chunk, count, dt, peer)
        finally:
            self.group_end()

    def send(self, buf, peer, stream):
        dt, scale = self._move[buf.dtype]
        self._enqueue(self._f_send, "send", stream, buf.ptr, buf.size * scale, dt, peer)

    def recv(self, buf, peer, stream):
        dt, scale = self._move[buf.dtype]
        self._enqueue(self._f_recv, "recv", stream, buf.ptr, buf.size * scale, dt, peer)

    # -- groups -----------------------------------------------------------------------------------
    def group_start(self):
        """Open an NCCL group; nestable, the calls are launched when the outermost group ends."""
        with self._call_lock:
            if self._comm is None:
                self._raise_closed()
            self._f_group_start()
            self._depth += 1

    def group_end(self, abandon: bool = False):
        """Close a group; the outermost launches its calls. NCCL cannot take back calls already queued, so
        `abandon` (the group's block raised) still launches them: a peer left waiting surfaces as a timeout."""
        with self._call_lock:
            if self._depth == 0:
                raise RuntimeError("group_end() without a matching group_start()")
            self._depth -= 1
            if self._comm is None:
                # The calls queued in this group name a communicator that no longer exists: ending the
                # group would make NCCL touch freed memory, so the group is abandoned instead.
                self._group_streams.clear()
                self._group_calls.clear()
                self._raise_closed()
            if not self._watch or self._depth:
                self._f_group_end()
                return
            calls = self._group_calls
            label = _group_label(calls)
            seq = calls[0][0] if calls else self._seq
            try:
                self._watched(seq, label, self._f_group_end)
            finally:
                streams = list(self._group_streams)
                self._group_streams.clear()
                self._group_calls = []
            for stream in streams:
                self._track(stream, seq, label)

    # -- barrier ----------------------------------------------------------------------------------
    def barrier(self, stream):
        """All-reduce one cached float on `stream`, then synchronize that stream: this blocks the host
        until every rank has reached the barrier and the stream's earlier work is done."""
        if self._depth:
            raise RuntimeError("barrier() inside a group: the group's calls only run at group_end(), "
                               "so the barrier could not wait for them")
        ptr = self._barrier_ptr
        self._enqueue(self._f_all_reduce, "barrier", stream, ptr, ptr, 1, _FLOAT32, _SUM)
        try:
            self._rt.streamSynchronize(stream)
        except self._cuda_error as e:
            if self._failure is not None:
                raise self._failure.error() from e
            raise
        if self._failure is not None:
            raise self._failure.error()

    # -- teardown ---------------------------------------------------------------------------------
    def destroy(self):
        """Collective, orderly teardown: ncclCommFinalize (where NCCL has it) then ncclCommDestroy.
        Waits for pending work. Idempotent, and a no-op after abort()."""
        if self._depth:
            raise RuntimeError("destroy() inside a group; end the group first (or abort())")
        self._stop_watchdog()
        with self._call_lock:
            comm = self._take_comm()
            if comm is None:
                return
            self._closed = "destroyed"
            lib = self._lib
            try:
                if lib.has("ncclCommFinalize"):
                    lib.ncclCommFinalize(comm)
            except NcclError:
                # Finalize failed (a peer is gone, say): free the resources without waiting for peers.
                self._closed = "aborted"
                lib.ncclCommAbort(comm)
                self._release()
                raise
            lib.ncclCommDestroy(comm)
            self._release()

    def abort(self):
        """Local, immediate teardown with ncclCommAbort, abandoning pending work; safe to call from
        another thread to unblock one stuck in NCCL. Idempotent, and a no-op after destroy()."""
        self._stop_watchdog()
        self._abort_comm(None)

    def _take_comm(self) -> Optional[int]:
        with self._state_lock:
            comm, self._comm = self._comm, None
        return comm

    def _abort_comm(self, failure: Optional[WatchdogFailure]) -> bool:
        got = self._call_lock.acquire(timeout=_ABORT_LOCK_WAIT)
        try:
            if failure is not None and self._failure is None and self._comm is not None:
                self._failure = failure  # set before the handle goes, so callers see why it went
            comm = self._take_comm()
            if comm is None:
                return False
            self._closed = "aborted"
            try:
                self._lib.ncclCommAbort(comm)
            except NcclError as e:
                _log.warning("ncclCommAbort on rank %d failed: %s", self.rank, e)
            if got:
                self._release()
            return True
        finally:
            if got:
                self._call_lock.release()

    def _release(self):
        # Events only; the barrier buffer stays referenced until this object goes, since an aborted
        # kernel may still be winding down on it.
        for ev in self._events + [entry[2] for entry in self._pending]:
            try:
                self._rt.eventDestroy(ev)
            except self._cuda_error:
                pass
        self._events = []
        self._pending.clear()

    # -- watchdog ---------------------------------------------------------------------------------
    def _stop_watchdog(self):
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(10.0, 2 * _ABORT_LOCK_WAIT))
            if thread.is_alive():
                _log.warning("NCCL watchdog of rank %d did not stop within 10 s", self.rank)

    def _event_done(self, ev) -> bool:
        try:
            return self._rt.eventQuery(ev) == 0
        except self._cuda_error as e:
            if getattr(e, "status", None) == _CUDA_ERROR_NOT_READY:
                return False
            raise

    def _watchdog(self):
        try:
            self._rt.setDevice(self.device)
        except self._cuda_error as e:
            _log.warning("NCCL watchdog of rank %d could not select cuda:%d (%s); it is off", self.rank,
                         self.device, e)
            return
        _relax_capture_mode()
        timeout = self.timeout
        poll = min(max(timeout / 20.0, 0.005), 0.5)
        status = ctypes.c_int()
        while not self._stop.wait(poll):
            comm = self._comm
            if comm is None:
                return
            now = time.monotonic()
            try:
                self._lib.ncclCommGetAsyncError(comm, ctypes.byref(status))
            except NcclError as e:
                self._fire(f"ncclCommGetAsyncError failed: {e}")
                return
            if status.value not in (nccl.SUCCESS, nccl.IN_PROGRESS):
                code = status.value
                self._fire(f"NCCL reported an asynchronous error {nccl.RESULT_NAMES.get(code, code)} ({code}): "
                           f"{nccl.error_string(code)}")
                return
            inflight = self._inflight
            if inflight is not None and now - inflight[2] > timeout:
                self._fire(f"the host call did not return from NCCL within {timeout:g} s ({ENV_TIMEOUT})",
                           inflight[0], inflight[1])
                return
            pending = self._pending
            while pending:
                entry = pending[0]
                try:
                    done = self._event_done(entry[2])
                except self._cuda_error as e:
                    self._fire(f"CUDA error while waiting for it: {e}", entry[0], entry[1])
                    return
                if done:
                    pending.popleft()
                    self._events.append(entry[2])
                    if pending and pending[0][3] < now:
                        pending[0][3] = now
                    continue
                if now - entry[3] > timeout:
                    self._fire(f"it did not complete on the GPU within {timeout:g} s ({ENV_TIMEOUT})",
                               entry[0], entry[1])
                    return
                break

    def _fire(self, reason: str, seq: Optional[int] = None, call: Optional[str] = None):
        if seq is None:
            # No single call to blame: name the oldest outstanding one, else the last one made.
            pending = self._pending
            inflight = self._inflight
            if pending:
                seq, call = pending[0][0], pending[0][1]
            elif inflight is not None:
                seq, call = inflight[0], inflight[1]
            else:
                seq, call = self._seq, "the last call"
        failure = WatchdogFailure(self.rank, self.size, self.device, call, seq, reason)
        if self._abort_comm(failure):
            _log.error("%s", failure.error())


def _group_label(calls) -> str:
    if not calls:
        return "group()"
    counts = collections.Counter(name for _, name in calls)
    inner = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items())
    first, last = calls[0][0], calls[-1][0]
    span = f"calls #{first}-#{last}" if last != first else f"call #{first}"
    return f"group({inner}; {span})"
