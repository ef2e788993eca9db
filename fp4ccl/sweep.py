"""fp4ccl-sweep: an nccl-tests-style latency/bandwidth sweep of fp4ccl's collectives and baselines.

A normal rank program: start it with fp4ccl-run, mpirun, srun or torchrun, or alone (1 rank):

    fp4ccl-run -n 4 -m fp4ccl.sweep -b 1K -e 1G -f 4 -n 20 -w 5 -d bfloat16

Every (op, size) is run through fp4ccl's public Communicator and, in the same job, through the
available baselines (raw NCCL via fp4ccl's own ctypes binding, torch.distributed, mpi4py), one
table section per op and one row per size per implementation. Each case: warm-up calls, timed
calls (CUDA events per call on GPU, perf_counter around synchronous calls on the host), the median
per rank, the max over ranks; then a check pass on fresh inputs with a poisoned output. Inputs are
small integers hashed from (seed, rank, index), chosen so sums and products stay exact in the data
type, so every rank computes the expected output itself and `#wrong` counts every wrong element.

Ops live in `OPS` (name -> SweepOp); an FP4 op registers a subclass with `register_op` and may
report `logical_bytes` (the bf16 size it stands for): the table then shows `logical(B)` and a
`speedup` over the baseline op run on exactly that size. See docs/SWEEP.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import ctypes
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fp4ccl._arrays import ITEMSIZE, numpy_dtype

PROG = "fp4ccl-sweep"
IMPL_ORDER = ("fp4ccl", "nccl", "torch", "mpi")
# Who runs the plain op that a speedup is measured against: NCCL where there is one (the floor fp4ccl is
# measured against), else fp4ccl's own op (the host backend), then the other baselines.
REFERENCE_ORDER = ("nccl", "fp4ccl", "torch", "mpi")
DEFAULT_OPS = "all_gather,reduce_scatter,all_reduce"
# Large buffers are generated and checked in slices so the int64/float64 temporaries stay bounded
# (a 1 GiB bf16 buffer is 512 Mi elements; one int64 temporary of it would be 4 GiB).
CHUNK = 1 << 24


class SweepError(Exception):
    """A problem reported as one line and a non-zero exit."""


# -- sizes and arguments ----------------------------------------------------------------------------

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'1K' -> 1024, '16M', '1G', '4096', '1.5M', '64KiB', '2GB' (binary multiples, like nccl-tests)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G/T suffix")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}iB"
    return f"{n} B"


def size_steps(minbytes: int, maxbytes: int, factor: float, stepbytes: Optional[int]) -> List[int]:
    """The nominal sizes of the sweep: multiply by `factor`, or add `stepbytes` when it is given."""
    sizes, s = [], minbytes
    while s <= maxbytes:
        sizes.append(s)
        nxt = s + stepbytes if stepbytes else int(s * factor)
        if nxt <= s:
            break
        s = nxt
    return sizes


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SweepError(f"{message} (see {PROG} --help)")


def _size_arg(text):
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:   # a sweep from 0 B, or by steps of 0 B, would time nothing and report success
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least 1 byte")
    return value


def _positive(kind):
    def conv(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not 0 < v < math.inf:   # nan and inf too
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
        return v
    return conv


def _nonneg_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def build_parser() -> _Parser:
    p = _Parser(prog=PROG, allow_abbrev=False, description=(
        "nccl-tests-style sweep of fp4ccl's collectives against plain NCCL / torch.distributed / MPI. "
        "Run it as a rank program: fp4ccl-run -n 4 -m fp4ccl.sweep [flags]."))
    p.add_argument("-b", "--minbytes", type=_size_arg, default=None, help="smallest size (default 1K)")
    p.add_argument("-e", "--maxbytes", type=_size_arg, default=None,
                   help="largest size (default 1G on GPU, 16M on the host backend)")
    p.add_argument("-f", "--stepfactor", type=_positive(float), default=None, help="size multiplier (default 4)")
    p.add_argument("-i", "--stepbytes", type=_size_arg, default=None, help="size increment (overrides -f)")
    p.add_argument("-n", "--iters", type=_positive(int), default=None,
                   help="timed iterations per case (default 20 on GPU, 10 on host)")
    p.add_argument("-w", "--warmup_iters", type=_nonneg_int, default=None,
                   help="warm-up iterations per case (default 5 on GPU, 2 on host)")
    p.add_argument("-c", "--check", type=int, choices=(0, 1), default=1, help="check results (default 1)")
    p.add_argument("-d", "--datatype", default="bfloat16", help="data type: " + ", ".join(
        k for k in ITEMSIZE if k != "bool"))
    p.add_argument("-o", "--op", default="sum", choices=("sum", "prod", "max", "min", "avg"),
                   help="reduction op (default sum)")
    p.add_argument("-r", "--root", default="0", help="root rank for broadcast/reduce, or 'all' (default 0)")
    p.add_argument("--ops", default=DEFAULT_OPS, help=f"comma list of ops (default {DEFAULT_OPS}); "
                   "'all' for every registered op")
    p.add_argument("--backend", default=None, choices=("nccl", "host"), help="fp4ccl backend (default: automatic)")
    p.add_argument("--baselines", default="auto",
                   help="comma list of nccl,torch,mpi, 'none', or 'auto' (those available; the default)")
    p.add_argument("--array", default=None, choices=("torch", "cupy"), help="GPU array library (default torch if present)")
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE", help="write every row to FILE")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot time and busbw against size (matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="seed of the input values (default 0)")
    p.add_argument("-G", "--cudagraph", type=_nonneg_int, default=0, metavar="N",
                   help="capture N calls in a CUDA graph and time its replays (torch, fp4ccl/nccl rows)")
    p.add_argument("--overhead", action="store_true",
                   help="also measure the host time spent per collective call (tiny all_reduce, no sync)")
    p.add_argument("--inject-fault", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and validate the flags; SweepError (one line) on anything wrong."""
    args = build_parser().parse_args(argv)
    from fp4ccl._arrays import dtype_name
    try:
        args.datatype = dtype_name(args.datatype)
    except TypeError as e:
        raise SweepError(f"-d/--datatype: {e}") from None
    if args.datatype == "bool":
        raise SweepError("-d/--datatype: bool is not swept; use uint8")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if ops == ["all"]:
        ops = list(OPS)
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        raise SweepError(f"--ops: unknown op(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(OPS)}")
    args.ops = ops
    if args.root != "all":
        try:
            args.root = int(args.root)
        except ValueError:
            raise SweepError(f"-r/--root: {args.root!r} is neither a rank nor 'all'") from None
        if args.root < 0:
            raise SweepError(f"-r/--root: {args.root} must be >= 0")
    b = args.baselines.strip().lower()
    if b in ("auto", "none", ""):
        args.baselines = b or "none"
    else:
        names = [x.strip() for x in b.split(",") if x.strip()]
        bad = [x for x in names if x not in IMPL_ORDER[1:]]
        if bad:
            raise SweepError(f"--baselines: unknown {', '.join(bad)}; choose from nccl, torch, mpi, none, auto")
        args.baselines = names
    if args.minbytes is not None and args.maxbytes is not None and args.minbytes > args.maxbytes:
        raise SweepError(f"-b/--minbytes {args.minbytes} is larger than -e/--maxbytes {args.maxbytes}")
    if args.op == "avg" and args.datatype not in ("float64", "float32", "float16", "bfloat16",
                                                  "float8_e4m3fn", "float8_e5m2"):
        raise SweepError(f"-o avg needs a floating data type, got {args.datatype}")
    for flag, path in (("--json", args.json_file), ("--plot", args.plot)):
        if path is not None:
            _check_output_path(flag, path)
    return args


def _check_output_path(flag: str, path: str) -> None:
    """The files are written after the last case, so a path that cannot be written would cost the whole
    sweep's results: refuse it now, before any communicator is made."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SweepError(f"{flag}: {path} is a directory; name a file")
    if not os.path.isdir(directory):
        raise SweepError(f"{flag}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise SweepError(f"{flag}: {path if os.path.exists(path) else 'directory ' + directory} is not writable")


def apply_defaults(args: argparse.Namespace, gpu: bool) -> None:
    """Fill the size/iteration flags left unset; the host defaults keep the README's job under a minute."""
    if args.minbytes is None:
        args.minbytes = 1024
    if args.maxbytes is None:
        args.maxbytes = max(args.minbytes, (1 << 30) if gpu else (16 << 20))
    if args.minbytes > args.maxbytes:
        raise SweepError(f"-b/--minbytes {args.minbytes} is larger than -e/--maxbytes {args.maxbytes}")
    if args.stepfactor is None:
        args.stepfactor = 4.0
    if args.stepbytes is None and args.stepfactor <= 1:
        raise SweepError(f"-f/--stepfactor {args.stepfactor:g} must be > 1 unless -i/--stepbytes is given")
    if args.iters is None:
        args.iters = 20 if gpu else 10
    if args.warmup_iters is None:
        args.warmup_iters = 5 if gpu else 2


