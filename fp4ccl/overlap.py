"""Pipelined all-gather + matmul and matmul + reduce-scatter over symmetric memory (async tensor parallelism).

all_gather_matmul(comm, a_shard, bs, gather_dim=0) -> (a_full or None, [a_full @ b for b in bs])
    Each rank copies its shard into a symmetric workspace and enters a device barrier; then a
    high-priority side stream pulls the peers' shards with the copy engine (cudaMemcpyAsync from the
    IPC-mapped buffers, peer r+1 first, so every source is read by one puller at a time) while the
    caller's stream multiplies the local shard, then each pulled shard as its event fires.
    gather_dim = the last dim splits K: each arriving shard multiplies the matching row block of b
    and accumulates in fp32. gathered_rhs=True computes x @ a_full.T for x in bs (the weight-gather
    form). compress="nvfp4"|"mxfp4" quantizes the shard into the workspace (data, scales and global
    scale in one packed region) and dequantizes each pulled shard on the side stream; the local shard
    never travels and stays exact.

matmul_reduce_scatter(comm, a, b, scatter_dim=0, op="sum", *, out=None) -> reduce_scatter(a @ b)
    The caller's stream computes the chunk meant for peer r+1 first; the side stream pushes it into
    that peer's workspace slot while the next chunk is computed; this rank's own chunk comes last,
    written straight into its own slot. One barrier, then the slots are summed in fp32 and rounded
    once (csrc/symm.cu).

Workspaces are symmetric buffers cached per communicator and grown (never allocated per call).
matmul_reduce_scatter's has two slots used alternately: the one barrier of call n then also proves
every peer finished reducing the slot call n+1 is about to overwrite. all_gather_matmul's has one slot,
device-epoch barriers and a second barrier after the pulls, so that a call into out= with
return_a=False can replay a CUDA graph of itself once it repeats (overlap_replay), and the caller
can capture either op in a graph of its own.

Small problems take the sequential path (NCCL all_gather then matmul; matmul then NCCL
reduce_scatter): below FP4CCL_OVERLAP_MIN_BYTES of gathered (or reduced) data the fixed costs of
the pipeline (barrier, per-shard launches) exceed what overlap hides. FP4CCL_OVERLAP=pipelined or
sequential forces a path. Ranks on different hosts always take the sequential path. The host backend
runs the same math in numpy.

Arguments are checked locally, then every rank exchanges a short signature of its call so that
mismatched shapes fail on every rank before anything is enqueued. With FP4CCL_CHECK unset a
signature that all ranks already agreed on is not exchanged again (no host round trip per call);
FP4CCL_CHECK=1 exchanges on every call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections import OrderedDict
from typing import Any, List, Optional, Tuple

import numpy as np

from . import _arrays
from ._log import get_logger

log = get_logger("fp4ccl.overlap")

_EXTRAS_KEY = "fp4ccl.overlap"
COMPRESS = ("nvfp4", "mxfp4")
_BLOCK = {"nvfp4": 16, "mxfp4": 32}
RS_OPS = ("sum", "avg")
_MATMUL_DTYPES = ("float32", "float16", "bfloat16", "float64")
_GROW = 2 << 20
# Where the pipelined path starts to win, measured on 4 x H200 (N = K = 8192 bf16, docs/OVERLAP.md): ag+mm
# lost at 32 MiB gathered (M = 2048: 0.233 ms against 0.218 sequential) and won at 64 MiB; mm+rs lost
# at a 16 MiB product (M = 1024) and won at 32 MiB (0.202 against 0.238).
DEFAULT_MIN_BYTES = {"all_gather_matmul": 64 << 20, "matmul_reduce_scatter": 32 << 20}


# -- per-communicator state -------------------------------------------------------------------------------

class _State:
    """Agreed call signatures, path decisions already logged, and the workspaces of one communicator."""

    def __init__(self, comm):
        self.comm = comm
        self.agreed: "OrderedDict[str, None]" = OrderedDict()
        self.logged = set()
        self.workspaces = {}
        self.fast: "OrderedDict[tuple, tuple]" = OrderedDict()
        from .overlap_replay import Replays
        self.replays = Replays()

    def remember(self, key: tuple, value: tuple) -> None:
        self.fast[key] = value
        while len(self.fast) > 256:
            self.fast.popitem(last=False)

    def close(self) -> None:
        self.fast.clear()
        self.replays.clear()   # before the buffers its graphs point into
        for ws in self.workspaces.values():
            ws.close()
        self.workspaces.clear()


def _state(comm) -> _State:
    extras = comm._extras
    st = extras.get(_EXTRAS_KEY)
    if st is None:
        st = extras[_EXTRAS_KEY] = _State(comm)
    return st


def release_workspaces(comm) -> None:
    """Free the cached workspaces of `comm` now (collective); comm.destroy() does this too."""
    st = comm._extras.get(_EXTRAS_KEY)
    if st is not None:
        st.close()


class _Workspace:
    """A symmetric byte buffer, a high-priority side stream and reusable events. Its barriers are
    device-epoch barriers (the epoch lives on the device), so the same barrier serves an eager call
    and a CUDA graph replayed any number of times.

    `slots` = 2 (matmul_reduce_scatter): used alternately, call n in slot n % 2; the one barrier of
    call n proves every peer is done with slot (n - 1) % 2. A replayed graph is keyed by that parity,
    and every rank counts every call, eager or replayed, so the ranks agree on the slot.
    `slots` = 1 (all_gather_matmul): a second barrier once every pull is done, so no rank returns
    before its slot may be overwritten; a graph replayed again and again, or replayed on one rank and
    run eagerly on another, then uses the same slot and barriers as an eager call."""

    def __init__(self, comm, kind: str, slots: int = 2):
        import torch
        self.comm, self.kind, self.slots = comm, kind, slots
        self.buf = None
        self.slot_bytes = 0
        self.calls = 0
        # High priority so that the side stream's few kernels (barrier, FP4 codec) are scheduled
        # ahead of the matmul's pending blocks instead of waiting for a wave to drain.
        self.side = torch.cuda.Stream(device=comm.device, priority=-1)
        self._copy_streams = [self.side]
        self._decode = None
        self._capture = None
        self.on_grow = None
        self.done = torch.cuda.Event()
        self.used = False
        self._events: List[Any] = []
        self._views = {}

    def streams(self, n: int):
        """n side streams (the first is `side`): one cudaMemcpyAsync between GPUs runs on one copy
        engine, so a shard split over several streams can draw on several engines at once."""
        import torch
        while len(self._copy_streams) < n:
            self._copy_streams.append(torch.cuda.Stream(device=self.comm.device, priority=-1))
        return self._copy_streams[:n]

    def decoder(self):
        """A high-priority stream for the FP4 decode kernels, apart from the copy streams."""
        import torch
        if self._decode is None:
            self._decode = torch.cuda.Stream(device=self.comm.device, priority=-1)
        return self._decode

    def capture_stream(self):
        """The stream this workspace's calls are captured on (one, so the graphs can share a pool)."""
        import torch
        if self._capture is None:
            self._capture = torch.cuda.Stream(device=self.comm.device)
        return self._capture

    def event(self, i: int):
        import torch
        while len(self._events) <= i:
            self._events.append(torch.cuda.Event())
        return self._events[i]

    def ensure(self, slot_bytes: int) -> None:
        """Grow (collectively) until a slot holds slot_bytes; every rank asks for the same size."""
        if self.buf is not None and slot_bytes <= self.slot_bytes:
            return
        if _capturing():
            raise RuntimeError(
                f"{self.kind}: its symmetric workspace must grow to {slot_bytes} bytes, which cannot happen "
                f"while a CUDA graph is being captured; make the same call once before the capture (warm-up)")
        from .symmetric import symmetric_empty
        new = max(_align(slot_bytes, _GROW), 2 * self.slot_bytes)
        self._views.clear()
        if self.on_grow is not None:
            self.on_grow()  # graphs that point into the old buffer
        if self.buf is not None:
            self.buf.free()  # synchronizes the device first, so no queued call still uses it
            self.buf = None
        log.info("%s workspace: %d MiB x %d slot%s", self.kind, new >> 20, self.slots, "s" * (self.slots > 1))
        self.buf = symmetric_empty(self.comm, (self.slots * new,), "uint8")
        self.slot_bytes = new
        self.calls = 0
        self.used = False

    def view(self, rank: int, offset: int, shape, dtype: str):
        """A cached torch view into rank's part of the workspace (building one costs a DLPack round trip)."""
        key = (rank, offset, tuple(shape), dtype)
        v = self._views.get(key)
        if v is None:
            if len(self._views) > 64:
                self._views.clear()
            v = self._views[key] = self.buf.view(rank, offset, shape, dtype)
        return v

    def slot(self) -> int:
        return (self.calls % self.slots) * self.slot_bytes

    def barrier(self, stream) -> None:
        self.buf.barrier(stream, "device")

    def begin(self, main, streams=()) -> None:
        """Order this call after the previous one, whatever streams either used. (Inside a capture the
        graph's own start orders it; an event recorded outside cannot be waited on there.)"""
        if self.used and not _capturing():
            main.wait_event(self.done)
            for s in streams or (self.side,):
                s.wait_event(self.done)

    def end(self, main) -> None:
        if _capturing():
            return
        self.done.record(main)
        self.used = True
        self.calls += 1

    def close(self) -> None:
        self._views.clear()
        if self.buf is not None:
            self.buf.free()
            self.buf = None


