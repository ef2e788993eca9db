"""Variable-size all_gatherv / reduce_scatterv over NCCL, which has neither.

Four ways to move rows that differ in number per rank, picked per call by `choose`:
- "native": sizes are equal, so plain ncclAllGather / ncclReduceScatter does it;
- "padded": pad every part to the largest, run the native op in a cached workspace, and move the
  parts between their padded slots and the user's buffer with one launch of the segmented-copy
  kernel (csrc/vcopy.cu): NCCL's ring at full speed, but `size * max` rows on the wire and one
  extra pass over the bytes;
- "bcast" / "reduce": one ncclBroadcast (or ncclReduce) per rank inside one group, the known way
  (vLLM, SGLang): NCCL calls only, no copy, no padding, but slower than the native op per byte at
  mid sizes;
- "p2p" (gather only): grouped send/recv to every peer;
- "symm" (ranks of one node): copy the rows into a symmetric workspace, one device-side barrier, and
  one kernel pulling every peer's rows over NVLink (gather), or summing this rank's rows of every
  peer's input in fp32 (reduce-scatter of floats; fp4ccl/symm_collectives.py): no NCCL kernel at
  all, so the latency of a few small launches;
- "ce" (ranks of one node, larger calls): the same workspace, with the copy engines moving the bytes
  (the gather pulls the peers' rows into the output, the reduce-scatter pushes each peer's rows into
  its slot and sums them there), so no SM is spent on the wire.
docs/VCOLLECTIVES.md gives the estimates behind the size thresholds below. FP4CCL_ALGO forces one;
FP4CCL_DEBUG=INFO logs each choice.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Dict, List, Sequence, Tuple

from ._arrays import ArrayInfo
from ._cuda import runtime as _rt
from .formats.kernels import VCOPY_MAXSEG  # segments per vcopy launch (csrc/vcopy.cu)
from ._log import get_logger

log = get_logger("fp4ccl.vcollectives")
_INFO = logging.INFO

GATHER_ALGOS = ("native", "padded", "bcast", "p2p", "symm", "ce")
SCATTER_ALGOS = ("native", "padded", "reduce", "symm", "ce")
SYMM_ALGOS = ("symm", "ce")  # the algorithms that need symmetric memory

# choose(), fitted to the per-algorithm sweeps of bench/RESULTS.md (run 4: 4 x H200, ranks alternating
# 1.25x / 0.75x of the mean; totals are all ranks' bytes together):
# - all_gatherv: the grouped broadcast below BCAST_BELOW_BYTES (42-46 us up to 2 MiB, against 65-100
#   for padded and 49-62 for p2p) and from BCAST_FROM_BYTES (1320 us at 512 MiB, p2p 1648, padded
#   1871); p2p in between (62 us at 8 MiB and 128 at 32 MiB, against 73/149 padded and 81/193
#   bcast). Padded wins only where padding adds almost nothing: within NEAR_EVEN_RATIO of the bytes.
# - reduce_scatterv: the grouped reduce everywhere (41-45 us up to 2 MiB, 396 at 128 MiB, 1312 at
#   512 MiB, padded 67-1929) except between REDUCE_BELOW_BYTES and REDUCE_FROM_BYTES with at most
#   MAX_PADDING_RATIO padding, where padded measured ahead (154 against 161 us at 32 MiB).
BCAST_BELOW_BYTES = 4 << 20
BCAST_FROM_BYTES = 64 << 20
NEAR_EVEN_RATIO = 1.05
REDUCE_BELOW_BYTES = 16 << 20
REDUCE_FROM_BYTES = 64 << 20
MAX_PADDING_RATIO = 1.25
# Uneven totals below these go to "symm" where symmetric memory can serve the call (run 6 of
# bench/RESULTS.md: gather 32-41 us up to 2 MiB against 37-63 for bcast; reduce-scatter 28-29 us up
# to 2 MiB against 37-39 for reduce; run 30: 31 us at 4 MiB against 44 for "ce", but 77 at 16 MiB
# against 69-75).
SYMM_GATHER_BELOW_BYTES = 4 << 20
SYMM_SCATTER_BELOW_BYTES = 16 << 20
# From those up to these, "ce" (run 30, in % of NCCL's even op: gather 0.95-0.97 at 4-16 MiB and
# 0.92-0.94 at 64 MiB against 0.84-0.92 and 0.70 for p2p / bcast, but 0.89 at 256 MiB against 0.91
# for bcast; reduce-scatter 0.95-0.96 at 64 MiB against 0.81 for reduce, 0.92 at 256 MiB against 0.95).
CE_GATHER_BELOW_BYTES = 256 << 20
CE_SCATTER_BELOW_BYTES = 256 << 20

# The segmented-copy kernel (csrc/vcopy.cu): these mirror its #defines.
VCOPY_SOURCE = "vcopy.cu"
VCOPY_KERNEL = "vcopy_segments"
VCOPY_THREADS = 256
VCOPY_UNROLL = 4
_VCOPY_BLOCK_BYTES = VCOPY_THREADS * 16 * VCOPY_UNROLL  # what one block moves per grid-stride step
_VCOPY_BLOCKS_PER_SM = 8                                # 2048 resident threads per SM on sm_80..sm_100

_D2D = 3  # cudaMemcpyDeviceToDevice


def part(info: ArrayInfo, offset: int, count: int) -> ArrayInfo:
    """A flat view of `count` elements of `info` starting at element `offset`."""
    return ArrayInfo(info.obj, info.framework, info.ptr + offset * info.itemsize, (count,), info.dtype,
                     info.device, True)


def forced_algo() -> str:
    """FP4CCL_ALGO, normalized ('' when unset); read per call: tests and users change it between calls."""
    return os.environ.get("FP4CCL_ALGO", "").strip().lower()


def _symm_algo(kind: str, total: int) -> str:
    """The symmetric-memory algorithm for an uneven call of `total` bytes, or "" for none."""
    gather = kind == "all_gatherv"
    if total < (SYMM_GATHER_BELOW_BYTES if gather else SYMM_SCATTER_BELOW_BYTES):
        return "symm"
    if total < (CE_GATHER_BELOW_BYTES if gather else CE_SCATTER_BELOW_BYTES):
        return "ce"
    return ""


def symm_candidate(kind: str, counts: Sequence[int], itemsize: int) -> bool:
    """Whether choose() would take "symm" or "ce" for this call where symmetric memory is usable (so
    the caller checks usability, a collective step the first time, only when it matters)."""
    forced = forced_algo()
    if forced:
        return forced in SYMM_ALGOS
    return counts.count(counts[0]) != len(counts) and bool(_symm_algo(kind, sum(counts) * itemsize))


def choose(kind: str, counts: Sequence[int], itemsize: int, in_group: bool = False, symm_ok: bool = False) -> str:
    """The algorithm for one call: FP4CCL_ALGO if set (and valid for `kind`), else by size and padding.

    Inside an open NCCL group the NCCL calls run only at the group's end, after any copy enqueued
    around them, so only the algorithms made of NCCL calls alone are allowed there. `symm_ok`: the
    communicator's ranks share a node and the stream is not being captured; a forced "symm" that
    cannot run (as a forced "ce") falls back to the automatic choice.
    """
    gather = kind == "all_gatherv"
    even = counts.count(counts[0]) == len(counts)
    if in_group:
        return "native" if even else ("bcast" if gather else "reduce")
    forced = forced_algo()
    if forced:
        allowed = GATHER_ALGOS if gather else SCATTER_ALGOS
        if forced not in allowed:
            raise ValueError(f"FP4CCL_ALGO={forced!r} is not valid for {kind}; choose one of {', '.join(allowed)}")
        if forced == "native" and not even:
            raise ValueError(f"FP4CCL_ALGO=native needs equal sizes, got {list(counts)}")
        if forced not in SYMM_ALGOS or symm_ok:
            return forced
        log.info("FP4CCL_ALGO=%s, but symmetric memory cannot serve this call: choosing by size", forced)
    if even:
        return "native"
    total = sum(counts) * itemsize
    symm_algo = _symm_algo(kind, total) if symm_ok else ""
    if symm_algo:
        return symm_algo
    padding = max(counts) * len(counts) * itemsize / total
    if gather:
        if total < BCAST_BELOW_BYTES or total >= BCAST_FROM_BYTES:
            return "bcast"
        return "padded" if padding <= NEAR_EVEN_RATIO else "p2p"
    if REDUCE_BELOW_BYTES <= total < REDUCE_FROM_BYTES and padding <= MAX_PADDING_RATIO:
        return "padded"
    return "reduce"


class Workspace:
    """One device buffer per communicator, grown on demand and reused by every call."""

    def __init__(self, device: int):
        self.device = device
        self._mem = None
        self.nbytes = 0

    def get(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            import cupy
            with cupy.cuda.Device(self.device):
                if self._mem is not None:
                    # Work enqueued on other streams may still read the old buffer.
                    cupy.cuda.runtime.deviceSynchronize()
                self._mem = None
                grown = max(nbytes, self.nbytes * 3 // 2)
                self._mem = cupy.cuda.alloc(grown)
                self.nbytes = grown
        return int(self._mem.ptr) if self._mem is not None else 0

    def close(self) -> None:
        self._mem = None
        self.nbytes = 0




def copy(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Device-to-device copy on `stream` (skipped when empty)."""
    if nbytes:
        _rt().memcpyAsync(dst, src, nbytes, _D2D, stream)


