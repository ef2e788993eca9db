"""The Communicator: argument checking, output allocation and dispatch to a backend (NCCL or host)."""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
from collections.abc import Mapping, Set as AbstractSet
from typing import Any, Callable, Optional, Sequence, Tuple

from . import _arrays
from ._arrays import ArrayInfo
from ._log import get_logger
from ._timeout import ENV_TIMEOUT, env_timeout
from .bootstrap.env import RankInfo, discover, size_variable
from .bootstrap.exchange import (Exchange, MPIExchange, SingleExchange, StoreExchange, TorchGroupExchange,
                                 TorchStoreAdapter, pack_ints, torch_timedelta, unpack_ints)
from .bootstrap.store import DEFAULT_TIMEOUT as STORE_TIMEOUT
from .errors import CallMismatchError, CommClosedError, CommTimeoutError

OPS = ("sum", "prod", "max", "min", "avg")
_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
log = get_logger("fp4ccl.communicator")


def check_consistency() -> bool:
    """FP4CCL_CHECK=1 makes v-collectives compare sizes across ranks first (a host round trip each)."""
    return os.environ.get("FP4CCL_CHECK", "0") not in ("", "0")


def _fp4_only(what: str, options: tuple) -> None:
    """ValueError naming the FP4 options, (name, value, default) triples, that a call without compress=
    was given: they would be silently ignored."""
    names = ", ".join(f"{name}={value!r}" for name, value, default in options
                      if value is not default and value != default)
    raise ValueError(f"{what}: {names} needs compress='nvfp4' or 'mxfp4' (FP4 on the wire); without compress "
                     f"the rows move in x's own dtype")


def _is_fp4(x) -> bool:
    """x is an FP4Tensor (a gathered one too), told by name: no import of fp4ccl.formats on the array path."""
    return type(x).__name__ in ("FP4Tensor", "GatheredFP4Tensor") and type(x).__module__.startswith("fp4ccl.")


class _TimeoutGuard:
    """The backend as everything above it calls it (the Communicator, the v-collectives, the FP4 codecs).

    A call that raises CommTimeoutError marks the communicator closed before the error propagates, so
    every later call fails at its argument checks with CommClosedError instead of reaching a backend
    that is gone (the NCCL backend has aborted itself by then). One place for every backend call,
    rather than a try in each collective. Public methods are wrapped on first use and cached on the
    guard; everything else is read live from the backend.
    """

    def __init__(self, backend, comm: "Communicator"):
        self.__backend = backend
        self.__comm = comm
        self.name = backend.name  # read on every call through Communicator.backend: a plain attribute

    def __getattr__(self, name: str):  # only for names not yet on the guard
        if name.startswith("_TimeoutGuard__"):
            raise AttributeError(name)  # a guard made without __init__ (copy, pickle): no recursion
        attr = getattr(self.__backend, name)
        if name[0] == "_" or not callable(attr):
            return attr  # state such as NCCL's group depth changes: never cached
        comm = self.__comm

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except CommTimeoutError as err:
                comm._timed_out(err)
                raise
        call.__name__ = call.__qualname__ = name
        setattr(self, name, call)
        return call

    @property
    def _depth(self) -> int:
        # NCCL's group depth, read on every call by the v-collectives and symm_repeat's fast path: a
        # property costs a tenth of the __getattr__ fallback.
        return getattr(self.__backend, "_depth", 0)

    def __repr__(self) -> str:
        return f"<timeout guard over {self.__backend!r}>"