def _workspace(comm, st: _State, kind: str) -> _Workspace:
    ws = st.workspaces.get(kind)
    if ws is None:
        ws = st.workspaces[kind] = _Workspace(comm, kind, slots=1 if kind == "all_gather_matmul" else 2)
        ws.on_grow = st.replays.clear
    return ws


def _capturing() -> bool:
    """Whether the current torch stream is being captured into a CUDA graph."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_current_stream_capturing()


def _on_stream(comm, stream):
    """A context under which `stream` (a torch.cuda.Stream, a CuPy stream or a raw handle) is torch's
    current stream on comm.device: the call is then ordered after the work already queued there and
    leaves its results ready there, as stream= means in every collective.

    Making it current, rather than passing it down, reaches every step that enqueues on the current
    stream: the pipelines' `main`, the sequential paths' NCCL calls, the FP4 kernels, torch's
    allocations and a replayed graph, and the replay keys and capture checks that read it. The calls of
    one communicator stay ordered across streams: each waits for the previous one's event (begin).
    The host backend ignores stream=, as its collectives do."""
    if stream is None or comm.backend == "host":
        return contextlib.nullcontext()
    import torch
    if isinstance(stream, torch.cuda.Stream):
        if stream.device.index != comm.device:
            raise ValueError(f"stream is on cuda:{stream.device.index}, the communicator's device is "
                             f"cuda:{comm.device}")
        handle = stream.cuda_stream
    else:
        handle = _arrays.stream_handle(stream)
    if handle == _arrays.torch_current_stream(comm.device):
        return contextlib.nullcontext()   # (the common case costs no stream switch)
    if not isinstance(stream, torch.cuda.Stream):
        key = (comm.device, handle)
        stream = _EXTERNAL_STREAMS.get(key)
        if stream is None:
            stream = _EXTERNAL_STREAMS[key] = torch.cuda.ExternalStream(handle, device=comm.device)
    return torch.cuda.stream(stream)


# torch wrappers of the raw and CuPy streams given as stream=, made once per (device, handle): a wrapper
# owns nothing, so one outliving its stream is harmless.
_EXTERNAL_STREAMS: dict = {}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# -- checks and agreement ---------------------------------------------------------------------------------

class _Bad(Exception):
    """A local argument error, carried to every rank before being raised."""

    def __init__(self, kind: type, msg: str):
        super().__init__(msg)
        self.kind = kind
        self.msg = msg


def _checked(comm, st: _State, what: str, check):
    """(spec, signature, path variant) of a call whose `check()` gives (spec, the call's own signature),
    once every rank has checked its arguments and the ranks agree (_agree). The signature adds the path
    settings, so ranks that would take different paths are told so before anything is enqueued."""
    spec, sig, var, bad = None, None, None, None
    try:
        spec, own = check()
        var = _variant()
        sig = {**own, "path": _env_mode(), "min_bytes": _min_bytes(what), **var}
    except _Bad as err:
        bad = err
    except ValueError as err:  # a bad FP4CCL_* variable, a read-only out
        bad = _Bad(ValueError, str(err))
    _agree(comm, st, what, sig, bad)
    return spec, sig, var


def _agree(comm, st: _State, what: str, signature: Optional[dict], bad: Optional[_Bad]) -> None:
    """Raise on every rank if any rank's arguments are bad or the ranks' calls differ."""
    sig = json.dumps(signature, sort_keys=True) if signature is not None else ""
    always = comm.backend == "host" or os.environ.get("FP4CCL_CHECK", "") not in ("", "0")
    if bad is None and not always and sig in st.agreed:
        st.agreed.move_to_end(sig)
        return
    if comm.size == 1:
        if bad is not None:
            raise bad.kind(f"{what}: {bad.msg}")
        return
    payload = ("E" + bad.kind.__name__ + ":" + bad.msg) if bad is not None else ("S" + sig)
    parts = [p.decode() for p in comm._gather_bytes(payload.encode(), what, "argument check")]
    errors = [(r, p[1:]) for r, p in enumerate(parts) if p.startswith("E")]
    if errors:
        others = "; ".join(f"rank {r}: {e.split(':', 1)[1]}" for r, e in errors if r != comm.rank)
        if bad is not None:
            raise bad.kind(f"{what}: {bad.msg}" + (f" (also {others})" if others else ""))
        raise ValueError(f"{what}: bad arguments on other ranks, nothing was sent: {others}")
    sigs = [p[1:] for p in parts]
    if len(set(sigs)) > 1:
        detail = "; ".join(f"rank {r}: {_describe_sig(s)}" for r, s in enumerate(sigs))
        raise ValueError(f"{what}: ranks called with different arguments (shards must have equal shapes): {detail}")
    st.agreed[sig] = None
    while len(st.agreed) > 256:
        st.agreed.popitem(last=False)


_ENV_KEYS = ("FP4CCL_OVERLAP", "FP4CCL_OVERLAP_MIN_BYTES", "FP4CCL_OVERLAP_STREAMS", "FP4CCL_OVERLAP_CHUNKS",
             "FP4CCL_OVERLAP_DECODE", "FP4CCL_OVERLAP_GRAPHS",
             "FP4CCL_CHECK", "FP4CCL_PDL", "FP4CCL_LAUNCH", "FP4CCL_TIMEOUT")


def _tensor_key(x):
    """What the checks of a torch tensor depend on; None for anything else (the full check runs)."""
    torch = sys.modules.get("torch")
    if torch is None or type(x) is not torch.Tensor:
        return None
    return (x.shape, x.dtype, x.device, x.stride())


def _fast_key(comm, args: tuple, a, bs, out) -> Optional[tuple]:
    """A key for calls that repeat one already checked and agreed (the common case in a model's
    forward pass), so they skip the describe/check/JSON work: at small sizes that host time, not the
    GPU, sets the speed. None where the full path must run every time."""
    if comm.backend == "host" or os.environ.get("FP4CCL_CHECK", "") not in ("", "0"):
        return None
    if type(args[1]) is not int or not isinstance(bs, (list, tuple)):
        return None   # a bool or numpy dim would alias an int key and skip its own type check
    ka = _tensor_key(a)
    kb = tuple(_tensor_key(b) for b in bs)
    if ka is None or None in kb:
        return None
    ko = None
    if out is not None:
        if not isinstance(out, (list, tuple)):
            return None
        ko = tuple(_tensor_key(o) for o in out)
        if None in ko:
            return None
    env = tuple(os.environ.get(k, "") for k in _ENV_KEYS)
    return args + (ka, kb, ko, env)


def _detached(info: _arrays.ArrayInfo) -> _arrays.ArrayInfo:
    """info without the array it came from, for a cache that must not keep tensors alive."""
    return dataclasses.replace(info, obj=None, ptr=0)


def _describe_sig(sig: str) -> str:
    d = json.loads(sig)
    return ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("op",))


def _env_mode() -> str:
    mode = os.environ.get("FP4CCL_OVERLAP", "auto").lower() or "auto"
    if mode not in ("auto", "pipelined", "sequential"):
        raise ValueError(f"FP4CCL_OVERLAP={mode!r} is not one of auto, pipelined, sequential")
    return mode


DEFAULT_STREAMS = 1


def _n_streams() -> int:
    """FP4CCL_OVERLAP_STREAMS: copy streams per pipelined call (each shard is split over them)."""
    raw = os.environ.get("FP4CCL_OVERLAP_STREAMS", "")
    n = int(raw) if raw else DEFAULT_STREAMS
    if not 1 <= n <= 8:
        raise ValueError(f"FP4CCL_OVERLAP_STREAMS={raw!r} must be between 1 and 8")
    return n


# Pieces each peer's shard is pulled (and multiplied) in: the matmul of the last piece is what the
# pipeline cannot hide, so smaller pieces shorten the tail; too small and the launches cost more than
# they hide. Measured with VMM symmetric buffers (4 x H200, N = K = 8192 bf16, ms, 1/2/4 pieces,
# bench/RESULTS.md run 22): M = 4096 (16 MiB shards) 0.288/0.298/0.465, M = 8192 0.488/0.473/0.547,
# M = 16384 0.865/0.863/0.948; below M = 4096 every extra piece costs more launches than it hides. (With
# IPC buffers, whose pulls were slower, 4 pieces had paid at M = 16384.) So by shard size:
# CHUNKS_BY_SHARD_BYTES lists (minimum shard bytes, pieces).
CHUNKS_BY_SHARD_BYTES = ((32 << 20, 2),)


def _n_chunks() -> Optional[int]:
    """FP4CCL_OVERLAP_CHUNKS: pieces per peer shard in the pipelined all_gather_matmul (bf16/fp16/fp32);
    None (unset): by shard size (chunks_for)."""
    raw = os.environ.get("FP4CCL_OVERLAP_CHUNKS", "")
    if not raw:
        return None
    n = int(raw)
    if not 1 <= n <= 16:
        raise ValueError(f"FP4CCL_OVERLAP_CHUNKS={raw!r} must be between 1 and 16")
    return n


def chunks_for(shard_bytes: int, forced: Optional[int]) -> int:
    if forced is not None:
        return forced
    return next((n for least, n in CHUNKS_BY_SHARD_BYTES if shard_bytes >= least), 1)


DECODE_MODES = ("side", "inline")


def _decode_mode() -> str:
    """FP4CCL_OVERLAP_DECODE: where all_gather_matmul decodes a pulled FP4 shard. `side` (default): on a
    high-priority stream of its own as soon as the shard lands, which then waits for the running
    matmul to leave the SMs; `inline`: on the caller's stream right before that shard's matmul, with
    the whole GPU to itself."""
    raw = os.environ.get("FP4CCL_OVERLAP_DECODE", "").strip().lower() or "side"
    if raw not in DECODE_MODES:
        raise ValueError(f"FP4CCL_OVERLAP_DECODE={raw!r} is not one of {', '.join(DECODE_MODES)}")
    return raw


def _variant() -> dict:
    """The pipelined path's settings; part of the agreed signature, so every rank uses the same."""
    return {"streams": _n_streams(), "chunks": _n_chunks(), "decode": _decode_mode()}


def _min_bytes(what: str) -> int:
    raw = os.environ.get("FP4CCL_OVERLAP_MIN_BYTES", "")
    return int(float(raw)) if raw else DEFAULT_MIN_BYTES[what]


def _choose(comm, st: _State, what: str, nbytes: int, sig: dict) -> str:
    """'local' (one rank), 'sequential' or 'pipelined'; identical on every rank (agreed inputs)."""
    if comm.size == 1:
        return "local"
    mode = sig["path"]
    if mode == "sequential":
        path, why = "sequential", "FP4CCL_OVERLAP=sequential"
    else:
        from .symmetric import same_node
        if not same_node(comm):
            path, why = "sequential", "ranks span hosts (no CUDA IPC)"
        elif mode == "pipelined":
            path, why = "pipelined", "FP4CCL_OVERLAP=pipelined"
        elif nbytes >= sig["min_bytes"]:
            path, why = "pipelined", f"{nbytes >> 20} MiB >= FP4CCL_OVERLAP_MIN_BYTES={sig['min_bytes'] >> 20} MiB"
        else:
            path, why = "sequential", f"{nbytes} B < FP4CCL_OVERLAP_MIN_BYTES={sig['min_bytes']} B"
    key = (what, json.dumps(sig, sort_keys=True))
    if key not in st.logged:
        st.logged.add(key)
        log.info("%s %s: %s path (%s)", what, sig.get("a"), path, why)
    return path


def _framework_check(comm, info: _arrays.ArrayInfo, name: str) -> None:
    if comm.backend == "host":
        if info.is_cuda:
            raise _Bad(TypeError, f"{name} is on {info.where()}, but this communicator's backend is 'host'")
        return
    if info.framework != "torch" or not info.is_cuda:
        raise _Bad(TypeError, f"{name} must be a CUDA torch tensor on cuda:{comm.device} "
                              f"(got a {info.framework} array on {info.where()})")
    if info.device != comm.device:
        raise _Bad(ValueError, f"{name} is on cuda:{info.device}, but this communicator uses cuda:{comm.device}")


def _describe(x, name: str) -> _arrays.ArrayInfo:
    try:
        return _arrays.describe(x, name)
    except TypeError as err:
        raise _Bad(TypeError, str(err)) from None


# -- all_gather_matmul ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _AgSpec:
    a: Any
    bs: List[Any]
    info: _arrays.ArrayInfo
    dim: int
    rhs: bool
    compress: Optional[str]
    return_a: bool
    out: Optional[List[Any]]
    full_shape: Tuple[int, ...]
    out_shapes: List[Tuple[int, ...]]


def _ag_check(comm, a_shard, bs, gather_dim, return_a, compress, out, rhs) -> _AgSpec:
    _arrays.check_flag(return_a, "all_gather_matmul: return_a")
    _arrays.check_flag(rhs, "all_gather_matmul: gathered_rhs")
    W = comm.size
    info = _describe(a_shard, "a_shard")
    _framework_check(comm, info, "a_shard")
    if info.dtype not in _MATMUL_DTYPES:
        raise _Bad(TypeError, f"a_shard has dtype {info.dtype}; matmuls take {', '.join(_MATMUL_DTYPES)}")
    nd = len(info.shape)
    if nd < 2 or (rhs and nd != 2):
        raise _Bad(ValueError, f"a_shard must be {'2-D' if rhs else 'at least 2-D'} "
                               f"(got shape {info.shape})")
    if isinstance(gather_dim, bool) or not isinstance(gather_dim, (int, np.integer)):
        raise _Bad(TypeError, f"gather_dim must be an int, got {gather_dim!r}")
    if not -nd <= gather_dim < nd:
        raise _Bad(ValueError, f"gather_dim={gather_dim} is out of range for a_shard of {nd} dims {info.shape}")
    dim = int(gather_dim) % nd
    if isinstance(bs, (list, tuple)):
        bs = list(bs)
    else:
        raise _Bad(TypeError, f"bs must be a list of matrices, got {type(bs).__name__}")
    if not bs:
        raise _Bad(ValueError, "bs is empty: give at least one matrix")
    if compress is not None and compress not in COMPRESS:
        raise _Bad(ValueError, f"compress={compress!r} is not one of None, {', '.join(map(repr, COMPRESS))}")
    if compress is not None:
        if info.dtype not in ("bfloat16", "float16", "float32"):
            raise _Bad(TypeError, f"compress={compress!r} needs a bf16, fp16 or fp32 a_shard, got {info.dtype}")
        if info.shape[-1] % _BLOCK[compress]:
            raise _Bad(ValueError, f"compress={compress!r} quantizes blocks of {_BLOCK[compress]} along a_shard's "
                                   f"last dim, but a_shard.shape[-1]={info.shape[-1]}")
    full = list(info.shape)
    full[dim] *= W
    full_shape = tuple(full)
    out_shapes = []
    for i, b in enumerate(bs):
        name = f"bs[{i}]"
        binfo = _describe(b, name)
        _framework_check(comm, binfo, name)
        if binfo.framework != info.framework:
            raise _Bad(TypeError, f"{name} is a {binfo.framework} array but a_shard is a {info.framework} array")
        if binfo.dtype != info.dtype:
            raise _Bad(TypeError, f"{name} has dtype {binfo.dtype} but a_shard has {info.dtype}: they must match")
        if len(binfo.shape) != 2:
            raise _Bad(ValueError, f"{name} must be 2-D, got shape {binfo.shape}")
        if rhs:
            if binfo.shape[1] != full_shape[1]:
                raise _Bad(ValueError, f"shapes do not chain: {name} {binfo.shape} @ a_full.T with a_full "
                                       f"{full_shape} needs {name}.shape[1] == {full_shape[1]}")
            out_shapes.append((binfo.shape[0], full_shape[0]))
        else:
            if binfo.shape[0] != full_shape[-1]:
                raise _Bad(ValueError, f"shapes do not chain: a_full {full_shape} @ {name} {binfo.shape} needs "
                                       f"{name}.shape[0] == {full_shape[-1]}")
            out_shapes.append(full_shape[:-1] + (binfo.shape[1],))
    if out is not None:
        if not isinstance(out, (list, tuple)) or len(out) != len(bs):
            raise _Bad(ValueError, f"out must be a list of {len(bs)} arrays (one per b), got {type(out).__name__}")
        out = list(out)
        for i, (o, shape) in enumerate(zip(out, out_shapes)):
            oinfo = _describe(o, f"out[{i}]")
            _framework_check(comm, oinfo, f"out[{i}]")
            if oinfo.dtype != info.dtype or oinfo.shape != shape or not oinfo.contiguous:
                raise _Bad(ValueError, f"out[{i}] must be a contiguous {info.dtype} array of shape {shape}, got "
                                       f"{oinfo.dtype} {oinfo.shape}{'' if oinfo.contiguous else ' (not contiguous)'}")
            _arrays.check_writeable(oinfo, f"out[{i}]")
    return _AgSpec(a_shard, bs, info, dim, rhs, compress, bool(return_a), out, full_shape, out_shapes)


def all_gather_matmul(comm, a_shard, bs, gather_dim: int = 0, *, return_a: bool = True,
                      compress: Optional[str] = None, out=None, gathered_rhs: bool = False, stream=None):
    """(a_full or None, [a_full @ b for b in bs]) with a_full = all_gather(a_shard, gather_dim) (collective).

    gathered_rhs=True gives [x @ a_full.T for x in bs] instead (a_shard 2-D; the gathered matrix is
    the right-hand operand). compress="nvfp4"/"mxfp4": the shards travel as FP4; a_full (and so the
    product) holds each peer's dequantized shard and this rank's exact one. out: optional list of
    arrays receiving the products; with return_a=False too, a repeat of the call (same tensors, stream
    and settings) replays a CUDA graph of it. Every rank must pass shards of one shape. stream: the
    stream the call is ordered on and leaves its results on (default: torch's current stream; the host
    backend ignores it).
    """
    comm._check_open()
    with _on_stream(comm, stream):
        return _all_gather_matmul(comm, a_shard, bs, gather_dim, return_a, compress, out, gathered_rhs)


def _all_gather_matmul(comm, a_shard, bs, gather_dim, return_a, compress, out, gathered_rhs):
    st = _state(comm)
    key = _fast_key(comm, ("ag", gather_dim, bool(return_a), compress, bool(gathered_rhs)), a_shard, bs, out)
    hit = st.fast.get(key) if key is not None else None
    if hit is not None:
        t, path, var = hit
        spec = _AgSpec(a_shard, list(bs), t.info, t.dim, t.rhs, t.compress, t.return_a,
                       None if out is None else list(out), t.full_shape, t.out_shapes)
        for o in out or ():
            _arrays.mark_written(o)   # as _ag_check's out check does on a first call
    else:
        what = "all_gather_matmul"

        def check():
            spec = _ag_check(comm, a_shard, bs, gather_dim, return_a, compress, out, gathered_rhs)
            return spec, {"a": list(spec.info.shape), "dtype": spec.info.dtype,
                          "b": [list(_arrays.describe(b).shape) for b in spec.bs], "dim": spec.dim, "rhs": spec.rhs,
                          "compress": spec.compress}
        spec, sig, var = _checked(comm, st, what, check)
        if comm.backend == "host":
            return _ag_host(comm, spec)
        nbytes = math.prod(spec.full_shape) * spec.info.itemsize
        path = _choose(comm, st, what, nbytes, sig)
        if key is not None:
            st.remember(key, (dataclasses.replace(spec, a=None, bs=[], out=None, info=_detached(spec.info)),
                              path, var))
    if path == "pipelined":
        if (key is not None and spec.out is not None and not spec.return_a
                and _replayed(comm, st, "all_gather_matmul", key, [spec.a, *spec.bs, *spec.out],
                              lambda: _ag_pipelined(comm, st, spec, var))):
            return None, spec.out
        return _ag_pipelined(comm, st, spec, var)
    return _ag_sequential(comm, spec)


def _replayed(comm, st: _State, kind: str, key: tuple, tensors: List[Any], enqueue) -> bool:
    """The call as a replay of its CUDA graph (overlap_replay); False where it must run eagerly.
    key: the call's fast key (shapes, options, settings); tensors: every array it reads or writes."""
    from . import overlap_replay
    if not overlap_replay.enabled() or _capturing():
        return False
    import torch
    ws = _workspace(comm, st, kind)
    if ws.buf is None:
        return False   # sized by the first, eager, call
    main = torch.cuda.current_stream(comm.device)
    full = key + (kind, tuple(t.data_ptr() for t in tensors), main.cuda_stream, ws.calls % ws.slots)
    ws.begin(main)
    if not st.replays.run(full, comm.device, ws.capture_stream(), enqueue, kind):
        return False
    ws.end(main)
    return True


# host backend: numpy, no overlap

def _np(x):
    return _arrays.host_view(_arrays.describe(x))


def _from_np(arr: np.ndarray, like: _arrays.ArrayInfo):
    """numpy result back into the caller's framework (CPU torch keeps bf16 bit patterns)."""
    if like.framework == "numpy":
        return arr
    import torch
    name = like.dtype
    if name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _host_all_gather_dim(comm, x: np.ndarray, dim: int) -> np.ndarray:
    moved = np.ascontiguousarray(np.moveaxis(x, dim, 0))
    g = np.asarray(comm.all_gather(moved)).reshape((comm.size * moved.shape[0],) + moved.shape[1:])
    return np.moveaxis(g, 0, dim)


def _fp4_shards(comm, a, fmt: str) -> List[Any]:
    """Every rank's shard after the FP4 wire (this rank's own exact), through comm.all_gather of the
    packed bytes (data | scales | global scale, formats.packed_layout); numpy, CPU or GPU torch."""
    from . import formats
    K = a.shape[-1]
    a2 = a.reshape(-1, K)
    R = a2.shape[0]
    total = formats.packed_layout(R, K, fmt).total_bytes
    info = _arrays.describe(a2)
    buf = _arrays.empty(info, (total,), "uint8")
    formats.quantize_packed(a2, buf, [(0, R, 0)], fmt)
    g = comm.all_gather(buf)
    shards = []
    for p in range(comm.size):
        if p == comm.rank:
            shards.append(a)
            continue
        o = _arrays.empty(info, (R, K))
        formats.dequantize_packed(g, [(0, R, p * total)], K, fmt, o)
        shards.append(o.reshape(a.shape))
    return shards


def _ag_host(comm, spec: _AgSpec):
    a = _np(spec.a)
    dtype = a.dtype
    if spec.compress:
        a_full = np.concatenate(_fp4_shards(comm, np.ascontiguousarray(a), spec.compress), axis=spec.dim)
    else:
        a_full = _host_all_gather_dim(comm, a, spec.dim)
    wide = a_full.astype(np.float64) if dtype == np.float64 else a_full.astype(np.float32)
    results = []
    for b in spec.bs:
        bb = _np(b).astype(wide.dtype)
        r = bb @ wide.T if spec.rhs else np.matmul(wide, bb)
        results.append(_from_np(r.astype(dtype), spec.info))
    if spec.out is not None:
        for o, r in zip(spec.out, results):
            _np(o)[...] = _np(r)
        results = spec.out
    return (_from_np(np.ascontiguousarray(a_full), spec.info) if spec.return_a else None), results


# GPU, sequential: NCCL all_gather then matmul

def _ag_sequential(comm, spec: _AgSpec):
    import torch
    a = spec.a
    if spec.compress:
        a_full = torch.cat(_fp4_shards(comm, a.contiguous(), spec.compress), dim=spec.dim)
    elif spec.dim == 0:
        a_full = comm.all_gather(a if a.is_contiguous() else a.contiguous())
    else:
        moved = a.movedim(spec.dim, 0).contiguous()
        a_full = comm.all_gather(moved).movedim(0, spec.dim)
    # torch.mm where both sides are 2-D: torch.matmul's dispatch costs host time small calls notice.
    mm = torch.mm if a_full.dim() == 2 else torch.matmul
    results = []
    for i, b in enumerate(spec.bs):
        o = spec.out[i] if spec.out is not None else None
        x, y = (b, a_full.T) if spec.rhs else (a_full, b)
        results.append(mm(x, y, out=o) if o is not None else mm(x, y))
    return (a_full if spec.return_a else None), results


# GPU, pipelined

def _copy(dst: int, src: int, nbytes: int, stream) -> None:
    from cupy.cuda import runtime
    if nbytes:
        runtime.memcpyAsync(dst, src, nbytes, runtime.memcpyDefault, stream.cuda_stream)


def _copy2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
    from cupy.cuda import runtime
    if width and height:
        runtime.memcpy2DAsync(dst, dpitch, src, spitch, width, height, runtime.memcpyDefault, stream.cuda_stream)


_F32_OUT_OK = {}  # "mm" / "addmm" -> whether torch's fp32-output (out_dtype) variant works here


def _mm_into_f32(acc, a, b, first: bool) -> None:
    """acc (fp32) = / += a @ b with a, b in bf16/fp16, accumulated in fp32 by cuBLAS when torch can."""
    import torch
    if a.dtype == torch.float32:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    which = "mm" if first else "addmm"
    if _F32_OUT_OK.get(which) is not False:
        try:
            if first:
                torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=acc)
            else:
                torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            _F32_OUT_OK[which] = True
            return
        except (RuntimeError, AttributeError, NotImplementedError) as err:
            if _F32_OUT_OK.get(which) is True:
                raise
            _F32_OUT_OK[which] = False
            log.info("torch has no fp32-output %s for %s (%s); partial products round to it first", which, a.dtype, err)
    if first:
        acc.copy_(torch.mm(a, b))
    else:
        acc.add_(torch.mm(a, b))


