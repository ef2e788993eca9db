"""FP4 on the wire: all_gatherv and reduce_scatterv that move NVFP4/MXFP4 data plus block scales.

Every rank's contribution travels as one packed segment, [data | scales | global scale] (the layout
of `formats.packed_layout`, 16-byte aligned), so a gather is one variable-size byte gather and a
reduce-scatter one variable-size byte all-to-all. The wire adds no error: a gathered row decodes to
exactly what quantizing and dequantizing the sender's rows locally gives.

Host arrays go through the numpy reference codec, GPU arrays through the CUDA kernels, on the
caller's stream and without host syncs (so, with sizes given, capturable in a CUDA graph).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Tuple

import numpy as np

from . import _arrays, one_launch, symm_collectives
from ._arrays import ArrayInfo
from .formats.kernels import MAXSUM
from .vcollectives import offsets, split_count
from .communicator import check_consistency
from .formats.api import check_tensor, dequantize_gathered
from .formats.seeds import Seed, call_seed, derive
from .formats.tensor import (BLOCK_SIZE, FORMATS, INPUT_DTYPES, FP4Tensor, GatheredFP4Tensor, check_format, check_k,
                             packed_layout)

GLOBAL_SCALES = ("per_rank", "shared")
_AMAX_SLOTS = 64  # device amax slots in the workspace, used in turn
# fp32 values per slot: a MAX-reduced scalar, or the per-block partial maxima of kernels.amax_partials
# (one per block of its grid, which is capped to this)
_AMAX_SLOT_VALUES = 1024
_MAX_REDUCE_RANKS = MAXSUM  # contributions one fused dequantize_sum launch can take
_ALIGN = 256


# -- helpers -----------------------------------------------------------------------------------------

def _round_up(n: int, m: int = _ALIGN) -> int:
    return (n + m - 1) // m * m



def _gathered_arrays(result, like: ArrayInfo, shape, K: int, fmt: str, nranks: int):
    """(data, scales, per-rank global scales or None) of a gathered FP4 tensor: `result`'s (out=,
    checked by _check_gathered_out) or new ones like `like`, and their addresses."""
    if result is not None:
        data, scales, gs = result.data, result.scales, result.global_scale
    else:
        lead = tuple(shape[:-1])
        data = _arrays.empty(like, lead + (K // 2,), "uint8")
        scales = _arrays.empty(like, lead + (K // BLOCK_SIZE[fmt],), "uint8")
        gs = _arrays.empty(like, (nranks,), "float32") if fmt == "nvfp4" else None
    ptrs = (_arrays.describe(data).ptr, _arrays.describe(scales).ptr, _arrays.describe(gs).ptr if gs is not None else 0)
    return (data, scales, gs), ptrs


def _bytes_info(like: ArrayInfo, ptr: int, nbytes: int) -> ArrayInfo:
    """A flat uint8 view at `ptr` on like's device (for the byte-level v-collectives)."""
    return ArrayInfo(None, like.framework, ptr, (nbytes,), "uint8", like.device, True)


def _workspace(comm, nbytes: int) -> int:
    ws = comm._extras.get("fp4_workspace")
    if ws is None:
        from .vcollectives import Workspace
        ws = comm._extras["fp4_workspace"] = Workspace(comm.device)
    before = ws.nbytes
    ptr = ws.get(max(nbytes, 1))
    if ws.nbytes != before:
        # Graphs of earlier symmetric-memory calls hold addresses in the buffer just freed.
        symm_collectives.forget_graphs(comm)
    return ptr


def _check_rows(shape: tuple, what: str) -> None:
    """FP4 collectives move dim-0 rows of K-vectors: x, an array or an FP4Tensor, needs both dimensions."""
    if len(shape) < 2:
        raise ValueError(f"{what} needs x of shape [rows, ..., K], got {tuple(shape)}")


def _check_input(comm, x, compress: str, what: str) -> Tuple[ArrayInfo, int, int]:
    """(info, rows per dim-0 row, K) for an FP4 collective's input."""
    check_format(compress)
    info = comm._input(x)
    _check_rows(info.shape, f"{what} with compress={compress!r}")
    if info.dtype not in INPUT_DTYPES:
        raise TypeError(f"{what} with compress={compress!r}: x has dtype {info.dtype}; "
                        f"expected one of {', '.join(INPUT_DTYPES)}")
    K = info.shape[-1]
    check_k(K, compress)
    return info, math.prod(info.shape[1:-1]), K


def _codec(comm, info: ArrayInfo, stream, what: str, fmt: str, K: int, inner: int, sizes):
    """The codec for info's device, with the check that every rank passed the same format, K, rows per
    dim-0 row (`inner`) and sizes, as the plain collectives check theirs. The byte counts the transports
    compare cannot tell (1 and 2 NVFP4 rows of K=16 both pack to 48 bytes), and ranks that disagree
    would decode each other's bytes wrongly, without an error. On the host this record travels in front
    of each rank's bytes (no extra round trip); on the GPU nothing can be read back without a host
    sync, so only FP4CCL_CHECK=1 compares it, up front (a host round trip, as it does for the sizes)."""
    if info.device is None:
        return _HostCodec(comm, what, _agreement(fmt, K, inner, sizes))
    if check_consistency():
        mine = _agreement(fmt, K, inner, sizes)
        _check_agreed(what, comm.rank, [np.array(v, np.int64) for v in comm._gather_ints(mine.tolist(), what)])
    return _GpuCodec(comm, info, stream)


def _agreement(fmt: str, K: int, inner: int, sizes) -> np.ndarray:
    """What every rank of an FP4 collective must pass alike, as int64s: format, K, inner, sizes..."""
    return np.array([FORMATS.index(fmt), K, inner, *sizes], np.int64)