class Communicator:
    """A group of ranks that run collectives together; build one with `fp4ccl.init()`."""

    def __init__(self, backend, exchange: Exchange, *, local_rank: int = 0, local_size: int = 1,
                 device: Optional[int] = None, launcher: str = "single"):
        self._backend = _TimeoutGuard(backend, self)
        # A backend's name never changes; the per-call checks branch on it without a property call.
        self._host = backend.name == "host"
        self._exchange = exchange
        self._rank = exchange.rank
        self._size = exchange.size
        self._local_rank = local_rank
        self._local_size = local_size
        self._device = device
        self._launcher = launcher
        # The device inputs must be on (None: host memory); -1 matches nothing, for a GPU backend
        # built without a device, so every array is refused there as before.
        self._home = None if self._host else (device if device is not None else -1)
        self._closed: Optional[str] = None  # "destroy" | "abort" | "timeout" | "mismatch" once closed
        self._failure = ""                  # how the error that closed it (timeout, mismatch) did, for later errors
        self._extras = {}  # per-communicator caches owned by other modules (symmetric workspaces, ...)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_mpi(cls, mpi_comm=None, backend: Optional[str] = None, device: Optional[int] = None) -> "Communicator":
        """Build a communicator over the ranks of an mpi4py communicator (collective over it).

        device: the CUDA ordinal; default as for init() (default_device), also for a sub-communicator.
        """
        if mpi_comm is None:
            from mpi4py import MPI
            mpi_comm = MPI.COMM_WORLD
        exchange = MPIExchange(mpi_comm)
        local = mpi_comm.Split_type(_mpi_shared_type(), key=exchange.rank)
        try:
            local_rank, local_size = local.Get_rank(), local.Get_size()
        finally:
            local.Free()
        return _build(exchange, backend, device, local_rank, local_size, "mpi", discover())

    @classmethod
    def from_torch(cls, group=None, backend: Optional[str] = None, device: Optional[int] = None) -> "Communicator":
        """Build a communicator over a torch.distributed ProcessGroup (collective over the group).

        device: the CUDA ordinal; default as for init() (default_device), also for a sub-group.
        """
        exchange = TorchGroupExchange(group)
        env = discover()
        local_rank = env.local_rank if env.size == exchange.size else exchange.rank
        local_size = env.local_size if env.size == exchange.size else exchange.size
        return _build(exchange, backend, device, local_rank, local_size, "torch", env)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def local_size(self) -> int:
        return self._local_size

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def device(self) -> Optional[int]:
        """The CUDA device ordinal this rank uses (None on the host backend)."""
        return self._device

    def __repr__(self) -> str:
        state = f", {self._closed_how()}" if self._closed else ""
        where = f", device=cuda:{self._device}" if self._device is not None else ""
        return f"<fp4ccl.Communicator rank={self._rank} size={self._size} backend={self.backend}{where}{state}>"

    # -- checks -------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CommClosedError(f"this communicator was {self._closed_how()}; create a new one with fp4ccl.init()")

    def _closed_how(self) -> str:
        return self._failure or f"closed by {self._closed}()"

    def _timed_out(self, err: CommTimeoutError) -> None:
        """A backend call timed out: closed from now on (the guard's one hook, see _TimeoutGuard)."""
        self._failed("timeout", err)

    def _failed(self, how: str, err: Exception) -> None:
        """Closed from now on after `err` ("timeout" or "mismatch"): its peers may never reach a
        collective teardown, so destroy() releases it locally."""
        if not self._closed:
            self._closed = how
            why = "a timeout" if how == "timeout" else "its ranks were found in different calls"
            self._failure = f"aborted after {why} ({err})"   # kept by a later abort(), for later errors

    def _input(self, x: Any, name: str = "x") -> ArrayInfo:
        if self._closed:
            self._check_open()
        info = _arrays.describe(x, name)
        if not info.contiguous:
            raise ValueError(f"{name} must be contiguous (call .contiguous() / ascontiguousarray first)")
        dev = info.device
        if dev != self._home:  # the common case (on the right device, or host on host) skips all three
            if self._host:
                raise TypeError(f"{name} is on {info.where()}, but this communicator's backend is 'host' (CPU arrays only)")
            if dev is None:
                raise TypeError(f"{name} is on cpu, but this communicator's backend is '{self.backend}' on cuda:{self._device}")
            raise ValueError(f"{name} is on cuda:{dev}, but this communicator uses cuda:{self._device}")
        return info

    def _output(self, like: ArrayInfo, shape: Sequence[int], out: Any, name: str = "out",
                in_place: Optional[Tuple[int, str]] = None):
        """(out, its ArrayInfo), or a new array of `shape` like `like` (the input) when out is None.

        An out that shares memory with the input is refused (the backends read the input while they write
        out, so a partial overlap gives wrong rows on some ranks), except the op's in-place form
        in_place = (bytes from out's start to the input's, its description): out=x, or NCCL's slot forms."""
        if type(shape) is not tuple:
            shape = tuple(int(s) for s in shape)
        if out is None:
            return _arrays.new(like, shape)
        info = self._input(out, name)
        if info.framework != like.framework:
            raise TypeError(f"{name} is a {info.framework} array but the input is a {like.framework} array")
        if info.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {info.dtype}, expected {like.dtype} (the input's)")
        if info.shape != shape:
            raise ValueError(f"{name} has shape {info.shape}, expected {shape}")
        _check_overlap(like, info, name, in_place)
        _arrays.check_writeable(info, name)   # last: it marks a torch out as written, so only once nothing refuses it
        return out, info

    def _stream(self, info: ArrayInfo, stream: Any) -> int:
        return _arrays.current_stream(info, stream) if info.device is not None else 0

    def _check_root(self, root: int, name: str = "root") -> int:
        """root (or peer) as an int in [0, size): TypeError if not an integer, ValueError if out of range."""
        if type(root) is not int:
            root = _arrays.as_int(root, name)
        if not 0 <= root < self._size:
            raise ValueError(f"{name}={root!r} is out of range for a communicator of size {self._size}")
        return root

    @staticmethod
    def _check_op(op: str, info: ArrayInfo) -> str:
        if op not in OPS:
            raise ValueError(f"op={op!r} is not one of {', '.join(OPS)}")
        if info.dtype == "bool":
            raise TypeError("bool arrays cannot be reduced; use uint8")
        if op == "avg" and info.dtype in _INT_DTYPES:
            raise TypeError(f"op='avg' needs a floating dtype, got {info.dtype}")
        return op

    def _split_rows(self, info: ArrayInfo, what: str) -> tuple:
        if not info.shape:
            raise ValueError(f"{what} needs an array with at least one dimension, got a 0-d array")
        if info.shape[0] % self._size:
            raise ValueError(f"{what}: x.shape[0]={info.shape[0]} is not divisible by the world size {self._size}"
                             f"{'; use reduce_scatterv for uneven splits' if what == 'reduce_scatter' else ''}")
        return (info.shape[0] // self._size,) + info.shape[1:]

    # -- collectives --------------------------------------------------------------------------------
    def all_reduce(self, x, op: str = "sum", *, out=None, stream=None):
        """Reduce x over all ranks; every rank gets the result (collective). `out=x` works in place."""
        info = self._input(x)
        self._check_op(op, info)
        out, oinfo = self._output(info, info.shape, out, in_place=_SAME)
        self._backend.all_reduce(info, oinfo, op, self._stream(info, stream))
        return out

    def broadcast(self, x, root: int = 0, *, out=None, stream=None):
        """Root's x to every rank (collective); other ranks' x gives shape and dtype. `out=x` works in place."""
        info = self._input(x)
        root = self._check_root(root)
        out, oinfo = self._output(info, info.shape, out, in_place=_SAME)
        self._backend.broadcast(info, oinfo, root, self._stream(info, stream))
        return out

    def reduce(self, x, root: int = 0, op: str = "sum", *, out=None, stream=None):
        """Reduce x over all ranks onto root (collective); returns the result on root, None elsewhere."""
        info = self._input(x)
        root = self._check_root(root)
        self._check_op(op, info)
        oinfo = None
        if self._rank == root:
            out, oinfo = self._output(info, info.shape, out, in_place=_SAME)
        elif out is not None:  # unused here, but checked as on root, so a wrong out fails on every rank
            self._output(info, info.shape, out, in_place=_SAME)
        self._backend.reduce(info, oinfo, op, root, self._stream(info, stream))
        return out if self._rank == root else None

    def all_gather(self, x, *, out=None, stream=None):
        """Concatenate every rank's x along dim 0, in rank order (collective); a 0-d x gives shape (size,)."""
        info = self._input(x)
        shape = (self._size * info.shape[0],) + info.shape[1:] if info.shape else (self._size,)
        slot = (self._rank * info.size * info.itemsize, "x as this rank's slot of out")
        out, oinfo = self._output(info, shape, out, in_place=slot)
        self._backend.all_gather(info, oinfo, self._stream(info, stream))
        return out

    def reduce_scatter(self, x, op: str = "sum", *, out=None, stream=None):
        """Reduce x over all ranks; rank r gets the r-th of `size` equal parts along dim 0 (collective)."""
        info = self._input(x)
        self._check_op(op, info)
        part = self._split_rows(info, "reduce_scatter")
        out, oinfo = self._output(info, part, out, in_place=(-self._rank * math.prod(part) * info.itemsize,
                                                               "out as this rank's part of x"))
        self._backend.reduce_scatter(info, oinfo, op, self._stream(info, stream))
        return out

    def all_to_all(self, x, *, out=None, stream=None):
        """Split x into `size` equal parts along dim 0; part j goes to rank j, received in rank order (collective)."""
        info = self._input(x)
        self._split_rows(info, "all_to_all")
        out, oinfo = self._output(info, info.shape, out)
        self._backend.all_to_all(info, oinfo, self._stream(info, stream))
        return out

    def _sizes(self, sizes, local_rows: int, what: str) -> list:
        """Validate per-rank row counts; None exchanges each rank's local_rows first (a host round trip)."""
        if sizes is None:
            sizes = [v[0] for v in self._gather_ints((local_rows,), what)]
        elif isinstance(sizes, (Mapping, AbstractSet, str, bytes)):   # iterable, but not one count per rank in order
            raise TypeError(f"{what}: sizes must be a sequence of integers, one per rank, got {sizes!r}")
        try:
            sizes = [s if type(s) is int else _arrays.as_int(s, "sizes") for s in sizes]
        except TypeError:
            raise TypeError(f"{what}: sizes must be a sequence of integers (not bools), got {sizes!r}") from None
        if len(sizes) != self._size:
            raise ValueError(f"{what}: sizes has {len(sizes)} entries but the world size is {self._size}")
        if any(s < 0 for s in sizes):
            raise ValueError(f"{what}: sizes must be >= 0, got {sizes}")
        if check_consistency():
            views = self._gather_ints(sizes, what)
            if len(set(views)) > 1:
                detail = "; ".join(f"rank {r}: {list(v)}" for r, v in enumerate(views))
                raise ValueError(f"{what}: ranks passed different sizes ({detail})")
        return sizes

    def _gather_ints(self, values, what: str) -> list:
        """Every rank's `values` through the bootstrap exchange (a host round trip)."""
        return [unpack_ints(b) for b in self._gather_bytes(pack_ints(*values), what, "sizes exchange")]

    def _gather_bytes(self, payload: bytes, what: str, step: str) -> list:
        """Every rank's `payload` through the bootstrap exchange, for `step` of the call `what`. A peer that
        never comes is a CommTimeoutError naming the call, which closes the communicator as a collective's
        does."""
        try:
            return self._exchange.all_gather_bytes(payload)
        except TimeoutError as err:
            out = CommTimeoutError(f"{what}: the {step} on rank {self._rank} of {self._size} timed out "
                                   f"({err}); a rank did not make this call, or died. The communicator cannot be "
                                   f"used any more")
            out.rank, out.call, out.seq = self._rank, what, None
            self._timed_out(out)
            raise out from err

    def all_gatherv(self, x, sizes=None, *, out=None, stream=None, compress=None, global_scale=None,
                    dequantize=None):
        """Concatenate along dim 0 rows that differ in number per rank (collective).

        sizes: rows contributed by each rank (0 allowed); None exchanges them first, which syncs the
        host and so cannot be captured in a CUDA graph. compress="nvfp4"|"mxfp4" moves the rows as FP4
        (see fp4ccl.fp4_collectives); global_scale ("per_rank" when None, or "shared") and dequantize
        (True when None: rows in x's dtype; False: a GatheredFP4Tensor) need it.
        An FP4Tensor x is gathered as it is: a GatheredFP4Tensor, or with dequantize=True the rows
        decoded to the dtype it was quantized from (x.dtype). Its global scale is fixed, so global_scale="shared"
        is a ValueError there, as is a compress other than its format.
        out: an array for the rows, or, where the result is FP4 (dequantize=False, or an FP4Tensor x
        without dequantize=True), an earlier such result to gather into.
        """
        _arrays.check_flag(dequantize, "all_gatherv: dequantize")
        if not _is_fp4(x):
            # None: not given; an FP4Tensor's gather keeps that apart (fp4_collectives.all_gatherv).
            if global_scale is None:
                global_scale = "per_rank"
            if dequantize is None:
                dequantize = True
            if compress is None and (not dequantize or global_scale != "per_rank"):
                _fp4_only("all_gatherv", (("dequantize", dequantize, True),
                                          ("global_scale", global_scale, "per_rank")))
        args = (x, sizes, out, stream, compress, global_scale, dequantize)
        if out is not None and self._extras:
            from . import symm_repeat
            serves = (("all_gatherv", "all_gatherv_ce") if compress is None else
                      ("fp4_gather", "fp4_gather_ll") if dequantize else ("fp4_gather_raw",))
            return symm_repeat.dispatch(self, ("all_gatherv", compress, global_scale, dequantize), serves, x, out,
                                        sizes, stream, self._all_gatherv, *args)
        return self._all_gatherv(*args)

    def _all_gatherv(self, x, sizes, out, stream, compress, global_scale, dequantize):
        if compress is not None or _is_fp4(x):
            from . import fp4_collectives
            return fp4_collectives.all_gatherv(self, x, sizes, out=out, stream=stream, compress=compress,
                                               global_scale=global_scale, dequantize=dequantize)
        info = self._input(x)
        if not info.shape:
            raise ValueError("all_gatherv needs an array with at least one dimension, got a 0-d array")
        sizes = self._sizes(sizes, info.shape[0], "all_gatherv")
        if sizes[self._rank] != info.shape[0]:
            raise ValueError(f"all_gatherv: x has {info.shape[0]} rows but sizes[{self._rank}]={sizes[self._rank]}")
        row = math.prod(info.shape[1:])
        rows = (sum(sizes[:self._rank]) * row * info.itemsize, "x as this rank's rows of out")
        out, oinfo = self._output(info, (sum(sizes),) + info.shape[1:], out, in_place=rows)
        self._v.all_gatherv(info, oinfo, [s * row for s in sizes], self._stream(info, stream))
        return out

    def reduce_scatterv(self, x, sizes, op: str = "sum", *, out=None, stream=None, compress=None,
                        rounding="nearest", seed=None):
        """Reduce x over all ranks; rank s gets rows [off_s, off_s + sizes[s]) of the result (collective).

        compress="nvfp4"|"mxfp4": each rank quantizes the rows meant for each peer, an all-to-all moves
        them, and each rank sums the dequantized contributions in fp32 (see fp4ccl.fp4_collectives);
        rounding and seed need it. rounding="stochastic" needs seed= (the same on every rank, so a run
        replays): an int, or a one-element int64/uint64 array on x's device that the kernels read when
        they run (advance it between replays of a CUDA graph; a host array with host x is read at the
        call); with "nearest" a seed changes nothing, so one call site may switch rounding alone.
        x cannot be an FP4Tensor (TypeError): the rows for each peer are quantized as a tensor of their own.
        """
        if _is_fp4(x):
            # Refused, not half-honoured: x's one global scale was chosen for all of its rows, where each
            # destination's rows get their own here, and rounding= and seed= cannot apply to bytes already
            # rounded.
            raise TypeError(f"reduce_scatterv: x is an FP4Tensor; pass the rows unquantized, with compress="
                            f"{x.format!r}: the rows meant for each rank are quantized as a tensor of their own")
        # Checked before the repeat path below, whose key leaves these two out.
        if compress is None and (rounding != "nearest" or seed is not None):
            _fp4_only("reduce_scatterv", (("rounding", rounding, "nearest"), ("seed", seed, None)))
        args = (x, sizes, op, out, stream, compress, rounding, seed)
        if out is not None and self._extras:
            from . import symm_repeat
            if compress is None:
                key, serves = ("reduce_scatterv", op), ("reduce_scatterv", "reduce_scatterv_ce")
            else:
                key, serves = (("reduce_scatterv", op, compress, rounding, seed),
                               ("fp4_reduce_scatter", "fp4_reduce_scatter_ll"))
            return symm_repeat.dispatch(self, key, serves, x, out, sizes, stream, self._reduce_scatterv, *args)
        return self._reduce_scatterv(*args)

    def _reduce_scatterv(self, x, sizes, op, out, stream, compress, rounding, seed):
        if compress is not None:
            from . import fp4_collectives
            return fp4_collectives.reduce_scatterv(self, x, sizes, op, out=out, stream=stream, compress=compress,
                                                   rounding=rounding, seed=seed)
        info = self._input(x)
        self._check_op(op, info)
        if not info.shape:
            raise ValueError("reduce_scatterv needs an array with at least one dimension, got a 0-d array")
        if sizes is None:
            raise TypeError("reduce_scatterv: sizes (rows per rank) is required; use reduce_scatter for equal parts")
        sizes = self._sizes(sizes, 0, "reduce_scatterv")
        if sum(sizes) != info.shape[0]:
            raise ValueError(f"reduce_scatterv: x has {info.shape[0]} rows but sizes add up to {sum(sizes)}")
        row = math.prod(info.shape[1:])
        rows = (-sum(sizes[:self._rank]) * row * info.itemsize, "out as this rank's rows of x")
        out, oinfo = self._output(info, (sizes[self._rank],) + info.shape[1:], out, in_place=rows)
        self._v.reduce_scatterv(info, oinfo, [s * row for s in sizes], op, self._stream(info, stream))
        return out

    @property
    def _v(self):
        """The variable-size collectives: the host backend's own, or NCCL algorithms over its primitives."""
        v = self._extras.get("_v")
        if v is None:
            if self.backend == "host":
                v = self._backend
            else:
                from .vcollectives import NcclVariable
                v = NcclVariable(self._backend, self._rank, self._size, comm=self)
            self._extras["_v"] = v
        return v

    # -- symmetric memory and overlapped matmuls (fp4ccl.symmetric, fp4ccl.overlap) -----------------
    def symmetric_empty(self, shape, dtype="uint8"):
        """Allocate a buffer of the same size on every rank of the node, mapped into each peer (collective)."""
        self._check_open()
        from .symmetric import symmetric_empty
        return symmetric_empty(self, shape, dtype)

    def all_gather_matmul(self, a_shard, bs, gather_dim: int = 0, *, return_a: bool = True,
                          compress: Optional[str] = None, out=None, gathered_rhs: bool = False, stream=None):
        """(a_full or None, [a_full @ b for b in bs]) with the gather overlapped with the matmuls (collective)."""
        self._check_open()
        from .overlap import all_gather_matmul
        return all_gather_matmul(self, a_shard, bs, gather_dim, return_a=return_a, compress=compress, out=out,
                                 gathered_rhs=gathered_rhs, stream=stream)

    def matmul_reduce_scatter(self, a, b, scatter_dim: int = 0, op: str = "sum", *, out=None, stream=None):
        """The reduce-scatter of a @ b along scatter_dim, overlapped with the matmul (collective)."""
        self._check_open()
        from .overlap import matmul_reduce_scatter
        return matmul_reduce_scatter(self, a, b, scatter_dim, op, out=out, stream=stream)

    def send(self, x, peer: int, *, stream=None) -> None:
        """Send x to rank `peer` (point-to-point; pair it with a recv there, or put both in a group)."""
        info = self._input(x)
        peer = self._check_root(peer, "peer")
        self._backend.send(info, peer, self._stream(info, stream))

    def recv(self, x, peer: int, *, stream=None):
        """Receive into x from rank `peer` (point-to-point); returns x."""
        info = self._input(x)
        peer = self._check_root(peer, "peer")
        _arrays.check_writeable(info, "x")
        self._backend.recv(info, peer, self._stream(info, stream))
        return x

    def barrier(self, *, stream=None) -> None:
        """Block until every rank has called barrier (collective; syncs the host)."""
        self._check_open()
        self._backend.barrier(_arrays.stream_handle(stream) if stream is not None else self._default_stream())

    def _default_stream(self) -> int:
        if self._device is None:
            return 0
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.current_stream(self._device).cuda_stream)
        import cupy
        return int(cupy.cuda.get_current_stream().ptr)

    @contextlib.contextmanager
    def group(self):
        """Batch the calls made inside the block into one NCCL group (a context manager; local: the group
        itself moves nothing, and the calls inside it keep their own collective or point-to-point rules).

        If the block raises, its exception propagates at once: the host backend drops the receives the
        group had deferred, and if there were any, or if a send of the group already went out, closes the
        communicator (the pairs' messages would reach later calls); NCCL cannot take back calls it already queued and launches them as the group
        ends, so a peer that waits on them for ever is caught by FP4CCL_TIMEOUT."""
        self._check_open()
        self._backend.group_start()
        try:
            yield self
        except BaseException:
            try:
                self._backend.group_end(abandon=True)
            except Exception as err:  # noqa: BLE001 - the block's own exception is the one to report
                log.debug("closing the group after its block raised: %s", err)
            raise
        if not self._closed:   # destroy() or abort() inside the block already ended the group with the rest
            self._backend.group_end()

    # -- teardown -----------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Release the communicator after pending work completes (collective); later calls raise."""
        if self._closed in ("timeout", "mismatch"):  # its peers cannot be waited for any more: release it locally
            self.abort()
            return
        if self._closed:
            return
        try:
            # the last calls' device-side checks (symm_collectives.Workspace.verify): a call whose ranks
            # disagreed must not pass unreported because no call came after it
            for extra in list(self._extras.values()):
                verify = getattr(extra, "verify", None)
                if verify is not None:
                    verify(wait=True)
        except CallMismatchError:
            self.abort()
            raise
        for cleanup in list(self._extras.values()):
            close = getattr(cleanup, "close", None)
            if close is not None:
                close()
        self._extras.clear()
        self._closed = "destroy"
        self._backend.destroy()
        self._exchange.close()   # after the backend, whose last sends may still travel over it

    def abort(self) -> None:
        """Tear the communicator down now, abandoning pending work (local; use after an error or hang)."""
        if self._closed == "abort":
            return
        self._closed = "abort"
        self._backend.abort()

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """destroy() (collective) when the block ends normally; abort() (local) when it raises, since the
        peers may never reach a collective teardown."""
        if exc_type is None:
            self.destroy()
        else:
            self.abort()


# -- init -------------------------------------------------------------------------------------------

def init(backend: Optional[str] = None, *, device: Optional[int] = None) -> Communicator:
    """Create the world communicator from the launcher's environment (collective over the job).

    backend: "nccl", "host", or None (also FP4CCL_BACKEND): NCCL when CUDA GPUs and NCCL are usable,
    otherwise host. device: the CUDA ordinal; default: see default_device.

    A job may call init() more than once, for communicators used side by side; every rank must then
    make its calls in the same order, and one at a time (not from several threads at once), as MPI
    requires for creating communicators: each communicator's bootstrap keys are numbered by its call.
    """
    info = discover()
    exchange = default_exchange(info)
    return _build(exchange, backend, device, info.local_rank, info.local_size, info.launcher, info)


_SAME = (0, "out=x")   # in_place of the ops whose out has x's shape


def _check_overlap(x: ArrayInfo, out: ArrayInfo, name: str, in_place: Optional[Tuple[int, str]]) -> None:
    """ValueError if the contiguous arrays x and out share memory, unless x starts in_place[0] bytes after
    out's start (the op's in-place form, described by in_place[1])."""
    if x.device != out.device or not x.size or not out.size:
        return
    x_end, out_end = x.ptr + x.size * x.itemsize, out.ptr + out.size * out.itemsize
    if x.ptr >= out_end or out.ptr >= x_end or (in_place is not None and x.ptr - out.ptr == in_place[0]):
        return
    allowed = "" if in_place is None else f"; the in-place form here is {in_place[1]}"
    raise ValueError(f"{name} overlaps the input x in memory ({name} starts {out.ptr - x.ptr:+d} bytes from x), "
                     f"which would corrupt the result{allowed}")


def default_device(world: RankInfo, current_device: Callable[[], int]) -> int:
    """The CUDA device a rank uses when given no device=, for the world and for any sub-group alike.

    Under a launcher (fp4ccl-run, mpirun, srun, torchrun): this process's local rank in the whole job,
    the GPU launchers hand it; a rank's place within a sub-group says nothing about which GPU its
    process owns (global rank 2 of group [0, 2] is local rank 2, not 1). Without launcher variables
    (processes a program started itself): the process's current CUDA device, which such a program
    sets (torch.cuda.set_device), as torch's own NCCL backend expects; `current_device` is asked
    only then.
    """
    return world.local_rank if world.launcher != "single" else current_device()


# init() calls made in this process: the number tells apart the communicators that share a store.
_inits = itertools.count(1)


def default_exchange(info: RankInfo) -> Exchange:
    """The bootstrap exchange of a new communicator, for the launcher that started this job (collective under
    MPI, where it duplicates the caller's communicator).

    Exchanges over a store (fp4ccl-run's, torch's) each get their own keys, numbered by the init() call
    (see init); over MPI each works on its own duplicate of COMM_WORLD."""
    prefix = f"fp4ccl/{info.job_id}/comm{next(_inits)}"
    # Every wait on a bootstrap store, connecting included; 0 waits forever, as everywhere else.
    timeout = env_timeout(unset=STORE_TIMEOUT) or math.inf
    if info.store:
        # The client's own timeout bounds every lookup: the exchange needs none of its own.
        return StoreExchange(_store_client(info, timeout), info.rank, info.size, prefix=prefix)
    if info.size == 1:
        return SingleExchange()
    if info.started_by_mpi or info.launcher == "slurm":
        return MPIExchange(_mpi_world(info))
    if info.launcher == "torchrun":
        return _torchrun_exchange(info, prefix, timeout)
    if info.launcher == "fp4ccl-run":   # its variables without the store it always sets: set by hand, or cut off
        raise RuntimeError(f"FP4CCL_RANK and FP4CCL_WORLD_SIZE say this is rank {info.rank} of a {info.size}-rank "
                           "fp4ccl-run job, but FP4CCL_STORE is not set: start the job with fp4ccl-run, or unset "
                           "those variables (fp4ccl-run sets them for its ranks)")
    raise RuntimeError(f"cannot bootstrap a {info.size}-rank job started by {info.launcher}")


def _mpi_world(info: RankInfo):
    """MPI.COMM_WORLD, once it is the job the launcher describes."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(f"this job was started by {info.launcher}, which needs mpi4py for the bootstrap "
                           f"(pip install 'fp4ccl[mpi]'), or start it with fp4ccl-run") from None
    world = MPI.COMM_WORLD
    size = world.Get_size()
    if size != info.size:
        library = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
        if size != 1:
            why = f"the launcher's variables describe another job than MPI's (mpi4py uses {library})"
        elif info.launcher == "slurm":
            why = (f"each process started MPI on its own: srun runs without --mpi=pmix or --mpi=pmi2, or mpi4py "
                   f"is built for another MPI ({library})")
        else:
            why = (f"each process started MPI on its own: mpi4py is built for another MPI ({library}) than the one "
                   f"whose launcher ({info.launcher}) started the job; rebuild mpi4py against it, or start the job "
                   f"with fp4ccl-run")
        _wrong_world_size(info, size, "MPI.COMM_WORLD", why)
    return world


def _wrong_world_size(info: RankInfo, size: int, group: str, why: str) -> None:
    """Raised before any collective: each rank would otherwise go on in a world of the wrong size (ranks
    that MPI started alone each compute alone, and all_reduce returns their own input)."""
    source = size_variable(info.launcher)
    raise RuntimeError(f"the launcher reports {info.size} ranks ({source}) but {group} has {size}: {why}")


def _store_client(info: RankInfo, timeout: float):
    """A client of the store fp4ccl-run hosts (FP4CCL_STORE), connected within `timeout` seconds."""
    from .bootstrap.store import StoreClient
    try:
        return StoreClient(info.store, info.token, timeout=timeout)
    except TimeoutError as err:
        raise TimeoutError(f"{err}; FP4CCL_STORE names this address, and {ENV_TIMEOUT} sets how long to wait for "
                           f"it (unset: {STORE_TIMEOUT:g} s; 0: forever)") from None


def _torchrun_exchange(info: RankInfo, prefix: str, timeout: float) -> Exchange:
    """Over torch.distributed's store: the program's own, once it has called init_process_group, else
    one on MASTER_ADDR:MASTER_PORT (torchrun's agent serves it; without an agent, rank 0 does)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        # Its store already joins these ranks; under env:// its rank 0 (or torchrun's agent) serves it on
        # MASTER_PORT, where a second server would fail to bind.
        size = dist.get_world_size()
        if size != info.size:
            _wrong_world_size(info, size, "torch.distributed's default group",
                              "init_process_group was given another world_size")
        # Its own timeout is its process group's: the exchange's bounds each lookup instead.
        return StoreExchange(TorchStoreAdapter(dist.distributed_c10d._get_default_store()), dist.get_rank(), size,
                             prefix=prefix, timeout=timeout)
    addr = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise RuntimeError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: start the job with "
                           "torchrun or fp4ccl-run, or set them")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    # multi_tenant, as torch's own env:// rendezvous asks: an init_process_group called later in this
    # process then shares this server on MASTER_PORT instead of failing to bind it.
    store = dist.TCPStore(addr, int(port), info.size, is_master=(not agent and info.rank == 0),
                          timeout=torch_timedelta(timeout), wait_for_workers=False, multi_tenant=True)
    # Built with the timeout: a second one on the exchange would add a wait to every lookup.
    return StoreExchange(TorchStoreAdapter(store), info.rank, info.size, prefix=prefix)


