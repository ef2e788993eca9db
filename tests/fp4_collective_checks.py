"""Checks of the FP4-aware collectives, for any backend and rank count (run through harness.run_ranks).

The reference is local: quantize each rank's shard on its own with the numpy codec and dequantize it.
The gathered result must equal that bit for bit (the wire adds no error); the FP4 reduce-scatter must
equal, to fp32 rounding, the sum of each contribution's own quantize->dequantize.
"""
from __future__ import annotations

import numpy as np

from collective_checks import _sync, check_no_overrun, sentinel_out, to_framework, to_numpy, uneven_sizes
from fp4ccl._arrays import numpy_dtype
from fp4ccl.formats import reference

DTYPES = ["bfloat16", "float16", "float32"]


def shard(seed, rank, case, rows, K, dtype):
    """Random rows with a wide dynamic range (one scaled-up row per shard) and an exact zero block."""
    rng = np.random.default_rng([seed, rank, case])
    x = rng.standard_normal((rows, K)).astype(np.float32) * np.float32(2.0 ** rng.integers(-6, 6))
    if rows:
        x[0] *= 37.0
        x[-1, :16] = 0.0
    return x.astype(numpy_dtype(dtype))


def roundtrip(x, fmt, amax=None, dtype=None):
    """Local quantize -> dequantize with the reference codec."""
    data, scales, s_dec = reference.quantize_2d(x, fmt, amax)
    return reference.dequantize_2d(data, scales, s_dec, fmt, x.shape[1], dtype or x.dtype)


def _cases(comm, framework, dtypes):
    """(case number, dtype, per-rank rows) over the dtypes the framework has and the uneven patterns."""
    case = 0
    for dtype in dtypes:
        if framework == "cupy" and dtype == "bfloat16":
            continue  # CuPy has no bfloat16
        for sizes in uneven_sizes(comm.size, case):
            case += 1
            yield case, dtype, sizes


def check_fp4_all_gatherv(comm, seed, framework, fmt, global_scale, dtypes=DTYPES, K=64):
    import fp4ccl
    case = 0
    for case, dtype, sizes in _cases(comm, framework, dtypes):
        shards = [shard(seed, r, case, sizes[r], K, dtype) for r in range(comm.size)]
        amax = None
        if global_scale == "shared" and fmt == "nvfp4":
            amax = max(reference.amax(s) for s in shards)
        want = np.concatenate([roundtrip(s, fmt, amax) if len(s) else s for s in shards])
        x = to_framework(shards[comm.rank], framework, comm.device)
        shape = (sum(sizes), K)
        fbuf, out = sentinel_out(comm, framework, shape, dtype)
        comm.all_gatherv(x, sizes, out=out, compress=fmt, global_scale=global_scale)
        q = comm.all_gatherv(x, sizes, compress=fmt, global_scale=global_scale, dequantize=False)
        again = q.dequantize()
        through_api = fp4ccl.dequantize(q)   # each rank's rows with its own global scale, as q.dequantize()
        _sync(comm)
        what = f"rank {comm.rank} all_gatherv {fmt} {global_scale} {dtype} sizes={sizes}"
        check_no_overrun(fbuf, shape, dtype, what)
        got = to_numpy(out, dtype)
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), what + _first_diff(got, want)
        assert np.array_equal(to_numpy(again, dtype).view(np.uint8), want.view(np.uint8)), what + " (FP4Tensor)"
        assert np.array_equal(to_numpy(through_api, dtype).view(np.uint8), want.view(np.uint8)), \
            what + " (fp4ccl.dequantize)"
        assert tuple(q.shape) == shape and q.row_offsets == tuple(np.cumsum([0] + sizes)), what
        if global_scale == "shared" and fmt == "nvfp4":
            assert np.ndim(to_numpy(q.global_scale, "float32")) == 0, what + " (one shared global scale)"
        elif case % 2:
            # out=: fresh rows gathered into the earlier result's arrays
            fresh = [shard(seed, r, 1000 + case, sizes[r], K, dtype) for r in range(comm.size)]
            arrays = (q.data, q.scales, q.global_scale)
            res = comm.all_gatherv(to_framework(fresh[comm.rank], framework, comm.device), sizes, out=q, compress=fmt,
                                   dequantize=False)
            again = q.dequantize()
            _sync(comm)
            assert res is q and (q.data, q.scales, q.global_scale) == arrays, what + " (out= returns out itself)"
            want = np.concatenate([roundtrip(s, fmt) if len(s) else s for s in fresh])
            assert np.array_equal(to_numpy(again, dtype).view(np.uint8), want.view(np.uint8)), what + " (out=)"
    return case