# -- input values ------------------------------------------------------------------------------------

_MASK = 0x7FFFFFFF
_MUL = 0x45D9F3B


def _mix(h):
    # 31-bit xorshift-multiply rounds: every product stays below 2**58, so int64 arithmetic never
    # overflows and numpy, torch and CuPy give the same values bit for bit (Python ints too).
    h = h & _MASK
    h = ((h ^ (h >> 16)) * _MUL) & _MASK
    h = ((h ^ (h >> 16)) * _MUL) & _MASK
    return h ^ (h >> 16)


# Largest integer N such that 1..N are all exact in the type (floats: 2**(mantissa bits + 1)).
_EXACT = {"float64": 2 ** 53, "float32": 2 ** 24, "float16": 2048, "bfloat16": 256, "float8_e4m3fn": 16,
          "float8_e5m2": 8, "int8": 127, "uint8": 255, "int16": 32767, "uint16": 65535,
          "int32": 2 ** 31 - 1, "uint32": 2 ** 32 - 1, "int64": 2 ** 63 - 1, "uint64": 2 ** 64 - 1}
# Largest power of two a product may reach.
_POW2 = {"float8_e4m3fn": 256, "float8_e5m2": 2 ** 15, "float16": 2 ** 15}
# Relative tolerance for avg, which divides by the rank count and so rounds: two ulps.
_EPS = {"float64": 2 ** -51, "float32": 2 ** -22, "float16": 2 ** -9, "bfloat16": 2 ** -6,
        "float8_e4m3fn": 2 ** -2, "float8_e5m2": 2 ** -1}
# Values stay under the all-ones byte pattern, which is the poison (NaN for floats, -1 / max for ints).
_VALUE_CAP = 200


@dataclass(frozen=True)
class ValueSet:
    """Input values 1..top (or {1, 2} for products), exact under the op over n ranks.

    With `spread` = (n, k, low, high), each element instead gets `high` from exactly k of the n ranks (which k
    varies with the element) and `low` from the others: for a sum or product over more ranks than a type
    holds exactly (e.g. 2**n past the type's range), the result k * high or high**k still is, and a rank that
    ignored its peers still leaves wrong elements."""

    top: int
    pow2: bool = False
    spread: Optional[Tuple[int, int, int, int]] = None

    def of(self, key: int, idx, rank: int = 0, shared_key: int = 0):
        if self.spread is not None:
            n, k, low, high = self.spread
            return low + (high - low) * ((_mix(idx + shared_key) + rank) % n < k)
        h = _mix(idx + key)
        if self.pow2:
            return (h & 1) + 1
        return h % self.top + 1