def _mpi_shared_type():
    from mpi4py import MPI
    return MPI.COMM_TYPE_SHARED


def gpus_usable() -> Tuple[int, str]:
    """(CUDA devices usable through CuPy with NCCL loadable, why there are none when that is 0).

    The reason names what failed, with the exception's type and message, and is logged at INFO."""
    count, why = _probe_gpus()
    if not count:
        log.info("no usable GPU: %s", why)
    return count, why


def _probe_gpus() -> Tuple[int, str]:
    try:
        import cupy
    except ImportError as err:
        return 0, (f"CuPy cannot be imported ({type(err).__name__}: {err}); install fp4ccl's cuda13 or cuda12 "
                   f"extra")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # noqa: BLE001 - no driver, a driver too old, ...: each means no usable GPU
        return 0, f"CUDA is not usable ({type(err).__name__}: {err})"
    if count == 0:
        return 0, "no CUDA device is visible"
    try:
        from . import nccl
        nccl.load()
    except Exception as err:  # noqa: BLE001 - the loader's own message says where it looked and what to set
        return 0, f"{count} CUDA device(s), but NCCL cannot be loaded ({type(err).__name__}: {err})"
    return count, ""


def _build(exchange: Exchange, backend: Optional[str], device: Optional[int], local_rank: int,
           local_size: int, launcher: str, world: RankInfo) -> Communicator:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be 'nccl', 'host' or None, got {backend!r}")
    from_env = os.environ.get("FP4CCL_BACKEND") if not backend else None
    requested = (backend or from_env or "auto").lower()
    # Errors name what the user wrote and where: a value from the environment is easy to forget.
    given = f"FP4CCL_BACKEND={from_env!r}" if from_env else f"backend={backend!r}"
    if requested not in ("auto", "nccl", "host"):
        unset = "unset it" if from_env else "None"
        raise ValueError(f"{given} is not one of 'nccl', 'host' (or {unset} for automatic)")
    ngpu, why = gpus_usable() if requested != "host" else (0, "")
    chosen = requested if requested != "auto" else ("nccl" if ngpu else "host")
    if chosen == "nccl" and ngpu == 0:
        raise RuntimeError(f"{given} needs CUDA GPUs, CuPy and NCCL; none usable here: {why}")
    # Ranks must agree, or the first collective would hang: fail everywhere instead.
    choices = [c.decode() for c in exchange.all_gather_bytes(chosen.encode())]
    if len(set(choices)) > 1:
        detail = ", ".join(f"rank {r}: {c}" for r, c in enumerate(choices))
        raise RuntimeError(f"ranks chose different backends ({detail}); set FP4CCL_BACKEND on every rank")
    log.info("rank %d/%d backend=%s launcher=%s", exchange.rank, exchange.size, chosen, launcher)
    if chosen == "host":
        from .backends.host import HostBackend
        return Communicator(HostBackend(exchange), exchange, local_rank=local_rank, local_size=local_size,
                            device=None, launcher=launcher)
    if device is None:
        device = default_device(world, _current_device)
    if not 0 <= device < ngpu:
        raise ValueError(f"device={device} (local rank {world.local_rank} of the job) but only {ngpu} CUDA device(s) "
                         f"are visible; run at most {ngpu} ranks per node, and do not hide GPUs with "
                         f"CUDA_VISIBLE_DEVICES")
    _make_current(device)
    from .backends.nccl import NcclBackend
    return Communicator(NcclBackend(exchange, exchange.rank, exchange.size, device), exchange,
                        local_rank=local_rank, local_size=local_size, device=device, launcher=launcher)


def _current_device() -> int:
    """The calling thread's current CUDA device (torch's, where the program has started torch's CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    import cupy
    return cupy.cuda.runtime.getDevice()


def _make_current(device: int) -> None:
    """Make `device` current for CuPy and, if the program uses it, torch, so new arrays land on it."""
    import cupy
    cupy.cuda.Device(device).use()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.cuda.set_device(device)