def check_fp4_gather_out_errors(comm, seed, framework):
    """A bad out= for an FP4 gather that returns FP4 raises before anything moves; a good call after it
    works."""
    import pytest
    import fp4ccl
    K, sizes = 32, [2] * comm.size
    x = to_framework(shard(seed, comm.rank, 5, 2, K, "float32"), framework, comm.device)
    q = comm.all_gatherv(x, sizes, compress="nvfp4", dequantize=False)
    mx = comm.all_gatherv(x, sizes, compress="mxfp4", dequantize=False)
    _, plain = sentinel_out(comm, framework, (sum(sizes), K), "float32")
    bad = [
        (dict(out=plain), TypeError, "GatheredFP4Tensor"),
        (dict(out=mx), ValueError, "not the FP4 tensor this gather returns"),
        (dict(out=q, global_scale="shared"), ValueError, "global_scale='shared'"),
    ]
    for kwargs, exc, words in bad:
        with pytest.raises(exc, match=words):
            comm.all_gatherv(x, sizes, compress="nvfp4", dequantize=False, **kwargs)
    with pytest.raises(ValueError, match="not the FP4 tensor"):   # other sizes: other row offsets
        comm.all_gatherv(x[:1], [1] * comm.size, compress="nvfp4", dequantize=False, out=q)
    shard_q = fp4ccl.quantize(x, "nvfp4")
    with pytest.raises(ValueError, match="not the FP4 tensor"):   # an FP4Tensor's gather keeps its dtype
        comm.all_gatherv(shard_q, sizes, out=comm.all_gatherv(to_framework(
            shard(seed, comm.rank, 6, 2, K, "float16"), framework, comm.device), sizes, compress="nvfp4",
            dequantize=False))
    assert comm.all_gatherv(shard_q, sizes, out=q) is q
    _sync(comm)
    want = np.concatenate([roundtrip(shard(seed, r, 5, 2, K, "float32"), "nvfp4") for r in range(comm.size)])
    assert np.array_equal(to_numpy(q.dequantize(), "float32"), want), f"rank {comm.rank}: the good call after"
    return True


def check_fp4_gather_tensor_as_is(comm, seed, framework, fmt):
    """comm.all_gatherv(q) on an FP4Tensor moves its bytes unchanged."""
    import fp4ccl
    sizes = [r + 1 for r in range(comm.size)]
    shards = [shard(seed, r, 99, sizes[r], 32, "float32") for r in range(comm.size)]
    q = fp4ccl.quantize(to_framework(shards[comm.rank], framework, comm.device), fmt)
    g = comm.all_gatherv(q, sizes)
    _sync(comm)
    want_data = np.concatenate([reference.quantize_2d(s, fmt)[0] for s in shards])
    want_scales = np.concatenate([reference.quantize_2d(s, fmt)[1] for s in shards])
    assert np.array_equal(to_numpy(g.data, "uint8"), want_data), f"rank {comm.rank} gathered data"
    assert np.array_equal(to_numpy(g.scales, "uint8"), want_scales), f"rank {comm.rank} gathered scales"
    want = np.concatenate([roundtrip(s, fmt) for s in shards])
    assert np.array_equal(to_numpy(g.dequantize(), "float32"), want), f"rank {comm.rank} gathered decode"
    return True


