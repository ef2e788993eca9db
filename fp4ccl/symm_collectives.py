"""Variable-size and FP4 collectives over symmetric memory, for communicators that fit on one node.

Every rank writes its contribution (FP4-encoded, or its plain rows) into its own slot of a symmetric
workspace, one device-side barrier publishes all slots, and each rank pulls what it needs straight
from its peers' slots over NVLink. Where the result is decoded, the pull and the decode are one
kernel: the FP4 bytes cross NVLink once and are never staged in local memory, and there is no NCCL
kernel competing with the decode for SMs. That is what lets an FP4 gather run at the speed its byte
count promises (docs/VCOLLECTIVES.md has the figures).

The workspace is double-buffered: call i writes half i % 2. A rank overwrites a half only after the
barrier of the next call, which every peer reaches after its reads of that half (stream order, and
an event joins calls made on different streams), so one barrier per call is enough.

Not used, and the NCCL algorithms run instead, when: the communicator spans hosts or has one rank,
the caller's stream is being captured into a CUDA graph (the caller's graph would freeze one workspace
half, and its replays could overwrite that half while a peer still reads it; the one-launch FP4
collectives of fp4ccl/one_launch.py, which alternate halves of their own on the device, are the exception), or
FP4CCL_FP4_ALGO / FP4CCL_ALGO ask for an NCCL algorithm. Every rank
must make the same choice, so capture (like every collective) has to be the same on every rank.
"""
from __future__ import annotations

import ctypes
import functools
import os
import zlib
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import _cuda
from ._cuda import runtime as _rt
from ._log import get_logger

log = get_logger("fp4ccl.symm_collectives")

FP4_ALGOS = ("symm", "nccl")
_ALIGN = 256
_GROWTH = 1.5          # a grown workspace takes at least this factor more, so growing stays rare
_EXTRAS_KEY = "fp4ccl.symm_workspace"


def _round_up(n: int, m: int = _ALIGN) -> int:
    return (n + m - 1) // m * m


def capturing(stream: int) -> bool:
    """Whether `stream` is being captured into a CUDA graph."""
    try:
        return bool(_rt().streamIsCapturing(stream))
    except Exception:  # noqa: BLE001 - the legacy stream while another stream captures reports an error
        return True


def usable(comm, stream: int) -> bool:
    """Whether the symmetric-memory algorithms can serve this call (see the module doc); collective
    the first time on a communicator (the node check)."""
    if comm.size < 2 or comm.device is None or capturing(stream):
        return False
    from .symmetric import same_node
    return same_node(comm)


def forced_fp4_algo() -> str:
    """FP4CCL_FP4_ALGO, checked: 'symm', 'nccl', or '' when unset."""
    forced = os.environ.get("FP4CCL_FP4_ALGO", "").strip().lower()
    if forced and forced not in FP4_ALGOS:
        raise ValueError(f"FP4CCL_FP4_ALGO={forced!r} is not one of {', '.join(FP4_ALGOS)}")
    return forced


def fp4_algo(comm, stream: int) -> str:
    """'symm' or 'nccl' for an FP4 collective: FP4CCL_FP4_ALGO if set, else symm wherever usable.
    A forced 'symm' that cannot run (another host, graph capture) runs 'nccl' and says so at INFO."""
    forced = forced_fp4_algo()
    if forced == "nccl":
        return "nccl"
    if usable(comm, stream):
        return "symm"
    if forced == "symm":
        log.info("FP4CCL_FP4_ALGO=symm, but symmetric memory cannot serve this call "
                 "(one rank, several hosts, or graph capture): NCCL instead")
    return "nccl"


# A call that comes again (same buffers, sizes and stream) replays a CUDA graph of its steps: one graph
# launch instead of a handful of API calls, which is what a small call's time is made of, and no host
# gaps between the steps of a large one. FP4CCL_SYMM_GRAPHS=0 turns it off.
_GRAPH_CACHE = 64       # graphs kept per communicator (least recently used dropped)
_SEEN_CACHE = 256       # call keys remembered, to capture only calls that repeat


def graphs_enabled() -> bool:
    return os.environ.get("FP4CCL_SYMM_GRAPHS", "1").strip() not in ("0", "false", "off", "no")


def agreed(name: str, **fields) -> tuple:
    """What every rank must agree on in a call, as run()'s `call`: agreed("fp4_gather", sizes=rows, K=64, ...)
    (the plain v-collectives see `elements` per rank: rows times the row's elements)."""
    return (name,) + tuple(fields.items())


def call_signature(call: tuple) -> int:
    """24 bits of a hash of `call` (agreed()'s tuple), the same in every process for the same values
    whatever their integer types (never Python's hash(), which is salted per process): what the checked
    barrier compares between ranks (csrc/symm.cu, fp4ccl_symm_barrier_checked)."""
    return zlib.crc32(repr(_canonical(call)).encode()) & _SIGNATURE_MASK


def _canonical(value):
    """`value` with every integer a plain int and every sequence a tuple (numpy's ints repr otherwise)."""
    if isinstance(value, (tuple, list)):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return value


_SIGNATURE_MASK = (1 << 24) - 1
_NAMED_SIGNATURES = 256   # recent calls remembered by signature, to name them in a mismatch error


