"""The one-launch NVFP4 gather for decode-time sizes (csrc/fp4.cu, gather_ll_body).

An FP4 all_gatherv with dequantize=True of at most MAX_ELEMENTS elements per rank is one kernel: it
quantizes this rank's rows with their own amax, stores them into its segment of every rank's region of
a symmetric buffer of its own, flags each share with an epoch kept on the device, waits for every
rank's flags and decodes all rows from local memory. No barrier, no NVLink read, one graph node: the
steps form (quantize, device barrier, decode over NVLink) costs three kernels' worth of latency where
the data is a few kilobytes. docs/VCOLLECTIVES.md has the protocol and the figures.

The kernel alternates two halves of its buffer by the parity of its device-side epoch, so it needs
nothing from the host between calls: it also serves calls captured into the caller's CUDA graph (once
an eager call has made its buffer), where the other symmetric-memory forms step aside for NCCL.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence, Tuple

from ._log import get_logger

log = get_logger("fp4ccl.ll_gather")

FORMS = ("ll", "steps")
MAX_ELEMENTS = 1 << 17           # per rank (rows x K): what one segment holds
_MAX_UNITS = MAX_ELEMENTS // 16  # NVFP4 blocks
SCALE_OFF = _MAX_UNITS * 8       # a segment: the FP4 data, then one scale byte per block
SEG_BYTES = SCALE_OFF + _MAX_UNITS
_MAXCTAS, _MAXRANKS = 32, 8      # formats.kernels LL_MAXCTAS, LL_MAXRANKS (a CPU test checks)
_COUNTER_BYTES = 8 * _MAXCTAS
_FLAG_BYTES = 2 * 8 * _MAXRANKS * _MAXCTAS
_EXTRAS_KEY = "fp4ccl.ll_gather"


def form(comm, rows: Sequence[int], K: int, fmt: str, shared: bool) -> str:
    """How the symmetric-memory FP4 gather with dequantize=True runs: 'll' (one launch; NVFP4 with
    per-rank global scales, at most MAX_ELEMENTS per rank and 8 ranks, sm_90+) or 'steps'.
    FP4CCL_FP4_GATHER_FORM=ll|steps forces one; a forced 'll' that cannot serve the call runs 'steps'
    and says so at INFO. Decided from what every rank agrees on (sizes, K, format, scale mode, world
    size); the GPUs of one node are assumed to be of one generation."""
    forced = os.environ.get("FP4CCL_FP4_GATHER_FORM", "").strip().lower()
    if forced and forced not in FORMS:
        raise ValueError(f"FP4CCL_FP4_GATHER_FORM={forced!r} is not one of {', '.join(FORMS)}")
    if forced == "steps":
        return "steps"
    from .formats import kernels
    if (fmt == "nvfp4" and not shared and max(rows) * K <= MAX_ELEMENTS and comm.size <= _MAXRANKS
            and kernels.has_quantize_small(comm.device)):
        return "ll"
    if forced == "ll":
        log.info("FP4CCL_FP4_GATHER_FORM=ll serves NVFP4 gathers with per-rank global scales of at most %d "
                 "elements per rank over at most %d ranks on sm_90+: this one runs as steps", MAX_ELEMENTS,
                 _MAXRANKS)
    return "steps"


def capturable(comm, stream: int, rows: Sequence[int], K: int, fmt: str, shared: bool) -> bool:
    """Whether a gather enqueued on `stream` while it is captured into a CUDA graph runs here rather than
    over NCCL: its form is 'll', FP4CCL_FP4_ALGO does not ask for NCCL, and an eager call has made the
    buffer (nothing can be allocated, collectively, inside a capture). The same on every rank."""
    from .symm_collectives import forced_fp4_algo
    if comm._extras.get(_EXTRAS_KEY) is None or forced_fp4_algo() == "nccl":
        return False
    return form(comm, rows, K, fmt, shared) == "ll"


def _buffer(comm):
    """The gather's symmetric buffer: this rank's epoch counters, both halves' flag words, then both
    halves' segments, one per rank. Made zeroed (collectively) at the first call: a flag word must never
    start out equal to an epoch."""
    buf = comm._extras.get(_EXTRAS_KEY)
    if buf is None:
        from .symmetric import SymmetricBuffer
        nbytes = _COUNTER_BYTES + _FLAG_BYTES + 2 * comm.size * SEG_BYTES
        buf = comm._extras[_EXTRAS_KEY] = SymmetricBuffer.allocate(comm, (nbytes,), "uint8", zeroed=True)
    return buf


@functools.lru_cache(maxsize=256)
def _plan(rows: Tuple[int, ...], K: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """FP4 blocks of each rank's rows, and the block of the output where each rank's start."""
    from .vcollectives import offsets
    return tuple(r * K // 16 for r in rows), tuple(o * K // 16 for o in offsets(rows))


def gather(codec, info, K: int, rows: Tuple[int, ...], oinfo) -> None:
    """form() 'll' (the caller checked): one kernel on codec.stream. Eager calls go through the
    symmetric workspace's run(), which orders calls on different streams and replays repeated calls
    from graphs (symm_repeat); a call being captured is launched into the caller's graph as is."""
    from . import symm_collectives
    if oinfo.dtype != info.dtype:
        raise TypeError(f"the FP4 gather decodes into x's dtype {info.dtype}, not {oinfo.dtype}")
    comm = codec.comm
    units, first = _plan(rows, K)
    if symm_collectives.capturing(codec.stream):
        _launch(comm, comm._extras[_EXTRAS_KEY], info, oinfo, units, first, codec.stream)
        return
    buf = _buffer(comm)
    key = ("fp4_gather_ll", info.ptr, info.dtype, oinfo.ptr, rows, K)
    symm_collectives.workspace(comm).run(
        0, codec.stream, key, lambda s, local, slots: _launch(comm, buf, info, oinfo, units, first, s),
        prepare=lambda: codec.reserve_nccl_gather(K, "nvfp4", rows, oinfo))


def _launch(comm, buf, info, oinfo, units, first, stream: int) -> None:
    from .formats import kernels
    from .symmetric import barrier_timeout_ns
    peers = [buf.ptr(r) for r in range(comm.size)]
    kernels.gather_ll_nvfp4(comm.device, info.ptr, info.dtype, info.size, oinfo.ptr, units, first,
                            [p + _COUNTER_BYTES + _FLAG_BYTES for p in peers], [p + _COUNTER_BYTES for p in peers],
                            buf.ptr(), SEG_BYTES, SCALE_OFF, comm.rank, barrier_timeout_ns(), stream)