def check_fp4_gather_tensor_options(comm, seed, framework, fmt, K=64):
    """all_gatherv(q) of an FP4Tensor: FP4 by default and with dequantize=False; with dequantize=True the
    rows decoded to the dtype q was quantized from, in q's framework (into out= too). global_scale=
    (q's scale is fixed) and a compress= of another format are a ValueError on every rank before
    anything moves, sizes exchange included; reduce_scatterv refuses an FP4Tensor whatever the options."""
    import pytest
    import fp4ccl
    from fp4ccl._arrays import describe
    from fp4ccl.formats import GatheredFP4Tensor
    case = 0
    for case, dtype, sizes in _cases(comm, framework, DTYPES):
        shards = [shard(seed, r, 700 + case, sizes[r], K, dtype) for r in range(comm.size)]
        q = fp4ccl.quantize(to_framework(shards[comm.rank], framework, comm.device), fmt)
        shape = (sum(sizes), K)
        want = np.concatenate([roundtrip(s, fmt) if len(s) else s for s in shards])
        kept = comm.all_gatherv(q, sizes)
        raw = comm.all_gatherv(q, sizes, dequantize=False)
        rows = comm.all_gatherv(q, sizes, dequantize=True)
        fbuf, out = sentinel_out(comm, framework, shape, dtype)
        into = comm.all_gatherv(q, sizes, out=out, compress=fmt, dequantize=True)
        _sync(comm)
        what = f"rank {comm.rank} all_gatherv of an {fmt} FP4Tensor of {dtype}, sizes={sizes}"
        for g, how in ((kept, "no dequantize"), (raw, "dequantize=False")):
            assert type(g) is GatheredFP4Tensor, f"{what}, {how}: got a {type(g).__name__}"
            assert tuple(g.shape) == shape and g.dtype == dtype, f"{what}, {how}: {g!r}"
            assert np.array_equal(to_numpy(g.dequantize(), dtype).view(np.uint8), want.view(np.uint8)), f"{what}, {how}"
        info = describe(rows)
        assert (type(rows), info.dtype, info.shape) == (type(q.data), dtype, shape), \
            f"{what}, dequantize=True: got a {type(rows).__name__} {info.dtype}{list(info.shape)}"
        got = to_numpy(rows, dtype)
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), \
            f"{what}, dequantize=True" + _first_diff(got, want)
        assert into is out, f"{what}: out= returns out itself"
        check_no_overrun(fbuf, shape, dtype, what)
        assert np.array_equal(to_numpy(out, dtype).view(np.uint8), want.view(np.uint8)), f"{what}, into out="

    sizes = [2] * comm.size
    x = shard(seed, comm.rank, 799, 2, K, "float32")
    q = fp4ccl.quantize(to_framework(x, framework, comm.device), fmt)
    other = "mxfp4" if fmt == "nvfp4" else "nvfp4"
    _, plain = sentinel_out(comm, framework, (sum(sizes), K), "float16")
    for kwargs, exc, words in [
        (dict(global_scale="shared"), ValueError, "global_scale='shared' does not apply to an FP4Tensor"),
        (dict(global_scale="shared", dequantize=False, compress=fmt), ValueError, "global_scale='shared'"),
        (dict(compress=other), ValueError, f"compress='{other}' but x is already an {fmt} FP4Tensor"),
        (dict(compress=other, dequantize=True), ValueError, f"compress='{other}'"),
    ]:
        for s in (sizes, None):   # None: refused before the sizes exchange, too
            with pytest.raises(exc, match=words):
                comm.all_gatherv(q, s, **kwargs)
    with pytest.raises(TypeError, match="has dtype float16, expected float32"):
        comm.all_gatherv(q, sizes, dequantize=True, out=plain)
    with pytest.raises(TypeError, match="GatheredFP4Tensor"):
        comm.all_gatherv(q, sizes, out=plain)   # an FP4 result wants an FP4 out=
    for kwargs in (dict(), dict(compress=fmt), dict(compress=fmt, rounding="stochastic", seed=seed),
                   dict(rounding="stochastic", seed=seed)):
        with pytest.raises(TypeError, match="reduce_scatterv: x is an FP4Tensor"):
            comm.reduce_scatterv(q, sizes, **kwargs)
    got = comm.all_gatherv(q, sizes, dequantize=True)   # nothing reached the wire: still in step
    _sync(comm)
    want = np.concatenate([roundtrip(shard(seed, r, 799, 2, K, "float32"), fmt) for r in range(comm.size)])
    assert np.array_equal(to_numpy(got, "float32"), want), f"rank {comm.rank}: the good call after the refused ones"
    same = comm.all_gatherv(q, sizes, dequantize=True, global_scale="per_rank")   # what its gather keeps anyway
    assert np.array_equal(to_numpy(same, "float32"), want), f"rank {comm.rank}: global_scale='per_rank' given"
    return case


