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


def ov_variant(comm, seed, barrier, streams, chunks=1):
    """Every pipelined form under one barrier mode, copy-stream count (3 streams split unevenly) and
    number of pieces per pulled shard (3 split 250 rows unevenly)."""
    _setup(comm)
    with env({"FP4CCL_SYMM_BARRIER": barrier, "FP4CCL_OVERLAP_STREAMS": str(streams),
              "FP4CCL_OVERLAP_CHUNKS": str(chunks)}):
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


@pytest.mark.parametrize("nranks", NRANKS)
def test_overlap_bad_input_fails_everywhere(nranks):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_bad_unequal, backend="nccl"))


@pytest.mark.parametrize("nranks", NRANKS)
@pytest.mark.parametrize("barrier,streams,chunks", [("memop", 1, 1), ("memop", 3, 1), ("kernel", 3, 1),
                                                    ("memop", 1, 3), ("memop", 2, 4)])
def test_overlap_variants(nranks, barrier, streams, chunks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, ov_variant, seed, barrier, streams, chunks, backend="nccl"))