class Workspace:
    """The per-communicator symmetric workspace: two halves of `slot` bytes on every rank, and the
    cache of CUDA graphs of repeated calls (invalidated when the workspace grows).

    Its barriers are checked (csrc/symm.cu, fp4ccl_symm_barrier_checked): each carries a signature of
    the call (`call=` of run()), and ranks found in different calls record it in a host-mapped word
    that the next call, or destroy(), reads without a sync and turns into a CallMismatchError."""

    def __init__(self, comm):
        self.comm = comm
        self.buf = None
        self.slot = 0
        self.calls = 0
        self._done = 0        # cudaEvent_t: the end of the previous call, whatever its stream
        self._last_stream = None
        self._graphs: "OrderedDict[tuple, int]" = OrderedDict()   # key -> cudaGraphExec_t
        self._seen: "OrderedDict[tuple, None]" = OrderedDict()
        self._capture_stream = None
        self._addrs = [None, None]   # per half: (this rank's slot address, every rank's), set at growth
        self._call: tuple = ()       # what the call being enqueued must agree on (run()'s `call`)
        self._named: "OrderedDict[int, tuple]" = OrderedDict()   # signature -> call, for error messages
        self._mismatch = None        # ctypes u64 over pinned host memory the checked barrier reports into
        from .symm_repeat import RepeatedCalls
        self.repeats = RepeatedCalls()

    def run(self, slot_bytes: int, stream: int, key, enqueue, prepare=None, call: tuple = ()) -> None:
        """One call: `enqueue(stream, local, slots)` enqueues its steps for a workspace half (this
        rank's slot address, every rank's). Run directly, or through a cached CUDA graph when `key`
        (everything the steps depend on besides the half and the stream; None: never cache) repeats.
        `prepare()` runs first unless a graph is replayed (sizing other workspaces, say). `call`: what
        every rank must agree on (the op, its sizes, K, format, forms chosen by settings), which its
        barriers check. slot_bytes must be the same on every rank (derive it from sizes, never from
        local data)."""
        self.verify()
        self._call = call
        local, slots, half = self._acquire(slot_bytes, stream)
        full = key + (half, stream) if key is not None and graphs_enabled() else None
        graph = self._graphs.get(full) if full is not None else None
        if graph is not None:
            self._graphs.move_to_end(full)
        else:
            if prepare is not None:
                prepare()
            if full in self._seen:
                graph = self._capture(full, lambda s: enqueue(s, local, slots))
            elif full is not None:
                self._seen[full] = None
                if len(self._seen) > _SEEN_CACHE:
                    self._seen.popitem(last=False)
        if graph is not None:
            _rt().graphLaunch(graph, stream)
        else:
            enqueue(stream, local, slots)
        _rt().eventRecord(self._done, stream)
        self.repeats.note_run(key, slot_bytes, graph is not None)

    def replay(self, key: tuple, slot_bytes: int, stream: int) -> bool:
        """run() for a call known to be served by a graph: launch it if the half this call gets has
        one (captured, and not dropped since); False, with nothing done, otherwise."""
        self.verify()
        if _round_up(max(slot_bytes, 1)) > self.slot:   # (FP4CCL_SYMM_GRAPHS is in the call's key)
            return False
        full = key + (self.calls % 2, stream)
        graph = self._graphs.get(full)
        if graph is None:
            return False
        self._acquire(slot_bytes, stream)   # takes that half
        self._graphs.move_to_end(full)
        _rt().graphLaunch(graph, stream)
        _rt().eventRecord(self._done, stream)
        return True

    def barrier(self, stream: int) -> None:
        # The epoch lives on the device, so the same barrier works eagerly and inside a graph. A
        # rank that skips a call makes its peers' barrier trap after FP4CCL_TIMEOUT (600 s unset).
        self.buf.barrier(stream, mode="checked", check=self.check(self._call))

    def check(self, call: tuple) -> Tuple[int, int]:
        """(call's signature, the report word's address): what a checked barrier, or a one-launch kernel's
        flags (fp4ccl/one_launch.py), compare and report into. Remembers the call, to name it in an error."""
        sig = call_signature(call)
        self._named[sig] = call
        self._named.move_to_end(sig)
        if len(self._named) > _NAMED_SIGNATURES:
            self._named.popitem(last=False)
        return sig, self.report_address()

    def report_address(self) -> int:
        """The address of the pinned, device-mapped word mismatches are reported into (made once, eagerly:
        never while a graph is captured)."""
        if self._mismatch is None:
            rt = _rt()
            # portable | mapped: written by kernels, read by the host without a sync
            ptr = rt.hostAlloc(8, 1 | 2)
            self._mismatch = ctypes.c_uint64.from_address(ptr)
            self._mismatch.value = 0
        return ctypes.addressof(self._mismatch)

    def verify(self, wait: bool = False) -> None:
        """Raise CallMismatchError (and close the communicator) if a checked barrier of an earlier call
        found ranks in different calls. `wait`: after the calls enqueued so far have run (destroy())."""
        if self._mismatch is None:
            return
        if wait and self._done:
            _rt().eventSynchronize(self._done)
        word = self._mismatch.value
        if word:
            raise self._mismatch_error(word)

    def _mismatch_error(self, word: int):
        from .errors import CallMismatchError
        kind, peer = word >> 60, (word >> 48) & 0xFFF
        theirs, mine = (word >> 24) & _SIGNATURE_MASK, word & _SIGNATURE_MASK
        me = self.comm.rank
        ours = _describe_call(self._named.get(mine))
        if kind in (1, 3):   # 3: from a one-launch kernel's flags, which carry 16 bits of the peer's signature
            bits = 24 if kind == 1 else 16
            named = [c for sig, c in self._named.items() if sig & ((1 << bits) - 1) == theirs]
            what = (f"rank {me} was in {ours}, rank {peer} in {_describe_call(named[-1] if named else None)} "
                    f"(signature {theirs:0{bits // 4}x} against {mine:06x})")
        else:
            what = f"rank {peer} found ranks in different calls while rank {me} was in {ours} or after it"
        err = CallMismatchError(
            f"the ranks of this communicator were in different collective calls: {what}. Every rank must make "
            f"the same calls in the same order, with the same sizes, shape (K) and format; the results of that "
            f"call and of every later one on this communicator are void. Found on the device by the "
            f"symmetric-memory barrier (FP4CCL_CHECK=1 compares the sizes on the host before each call)")
        self.comm._failed("mismatch", err)
        return err

    def _acquire(self, slot_bytes: int, stream: int) -> Tuple[int, List[int], int]:
        need = _round_up(max(slot_bytes, 1))
        if need > self.slot:
            self._grow(max(need, _round_up(int(self.slot * _GROWTH))))
        if stream != self._last_stream:  # on the same stream, stream order already does it
            _rt().streamWaitEvent(stream, self._done, 0)
            self._last_stream = stream
        half = self.calls % 2
        self.calls += 1
        addrs = self._addrs[half]
        if addrs is None:
            off = half * self.slot
            buf = self.buf
            addrs = self._addrs[half] = (buf.ptr() + off, [buf.ptr(r) + off for r in range(self.comm.size)])
        return addrs[0], addrs[1], half

    def _capture(self, key: tuple, enqueue) -> int:
        rt = _rt()
        if self._capture_stream is None:
            self._capture_stream = _new_stream(self.comm.device)
        s = self._capture_stream
        # Relaxed: other threads may allocate meanwhile; nothing in the steps allocates or syncs.
        rt.streamBeginCapture(s, rt.streamCaptureModeRelaxed)
        try:
            enqueue(s)
        finally:
            graph = rt.streamEndCapture(s)
        try:
            # node priorities kept: a barrier kernel captured from a high-priority side stream must
            # still get an SM ahead of the quantize kernels that fill the GPU
            exe = _cuda.instantiate_graph(graph)
        finally:
            rt.graphDestroy(graph)
        self._graphs[key] = exe
        if len(self._graphs) > _GRAPH_CACHE:
            _, old = self._graphs.popitem(last=False)
            rt.graphExecDestroy(old)
        return exe

    def _drop_graphs(self) -> None:
        rt = _rt()
        for exe in self._graphs.values():
            try:
                rt.graphExecDestroy(exe)
            except Exception:  # noqa: BLE001 - the context may already be gone at teardown
                pass
        self._graphs.clear()
        self._seen.clear()
        self.repeats.clear()

    def _grow(self, slot: int) -> None:
        from .symmetric import SymmetricBuffer
        if self.buf is not None:
            self._drop_graphs()  # they point into the old buffer
            self.buf.free()  # collective: every rank grows at the same call (slot sizes agree)
            self.buf = None
        log.info("symmetric workspace: 2 x %d bytes on cuda:%d", slot, self.comm.device)
        self.buf = SymmetricBuffer.allocate(self.comm, (2 * slot,), "uint8")
        self.slot = slot
        self._addrs = [None, None]
        self._last_stream = None
        if not self._done:
            self._done = _new_event(self.comm.device)

    def close(self) -> None:
        # comm.destroy() frees the buffer itself (collectively, with the other symmetric buffers).
        self._drop_graphs()
        if self._mismatch is not None:
            try:
                _rt().freeHost(ctypes.addressof(self._mismatch))
            except Exception:  # noqa: BLE001 - the context may already be gone at teardown
                pass
            self._mismatch = None
        if self._done:
            try:
                _rt().eventDestroy(self._done)
            except Exception:  # noqa: BLE001 - the context may already be gone at teardown
                pass
            self._done = 0
        self._capture_stream = None
        self.buf = None
        self._addrs = [None, None]