def check_fp4_reduce_scatterv(comm, seed, framework, fmt, dtypes=DTYPES, K=64):
    case = 0
    for case, dtype, sizes in _cases(comm, framework, dtypes):
        total = sum(sizes)
        inputs = [shard(seed, r, case, total, K, dtype) for r in range(comm.size)]
        off = sum(sizes[:comm.rank])
        n = sizes[comm.rank]
        # Each rank quantized the rows meant for us as a tensor of its own.
        parts = [roundtrip(a[off:off + n], fmt, dtype=np.float32) if n else np.zeros((0, K), np.float32)
                 for a in inputs]
        want = np.sum(parts, axis=0, dtype=np.float32) if n else np.zeros((0, K), np.float32)
        x = to_framework(inputs[comm.rank], framework, comm.device)
        fbuf, out = sentinel_out(comm, framework, (n, K), dtype)
        comm.reduce_scatterv(x, sizes, out=out, compress=fmt)
        _sync(comm)
        what = f"rank {comm.rank} reduce_scatterv {fmt} {dtype} sizes={sizes}"
        check_no_overrun(fbuf, (n, K), dtype, what)
        got = to_numpy(out, dtype).astype(np.float32)
        # fp32 sums in another order differ by a few fp32 ulps of the summed magnitudes (which
        # cancellation can make far larger than the sum), then round once to `dtype`.
        ulp = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
        tiny = {"float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}[dtype]
        magnitude = np.sum(np.abs(parts), axis=0) if n else want
        tol = 2 * ulp * np.abs(want) + 2.0**-21 * magnitude + tiny
        assert np.all(np.abs(got - want) <= tol), what + _first_diff(got, want)
    return case


def check_fp4_stochastic_rounding(comm, seed, framework, fmt, draws=64):
    """Mean error of stochastic-rounded reduce_scatterv over many seeds tends to 0; the same seed replays;
    with rounding to nearest a seed changes nothing."""
    K, sizes = 32, [4] * comm.size
    x_np = shard(seed, comm.rank, 5, sum(sizes), K, "float32")
    x = to_framework(x_np, framework, comm.device)
    exact = comm.all_reduce(x)
    first = None
    total = None
    for d in range(draws):
        y = comm.reduce_scatterv(x, sizes, compress=fmt, rounding="stochastic", seed=seed + d)
        y_np = to_numpy(y, "float32")
        if d == 0:
            first = y_np
        total = y_np.astype(np.float64) if total is None else total + y_np
    replay = to_numpy(comm.reduce_scatterv(x, sizes, compress=fmt, rounding="stochastic", seed=seed), "float32")
    _sync(comm)
    assert np.array_equal(replay, first), f"rank {comm.rank}: the same seed did not replay"
    off = 4 * comm.rank
    ref = to_numpy(exact, "float32")[off:off + 4].astype(np.float64)
    nearest = to_numpy(comm.reduce_scatterv(x, sizes, compress=fmt), "float32").astype(np.float64)
    seeded = to_numpy(comm.reduce_scatterv(x, sizes, compress=fmt, seed=seed + 1), "float32")
    _sync(comm)
    assert np.array_equal(seeded, nearest.astype(np.float32)), f"rank {comm.rank}: a seed changed a nearest rounding"
    bias_sr = np.abs(total / draws - ref).mean()
    bias_rn = np.abs(nearest - ref).mean()
    assert bias_sr < 0.5 * bias_rn, f"rank {comm.rank}: stochastic mean error {bias_sr:.3g} vs nearest {bias_rn:.3g}"
    return True


def _signed64(v: int) -> int:
    """The int64 whose bits are the unsigned 64-bit v."""
    return v - 2**64 if v >= 2**63 else v


def check_fp4_seed_arrays(comm, seed, framework, fmt):
    """A one-element int64 seed array (on x's device; on the host backend a host array, read at the call)
    gives the bytes of the same int seed, its value at the call is what counts, and bad seed arrays are
    refused on every rank before anything moves."""
    import pytest
    K, n, me = 64, comm.size, comm.rank
    sizes = [(3, 0, 5, 2)[r % 4] for r in range(n)]
    x = to_framework(shard(seed, me, 7, sum(sizes), K, "float32"), framework, comm.device)
    first = (seed * 7919 + 2**63 + 5) % 2**64    # past int64's range: the array holds its bits
    arr = to_framework(np.array([_signed64(first)], np.int64), framework, comm.device)

    def rs(s):
        y = comm.reduce_scatterv(x, sizes, compress=fmt, rounding="stochastic", seed=s)
        _sync(comm)
        return to_numpy(y, "float32")
    for value in (first, first + 1, 3):
        arr[...] = _signed64(value % 2**64)
        got, want = rs(arr), rs(value % 2**64)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), \
            f"rank {me}: seed array holding {value % 2**64} differs from the int seed"
        # an array whose only reference is the call's: it must outlive the launches that read it
        got = rs(to_framework(np.array([_signed64(value % 2**64)], np.int64), framework, comm.device))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"rank {me}: a temporary seed array"
    now, before = rs(arr), rs(first)   # collective: every rank calls both
    assert sizes[me] == 0 or not np.array_equal(now, before), f"rank {me}: the seed's value changed nothing"
    bad = [(to_framework(np.array([1.0], np.float32), framework, comm.device), "one int64 or uint64 element"),
           (to_framework(np.array([1, 2], np.int64), framework, comm.device), "one int64 or uint64 element")]
    if comm.device is not None:
        bad.append((np.array([1], np.int64), "must be on x's device"))
    for b, match in bad:
        with pytest.raises(ValueError, match=match):
            comm.reduce_scatterv(x, sizes, compress=fmt, rounding="stochastic", seed=b)
    y = rs(7)   # still usable: nothing reached the wire
    assert y.shape == (sizes[me], K)
    return True