def _check_agreed(what: str, me: int, records) -> None:
    """A ValueError naming the first rank whose _agreement record differs from this rank's. Every rank
    gets every rank's record, so where ranks disagree every rank raises."""
    mine = records[me]
    for peer, theirs in enumerate(records):
        if np.array_equal(theirs, mine):
            continue
        (mf, mk, mi), (tf, tk, ti) = mine[:3].tolist(), theirs[:3].tolist()
        if (mf, mk, mi) != (tf, tk, ti):
            raise ValueError(f"{what}: rank {peer}'s rows are {ti} x K={tk} values in {FORMATS[tf]}, rank {me}'s "
                             f"{mi} x K={mk} in {FORMATS[mf]}; every rank must pass the same x.shape[1:] and format")
        # the plain collectives' words (backends/host.py)
        raise ValueError(f"{what}: rank {peer}'s sizes are {theirs[3:].tolist()}, rank {me}'s {mine[3:].tolist()}; "
                         f"every rank must pass the same sizes")


# -- all_gatherv ---------------------------------------------------------------------------------------

def all_gatherv(comm, x, sizes, *, out=None, stream=None, compress=None, global_scale=None, dequantize=None):
    """See Communicator.all_gatherv: gather rows as FP4 (collective).

    global_scale and dequantize: None where the caller gave none. For an array x the Communicator has
    resolved them to their defaults already; for an FP4Tensor x, None keeps the result FP4 and a
    global_scale other than "per_rank" (what its gather keeps) is refused."""
    if isinstance(x, FP4Tensor):
        _check_tensor_options(x, compress, global_scale)
        return _gather_fp4tensor(comm, x, sizes, stream, out, bool(dequantize))
    if compress not in FORMATS:
        raise ValueError(f"compress={compress!r} is not one of {', '.join(FORMATS)}")
    if global_scale not in GLOBAL_SCALES:
        raise ValueError(f"global_scale={global_scale!r} is not one of {', '.join(GLOBAL_SCALES)}")
    info, inner, K = _check_input(comm, x, compress, "all_gatherv")
    sizes = comm._sizes(sizes, info.shape[0], "all_gatherv")
    if sizes[comm.rank] != info.shape[0]:
        raise ValueError(f"all_gatherv: x has {info.shape[0]} rows but sizes[{comm.rank}]={sizes[comm.rank]}")
    rows = [s * inner for s in sizes]
    shape = (sum(sizes),) + info.shape[1:]
    row_offsets = tuple(offsets(sizes)) + (sum(sizes),)
    if dequantize:
        out, oinfo = comm._output(info, shape, out)
    elif out is not None:
        if global_scale == "shared" and compress == "nvfp4":
            raise ValueError("out= with dequantize=False takes per-rank global scales only, not global_scale='shared'")
        _check_gathered_out(comm, out, compress, shape, row_offsets, info.dtype)
    codec = _codec(comm, info, stream, f"all_gatherv with compress={compress!r}", compress, K, inner, sizes)
    shared = global_scale == "shared"
    if dequantize:
        codec.gather_dequantize(info, K, compress, shared, rows, oinfo)
        return out
    codec.result = out
    gathered = codec.gather_fp4(info, K, compress, shared, rows, shape, row_offsets)
    if out is not None:
        return out
    if shared and gathered.global_scale is not None:
        # every rank quantized with the same one: a 0-d array, as an FP4Tensor's (numpy's [0] is a scalar)
        gathered.global_scale = gathered.global_scale[0:1].reshape(())
    return gathered


