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
the stream is being captured into a CUDA graph (the barrier's epochs are host-side counters, which
a replay cannot advance), or FP4CCL_FP4_ALGO / FP4CCL_ALGO ask for an NCCL algorithm. Every rank
must make the same choice, so capture (like every collective) has to be the same on every rank.
"""
from __future__ import annotations

import functools
import os
from typing import List, Sequence, Tuple

import numpy as np

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


def fp4_algo(comm, stream: int) -> str:
    """'symm' or 'nccl' for an FP4 collective: FP4CCL_FP4_ALGO if set, else symm wherever usable.
    A forced 'symm' that cannot run (another host, graph capture) runs 'nccl' and says so at INFO."""
    forced = os.environ.get("FP4CCL_FP4_ALGO", "").strip().lower()
    if forced and forced not in FP4_ALGOS:
        raise ValueError(f"FP4CCL_FP4_ALGO={forced!r} is not one of {', '.join(FP4_ALGOS)}")
    if forced == "nccl":
        return "nccl"
    if usable(comm, stream):
        return "symm"
    if forced == "symm":
        log.info("FP4CCL_FP4_ALGO=symm, but symmetric memory cannot serve this call "
                 "(one rank, several hosts, or graph capture): NCCL instead")
    return "nccl"


class Workspace:
    """The per-communicator symmetric workspace: two halves of `slot` bytes on every rank."""

    def __init__(self, comm):
        self.comm = comm
        self.buf = None
        self.slot = 0
        self.calls = 0
        self._done = 0        # cudaEvent_t: the end of the previous call, whatever its stream
        self._last_stream = None

    def acquire(self, slot_bytes: int, stream: int) -> Tuple[int, List[int]]:
        """(this rank's slot address, every rank's slot address) for one call on `stream`.
        slot_bytes must be the same on every rank (derive it from sizes, never from local data)."""
        need = _round_up(max(slot_bytes, 1))
        if need > self.slot:
            self._grow(max(need, _round_up(int(self.slot * _GROWTH))))
        if stream != self._last_stream:  # on the same stream, stream order already does it
            _rt().streamWaitEvent(stream, self._done, 0)
            self._last_stream = stream
        half = (self.calls % 2) * self.slot
        self.calls += 1
        buf = self.buf
        return buf.ptr() + half, [buf.ptr(r) + half for r in range(self.comm.size)]

    def barrier(self, stream: int) -> None:
        # acquire() ordered this stream after the previous call, and so after its barrier. With
        # FP4CCL_TIMEOUT set, the kernel barrier: a rank that skips the call then gives an error
        # after the timeout, where the stream-memop barrier would wait forever.
        mode = "kernel" if os.environ.get("FP4CCL_TIMEOUT", "").strip() else None
        self.buf.barrier(stream, mode=mode, ordered=True)

    def release(self, stream: int) -> None:
        _rt().eventRecord(self._done, stream)

    def _grow(self, slot: int) -> None:
        from .symmetric import SymmetricBuffer
        if self.buf is not None:
            self.buf.free()  # collective: every rank grows at the same call (slot sizes agree)
            self.buf = None
        log.info("symmetric workspace: 2 x %d bytes on cuda:%d", slot, self.comm.device)
        self.buf = SymmetricBuffer.allocate(self.comm, (2 * slot,), "uint8")
        self.slot = slot
        self._last_stream = None
        if not self._done:
            self._done = _new_event(self.comm.device)

    def close(self) -> None:
        # comm.destroy() frees the buffer itself (collectively, with the other symmetric buffers).
        if self._done:
            try:
                _rt().eventDestroy(self._done)
            except Exception:  # noqa: BLE001 - the context may already be gone at teardown
                pass
            self._done = 0
        self.buf = None


def _new_event(device: int) -> int:
    """A timing-free event on `device`. Never recorded, so the first wait on it is a no-op."""
    import cupy
    with cupy.cuda.Device(device):
        return _rt().eventCreateWithFlags(_rt().eventDisableTiming)


def workspace(comm) -> Workspace:
    ws = comm._extras.get(_EXTRAS_KEY)
    if ws is None:
        ws = comm._extras[_EXTRAS_KEY] = Workspace(comm)
    return ws


# -- plain all_gatherv ---------------------------------------------------------------------------------

def all_gatherv(comm, send_ptr: int, recv_ptr: int, counts: Sequence[int], itemsize: int, stream: int) -> None:
    """Rows of every rank into recv: copy in, barrier, one kernel pulling every peer's slot."""
    from .vcollectives import copy, copy_segments
    me = comm.rank
    ws = workspace(comm)
    local, slots = ws.acquire(max(counts) * itemsize, stream)
    copy(local, send_ptr, counts[me] * itemsize, stream)
    ws.barrier(stream)
    segs, off = [], 0
    for r, n in enumerate(counts):
        segs.append((recv_ptr + off * itemsize, send_ptr if r == me else slots[r], n * itemsize))
        off += n
    copy_segments(comm.device, segs, stream)
    ws.release(stream)


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
    from .symmetric import launch
    from .vcollectives import copy, offsets
    me, n = comm.rank, comm.size
    ws = workspace(comm)
    total = sum(counts) * itemsize
    local, slots = ws.acquire(total, stream)
    copy(local, send_ptr, total, stream)
    ws.barrier(stream)
    count = counts[me]
    if count:
        off = offsets(counts)[me] * itemsize
        table = np.zeros(1, _SOURCE_TABLE)
        table["src"][0, :n] = [s + off for s in slots]
        per_thread = 16 // itemsize
        blocks = max(1, min(_resident_sum_blocks(comm.device), -(-count // (per_thread * _SUM_THREADS))))
        launch(comm.device, SUM_KERNELS[dtype], (blocks,), (_SUM_THREADS,),
               (np.uint64(recv_ptr), table, np.int32(n), np.int64(count), np.float32(1.0)), stream)
    ws.release(stream)


@functools.lru_cache(maxsize=None)
def _resident_sum_blocks(device: int) -> int:
    rt = _rt()
    return 8 * rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, device)


# -- FP4 -------------------------------------------------------------------------------------------------

def fp4_gather_dequantize(codec, info, K: int, fmt: str, shared: bool, rows: Sequence[int], oinfo) -> None:
    """Quantize into this rank's slot; barrier; decode every rank's slot (over NVLink) into out."""
    from .formats.tensor import packed_layout
    from .vcollectives import offsets
    comm, stream = codec.comm, codec.stream
    lays = [packed_layout(r, K, fmt) for r in rows]
    ws = workspace(comm)
    codec.reserve_nccl_gather(K, fmt, rows, oinfo)
    local, slots = ws.acquire(max(lay.total_bytes for lay in lays), stream)
    me = comm.rank
    amax = codec.amax(info, fmt, shared)  # after acquire: ordered after the previous call, whatever its stream
    codec.quantize(info, K, fmt, amax, [(0, rows[me], local, lays[me])])
    ws.barrier(stream)
    out_rows = offsets(rows)
    codec.dequantize([(out_rows[r], rows[r], slots[r], lays[r]) for r in range(comm.size)], K, fmt, oinfo)
    ws.release(stream)


def fp4_gather_raw(codec, rows: Sequence[int], K: int, fmt: str, fill_slot, dptr: int, sptr: int, gptr: int) -> None:
    """Gather packed FP4 segments into separate data / scales / global-scale arrays: `fill_slot(addr,
    layout)` writes this rank's segment; after the barrier one copy kernel pulls every rank's parts."""
    from .formats.tensor import BLOCK_SIZE, packed_layout
    from .vcollectives import copy_segments
    comm, stream = codec.comm, codec.stream
    bs = BLOCK_SIZE[fmt]
    lays = [packed_layout(r, K, fmt) for r in rows]
    ws = workspace(comm)
    local, slots = ws.acquire(max(lay.total_bytes for lay in lays), stream)
    fill_slot(local, lays[comm.rank])
    ws.barrier(stream)
    segs, a = [], 0
    for r, (n, lay) in enumerate(zip(rows, lays)):
        segs.append((dptr + a * K // 2, slots[r], n * K // 2))
        segs.append((sptr + a * K // bs, slots[r] + lay.scale_off, n * K // bs))
        if gptr:
            segs.append((gptr + 4 * r, slots[r] + lay.gs_off, 4))
        a += n
    copy_segments(comm.device, segs, stream)
    ws.release(stream)


# Input size from which the reduce-scatter runs in two stages (env FP4CCL_FP4_RS_STAGES overrides).
RS_TWO_STAGES_FROM_BYTES = 64 << 20


def rs_stages(nbytes: int) -> int:
    raw = os.environ.get("FP4CCL_FP4_RS_STAGES", "").strip()
    if raw:
        if raw not in ("1", "2", "3", "4"):
            raise ValueError(f"FP4CCL_FP4_RS_STAGES={raw!r} must be 1, 2, 3 or 4")
        return int(raw)
    return 2 if nbytes >= RS_TWO_STAGES_FROM_BYTES else 1


def _split(n: int, parts: int) -> List[int]:
    q, r = divmod(n, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def fp4_reduce_scatter(codec, info, K: int, fmt: str, rows: Sequence[int], oinfo, rounding: str, seed: int, mix) -> None:
    """Quantize the chunk for each peer (its own amax) into this rank's slot; barrier; decode and sum,
    in rank order, the chunk every rank made for this one, straight from their slots.

    In S stages (rs_stages): every chunk's amax first, then stage s quantizes the s-th row range of
    every chunk, barriers, and decodes-and-sums it on a side stream while the caller's stream
    quantizes stage s+1: the NVLink-bound pull overlaps the HBM-bound quantize. The random bits of
    stochastic rounding depend on the element's index only, so stages change no result.
    """
    from .formats import kernels
    from .formats.tensor import BLOCK_SIZE, packed_layout
    from .vcollectives import offsets
    comm, stream = codec.comm, codec.stream
    n, me = comm.size, comm.rank
    stages = rs_stages(info.nbytes)
    parts = [_split(r, stages) for r in rows]                          # parts[peer][stage]
    starts = [offsets(p) for p in parts]
    lays = [[packed_layout(c, K, fmt) for c in p] for p in parts]
    region = offsets([lay.total_bytes for p in lays for lay in p])     # (peer, stage) flattened
    row_offs = offsets(rows)
    ws = workspace(comm)
    codec.reserve_nccl_reduce_scatter(K, fmt, rows)
    local, slots = ws.acquire(sum(lay.total_bytes for p in lays for lay in p), stream)
    # The chunk for the next peer first: with a skewed start, the first chunks the peers wait on are ready soonest.
    order = [(me + i) % n for i in range(1, n + 1)]
    amax = {p: codec.amax_rows(info, K, fmt, row_offs[p], rows[p]) for p in order}
    side = codec._side() if stages > 1 else None
    bs = BLOCK_SIZE[fmt]
    for st in range(stages):
        for p in order:
            codec.quantize(info, K, fmt, amax[p], [(row_offs[p] + starts[p][st], parts[p][st],
                                                    local + region[p * stages + st], lays[p][st])],
                           rounding=rounding, seed=mix(seed, me, p))
        ws.barrier(stream)
        count = parts[me][st]
        if not count:
            continue
        lay, off = lays[me][st], region[me * stages + st]
        contributions = [(s + off, s + off + lay.scale_off, s + off + lay.gs_off if fmt == "nvfp4" else 0)
                         for s in slots]
        out_ptr = oinfo.ptr + starts[me][st] * K * oinfo.itemsize
        target = stream
        if side is not None:
            target = side.ptr
            side.order(target, stream)  # after this stage's barrier
        kernels.dequantize_sum(comm.device, out_ptr, oinfo.dtype, K, fmt, count * K // bs, contributions, target)
    if side is not None:
        side.order(stream, side.ptr)  # join: the caller's stream sees every summed row
    ws.release(stream)