def check_fp4_bad_input(comm, seed, framework):
    import pytest
    x = to_framework(np.ones((2, 48), np.float32), framework, comm.device)
    sizes = [2] * comm.size
    with pytest.raises(ValueError, match="K=48 must be a positive multiple of the block size 32"):
        comm.all_gatherv(x, sizes, compress="mxfp4")
    with pytest.raises(ValueError, match="compress='fp8' is not one of nvfp4, mxfp4"):
        comm.all_gatherv(x, sizes, compress="fp8")
    with pytest.raises(ValueError, match="global_scale='global' is not one of"):
        comm.all_gatherv(x, sizes, compress="nvfp4", global_scale="global")
    with pytest.raises(TypeError, match="x has dtype int32"):
        comm.all_gatherv(to_framework(np.ones((2, 16), np.int32), framework, comm.device), sizes, compress="nvfp4")
    with pytest.raises(ValueError, match="needs seed="):
        comm.reduce_scatterv(x, sizes, compress="nvfp4", rounding="stochastic")
    for bad_seed in (3.7, "3", -1, 2**64, True):   # int() would turn each into some other seed
        with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*64\)"):
            comm.reduce_scatterv(x, sizes, compress="nvfp4", rounding="stochastic", seed=bad_seed)
    with pytest.raises(ValueError, match="supports op='sum' only"):
        comm.reduce_scatterv(x, sizes, "max", compress="nvfp4")
    y = comm.all_gatherv(x, sizes, compress="nvfp4")  # still usable: nothing reached the wire
    _sync(comm)
    assert np.array_equal(to_numpy(y, "float32"), np.ones((2 * comm.size, 48), np.float32))
    return True


def _first_diff(got, want) -> str:
    g, w = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    bad = np.flatnonzero(~((g == w) | (np.isnan(g) & np.isnan(w))))
    if bad.size == 0:
        return ""
    i = bad[0]
    return f": {bad.size} differ; first at {i}: got {g[i]!r}, want {w[i]!r}"


