"""Checks of every collective against a numpy reference, written once for any backend and rank count.

Each check runs on every rank (through harness.run_ranks, or under mpirun via tests/gpu/mpi_main.py).
Inputs are built from (seed, rank, case) so every rank can compute every peer's input and hence the
expected result. Outputs are slices of larger buffers pre-filled with a sentinel, checked for overruns.
"""
from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np

from fp4ccl._arrays import numpy_dtype

ALL_DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "int32", "int64", "uint8", "uint32",
              "uint64", "float8_e4m3fn", "float8_e5m2"]
COUNTS = [0, 1, 7, 1001, 4099]
SENTINEL_PAD = 37
SENTINEL_LEAD = 256   # bytes
OPS = ["sum", "prod", "max", "min", "avg"]


# -- inputs -----------------------------------------------------------------------------------------

# Float types whose reductions of random values round too coarsely for a tolerance to tell a right
# answer from a wrong one: a reduction of them whose order is not known is checked on small integers.
LOW_FLOATS = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def make_input(seed: int, rank: int, case: int, shape, dtype: str, op: str = "sum", small: bool = False) -> np.ndarray:
    """A deterministic input for (seed, rank, case); small integers so sums and products never overflow.
    small: floats of LOW_FLOATS drawn from {-1, 0, 1}, whose sums and products over up to 8 ranks are
    exact in every float type (see small_ints)."""
    rng = np.random.default_rng([seed, rank, case])
    if dtype.startswith(("int", "uint")):
        lo, hi = (1, 3) if op == "prod" else (0, 20)
        return rng.integers(lo, hi, size=shape).astype(numpy_dtype(dtype))
    if small and dtype in LOW_FLOATS:
        return rng.integers(-1, 2, size=shape).astype(np.float32).astype(numpy_dtype(dtype))
    values = rng.uniform(0.5, 1.5, size=shape) if op == "prod" else rng.standard_normal(shape)
    return values.astype(np.float32).astype(numpy_dtype(dtype))


def reference_reduce(arrays, op: str, size: int) -> np.ndarray:
    """The expected reduction in float64 (exact for the integers used here)."""
    wide = [a.astype(np.float64) for a in arrays]
    if op in ("sum", "avg"):
        out = np.sum(wide, axis=0)
        return out / size if op == "avg" else out
    return {"prod": np.prod, "max": np.max, "min": np.min}[op](wide, axis=0)


def unit_roundoff(dtype: str, op: str, size: int):
    """The unit roundoff of a float reduction checked against the float64 reference, or None where the
    result must be exact."""
    if op in ("max", "min") or size == 1 or dtype.startswith(("int", "uint")):
        return None
    return {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8,
            "float8_e4m3fn": 2.0**-4, "float8_e5m2": 2.0**-3}[dtype]


def small_ints(dtype: str, exact: bool) -> bool:
    """Whether an order-unknown (exact=False) reduction check draws its inputs from {-1, 0, 1}."""
    return not exact and dtype in LOW_FLOATS


# -- frameworks -------------------------------------------------------------------------------------

def to_framework(a: np.ndarray, framework: str, device):
    """Put a numpy array into the framework under test (bf16/fp8 bit patterns kept)."""
    if framework == "numpy":
        return a.copy()
    if framework in ("torch", "torch_cpu"):
        import torch
        name = a.dtype.name
        if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            raw = torch.from_numpy(a.view(np.int16 if a.itemsize == 2 else np.uint8).copy())
            t = raw.view(getattr(torch, name))
        else:
            t = torch.from_numpy(a.copy())
        return t.to(f"cuda:{device}") if framework == "torch" else t
    if framework == "cupy":
        import cupy
        with cupy.cuda.Device(device):
            return cupy.asarray(a)
    raise ValueError(framework)


def to_numpy(x, dtype: str) -> np.ndarray:
    """Bring any framework's array back to numpy with its canonical dtype."""
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        import torch
        t = x.detach().cpu()
        if dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            t = t.view(torch.int16 if t.element_size() == 2 else torch.uint8)
            return t.numpy().view(numpy_dtype(dtype))
        return t.numpy()
    if mod == "cupy":
        return x.get()
    return np.asarray(x)


def _typed(raw, framework: str, dtype: str):
    """A byte buffer of any framework seen as dtype (no copy)."""
    if framework in ("torch", "torch_cpu"):
        import torch
        return raw.view(getattr(torch, dtype))
    return raw.view(numpy_dtype(dtype))


