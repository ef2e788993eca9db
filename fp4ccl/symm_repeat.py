"""Repeated symmetric-memory calls, straight to their CUDA graph.

A v-collective, FP4 gather or FP4 reduce-scatter over symmetric memory replays a cached graph once it
repeats (symm_collectives.Workspace.run), so its GPU work is one launch; what is left is the host's
Python: describing the arrays, validating sizes and options, choosing the algorithm. None of that can come
out differently for a call that matches, object for object, one already served by a graph: the same
torch tensors (address, shape, dtype, strides, device), the same sizes and options, the same stream
and the same FP4CCL_* settings. Such a call skips it and launches the graph at once.

Only calls with an `out` tensor and explicit `sizes` take this path (a new output, or sizes to
exchange, means work on every call), never inside `comm.group()` or while the stream is being
captured, and only calls whose whole GPU work is the one graph (the communicator records a call
here only when exactly one workspace run served it, from a graph).
"""
from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict
from typing import Optional, Tuple

from . import _arrays, symm_collectives
from ._log import get_logger

log = get_logger("fp4ccl.symm_repeat")

# Every setting the dispatch of these calls reads: a call may skip it only while none has changed.
_ENV = tuple(k.encode() for k in (
    "FP4CCL_ALGO", "FP4CCL_FP4_ALGO", "FP4CCL_SYMM_GRAPHS", "FP4CCL_CHECK", "FP4CCL_SMALL_QUANTIZE_BYTES",
    "FP4CCL_PDL", "FP4CCL_LAUNCH", "FP4CCL_CE_PIECES", "FP4CCL_CE_STREAMS", "FP4CCL_CE_STAGE",
    "FP4CCL_TIMEOUT", "FP4CCL_FP4_RAW_PULL", "FP4CCL_FP4_GATHER_FORM", "FP4CCL_FP4_RS_FORM",
    "FP4CCL_FP4_RS_PUSH_STREAMS"))
_KNOWN = 256   # calls remembered per communicator (least recently used dropped)


def _environ_bytes():
    """os.environ's own bytes-keyed table (POSIX CPython): reading it is ~30x cheaper than
    os.environ.get, which encodes and decodes on every call. None elsewhere: no fast path there."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and all(type(k) is bytes for k in list(data)[:1]):
        return data
    return None


_ENVIRON = _environ_bytes()


def call_key(comm, op: tuple, x, out, sizes, stream) -> Optional[tuple]:
    """What a call's checks and dispatch depend on, or None where it cannot take the fast path."""
    torch = sys.modules.get("torch")
    if (torch is None or _ENVIRON is None or sizes is None or type(x) is not torch.Tensor
            or symm_collectives.existing_workspace(comm) is None):
        return None   # (no workspace: this communicator has made no symmetric-memory call yet)
    if type(out) is torch.Tensor:
        out_key = _tensor_key(out)
    else:
        out_key = _fp4_out_key(out, torch)
        if out_key is None:
            return None
    if getattr(comm._backend, "_depth", 0) or log.isEnabledFor(logging.INFO):
        return None   # grouped calls never use symmetric memory; INFO logs each call's choice
    if not all(v is None or type(v) in (str, bool, int) for v in op):
        op = _with_seed_tensor_key(op, torch)
        if op is None:
            return None   # options of other types (some unhashable): the full path checks them
    try:
        sizes = tuple(sizes)
    except TypeError:
        return None
    if not all(type(s) is int for s in sizes):
        return None   # numpy integers and the like: the full path checks and converts them
    dev = x.device
    if dev.type != "cuda":
        return None
    from . import _arrays
    if stream is None:
        handle = (_arrays._torch_stream or _arrays._resolve_torch_stream())(dev.index)
    elif type(stream) is int:
        handle = stream
    else:
        return None
    return (op, _tensor_key(x), out_key, sizes, handle, tuple(_ENVIRON.get(k) for k in _ENV))


STREAM_AT = 4   # where call_key puts the stream


def _tensor_key(t) -> tuple:
    return (t.data_ptr(), t.shape, t.dtype, t.stride(), t.device)