def _describe_call(call) -> str:
    """A call tuple as the error names it: "all_gatherv(elements=(128, 192), itemsize=2)"."""
    if not call:
        return "a call this rank did not make recently"
    name, *fields = _canonical(call)
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in fields)})"


def _new_stream(device: int):
    """A non-blocking stream of our own on `device` (a CuPy Stream; int() of .ptr is the handle)."""
    import cupy
    with cupy.cuda.Device(device):
        stream = cupy.cuda.Stream(non_blocking=True)
    return _OwnedStream(stream)


class _OwnedStream(int):
    """A stream handle that keeps its CuPy Stream alive."""

    def __new__(cls, stream):
        self = super().__new__(cls, int(stream.ptr))
        self.stream = stream
        return self


def _new_event(device: int) -> int:
    """A timing-free event on `device`. Never recorded, so the first wait on it is a no-op."""
    import cupy
    with cupy.cuda.Device(device):
        return _rt().eventCreateWithFlags(_rt().eventDisableTiming)


def forget_graphs(comm) -> None:
    """Drop the cached graphs of this communicator's calls (a buffer they point into was replaced)."""
    ws = comm._extras.get(_EXTRAS_KEY)
    if ws is not None:
        ws._drop_graphs()


def existing_workspace(comm) -> Optional[Workspace]:
    """The communicator's workspace if a symmetric-memory call has made one."""
    return comm._extras.get(_EXTRAS_KEY)


def workspace(comm) -> Workspace:
    ws = comm._extras.get(_EXTRAS_KEY)
    if ws is None:
        ws = comm._extras[_EXTRAS_KEY] = Workspace(comm)
    return ws


# -- side streams ----------------------------------------------------------------------------------------

_HIGHEST_PRIORITY = -(1 << 20)


class SideStream:
    """A stream of the communicator's besides the caller's, and events to fork and join it with others."""

    def __init__(self, device: int, high_priority: bool = False):
        import cupy
        with cupy.cuda.Device(device):
            # CUDA clamps a priority outside the device's range to its nearest end: the highest here.
            priority = _HIGHEST_PRIORITY if high_priority else None
            self._stream = cupy.cuda.Stream(non_blocking=True, priority=priority)
            self._events = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(16)]
        self.ptr = int(self._stream.ptr)
        self._next = 0

    def order(self, waiter: int, signaller: int) -> None:
        """Work enqueued on `waiter` from now on runs after what `signaller` holds now."""
        self.wait(waiter, self.mark(signaller))

    def mark(self, signaller: int) -> int:
        """An event for what `signaller` holds now (one of 16 reused in turn: wait on it soon)."""
        ev = self._events[self._next % len(self._events)].ptr
        self._next += 1
        _rt().eventRecord(ev, signaller)
        return ev

    def wait(self, waiter: int, event: int) -> None:
        """Work enqueued on `waiter` from now on runs after `event` (from mark)."""
        _rt().streamWaitEvent(waiter, event, 0)

    def close(self) -> None:
        self._stream = None
        self._events = []