def _check_gathered_out(comm, out, fmt: str, shape: tuple, row_offsets: tuple, dtype: str) -> None:
    """out= of a gather that returns FP4: a GatheredFP4Tensor exactly like the one it would return
    (an earlier result of the same call, say), on this rank's device, its arrays contiguous."""
    if not isinstance(out, GatheredFP4Tensor):
        raise TypeError(f"out= of an FP4 gather that returns FP4 (dequantize=False, or an FP4Tensor x) must be a "
                        f"GatheredFP4Tensor (an earlier result of the same gather), not {type(out).__name__}")
    want = (fmt, shape, row_offsets, "linear", dtype)
    got = (out.format, tuple(out.shape), tuple(out.row_offsets), out.scale_layout, out.dtype)
    if got != want:
        raise ValueError("out is not the FP4 tensor this gather returns: (format, shape, row_offsets, scale layout, "
                         f"dtype) are {got}, expected {want}")
    K = shape[-1]
    lead = shape[:-1]
    parts = [("out.data", out.data, lead + (K // 2,), "uint8"),
             ("out.scales", out.scales, lead + (K // BLOCK_SIZE[fmt],), "uint8")]
    if fmt == "nvfp4":
        parts.append(("out.global_scale", out.global_scale, (comm.size,), "float32"))
    for name, arr, pshape, pdtype in parts:
        info = comm._input(arr, name)
        _arrays.check_writeable(info, name)
        if info.shape != pshape or info.dtype != pdtype or not info.contiguous:
            raise ValueError(f"{name} is {info.dtype}{list(info.shape)}{'' if info.contiguous else ', not contiguous'};"
                             f" expected a contiguous {pdtype}{list(pshape)}")


def _check_tensor_options(q: FP4Tensor, compress, global_scale) -> None:
    """The options an FP4Tensor's gather cannot honour, refused from the arguments alone: every rank
    raises the same error before anything (the sizes exchange included) reaches the wire."""
    if compress is not None and compress != q.format:
        raise ValueError(f"all_gatherv: compress={compress!r} but x is already an {q.format} FP4Tensor")
    if global_scale not in (None, "per_rank"):   # "per_rank" is what its gather keeps: each rank's own
        raise ValueError(f"all_gatherv: global_scale={global_scale!r} does not apply to an FP4Tensor x: its global "
                         f"scale was fixed when it was quantized (for one scale across ranks, quantize with "
                         f"amax= the MAX all-reduce of fp4ccl.formats.amax(x))")


def _gather_fp4tensor(comm, q: FP4Tensor, sizes, stream, out, dequantize: bool):
    """q's rows from every rank, as they are (a GatheredFP4Tensor), or decoded to the dtype q was
    quantized from, in q's framework (`dequantize`: what q.dequantize() gives, row for row)."""
    if q.scale_layout != "linear":
        raise ValueError("all_gatherv of an FP4Tensor needs linear scales (swizzled padding cannot be concatenated)")
    if isinstance(q, GatheredFP4Tensor):
        raise ValueError("this FP4Tensor was already gathered; gather the original shards")
    what = f"all_gatherv of an {q.format} FP4Tensor"
    _check_rows(q.shape, what)   # the rule for an array x
    # q's arrays must fit its shape, as dequantize checks: the wire would otherwise carry rows it does
    # not have (zeros), or drop some it has, before any check could see it.
    check_tensor(q)
    info = comm._input(q.data, "q.data")
    K = q.K
    inner = math.prod(q.shape[1:-1])
    sizes = comm._sizes(sizes, q.shape[0], "all_gatherv")
    if sizes[comm.rank] != q.shape[0]:
        raise ValueError(f"all_gatherv: q has {q.shape[0]} rows but sizes[{comm.rank}]={sizes[comm.rank]}")
    rows = [s * inner for s in sizes]
    layouts = [packed_layout(r, K, q.format) for r in rows]
    counts = [lay.total_bytes for lay in layouts]
    shape = (sum(sizes),) + tuple(q.shape[1:])
    row_offsets = tuple(offsets(sizes)) + (sum(sizes),)
    if dequantize:
        # `like` gives out's framework, device and dtype; its shape is emptied so that the overlap check,
        # which would measure q.data's bytes in q.dtype's itemsize, passes (q's bytes are all sent before
        # the decode writes out, in stream order).
        out, _ = comm._output(dataclasses.replace(info, dtype=q.dtype, shape=(0,)), shape, out)
    elif out is not None:
        _check_gathered_out(comm, out, q.format, shape, row_offsets, q.dtype)
    codec = _codec(comm, info, stream, what, q.format, K, inner, sizes)
    codec.result = None if dequantize else out
    if info.device is not None and symm_collectives.fp4_algo(comm, codec.stream) == "symm":
        codec.reserve_nccl_gather(K, q.format, rows)
        gathered = codec.pull_gathered(rows, K, q.format, info, shape, row_offsets, q.dtype,
                                       lambda addr, lay: codec.pack_tensor(q, addr, lay), codec.tensor_key(q))
    else:
        send, recv = codec.buffers(counts[comm.rank], sum(counts))
        codec.pack_tensor(q, send, layouts[comm.rank])
        codec.gather(send, recv, counts)
        gathered = codec.unpack_gathered(recv, offsets(counts), layouts, rows, K, q.format, info, shape,
                                         row_offsets, dtype=q.dtype)
    if dequantize:
        # The gathered bytes are each rank's q unchanged, so this decodes to what every rank's
        # q.dequantize() gives; a step after the gather (an array's gather decodes on arrival instead).
        return dequantize_gathered(gathered, out=out, stream=stream)
    return gathered if out is None else out


# -- reduce_scatterv -----------------------------------------------------------------------------------

def reduce_scatterv(comm, x, sizes, op="sum", *, out=None, stream=None, compress=None, rounding="nearest", seed=None):
    """See Communicator.reduce_scatterv (which refuses an FP4Tensor x): one quantization per contribution,
    summed in fp32 (collective)."""
    if compress not in FORMATS:
        raise ValueError(f"compress={compress!r} is not one of {', '.join(FORMATS)}")
    if op != "sum":
        raise ValueError(f"reduce_scatterv with compress={compress!r} supports op='sum' only, got op={op!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding={rounding!r} is not one of 'nearest', 'stochastic'")
    info, inner, K = _check_input(comm, x, compress, "reduce_scatterv")
    seed = call_seed(rounding, seed, info)
    if sizes is None:
        raise TypeError("reduce_scatterv: sizes (rows per rank) is required")
    sizes = comm._sizes(sizes, 0, "reduce_scatterv")
    if sum(sizes) != info.shape[0]:
        raise ValueError(f"reduce_scatterv: x has {info.shape[0]} rows but sizes add up to {sum(sizes)}")
    if info.device is not None and comm.size > _MAX_REDUCE_RANKS:
        raise ValueError(f"reduce_scatterv with compress={compress!r} supports up to {_MAX_REDUCE_RANKS} ranks "
                         f"on the GPU (one fused decode-and-sum launch), this communicator has {comm.size}")
    out, oinfo = comm._output(info, (sizes[comm.rank],) + info.shape[1:], out)
    rows = [s * inner for s in sizes]
    codec = _codec(comm, info, stream, f"reduce_scatterv with compress={compress!r}", compress, K, inner, sizes)
    codec.reduce_scatter(info, K, compress, rows, oinfo, rounding, seed)
    return out


def buf_of(chunks) -> np.ndarray:
    """The one buffer that every chunk of a quantize call writes into."""
    bufs = {id(c[2]) for c in chunks}
    if len(bufs) != 1:
        raise ValueError("all chunks of one quantize call must share a buffer")
    return chunks[0][2]


def _mix(seed: Seed, rank: int, peer: int) -> Seed:
    """A distinct, replayable random stream for each (seed, sender, receiver); a device seed stays one,
    derived from the same word."""
    return derive(seed, 0x9E3779B97F4A7C15, rank * 0xBF58476D1CE4E5B9 + peer * 0x94D049BB133111EB + 1)


# -- codecs: the same steps on the host (numpy reference) and on the GPU (CUDA kernels) -------------------

class _HostCodec:
    """Numpy buffers and the reference codec; the host backend moves the bytes, each rank's behind its
    _agreement record, which the receivers compare with their own (see _codec)."""

    def __init__(self, comm, what: str, agreed: np.ndarray):
        self.comm = comm
        self.what = what
        self.record = agreed.view(np.uint8)
        self.result = None   # a GatheredFP4Tensor to gather into (out=) instead of new arrays

    def gather_dequantize(self, info, K, fmt, shared, rows, oinfo):
        send, recv, layouts, offs = self._gather_packed(info, K, fmt, shared, rows)
        row_offs = offsets(rows)
        self.dequantize(recv, [(row_offs[r], rows[r], offs[r], layouts[r]) for r in range(len(rows))], K, fmt, oinfo)

    def gather_fp4(self, info, K, fmt, shared, rows, shape, row_offsets):
        send, recv, layouts, offs = self._gather_packed(info, K, fmt, shared, rows)
        return self.unpack_gathered(recv, offs, layouts, rows, K, fmt, info, shape, row_offsets)

    def _gather_packed(self, info, K, fmt, shared, rows):
        me = self.comm.rank
        layouts = [packed_layout(r, K, fmt) for r in rows]
        counts = [lay.total_bytes for lay in layouts]
        send, recv = self.buffers(counts[me], sum(counts))
        amax = self.amax(info, fmt, shared)
        self.quantize(info, K, fmt, amax, [(0, rows[me], send, 0)], layouts[me])
        self.gather(send, recv, counts)
        return send, recv, layouts, offsets(counts)

    def reduce_scatter(self, info, K, fmt, rows, oinfo, rounding, seed):
        me, n = self.comm.rank, self.comm.size
        layouts = [packed_layout(r, K, fmt) for r in rows]
        send_counts = [lay.total_bytes for lay in layouts]
        mine = layouts[me]
        send, recv = self.buffers(sum(send_counts), mine.total_bytes * n)
        row_offs = offsets(rows)
        send_offs = offsets(send_counts)
        # Each chunk is a tensor of its own: its own amax, hence its own global scale.
        for peer in range(n):
            amax = self.amax_rows(info, K, fmt, row_offs[peer], rows[peer])
            self.quantize(info, K, fmt, amax, [(row_offs[peer], rows[peer], send, send_offs[peer])], layouts[peer],
                          rounding=rounding, seed=_mix(seed, me, peer))
        self.all_to_all(send, send_counts, recv, mine.total_bytes,
                        f"reduce_scatterv (compress={fmt!r}, K={K}: FP4 chunks whose sizes follow from sizes, K and "
                        f"the format)")
        self.sum_dequantized(recv, mine, rows[me], K, fmt, n, oinfo)

    def buffers(self, send_bytes: int, recv_bytes: int):
        return np.zeros(send_bytes, np.uint8), np.empty(recv_bytes, np.uint8)

    def amax(self, info: ArrayInfo, fmt: str, shared: bool):
        if fmt != "nvfp4":
            return None
        from .formats import reference
        value = reference.amax(_arrays.host_view(info).reshape(-1, info.shape[-1]))
        if shared:
            value = self.comm_all_reduce_max(value)
        return value

    def amax_rows(self, info, K, fmt, start, count):
        if fmt != "nvfp4":
            return None
        from .formats import reference
        return reference.amax(_arrays.host_view(info).reshape(-1, K)[start:start + count])

    def quantize(self, info, K, fmt, amax, chunks, layout, rounding="nearest", seed=None):
        from .formats import reference
        x2d = _arrays.host_view(info).reshape(-1, K)
        # Whole-tensor row offsets, so stochastic rounding draws the same bits as the GPU kernels.
        reference.quantize_packed(x2d, buf_of(chunks), [(start, count, off) for start, count, _, off in chunks], fmt,
                                  amax_value=amax, rounding=rounding, seed=seed)

    def pack_tensor(self, q: FP4Tensor, buf: np.ndarray, layout) -> None:
        data = np.ascontiguousarray(q.data).reshape(-1)
        scales = np.ascontiguousarray(q.scales).reshape(-1)
        buf[:data.size] = data
        buf[layout.scale_off:layout.scale_off + scales.size] = scales
        if q.format == "nvfp4":
            buf[layout.gs_off:layout.gs_off + 4] = np.asarray(q.global_scale, np.float32).reshape(1).view(np.uint8)

    def gather(self, send, recv, counts):
        n = self.record.size
        counts = [n + c for c in counts]
        staged = np.empty(sum(counts), np.uint8)
        self.comm._v.all_gatherv(_arrays.describe(np.concatenate([self.record, send])), _arrays.describe(staged),
                                 counts, 0)
        parts = np.split(staged, np.cumsum(counts)[:-1])
        _check_agreed(self.what, self.comm.rank, [p[:n].view(np.int64) for p in parts])
        np.concatenate([p[n:] for p in parts], out=recv)

    def all_to_all(self, send, send_counts, recv, recv_each, what="alltoallv_bytes"):
        be = self.comm._backend
        n = self.record.size
        parts = [np.concatenate([self.record, p]) for p in np.split(send, np.cumsum(send_counts)[:-1])]
        got = be.alltoallv_bytes(parts, what)
        _check_agreed(self.what, self.comm.rank, [p[:n].view(np.int64) for p in got])
        for r, p in enumerate(got):
            recv[r * recv_each:(r + 1) * recv_each] = p[n:]

    def dequantize(self, recv, segments, K, fmt, oinfo):
        from .formats import reference
        out2d = _arrays.host_view(oinfo).reshape(-1, K)
        reference.dequantize_packed(recv, [(r0, n, off) for r0, n, off, _ in segments], K, fmt, out2d)

    def unpack_gathered(self, recv, offs, layouts, rows, K, fmt, info, shape, row_offsets, dtype=None):
        from .formats import reference
        bs = BLOCK_SIZE[fmt]
        # new results in the input's framework (numpy, or CPU torch), as fp4ccl.quantize gives them
        (data, scales, gs), _ = _gathered_arrays(self.result, info, shape, K, fmt, len(rows))
        data2, scales2 = _arrays.host_view(_arrays.describe(data)), _arrays.host_view(_arrays.describe(scales))
        data2, scales2 = data2.reshape(-1, K // 2), scales2.reshape(-1, K // bs)
        gs2 = _arrays.host_view(_arrays.describe(gs)) if gs is not None else None
        for r, (off, n) in enumerate(zip(offs, rows)):
            d, s, g = reference.read_packed(recv, n, K, fmt, off)
            a = sum(rows[:r])
            data2[a:a + n] = d
            scales2[a:a + n] = s
            if gs2 is not None:
                gs2[r] = g
        return GatheredFP4Tensor(data, scales, gs, fmt, tuple(shape), "linear", dtype or info.dtype, row_offsets)

    def sum_dequantized(self, recv, layout, rows, K, fmt, size, oinfo):
        from .formats import reference
        parts = [reference.read_packed(recv, rows, K, fmt, r * layout.total_bytes) for r in range(size)]
        view = _arrays.host_view(oinfo)
        view.reshape(rows, K)[...] = reference.dequantize_sum([p[0] for p in parts], [p[1] for p in parts],
                                                              [p[2] for p in parts], fmt, K, view.dtype)

    def comm_all_reduce_max(self, value):
        return np.float32(self.comm.all_reduce(np.array([value], np.float32), "max")[0])


# Outputs at least this large decode on a side stream, overlapped with the transfer (the rank's own
# rows first, from its send buffer); below it the extra stream/event calls cost more than they hide.
OVERLAP_FROM_BYTES = 16 << 20
# An NVFP4 input of at most this many bytes, quantized whole with its own amax, is quantized by one
# thread-block cluster in one launch (amax included) instead of a zeroed word, the amax kernel and the
# quantize kernel. FP4CCL_SMALL_QUANTIZE_BYTES overrides it (0 turns the one-launch path off).
SMALL_QUANTIZE_BYTES = 256 << 10


def small_quantize_bytes() -> int:
    v = os.environ.get("FP4CCL_SMALL_QUANTIZE_BYTES")
    if not v:
        return SMALL_QUANTIZE_BYTES
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"FP4CCL_SMALL_QUANTIZE_BYTES={v!r} is not a byte count") from None


# Outputs at least this large are gathered in two chunks, so the first one decodes while the second
# is on the wire; more chunks lose more to NCCL's lower efficiency on smaller messages than they hide.
PIPELINE_FROM_BYTES = 256 << 20


def _kernel_segment(chunk, K: int, fmt: str) -> Tuple[int, int, int, int, int]:
    """A (first row, rows, segment address, packed layout) chunk as the quantize kernels' segment:
    (FP4 blocks, first block of x, data, scales, global scale; 0 for MXFP4)."""
    start, count, seg, layout = chunk
    bs = BLOCK_SIZE[fmt]
    return (count * K // bs, start * K // bs, seg, seg + layout.scale_off, seg + layout.gs_off if fmt == "nvfp4" else 0)


class _GpuCodec:
    """Workspace buffers and the CUDA kernels, on the caller's stream and (large calls) a side stream."""

    def __init__(self, comm, like: ArrayInfo, stream):
        self.comm = comm
        self.like = like
        self.device = like.device
        self.stream = _arrays.current_stream(like, stream)
        self.result = None   # a GatheredFP4Tensor to gather into (out=) instead of new arrays

    # -- whole operations ----------------------------------------------------------------------------
    def _gather_plan(self, K, fmt, rows, oinfo):
        """The NCCL gather's chunks: (nchunks, parts[rank][chunk], starts, layouts, counts[chunk][rank],
        send bytes, receive bytes)."""
        n, me = self.comm.size, self.comm.rank
        out_bytes = sum(rows) * K * oinfo.itemsize
        nchunks = 2 if n > 1 and out_bytes >= PIPELINE_FROM_BYTES else 1
        parts = [split_count(r, nchunks) for r in rows]                  # parts[rank][chunk]
        starts = [offsets(p) for p in parts]                       # first row of each chunk, per rank
        lay = [[packed_layout(parts[r][c], K, fmt) for c in range(nchunks)] for r in range(n)]
        counts = [[lay[r][c].total_bytes for r in range(n)] for c in range(nchunks)]
        return (nchunks, parts, starts, lay, counts, sum(lay[me][c].total_bytes for c in range(nchunks)),
                sum(sum(cc) for cc in counts))

    def reserve_nccl_gather(self, K, fmt, rows, oinfo=None):
        """Size the workspace the NCCL transport would need for this gather, so that a CUDA graph
        captured after eager (symmetric-memory) calls finds it allocated: nothing grows in a capture."""
        if oinfo is None:
            counts = [packed_layout(r, K, fmt).total_bytes for r in rows]
            self.buffers(counts[self.comm.rank], sum(counts))
        else:
            plan = self._gather_plan(K, fmt, rows, oinfo)
            self.buffers(plan[5], plan[6])

    def reserve_nccl_reduce_scatter(self, K, fmt, rows, staging=0):
        """As reserve_nccl_gather, for the reduce-scatter; also `staging` bytes of receive area for the
        symmetric-memory path, at self.staging (its start)."""
        me = self.comm.rank
        lays = [packed_layout(r, K, fmt) for r in rows]
        _, self.staging = self.buffers(sum(lay.total_bytes for p, lay in enumerate(lays) if p != me),
                                       max(lays[me].total_bytes * len(rows), staging))

    def gather_dequantize(self, info, K, fmt, shared, rows, oinfo):
        if (symm_collectives.fp4_algo(self.comm, self.stream) == "symm"
                or one_launch.capturable(self.comm, self.stream, rows, K, fmt, shared)):
            return symm_collectives.fp4_gather_dequantize(self, info, K, fmt, shared, rows, oinfo)
        n, me = self.comm.size, self.comm.rank
        overlap = n > 1 and sum(rows) * K * oinfo.itemsize >= OVERLAP_FROM_BYTES
        nchunks, parts, starts, lay, counts, send_bytes, recv_bytes = self._gather_plan(K, fmt, rows, oinfo)
        send_offs = offsets([lay[me][c].total_bytes for c in range(nchunks)])
        recv_offs = offsets([sum(cc) for cc in counts])
        send, recv = self.buffers(send_bytes, recv_bytes)
        self.amax_and_quantize(info, K, fmt, shared, [(starts[me][c], parts[me][c], send + send_offs[c], lay[me][c])
                                                      for c in range(nchunks)])
        out_rows = offsets(rows)
        side = self._side() if overlap else None
        decode = self.stream
        if side is not None:
            decode = side.ptr
            side.order(decode, self.stream)  # after the quantize
            self.dequantize([(out_rows[me] + starts[me][c], parts[me][c], send + send_offs[c], lay[me][c])
                             for c in range(nchunks)], K, fmt, oinfo, decode)
        for c in range(nchunks):
            base = recv + recv_offs[c]
            self.gather(send + send_offs[c], base, counts[c])
            offs = offsets(counts[c])
            segs = [(out_rows[r] + starts[r][c], parts[r][c], base + offs[r], lay[r][c])
                    for r in range(n) if side is None or r != me]
            if side is not None:
                side.order(decode, self.stream)  # after this chunk's gather
            self.dequantize(segs, K, fmt, oinfo, decode)
        if side is not None:
            side.order(self.stream, decode)  # join: the caller's stream sees every decoded row

    def gather_fp4(self, info, K, fmt, shared, rows, shape, row_offsets):
        if symm_collectives.fp4_algo(self.comm, self.stream) == "symm":
            if len(set(rows)) > 1:
                self.reserve_nccl_gather(K, fmt, rows)
            else:
                self.buffers(0, 0)
            me = self.comm.rank

            def fill(addr, lay):
                self.amax_and_quantize(info, K, fmt, shared, [(0, rows[me], addr, lay)])
            return self.pull_gathered(rows, K, fmt, info, shape, row_offsets, info.dtype, fill,
                                      ("x", info.ptr, info.dtype, shared))
        if len(set(rows)) > 1:
            return self._gather_fp4_packed(info, K, fmt, shared, rows, shape, row_offsets)
        # Equal sizes: quantize straight into this rank's slice of the result and gather data, scales
        # and global scales in place, in one NCCL group: nothing to unpack afterwards.
        n, me, r = self.comm.size, self.comm.rank, rows[0]
        bs = BLOCK_SIZE[fmt]
        (data, scales, gs), _ = _gathered_arrays(self.result, info, shape, K, fmt, n)
        d, sc = _arrays.describe(data), _arrays.describe(scales)
        g = _arrays.describe(gs) if gs is not None else None
        self.buffers(0, 0)
        amax = self.amax(info, fmt, shared)
        dn, sn = r * K // 2, r * K // bs
        self._quantize_segs(info, K, fmt, amax, [(r * K // bs, 0, d.ptr + me * dn, sc.ptr + me * sn,
                                                   g.ptr + 4 * me if g is not None else 0)])
        be = self.comm._backend
        be.group_start()
        try:
            if dn:
                be.all_gather(_bytes_info(self.like, d.ptr + me * dn, dn), _bytes_info(self.like, d.ptr, n * dn), self.stream)
                be.all_gather(_bytes_info(self.like, sc.ptr + me * sn, sn), _bytes_info(self.like, sc.ptr, n * sn), self.stream)
            if g is not None:
                be.all_gather(_bytes_info(self.like, g.ptr + 4 * me, 4), _bytes_info(self.like, g.ptr, 4 * n), self.stream)
        finally:
            be.group_end()
        return GatheredFP4Tensor(data, scales, gs, fmt, tuple(shape), "linear", info.dtype, row_offsets)

    def _gather_fp4_packed(self, info, K, fmt, shared, rows, shape, row_offsets):
        me = self.comm.rank
        layouts = [packed_layout(r, K, fmt) for r in rows]
        counts = [lay.total_bytes for lay in layouts]
        send, recv = self.buffers(counts[me], sum(counts))
        self.amax_and_quantize(info, K, fmt, shared, [(0, rows[me], send, layouts[me])])
        self.gather(send, recv, counts)
        return self.unpack_gathered(recv, offsets(counts), layouts, rows, K, fmt, info, shape, row_offsets)

    def reduce_scatter(self, info, K, fmt, rows, oinfo, rounding, seed):
        if (symm_collectives.fp4_algo(self.comm, self.stream) == "symm"
                or one_launch.rs_capturable(self.comm, self.stream, rows, K, fmt)):
            return symm_collectives.fp4_reduce_scatter(self, info, K, fmt, rows, oinfo, rounding, seed, _mix)
        n, me = self.comm.size, self.comm.rank
        lays = [packed_layout(r, K, fmt) for r in rows]
        mine = lays[me]
        send_counts = [0 if p == me else lays[p].total_bytes for p in range(n)]
        send_offs = offsets(send_counts)
        send, recv = self.buffers(sum(send_counts), mine.total_bytes * n)
        row_offs = offsets(rows)
        overlap = n > 1 and info.nbytes >= OVERLAP_FROM_BYTES
        side = self._side() if overlap else None
        quant = self.stream
        if side is not None:
            quant = side.ptr
            side.order(quant, self.stream)  # the input is ready
        be = self.comm._backend
        # Peers in the order of the rounds below; this rank's own chunk goes straight into its slot.
        order = [(me + i) % n for i in range(1, n)] + [me]
        for i, peer in enumerate(order):
            dst = recv + me * mine.total_bytes if peer == me else send + send_offs[peer]
            amax = self.amax_rows(info, K, fmt, row_offs[peer], rows[peer], quant)
            self.quantize(info, K, fmt, amax, [(row_offs[peer], rows[peer], dst, lays[peer])], rounding=rounding,
                          seed=_mix(seed, me, peer), stream=quant)
            if side is None or peer == me:
                continue
            # Round i: send to me+i while receiving from me-i; the next chunk quantizes meanwhile.
            side.order(self.stream, quant)
            src = (me - i - 1) % n
            be.group_start()
            try:
                be.send(_bytes_info(self.like, dst, send_counts[peer]), peer, self.stream)
                be.recv(_bytes_info(self.like, recv + src * mine.total_bytes, mine.total_bytes), src, self.stream)
            finally:
                be.group_end()
        if side is None:
            self.all_to_all(send, send_counts, recv, mine.total_bytes)
        else:
            side.order(self.stream, quant)  # the own chunk is quantized
        self.sum_dequantized(recv, mine, rows[me], K, fmt, n, oinfo)

    # -- steps -----------------------------------------------------------------------------------------
    def _side(self, name: str = "side", high_priority: bool = False) -> "symm_collectives.SideStream":
        """The communicator's side stream `name` on this device (made on first use)."""
        return symm_collectives.side_stream(self.comm, "fp4_" + name, high_priority)

    def buffers(self, send_bytes: int, recv_bytes: int, extra_f32: int = 0):
        # One workspace: [amax slots | send | recv | fp32 accumulation area]
        send_off = _round_up(_AMAX_SLOTS * _AMAX_SLOT_VALUES * 4)
        recv_off = send_off + _round_up(send_bytes)
        extra_off = recv_off + _round_up(recv_bytes)
        base = _workspace(self.comm, extra_off + extra_f32 * 4)
        self.base = base
        self.f32 = base + extra_off
        return base + send_off, base + recv_off

    def _amax_slot(self) -> int:
        # The slots rotate across calls, not within one: calls on different streams may run at
        # once, and each must keep its amax until its quantize has read it.
        turn = self.comm._extras.get("fp4_amax_next")
        if turn is None:
            from .symmetric import _Cached
            turn = self.comm._extras["fp4_amax_next"] = _Cached(0)
        turn.value += 1
        return self.base + 4 * _AMAX_SLOT_VALUES * (turn.value % _AMAX_SLOTS)

    # An amax is handed to quantize() as (device address, how many fp32 values there to take the max
    # of), or 0 for none (MXFP4) or an amax of 0 (no elements).
    def amax(self, info: ArrayInfo, fmt: str, shared: bool):
        if fmt != "nvfp4":
            return 0
        if not shared:
            return self._amax_partials(info.ptr, info.dtype, info.size, self.stream)
        from .formats import kernels
        slot = self._amax_slot()
        kernels.amax(self.device, info.ptr, info.dtype, info.size, slot, self.stream)
        scalar = ArrayInfo(None, info.framework, slot, (1,), "float32", self.device, True)
        self.comm._backend.all_reduce(scalar, scalar, "max", self.stream)
        return slot, 1

    def amax_rows(self, info, K, fmt, start, count, stream=None):
        """The amax of rows [start, start + count)."""
        if fmt != "nvfp4":
            return 0
        return self._amax_partials(info.ptr + start * K * info.itemsize, info.dtype, count * K,
                                   self.stream if stream is None else stream)

    def _amax_partials(self, ptr: int, dtype: str, numel: int, stream: int):
        # per-block partial maxima: no zeroed word (memset node) before the pass
        from .formats import kernels
        slot = self._amax_slot()
        n = kernels.amax_partials(self.device, ptr, dtype, numel, slot, stream, limit=_AMAX_SLOT_VALUES)
        return (slot, n) if n else 0

    def amax_and_quantize(self, info, K, fmt, shared, chunks):
        """quantize(chunks) with the amax of all of x (NVFP4; `shared`: MAX-reduced over the ranks).
        A small NVFP4 x quantized whole with its own amax is one launch (kernels.quantize_small_nvfp4)
        instead of three graph nodes: what decode-size gathers are made of."""
        if (fmt == "nvfp4" and not shared and len(chunks) == 1 and chunks[0][0] == 0
                and 0 < info.nbytes <= small_quantize_bytes() and chunks[0][1] * K == info.size):
            from .formats import kernels
            if kernels.has_quantize_small(self.device):
                kernels.quantize_small_nvfp4(self.device, info.ptr, info.dtype, info.size, K,
                                             _kernel_segment(chunks[0], K, fmt), self.stream)
                return
        self.quantize(info, K, fmt, self.amax(info, fmt, shared), chunks)

    def quantize(self, info, K, fmt, amax, chunks, rounding="nearest", seed=None, stream=None):
        """chunks: (first row, rows, segment address, packed layout) each; amax: as amax() returns."""
        # An empty NVFP4 segment still launches one block, which writes its global scale (the
        # shared one, or 1 for an amax of 0), exactly as the reference does.
        segs = [_kernel_segment(c, K, fmt) for c in chunks if c[1] or fmt == "nvfp4"]
        self._quantize_segs(info, K, fmt, amax, segs, rounding, seed, stream)

    def _quantize_segs(self, info, K, fmt, amax, segs, rounding="nearest", seed=None, stream=None):
        if segs:
            from .formats import kernels
            ptr, n = amax or (0, 0)
            kernels.quantize(self.device, info.ptr, info.dtype, K, fmt, "linear", rounding, seed,
                             ptr, 0.0, segs, 0, self.stream if stream is None else stream, n)

    @staticmethod
    def tensor_key(q: FP4Tensor) -> tuple:
        """What pack_tensor reads from q, as a graph key."""
        g = _arrays.describe(q.global_scale, "q.global_scale").ptr if q.format == "nvfp4" else 0
        return ("q", _arrays.describe(q.data, "q.data").ptr, _arrays.describe(q.scales, "q.scales").ptr, g)

    def pack_tensor(self, q: FP4Tensor, buf: int, layout) -> None:
        from .formats import kernels
        d = _arrays.describe(q.data, "q.data")
        s = _arrays.describe(q.scales, "q.scales")
        kernels.memcpy(self.device, buf, d.ptr, d.nbytes, self.stream)
        kernels.memcpy(self.device, buf + layout.scale_off, s.ptr, s.nbytes, self.stream)
        if q.format == "nvfp4":
            g = _arrays.describe(q.global_scale, "q.global_scale")
            kernels.memcpy(self.device, buf + layout.gs_off, g.ptr, 4, self.stream)

    def gather(self, send, recv, counts):
        self.comm._v.all_gatherv(_bytes_info(self.like, send, counts[self.comm.rank]),
                                 _bytes_info(self.like, recv, sum(counts)), counts, self.stream)

    def all_to_all(self, send, send_counts, recv, recv_each, what=None):
        be = self.comm._backend
        offs = offsets(send_counts)
        be.group_start()
        try:
            for peer in range(self.comm.size):
                if peer == self.comm.rank:
                    continue
                if send_counts[peer]:
                    be.send(_bytes_info(self.like, send + offs[peer], send_counts[peer]), peer, self.stream)
                if recv_each:
                    be.recv(_bytes_info(self.like, recv + peer * recv_each, recv_each), peer, self.stream)
        finally:
            be.group_end()

    def dequantize(self, segments, K, fmt, oinfo, stream=None):
        """segments: (first output row, rows, segment address, packed layout) each."""
        from .formats import kernels
        bs = BLOCK_SIZE[fmt]
        segs = [(n * K // bs, r0 * K // bs, seg, seg + lay.scale_off, seg + lay.gs_off if fmt == "nvfp4" else 0)
                for r0, n, seg, lay in segments if n]
        if segs:
            kernels.dequantize(self.device, oinfo.ptr, oinfo.dtype, K, fmt, "linear", segs, 0,
                               self.stream if stream is None else stream)

    def pull_gathered(self, rows, K, fmt, info, shape, row_offsets, dtype, fill_slot, source):
        """The symmetric-memory gather of packed FP4 segments (fill_slot writes this rank's from what
        the tuple `source` names)."""
        arrays, ptrs = _gathered_arrays(self.result, info, shape, K, fmt, len(rows))
        symm_collectives.fp4_gather_raw(self, rows, K, fmt, fill_slot, source, *ptrs)
        return GatheredFP4Tensor(*arrays, fmt, tuple(shape), "linear", dtype, row_offsets)

    def unpack_gathered(self, recv, offs, layouts, rows, K, fmt, info, shape, row_offsets, dtype=None):
        from .formats import kernels
        bs = BLOCK_SIZE[fmt]
        (data, scales, gs), (dptr, sptr, gptr) = _gathered_arrays(self.result, info, shape, K, fmt, len(rows))
        a = 0
        for r, (off, n, lay) in enumerate(zip(offs, rows, layouts)):
            kernels.memcpy(self.device, dptr + a * K // 2, recv + off, n * K // 2, self.stream)
            kernels.memcpy(self.device, sptr + a * K // bs, recv + off + lay.scale_off, n * K // bs, self.stream)
            if gptr:
                kernels.memcpy(self.device, gptr + 4 * r, recv + off + lay.gs_off, 4, self.stream)
            a += n
        return GatheredFP4Tensor(data, scales, gs, fmt, tuple(shape), "linear", dtype or info.dtype, row_offsets)

    def sum_dequantized(self, recv, layout, rows, K, fmt, size, oinfo):
        from .formats import kernels
        if rows == 0:
            return
        bs = BLOCK_SIZE[fmt]
        n = rows * K
        slots = [recv + r * layout.total_bytes for r in range(size)]
        # One pass: decode every contribution, sum in fp32 in rank order, round once.
        kernels.dequantize_sum(self.device, oinfo.ptr, oinfo.dtype, K, fmt, n // bs,
                               [(a, a + layout.scale_off, a + layout.gs_off if fmt == "nvfp4" else 0) for a in slots],
                               self.stream)
