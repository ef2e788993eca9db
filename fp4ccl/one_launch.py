"""The one-launch FP4 collectives for decode-time sizes, NVFP4 and MXFP4: the gather and the
reduce-scatter (csrc/fp4.cu, gather_ll_body and reduce_scatter_ll_body).

An FP4 all_gatherv with dequantize=True of at most MAX_ELEMENTS elements per rank is one kernel: it
quantizes this rank's rows (NVFP4: with their own amax), stores them into its segment of every rank's
region of a symmetric buffer of its own, flags each share with an epoch kept on the device, waits for
every rank's flags and decodes all rows from local memory. No barrier, no NVLink read, one graph node: the
steps form (quantize, device barrier, decode over NVLink) costs three kernels' worth of latency where
the data is a few kilobytes. An FP4 reduce_scatterv whose chunks (the rows each rank owns) hold at most
MAX_ELEMENTS elements is the same exchange the other way: each chunk quantized as a tensor of its own
into its owner's region, then this rank's chunk from every rank decoded and summed in fp32 in rank order.
docs/VCOLLECTIVES.md has the protocol and the figures.

Both kernels alternate two halves of one buffer by the parity of a device-side epoch that they share,
so they need nothing from the host between calls: they also serve calls captured into the caller's
CUDA graph (once an eager call has made the buffer), where the other symmetric-memory forms step aside
for NCCL.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence, Tuple

from ._log import get_logger

log = get_logger("fp4ccl.one_launch")

FORMS = ("ll", "steps")
MAX_ELEMENTS = 1 << 17           # per rank (rows x K): what one segment holds
SCALE_OFF = MAX_ELEMENTS // 2    # a segment: the FP4 data (half a byte an element), then a scale byte per block
SEG_BYTES = SCALE_OFF + MAX_ELEMENTS // 16   # room for NVFP4's scales (MXFP4 has half as many)
_MAXCTAS, _MAXRANKS = 32, 8      # formats.kernels LL_MAXCTAS, LL_MAXRANKS (a CPU test checks)
_COUNTER_BYTES = 8 * _MAXCTAS
_FLAG_BYTES = 2 * 8 * _MAXRANKS * _MAXCTAS
_EXTRAS_KEY = "fp4ccl.one_launch"


def serves(comm, rows: Sequence[int], K: int, fmt: str) -> bool:
    """Whether a one-launch kernel can run a call whose per-rank row counts (gather: each rank's rows;
    reduce-scatter: each rank's chunk) are `rows`: NVFP4 or MXFP4, at most MAX_ELEMENTS elements per
    rank, at most 8 ranks, every rank's GPU sm_90+. Decided from what every rank agrees on."""
    from .formats import kernels
    from .formats.tensor import FORMATS
    from .symmetric import min_arch
    return (fmt in FORMATS and max(rows) * K <= MAX_ELEMENTS and comm.size <= _MAXRANKS
            and min_arch(comm) >= kernels.SMALL_MIN_ARCH)


def form(comm, rows: Sequence[int], K: int, fmt: str, shared: bool) -> str:
    """How the symmetric-memory FP4 gather with dequantize=True runs: 'll' (one launch; serves(), and
    for NVFP4 per-rank global scales) or 'steps'. FP4CCL_FP4_GATHER_FORM=ll|steps forces one; a forced 'll'
    that cannot serve the call runs 'steps' and says so at INFO."""
    forced = os.environ.get("FP4CCL_FP4_GATHER_FORM", "").strip().lower()
    if forced and forced not in FORMS:
        raise ValueError(f"FP4CCL_FP4_GATHER_FORM={forced!r} is not one of {', '.join(FORMS)}")
    if forced == "steps":
        return "steps"
    # (an MXFP4 block's scale is all its decode needs: "shared" changes nothing there)
    if (fmt == "mxfp4" or not shared) and serves(comm, rows, K, fmt):
        return "ll"
    if forced == "ll":
        log.info("FP4CCL_FP4_GATHER_FORM=ll serves MXFP4 gathers, and NVFP4 ones with per-rank global scales, "
                 "of at most %d elements per rank over at most %d ranks on sm_90+: this one runs as steps",
                 MAX_ELEMENTS, _MAXRANKS)
    return "steps"


def capturable(comm, stream: int, rows: Sequence[int], K: int, fmt: str, shared: bool) -> bool:
    """Whether a gather enqueued on `stream` while it is captured into a CUDA graph runs here rather than
    over NCCL: its form is 'll', FP4CCL_FP4_ALGO does not ask for NCCL, and an eager call of either
    one-launch collective has made the buffer (nothing can be allocated, collectively, inside a
    capture). The same on every rank."""
    return _buffer_made(comm) and form(comm, rows, K, fmt, shared) == "ll"


def rs_capturable(comm, stream: int, rows: Sequence[int], K: int, fmt: str) -> bool:
    """capturable() for the reduce-scatter: its form (symm_collectives.rs_form) is 'll'."""
    from .symm_collectives import rs_form
    return _buffer_made(comm) and rs_form(0, lambda: serves(comm, rows, K, fmt)) == "ll"


def _buffer_made(comm) -> bool:
    from .symm_collectives import forced_fp4_algo
    return comm._extras.get(_EXTRAS_KEY) is not None and forced_fp4_algo() != "nccl"


def _buffer(comm):
    """The one-launch collectives' symmetric buffer: this rank's epoch counters, both halves' flag
    words, then both halves' segments, one per rank. Made zeroed (collectively) at the first call of
    either collective: a flag word must never start out equal to an epoch."""
    buf = comm._extras.get(_EXTRAS_KEY)
    if buf is None:
        from .symmetric import SymmetricBuffer
        from .symm_collectives import workspace
        nbytes = _COUNTER_BYTES + _FLAG_BYTES + 2 * comm.size * SEG_BYTES
        buf = comm._extras[_EXTRAS_KEY] = SymmetricBuffer.allocate(comm, (nbytes,), "uint8", zeroed=True)
        workspace(comm).report_address()   # made now: a later call may be captured, where it cannot be
    return buf


@functools.lru_cache(maxsize=256)
def _plan(rows: Tuple[int, ...], K: int, fmt: str) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """FP4 blocks of each rank's rows, and the block where each rank's rows start (in the gather's
    output, in the reduce-scatter's input)."""
    from .formats.tensor import BLOCK_SIZE
    from .vcollectives import offsets
    bs = BLOCK_SIZE[fmt]
    return tuple(r * K // bs for r in rows), tuple(o * K // bs for o in offsets(rows))


def gather(codec, info, K: int, fmt: str, rows: Tuple[int, ...], oinfo) -> None:
    """form() 'll' (the caller checked): one kernel on codec.stream."""
    from .formats import kernels
    if oinfo.dtype != info.dtype:
        raise TypeError(f"the FP4 gather decodes into x's dtype {info.dtype}, not {oinfo.dtype}")
    comm = codec.comm
    units, first = _plan(rows, K, fmt)

    def launch(buf, stream):
        kernels.gather_ll(comm.device, fmt, info.ptr, info.dtype, info.size, oinfo.ptr, units, first,
                          *_addresses(comm, buf), comm.rank, _timeout_ns(), stream,
                          _check(comm, "fp4_gather_ll", rows, K, fmt))
    _run(codec, ("fp4_gather_ll", info.ptr, info.dtype, oinfo.ptr, rows, K, fmt), launch,
         lambda: codec.reserve_nccl_gather(K, fmt, rows, oinfo))


def reduce_scatter(codec, info, K: int, fmt: str, rows: Tuple[int, ...], oinfo, rounding: str,
                   seeds: tuple) -> None:
    """rs_form() 'll' (the caller checked): one kernel on codec.stream; seeds[q]: the stochastic
    rounding seed of the chunk for rank q (ignored when rounding to nearest)."""
    from .formats import kernels
    if oinfo.dtype != info.dtype:
        raise TypeError(f"the FP4 reduce-scatter sums into x's dtype {info.dtype}, not {oinfo.dtype}")
    comm = codec.comm
    units, first = _plan(rows, K, fmt)
    seeds = tuple(seeds) if rounding == "stochastic" else (0,) * len(rows)

    def launch(buf, stream):
        kernels.reduce_scatter_ll(comm.device, fmt, info.ptr, info.dtype, oinfo.ptr, units, first,
                                  *_addresses(comm, buf), comm.rank, rounding, seeds, _timeout_ns(), stream,
                                  _check(comm, "fp4_reduce_scatter_ll", rows, K, fmt))
    _run(codec, ("fp4_reduce_scatter_ll", info.ptr, info.dtype, oinfo.ptr, rows, K, fmt, rounding, seeds), launch,
         lambda: codec.reserve_nccl_reduce_scatter(K, fmt, rows))


def _run(codec, key: tuple, launch, prepare) -> None:
    """A call being captured is launched into the caller's graph as is; eager calls go through the
    symmetric workspace's run(), which orders calls on different streams and replays repeated calls
    from graphs (symm_repeat), and `prepare` sizes the NCCL path's workspace for later captures."""
    from . import symm_collectives
    comm = codec.comm
    if symm_collectives.capturing(codec.stream):
        launch(comm._extras[_EXTRAS_KEY], codec.stream)
        return
    buf = _buffer(comm)
    symm_collectives.workspace(comm).run(0, codec.stream, key, lambda s, local, slots: launch(buf, s), prepare=prepare)


def _check(comm, name: str, rows: Tuple[int, ...], K: int, fmt: str) -> Tuple[int, int]:
    """The kernels' (signature, report address): ranks whose flags carry another signature are in
    different calls (symm_collectives.Workspace.check; the next call raises CallMismatchError)."""
    from .symm_collectives import agreed, workspace
    return workspace(comm).check(agreed(name, sizes=rows, K=K, format=fmt))


def _addresses(comm, buf) -> tuple:
    """regions, flags, counters, seg_stride, scale_off: the kernels' view of the buffer."""
    peers = [buf.ptr(r) for r in range(comm.size)]
    return ([p + _COUNTER_BYTES + _FLAG_BYTES for p in peers], [p + _COUNTER_BYTES for p in peers], buf.ptr(),
            SEG_BYTES, SCALE_OFF)


def _timeout_ns() -> int:
    from .symmetric import barrier_timeout_ns
    return barrier_timeout_ns()