def value_set(dtype: str, redop: Optional[str], n: int) -> ValueSet:
    limit = min(_EXACT[dtype], _VALUE_CAP)
    if redop in ("sum", "avg"):
        if _EXACT[dtype] < n:   # n ones would not add up exactly: ones from only as many ranks as stay exact
            return ValueSet(1, spread=(n, _EXACT[dtype], 0, 1))
        return ValueSet(min(_EXACT[dtype] // n, _VALUE_CAP))
    if redop == "prod":
        room = _POW2.get(dtype, min(_EXACT[dtype], 2 ** 40) if dtype.startswith(("int", "uint")) else 2 ** 40)
        if 2 ** n <= room:
            return ValueSet(2, pow2=True)
        return ValueSet(2, spread=(n, room.bit_length() - 1, 1, 2))   # twos from log2(room) ranks
    return ValueSet(limit)


def case_key(seed: int, rank: int, salt: int) -> int:
    """The per-rank hash offset; `salt` separates ops, sizes and the timing/check passes."""
    return int(_mix(_mix(seed * 1000003 + salt) + rank * 7919 + 1))


# -- array frameworks ------------------------------------------------------------------------------

class Frame:
    """What the sweep needs from an array library: 1-D buffers, int64 arithmetic, timing."""

    name = ""
    gpu = False

    def empty(self, n: int, dtype: str): raise NotImplementedError
    def arange(self, start: int, stop: int): raise NotImplementedError
    def cast(self, ints, dtype: str): raise NotImplementedError
    def to_f64(self, a, dtype: str): raise NotImplementedError
    def count_true(self, mask) -> int: raise NotImplementedError
    def poison(self, a) -> None: raise NotImplementedError
    def copy(self, dst, src) -> None: raise NotImplementedError
    def small(self, values: np.ndarray): raise NotImplementedError
    def to_numpy(self, a) -> np.ndarray: raise NotImplementedError
    def maximum(self, a, b): raise NotImplementedError
    def minimum(self, a, b): raise NotImplementedError
    def abs(self, a): raise NotImplementedError
    def sync(self) -> None: pass
    def timer(self, n: int) -> "Timer": return HostTimer(n)


class Timer:
    def start(self, i: int) -> None: ...
    def stop(self, i: int) -> None: ...
    def elapsed_us(self) -> List[float]: ...


class HostTimer(Timer):
    def __init__(self, n):
        self.t0, self.t1 = [0.0] * n, [0.0] * n

    def start(self, i):
        self.t0[i] = time.perf_counter()

    def stop(self, i):
        self.t1[i] = time.perf_counter()

    def elapsed_us(self):
        return [(b - a) * 1e6 for a, b in zip(self.t0, self.t1)]


class NumpyFrame(Frame):
    name = "numpy"

    def empty(self, n, dtype):
        return np.empty(n, dtype=numpy_dtype(dtype))

    def arange(self, start, stop):
        return np.arange(start, stop, dtype=np.int64)

    def cast(self, ints, dtype):
        if dtype.startswith("float") or dtype == "bfloat16":
            return ints.astype(np.float64).astype(numpy_dtype(dtype))
        return ints.astype(numpy_dtype(dtype))

    def to_f64(self, a, dtype):
        return a.astype(np.float64)

    def count_true(self, mask):
        return int(np.count_nonzero(mask))

    def poison(self, a):
        a.view(np.uint8).fill(0xFF)

    def copy(self, dst, src):
        dst[...] = src

    def small(self, values):
        return np.ascontiguousarray(values)

    def to_numpy(self, a):
        return np.asarray(a)

    maximum, minimum, abs = staticmethod(np.maximum), staticmethod(np.minimum), staticmethod(np.abs)


class TorchFrame(Frame):
    name = "torch"

    def __init__(self, device: Optional[int]):
        import torch
        self.torch = torch
        self.gpu = device is not None
        self.device = torch.device("cuda", device) if self.gpu else torch.device("cpu")

    def _dt(self, dtype):
        return getattr(self.torch, dtype)

    def empty(self, n, dtype):
        return self.torch.empty(n, dtype=self._dt(dtype), device=self.device)

    def arange(self, start, stop):
        return self.torch.arange(start, stop, dtype=self.torch.int64, device=self.device)

    def cast(self, ints, dtype):
        if dtype.startswith("float8"):
            return ints.to(self.torch.float32).to(self._dt(dtype))
        return ints.to(self._dt(dtype))

    def to_f64(self, a, dtype):
        if dtype.startswith("float8"):
            a = a.to(self.torch.float32)
        return a.to(self.torch.float64)

    def count_true(self, mask):
        return int(mask.sum().item())

    def poison(self, a):
        a.view(self.torch.uint8).fill_(0xFF)

    def copy(self, dst, src):
        dst.copy_(src)

    def small(self, values):
        return self.torch.from_numpy(np.ascontiguousarray(values)).to(self.device)

    def to_numpy(self, a):
        return a.cpu().numpy()

    def maximum(self, a, b):
        return self.torch.maximum(a, b)

    def minimum(self, a, b):
        return self.torch.minimum(a, b)

    def abs(self, a):
        return a.abs()

    def sync(self):
        if self.gpu:
            self.torch.cuda.synchronize(self.device)

    def timer(self, n):
        if not self.gpu:
            return HostTimer(n)
        return _EventTimer(n, lambda: self.torch.cuda.Event(enable_timing=True),
                           lambda ev: ev.record(), lambda a, b: a.elapsed_time(b), self.sync)


class CupyFrame(Frame):
    name = "cupy"
    gpu = True

    def __init__(self, device: int):
        import cupy
        self.cp = cupy
        self.device = device

    def empty(self, n, dtype):
        if dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            raise SweepError(f"-d {dtype} on GPU needs torch (CuPy has no {dtype}); install torch or pick another type")
        return self.cp.empty(n, dtype=numpy_dtype(dtype))

    def arange(self, start, stop):
        return self.cp.arange(start, stop, dtype=self.cp.int64)

    def cast(self, ints, dtype):
        return ints.astype(numpy_dtype(dtype))

    def to_f64(self, a, dtype):
        return a.astype(self.cp.float64)

    def count_true(self, mask):
        return int(self.cp.count_nonzero(mask))

    def poison(self, a):
        a.view(self.cp.uint8).fill(0xFF)

    def copy(self, dst, src):
        dst[...] = src

    def small(self, values):
        return self.cp.asarray(np.ascontiguousarray(values))

    def to_numpy(self, a):
        return self.cp.asnumpy(a)

    def maximum(self, a, b):
        return self.cp.maximum(a, b)

    def minimum(self, a, b):
        return self.cp.minimum(a, b)

    def abs(self, a):
        return self.cp.abs(a)

    def sync(self):
        self.cp.cuda.get_current_stream().synchronize()

    def timer(self, n):
        cp = self.cp
        return _EventTimer(n, cp.cuda.Event, lambda ev: ev.record(cp.cuda.get_current_stream()),
                           cp.cuda.get_elapsed_time, self.sync)


class _EventTimer(Timer):
    """CUDA events recorded on the current stream around each call; read after one sync."""

    def __init__(self, n, make, record, elapsed_ms, sync):
        self.a = [make() for _ in range(n)]
        self.b = [make() for _ in range(n)]
        self.record, self.elapsed_ms, self.sync = record, elapsed_ms, sync

    def start(self, i):
        self.record(self.a[i])

    def stop(self, i):
        self.record(self.b[i])

    def elapsed_us(self):
        self.sync()
        return [self.elapsed_ms(a, b) * 1e3 for a, b in zip(self.a, self.b)]


# -- cases and the op registry -------------------------------------------------------------------------

@dataclass
class Sizing:
    """One size of one op: what the table prints and how large the buffers are (in elements)."""

    nbytes: int                  # the size(B) column, as nccl-tests defines it for the op
    count: int                   # the count column
    send_count: int
    recv_count: int
    logical_bytes: Optional[int] = None   # for ops that move a compressed form of a bf16 payload


@dataclass
class Case:
    """Everything one run of one op at one size needs; ops read it, implementations run on it."""

    frame: Frame
    dtype: str
    redop: Optional[str]
    root: int
    rank: int
    nranks: int
    sizing: Sizing
    values: ValueSet
    seed: int
    salt: int
    send: object = None
    recv: object = None
    extra: dict = field(default_factory=dict)   # op-specific state (e.g. FP4 scales)

    def key(self, rank: int) -> int:
        return case_key(self.seed, rank, self.salt)

    def input_values(self, rank: int, start: int, stop: int):
        """The (int64) values rank `rank` puts at send[start:stop]."""
        return self.values.of(self.key(rank), self.frame.arange(start, stop), rank, self.key(-1))


class SweepOp:
    """One collective the sweep knows. Subclass and `register_op(MyOp())` to add one.

    name          registry key, the --ops name and the table's section title
    reduces       takes -o/--op (the redop column)
    rooted        takes -r/--root (the root column; 'all' sweeps every rank)
    impls         implementations that can run it (a baseline without a method of this name skips it)
    baseline_op   for ops with logical_bytes: the op that, run on exactly logical_bytes, is the
                  reference of the speedup column (e.g. "all_gather" for an FP4 all-gather)
    split         the buffer is cut into one part per rank (for the note on sizes too small to run)
    """

    name = ""
    reduces = False
    rooted = False
    impls: Sequence[str] = IMPL_ORDER
    baseline_op: Optional[str] = None
    split = False   # the buffer is cut into one part per rank (sizes round down to a multiple of n)

    def busbw_factor(self, n: int) -> float:
        return 1.0

    def sizing(self, nbytes: int, itemsize: int, n: int) -> Optional[Sizing]:
        """The buffers for a nominal size, or None to skip it (too small for n ranks)."""
        count = nbytes // itemsize
        return Sizing(count * itemsize, count, count, count) if count else None

    def smallest(self, itemsize: int, n: int) -> tuple:
        """(the smallest nominal size sizing() takes, what it holds): the note on skipped sizes says both."""
        return (itemsize * n, "one element per rank") if self.split else (itemsize, "one element")

    def setup(self, case: Case) -> None:
        """Allocate case.send / case.recv."""
        f = case.frame
        case.send = f.empty(case.sizing.send_count, case.dtype)
        case.recv = f.empty(case.sizing.recv_count, case.dtype)

    def fill(self, case: Case) -> None:
        """Write this rank's inputs (from seed, rank, index) into case.send."""
        n = case.sizing.send_count
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            case.send[s:e] = case.frame.cast(case.input_values(case.rank, s, e), case.dtype)

    def bind(self, impl: "Impl", case: Case) -> Callable[[], object]:
        """A zero-argument callable that runs the op once on `impl` (no host sync on GPU).

        The default calls the implementation's method of the op's name; an op that no
        implementation knows by name (an FP4 op) overrides this and uses e.g. `impl.comm`.
        """
        method = getattr(impl, self.name, None)
        if method is None:
            raise Unsupported(f"{impl.name} has no {self.name}")
        return method(case)

    def expected(self, case: Case, start: int, stop: int):
        """Expected recv[start:stop] on this rank as int64 (or float64) values; None: nothing to check."""
        raise NotImplementedError

    def output(self, case: Case):
        """The buffer the check reads (None when this rank has no output, e.g. reduce off-root)."""
        return case.recv

    def check(self, case: Case) -> int:
        """Count this rank's wrong output elements (NaN never matches; poison counts as wrong)."""
        out = self.output(case)
        if out is None:
            return 0
        f, wrong = case.frame, 0
        tol = _EPS[case.dtype] if case.redop == "avg" else 0.0
        n = case.sizing.recv_count
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            exp = self.expected(case, s, e)
            if exp is None:
                continue
            exp = f.to_f64(exp, "int64")
            got = f.to_f64(out[s:e], case.dtype)
            ok = f.abs(got - exp) <= f.abs(exp) * tol
            wrong += (e - s) - f.count_true(ok)
        return wrong


def _combine(case: Case, start: int, stop: int, ranks=None, offset: int = 0):
    """The reduction over ranks of their inputs at [offset+start, offset+stop), exactly, in int64 / float64."""
    ranks = range(case.nranks) if ranks is None else ranks
    acc = None
    f = case.frame
    for q in ranks:
        v = case.input_values(q, offset + start, offset + stop)
        if acc is None:
            acc = v
        elif case.redop in ("sum", "avg"):
            acc = acc + v
        elif case.redop == "prod":
            acc = acc * v
        elif case.redop == "max":
            acc = f.maximum(acc, v)
        else:
            acc = f.minimum(acc, v)
    if case.redop == "avg":
        acc = f.to_f64(acc, "int64") / case.nranks
    return acc


def _gathered(case: Case, start: int, stop: int, values) -> object:
    """Expected [start, stop) of an equal-parts gather: rank r's `values(r, i, j)` sit at r * per + i."""
    per = case.sizing.send_count
    parts, pos = [], start
    while pos < stop:   # a slice may span several ranks' blocks
        r, i = divmod(pos, per)
        end = min(stop, (r + 1) * per)
        parts.append(values(r, i, i + end - pos))
        pos = end
    return _cat(case.frame, parts)


class AllGather(SweepOp):
    name = "all_gather"
    split = True

    def busbw_factor(self, n):
        return (n - 1) / n

    def sizing(self, nbytes, itemsize, n):
        per = nbytes // itemsize // n
        return Sizing(per * n * itemsize, per * n, per, per * n) if per else None

    def expected(self, case, start, stop):
        return _gathered(case, start, stop, case.input_values)


class ReduceScatter(SweepOp):
    name = "reduce_scatter"
    split = True
    reduces = True

    def busbw_factor(self, n):
        return (n - 1) / n

    def sizing(self, nbytes, itemsize, n):
        per = nbytes // itemsize // n
        return Sizing(per * n * itemsize, per * n, per * n, per) if per else None

    def expected(self, case, start, stop):
        return _combine(case, start, stop, offset=case.rank * case.sizing.recv_count)


class AllReduce(SweepOp):
    name = "all_reduce"
    reduces = True

    def busbw_factor(self, n):
        return 2 * (n - 1) / n

    def expected(self, case, start, stop):
        return _combine(case, start, stop)


class Broadcast(SweepOp):
    name = "broadcast"
    rooted = True

    def expected(self, case, start, stop):
        return case.input_values(case.root, start, stop)


class Reduce(SweepOp):
    name = "reduce"
    reduces = True
    rooted = True

    def output(self, case):
        return case.recv if case.rank == case.root else None

    def expected(self, case, start, stop):
        return _combine(case, start, stop)


class AllToAll(SweepOp):
    name = "all_to_all"
    split = True

    def busbw_factor(self, n):
        return (n - 1) / n

    def sizing(self, nbytes, itemsize, n):
        per = nbytes // itemsize // n
        return Sizing(per * n * itemsize, per * n, per * n, per * n) if per else None

    def expected(self, case, start, stop):
        per = case.sizing.send_count // case.nranks
        parts, pos = [], start
        while pos < stop:   # block j of the output is rank j's block `rank` of its input
            j, i = divmod(pos, per)
            end = min(stop, (j + 1) * per)
            parts.append(case.input_values(j, case.rank * per + i, case.rank * per + i + end - pos))
            pos = end
        return _cat(case.frame, parts)


def _cat(frame: Frame, parts):
    if len(parts) == 1:
        return parts[0]
    if frame.name == "torch":
        return frame.torch.cat(parts)
    if frame.name == "cupy":
        return frame.cp.concatenate(parts)
    return np.concatenate(parts)


OPS: Dict[str, SweepOp] = {}


def register_op(op: SweepOp) -> SweepOp:
    """Add (or replace) an op in the registry; later modules (FP4 ops) call this at import."""
    if not op.name:
        raise ValueError("a SweepOp needs a name")
    OPS[op.name] = op
    return op


for _op in (AllGather(), ReduceScatter(), AllReduce(), Broadcast(), Reduce(), AllToAll()):
    register_op(_op)


# -- variable-size and FP4 ops (fp4ccl only; their speedup column compares with the plain op) ----------

def uneven_rows(total: int, n: int) -> List[int]:
    """A fixed uneven split of `total` rows: ranks alternate 1.25x and 0.75x of the mean (sum kept)."""
    if n == 1:
        return [total]
    mean = total // n
    sizes = [mean + (mean // 4 if r % 2 == 0 else -(mean // 4)) for r in range(n)]
    sizes[-1] += total - sum(sizes)
    return sizes


def uneven_busbw_factor(n: int) -> float:
    """busbw / algbw of a v-collective over uneven_rows: the share of the total that crosses the
    busiest rank's link whatever the algorithm (total minus the smallest share: the rank with the
    fewest rows must receive all the others' in a gather, and send its contribution to all the others'
    in a reduce-scatter). Even sizes give nccl-tests' (n-1)/n; the sweep's split gives 13/16 at 4 ranks."""
    sizes = uneven_rows(1 << 20, n)
    return (sum(sizes) - min(sizes)) / sum(sizes)


class _Fp4ccOnly(SweepOp):
    impls = ("fp4ccl",)

    def bind(self, impl, case):
        if impl.name != "fp4ccl":
            raise Unsupported(f"{impl.name} has no {self.name}")
        return self.call(impl.comm, case)


class _UnevenOp(_Fp4ccOnly):
    """A v-collective over the sweep's fixed uneven split; `uneven` names the per-rank side."""

    uneven = "send_count"
    split = True

    def busbw_factor(self, n):
        return uneven_busbw_factor(n)

    def sizing(self, nbytes, itemsize, n):
        per = nbytes // itemsize // n
        if not per:
            return None
        total = per * n
        return Sizing(total * itemsize, total, total, total, logical_bytes=total * itemsize)

    def setup(self, case):
        case.extra["sizes"] = sizes = uneven_rows(case.sizing.count, case.nranks)
        case.extra["offsets"] = [sum(sizes[:r]) for r in range(case.nranks)]
        case.sizing = dataclasses.replace(case.sizing, **{self.uneven: sizes[case.rank]})
        super().setup(case)


class AllGatherV(_UnevenOp):
    name = "all_gatherv"
    baseline_op = "all_gather"

    def call(self, comm, case):
        s, r, sizes = case.send, case.recv, case.extra["sizes"]
        return lambda: comm.all_gatherv(s, sizes, out=r)

    def expected(self, case, start, stop):
        sizes, offs = case.extra["sizes"], case.extra["offsets"]
        parts, pos = [], start
        while pos < stop:
            r = max(q for q in range(case.nranks) if offs[q] <= pos and sizes[q] > 0)
            end = min(stop, offs[r] + sizes[r])
            parts.append(case.input_values(r, pos - offs[r], end - offs[r]))
            pos = end
        return _cat(case.frame, parts)


class ReduceScatterV(_UnevenOp):
    name = "reduce_scatterv"
    reduces = True
    baseline_op = "reduce_scatter"
    uneven = "recv_count"

    def call(self, comm, case):
        s, r, sizes, op = case.send, case.recv, case.extra["sizes"], case.redop
        return lambda: comm.reduce_scatterv(s, sizes, op, out=r)

    def expected(self, case, start, stop):
        return _combine(case, start, stop, offset=case.extra["offsets"][case.rank])


FP4_K = 1024
# E2M1's values; with a 6 in every block both formats represent a block exactly (block scale 1 x S_dec),
# so a quantize -> wire -> dequantize round trip must return the input bit for bit.
_E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float64)


def _fp4_values(case, rank: int, start: int, stop: int):
    f = case.frame
    ints = case.input_values(rank, start, stop)
    grid = case.extra.get("grid")
    if grid is None:
        grid = case.extra["grid"] = f.small(_E2M1)
    vals = grid[ints % len(_E2M1)]
    vals[f.arange(start, stop) % 16 == 0] = 6.0
    return vals


class _Fp4Op(_Fp4ccOnly):
    fmt = "nvfp4"

    def busbw_factor(self, n):
        return (n - 1) / n

    def _rows(self, nbytes, itemsize, n):
        return nbytes // itemsize // n // FP4_K

    def smallest(self, itemsize, n):
        return FP4_K * itemsize * n, f"one {FP4_K}-element row per rank"

    def wire(self, rows: int, n: int) -> int:
        from .formats.tensor import packed_layout
        return packed_layout(rows, FP4_K, self.fmt).total_bytes * n

    def fill(self, case):
        n = case.sizing.send_count
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            case.send[s:e] = case.frame.cast(_fp4_values(case, case.rank, s, e), case.dtype)

    def setup(self, case):
        if case.dtype not in ("bfloat16", "float16", "float32"):
            raise Unsupported(f"{self.name} takes bfloat16, float16 or float32, not {case.dtype}")
        super().setup(case)


class AllGatherVFp4(_Fp4Op):
    """bf16 rows in, bf16 rows out, NVFP4 (or MXFP4) on the wire; size(B) counts wire bytes."""

    name = "all_gatherv_nvfp4"
    baseline_op = "all_gather"
    dequantize = True

    def sizing(self, nbytes, itemsize, n):
        rows = self._rows(nbytes, itemsize, n)
        if not rows:
            return None
        count = rows * FP4_K
        return Sizing(self.wire(rows, n), count * n, count, count * n, logical_bytes=count * n * itemsize)

    def call(self, comm, case):
        rows = case.sizing.send_count // FP4_K
        s = case.send.reshape(rows, FP4_K)
        r = case.recv.reshape(case.nranks * rows, FP4_K)
        sizes = [rows] * case.nranks
        if self.dequantize:
            return lambda: comm.all_gatherv(s, sizes, out=r, compress=self.fmt)

        def gather_fp4():   # into the previous result from the second call on, as a decode loop would
            case.extra["q"] = comm.all_gatherv(s, sizes, compress=self.fmt, dequantize=False, out=case.extra.get("q"))
        return gather_fp4

    def output(self, case):
        if not self.dequantize:
            q = case.extra.get("q")
            if q is None:
                return None
            q.dequantize(out=case.recv.reshape(tuple(q.shape)))
        return case.recv

    def expected(self, case, start, stop):
        return _gathered(case, start, stop, lambda r, a, b: _fp4_values(case, r, a, b))


class AllGatherVFp4Raw(AllGatherVFp4):
    name = "all_gatherv_nvfp4_raw"
    dequantize = False


class AllGatherVMxfp4(AllGatherVFp4):
    name = "all_gatherv_mxfp4"
    fmt = "mxfp4"


class ReduceScatterVFp4(_Fp4Op):
    """bf16 in, NVFP4 chunks through an all-to-all, fp32 sum, bf16 out; size(B) counts wire bytes."""

    name = "reduce_scatterv_nvfp4"
    reduces = True   # the redop column says sum, like the plain reduce_scatter it stands for
    baseline_op = "reduce_scatter"

    def setup(self, case):
        if case.redop != "sum":   # the FP4 reduce-scatter sums in fp32 and knows no other op
            raise Unsupported(f"{self.name} sums only; -o {case.redop} is not available with FP4")
        super().setup(case)

    def sizing(self, nbytes, itemsize, n):
        rows = self._rows(nbytes, itemsize, n)
        if not rows:
            return None
        count = rows * FP4_K
        return Sizing(self.wire(rows, n), count * n, count * n, count, logical_bytes=count * n * itemsize)

    def call(self, comm, case):
        rows = case.sizing.recv_count // FP4_K
        s = case.send.reshape(case.nranks * rows, FP4_K)
        r = case.recv.reshape(rows, FP4_K)
        sizes, op = [rows] * case.nranks, case.redop
        return lambda: comm.reduce_scatterv(s, sizes, op, out=r, compress=self.fmt)

    def expected(self, case, start, stop):
        off = case.rank * case.sizing.recv_count
        acc = None
        for q in range(case.nranks):
            v = _fp4_values(case, q, off + start, off + stop)
            acc = v if acc is None else acc + v
        return acc


class ReduceScatterVMxfp4(ReduceScatterVFp4):
    name = "reduce_scatterv_mxfp4"
    fmt = "mxfp4"


for _op in (AllGatherV(), ReduceScatterV(), AllGatherVFp4(), AllGatherVFp4Raw(), AllGatherVMxfp4(),
            ReduceScatterVFp4(), ReduceScatterVMxfp4()):
    register_op(_op)


# -- implementations --------------------------------------------------------------------------------

class Unsupported(Exception):
    """This implementation cannot run this op / dtype / redop; the row is skipped with the reason."""


class Impl:
    """One way to run the collectives. Each op method takes a Case and returns a zero-arg callable.

    `inplace` names ops whose call works in place on case.recv, so the sweep copies send into recv
    (`stage`) before the check pass.
    """

    name = ""
    inplace: frozenset = frozenset()
    graphable = False

    def stage(self, case: Case) -> None:
        case.frame.copy(case.recv, case.send)

    def close(self) -> None:
        pass


class Fp4cclImpl(Impl):
    """fp4ccl through its public Communicator API only."""

    name = "fp4ccl"

    def __init__(self, comm):
        self.comm = comm
        self.graphable = comm.backend == "nccl"

    def all_gather(self, c):
        comm, s, r = self.comm, c.send, c.recv
        return lambda: comm.all_gather(s, out=r)

    def reduce_scatter(self, c):
        comm, s, r, op = self.comm, c.send, c.recv, c.redop
        return lambda: comm.reduce_scatter(s, op, out=r)

    def all_reduce(self, c):
        comm, s, r, op = self.comm, c.send, c.recv, c.redop
        return lambda: comm.all_reduce(s, op, out=r)

    def broadcast(self, c):
        comm, s, r, root = self.comm, c.send, c.recv, c.root
        return lambda: comm.broadcast(s, root, out=r)

    def reduce(self, c):
        comm, s, root, op = self.comm, c.send, c.root, c.redop
        r = c.recv if c.rank == root else None
        return lambda: comm.reduce(s, root, op, out=r)

    def all_to_all(self, c):
        comm, s, r = self.comm, c.send, c.recv
        return lambda: comm.all_to_all(s, out=r)


def _ptr(x) -> int:
    from fp4ccl._arrays import describe
    return describe(x).ptr


class NcclImpl(Impl):
    """A raw NCCL communicator made with fp4ccl's ctypes binding: the floor fp4ccl is measured against."""

    name = "nccl"
    graphable = True

    def __init__(self, comm, frame: Frame):
        from fp4ccl import nccl
        self.nccl = nccl
        self.lib = nccl.load()
        self.frame = frame
        uid = frame.small(np.frombuffer(nccl.get_unique_id().to_bytes() if comm.rank == 0 else bytes(128),
                                        dtype=np.uint8).copy())
        # The unique id travels through fp4ccl's own broadcast: the public API is all we rely on.
        uid = bytes(frame.to_numpy(comm.broadcast(uid, 0)).tobytes())
        handle = ctypes.c_void_p()
        self.lib.ncclCommInitRank(ctypes.byref(handle), comm.size, nccl.UniqueId.from_bytes(uid), comm.rank)
        self.handle = handle.value
        self.version = ".".join(map(str, self.lib.version))
        if frame.name == "torch":
            torch = frame.torch
            dev = frame.device
            self.stream = lambda: torch.cuda.current_stream(dev).cuda_stream
        else:
            cp = frame.cp
            self.stream = lambda: cp.cuda.get_current_stream().ptr

    def _dt(self, c, reduce=False):
        try:
            return self.nccl.datatype(c.dtype, reduce=reduce)
        except TypeError as e:
            raise Unsupported(str(e)) from None

    def all_gather(self, c):
        f, h, st = self.lib.ncclAllGather, self.handle, self.stream
        s, r, n, dt = _ptr(c.send), _ptr(c.recv), c.sizing.send_count, self._dt(c)
        return lambda: f(s, r, n, dt, h, st())

    def reduce_scatter(self, c):
        f, h, st = self.lib.ncclReduceScatter, self.handle, self.stream
        s, r, n, dt, op = _ptr(c.send), _ptr(c.recv), c.sizing.recv_count, self._dt(c, True), self.nccl.redop(c.redop)
        return lambda: f(s, r, n, dt, op, h, st())

    def all_reduce(self, c):
        f, h, st = self.lib.ncclAllReduce, self.handle, self.stream
        s, r, n, dt, op = _ptr(c.send), _ptr(c.recv), c.sizing.count, self._dt(c, True), self.nccl.redop(c.redop)
        return lambda: f(s, r, n, dt, op, h, st())

    def broadcast(self, c):
        f, h, st = self.lib.ncclBroadcast, self.handle, self.stream
        s, r, n, dt, root = _ptr(c.send), _ptr(c.recv), c.sizing.count, self._dt(c), c.root
        return lambda: f(s, r, n, dt, root, h, st())

    def reduce(self, c):
        f, h, st = self.lib.ncclReduce, self.handle, self.stream
        s, r, n, dt, op = _ptr(c.send), _ptr(c.recv), c.sizing.count, self._dt(c, True), self.nccl.redop(c.redop)
        root = c.root
        return lambda: f(s, r, n, dt, op, root, h, st())

    def all_to_all(self, c):
        lib, h, st = self.lib, self.handle, self.stream
        per = c.sizing.send_count // c.nranks
        s, r, dt = _ptr(c.send), _ptr(c.recv), self._dt(c)
        if lib.has("ncclAlltoAll"):
            f = lib.ncclAlltoAll
            return lambda: f(s, r, per, dt, h, st())
        # Before NCCL 2.28 all-to-all is a group of sends and receives (what nccl-tests does).
        step = per * ITEMSIZE[c.dtype]
        n = c.nranks

        def run():
            stream = st()
            lib.ncclGroupStart()
            try:
                for p in range(n):
                    lib.ncclSend(s + p * step, per, dt, p, h, stream)
                    lib.ncclRecv(r + p * step, per, dt, p, h, stream)
            finally:
                lib.ncclGroupEnd()
        return run

    def close(self):
        if self.handle:
            self.frame.sync()
            self.lib.ncclCommDestroy(self.handle)
            self.handle = None


class TorchImpl(Impl):
    """torch.distributed with a NCCL process group from the same job's environment."""

    name = "torch"
    inplace = frozenset({"all_reduce", "broadcast", "reduce"})

    def __init__(self, comm, frame: TorchFrame):
        import torch.distributed as dist
        self.dist = dist
        self.owned = False
        if not dist.is_initialized():
            dist.init_process_group("nccl", rank=comm.rank, world_size=comm.size, device_id=frame.device)
            self.owned = True
        self.version = frame.torch.__version__
        R = dist.ReduceOp
        self.ops = {"sum": R.SUM, "prod": R.PRODUCT, "max": R.MAX, "min": R.MIN, "avg": R.AVG}

    def all_gather(self, c):
        f, s, r = self.dist.all_gather_into_tensor, c.send, c.recv
        return lambda: f(r, s)

    def reduce_scatter(self, c):
        f, s, r, op = self.dist.reduce_scatter_tensor, c.send, c.recv, self.ops[c.redop]
        return lambda: f(r, s, op=op)

    def all_reduce(self, c):
        f, r, op = self.dist.all_reduce, c.recv, self.ops[c.redop]
        return lambda: f(r, op=op)

    def broadcast(self, c):
        f, r, root = self.dist.broadcast, c.recv, c.root
        return lambda: f(r, src=root)

    def reduce(self, c):
        f, r, root, op = self.dist.reduce, c.recv, c.root, self.ops[c.redop]
        return lambda: f(r, dst=root, op=op)

    def all_to_all(self, c):
        f, s, r = self.dist.all_to_all_single, c.send, c.recv
        return lambda: f(r, s)

    def close(self):
        if self.owned:
            self.dist.destroy_process_group()


class MpiImpl(Impl):
    """mpi4py buffer collectives on numpy arrays (the host backend's baseline under mpirun)."""

    name = "mpi"

    def __init__(self):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.version = "%d.%d" % MPI.Get_version() + f" ({MPI.Get_library_version().splitlines()[0].strip()})"
        self.types = {"float64": MPI.DOUBLE, "float32": MPI.FLOAT, "int8": MPI.SIGNED_CHAR,
                      "uint8": MPI.UNSIGNED_CHAR, "int16": MPI.SHORT, "uint16": MPI.UNSIGNED_SHORT,
                      "int32": MPI.INT32_T, "uint32": MPI.UINT32_T, "int64": MPI.INT64_T, "uint64": MPI.UINT64_T}
        self.ops = {"sum": MPI.SUM, "prod": MPI.PROD, "max": MPI.MAX, "min": MPI.MIN}

    def _raw(self, a):
        return [a.view(np.uint8), self.MPI.BYTE]

    def _typed(self, c, a):
        if c.dtype not in self.types:
            raise Unsupported(f"MPI has no reduction type for {c.dtype}")
        if c.redop not in self.ops:
            raise Unsupported(f"MPI has no op {c.redop!r}")
        return [a, self.types[c.dtype]]

    def all_gather(self, c):
        f, s, r = self.comm.Allgather, self._raw(c.send), self._raw(c.recv)
        return lambda: f(s, r)

    def reduce_scatter(self, c):
        f, s, r, op = self.comm.Reduce_scatter_block, self._typed(c, c.send), self._typed(c, c.recv), self.ops.get(c.redop)
        return lambda: f(s, r, op=op)

    def all_reduce(self, c):
        f, s, r, op = self.comm.Allreduce, self._typed(c, c.send), self._typed(c, c.recv), self.ops.get(c.redop)
        return lambda: f(s, r, op=op)

    def broadcast(self, c):
        if c.rank == c.root:
            self.inplace = frozenset({"broadcast"})
        f, r, root = self.comm.Bcast, self._raw(c.recv), c.root
        return lambda: f(r, root=root)

    def reduce(self, c):
        f, s, r, op = self.comm.Reduce, self._typed(c, c.send), self._typed(c, c.recv), self.ops.get(c.redop)
        return lambda: f(s, r, op=op, root=c.root)

    def all_to_all(self, c):
        f, s, r = self.comm.Alltoall, self._raw(c.send), self._raw(c.recv)
        return lambda: f(s, r)


# -- running -----------------------------------------------------------------------------------------

@dataclass
class Row:
    op: str
    impl: str
    size: int
    count: int
    type: str
    redop: str
    root: int
    time_us: float
    algbw: float
    busbw: float
    wrong: Optional[int]          # None with -c 0
    logical_bytes: Optional[int] = None
    speedup: Optional[float] = None
    graph: int = 0
    baseline_us: Optional[float] = None   # the speedup's reference: baseline_op on logical_bytes ...
    baseline_impl: Optional[str] = None   # ... run by this implementation


class Sweep:
    """One sweep over the job's ranks; rank 0 prints the table."""

    def __init__(self, comm, args, argv: Sequence[str], out=None, err=None):
        self.comm, self.args, self.argv = comm, args, list(argv)
        self.rank, self.n = comm.rank, comm.size
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.gpu = comm.backend != "host"
        apply_defaults(args, self.gpu)
        self.frame = self._frame()
        self.rows: List[Row] = []
        # (op, size) -> the plain op timed on exactly a logical size the table has no row of (None: cannot)
        self.references: Dict[tuple, Optional[Row]] = {}
        self.notes: List[str] = []
        self.impls: List[Impl] = [Fp4cclImpl(comm)]
        self._t0 = time.monotonic()
        self._progress = False

    # -- set-up ----------------------------------------------------------------------------------
    def _frame(self) -> Frame:
        if not self.gpu:
            return NumpyFrame()
        want = self.args.array
        if want in (None, "torch"):
            try:
                import torch  # noqa: F401
                return TorchFrame(self.comm.device)
            except ImportError:
                if want == "torch":
                    raise SweepError("--array torch: torch is not importable") from None
        try:
            return CupyFrame(self.comm.device)
        except ImportError:
            raise SweepError("the nccl backend needs torch or CuPy for buffers; neither is importable") from None

    def say(self, text: str = "") -> None:
        if self.rank == 0:
            print(text, file=self.out, flush=True)

    def agree(self, flags: Sequence[bool]) -> List[bool]:
        """Every rank's flags AND-ed, so all ranks set up the same baselines (or none would start)."""
        got = self.comm.all_reduce(self.frame.small(np.array([1 if f else 0 for f in flags], np.int32)), "min")
        return [bool(v) for v in self.frame.to_numpy(got)]

    def setup_baselines(self) -> None:
        a = self.args
        wanted = a.baselines
        if self.gpu:
            candidates = ["nccl", "torch"]
        else:
            candidates = ["mpi"]
        if wanted == "none":
            names = []
        elif wanted == "auto":
            names = candidates
        else:
            names = list(wanted)
            for name in names:
                if name not in candidates:
                    raise SweepError(f"--baselines {name}: not available on the {self.comm.backend} backend "
                                     f"(choose from {', '.join(candidates) or 'none'})")
        reasons = {name: self._unavailable(name) for name in names}
        ok = self.agree([reasons[name] is None for name in names]) if names else []
        for name, good in zip(names, ok):
            if not good:
                why = reasons[name] or "unavailable on another rank"
                if wanted != "auto":
                    raise SweepError(f"--baselines {name}: {why}")
                if self.gpu:  # on the host the line below says it once
                    self.notes.append(f"no {name} baseline: {why}")
                continue
            if name == "nccl":
                self.impls.append(NcclImpl(self.comm, self.frame))
            elif name == "torch":
                self.impls.append(TorchImpl(self.comm, self.frame))
            else:
                self.impls.append(MpiImpl())
        if len(self.impls) == 1 and not self.gpu and wanted == "auto":
            self.notes.append("host backend: no baseline (mpi4py's is offered when the job runs under mpirun)")

    def _unavailable(self, name: str) -> Optional[str]:
        if name == "nccl":
            try:
                from fp4ccl import nccl
                nccl.load()
            except Exception as e:  # noqa: BLE001 - any load failure means no baseline
                return f"NCCL not loadable ({e})"
            return None
        if name == "torch":
            if self.frame.name != "torch":
                return "torch is not importable"
            if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
                return "MASTER_ADDR/MASTER_PORT are not set (fp4ccl-run and torchrun set them)"
            return None
        if name == "mpi":
            from fp4ccl.bootstrap.env import discover
            if not discover().started_by_mpi:
                return "the job was not started by mpirun/mpiexec"
            try:
                from mpi4py import MPI
            except ImportError:
                return "mpi4py is not importable"
            if MPI.COMM_WORLD.Get_size() != self.n:
                return f"MPI world has {MPI.COMM_WORLD.Get_size()} ranks, the job {self.n}"
            return None
        return f"unknown baseline {name}"

    # -- one case --------------------------------------------------------------------------------
    def _progress_line(self, op: str, size: int, i: int, total: int) -> None:
        if self.rank != 0:
            return
        elapsed = time.monotonic() - self._t0
        # Short sweeps stay quiet; a long one says where it is once it has run for a few seconds.
        if self._progress or elapsed > 3.0:
            self._progress = True
            print(f"{PROG}: {op} {format_size(size)} done ({i}/{total}), {elapsed:.1f} s", file=self.err, flush=True)

    def time_case(self, impl: Impl, op: SweepOp, case: Case) -> float:
        """Median time per call on this rank, in µs."""
        a, f = self.args, self.frame
        fn = op.bind(impl, case)
        if op.name in impl.inplace:
            impl.stage(case)
        for _ in range(a.warmup_iters):
            fn()
        f.sync()
        self.comm.barrier()
        if a.cudagraph and impl.graphable and f.name == "torch" and f.gpu:
            return self._time_graph(fn)
        t = f.timer(a.iters)
        for i in range(a.iters):
            t.start(i)
            fn()
            t.stop(i)
        return statistics.median(t.elapsed_us())

    def _time_graph(self, fn) -> float:
        """Capture -G calls in one CUDA graph and time its replays; per call = replay / N."""
        torch, a = self.frame.torch, self.args
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self.frame.device)
        side.wait_stream(torch.cuda.current_stream(self.frame.device))
        with torch.cuda.stream(side):
            with torch.cuda.graph(g, stream=side):
                for _ in range(a.cudagraph):
                    fn()
        torch.cuda.current_stream(self.frame.device).wait_stream(side)
        g.replay()
        self.frame.sync()
        t = self.frame.timer(a.iters)
        for i in range(a.iters):
            t.start(i)
            g.replay()
            t.stop(i)
        per = statistics.median(t.elapsed_us()) / a.cudagraph
        del g
        return per

    def check_case(self, impl: Impl, op: SweepOp, case: Case) -> int:
        """Run once on fresh inputs into a poisoned output; count this rank's wrong elements."""
        f = self.frame
        case.salt += 1  # fresh values: the check never sees the inputs that were timed
        op.fill(case)
        f.poison(case.recv)
        if op.name in impl.inplace:
            impl.stage(case)
        fn = op.bind(impl, case)
        f.sync()
        fn()
        f.sync()
        if self.args.inject_fault and impl.name == "fp4ccl":
            self._inject(op, case)
        return op.check(case)

    def _inject(self, op: SweepOp, case: Case) -> None:
        # One element of one rank's output turned to poison: the check must notice (tests rely on it).
        victim = case.root if op.rooted else self.n - 1
        out = op.output(case)
        if case.rank == victim and out is not None and case.sizing.recv_count:
            self.frame.poison(out[case.sizing.recv_count // 2: case.sizing.recv_count // 2 + 1])

    def run_case(self, impl: Impl, op: SweepOp, sizing: Sizing, root: int, salt: int) -> Optional[Row]:
        a, f = self.args, self.frame
        redop = a.op if op.reduces else None
        case = Case(f, a.datatype, redop, root, self.rank, self.n, sizing,
                    value_set(a.datatype, redop, self.n), a.seed, salt)
        skip = None
        try:
            op.setup(case)
            op.fill(case)
            op.bind(impl, case)
        except Unsupported as e:
            skip = str(e)
        # Ranks must agree to skip, or the ones that go ahead would wait forever.
        if not self.agree([skip is None])[0]:
            note = f"{op.name}/{impl.name}: skipped ({skip or 'unsupported on another rank'})"
            if note not in self.notes:
                self.notes.append(note)
                self.say(f"# {note}")
            return None
        med = self.time_case(impl, op, case)
        wrong = self.check_case(impl, op, case) if a.check else 0
        stats = self.frame.to_numpy(self.comm.all_reduce(f.small(np.array([med], np.float64)), "max"))
        total_wrong = int(self.frame.to_numpy(self.comm.all_reduce(f.small(np.array([wrong], np.int64)), "sum"))[0])
        t = float(stats[0])
        algbw = sizing.nbytes / t / 1e3 if t > 0 else 0.0   # bytes/µs / 1e3 = GB/s
        graph = a.cudagraph if (a.cudagraph and impl.graphable and f.name == "torch" and f.gpu) else 0
        return Row(op.name, impl.name, sizing.nbytes, sizing.count, a.datatype, redop or "none",
                   root if op.rooted else -1, t, algbw, algbw * op.busbw_factor(self.n),
                   total_wrong if a.check else None, sizing.logical_bytes, None, graph)

    # -- the sweep -------------------------------------------------------------------------------
    def run(self) -> List[Row]:
        a = self.args
        if a.root != "all" and a.root >= self.n and any(OPS[o].rooted for o in a.ops):
            raise SweepError(f"-r/--root {a.root} is out of range for {self.n} rank(s)")
        if a.cudagraph and not (self.frame.name == "torch" and self.frame.gpu):
            self.notes.append(f"-G {a.cudagraph} ignored: CUDA graphs need the nccl backend with torch arrays")
        self.setup_baselines()
        self.header()
        nominal = size_steps(a.minbytes, a.maxbytes, a.stepfactor, a.stepbytes)
        itemsize = ITEMSIZE[a.datatype]
        for oi, name in enumerate(a.ops):
            op = OPS[name]
            impls = [i for i in self.impls if i.name in op.impls]
            roots = (list(range(self.n)) if a.root == "all" else [a.root]) if op.rooted else [0]
            sizings, seen, too_small = [], set(), []
            for s in nominal:
                sz = op.sizing(s, itemsize, self.n)
                if sz is None:
                    too_small.append(s)
                elif sz.nbytes not in seen:
                    seen.add(sz.nbytes)
                    sizings.append(sz)
            notes = []
            if too_small:   # say so, or the section silently has fewer rows than the others
                least, unit = op.smallest(itemsize, self.n)
                notes.append(f"{name}: skipped {', '.join(map(str, too_small))} B: less than {unit} "
                             f"(the smallest size is {least} B of {a.datatype} at {self.n} ranks)")
                self.notes += notes
            self.section(op, notes)
            for si, sz in enumerate(sizings):
                for root in roots:
                    for impl in impls:
                        salt = ((oi * 4096 + si) * 64 + root) * 16 + IMPL_ORDER.index(impl.name) * 2
                        row = self.run_case(impl, op, sz, root, salt)
                        if row is not None:
                            # An implementation's salts are salt and salt + 1 (check); the reference takes +8, +9.
                            self._speedup(row, op, salt + 8)
                            self.rows.append(row)
                            self.print_row(row)
                self._progress_line(name, sz.nbytes, si + 1, len(sizings))
        if a.overhead:
            self.overhead()
        self.footer()
        return self.rows

    def _speedup(self, row: Row, op: SweepOp, salt: int) -> None:
        """speedup = time of op.baseline_op on the same logical tensor / this row's time (collective)."""
        if row.logical_bytes is None or not op.baseline_op:
            return
        ref = self._reference(OPS[op.baseline_op], row.logical_bytes, salt)
        if ref is not None and row.time_us > 0:
            row.speedup = ref.time_us / row.time_us
            row.baseline_us, row.baseline_impl = ref.time_us, ref.impl

    def _reference_impls(self, op: SweepOp) -> List[Impl]:
        return [i for name in REFERENCE_ORDER for i in self.impls if i.name == name and name in op.impls]

    def _reference(self, op: SweepOp, nbytes: int, salt: int) -> Optional[Row]:
        """`op`'s row on exactly `nbytes`: the table's when it has one, else timed now (once per size).

        Ops round sizes differently (the plain ops to a multiple of the rank count, the FP4 ops to whole
        1024-element rows per rank), so at 3 ranks no plain row has an FP4 row's logical size; a row of
        a nearby size would skew the ratio. Every rank holds the same rows, so all take the same branch.
        """
        impls = self._reference_impls(op)
        for impl in impls:
            row = next((r for r in self.rows if r.op == op.name and r.size == nbytes and r.impl == impl.name), None)
            if row is not None:
                return row
        key = (op.name, nbytes)
        if key not in self.references:
            self.references[key] = None
            sizing = op.sizing(nbytes, ITEMSIZE[self.args.datatype], self.n)
            if sizing is not None and sizing.nbytes == nbytes:   # else the op cannot hold exactly this tensor
                for impl in impls:
                    self.references[key] = self.run_case(impl, op, sizing, 0, salt)
                    if self.references[key] is not None:
                        break
        return self.references[key]

    # -- output ----------------------------------------------------------------------------------
    @property
    def logical(self) -> bool:
        return any(OPS[o].baseline_op for o in self.args.ops)

    def header(self) -> None:
        a = self.args
        dev = device_name(self.frame, self.comm)
        self.say(f"# {PROG}: {self.n} rank(s), backend {self.comm.backend}, device {dev}")
        self.say(f"# dtype {a.datatype}  redop {a.op}  iters {a.iters}  warmup {a.warmup_iters}  check {a.check}  "
                 f"seed {a.seed}" + (f"  cudagraph {a.cudagraph}" if a.cudagraph else ""))
        self.say("# implementations: " + ", ".join(
            i.name + (f" ({getattr(i, 'version', '')})" if getattr(i, "version", "") else "") for i in self.impls))
        for note in self.notes:
            self.say(f"# {note}")
        self.say("# time: median over iterations per rank, max over ranks; algbw = size/time; "
                 "busbw = algbw x the op's factor (nccl-tests doc/PERFORMANCE.md)")

    _COLS = ("size(B)", "count", "type", "redop", "root", "impl", "|", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong")
    _W0 = (13, 12, 8, 6, 5, 7, 1, 10, 12, 12, 7)

    @property
    def _W(self):
        w = list(self._W0)
        w[2] = max(w[2], len(self.args.datatype))
        return w

    def section(self, op: SweepOp, notes: Sequence[str] = ()) -> None:
        factor = {1.0: "1"}.get(op.busbw_factor(self.n), f"{op.busbw_factor(self.n):.3g}")
        self.say("#")
        self.say(f"# {op.name}   (busbw factor {factor} at {self.n} ranks)")
        for note in notes:
            self.say(f"# {note}")
        if op.baseline_op:
            by = next((i.name for i in self._reference_impls(OPS[op.baseline_op])), "nobody")
            self.say(f"# speedup = time of {op.baseline_op} ({by}) on the same logical(B) tensor / this row's time; "
                     f"timed beside the row if no {op.baseline_op} row has that size")
        cols = [c.rjust(w) for c, w in zip(self._COLS, self._W)]
        if self.logical:
            cols += ["logical(B)".rjust(13), "speedup".rjust(8)]
        self.say("#" + " ".join(cols)[1:])

    def print_row(self, r: Row) -> None:
        wrong = "N/A" if r.wrong is None else str(r.wrong)
        vals = (str(r.size), str(r.count), r.type, r.redop, str(r.root), r.impl, "|",
                f"{r.time_us:.2f}", f"{r.algbw:.2f}", f"{r.busbw:.2f}", wrong)
        cols = [v.rjust(w) for v, w in zip(vals, self._W)]
        if self.logical:
            cols += [("-" if r.logical_bytes is None else str(r.logical_bytes)).rjust(13),
                     ("-" if r.speedup is None else f"{r.speedup:.2f}x").rjust(8)]
        self.say(" ".join(cols))

    def footer(self) -> None:
        self.say("#")
        for impl in self.impls:
            mine = [r for r in self.rows if r.impl == impl.name]
            if mine:
                avg = sum(r.busbw for r in mine) / len(mine)
                self.say(f"# Avg bus bandwidth ({impl.name}) : {avg:.4g} GB/s over {len(mine)} rows")
        wrong = self.wrong
        self.say(f"# Wrong elements : {wrong} {'OK' if wrong == 0 else 'FAILED'}"
                 + ("" if self.args.check else " (check disabled with -c 0)"))

    @property
    def wrong(self) -> int:
        """Wrong elements over every row and every speedup reference (a wrong reference is a failure too)."""
        return sum(r.wrong or 0 for r in self.rows + [r for r in self.references.values() if r is not None])

    def overhead(self, calls: Optional[int] = None, reps: int = 5) -> None:
        """Host time per call of a tiny all_reduce, enqueued back to back (events off / on)."""
        f = self.frame
        # Few enough on GPU that the launch queue never fills (which would block the host and count
        # GPU time); on the host every call is a whole synchronous collective, so fewer still.
        calls = calls or (200 if self.gpu else 20)
        self.say("#")
        sync_note = "" if self.gpu else " (host backend: calls are synchronous, so this is the whole collective)"
        self.say(f"# per-call host overhead: {calls} float32 all_reduce calls of {self.n} elements, median of {reps}"
                 + sync_note)
        for impl in self.impls:
            sizing = Sizing(4 * self.n, self.n, self.n, self.n)
            case = Case(f, "float32", "sum", 0, self.rank, self.n, sizing, value_set("float32", "sum", self.n),
                        self.args.seed, 0)
            try:
                OPS["all_reduce"].setup(case)
                OPS["all_reduce"].fill(case)
                fn = OPS["all_reduce"].bind(impl, case)
            except (Unsupported, AttributeError):
                continue
            results = []
            for events in (False, True):
                t = f.timer(calls) if events else None
                fn()
                f.sync()
                self.comm.barrier()
                per = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    if events:
                        for i in range(calls):
                            t.start(i)
                            fn()
                            t.stop(i)
                    else:
                        for _ in range(calls):
                            fn()
                    per.append((time.perf_counter() - t0) / calls * 1e6)
                    f.sync()
                    self.comm.barrier()
                results.append(statistics.median(per))
            worst = self.frame.to_numpy(self.comm.all_reduce(f.small(np.array(results, np.float64)), "max"))
            self.say(f"# overhead {impl.name:>7}: {worst[0]:8.2f} us/call (events off)  {worst[1]:8.2f} us/call "
                     f"(events on)   [max over ranks]")
            self.overheads = getattr(self, "overheads", {})
            self.overheads[impl.name] = {"events_off_us": float(worst[0]), "events_on_us": float(worst[1])}

    def close(self) -> None:
        for impl in reversed(self.impls[1:]):
            try:
                impl.close()
            except Exception as e:  # noqa: BLE001 - teardown of a baseline must not hide the results
                print(f"{PROG}: closing the {impl.name} baseline failed: {e}", file=self.err)

    # -- artifacts -------------------------------------------------------------------------------
    def metadata(self) -> dict:
        meta = {
            "tool": PROG, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(x) for x in [PROG] + self.argv),
            "argv": self.argv, "world_size": self.n, "backend": self.comm.backend,
            "device": device_name(self.frame, self.comm), "host": platform.node(),
            "python": platform.python_version(), "numpy": np.__version__, "array": self.frame.name,
            "dtype": self.args.datatype, "redop": self.args.op, "iters": self.args.iters,
            "warmup_iters": self.args.warmup_iters, "check": self.args.check, "seed": self.args.seed,
            "cudagraph": self.args.cudagraph, "implementations": [i.name for i in self.impls], "notes": self.notes,
        }
        import fp4ccl
        meta["fp4ccl"] = fp4ccl.__version__
        for mod in ("torch", "cupy", "mpi4py"):
            m = sys.modules.get(mod)
            if m is not None:
                meta[mod] = getattr(m, "__version__", "?")
        if "fp4ccl.nccl" in sys.modules:
            try:
                meta["nccl"] = ".".join(map(str, sys.modules["fp4ccl.nccl"].version()))
            except Exception:  # noqa: BLE001 - not loadable is simply not recorded
                pass
        if getattr(self, "overheads", None):
            meta["overhead"] = self.overheads
        return meta

    def write_json(self, path: str) -> None:
        doc = {"meta": self.metadata(), "rows": [r.__dict__ for r in self.rows],
               "references": [r.__dict__ for r in self.references.values() if r is not None]}
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")

    def write_plot(self, path: str) -> None:
        plot_rows([r.__dict__ for r in self.rows], path, title=f"{PROG}: {self.n} ranks, {self.comm.backend}, "
                  f"{self.args.datatype}, {device_name(self.frame, self.comm)}")


def device_name(frame: Frame, comm) -> str:
    if frame.name == "torch" and frame.gpu:
        return frame.torch.cuda.get_device_name(frame.device)
    if frame.name == "cupy":
        props = frame.cp.cuda.runtime.getDeviceProperties(frame.device)
        name = props.get("name", b"?")
        return name.decode() if isinstance(name, bytes) else str(name)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SweepError("--plot needs matplotlib: pip install 'fp4ccl[plot]' (or matplotlib)") from None


def plot_rows(rows: Sequence[dict], path: str, title: str = "") -> None:
    """Time and busbw against size, log-log, one line per (op, implementation)."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    series: Dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r["op"], r["impl"], r.get("root", -1)), []).append(r)
    styles = {"fp4ccl": "-", "nccl": "--", "torch": ":", "mpi": "-."}
    colors = {}
    for (op, impl, root), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["size"])
        color = colors.setdefault(op, f"C{len(colors) % 10}")
        label = f"{op} / {impl}" + (f" / root {root}" if root not in (-1, 0) else "")
        x = [r["size"] for r in rs]
        ax_t.plot(x, [r["time_us"] for r in rs], styles.get(impl, "-"), color=color, marker="o", ms=3, label=label)
        ax_b.plot(x, [max(r["busbw"], 1e-6) for r in rs], styles.get(impl, "-"), color=color, marker="o", ms=3,
                  label=label)
    for ax, ylabel in ((ax_t, "time (µs)"), (ax_b, "busbw (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("size (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_b.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- entry points ----------------------------------------------------------------------------------

def run(comm, argv: Sequence[str], out=None, err=None) -> int:
    """Run the sweep on an existing communicator (collective); returns the exit status for this rank.

    0: every element right; 1: some element wrong (on any rank). SweepError propagates.
    """
    args = parse_args(argv)
    if args.plot:
        require_matplotlib()
    sweep = Sweep(comm, args, argv, out=out, err=err)
    try:
        sweep.run()
    finally:
        sweep.close()
    if comm.rank == 0:
        if args.json_file:   # first: a plot that fails (matplotlib, fonts, disk) must not cost the rows
            sweep.write_json(args.json_file)
        if args.plot:
            sweep.write_plot(args.plot)
    return 1 if sweep.wrong else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)     # before init: a bad flag should not need a job to report it
        if args.plot:
            require_matplotlib()
        import fp4ccl
    except SweepError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        comm = fp4ccl.init(args.backend)
    except (RuntimeError, ValueError, OSError) as e:   # e.g. --backend nccl where no GPU or NCCL is usable
        print(f"{PROG}: error: cannot start the {args.backend or 'default'} backend: {e}", file=sys.stderr)
        return 1
    status = 0
    try:
        status = run(comm, argv)
    except SweepError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        comm.abort()
        return 2
    except BaseException:
        comm.abort()
        raise
    if status and comm.rank == 0:
        print(f"{PROG}: rank {comm.rank}: wrong results (see #wrong); exiting with status {status}", file=sys.stderr)
    comm.destroy()
    return status


if __name__ == "__main__":
    sys.exit(main())