def _split(total: int, parts: int, align: int) -> List[Tuple[int, int]]:
    """(start, count) pieces covering [0, total), at most `parts`, starts multiples of `align`."""
    if total <= 0:
        return []
    step = _align(-(-total // parts), align)
    return [(pos, min(step, total - pos)) for pos in range(0, total, step)]


def _ag_pipelined(comm, st: _State, spec: _AgSpec, var: dict):
    import torch
    W, r = comm.size, comm.rank
    main = torch.cuda.current_stream(comm.device)
    ws = _workspace(comm, st, "all_gather_matmul")
    a = spec.a
    ksplit = spec.dim == a.dim() - 1
    if ksplit:
        lead = tuple(a.shape[:-1])
        a2 = a.reshape(-1, a.shape[-1]).contiguous()
    else:
        moved = a.movedim(spec.dim, 0).contiguous()
        a2 = moved.reshape(-1, moved.shape[-1])
    R, k = a2.shape
    isz = a2.element_size()
    shard_bytes = R * k * isz
    fmt = spec.compress
    if fmt:
        from . import formats
        wire_bytes = formats.packed_layout(R, k, fmt).total_bytes
    else:
        wire_bytes = shard_bytes
    ws.ensure(wire_bytes)
    copiers = ws.streams(var["streams"])
    side = copiers[0]
    inline = var.get("decode") == "inline"
    decode = ws.decoder() if fmt and not inline else None
    ws.begin(main, copiers + ([decode] if decode is not None else []))
    off = ws.slot()
    events = iter(range(1 << 30))

    def event():
        return ws.event(next(events))

    # a_full in the canonical 2-D layout: rows [W*R, k] (dim 0) or columns [R, W*k] (K split).
    a_full2 = torch.empty((R, W * k) if ksplit else (W * R, k), dtype=a2.dtype, device=a2.device)

    def dest(p):
        return a_full2[:, p * k:(p + 1) * k] if ksplit else a_full2[p * R:(p + 1) * R]

    mine = ws.buf.ptr(r) + off
    if fmt:
        # On `main`, ahead of the local matmul: queued on a side stream, the quantize kernels would
        # wait for that matmul's blocks to leave the SMs, and every peer's first pull with them.
        formats.quantize_packed(a2, ws.view(r, off, (wire_bytes,), "uint8"), [(0, R, 0)], fmt, stream=main)
    ready = event()
    ready.record(main)
    side.wait_event(ready)
    if not fmt:
        _copy(mine, a2.data_ptr(), shard_bytes, side)
        # The local matmul waits for this copy: beside it the copy ran 5-6x slower (92 against 16 us for
        # 32 MiB, bench/RESULTS.md run 22), and every peer's first pull waits for it through the barrier.
        copied = event()
        copied.record(side)
        main.wait_event(copied)
    ws.barrier(side)
    if len(copiers) > 1:
        go = event()
        go.record(side)
        for s in copiers[1:]:
            s.wait_event(go)

    stage = tmp = None
    if fmt:
        stage = torch.empty((W - 1) * wire_bytes, dtype=torch.uint8, device=a2.device)
        if ksplit:
            tmp = torch.empty((R, k), dtype=a2.dtype, device=a2.device)
    # arrived[i - 1]: (first row, rows, events) of each piece of peer r + i's shard, in pull order;
    # decoders[i - 1]: for an inline FP4 decode, the call that decodes that shard on a given stream.
    arrived: List[List[Tuple[int, int, List[Any]]]] = []
    decoders: List[Any] = []
    chunks = 1 if fmt else min(chunks_for(shard_bytes, var["chunks"]), max(R, 1))
    rows_per_piece = _split(R, chunks, 1) or [(0, 0)]
    for i in range(1, W):
        p = (r + i) % W
        src = ws.buf.ptr(p) + off
        landed_pieces = []
        for r0, nr in rows_per_piece:
            if fmt:
                dst = stage.data_ptr() + (i - 1) * wire_bytes
                pieces = _split(wire_bytes, len(copiers), 256)
                for s, (o, n) in zip(copiers, pieces):
                    _copy(dst + o, src + o, n, s)
            elif ksplit:
                pieces = _split(nr, len(copiers), 1)
                for s, (q0, n) in zip(copiers, pieces):
                    row = r0 + q0
                    _copy2d(dest(p).data_ptr() + row * W * k * isz, W * k * isz, src + row * k * isz, k * isz,
                            k * isz, n, s)
            else:
                base = r0 * k * isz
                pieces = _split(nr * k * isz, len(copiers), 256)
                for s, (o, n) in zip(copiers, pieces):
                    _copy(dest(p).data_ptr() + base + o, src + base + o, n, s)
            landed = []
            for s in copiers[:len(pieces)]:
                e = event()
                e.record(s)
                landed.append(e)
            landed_pieces.append((r0, nr, landed))
        decoders.append(None)
        if fmt:
            def decode_shard(stream, p=p, seg=(i - 1) * wire_bytes):
                if ksplit:
                    formats.dequantize_packed(stage, [(0, R, seg)], k, fmt, tmp, stream=stream)
                    with torch.cuda.stream(stream):
                        dest(p).copy_(tmp)
                else:
                    formats.dequantize_packed(stage, [(p * R, R, seg)], k, fmt, a_full2, stream=stream)
            if inline:
                decoders[-1] = decode_shard
            else:
                # A stream of its own, so a decode waiting for SMs never holds back the next pull.
                for e in landed_pieces[0][2]:
                    decode.wait_event(e)
                decode_shard(decode)
                e = event()
                e.record(decode)
                landed_pieces = [(0, R, [e])]
        arrived.append(landed_pieces)
    if spec.return_a:
        last = copiers[-1]
        if ksplit:
            _copy2d(dest(r).data_ptr(), W * k * isz, a2.data_ptr(), k * isz, k * isz, R, last)
        else:
            _copy(dest(r).data_ptr(), a2.data_ptr(), shard_bytes, last)
    if ws.slots == 1:
        # Every peer has pulled this rank's slot before any rank returns: the next call (or replay)
        # may overwrite the one slot at once. Off the matmuls' stream, so only the call's end waits.
        for s in copiers[1:]:
            e = event()
            e.record(s)
            side.wait_event(e)
        ws.barrier(side)
    finished = []
    for s in copiers + ([decode] if decode is not None else []):
        e = event()
        e.record(s)
        finished.append(e)

    # Products in canonical layout, written straight into the caller's `out` where its layout allows.
    results2 = []
    for i, b in enumerate(spec.bs):
        o = spec.out[i] if spec.out is not None else None
        if spec.rhs:
            shape2 = (b.shape[0], W * R if not ksplit else R)
        else:
            shape2 = (R, b.shape[1]) if ksplit else (W * R, b.shape[1])
        direct = o is not None and (spec.rhs or ksplit or spec.dim == 0) and o.is_contiguous()
        target = o.view(shape2) if direct else torch.empty(shape2, dtype=a2.dtype, device=a2.device)
        results2.append(target)
    accs = None
    if ksplit:
        accs = [t if t.dtype == torch.float32 else torch.empty(t.shape, dtype=torch.float32, device=t.device)
                for t in results2]

    def consume(p: int, ap, first: bool, r0: int = 0, r1: int = R):
        """The products of rows [r0, r1) of shard p (ap holds the whole shard)."""
        ap = ap[r0:r1]
        for j, b in enumerate(spec.bs):
            if spec.rhs and not ksplit:     # x @ a_p.T -> column block p
                torch.mm(b, ap.T, out=results2[j][:, p * R + r0:p * R + r1])
            elif spec.rhs:                   # K split: x[:, block p] @ a_p.T, accumulated
                _mm_into_f32(accs[j][:, r0:r1], b[:, p * k:(p + 1) * k], ap.T, first)
            elif ksplit:                     # a_p @ b[block p rows], accumulated
                _mm_into_f32(accs[j][r0:r1], ap, b[p * k:(p + 1) * k], first)
            else:                            # a_p @ b -> row block p
                torch.mm(ap, b, out=results2[j][p * R + r0:p * R + r1])

    consume(r, a2, True)
    for i in range(1, W):
        p = (r + i) % W
        for r0, nr, landed in arrived[i - 1]:
            for e in landed:
                main.wait_event(e)
            if decoders[i - 1] is not None:
                decoders[i - 1](main)
            consume(p, dest(p), False, r0, r0 + nr)
    for e in finished:
        main.wait_event(e)
    if ksplit:
        for t, acc in zip(results2, accs):
            if t is not acc:
                t.copy_(acc)  # the one rounding of the fp32 sum
    ws.end(main)

    # Back to the caller's layout.
    if ksplit:
        a_full = a_full2.view(lead + (W * k,))
        outs = [t if spec.rhs else t.view(lead + (t.shape[-1],)) for t in results2]
    else:
        moved_full = (W * a.shape[spec.dim],) + tuple(d for i, d in enumerate(a.shape) if i != spec.dim)
        a_full = a_full2.view(moved_full).movedim(0, spec.dim)
        if spec.rhs:
            outs = results2
        else:
            outs = [t.view(moved_full[:-1] + (t.shape[-1],)).movedim(0, spec.dim) for t in results2]
    if spec.out is not None:
        for o, t in zip(spec.out, outs):
            if t.data_ptr() != o.data_ptr() or t.stride() != o.stride():
                o.copy_(t)
        outs = spec.out
    return (a_full if spec.return_a else None), outs


# -- matmul_reduce_scatter -----------------------------------------------------------------------------------

@dataclasses.dataclass
class _RsSpec:
    a: Any
    b: Any
    info: _arrays.ArrayInfo
    dim: int
    op: str
    out_shape: Tuple[int, ...]
    out: Optional[Any] = None


def _rs_check(comm, a, b, scatter_dim, op, out=None) -> _RsSpec:
    W = comm.size
    info = _describe(a, "a")
    _framework_check(comm, info, "a")
    binfo = _describe(b, "b")
    _framework_check(comm, binfo, "b")
    if info.dtype not in _MATMUL_DTYPES:
        raise _Bad(TypeError, f"a has dtype {info.dtype}; matmuls take {', '.join(_MATMUL_DTYPES)}")
    if binfo.framework != info.framework:
        raise _Bad(TypeError, f"b is a {binfo.framework} array but a is a {info.framework} array")
    if binfo.dtype != info.dtype:
        raise _Bad(TypeError, f"b has dtype {binfo.dtype} but a has {info.dtype}: they must match")
    if len(info.shape) < 2:
        raise _Bad(ValueError, f"a must be at least 2-D, got shape {info.shape}")
    if len(binfo.shape) != 2:
        raise _Bad(ValueError, f"b must be 2-D, got shape {binfo.shape}")
    if binfo.shape[0] != info.shape[-1]:
        raise _Bad(ValueError, f"shapes do not chain: a {info.shape} @ b {binfo.shape} needs "
                               f"b.shape[0] == {info.shape[-1]}")
    if op not in RS_OPS:
        raise _Bad(ValueError, f"op={op!r}: matmul_reduce_scatter supports {', '.join(RS_OPS)}")
    full = info.shape[:-1] + (binfo.shape[1],)
    nd = len(full)
    if isinstance(scatter_dim, bool) or not isinstance(scatter_dim, (int, np.integer)):
        raise _Bad(TypeError, f"scatter_dim must be an int, got {scatter_dim!r}")
    if not -nd <= scatter_dim < nd:
        raise _Bad(ValueError, f"scatter_dim={scatter_dim} is out of range for the {nd}-dim product {full}")
    dim = int(scatter_dim) % nd
    if full[dim] % W:
        raise _Bad(ValueError, f"the product a @ b has shape {full}; dim {dim} ({full[dim]}) is not divisible "
                               f"by the world size {W}")
    out_shape = tuple(d // W if i == dim else d for i, d in enumerate(full))
    if out is not None:
        oinfo = _describe(out, "out")
        _framework_check(comm, oinfo, "out")
        if oinfo.framework != info.framework or oinfo.dtype != info.dtype or oinfo.shape != out_shape \
                or not oinfo.contiguous:
            raise _Bad(ValueError, f"out must be a contiguous {info.framework} {info.dtype} array of shape "
                                   f"{out_shape}, got a {oinfo.framework} {oinfo.dtype} {oinfo.shape}"
                                   f"{'' if oinfo.contiguous else ' (not contiguous)'}")
        _arrays.check_writeable(oinfo, "out")
    return _RsSpec(a, b, info, dim, op, out_shape, out)


def matmul_reduce_scatter(comm, a, b, scatter_dim: int = 0, op: str = "sum", *, out=None, stream=None):
    """reduce_scatter(a @ b) along scatter_dim (collective): rank r gets the r-th of `size` parts.

    op "sum" or "avg". The pipelined path (and the host backend) sums the partial products in fp32 and
    rounds once; the sequential path (small products, a caller's CUDA-graph capture, several hosts) is
    NCCL's reduce_scatter in the input dtype, which rounds at each of its steps. out: an optional array
    for the result (returned); a repeat of a call into out= (same arrays, stream and settings)
    replays a CUDA graph of it. stream: the stream the call is ordered on and leaves its result on
    (default: torch's current stream; the host backend ignores it).
    """
    comm._check_open()
    with _on_stream(comm, stream):
        return _matmul_reduce_scatter(comm, a, b, scatter_dim, op, out)


def _matmul_reduce_scatter(comm, a, b, scatter_dim, op, out):
    st = _state(comm)
    key = _fast_key(comm, ("rs", scatter_dim, op), a, [b], None if out is None else [out])
    hit = st.fast.get(key) if key is not None else None
    if hit is not None:
        t, path, var = hit
        spec = _RsSpec(a, b, t.info, t.dim, t.op, t.out_shape, out)
        if out is not None:
            _arrays.mark_written(out)   # as _rs_check's out check does on a first call
    else:
        what = "matmul_reduce_scatter"

        def check():
            spec = _rs_check(comm, a, b, scatter_dim, op, out)
            return spec, {"a": list(spec.info.shape), "b": list(_arrays.describe(b).shape), "dtype": spec.info.dtype,
                          "dim": spec.dim, "op": spec.op}
        spec, sig, var = _checked(comm, st, what, check)
        if comm.backend == "host":
            return _into(spec.out, _rs_host(comm, spec))
        nbytes = math.prod(spec.info.shape[:-1]) * spec.b.shape[1] * spec.info.itemsize
        path = _choose(comm, st, what, nbytes, sig)
        if key is not None:
            st.remember(key, (dataclasses.replace(spec, a=None, b=None, out=None, info=_detached(spec.info)),
                              path, var))
    if path == "pipelined" and _capturing():
        # Its two slots alternate call by call, which the replays of the caller's graph would not;
        # NCCL's reduce-scatter captures. (Every rank of an SPMD program captures the same calls, so
        # the ranks still agree on the path.)
        if ("rs-capture",) not in st.logged:
            st.logged.add(("rs-capture",))
            log.info("matmul_reduce_scatter inside a CUDA graph capture: sequential path")
        path = "sequential"
    if path == "pipelined":
        if (key is not None and spec.out is not None
                and _replayed(comm, st, "matmul_reduce_scatter", key, [spec.a, spec.b, spec.out],
                              lambda: _rs_pipelined(comm, st, spec, var))):
            return spec.out
        return _rs_pipelined(comm, st, spec, var)
    return _into(spec.out, _rs_sequential(comm, spec))


def _into(out, result):
    """result, or out holding a copy of it (on the current stream)."""
    if out is None:
        return result
    if isinstance(out, np.ndarray):
        np.copyto(out, np.asarray(result))
    else:
        out.copy_(result)
    return out


def _rs_host(comm, spec: _RsSpec):
    a, b = _np(spec.a), _np(spec.b)
    wide = np.float64 if a.dtype == np.float64 else np.float32
    partial = np.matmul(a.astype(wide), b.astype(wide)).astype(a.dtype)  # partials in the input dtype
    moved = np.ascontiguousarray(np.moveaxis(partial.astype(wide), spec.dim, 0))
    red = np.asarray(comm.reduce_scatter(moved, op="sum"))
    red = red.reshape((moved.shape[0] // comm.size,) + moved.shape[1:])
    if spec.op == "avg":
        red = red / comm.size
    res = np.ascontiguousarray(np.moveaxis(red, 0, spec.dim)).astype(a.dtype)
    return _from_np(res, spec.info)


def _rs_sequential(comm, spec: _RsSpec):
    import torch
    partial = torch.mm(spec.a, spec.b) if spec.a.dim() == 2 else torch.matmul(spec.a, spec.b)
    if spec.dim == 0:
        return comm.reduce_scatter(partial, op=spec.op)
    moved = partial.movedim(spec.dim, 0).contiguous()
    red = comm.reduce_scatter(moved, op=spec.op)
    return red.movedim(0, spec.dim)


def _rs_pipelined(comm, st: _State, spec: _RsSpec, var: dict):
    import torch
    from .symmetric import launch
    W, r = comm.size, comm.rank
    main = torch.cuda.current_stream(comm.device)
    ws = _workspace(comm, st, "matmul_reduce_scatter")
    a, b = spec.a, spec.b
    N = b.shape[1]
    last = spec.dim == a.dim() - 1
    if last:
        a2 = a.reshape(-1, a.shape[-1])
        R = a2.shape[0]
        chunk_shape = (R, N // W)
    else:
        moved = a.movedim(spec.dim, 0).contiguous() if spec.dim else a.contiguous()
        a2 = moved.reshape(-1, moved.shape[-1])
        R = a2.shape[0]
        chunk_shape = (R // W, N)
    isz = a2.element_size()
    chunk_elems = chunk_shape[0] * chunk_shape[1]
    chunk_bytes = _align(chunk_elems * isz, 256)
    ws.ensure(W * chunk_bytes)
    pushers = ws.streams(var["streams"])
    side = pushers[0]
    ws.begin(main, pushers)
    off = ws.slot()

    def operands(j):
        if last:
            return a2, b[:, j * chunk_shape[1]:(j + 1) * chunk_shape[1]]
        return a2[j * chunk_shape[0]:(j + 1) * chunk_shape[0]], b

    # Chunks for peers go to local staging, pushed by the side stream as each is produced.
    stage = torch.empty((W - 1,) + chunk_shape, dtype=a2.dtype, device=a2.device)
    produced = [ws.event(1 + i) for i in range(W - 1)]
    pieces = _split(chunk_elems * isz, len(pushers), 256)
    for i in range(1, W):
        j = (r + i) % W
        x, y = operands(j)
        torch.mm(x, y, out=stage[i - 1])
        produced[i - 1].record(main)
        dst, src = ws.buf.ptr(j) + off + r * chunk_bytes, stage[i - 1].data_ptr()
        for s, (o, n) in zip(pushers, pieces):
            s.wait_event(produced[i - 1])
            _copy(dst + o, src + o, n, s)
    x, y = operands(r)
    own = ws.view(r, off + r * chunk_bytes, chunk_shape, spec.info.dtype)
    torch.mm(x, y, out=own)
    for t, s in enumerate(pushers[1:]):
        e = ws.event(W + 1 + t)
        e.record(s)
        side.wait_event(e)
    ws.barrier(side)  # our pushes are in the peers' slots, theirs in ours
    pushed = ws.event(W)
    pushed.record(side)
    main.wait_event(pushed)
    # Summed straight into `out` where its layout is the chunk's (scatter along the first or last dim).
    direct = spec.out is not None and (last or spec.dim == 0)
    result = spec.out.view(chunk_shape) if direct else torch.empty(chunk_shape, dtype=a2.dtype, device=a2.device)
    kname = {"bfloat16": "fp4ccl_sum_slots_bf16", "float16": "fp4ccl_sum_slots_f16",
             "float32": "fp4ccl_sum_slots_f32"}.get(spec.info.dtype)
    slots = ws.buf.ptr(r) + off
    if kname is not None and chunk_elems:
        threads = 256
        per_thread = 8 if spec.info.dtype != "float32" else 1
        blocks = max(1, min(4096, (chunk_elems // per_thread + threads - 1) // threads))
        launch(comm.device, kname, (blocks,), (threads,),
               (np.uint64(result.data_ptr()), np.uint64(slots), np.int64(chunk_elems), np.int32(W),
                np.int64(chunk_bytes // isz), np.float32(1.0 / W if spec.op == "avg" else 1.0)),
               main.cuda_stream)
    elif chunk_elems:  # float64: no kernel; torch sums in float64 already
        view = ws.view(r, off, (W, chunk_bytes // isz), spec.info.dtype)[:, :chunk_elems]
        red = view.sum(dim=0)
        result.view(-1).copy_(red / W if spec.op == "avg" else red)
    if direct:
        res = spec.out
    else:
        if last:
            res = result.view(tuple(a.shape[:-1]) + (chunk_shape[1],))
        else:
            moved_out = (spec.out_shape[spec.dim],) + tuple(d for i, d in enumerate(spec.out_shape) if i != spec.dim)
            res = result.view(moved_out).movedim(0, spec.dim)
        res = _into(spec.out, res)
    ws.end(main)
    return res
