"""all_gather_matmul / matmul_reduce_scatter on 2 and 4 GPUs against the sequential reference.

Tolerances (||out - ref|| / ||ref|| against a float64 product of the same bf16 operands): bf16
outputs 1e-2 (one bf16 rounding of the result is 2^-9 relative per element; cuBLAS's accumulation
order adds little); fp32 outputs 1e-3 (cuBLAS may use TF32 only if the caller enabled it; we do not).
FP4 is checked against the product with every peer's shard dequantized and this rank's exact.
Each check runs several calls with fresh inputs so both workspace slots and the barrier epochs turn over.
"""
from __future__ import annotations


import pytest

from conftest import need_gpus
from harness import env, run_ranks

pytestmark = pytest.mark.gpu
TOL = {"bfloat16": 1e-2, "float16": 5e-3, "float32": 1e-3}


def _setup(comm):
    import torch
    torch.cuda.set_device(comm.device)
    return torch


def _path(path):
    return env({"FP4CCL_OVERLAP": path})


def _randn(torch, g, shape, dtype):
    return torch.randn(shape, generator=g).to(dtype).cuda()


def _relerr(torch, out, ref):
    out = out.double()
    assert bool(torch.isfinite(out).all()), "non-finite output (unwritten or poisoned elements)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def ov_ag(comm, seed, dtype_name, shard_shape, gather_dim, rhs, path, calls=3):
    torch = _setup(comm)
    from fp4ccl.overlap import all_gather_matmul
    dtype = getattr(torch, dtype_name)
    W, r = comm.size, comm.rank
    for call in range(calls):
        g = torch.Generator().manual_seed(seed + 7919 * call)
        shards = [_randn(torch, g, shard_shape, dtype) for _ in range(W)]
        a_full = torch.cat(shards, dim=gather_dim)
        if rhs:
            bs = [_randn(torch, g, (96, a_full.shape[1]), dtype), _randn(torch, g, (40, a_full.shape[1]), dtype)]
            refs = [b.double() @ a_full.double().T for b in bs]
        else:
            bs = [_randn(torch, g, (a_full.shape[-1], 160), dtype), _randn(torch, g, (a_full.shape[-1], 24), dtype)]
            refs = [torch.matmul(a_full.double(), b.double()) for b in bs]
        outs_buf = [torch.full(ref.shape, float("nan"), dtype=dtype, device="cuda") for ref in refs]
        with _path(path):
            got_a, outs = all_gather_matmul(comm, shards[r], bs, gather_dim, out=outs_buf, gathered_rhs=rhs)
        with _path("sequential"):
            _, seq = all_gather_matmul(comm, shards[r], bs, gather_dim, return_a=False, gathered_rhs=rhs)
        torch.cuda.synchronize()
        assert torch.equal(got_a, a_full), f"call {call}: a_full differs from the concatenated shards"
        for j, (o, buf, ref, s) in enumerate(zip(outs, outs_buf, refs, seq)):
            assert o is buf
            err = _relerr(torch, o, ref)
            assert err < TOL[dtype_name], f"call {call} b{j}: rel err {err:.2e} vs float64"
            diff = _relerr(torch, o, s.double())
            assert diff < TOL[dtype_name], f"call {call} b{j}: differs from the sequential path by {diff:.2e}"
    return calls


def ov_ag_growing(comm, seed):
    """Shapes that grow between calls: the cached workspace grows (collectively) and stays correct."""
    _setup(comm)
    n = 0
    for rows in (64, 4096, 1024, 8192):  # 64 KiB, 4 MiB (grows past the 2 MiB minimum), 1 MiB, 8 MiB
        n += ov_ag(comm, seed + rows, "bfloat16", (rows, 512), 0, False, "pipelined", calls=1)
    return n