def supports(framework: str, dtype: str) -> bool:
    if framework == "cupy":
        return dtype not in ("bfloat16", "float8_e4m3fn", "float8_e5m2")  # CuPy has no such dtypes
    return True


def sentinel_out(comm, framework: str, shape, dtype: str):
    """(buffer, out): out lies between SENTINEL_LEAD bytes and SENTINEL_PAD elements of sentinel in one buffer.

    The lead is a whole number of 256-byte units, so out keeps the allocation's alignment (kernels choose
    vector widths by it) while a write before out's start still lands on sentinel bytes."""
    n = int(np.prod(shape)) if shape else 1
    item = numpy_dtype(dtype).itemsize
    buf = np.full(SENTINEL_LEAD + (n + SENTINEL_PAD) * item, 0x5A, dtype=np.uint8)
    fbuf = to_framework(buf, framework, comm.device)
    return fbuf, _typed(fbuf, framework, dtype)[SENTINEL_LEAD // item:SENTINEL_LEAD // item + n].reshape(shape)


def check_no_overrun(fbuf, shape, dtype: str, what: str) -> None:
    n = int(np.prod(shape)) if shape else 1
    raw = to_numpy(fbuf, "uint8")
    head, tail = raw[:SENTINEL_LEAD], raw[SENTINEL_LEAD + n * numpy_dtype(dtype).itemsize:]
    assert np.all(head == 0x5A), f"{what}: wrote before the start of the output ({np.count_nonzero(head != 0x5A)} bytes)"
    assert np.all(tail == 0x5A), f"{what}: wrote past the end of the output ({np.count_nonzero(tail != 0x5A)} bytes)"


def assert_close(got: np.ndarray, want: np.ndarray, dtype: str, op: str, size: int, what: str,
                 inputs=None) -> None:
    """Exact comparison when `want` is in the output dtype; within `tolerance` when it is a float64 reference.

    A sum rounded along the way errs by up to a few ulps of its partial sums, which cancellation can
    make far larger than the result: with `inputs`, sums are judged against the sum of magnitudes."""
    got64 = got.astype(np.float64)
    u = unit_roundoff(dtype, op, size) if want.dtype == np.float64 else None
    if u is None:
        want64 = want.astype(numpy_dtype(dtype)).astype(np.float64)
        ok = (got64 == want64) | (np.isnan(got64) & np.isnan(want64))
    else:
        # Per element, whatever the order: each of the size - 1 additions rounds a partial sum no larger
        # than the sum of magnitudes, avg's scaling rounds each term or the sum once more, a product's
        # size - 1 multiplications each round relatively, and the result rounds once; (1 + size * u)
        # covers the second-order terms (they matter at fp8's u).
        want64 = want
        mag = np.abs(want64)
        total = (np.sum([np.abs(a.astype(np.float64)) for a in inputs], axis=0) if inputs is not None
                 else size * mag)
        rounded = {"sum": (size - 1) * total, "avg": total, "prod": (size - 1) * mag}[op]
        tiny = size * float(ml_dtypes.finfo(numpy_dtype(dtype)).smallest_subnormal)
        ok = np.abs(got64 - want64) <= u * (1 + size * u) * (rounded + mag) + tiny
    if not np.all(ok):
        bad = np.flatnonzero(~ok.ravel())
        i = bad[0]
        raise AssertionError(f"{what}: {bad.size} wrong of {got.size}; first at {i}: got {got64.ravel()[i]!r}, "
                             f"want {want64.ravel()[i]!r}")


def same_order_reduce(arrays, op: str, size: int, dtype: str) -> np.ndarray:
    """The reduction as the host backend computes it: numpy ufuncs in rank order, in the input dtype;
    avg on floats adds each part divided by `size` in float64 and rounds once."""
    import functools
    if op == "avg" and not dtype.startswith(("int", "uint")):
        return functools.reduce(np.add, (a.astype(np.float64) / size for a in arrays)).astype(arrays[0].dtype)
    ufunc = {"sum": np.add, "avg": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}[op]
    out = functools.reduce(ufunc, arrays)
    if op == "avg":
        out = (out / np.asarray(size, dtype=out.dtype)).astype(out.dtype)
    return out


# -- the checks (each runs on every rank) -----------------------------------------------------------

def _cases(framework, dtypes, *axes):
    """(case number, dtype, *axis values) for every dtype the framework has and every combination of axes."""
    case = 0
    for dtype in dtypes:
        if not supports(framework, dtype):
            continue
        for combo in itertools.product(*axes):
            case += 1
            yield (case, dtype) + combo


def _inputs(comm, seed, case, framework, shape, dtype, op="sum", small=False):
    """Every rank's input for this case (numpy), and this rank's in the framework under test."""
    inputs = [make_input(seed, r, case, shape, dtype, op, small) for r in range(comm.size)]
    return inputs, to_framework(inputs[comm.rank], framework, comm.device)


def _expect_reduction(comm, inputs, op, dtype, exact):
    """The host backend's own order (exact); otherwise the float64 reduction, rounded to the dtype where
    it is exact there (sums and products of small_ints inputs), for an exact comparison."""
    if exact:
        return same_order_reduce(inputs, op, comm.size, dtype)
    want = reference_reduce(inputs, op, comm.size)
    return want.astype(numpy_dtype(dtype)) if small_ints(dtype, exact) and op != "avg" else want


def _valid_op(op, dtype):
    return not (op == "avg" and dtype.startswith(("int", "uint")))


def check_all_reduce(comm, seed, framework, dtypes=ALL_DTYPES, counts=COUNTS, exact=True):
    case = 0
    for case, dtype, op, count in _cases(framework, dtypes, OPS, counts):
        if not _valid_op(op, dtype):
            continue
        inputs, x = _inputs(comm, seed, case, framework, (count,), dtype, op, small_ints(dtype, exact))
        fbuf, out = sentinel_out(comm, framework, (count,), dtype)
        res = comm.all_reduce(x, op, out=out)
        _sync(comm)
        what = f"rank {comm.rank} all_reduce {dtype} op={op} count={count}"
        assert res is out, what
        check_no_overrun(fbuf, (count,), dtype, what)
        assert_close(to_numpy(out, dtype), _expect_reduction(comm, inputs, op, dtype, exact),
                     dtype, op, comm.size, what, inputs=inputs)
    return case


def check_broadcast(comm, seed, framework, dtypes=ALL_DTYPES, counts=COUNTS):
    case = 0
    for case, dtype, count, root in _cases(framework, dtypes, counts, range(comm.size)):
        inputs, x = _inputs(comm, seed, case, framework, (count, 3), dtype)
        fbuf, out = sentinel_out(comm, framework, (count, 3), dtype)
        comm.broadcast(x, root, out=out)
        fresh = comm.broadcast(x, root)  # default allocation path
        _sync(comm)
        what = f"rank {comm.rank} broadcast {dtype} count={count} root={root}"
        check_no_overrun(fbuf, (count, 3), dtype, what)
        want = inputs[root].view(np.uint8)
        assert np.array_equal(to_numpy(out, dtype).view(np.uint8), want), what
        assert np.array_equal(to_numpy(fresh, dtype).view(np.uint8), want), what + " (allocated out)"
    return case


def check_reduce(comm, seed, framework, dtypes=ALL_DTYPES, counts=COUNTS, exact=True):
    case = 0
    for case, dtype, op, count, root in _cases(framework, dtypes, ("sum", "max"), counts, range(comm.size)):
        inputs, x = _inputs(comm, seed, case, framework, (count,), dtype, op, small_ints(dtype, exact))
        fbuf, out = sentinel_out(comm, framework, (count,), dtype)
        res = comm.reduce(x, root, op, out=out if comm.rank == root else None)
        _sync(comm)
        what = f"rank {comm.rank} reduce {dtype} op={op} count={count} root={root}"
        if comm.rank != root:
            assert res is None, what
            continue
        check_no_overrun(fbuf, (count,), dtype, what)
        assert_close(to_numpy(out, dtype), _expect_reduction(comm, inputs, op, dtype, exact),
                     dtype, op, comm.size, what, inputs=inputs)
    return case


def check_all_gather(comm, seed, framework, dtypes=ALL_DTYPES, counts=COUNTS):
    case = 0
    for case, dtype, count in _cases(framework, dtypes, counts):
        inputs, x = _inputs(comm, seed, case, framework, (count, 2), dtype)
        shape = (comm.size * count, 2)
        fbuf, out = sentinel_out(comm, framework, shape, dtype)
        comm.all_gather(x, out=out)
        _sync(comm)
        what = f"rank {comm.rank} all_gather {dtype} count={count}"
        check_no_overrun(fbuf, shape, dtype, what)
        want = np.concatenate(inputs).view(np.uint8)
        assert np.array_equal(to_numpy(out, dtype).view(np.uint8), want), what
    return case


def check_reduce_scatter(comm, seed, framework, dtypes=ALL_DTYPES, counts=COUNTS, exact=True):
    case = 0
    for case, dtype, op, count in _cases(framework, dtypes, OPS, counts):
        if not _valid_op(op, dtype):
            continue
        inputs, x = _inputs(comm, seed, case, framework, (comm.size * count,), dtype, op, small_ints(dtype, exact))
        fbuf, out = sentinel_out(comm, framework, (count,), dtype)
        comm.reduce_scatter(x, op, out=out)
        _sync(comm)
        what = f"rank {comm.rank} reduce_scatter {dtype} op={op} count={count}"
        check_no_overrun(fbuf, (count,), dtype, what)
        mine = [a[comm.rank * count:(comm.rank + 1) * count] for a in inputs]
        assert_close(to_numpy(out, dtype), _expect_reduction(comm, mine, op, dtype, exact),
                     dtype, op, comm.size, what, inputs=mine)
    return case


def check_all_to_all(comm, seed, framework, dtypes=ALL_DTYPES, counts=COUNTS):
    case = 0
    for case, dtype, count in _cases(framework, dtypes, counts):
        shape = (comm.size * count, 3)
        inputs, x = _inputs(comm, seed, case, framework, shape, dtype)
        fbuf, out = sentinel_out(comm, framework, shape, dtype)
        comm.all_to_all(x, out=out)
        _sync(comm)
        what = f"rank {comm.rank} all_to_all {dtype} count={count}"
        check_no_overrun(fbuf, shape, dtype, what)
        want = np.concatenate([a[comm.rank * count:(comm.rank + 1) * count] for a in inputs])
        assert np.array_equal(to_numpy(out, dtype).view(np.uint8), want.view(np.uint8)), what
    return case


def check_send_recv_ring(comm, seed, framework, counts=COUNTS):
    """Each rank sends to rank+1 and receives from rank-1 inside one group (deadlocks if not batched)."""
    dtype = "float32"
    for case, count in enumerate(counts):
        inputs = [make_input(seed, r, case, (count,), dtype) for r in range(comm.size)]
        x = to_framework(inputs[comm.rank], framework, comm.device)
        fbuf, out = sentinel_out(comm, framework, (count,), dtype)
        nxt, prv = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
        with comm.group():
            comm.send(x, nxt)
            comm.recv(out, prv)
        _sync(comm)
        what = f"rank {comm.rank} send/recv ring count={count}"
        check_no_overrun(fbuf, (count,), dtype, what)
        assert np.array_equal(to_numpy(out, dtype), inputs[prv]), what
    return len(counts)


def check_group_batch(comm, seed, framework):
    """Several different collectives inside one `with comm.group()` all complete correctly."""
    dtype = "float32"
    a = [make_input(seed, r, 1, (33,), dtype) for r in range(comm.size)]
    b = [make_input(seed, r, 2, (comm.size * 5,), dtype) for r in range(comm.size)]
    xa = to_framework(a[comm.rank], framework, comm.device)
    xb = to_framework(b[comm.rank], framework, comm.device)
    sizes = [0 if r == 0 else r + 2 for r in range(comm.size)]
    c = [make_input(seed, r, 3, (sizes[r], 4), dtype) for r in range(comm.size)]
    xc = to_framework(c[comm.rank], framework, comm.device)
    with comm.group():
        r1 = comm.all_reduce(xa, "max")
        r2 = comm.all_gather(xa)
        r3 = comm.reduce_scatter(xb, "max")
        r4 = comm.all_gatherv(xc, sizes)  # uneven: must pick an algorithm made of NCCL calls only
    _sync(comm)
    assert np.array_equal(to_numpy(r4, dtype), np.concatenate(c)), f"rank {comm.rank} group all_gatherv"
    assert np.array_equal(to_numpy(r1, dtype), np.max(a, axis=0)), f"rank {comm.rank} group all_reduce"
    assert np.array_equal(to_numpy(r2, dtype), np.concatenate(a)), f"rank {comm.rank} group all_gather"
    want = np.max([x[comm.rank * 5:(comm.rank + 1) * 5] for x in b], axis=0)
    assert np.array_equal(to_numpy(r3, dtype), want), f"rank {comm.rank} group reduce_scatter"
    return 4


def _sync(comm):
    """Wait for the device work of this rank (no-op on the host backend, whose calls are synchronous)."""
    if comm.device is None:
        return
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize(comm.device)
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.cuda.Device(comm.device).synchronize()


# -- variable-size collectives ----------------------------------------------------------------------

def uneven_sizes(size: int, case: int):
    """Row counts per rank with zeros at every position across cases (and all-zero, and all-equal)."""
    patterns = [[0] * size, [3] * size]
    for zero_at in range(size):
        patterns.append([0 if r == zero_at else 2 * r + 1 + case % 3 for r in range(size)])
    patterns.append([(7 * r + case) % 5 for r in range(size)])
    return patterns


def check_all_gatherv(comm, seed, framework, dtypes=ALL_DTYPES, exchange_sizes=False):
    case = 0
    for dtype in dtypes:
        if not supports(framework, dtype):
            continue
        for sizes in uneven_sizes(comm.size, case):
            case += 1
            inputs = [make_input(seed, r, case, (sizes[r], 3), dtype) for r in range(comm.size)]
            x = to_framework(inputs[comm.rank], framework, comm.device)
            shape = (sum(sizes), 3)
            fbuf, out = sentinel_out(comm, framework, shape, dtype)
            comm.all_gatherv(x, None if exchange_sizes else sizes, out=out)
            fresh = comm.all_gatherv(x, sizes)
            _sync(comm)
            what = f"rank {comm.rank} all_gatherv {dtype} sizes={sizes}"
            check_no_overrun(fbuf, shape, dtype, what)
            want = np.concatenate(inputs).view(np.uint8)
            assert np.array_equal(to_numpy(out, dtype).view(np.uint8), want), what
            assert np.array_equal(to_numpy(fresh, dtype).view(np.uint8), want), what + " (allocated out)"
    return case


def check_reduce_scatterv(comm, seed, framework, dtypes=ALL_DTYPES, exact=True, ops=("sum", "max")):
    case = 0
    for dtype in dtypes:
        if not supports(framework, dtype):
            continue
        for op in ops:
            for sizes in uneven_sizes(comm.size, case):
                case += 1
                total = sum(sizes)
                inputs = [make_input(seed, r, case, (total, 2), dtype, op, small_ints(dtype, exact))
                          for r in range(comm.size)]
                x = to_framework(inputs[comm.rank], framework, comm.device)
                mine = (sizes[comm.rank], 2)
                fbuf, out = sentinel_out(comm, framework, mine, dtype)
                comm.reduce_scatterv(x, sizes, op, out=out)
                _sync(comm)
                what = f"rank {comm.rank} reduce_scatterv {dtype} op={op} sizes={sizes}"
                check_no_overrun(fbuf, mine, dtype, what)
                off = sum(sizes[:comm.rank])
                part = [a[off:off + sizes[comm.rank]] for a in inputs]
                assert_close(to_numpy(out, dtype), _expect_reduction(comm, part, op, dtype, exact),
                             dtype, op, comm.size, what, inputs=part)
    return case


def check_v_bad_input(comm, seed, framework):
    """Bad sizes raise the same clear error on every rank, before the wire; the comm stays usable."""
    import pytest
    x = to_framework(np.ones((2, 4), np.float32), framework, comm.device)
    with pytest.raises(ValueError, match=f"sizes has {comm.size + 1} entries but the world size is {comm.size}"):
        comm.all_gatherv(x, [2] * (comm.size + 1))
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        comm.all_gatherv(x, [2] * (comm.size - 1) + [-1])
    wrong = [2] * comm.size
    wrong[comm.rank] = 3
    with pytest.raises(ValueError, match=rf"x has 2 rows but sizes\[{comm.rank}\]=3"):
        comm.all_gatherv(x, wrong)
    with pytest.raises(ValueError, match="x has 2 rows but sizes add up to"):
        comm.reduce_scatterv(x, [3] + [0] * (comm.size - 1))
    with pytest.raises(TypeError, match="sizes .* is required"):
        comm.reduce_scatterv(x, None)
    y = comm.all_gatherv(x, [2] * comm.size)
    _sync(comm)
    assert to_numpy(y, "float32").shape == (2 * comm.size, 4)
    return True


def check_in_place_and_overlap(comm, seed, framework):
    """The in-place forms (out=x; x as this rank's slot of a gather's out; out as this rank's part of a
    reduce-scatter's x) give the reference result; any other sharing of memory between x and out is a
    ValueError on every rank, before the wire, and the communicator stays usable."""
    import pytest
    n, me = comm.size, comm.rank
    rng = np.random.default_rng([seed, 77])
    parts = [rng.integers(-50, 50, size=(3, 5)).astype(np.int32) for _ in range(n)]   # exact sums in any order
    whole = [rng.integers(-50, 50, size=(3 * n, 5)).astype(np.int32) for _ in range(n)]
    total = np.sum(whole, axis=0, dtype=np.int64).astype(np.int32)

    def dev(a):
        return to_framework(a, framework, comm.device)

    x = dev(parts[me])
    assert comm.all_reduce(x, out=x) is x
    _sync(comm)
    assert np.array_equal(to_numpy(x, "int32"), np.sum(parts, axis=0, dtype=np.int32)), f"rank {me}: all_reduce in place"
    for root in range(n):
        x = dev(parts[me])
        comm.broadcast(x, root, out=x)
        _sync(comm)
        assert np.array_equal(to_numpy(x, "int32"), parts[root]), f"rank {me}: broadcast in place, root {root}"
        x = dev(parts[me])
        got = comm.reduce(x, root, out=x if me == root else None)
        _sync(comm)
        if me == root:
            assert got is x and np.array_equal(to_numpy(x, "int32"), np.sum(parts, axis=0, dtype=np.int32)), \
                f"rank {me}: reduce in place, root {root}"
    out = dev(np.zeros((3 * n, 5), np.int32))
    out[3 * me:3 * me + 3] = dev(parts[me])
    comm.all_gather(out[3 * me:3 * me + 3], out=out)
    _sync(comm)
    assert np.array_equal(to_numpy(out, "int32"), np.concatenate(parts)), f"rank {me}: all_gather in place"
    x = dev(whole[me])
    comm.reduce_scatter(x, out=x[3 * me:3 * me + 3])
    _sync(comm)
    assert np.array_equal(to_numpy(x, "int32")[3 * me:3 * me + 3], total[3 * me:3 * me + 3]), \
        f"rank {me}: reduce_scatter in place"

    buf = dev(np.zeros((3 * n + 1, 5), np.int32))
    sizes = [3] * n
    shifted = {   # every call reads x while it writes out, which here starts one row before x
        "all_reduce": lambda: comm.all_reduce(buf[1:4], out=buf[0:3]),
        "broadcast": lambda: comm.broadcast(buf[1:4], 0, out=buf[0:3]),
        "reduce": lambda: comm.reduce(buf[1:4], 0, out=buf[0:3]),
        "all_gather": lambda: comm.all_gather(buf[1:4], out=buf[0:3 * n]),
        "reduce_scatter": lambda: comm.reduce_scatter(buf[1:3 * n + 1], out=buf[0:3]),
        "all_to_all": lambda: comm.all_to_all(buf[1:3 * n + 1], out=buf[0:3 * n]),
        "all_gatherv": lambda: comm.all_gatherv(buf[1:4], sizes, out=buf[0:3 * n]),
        "reduce_scatterv": lambda: comm.reduce_scatterv(buf[1:3 * n + 1], sizes, out=buf[0:3]),
    }
    if n == 1:   # at one rank the slot forms have x at out's start: shift the other way
        shifted["all_gather"] = lambda: comm.all_gather(buf[0:3], out=buf[1:4])
        shifted["all_gatherv"] = lambda: comm.all_gatherv(buf[0:3], sizes, out=buf[1:4])
        shifted["reduce_scatter"] = lambda: comm.reduce_scatter(buf[0:3], out=buf[1:4])
        shifted["reduce_scatterv"] = lambda: comm.reduce_scatterv(buf[0:3], sizes, out=buf[1:4])
    for name, call in shifted.items():
        with pytest.raises(ValueError, match="overlaps the input x in memory"):
            call()
    assert np.array_equal(to_numpy(buf, "int32"), np.zeros((3 * n + 1, 5), np.int32)), f"rank {me}: a refused call wrote"
    got = comm.all_gather(dev(parts[me]))
    _sync(comm)
    assert np.array_equal(to_numpy(got, "int32"), np.concatenate(parts)), f"rank {me}: after the refused calls"
    return len(shifted)


def check_v_in_place(comm, seed, framework, ops=("all_gatherv", "reduce_scatterv")):
    """all_gatherv with x as this rank's rows of out, and reduce_scatterv into this rank's rows of x (NCCL's
    in-place forms), at uneven sizes with a zero, give the reference result."""
    n, me = comm.size, comm.rank
    rng = np.random.default_rng([seed, 78])
    sizes = [(3 + 2 * r) if r != 1 else 0 for r in range(n)]
    off = sum(sizes[:me])
    rows = [rng.integers(-50, 50, size=(s, 5)).astype(np.int32) for s in sizes]
    whole = [rng.integers(-50, 50, size=(sum(sizes), 5)).astype(np.int32) for _ in range(n)]
    if "all_gatherv" in ops:
        out = to_framework(np.zeros((sum(sizes), 5), np.int32), framework, comm.device)
        out[off:off + sizes[me]] = to_framework(rows[me], framework, comm.device)
        assert comm.all_gatherv(out[off:off + sizes[me]], sizes, out=out) is out
        _sync(comm)
        assert np.array_equal(to_numpy(out, "int32"), np.concatenate(rows)), f"rank {me}: all_gatherv in place"
    if "reduce_scatterv" in ops:
        x = to_framework(whole[me], framework, comm.device)
        comm.reduce_scatterv(x, sizes, out=x[off:off + sizes[me]])
        _sync(comm)
        total = np.sum(whole, axis=0, dtype=np.int64).astype(np.int32)
        assert np.array_equal(to_numpy(x, "int32")[off:off + sizes[me]], total[off:off + sizes[me]]), \
            f"rank {me}: reduce_scatterv in place"
    return len(ops)


def check_autograd_sees_writes(comm, seed, framework):
    """A torch tensor that a collective writes into (out=, recv) counts as modified in place for autograd:
    a backward pass that saved it fails loudly, as after a torch in-place op, instead of using new values."""
    import pytest
    import torch
    dev = "cpu" if comm.device is None else f"cuda:{comm.device}"
    peer_to, peer_from = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    writes = {
        "all_reduce": lambda t: comm.all_reduce(t, out=t),
        "all_gather": lambda t: comm.all_gather(t[comm.rank:comm.rank + 1], out=t[:comm.size]),
        "all_gatherv": lambda t: comm.all_gatherv(torch.ones(1, device=dev), [1] * comm.size, out=t[:comm.size]),
        "recv": lambda t: _send_recv(comm, torch.ones(4 * comm.size, device=dev), t, peer_to, peer_from),
    }
    for name, write in writes.items():
        saved = torch.ones(4 * comm.size, device=dev)
        weight = torch.full_like(saved, 2.0, requires_grad=True)
        loss = (weight * saved).sum()           # saves `saved` for the backward pass
        before = saved._version
        write(saved)
        _sync(comm)
        assert saved._version > before, f"rank {comm.rank}: {name} left the version counter at {before}"
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    return len(writes)


def _send_recv(comm, send, recv, peer_to, peer_from):
    with comm.group():
        comm.send(send, peer_to)
        comm.recv(recv, peer_from)


def check_all_reduce_large(comm, seed, framework, dtypes=("bfloat16", "float32", "int32")):
    """Arrays past the host backend's split threshold (reduce-scatter + all-gather) reduce identically."""
    n = (1 << 20) // 2 + 3  # an odd count of bf16 elements just over 1 MiB: uneven slices per rank
    case = 0
    for dtype in dtypes:
        for op in (("sum", "min") if dtype.startswith("int") else ("sum", "max", "avg")):
            case += 1
            inputs = [make_input(seed, r, case, (n,), dtype, op) for r in range(comm.size)]
            out = comm.all_reduce(to_framework(inputs[comm.rank], framework, comm.device), op)
            _sync(comm)
            what = f"rank {comm.rank} large all_reduce {dtype} op={op}"
            assert_close(to_numpy(out, dtype), same_order_reduce(inputs, op, comm.size, dtype), dtype, op, comm.size, what)
    return case


# The plain collectives' checks, shared by the host and the GPU test files.
COLLECTIVES = {
    "all_reduce": check_all_reduce,
    "broadcast": check_broadcast,
    "reduce": check_reduce,
    "all_gather": check_all_gather,
    "reduce_scatter": check_reduce_scatter,
    "all_to_all": check_all_to_all,
}