def check_fp4_results_in_input_framework(comm, seed, framework, fmt):
    """FP4 gathers that return FP4 (compress=, dequantize=False; an FP4Tensor gathered as it is) give arrays
    of the input's framework, as fp4ccl.quantize does, and so do their decodes; for a numpy framework,
    numpy."""
    import fp4ccl
    sizes = [r % 2 + 1 for r in range(comm.size)]
    x = to_framework(shard(seed, comm.rank, 7, sizes[comm.rank], 32, "float32"), framework, comm.device)
    kind = type(x)
    q = fp4ccl.quantize(x, fmt)
    for what, g in (("compress", comm.all_gatherv(x, sizes, compress=fmt, dequantize=False)),
                    ("FP4Tensor", comm.all_gatherv(q, sizes))):
        arrays = [g.data, g.scales] + ([g.global_scale] if fmt == "nvfp4" else [])
        assert all(type(a) is kind for a in arrays), f"rank {comm.rank} {what}: {[type(a) for a in arrays]}"
        assert type(g.dequantize()) is kind and type(fp4ccl.dequantize(g)) is kind, f"rank {comm.rank} {what}"
    if fmt == "nvfp4":
        shared = comm.all_gatherv(x, sizes, compress=fmt, dequantize=False, global_scale="shared")
        assert type(shared.global_scale) is kind and tuple(shared.global_scale.shape) == (), f"rank {comm.rank}"
    return True


def check_fp4_ranks_disagree(comm, seed, framework):
    """Ranks that disagree on sizes (or on K) in an FP4 collective get a ValueError on every rank, as in
    the plain ones, also where the FP4 byte counts agree: 1 and 2 NVFP4 rows of K=16, and 1 row of K=32,
    all pack to 48 bytes, so only the row counts and K tell them apart. The communicator stays usable.
    Host transport (there every call compares them; the GPU path only under FP4CCL_CHECK=1). 2+ ranks."""
    import pytest
    import fp4ccl
    from fp4ccl.formats import packed_layout
    me, n = comm.rank, comm.size
    assert len({packed_layout(r, k, "nvfp4").total_bytes for r, k in ((1, 16), (2, 16), (1, 32))}) == 1
    same_sizes = r"sizes are \[[0-9, ]+\], rank \d+'s \[[0-9, ]+\]; every rank must pass the same sizes"
    x = to_framework(shard(seed, me, 7, 1 if me == 0 else 2, 16, "float32"), framework, comm.device)
    sizes = [1] + [2] * (n - 1) if me == 0 else [2] * n    # the others think rank 0 has 2 rows
    calls = {"gather": lambda: comm.all_gatherv(x, sizes, compress="nvfp4"),
             "gather, shared scale": lambda: comm.all_gatherv(x, sizes, compress="nvfp4", global_scale="shared"),
             "gather to FP4": lambda: comm.all_gatherv(x, sizes, compress="nvfp4", dequantize=False),
             "gather of an FP4Tensor": lambda: comm.all_gatherv(fp4ccl.quantize(x), sizes)}
    for what, call in calls.items():
        with pytest.raises(ValueError, match=same_sizes):
            call()
    # reduce_scatterv: the same rows, split differently (every chunk is 1 or 2 rows: 48 bytes)
    sizes = [1, 2] + [2] * (n - 2) if me == 0 else [2, 1] + [2] * (n - 2)
    x = to_framework(shard(seed, me, 8, sum(sizes), 16, "float32"), framework, comm.device)
    with pytest.raises(ValueError, match=same_sizes):
        comm.reduce_scatterv(x, sizes, compress="nvfp4")
    # K: rank 0 sends rows of K=32, the others rows of K=16, twice as many
    K, rows = (32, 1) if me == 0 else (16, 2)
    x = to_framework(shard(seed, me, 9, rows * n, K, "float32"), framework, comm.device)
    with pytest.raises(ValueError, match=r"K=(16|32).*K=(16|32).*every rank must pass"):
        comm.reduce_scatterv(x, [rows] * n, compress="nvfp4")
    with pytest.raises(ValueError, match=r"K=(16|32).*K=(16|32).*every rank must pass"):
        comm.all_gatherv(x[:rows], [rows] * n, compress="nvfp4")
    # still usable: every rank raised once the exchange had completed
    y = comm.all_gatherv(to_framework(np.ones((2, 16), np.float32), framework, comm.device), [2] * n,
                         compress="nvfp4")
    assert np.array_equal(to_numpy(y, "float32"), np.ones((2 * n, 16), np.float32))
    return True