def ov_ag_fp4(comm, seed, fmt, gather_dim, path, rhs=False):
    torch = _setup(comm)
    from fp4ccl import formats
    from fp4ccl.overlap import all_gather_matmul
    W, r = comm.size, comm.rank
    for call in range(3):
        g = torch.Generator().manual_seed(seed + call)
        shards = [_randn(torch, g, (128, 256), torch.bfloat16) for _ in range(W)]
        deq = [s if p == r else formats.dequantize(formats.quantize(s, fmt), torch.bfloat16)
               for p, s in enumerate(shards)]
        a_ref = torch.cat(deq, dim=gather_dim)
        b = _randn(torch, g, (64, a_ref.shape[1]) if rhs else (a_ref.shape[1], 192), torch.bfloat16)
        with _path(path):
            got_a, (out,) = all_gather_matmul(comm, shards[r], [b], gather_dim, compress=fmt, gathered_rhs=rhs)
        torch.cuda.synchronize()
        assert torch.equal(got_a, a_ref), "a_full differs from the dequantized shards"
        want = b.double() @ a_ref.double().T if rhs else a_ref.double() @ b.double()
        err = _relerr(torch, out, want)
        assert err < TOL["bfloat16"], f"rel err {err:.2e}"
        if W > 1:
            exact = torch.cat(shards, dim=gather_dim)
            assert not torch.equal(got_a, exact), "peers' shards arrived exact: FP4 was not on the wire"
    return 1


def ov_rs(comm, seed, dtype_name, a_full_shape, n, scatter_dim, op, path, calls=3):
    torch = _setup(comm)
    from fp4ccl.overlap import matmul_reduce_scatter
    dtype = getattr(torch, dtype_name)
    W, r = comm.size, comm.rank
    K = a_full_shape[-1]
    k = K // W
    for call in range(calls):
        g = torch.Generator().manual_seed(seed + 104729 * call)
        A = _randn(torch, g, a_full_shape, dtype)
        B = _randn(torch, g, (K, n), dtype)
        a_r = A[..., r * k:(r + 1) * k].contiguous()
        b_r = B[r * k:(r + 1) * k].contiguous()
        with _path(path):
            out = matmul_reduce_scatter(comm, a_r, b_r, scatter_dim, op)
        with _path("sequential"):
            seq = matmul_reduce_scatter(comm, a_r, b_r, scatter_dim, op)
        torch.cuda.synchronize()
        full = torch.matmul(A.double(), B.double())
        if op == "avg":
            full = full / W
        size = full.shape[scatter_dim] // W
        ref = full.narrow(scatter_dim, r * size, size)
        assert out.shape == ref.shape and out.dtype == dtype, (out.shape, out.dtype, ref.shape)
        # partials round to the input dtype once each, then sum in fp32: about sqrt(W) roundings
        tol = 2 * TOL[dtype_name]
        err = _relerr(torch, out, ref)
        assert err < tol, f"call {call}: rel err {err:.2e} vs float64"
        diff = _relerr(torch, out, seq.double())
        assert diff < tol, f"call {call}: differs from the sequential path by {diff:.2e}"
    return calls


def ov_other_stream(comm, seed):
    """Called on a side stream the caller created: results are ordered on that stream."""
    torch = _setup(comm)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        n = ov_ag(comm, seed, "bfloat16", (256, 512), 0, False, "pipelined", calls=2)
        n += ov_rs(comm, seed, "bfloat16", (512, 256 * comm.size), 384, 0, "sum", "pipelined", calls=2)
    return n


def ov_variant(comm, seed, streams, chunks=1):
    """Every pipelined form under one copy-stream count (3 streams split unevenly) and number of
    pieces per pulled shard (3 split 250 rows unevenly)."""
    _setup(comm)
    with env({"FP4CCL_OVERLAP_STREAMS": str(streams), "FP4CCL_OVERLAP_CHUNKS": str(chunks)}):
        n = ov_ag(comm, seed, "bfloat16", (250, 512), 0, False, "pipelined")
        n += ov_ag(comm, seed + 1, "bfloat16", (250, 512), 1, False, "pipelined")
        n += ov_ag(comm, seed + 2, "bfloat16", (96, 256), 0, True, "pipelined", calls=1)
        n += ov_ag(comm, seed + 7, "bfloat16", (96, 256), 1, True, "pipelined", calls=1)
        n += ov_ag_fp4(comm, seed + 3, "nvfp4", 0, "pipelined")
        n += ov_ag_fp4(comm, seed + 4, "nvfp4", 1, "pipelined")
        n += ov_rs(comm, seed + 5, "bfloat16", (500 * comm.size, 256 * comm.size), 384, 0, "sum", "pipelined")
        n += ov_rs(comm, seed + 6, "bfloat16", (504, 256 * comm.size), 96 * comm.size, 1, "avg", "pipelined")
    return n