def side_stream(comm, name: str, high_priority: bool = False) -> SideStream:
    """The communicator's side stream `name` on its device (made on first use, closed by comm.destroy())."""
    key = (name, comm.device)
    side = comm._extras.get(key)
    if side is None:
        side = comm._extras[key] = SideStream(comm.device, high_priority)
    return side


# -- plain all_gatherv ---------------------------------------------------------------------------------

def ring(comm) -> List[int]:
    """The peers in ring order from this rank: rank+1, rank+2, ... Steps that each touch one peer go
    in this order, so that at every step each rank deals with a different peer."""
    return [(comm.rank + i) % comm.size for i in range(1, comm.size)]


def all_gatherv(comm, send_ptr: int, recv_ptr: int, counts: Sequence[int], itemsize: int, stream: int) -> None:
    """Rows of every rank into recv: copy in, barrier, one segmented-copy launch pulling every peer's
    rows (the own rows straight from x). Copy-engine pulls, peer after peer in ring order, measured
    slower from 8 MiB on (bench/RESULTS.md run 6)."""
    from .vcollectives import copy, copy_segments, offsets
    me = comm.rank
    offs = offsets(counts)

    def enqueue(s, local, slots):
        copy(local, send_ptr, counts[me] * itemsize, s)
        workspace(comm).barrier(s)
        copy_segments(comm.device, [(recv_ptr + offs[r] * itemsize, send_ptr if r == me else slots[r],
                                     counts[r] * itemsize) for r in range(comm.size)], s)

    workspace(comm).run(max(counts) * itemsize, stream, ("all_gatherv", send_ptr, recv_ptr, tuple(counts), itemsize),
                        enqueue, call=agreed("all_gatherv", elements=tuple(counts), itemsize=itemsize))


# -- plain reduce_scatterv -------------------------------------------------------------------------------

MAX_SOURCES = 8  # FP4CCL_MAX_SOURCES in csrc/symm.cu: ranks one summing launch reads
SUM_KERNELS = {"bfloat16": "fp4ccl_sum_sources_bf16", "float16": "fp4ccl_sum_sources_f16",
               "float32": "fp4ccl_sum_sources_f32"}
_SOURCE_TABLE = np.dtype([("src", "<u8", (MAX_SOURCES,))])
_SUM_THREADS = 256


def can_reduce_scatter(comm, dtype: str, op: str) -> bool:
    """Whether reduce_scatterv(..., algo 'symm') supports this call: sums of float types, <= 8 ranks."""
    return op == "sum" and dtype in SUM_KERNELS and comm.size <= MAX_SOURCES


def reduce_scatterv(comm, send_ptr: int, recv_ptr: int, counts: Sequence[int], dtype: str, itemsize: int,
                    stream: int) -> None:
    """This rank's rows of the sum: copy the whole input in, barrier, one kernel summing (in fp32, in
    rank order, rounded once) the rows meant for this rank from every rank's slot."""
    from .vcollectives import copy, offsets
    me = comm.rank
    total = sum(counts) * itemsize
    count = counts[me]
    off = offsets(counts)[me] * itemsize

    def enqueue(s, local, slots):
        copy(local, send_ptr, total, s)
        workspace(comm).barrier(s)
        _sum_sources(comm.device, dtype, itemsize, recv_ptr, [slot + off for slot in slots], count, s)

    workspace(comm).run(total, stream, ("reduce_scatterv", send_ptr, recv_ptr, tuple(counts), dtype), enqueue,
                        call=agreed("reduce_scatterv", elements=tuple(counts), dtype=dtype))


