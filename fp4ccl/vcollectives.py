"""Variable-size all_gatherv / reduce_scatterv over NCCL, which has neither.

Four ways to move rows that differ in number per rank, picked per call:
- "native": sizes are equal, so plain ncclAllGather / ncclReduceScatter does it;
- "padded": pad every part to the largest, run the native op in a cached workspace, then compact
  (one extra pass over the bytes on each side, but NCCL's ring/tree algorithms at full speed);
- "bcast" / "reduce": one ncclBroadcast (or ncclReduce) per rank inside one group, the known way
  (vLLM, SGLang); no padding, but slower than the native op at mid sizes;
- "p2p" (gather only): grouped send/recv to every peer.
The reference table in docs/VCOLLECTIVES.md shows the grouped form 1.3-1.8x slower than the native op
between 1 and 64 MiB and slightly faster from 256 MiB, so "padded" wins below that unless padding
more than doubles the bytes. FP4CCL_ALGO forces one; FP4CCL_DEBUG=INFO logs each choice.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Sequence

from ._arrays import ArrayInfo
from ._log import get_logger

log = get_logger("fp4ccl.vcollectives")

GATHER_ALGOS = ("native", "padded", "bcast", "p2p")
SCATTER_ALGOS = ("native", "padded", "reduce")
# Above this many bytes the grouped form matches or beats the padded native op (see module doc).
GROUPED_FROM_BYTES = 128 << 20
MAX_PADDING_RATIO = 2.0
_D2D = 3  # cudaMemcpyDeviceToDevice


def part(info: ArrayInfo, offset: int, count: int) -> ArrayInfo:
    """A flat view of `count` elements of `info` starting at element `offset`."""
    return dataclasses.replace(info, ptr=info.ptr + offset * info.itemsize, shape=(count,), contiguous=True)


def choose(kind: str, counts: Sequence[int], itemsize: int, in_group: bool = False) -> str:
    """The algorithm for one call: FP4CCL_ALGO if set (and valid for `kind`), else by size and padding.

    Inside an open NCCL group the NCCL calls run only at the group's end, after any copy enqueued
    around them, so only the algorithms made of NCCL calls alone are allowed there.
    """
    allowed = GATHER_ALGOS if kind == "all_gatherv" else SCATTER_ALGOS
    grouped = "bcast" if kind == "all_gatherv" else "reduce"
    forced = os.environ.get("FP4CCL_ALGO", "").strip().lower()
    if in_group:
        return "native" if len(set(counts)) == 1 else grouped
    if forced:
        if forced not in allowed:
            raise ValueError(f"FP4CCL_ALGO={forced!r} is not valid for {kind}; choose one of {', '.join(allowed)}")
        if forced == "native" and len(set(counts)) > 1:
            raise ValueError(f"FP4CCL_ALGO=native needs equal sizes, got {list(counts)}")
        return forced
    if len(set(counts)) == 1:
        return "native"
    total = sum(counts) * itemsize
    padded = max(counts) * len(counts) * itemsize
    if total >= GROUPED_FROM_BYTES or padded > MAX_PADDING_RATIO * total:
        return grouped
    return "padded"


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
        import cupy
        cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, _D2D, stream)


class NcclVariable:
    """all_gatherv / reduce_scatterv built from an NCCL backend's primitives."""

    def __init__(self, backend, rank: int, size: int):
        self.backend = backend
        self.rank = rank
        self.size = size
        self.workspace = Workspace(backend.device)

    def close(self) -> None:
        self.workspace.close()

    def _in_group(self) -> bool:
        return getattr(self.backend, "_depth", 0) > 0

    def all_gatherv(self, send: ArrayInfo, recv: ArrayInfo, counts: List[int], stream: int) -> None:
        algo = choose("all_gatherv", counts, send.itemsize, self._in_group())
        log.info("all_gatherv counts=%s dtype=%s -> %s", counts, send.dtype, algo)
        offsets = _offsets(counts)
        be = self.backend
        if algo == "native":
            be.all_gather(send, recv, stream)
        elif algo == "padded":
            width = max(counts)
            isz = send.itemsize
            base = self.workspace.get(width * self.size * isz)
            tmp = dataclasses.replace(recv, ptr=base, shape=(width * self.size,))
            mine = part(tmp, self.rank * width, width)
            copy(mine.ptr, send.ptr, send.nbytes, stream)
            be.all_gather(mine, tmp, stream)  # in place: sendbuff is rank's slot of recvbuff
            for r, (off, n) in enumerate(zip(offsets, counts)):
                copy(recv.ptr + off * isz, base + r * width * isz, n * isz, stream)
        elif algo == "bcast":
            with _group(be):
                for r, (off, n) in enumerate(zip(offsets, counts)):
                    if n:
                        be.broadcast(send if r == self.rank else None, part(recv, off, n), r, stream)
        else:  # p2p
            with _group(be):
                for r, (off, n) in enumerate(zip(offsets, counts)):
                    if r == self.rank:
                        continue
                    if counts[self.rank]:
                        be.send(send, r, stream)
                    if n:
                        be.recv(part(recv, off, n), r, stream)
            copy(recv.ptr + offsets[self.rank] * send.itemsize, send.ptr, send.nbytes, stream)

    def reduce_scatterv(self, send: ArrayInfo, recv: ArrayInfo, counts: List[int], op: str, stream: int) -> None:
        algo = choose("reduce_scatterv", counts, send.itemsize, self._in_group())
        log.info("reduce_scatterv counts=%s dtype=%s op=%s -> %s", counts, send.dtype, op, algo)
        offsets = _offsets(counts)
        be = self.backend
        if algo == "native":
            be.reduce_scatter(send, recv, op, stream)
        elif algo == "padded":
            width = max(counts)
            isz = send.itemsize
            base = self.workspace.get((width * self.size + width) * isz)
            tmp = dataclasses.replace(send, ptr=base, shape=(width * self.size,))
            for r, (off, n) in enumerate(zip(offsets, counts)):
                copy(base + r * width * isz, send.ptr + off * isz, n * isz, stream)
            result = part(tmp, width * self.size, width)
            be.reduce_scatter(tmp, result, op, stream)
            copy(recv.ptr, result.ptr, recv.nbytes, stream)
        else:  # grouped reduce
            with _group(be):
                for r, (off, n) in enumerate(zip(offsets, counts)):
                    if n:
                        be.reduce(part(send, off, n), recv if r == self.rank else None, op, r, stream)


def _offsets(counts: Sequence[int]) -> List[int]:
    out, acc = [], 0
    for n in counts:
        out.append(acc)
        acc += n
    return out


class _group:
    """A backend group as a context manager (the backend's start/end nest)."""

    def __init__(self, backend):
        self.backend = backend

    def __enter__(self):
        self.backend.group_start()

    def __exit__(self, *exc):
        self.backend.group_end()