def ov_bad_unequal(comm):
    torch = _setup(comm)
    from fp4ccl.overlap import all_gather_matmul, matmul_reduce_scatter
    a = torch.randn(64 + (comm.rank == 0) * 64, 128, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(128, 32, device="cuda", dtype=torch.bfloat16)
    with _path("pipelined"):
        try:
            all_gather_matmul(comm, a, [b])
        except ValueError as err:
            assert "different" in str(err), err
        else:
            raise AssertionError("unequal shards did not raise")
        try:
            matmul_reduce_scatter(comm, a[:64 * comm.size], b.float())
        except TypeError as err:
            assert "must match" in str(err), err
        else:
            raise AssertionError("dtype mismatch did not raise")
        a = a[:64].contiguous()
        _, (out,) = all_gather_matmul(comm, a, [b])  # still in step
    torch.cuda.synchronize()
    assert out.shape == (64 * comm.size, 32)
    return 1


NRANKS = [2, 4]


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("path", ["pipelined", "sequential"])
@pytest.mark.parametrize("gather_dim", [0, 1])
def test_all_gather_matmul(nranks, path, gather_dim, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_ag, seed, "bfloat16", (256, 512), gather_dim, False, path, backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("gather_dim", [0, 1, 2])
def test_all_gather_matmul_leading_dims(nranks, gather_dim, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_ag, seed, "bfloat16", (4, 64, 256), gather_dim, False, "pipelined",
                         backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("gather_dim", [0, 1])
def test_all_gather_matmul_gathered_rhs(nranks, gather_dim, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_ag, seed, "bfloat16", (256, 512), gather_dim, True, "pipelined",
                         backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_all_gather_matmul_dtypes(nranks, dtype, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_ag, seed, dtype, (128, 256), 0, False, "pipelined", backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
def test_all_gather_matmul_workspace_grows(nranks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_ag_growing, seed, backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("gather_dim", [0, 1])
@pytest.mark.parametrize("path", ["pipelined", "sequential"])
def test_all_gather_matmul_fp4(nranks, fmt, gather_dim, path, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_ag_fp4, seed, fmt, gather_dim, path, backend="nccl"))


def ov_fp4_decode(comm, seed, decode):
    """Every FP4 all_gather_matmul form under one FP4CCL_OVERLAP_DECODE mode."""
    with env({"FP4CCL_OVERLAP_DECODE": decode}):
        n = ov_ag_fp4(comm, seed, "nvfp4", 0, "pipelined")
        n += ov_ag_fp4(comm, seed + 1, "mxfp4", 1, "pipelined")
        n += ov_ag_fp4(comm, seed + 2, "nvfp4", 0, "pipelined", rhs=True)
        n += ov_ag_fp4(comm, seed + 3, "nvfp4", 1, "pipelined", rhs=True)
    return n


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
@pytest.mark.parametrize("decode", ["side", "inline"])
def test_all_gather_matmul_fp4_decode_modes(nranks, decode, seed):
    """Where the pulled FP4 shards are decoded changes nothing in the result, in any form."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_fp4_decode, seed, decode, backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("path", ["pipelined", "sequential"])
@pytest.mark.parametrize("scatter_dim", [0, 1])
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_matmul_reduce_scatter(nranks, path, scatter_dim, op, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_rs, seed, "bfloat16", (512, 256 * nranks), 384, scatter_dim, op, path,
                         backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("scatter_dim", [0, 1, 2])
def test_matmul_reduce_scatter_leading_dims(nranks, scatter_dim, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_rs, seed, "bfloat16", (8, 64, 128 * nranks), 96 * nranks, scatter_dim, "sum",
                         "pipelined", backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_matmul_reduce_scatter_dtypes(nranks, dtype, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_rs, seed, dtype, (256, 128 * nranks), 200, 0, "sum", "pipelined",
                         backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
def test_overlap_on_a_caller_stream(nranks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_other_stream, seed, backend="nccl"))


SLEEP_CYCLES = 100_000_000   # ~50 ms of spinning: far longer than enqueuing a call takes


def _given_stream(torch, kind):
    """(what the test passes as stream=, a torch stream on the same CUDA stream for the test's own work)."""
    if kind == "cupy":
        import cupy
        s = cupy.cuda.Stream(non_blocking=True)
        return s, torch.cuda.ExternalStream(s.ptr)
    s = torch.cuda.Stream()   # not the default stream, and not synchronized with it
    return (s.cuda_stream if kind == "handle" else s), s


def _behind(torch, stream, writes):
    """Write (dst, src) pairs on `stream` behind a long kernel, with nothing synchronized after: a call
    that read the destinations on any other stream would find their stale contents. The caller has
    synchronized since making the sources, and keeps them until `stream` is synchronized."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        for dst, src in writes:
            dst.copy_(src)


def ov_explicit_stream(comm, seed, which, kind, path):
    """stream= given, torch's current stream left as the default: the inputs are written on the given
    stream just before the call, and only that stream is synchronized before the results are checked,
    so a call enqueued anywhere else reads stale inputs or is read unfinished. which: "ag" (plain and
    nvfp4) or "rs"; kind: a torch stream, its raw handle or a CuPy stream."""
    torch = _setup(comm)
    from fp4ccl.overlap import all_gather_matmul, matmul_reduce_scatter
    W, r = comm.size, comm.rank
    stream, s = _given_stream(torch, kind)
    bf16 = torch.bfloat16
    n = 0
    with _path(path):
        for fmt in ((None, "nvfp4") if which == "ag" else (None,)):
            # A warm-up sizes the workspace and loads the kernels (either might synchronize); its inputs
            # are then the stale contents the first checked call must not read.
            g = torch.Generator().manual_seed(seed - 1)
            if which == "ag":
                a = _randn(torch, g, (256, 512), bf16)
                b = _randn(torch, g, (512, 160), bf16)
                torch.cuda.synchronize()
                all_gather_matmul(comm, a, [b], compress=fmt, stream=stream)
            else:
                a = _randn(torch, g, (512, 256), bf16)
                b = _randn(torch, g, (256, 384), bf16)
                torch.cuda.synchronize()
                matmul_reduce_scatter(comm, a, b, stream=stream)
            for call in range(3):
                g = torch.Generator().manual_seed(seed + 7919 * call)
                if which == "ag":
                    shards = [_randn(torch, g, tuple(a.shape), bf16) for _ in range(W)]
                    b_new = _randn(torch, g, tuple(b.shape), bf16)
                    a_ref = _fp4_reference(torch, shards, r, fmt, 0)
                    torch.cuda.synchronize()
                    _behind(torch, s, [(a, shards[r]), (b, b_new)])
                    got_a, (got,) = all_gather_matmul(comm, a, [b], compress=fmt, stream=stream)
                    s.synchronize()
                    assert torch.equal(got_a, a_ref), f"{fmt} call {call}: a_full differs (stale inputs?)"
                    _check_products(torch, [got], a_ref, [b_new], False, f"{fmt} call {call}")
                else:
                    A = [_randn(torch, g, tuple(a.shape), bf16) for _ in range(W)]
                    B = [_randn(torch, g, tuple(b.shape), bf16) for _ in range(W)]
                    torch.cuda.synchronize()
                    _behind(torch, s, [(a, A[r]), (b, B[r])])
                    got = matmul_reduce_scatter(comm, a, b, stream=stream)
                    s.synchronize()
                    rows = a.shape[0] // W
                    ref = sum(x.double() @ y.double() for x, y in zip(A, B))[r * rows:(r + 1) * rows]
                    err = _relerr(torch, got, ref)
                    assert err < 2 * TOL["bfloat16"], f"call {call}: rel err {err:.2e} (stale inputs?)"
                n += 1
    return n


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("which", ["ag", "rs"])
@pytest.mark.parametrize("kind", ["torch", "handle", "cupy"])
@pytest.mark.parametrize("path", ["pipelined", "sequential"])
def test_overlap_on_an_explicit_stream(nranks, which, kind, path, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_explicit_stream, seed, which, kind, path, backend="nccl"))


def ov_replays_across_streams(comm, seed, which):
    """Repeated calls into out= alternate between two given streams (a torch stream and a raw handle),
    each with its own static arrays, with no host synchronization between them: the workspace they
    share must order each call after the previous one on the other stream, and each stream's repeats
    replay a graph of their own, on that stream."""
    torch = _setup(comm)
    from fp4ccl.overlap import all_gather_matmul, matmul_reduce_scatter
    W, r = comm.size, comm.rank
    bf16 = torch.bfloat16
    sides = [_given_stream(torch, kind) for kind in ("torch", "handle")]
    if which == "ag":
        shapes = {"a": (96, 256), "b": (256, 80), "out": (96 * W, 80)}
    else:
        shapes = {"a": (64 * W, 64), "b": (64, 80), "out": (64, 80)}
    sets = [{k: torch.empty(v, dtype=bf16, device="cuda") for k, v in shapes.items()} for _ in sides]
    calls = 6
    replayed0 = _replays(comm)
    with env({"FP4CCL_OVERLAP": "pipelined"}):
        for call in range(calls):
            work = []
            for i, t in enumerate(sets):
                g = torch.Generator().manual_seed(seed + 31 * call + i)
                A = [_randn(torch, g, shapes["a"], bf16) for _ in range(W)]
                if which == "ag":
                    B = _randn(torch, g, shapes["b"], bf16)
                    ref = torch.cat(A).double() @ B.double()
                else:
                    Bs = [_randn(torch, g, shapes["b"], bf16) for _ in range(W)]
                    B = Bs[r]
                    ref = sum(x.double() @ y.double() for x, y in zip(A, Bs))[r * 64:(r + 1) * 64]
                t["out"].fill_(float("nan"))
                work.append((A[r], B, ref))
            torch.cuda.synchronize()   # nothing below waits on the host until both calls are queued
            for (stream, s), t, (a, b, _) in zip(sides, sets, work):
                _behind(torch, s, [(t["a"], a), (t["b"], b)])
                if which == "ag":
                    none, (got,) = all_gather_matmul(comm, t["a"], [t["b"]], return_a=False, out=[t["out"]],
                                                     stream=stream)
                    assert none is None and got is t["out"]
                else:
                    assert matmul_reduce_scatter(comm, t["a"], t["b"], out=t["out"], stream=stream) is t["out"]
            for (_, s), t, (_, _, ref) in zip(sides, sets, work):
                s.synchronize()
                err = _relerr(torch, t["out"], ref)
                assert err < 2 * TOL["bfloat16"], f"call {call} on stream {s}: rel err {err:.2e}"
    # Each stream's key: at worst its first two calls run eagerly (a workspace grown by the first drops
    # the keys seen), the third captures; the rest replay.
    _check_replayed(comm, _replays(comm) - replayed0, False, 2 * (calls - 2))
    return 1


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("which", ["ag", "rs"])
def test_overlap_replays_on_alternating_streams(nranks, which, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_replays_across_streams, seed, which, backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
def test_overlap_bad_input_fails_everywhere(nranks):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_bad_unequal, backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("streams,chunks", [(1, 1), (3, 1), (1, 3), (2, 4)])
def test_overlap_variants(nranks, streams, chunks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_variant, seed, streams, chunks, backend="nccl"))


# -- CUDA graphs: the library's own replays of repeated calls, and calls captured by the caller ----------

def _fp4_reference(torch, shards, r, fmt, gather_dim):
    """a_full as the FP4 path builds it: every peer's shard dequantized, this rank's exact."""
    from fp4ccl import formats
    if fmt is None:
        return torch.cat(shards, dim=gather_dim)
    deq = [s if p == r else formats.dequantize(formats.quantize(s, fmt), s.dtype) for p, s in enumerate(shards)]
    return torch.cat(deq, dim=gather_dim)


def _check_products(torch, outs, a_ref, bs, rhs, what):
    for j, (o, b) in enumerate(zip(outs, bs)):
        want = b.double() @ a_ref.double().T if rhs else torch.matmul(a_ref.double(), b.double())
        err = _relerr(torch, o, want)
        assert err < TOL["bfloat16"], f"{what} b{j}: rel err {err:.2e}"


def _replays(comm) -> int:
    """Calls of this communicator served by a graph replay so far (the worker may have served earlier
    tests, even with the same addresses: count differences)."""
    st = comm._extras.get("fp4ccl.overlap")
    return st.replays.replayed if st is not None else 0


def _check_replayed(comm, n: int, fresh_on_peers: bool, least: int) -> None:
    """Ranks that passed the same arrays each time replayed at least `least` calls; ranks that passed
    new arrays every time (fresh_on_peers, every rank but 0) replayed none."""
    if comm.rank == 0 or not fresh_on_peers:
        assert n >= least, f"only {n} of the repeated calls into out= were replayed from a graph"
    else:
        assert n == 0, "new arrays must not hit a cached graph"


def ov_ag_replayed(comm, seed, fmt, gather_dim, rhs, fresh_on_peers, rows=96):
    """Calls into out= with return_a=False repeat: from the second repeat on they replay a CUDA graph.
    The static tensors get new contents before every call; an eager call (return_a=True) comes in
    between. fresh_on_peers: every rank but 0 passes new tensors each time (new addresses, so those
    ranks run eagerly while rank 0 replays): the ranks must still agree on slots and barriers."""
    torch = _setup(comm)
    from fp4ccl.overlap import all_gather_matmul
    W, r = comm.size, comm.rank
    shard_shape = (rows, 256)
    full_k = 256 * W if gather_dim == 1 else 256
    full_m = rows * W if gather_dim == 0 else rows
    b_shapes = [(64, full_k), (32, full_k)] if rhs else [(full_k, 80), (full_k, 48)]
    out_shapes = [(s[0], full_m) for s in b_shapes] if rhs else [(full_m, s[1]) for s in b_shapes]
    a_static = torch.empty(shard_shape, dtype=torch.bfloat16, device="cuda")
    b_static = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in b_shapes]
    o_static = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in out_shapes]
    keep = []   # fresh tensors stay alive, so their addresses are never handed out twice
    replayed0 = _replays(comm)
    with env({"FP4CCL_OVERLAP": "pipelined"}):
        for call in range(6):
            g = torch.Generator().manual_seed(seed + 31 * call)
            shards = [_randn(torch, g, shard_shape, torch.bfloat16) for _ in range(W)]
            bs_new = [_randn(torch, g, s, torch.bfloat16) for s in b_shapes]
            if fresh_on_peers and r != 0:
                a, bs = shards[r].clone(), [b.clone() for b in bs_new]
                outs = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in out_shapes]
                keep.append((a, bs, outs))
            else:
                a, bs, outs = a_static, b_static, o_static
                a.copy_(shards[r])
                for b, v in zip(bs, bs_new):
                    b.copy_(v)
            for o in outs:
                o.fill_(float("nan"))
            a_ref = _fp4_reference(torch, shards, r, fmt, gather_dim)
            if call == 3:   # an eager call between the replays
                got_a, got = all_gather_matmul(comm, a, bs, gather_dim, compress=fmt, gathered_rhs=rhs)
                torch.cuda.synchronize()
                assert torch.equal(got_a, a_ref), f"call {call}: a_full differs"
                _check_products(torch, got, a_ref, bs_new, rhs, f"call {call} (eager)")
            none, got = all_gather_matmul(comm, a, bs, gather_dim, return_a=False, out=outs, compress=fmt,
                                          gathered_rhs=rhs)
            torch.cuda.synchronize()
            assert none is None and all(x is y for x, y in zip(got, outs))
            _check_products(torch, got, a_ref, bs_new, rhs, f"call {call}")
    _check_replayed(comm, _replays(comm) - replayed0, fresh_on_peers, 4)   # calls 1-5: the first captures
    return 1


@pytest.mark.parametrize("nranks", [2, 3, 4])
@pytest.mark.parametrize("fmt,gather_dim,rhs", [(None, 0, False), (None, 1, False), ("nvfp4", 0, False),
                                                ("nvfp4", 1, True), ("mxfp4", 0, True)])
def test_all_gather_matmul_replays_a_graph(nranks, fmt, gather_dim, rhs, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_ag_replayed, seed, fmt, gather_dim, rhs, False, backend="nccl"))


def ov_ag_replay_growing(comm, seed):
    """Replayed calls, then a larger call that grows the workspace (dropping every graph), then the
    first shape again: captured anew, into the new buffer."""
    from fp4ccl.overlap import release_workspaces
    release_workspaces(comm)   # from the smallest workspace, whatever earlier tests in this worker left
    n = 0
    for rows in (96, 8192, 96):   # 8192 x 256 bf16 = 4 MiB shards: past the 2 MiB minimum workspace
        n += ov_ag_replayed(comm, seed + rows, None, 0, False, False, rows)
    return n


@pytest.mark.parametrize("nranks", [2, 4])
def test_all_gather_matmul_replays_across_growth(nranks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_ag_replay_growing, seed, backend="nccl"))


@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("fmt", [None, "nvfp4"])
def test_all_gather_matmul_replay_beside_eager_ranks(nranks, fmt, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_ag_replayed, seed, fmt, 0, False, True, backend="nccl"))


def ov_user_graph(comm, seed, fmt):
    """The caller captures all_gather_matmul and matmul_reduce_scatter in its own CUDA graph after one
    warm-up call, then replays it with new contents in the static inputs, with eager calls between."""
    torch = _setup(comm)
    from fp4ccl.overlap import all_gather_matmul, matmul_reduce_scatter
    W, r = comm.size, comm.rank
    a = torch.empty((128, 256), dtype=torch.bfloat16, device="cuda")
    b = torch.empty((256, 96), dtype=torch.bfloat16, device="cuda")
    ra = torch.empty((64 * W, 128), dtype=torch.bfloat16, device="cuda")
    rb = torch.empty((128, 160), dtype=torch.bfloat16, device="cuda")

    def fill(call):
        g = torch.Generator().manual_seed(seed + 17 * call)
        shards = [_randn(torch, g, tuple(a.shape), torch.bfloat16) for _ in range(W)]
        b.copy_(_randn(torch, g, tuple(b.shape), torch.bfloat16))
        a.copy_(shards[r])
        A = [_randn(torch, g, tuple(ra.shape), torch.bfloat16) for _ in range(W)]
        B = [_randn(torch, g, tuple(rb.shape), torch.bfloat16) for _ in range(W)]
        ra.copy_(A[r])
        rb.copy_(B[r])
        red = sum(x.double() @ y.double() for x, y in zip(A, B))
        return _fp4_reference(torch, shards, r, fmt, 0), red[r * 64:(r + 1) * 64]

    with env({"FP4CCL_OVERLAP": "pipelined"}):
        fill(0)
        all_gather_matmul(comm, a, [b], compress=fmt)            # warm-up: sizes the workspace
        matmul_reduce_scatter(comm, ra, rb)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got_a, (got,) = all_gather_matmul(comm, a, [b], compress=fmt)
            red = matmul_reduce_scatter(comm, ra, rb)
        for call in range(1, 6):
            a_ref, red_ref = fill(call)
            got.fill_(float("nan"))
            red.fill_(float("nan"))
            graph.replay()
            if call == 3:
                _, (eager,) = all_gather_matmul(comm, a, [b], compress=fmt)
                eager_red = matmul_reduce_scatter(comm, ra, rb)
            torch.cuda.synchronize()
            assert torch.equal(got_a, a_ref), f"replay {call}: a_full differs"
            _check_products(torch, [got], a_ref, [b], False, f"replay {call}")
            err = _relerr(torch, red, red_ref)
            assert err < 2 * TOL["bfloat16"], f"replay {call}: matmul_reduce_scatter rel err {err:.2e}"
            if call == 3:
                _check_products(torch, [eager], a_ref, [b], False, "eager call between replays")
                assert _relerr(torch, eager_red, red_ref) < 2 * TOL["bfloat16"]
    return 1


@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("fmt", [None, "nvfp4"])
def test_overlap_in_a_callers_graph(nranks, fmt, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_user_graph, seed, fmt, backend="nccl"))


def ov_capture_cold(comm):
    """Captured before any call sized the workspace: a clear error on every rank, then eager calls work."""
    torch = _setup(comm)
    from fp4ccl.overlap import all_gather_matmul, release_workspaces
    release_workspaces(comm)   # (this worker may have served earlier tests)
    a = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(128, 32, device="cuda", dtype=torch.bfloat16)
    with env({"FP4CCL_OVERLAP": "pipelined"}):
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                all_gather_matmul(comm, a, [b])
        except RuntimeError as err:
            assert "warm-up" in str(err), err
        else:
            raise AssertionError("a capture with no workspace did not raise")
        _, (out,) = all_gather_matmul(comm, a, [b])
    torch.cuda.synchronize()
    assert out.shape == (64 * comm.size, 32) and bool(torch.isfinite(out).all())
    return 1


@pytest.mark.parametrize("nranks", [2])
def test_overlap_capture_needs_a_warm_up(nranks):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_capture_cold, backend="nccl"))


def ov_rs_replayed(comm, seed, a_full_shape, n, scatter_dim, op, fresh_on_peers):
    """matmul_reduce_scatter into out= repeats: each parity of its two workspace slots gets a graph,
    replayed from its second use on. New contents before every call, an eager call (no out=) between,
    and with fresh_on_peers every rank but 0 passes new arrays (it runs eagerly while rank 0 replays)."""
    torch = _setup(comm)
    from fp4ccl.overlap import matmul_reduce_scatter
    W, r = comm.size, comm.rank
    K = a_full_shape[-1]
    k = K // W
    out_shape = list(a_full_shape[:-1]) + [n]
    out_shape[scatter_dim] //= W
    a_static = torch.empty(tuple(a_full_shape[:-1]) + (k,), dtype=torch.bfloat16, device="cuda")
    b_static = torch.empty((k, n), dtype=torch.bfloat16, device="cuda")
    o_static = torch.empty(out_shape, dtype=torch.bfloat16, device="cuda")
    keep = []
    replayed0 = _replays(comm)
    with env({"FP4CCL_OVERLAP": "pipelined"}):
        for call in range(7):
            g = torch.Generator().manual_seed(seed + 13 * call)
            A = _randn(torch, g, a_full_shape, torch.bfloat16)
            B = _randn(torch, g, (K, n), torch.bfloat16)
            a_r = A[..., r * k:(r + 1) * k]
            b_r = B[r * k:(r + 1) * k]
            if fresh_on_peers and r != 0:
                a, b = a_r.contiguous(), b_r.contiguous()
                o = torch.empty(out_shape, dtype=torch.bfloat16, device="cuda")
                keep.append((a, b, o))
            else:
                a, b, o = a_static, b_static, o_static
                a.copy_(a_r)
                b.copy_(b_r)
            o.fill_(float("nan"))
            full = torch.matmul(A.double(), B.double())
            if op == "avg":
                full = full / W
            size = full.shape[scatter_dim] // W
            ref = full.narrow(scatter_dim, r * size, size)
            if call == 3:
                eager = matmul_reduce_scatter(comm, a, b, scatter_dim, op)
            got = matmul_reduce_scatter(comm, a, b, scatter_dim, op, out=o)
            torch.cuda.synchronize()
            assert got is o
            err = _relerr(torch, o, ref)
            assert err < 2 * TOL["bfloat16"], f"call {call}: rel err {err:.2e}"
            if call == 3:
                assert _relerr(torch, eager, ref) < 2 * TOL["bfloat16"], "the eager call between the replays"
    _check_replayed(comm, _replays(comm) - replayed0, fresh_on_peers, 4)   # calls 2-6: one graph per parity
    return 1


@pytest.mark.parametrize("nranks", [2, 3, 4])
@pytest.mark.parametrize("a_full_shape,n,scatter_dim,op", [((256, 128), 96, 0, "sum"), ((128, 128), 64, 1, "avg"),
                                                           ((4, 48, 128), 40, 1, "sum")])
def test_matmul_reduce_scatter_replays_a_graph(nranks, a_full_shape, n, scatter_dim, op, seed):
    need_gpus(nranks)
    shape = tuple(d * nranks if i == len(a_full_shape) - 1 else d for i, d in enumerate(a_full_shape))
    nn = n * nranks if scatter_dim == len(a_full_shape) - 1 else n
    first = shape[0] * nranks if scatter_dim == 0 else shape[0]
    shape = (first,) + shape[1:]
    assert all(run_ranks(nranks, ov_rs_replayed, seed, shape, nn, scatter_dim, op, False, backend="nccl"))


@pytest.mark.parametrize("nranks", [2, 4])
def test_matmul_reduce_scatter_replay_beside_eager_ranks(nranks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_rs_replayed, seed, (64 * nranks, 64 * nranks), 80, 0, "sum", True,
                         backend="nccl"))