def check_fp4_tensor_bad_input(comm, seed, framework):
    """An FP4Tensor that quantize could not have made (arrays that do not fit its shape, no global scale
    for NVFP4), a 1-D one (as for a 1-D array x), and a dequantize= that is not a bool: refused on the
    calling rank before anything reaches the wire, sizes exchange included; a good call after works."""
    import pytest
    import fp4ccl
    from fp4ccl.formats import FP4Tensor
    n = comm.size
    x = to_framework(shard(seed, comm.rank, 10, 4, 32, "float32"), framework, comm.device)
    q, half = fp4ccl.quantize(x), fp4ccl.quantize(x[:2])
    bad = {"more rows than its arrays": FP4Tensor(half.data, half.scales, half.global_scale, "nvfp4", (4, 32)),
           "fewer rows than its arrays": FP4Tensor(q.data, q.scales, q.global_scale, "nvfp4", (2, 32))}
    for what, t in bad.items():
        for sizes in (None, [t.shape[0]] * n):
            for dequantize in (None, True):
                with pytest.raises(ValueError, match=r"do not fit shape"):
                    comm.all_gatherv(t, sizes, dequantize=dequantize)
    no_scale = FP4Tensor(q.data, q.scales, None, "nvfp4", q.shape)
    with pytest.raises(TypeError, match=r"q\.global_scale"):
        comm.all_gatherv(no_scale, [4] * n)
    flat = fp4ccl.quantize(to_framework(np.ones(32, np.float32), framework, comm.device))   # shape (32,)
    for sizes in (None, [32] * n, [1] * n):
        for dequantize in (None, True):
            with pytest.raises(ValueError, match=r"needs x of shape \[rows, \.\.\., K\], got \(32,\)"):
                comm.all_gatherv(flat, sizes, dequantize=dequantize)
    for not_bool in ("no", 0, 1.0):
        with pytest.raises(TypeError, match="dequantize"):
            comm.all_gatherv(x, [4] * n, compress="nvfp4", dequantize=not_bool)
        with pytest.raises(TypeError, match="dequantize"):
            comm.all_gatherv(q, [4] * n, dequantize=not_bool)
        with pytest.raises(TypeError, match="dequantize"):   # without compress= too (the plain path)
            comm.all_gatherv(x, [4] * n, dequantize=not_bool)
    g = comm.all_gatherv(q, [4] * n, dequantize=True)   # still usable: nothing reached the wire
    _sync(comm)
    want = np.concatenate([roundtrip(shard(seed, r, 10, 4, 32, "float32"), "nvfp4") for r in range(n)])
    assert np.array_equal(to_numpy(g, "float32"), want), f"rank {comm.rank}: the good call after"
    return True


def check_fp4_gpu_agreement_under_fp4ccl_check(comm):
    """The GPU path's form of check_fp4_ranks_disagree, run on the host: for an array on a GPU,
    fp4_collectives._codec compares format, K, rows per dim-0 row and sizes up front under FP4CCL_CHECK=1
    (one bootstrap round trip; a ValueError on every rank), and exchanges nothing without it. Nothing
    here touches a GPU: the codec is only made (stream 0 given), never run. 2+ ranks."""
    import pytest
    from fp4ccl import fp4_collectives as f4
    from fp4ccl._arrays import ArrayInfo
    from harness import env
    me, n = comm.rank, comm.size
    K = 32 if me == 0 else 16
    gpu_x = ArrayInfo(None, "torch", 0, (2, K), "float32", 0, True)
    with env({"FP4CCL_CHECK": "1"}):
        with pytest.raises(ValueError, match=r"K=(16|32) values in nvfp4, rank \d+'s 1 x K=(16|32)"):
            f4._codec(comm, gpu_x, 0, "all_gatherv with compress='nvfp4'", "nvfp4", K, 1, [2] * n)
        assert isinstance(f4._codec(comm, gpu_x, 0, "all_gatherv", "nvfp4", 16, 1, [2] * n), f4._GpuCodec)
    with env({"FP4CCL_CHECK": "0"}):   # no round trip: rank 0 alone makes the call
        if me == 0:
            assert isinstance(f4._codec(comm, gpu_x, 0, "all_gatherv", "nvfp4", K, 1, [2] * n), f4._GpuCodec)
    return True