# -- the segmented copy -------------------------------------------------------------------------------

_vcopy_lock = threading.Lock()
_vcopy: Dict[int, object] = {}  # device -> (function, max blocks) or None when the kernel is unusable


def _vcopy_kernel(device: int):
    """(function, max resident blocks) of the segmented-copy kernel on `device`; None, logged once,
    when it cannot be compiled or loaded (the caller then copies segment by segment)."""
    try:
        return _vcopy[device]
    except KeyError:
        pass
    with _vcopy_lock:
        if device in _vcopy:
            return _vcopy[device]
        try:
            from . import jit
            fn = jit.load_module(VCOPY_SOURCE, device).get_function(VCOPY_KERNEL)
            rt = _rt()
            sms = rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, device)
            entry = (fn, max(1, sms * _VCOPY_BLOCKS_PER_SM))
        except Exception as err:  # noqa: BLE001 - any failure means "use the memcpy loop"
            log.info("segmented-copy kernel %s unavailable on cuda:%d (%s: %s); the padded v-collectives "
                     "copy with one cudaMemcpyAsync per rank instead", VCOPY_SOURCE, device,
                     type(err).__name__, err)
            entry = None
        _vcopy[device] = entry
        return entry


def launch_vcopy(device: int, segments: Sequence[Tuple[int, int, int]], stream: int) -> bool:
    """Launch csrc/vcopy.cu over `segments` ((dst, src, nbytes) each, zero lengths allowed), in as
    many launches as VCOPY_MAXSEG requires; False (nothing enqueued) when the kernel is unavailable."""
    kernel = _vcopy_kernel(device)
    if kernel is None:
        return False
    fn, max_blocks = kernel
    from .formats import kernels
    # the ctypes launcher (a CuPy call with a numpy table cost ~10 us of host time); its table is the
    # three fields back to back, VCOPY_MAXSEG each; entries past n keep stale values the kernel never reads
    la = kernels.launcher(device, VCOPY_KERNEL, "vcopy", lambda: fn, VCOPY_THREADS)
    flat = la.table
    for i in range(0, len(segments), VCOPY_MAXSEG):
        chunk = segments[i:i + VCOPY_MAXSEG]
        n = len(chunk)
        dsts, srcs, sizes = zip(*chunk)
        flat[0:n] = srcs
        flat[VCOPY_MAXSEG:VCOPY_MAXSEG + n] = dsts
        flat[2 * VCOPY_MAXSEG:2 * VCOPY_MAXSEG + n] = sizes
        most = max(sizes)
        gx = max(1, min(-(-most // _VCOPY_BLOCK_BYTES), max_blocks // n))
        la(device, gx, n, stream)
    return True


def copy_segments(device: int, segments: Sequence[Tuple[int, int, int]], stream: int) -> None:
    """Enqueue every (dst, src, nbytes) copy on `stream`: one kernel launch for all of them, or one
    cudaMemcpyAsync when there is only one (a cheaper host call), or per segment as the fallback."""
    segs = [s for s in segments if s[2]]
    if not segs:
        return
    if len(segs) > 1 and launch_vcopy(device, segs, stream):
        return
    for dst, src, nbytes in segs:
        copy(dst, src, nbytes, stream)


# -- the algorithms -----------------------------------------------------------------------------------

class NcclVariable:
    """all_gatherv / reduce_scatterv built from an NCCL backend's primitives."""

    def __init__(self, backend, rank: int, size: int, comm=None):
        self.backend = backend
        self.comm = comm  # for the symmetric-memory algorithm (None: NCCL algorithms only)
        self.rank = rank
        self.size = size
        self.workspace = Workspace(backend.device)

    def close(self) -> None:
        self.workspace.close()

    def all_gatherv(self, send: ArrayInfo, recv: ArrayInfo, counts: List[int], stream: int) -> None:
        be = self.backend
        in_group = getattr(be, "_depth", 0) > 0
        symm_ok = False
        if self.comm is not None and not in_group and symm_candidate("all_gatherv", counts, send.itemsize):
            from . import symm_collectives
            symm_ok = symm_collectives.usable(self.comm, stream)
        algo = choose("all_gatherv", counts, send.itemsize, in_group, symm_ok)
        if log.isEnabledFor(_INFO):
            log.info("all_gatherv counts=%s dtype=%s -> %s", counts, send.dtype, algo)
        if algo == "native":
            be.all_gather(send, recv, stream)
            return
        if algo in SYMM_ALGOS:
            from . import symm_collectives
            run = symm_collectives.all_gatherv if algo == "symm" else symm_collectives.all_gatherv_ce
            run(self.comm, send.ptr, recv.ptr, counts, send.itemsize, stream)
            return
        rank = self.rank
        if algo == "bcast":
            be.group_start()
            try:
                off = 0
                for r, n in enumerate(counts):
                    if n:
                        be.broadcast(send if r == rank else None, part(recv, off, n), r, stream)
                    off += n
            finally:
                be.group_end()
        elif algo == "padded":
            width = max(counts)
            isz = send.itemsize
            slot = width * isz
            base = self.workspace.get(slot * self.size)
            tmp = ArrayInfo(recv.obj, recv.framework, base, (width * self.size,), recv.dtype, recv.device, True)
            if counts[rank] == width:
                be.all_gather(send, tmp, stream)  # send fills a whole slot: out of place, no staging copy
            else:
                mine = part(tmp, rank * width, width)
                copy(mine.ptr, send.ptr, send.nbytes, stream)
                be.all_gather(mine, tmp, stream)  # in place: sendbuff is rank's slot of recvbuff
            segs, off = [], 0
            for r, n in enumerate(counts):
                segs.append((recv.ptr + off * isz, base + r * slot, n * isz))
                off += n
            copy_segments(self.workspace.device, segs, stream)
        else:  # p2p
            offs = offsets(counts)
            be.group_start()
            try:
                for r, (off, n) in enumerate(zip(offs, counts)):
                    if r == rank:
                        continue
                    if counts[rank]:
                        be.send(send, r, stream)
                    if n:
                        be.recv(part(recv, off, n), r, stream)
            finally:
                be.group_end()
            copy(recv.ptr + offs[rank] * send.itemsize, send.ptr, send.nbytes, stream)

    def reduce_scatterv(self, send: ArrayInfo, recv: ArrayInfo, counts: List[int], op: str, stream: int) -> None:
        be = self.backend
        in_group = getattr(be, "_depth", 0) > 0
        symm_ok = False
        if self.comm is not None and not in_group and symm_candidate("reduce_scatterv", counts, send.itemsize):
            from . import symm_collectives
            symm_ok = (symm_collectives.can_reduce_scatter(self.comm, send.dtype, op)
                       and symm_collectives.usable(self.comm, stream))
        algo = choose("reduce_scatterv", counts, send.itemsize, in_group, symm_ok)
        if log.isEnabledFor(_INFO):
            log.info("reduce_scatterv counts=%s dtype=%s op=%s -> %s", counts, send.dtype, op, algo)
        if algo == "native":
            be.reduce_scatter(send, recv, op, stream)
            return
        if algo in SYMM_ALGOS:
            from . import symm_collectives
            run = symm_collectives.reduce_scatterv if algo == "symm" else symm_collectives.reduce_scatterv_ce
            run(self.comm, send.ptr, recv.ptr, counts, send.dtype, send.itemsize, stream)
            return
        rank = self.rank
        if algo == "reduce":
            be.group_start()
            try:
                off = 0
                for r, n in enumerate(counts):
                    if n:
                        be.reduce(part(send, off, n), recv if r == rank else None, op, r, stream)
                    off += n
            finally:
                be.group_end()
            return
        # padded
        width = max(counts)
        isz = send.itemsize
        slot = width * isz
        direct = counts[rank] == width  # NCCL can write this rank's result straight into recv
        base = self.workspace.get(slot * self.size + (0 if direct else slot))
        tmp = ArrayInfo(send.obj, send.framework, base, (width * self.size,), send.dtype, send.device, True)
        segs, off = [], 0
        for r, n in enumerate(counts):
            segs.append((base + r * slot, send.ptr + off * isz, n * isz))
            off += n
        copy_segments(self.workspace.device, segs, stream)
        if direct:
            be.reduce_scatter(tmp, recv, op, stream)
        else:
            result = part(tmp, width * self.size, width)
            be.reduce_scatter(tmp, result, op, stream)
            copy(recv.ptr, result.ptr, recv.nbytes, stream)


def split_count(n: int, parts: int) -> List[int]:
    """n split into `parts` near-equal counts (larger ones first)."""
    q, r = divmod(n, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def offsets(counts: Sequence[int]) -> List[int]:
    """Where each part starts when parts of these lengths are laid end to end."""
    out, acc = [], 0
    for n in counts:
        out.append(acc)
        acc += n
    return out