def _with_seed_tensor_key(op: tuple, torch) -> Optional[tuple]:
    """An FP4 reduce-scatter's op (communicator.reduce_scatterv: name, op, compress, rounding, seed)
    with a torch seed tensor replaced by its key; None for anything else. A seed tensor is keyed by
    where it is, not by what it holds: the full path resolves it to an address whose value the graph
    reads when it runs (and a tensor the full path refuses is never recorded, so it never replays).
    Tensors in other options are never keyed: their values decide the call."""
    *head, seed = op
    if op[0] != "reduce_scatterv" or len(op) != 5 or type(seed) is not torch.Tensor:
        return None
    if not all(v is None or type(v) in (str, bool, int) for v in head):
        return None
    return tuple(head) + (("tensor",) + _tensor_key(seed),)


def _fp4_out_key(out, torch) -> Optional[tuple]:
    """The key of a gathered FP4 tensor given as out= (of a gather that returns FP4): everything its
    check reads; None for anything else (or arrays other than torch tensors)."""
    from .formats.tensor import GatheredFP4Tensor
    if type(out) is not GatheredFP4Tensor:
        return None
    parts = (out.data, out.scales) if out.global_scale is None else (out.data, out.scales, out.global_scale)
    if not all(type(a) is torch.Tensor for a in parts):
        return None
    return ((out.format, tuple(out.shape), out.scale_layout, out.dtype, tuple(out.row_offsets))
            + tuple(_tensor_key(a) for a in parts))


class RepeatedCalls:
    """The calls of one communicator served by one graph each: call key -> (workspace key, slot bytes)."""

    def __init__(self):
        self.known: "OrderedDict[tuple, Tuple[tuple, int]]" = OrderedDict()
        self._key = None
        self._serves: Tuple[str, ...] = ()
        self._runs = 0
        self._served = None

    def begin(self, key: tuple, serves: Tuple[str, ...]) -> None:
        """A call with this key takes the full path now; see whether a run of one of the `serves`
        kinds (workspace keys' first item) is all it does. (Another kind would be a step of a
        different path: the FP4 gather over NCCL gathers its bytes with a symmetric-memory run of
        the plain gather, between kernels of its own that a replay would skip.)"""
        self._key, self._serves, self._runs, self._served = key, serves, 0, None

    def note_run(self, workspace_key: Optional[tuple], slot_bytes: int, from_graph: bool) -> None:
        """Workspace.run's report of one run (of whatever call is in progress)."""
        if self._key is not None:
            self._runs += 1
            whole = from_graph and workspace_key is not None and workspace_key[0] in self._serves
            self._served = (workspace_key, slot_bytes) if whole else None

    def end(self) -> None:
        """The call finished without an error: remember it if one graph was all of its GPU work."""
        if self._key is not None and self._runs == 1 and self._served is not None:
            self.known[self._key] = self._served
            self.known.move_to_end(self._key)
            if len(self.known) > _KNOWN:
                self.known.popitem(last=False)
        self._key, self._served = None, None

    def abandon(self) -> None:
        self._key, self._served = None, None

    def clear(self) -> None:
        self.known.clear()
        self.abandon()


def replay(comm, key: tuple) -> bool:
    """Launch the graph of a known call with this key; False (nothing done) where the full path must run."""
    ws = symm_collectives.existing_workspace(comm)
    if ws is None:
        return False
    hit = ws.repeats.known.get(key)
    if hit is None:
        return False
    stream = key[STREAM_AT]
    if symm_collectives.capturing(stream):
        return False
    return ws.replay(hit[0], hit[1], stream)


def run(comm, key: Optional[tuple], serves: Tuple[str, ...], full_path, *args, **kwargs):
    """full_path(*args, **kwargs), recorded under `key` when one graph of a `serves` kind was all of it."""
    ws = symm_collectives.existing_workspace(comm) if key is not None else None
    if ws is None:
        return full_path(*args, **kwargs)
    repeats = ws.repeats
    repeats.begin(key, serves)
    try:
        result = full_path(*args, **kwargs)
    except BaseException:
        repeats.abandon()
        raise
    repeats.end()
    return result


def dispatch(comm, op: tuple, serves: Tuple[str, ...], x, out, sizes, stream, full_path, *args):
    """A collective with `out` given: the launch of its graph if it repeats a call one graph served
    (returning out), else full_path(*args), recorded when it qualifies."""
    key = call_key(comm, op, x, out, sizes, stream)
    if key is None:
        return full_path(*args)
    if replay(comm, key):
        _arrays.mark_written(out)   # the full path's out check did this the first time
        return out
    return run(comm, key, serves, full_path, *args)