def _sum_sources(device: int, dtype: str, itemsize: int, out_ptr: int, sources: Sequence[int], count: int,
                 stream: int) -> None:
    """out[:count] = the sum of count elements at every source, in fp32 and in the order given, rounded once."""
    if not count:
        return
    from .symmetric import launch
    table = np.zeros(1, _SOURCE_TABLE)
    table["src"][0, :len(sources)] = sources
    per_thread = 16 // itemsize
    blocks = max(1, min(_resident_sum_blocks(device), -(-count // (per_thread * _SUM_THREADS))))
    launch(device, SUM_KERNELS[dtype], (blocks,), (_SUM_THREADS,),
           (np.uint64(out_ptr), table, np.int32(len(sources)), np.int64(count), np.float32(1.0)), stream)


@functools.lru_cache(maxsize=None)
def _resident_sum_blocks(device: int) -> int:
    rt = _rt()
    return 8 * rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, device)


# -- the copy-engine forms of the plain v-collectives ----------------------------------------------------

def ce_pieces() -> int:
    """Pieces per call of the copy-engine forms (FP4CCL_CE_PIECES, default 1; every rank must use the
    same: each piece is one barrier). A piece is pulled (pushed) while the next is staged (summed).
    Measured (bench/RESULTS.md run 30, 1 MiB-1 GiB): 2 or 4 pieces made the gather slower at every
    size (3374 against 2888 us at 1 GiB with 2) and did not move the reduce-scatter."""
    return _positive_env("FP4CCL_CE_PIECES", 1)


def ce_streams() -> int:
    """Copy streams of the copy-engine forms, the peers' copies of a piece spread over them
    (FP4CCL_CE_STREAMS, default 1: one copy at a time, in ring order). Copies from (to) several
    peers at once measured slower at every size from 16 MiB (run 30: 0.57-0.76x of NCCL's time
    with 2 or 3 streams against 0.85-0.96x with one)."""
    return _positive_env("FP4CCL_CE_STREAMS", 1)


def _positive_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name}={raw!r} must be a positive integer")
    return int(raw)


def _stage(device: int, dst: int, src: int, nbytes: int, stream: int) -> None:
    """A local copy with the SMs (FP4CCL_CE_STAGE=sm, the default) or the copy engine (ce), so that
    staging the next piece does not queue on the copy engines behind the pulls."""
    from .vcollectives import copy, launch_vcopy
    if not nbytes:
        return
    how = os.environ.get("FP4CCL_CE_STAGE", "sm").strip().lower()
    if how not in ("sm", "ce"):
        raise ValueError(f"FP4CCL_CE_STAGE={how!r} must be 'sm' or 'ce'")
    if how == "ce" or not launch_vcopy(device, [(dst, src, nbytes)], stream):
        copy(dst, src, nbytes, stream)


def _ce_plan(counts: Sequence[int]) -> Tuple[List[int], int, int, List[List[Tuple[int, int]]]]:
    """(each rank's first element, pieces, copy streams, (first element, elements) of each piece of each
    rank's part) for a copy-engine call; every rank splits alike."""
    from .vcollectives import offsets, split_count
    npieces = ce_pieces()
    split = []
    for c in counts:
        parts = split_count(c, npieces)
        split.append(list(zip(offsets(parts), parts)))
    return offsets(counts), npieces, ce_streams(), split


def _ce_streams(comm, n: int) -> Tuple[SideStream, List[SideStream]]:
    """The barrier stream (highest priority) and n copy streams of the copy-engine forms."""
    return (side_stream(comm, "ce_barrier", high_priority=True),
            [side_stream(comm, "ce_copy" if i == 0 else f"ce_copy{i}") for i in range(n)])


def all_gatherv_ce(comm, send_ptr: int, recv_ptr: int, counts: Sequence[int], itemsize: int, stream: int) -> None:
    """Rows of every rank into recv, pulled by the copy engine: this rank's rows go into its slot piece
    by piece, each piece published by a barrier on a high-priority stream; the copy streams then pull
    that piece of every peer's rows straight into recv (ring order) while the next piece is staged.
    The own rows are copied from x last, beside the pulls. The copy engines need no SM and reach
    ~340 GB/s from one peer's VMM memory (docs/OVERLAP.md), against 240-290 for SM loads."""
    from .vcollectives import copy
    me = comm.rank
    offs, npieces, nstreams, split = _ce_plan(counts)

    def enqueue(s, local, slots):
        bar, pulls = _ce_streams(comm, nstreams)
        ws = workspace(comm)
        for k in range(npieces):
            first, n = split[me][k]
            _stage(comm.device, local + first * itemsize, send_ptr + first * itemsize, n * itemsize, s)
            bar.order(bar.ptr, s)       # this piece is in our slot
            ws.barrier(bar.ptr)         # ... and in every rank's
            for pull in pulls:
                pull.order(pull.ptr, bar.ptr)
            for i, p in enumerate(ring(comm)):
                first, n = split[p][k]
                copy(recv_ptr + (offs[p] + first) * itemsize, slots[p] + first * itemsize, n * itemsize,
                      pulls[i % nstreams].ptr)
        _stage(comm.device, recv_ptr + offs[me] * itemsize, send_ptr, counts[me] * itemsize, s)
        bar.order(s, bar.ptr)
        for pull in pulls:
            pull.order(s, pull.ptr)

    workspace(comm).run(max(counts) * itemsize, stream,
                        ("all_gatherv_ce", send_ptr, recv_ptr, tuple(counts), itemsize, npieces, nstreams), enqueue,
                        call=agreed("all_gatherv_ce", elements=tuple(counts), itemsize=itemsize, pieces=npieces))


def reduce_scatterv_ce(comm, send_ptr: int, recv_ptr: int, counts: Sequence[int], dtype: str, itemsize: int,
                       stream: int) -> None:
    """This rank's rows of the sum, pushed by the copy engine: piece by piece, the copy streams write
    the rows meant for each peer straight from x into that peer's slot (the region kept for this
    rank, ring order), a barrier on a high-priority stream publishes the piece, and that piece of this
    rank's result is summed (fp32, rank order, rounded once) from x's own rows and the peers' regions
    of our slot while the next piece is on the wire. Nothing is staged: each byte crosses NVLink once."""
    from .vcollectives import copy
    me, n = comm.rank, comm.size
    offs, npieces, nstreams, split = _ce_plan(counts)

    def enqueue(s, local, slots):
        bar, pushes = _ce_streams(comm, nstreams)
        ws = workspace(comm)
        for push in pushes:
            push.order(push.ptr, s)     # the previous call's sums have read our slot
        for k in range(npieces):
            for i, p in enumerate(ring(comm)):
                first, m = split[p][k]
                # rank p's slot holds one region of counts[p] elements per source rank
                copy(slots[p] + (me * counts[p] + first) * itemsize, send_ptr + (offs[p] + first) * itemsize,
                      m * itemsize, pushes[i % nstreams].ptr)
            for push in pushes:
                bar.order(bar.ptr, push.ptr)
            ws.barrier(bar.ptr)
            bar.order(s, bar.ptr)
            first, m = split[me][k]
            sources = [send_ptr + (offs[me] + first) * itemsize if r == me else local + (r * counts[me] + first) * itemsize
                       for r in range(n)]
            _sum_sources(comm.device, dtype, itemsize, recv_ptr + first * itemsize, sources, m, s)
        for push in pushes:
            push.order(s, push.ptr)

    workspace(comm).run(max(counts) * n * itemsize, stream,
                        ("reduce_scatterv_ce", send_ptr, recv_ptr, tuple(counts), dtype, npieces, nstreams), enqueue,
                        call=agreed("reduce_scatterv_ce", elements=tuple(counts), dtype=dtype, pieces=npieces))


# -- FP4 -------------------------------------------------------------------------------------------------

def fp4_gather_dequantize(codec, info, K: int, fmt: str, shared: bool, rows: Sequence[int], oinfo) -> None:
    """Quantize into this rank's slot; barrier; one decode launch over every rank's slot, the peers'
    read straight over NVLink. (Decoding the own rows before the barrier and each peer in turn with
    the whole grid measured slower: 163 against 146 us at 128 MiB, 515 against 470 at 512 MiB.)
    Decode-time sizes go to the one-launch gather instead (fp4ccl/one_launch.py)."""
    from . import one_launch
    from .formats.tensor import packed_layout
    from .vcollectives import offsets
    comm = codec.comm
    me = comm.rank
    rows = tuple(rows)
    if one_launch.form(comm, rows, K, fmt, shared) == "ll":
        return one_launch.gather(codec, info, K, fmt, rows, oinfo)

    def enqueue(s, local, slots):
        lays = [packed_layout(r, K, fmt) for r in rows]
        out_rows = offsets(rows)
        codec.stream = s
        codec.amax_and_quantize(info, K, fmt, shared, [(0, rows[me], local, lays[me])])
        workspace(comm).barrier(s)
        codec.dequantize([(out_rows[r], rows[r], slots[r], lays[r]) for r in range(comm.size)], K, fmt, oinfo)

    key = ("fp4_gather", info.ptr, info.dtype, oinfo.ptr, oinfo.dtype, rows, K, fmt, shared)
    workspace(comm).run(_largest_packed(rows, K, fmt), codec.stream, key, enqueue,
                        prepare=lambda: codec.reserve_nccl_gather(K, fmt, rows, oinfo),
                        call=agreed("fp4_gather", sizes=rows, K=K, format=fmt, shared=shared))


@functools.lru_cache(maxsize=256)
def _largest_packed(rows: Tuple[int, ...], K: int, fmt: str) -> int:
    """Bytes of the largest rank's packed FP4 segment: the slot size of an FP4 gather."""
    from .formats.tensor import packed_layout
    return max(packed_layout(r, K, fmt).total_bytes for r in rows)


def raw_pull(segment_bytes: int) -> str:
    """How the raw FP4 gather moves the peers' data when the largest rank's packed segment has
    `segment_bytes` (the same on every rank): `ce` from RAW_CE_FROM_BYTES, where the copy engine pulls
    each peer's FP4 data, peer after peer, while one SM launch copies every rank's block scales and
    global scale and the own data; `sm` below, one SM launch copying every part of every rank (a copy
    engine's start costs more than the SMs' slower loads save on small segments).
    FP4CCL_FP4_RAW_PULL=ce|sm forces one; every rank must agree. Measured (4 x H200, bench/RESULTS.md
    run 58, speedup over NCCL's bf16 all_gather at 64 MiB / 128 MiB / 256 MiB / 512 MiB / 1 GiB
    logical, segments of 4.5 / 9 / 18 / 36 / 72 MiB): ce 2.42 2.78 2.81 2.97 3.06, sm 2.63 2.71 2.80
    2.84 2.83."""
    how = os.environ.get("FP4CCL_FP4_RAW_PULL", "").strip().lower()
    if not how:
        return "ce" if segment_bytes >= RAW_CE_FROM_BYTES else "sm"
    if how not in RAW_PULLS:
        raise ValueError(f"FP4CCL_FP4_RAW_PULL={how!r} is not one of {', '.join(RAW_PULLS)}")
    return how


RAW_PULLS = ("ce", "sm")
RAW_CE_FROM_BYTES = 8 << 20


def fp4_gather_raw(codec, rows: Sequence[int], K: int, fmt: str, fill_slot, source: tuple,
                   dptr: int, sptr: int, gptr: int) -> None:
    """Gather packed FP4 segments into separate data / scales / global-scale arrays: `fill_slot(addr,
    layout)` writes this rank's segment (on codec.stream) from what `source` names (the addresses and
    settings it reads: part of the graph key); after the barrier the parts are copied as raw_pull()
    says. (Copy-engine pulls of data and scales alike, peer after peer, measured slower than one SM
    launch on CUDA-IPC buffers: 184 against 154 us at 128 MiB, 632 against 470 at 512 MiB, run 8; the
    VMM buffers of today give a copy-engine copy ~340 GB/s against 240-290 for SM loads.)"""
    from .formats.tensor import BLOCK_SIZE, packed_layout
    from .vcollectives import copy, copy_segments, offsets
    comm = codec.comm
    me = comm.rank
    bs = BLOCK_SIZE[fmt]
    lays = [packed_layout(r, K, fmt) for r in rows]
    first = offsets(rows)
    slot_bytes = _largest_packed(tuple(rows), K, fmt)
    how = raw_pull(slot_bytes)

    def data(r, slots):
        return (dptr + first[r] * K // 2, slots[r], rows[r] * K // 2)

    def enqueue(s, local, slots):
        codec.stream = s
        fill_slot(local, lays[me])
        workspace(comm).barrier(s)
        segs = []
        if how == "ce":
            pull = side_stream(comm, "ce_copy")
            pull.order(pull.ptr, s)
            for p in ring(comm):
                copy(*data(p, slots), pull.ptr)
            segs.append(data(me, slots))
        else:
            segs += [data(r, slots) for r in range(comm.size)]
        for r in range(comm.size):
            segs.append((sptr + first[r] * K // bs, slots[r] + lays[r].scale_off, rows[r] * K // bs))
            if gptr:
                segs.append((gptr + 4 * r, slots[r] + lays[r].gs_off, 4))
        copy_segments(comm.device, segs, s)
        if how == "ce":
            pull.order(s, pull.ptr)

    # The result arrays are new on every call, but a caching allocator hands the same addresses back
    # when the caller drops each result before the next one (or keeps one at a time): those calls
    # repeat their key and replay its graph. Results that are all kept just never repeat one.
    key = ("fp4_gather_raw",) + source + (tuple(rows), K, fmt, dptr, sptr, gptr, how)
    workspace(comm).run(slot_bytes, codec.stream, key, enqueue,
                        call=agreed("fp4_gather_raw", sizes=tuple(rows), K=K, format=fmt, pull=how))


# The forms of the FP4 reduce-scatter over symmetric memory (fp4_reduce_scatter's doc) and the input
# size from which push is the default (store below); FP4CCL_FP4_RS_FORM forces one.
# Measured side by side (4 x H200, bf16 in, speedup over NCCL's bf16 reduce_scatter, bench/RESULTS.md
# run 40) at 8 / 16 / 32 / 64 / 128 / 256 / 512 MiB / 1 GiB:
#   steps 0.56 0.91 1.28 1.55 1.62 1.63 1.65 1.61
#   pull  0.73 0.89 1.22 1.66 2.00 2.27 2.44 2.61   (FP4CCL_PDL=0; with the dependent launches 0.45-2.55)
#   store 0.88 1.17 1.49 1.84 1.90 1.92 1.93 1.88
#   push  0.60 0.92 1.44 2.05 2.28 2.40 2.51 2.56
# and from 8 KiB to 2 MiB (run 41, one call, sweeps one after the other) store took 50-53 us per call
# where steps took 62-87.
# Below those, a call whose chunks fit the one-launch kernel (one_launch.serves) is one launch: "ll".
RS_FORMS = ("ll", "steps", "pull", "store", "push")
RS_PUSH_FROM_BYTES = 64 << 20


def rs_push_streams() -> int:
    """Copy streams of the push form (FP4CCL_FP4_RS_PUSH_STREAMS, default 1): with n, the pushes to
    the peers go round-robin over n streams, so a push starts as soon as its chunk is quantized
    instead of after the previous push. Measured slower (bench/RESULTS.md run 58, 4 x H200, speedup
    over NCCL's bf16 reduce_scatter at 64 MiB / 128 MiB / 512 MiB): 1 stream 2.03 2.28 2.52, 2 streams
    1.91 2.17 2.48, 3 streams 1.65 2.15 2.47: pushes side by side share the sender's links and each
    lands later."""
    return _positive_env("FP4CCL_FP4_RS_PUSH_STREAMS", 1)


def rs_pieces(chunk_bytes: int) -> int:
    """Row pieces per chunk in the pipelined reduce-scatter, from the largest chunk's packed FP4 bytes
    (the same on every rank: each piece is one barrier). Each piece is quantized, barriered, pulled
    and summed on its own, so the first pull starts once a piece (not a chunk) is quantized and only
    the last piece's sum follows the last pull; each piece costs a barrier and a copy's start. Measured
    best (bench/RESULTS.md run 26): 1 piece of 4.5 MiB chunks, 2 of 9-36 MiB, 4 of 72 MiB."""
    return 1 if chunk_bytes < (8 << 20) else 2 if chunk_bytes < (64 << 20) else 4


def rs_form(nbytes: int, one_launch: Optional[Callable[[], bool]] = None) -> str:
    """The FP4 reduce-scatter form for an input of `nbytes` (the same on every rank); one_launch(): whether
    the one-launch kernel can serve the call (one_launch.serves), asked only where it decides. A forced
    'll' that cannot runs the size's default and says so at INFO."""
    raw = os.environ.get("FP4CCL_FP4_RS_FORM", "").strip().lower()
    if raw and raw not in RS_FORMS:
        raise ValueError(f"FP4CCL_FP4_RS_FORM={raw!r} is not one of {', '.join(RS_FORMS)}")
    if raw and raw != "ll":
        return raw
    if one_launch is not None and one_launch():
        return "ll"
    if raw:
        log.info("FP4CCL_FP4_RS_FORM=ll serves NVFP4 and MXFP4 reduce-scatters whose chunks hold at most %d elements, "
                 "over at most 8 ranks on sm_90+: this one runs as the default form", _one_launch_max())
    return "push" if nbytes >= RS_PUSH_FROM_BYTES else "store"


def _one_launch_max() -> int:
    from .one_launch import MAX_ELEMENTS
    return MAX_ELEMENTS


def fp4_reduce_scatter(codec, info, K: int, fmt: str, rows: Sequence[int], oinfo, rounding: str, seed, mix) -> None:
    """Each rank quantizes the chunk for each peer (its own amax); this rank decodes and sums, in rank
    order, the chunk every rank made for it, rounding once. Chunks that fit the one-launch kernel run
    as one launch (rs_form 'll', fp4ccl/one_launch.py); the other forms:

    steps: quantize every chunk into the own slot, one barrier, one fused decode-and-sum kernel reading
    the peers' slots over NVLink.
    pull: n - 1 stages of rs_pieces() row pieces: at stage i every rank quantizes its chunk for rank + i
    piece by piece, a barrier after each on a high-priority stream, and the copy engine pulls that piece
    of the chunk from rank - i into a local staging area while the SMs quantize the next piece; the own
    chunk last, then one local decode-and-sum.
    store: the quantize kernels store each peer's chunk straight into that peer's slot (a region per
    source), so the NVLink writes ride on the quantize passes and no stage waits for a barrier; the
    amax passes run ahead on a side stream. One barrier, then a local decode-and-sum.
    push: each peer's chunk is quantized into a local staging area and the copy engine pushes it into
    that peer's slot (a region per source) while the SMs quantize the next; no barrier until the last
    push, then one, and a local decode-and-sum.
    Stochastic rounding draws from the element index, so all give the same bits. Every form is
    captured into a CUDA graph when the call repeats.
    """
    from .formats import kernels
    from .formats.tensor import BLOCK_SIZE, packed_layout
    from .vcollectives import copy, offsets, split_count
    from . import one_launch
    comm = codec.comm
    me, n = comm.rank, comm.size
    bs = BLOCK_SIZE[fmt]
    row_offs = offsets(rows)
    form = rs_form(info.nbytes, lambda: one_launch.serves(comm, rows, K, fmt))
    if form == "ll":
        return one_launch.reduce_scatter(codec, info, K, fmt, tuple(rows), oinfo, rounding,
                                         tuple(mix(seed, me, q) for q in range(n)))
    # pieces[q]: (first row in the chunk, rows, offset in the chunk's region, packed layout) of each row
    # piece of the chunk for rank q. Each piece is a packed segment of its own, so a piece travels as
    # one copy and is summed on its own; every rank splits a chunk the same way.
    npieces = rs_pieces(packed_layout(max(rows), K, fmt).total_bytes) if form == "pull" else 1
    pieces = []
    for q in range(n):
        counts = split_count(rows[q], npieces)
        lay_q = [packed_layout(c, K, fmt) for c in counts]
        pieces.append(list(zip(offsets(counts), counts, offsets([lay.total_bytes for lay in lay_q]), lay_q)))
    size = [sum(piece[3].total_bytes for piece in pieces[q]) for q in range(n)]
    region = offsets(size)            # steps, pull: in every slot, the chunk for rank q at region[q]
    m = size[me]
    # store, push: in rank q's slot, the chunk from rank c at c * size[q]; push stages the peers'
    # chunks, in ring order, at stage[i]
    stage = offsets([size[p] for p in ring(comm)])
    staging = {"pull": (n - 1) * m, "push": sum(size) - m}.get(form, 0)
    # (a stream with no push to make would be joined without being forked: no more than the peers)
    push_streams = max(1, min(rs_push_streams(), n - 1)) if form == "push" else 1

    def prepare():
        codec.reserve_nccl_reduce_scatter(K, fmt, rows, staging=staging)

    def quantize(p, chunk_addr, amax, piece):
        """`piece` of the chunk for rank p into the chunk that starts at chunk_addr."""
        r0, nr, off, lay = piece
        codec.quantize(info, K, fmt, amax, [(row_offs[p] + r0, nr, chunk_addr + off, lay)],
                       rounding=rounding, seed=mix(seed, me, p))

    def quantize_chunk(p, dst):
        amax = codec.amax_rows(info, K, fmt, row_offs[p], rows[p])
        for piece in pieces[p]:
            quantize(p, dst + region[p], amax, piece)

    def decode_sum(stream, sources, piece):
        """Rows of `piece` of this rank's result, from that piece of each chunk at `sources`."""
        q0, nq, off, lay = piece
        if nq:
            kernels.dequantize_sum(comm.device, oinfo.ptr + q0 * K * oinfo.itemsize, oinfo.dtype, K, fmt, nq * K // bs,
                                   [(a + off, a + off + lay.scale_off, a + off + lay.gs_off if fmt == "nvfp4" else 0)
                                    for a in sources], stream)

    def enqueue(s, local, slots):
        codec.stream = s
        for p in ring(comm) + [me]:
            quantize_chunk(p, local)
        workspace(comm).barrier(s)
        decode_sum(s, [slot + region[me] for slot in slots], pieces[me][0])

    def enqueue_store(s, local, slots):
        codec.stream = s
        ahead = codec._side("rs_amax")
        ahead.order(ahead.ptr, s)          # x is ready
        order = ring(comm) + [me]
        marks = []
        for p in order:
            marks.append((codec.amax_rows(info, K, fmt, row_offs[p], rows[p], ahead.ptr), ahead.mark(ahead.ptr)))
        for p, (amax, done) in zip(order, marks):
            ahead.wait(s, done)
            quantize(p, slots[p] + me * size[p], amax, pieces[p][0])
        workspace(comm).barrier(s)
        decode_sum(s, [local + c * m for c in range(n)], pieces[me][0])

    def enqueue_push(s, local, slots):
        codec.stream = s
        pushes = [codec._side("rs_push" if k == 0 else f"rs_push{k}") for k in range(push_streams)]
        for i, p in enumerate(ring(comm)):
            src = codec.staging + stage[i]
            quantize(p, src, codec.amax_rows(info, K, fmt, row_offs[p], rows[p]), pieces[p][0])
            push = pushes[i % push_streams]
            push.order(push.ptr, s)        # this chunk is quantized
            copy(slots[p] + me * size[p], src, size[p], push.ptr)
        quantize(me, local + me * m, codec.amax_rows(info, K, fmt, row_offs[me], rows[me]), pieces[me][0])
        for push in pushes:
            push.order(s, push.ptr)        # every push has landed
        workspace(comm).barrier(s)
        decode_sum(s, [local + c * m for c in range(n)], pieces[me][0])

    def enqueue_pipelined(s, local, slots):
        codec.stream = s
        # Barriers and pulls on streams of their own, so that barrier k + 1 completes while pull k
        # runs (one stream for both put every barrier behind the previous pull: 20-30 us a stage).
        # The barrier stream has the highest priority: its one-warp kernel must get an SM as soon as
        # the quantize it waits for ends, ahead of the next quantize queued on `s`, which fills
        # every SM. The pulls run on the copy engines and need no SM.
        bar = codec._side("rs_barrier", high_priority=True)
        pull = codec._side("rs_pull")
        ws = workspace(comm)
        staging = codec.staging
        landed = []                        # per piece of the last stage's chunk: its pull's event
        for i, p in enumerate(ring(comm), 1):
            amax = codec.amax_rows(info, K, fmt, row_offs[p], rows[p])
            src = (me - i) % n
            base, dst = slots[src] + region[me], staging + (i - 1) * m
            for theirs, ours in zip(pieces[p], pieces[me]):
                quantize(p, local + region[p], amax, theirs)
                bar.order(bar.ptr, s)      # this piece is in our slot
                ws.barrier(bar.ptr)        # ... and in every rank's
                pull.order(pull.ptr, bar.ptr)
                copy(dst + ours[2], base + ours[2], ours[3].total_bytes, pull.ptr)
                if i == n - 1:
                    landed.append(pull.mark(pull.ptr))
        quantize_chunk(me, local)
        bar.order(s, bar.ptr)
        sources = [local + region[me] if c == me else staging + ((me - c) % n - 1) * m for c in range(n)]
        # One pull stream: a piece of the last stage landed means that piece of every stage did, so
        # each piece's sum starts while the next piece is still on the wire.
        for piece, event in zip(pieces[me], landed):
            pull.wait(s, event)
            decode_sum(s, sources, piece)
        pull.order(s, pull.ptr)

    slot = n * max(size) if form in ("store", "push") else sum(size)
    key = ("fp4_reduce_scatter", info.ptr, info.dtype, oinfo.ptr, oinfo.dtype, tuple(rows), K, fmt, rounding, seed,
           form, push_streams)
    steps = {"steps": enqueue, "pull": enqueue_pipelined, "store": enqueue_store, "push": enqueue_push}[form]
    workspace(comm).run(slot, codec.stream, key, steps, prepare,
                        call=agreed("fp4_reduce_scatter", sizes=tuple(rows), K=K, format=fmt, form=form))
