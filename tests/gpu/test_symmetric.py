"""Symmetric memory on 2 and 4 GPUs (CUDA VMM and CUDA IPC): peer views, remote writes, barriers that
order, teardown."""
from __future__ import annotations

import os

import pytest

from conftest import need_gpus
from harness import run_ranks

pytestmark = pytest.mark.gpu


def _setup(comm):
    import torch
    torch.cuda.set_device(comm.device)
    return torch


def _pattern(torch, seed, rank, shape, dtype):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(shape, generator=g).to(dtype)


def sym_write_read(comm, seed, dtype_name):
    """Each rank writes its buffer; every rank reads every peer's. Rank 0 also writes into rank 1's."""
    torch = _setup(comm)
    from fp4ccl.symmetric import symmetric_empty
    dtype = getattr(torch, dtype_name)
    shape = (1000, 33)
    buf = symmetric_empty(comm, shape, dtype_name)
    try:
        assert buf.local.shape == shape and buf.local.dtype == dtype
        assert buf.local.device == torch.device("cuda", comm.device)
        buf.local.copy_(_pattern(torch, seed, comm.rank, shape, dtype).cuda())
        buf.barrier()
        for p in range(comm.size):
            view = buf.peer(p)
            assert view.device == torch.device("cuda", comm.device), view.device  # usable by local kernels
            got = view.clone().cpu()
            want = _pattern(torch, seed, p, shape, dtype)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"rank {comm.rank} read rank {p} wrong"
        buf.barrier()  # everyone has read before rank 0 overwrites rank 1's buffer
        if comm.rank == 0 and comm.size > 1:
            buf.peer(1).fill_(7)
        buf.barrier()
        if comm.rank == 1:
            assert bool((buf.local == 7).all()), "rank 0's remote write did not arrive"
        torch.cuda.synchronize()
    finally:
        buf.free()
    return 1


def sym_alloc_free_cycles(comm, cycles):
    """Allocate, use and free `cycles` times; device memory must not grow."""
    torch = _setup(comm)
    import cupy
    from fp4ccl.symmetric import symmetric_empty

    def cycle(i):
        buf = symmetric_empty(comm, (1 << 20,), "uint8")
        buf.local[:16].fill_(i % 251)
        buf.barrier()
        nxt = buf.peer((comm.rank + 1) % comm.size)[:16].clone()
        buf.barrier()
        buf.free()
        return nxt

    # Workers outlive a test (tests/harness.py), so buffers cached by earlier tests (overlap workspaces)
    # may be registered already: only the ones allocated here must be gone.
    reg = comm._extras.get("fp4ccl.symmetric")
    before = set(reg.live) if reg is not None else set()
    for i in range(20):
        cycle(i)
    torch.cuda.synchronize()
    free0 = cupy.cuda.runtime.memGetInfo()[0]
    for i in range(cycles):
        nxt = cycle(i)
        if i % 100 == 0:
            assert bool((nxt == i % 251).all()), f"cycle {i}: a peer's buffer held stale data"
    torch.cuda.synchronize()
    free1 = cupy.cuda.runtime.memGetInfo()[0]
    grown = free0 - free1
    assert grown < (8 << 20), f"device memory shrank by {grown >> 20} MiB over {cycles} allocate/free cycles"
    reg = comm._extras.get("fp4ccl.symmetric")
    assert reg is None or set(reg.live) <= before, "freed buffers still registered"
    return grown


def sym_with_alloc(comm, mode, fn, *args):
    """fn(comm, *args) with symmetric buffers made the `mode` way (FP4CCL_SYMM_ALLOC), checked on one."""
    old = os.environ.get("FP4CCL_SYMM_ALLOC")
    os.environ["FP4CCL_SYMM_ALLOC"] = mode
    try:
        from fp4ccl.symmetric import symmetric_empty
        probe = symmetric_empty(comm, (4096,), "uint8")
        kind = probe.kind
        probe.free()
        assert kind == mode, f"FP4CCL_SYMM_ALLOC={mode} made a {kind} buffer"
        return fn(comm, *args)
    finally:
        if old is None:
            os.environ.pop("FP4CCL_SYMM_ALLOC", None)
        else:
            os.environ["FP4CCL_SYMM_ALLOC"] = old


def sym_mismatch(comm):
    """Sizes that differ between ranks fail on every rank; the next good allocation works."""
    _setup(comm)
    from fp4ccl.symmetric import symmetric_empty
    try:
        symmetric_empty(comm, (100 + comm.rank,), "float32")
    except ValueError as err:
        assert "same shape" in str(err), err
    else:
        raise AssertionError("mismatched symmetric_empty did not raise")
    buf = symmetric_empty(comm, (100,), "float32")
    buf.free()
    return 1


def sym_barrier_stress(comm, iters, use_barrier, mode=None):
    """Write, barrier, read the next rank's buffer, barrier; one rank per round is slowed down first.

    Returns the number of stale elements read. With barriers it must be 0; without, the slowed
    writer guarantees stale reads, which shows the check can see a missing barrier.
    """
    torch = _setup(comm)
    from fp4ccl.symmetric import symmetric_empty
    W, r = comm.size, comm.rank
    n = 4 << 20
    buf = symmetric_empty(comm, (n,), "float32")
    dst = torch.empty(n, dtype=torch.float32, device="cuda")
    bad = torch.zeros((), dtype=torch.int64, device="cuda")
    buf.local.fill_(-1)
    torch.cuda.synchronize()
    comm.barrier()
    nxt = (r + 1) % W
    try:
        for i in range(iters):
            if i % W == r:
                torch.cuda._sleep(2_000_000)  # about a millisecond: this round's writer is late
            buf.local.fill_(float(i * W + r))
            if use_barrier:
                buf.barrier(mode=mode)
            dst.copy_(buf.peer(nxt))
            bad += (dst != float(i * W + nxt)).sum()
            if use_barrier:
                buf.barrier(mode=mode)
        torch.cuda.synchronize()
        comm.barrier()
    finally:
        buf.free()
    return int(bad.item())


ALLOC = ["vmm", "ipc"]


@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("alloc", ALLOC)
def test_symmetric_write_read(nranks, dtype, alloc, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, sym_with_alloc, alloc, sym_write_read, seed, dtype, backend="nccl"))


@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("alloc", ALLOC)
def test_symmetric_alloc_free_1000_cycles(nranks, alloc):
    need_gpus(nranks)
    run_ranks(nranks, sym_with_alloc, alloc, sym_alloc_free_cycles, 1000, backend="nccl")


@pytest.mark.parametrize("nranks", [2, 4])
def test_symmetric_size_mismatch(nranks):
    need_gpus(nranks)
    assert all(run_ranks(nranks, sym_mismatch, backend="nccl"))


@pytest.mark.parametrize("nranks", [2, 4])
def test_barrier_orders_and_its_absence_is_seen(nranks):
    need_gpus(nranks)
    with_barrier = run_ranks(nranks, sym_barrier_stress, 40, True, backend="nccl")
    assert with_barrier == [0] * nranks, f"stale reads despite barriers: {with_barrier}"
    without = run_ranks(nranks, sym_barrier_stress, 40, False, backend="nccl")
    assert sum(without) > 0, "the stress test saw no stale data without barriers: it cannot detect a broken barrier"


def sym_push_stress(comm, iters, mode):
    """Remote writes (the reduce-scatter pattern): rank r fills its part of the next rank's buffer over
    NVLink with the copy engine, barrier, then the owner checks every part. One rank per round is late."""
    torch = _setup(comm)
    from cupy.cuda import runtime
    from fp4ccl.symmetric import symmetric_empty
    W, r = comm.size, comm.rank
    n = 1 << 20
    buf = symmetric_empty(comm, (W, n), "float32")
    src = torch.empty(n, dtype=torch.float32, device="cuda")
    bad = torch.zeros((), dtype=torch.int64, device="cuda")
    buf.local.fill_(-1)
    torch.cuda.synchronize()
    comm.barrier()
    nxt, prv = (r + 1) % W, (r - 1) % W
    stream = torch.cuda.current_stream()
    try:
        for i in range(iters):
            if i % W == r:
                torch.cuda._sleep(2_000_000)
            src.fill_(float(i * W + r))
            runtime.memcpyAsync(buf.ptr(nxt) + r * n * 4, src.data_ptr(), n * 4, runtime.memcpyDefault,
                                stream.cuda_stream)
            buf.barrier(mode=mode)
            bad += (buf.local[prv] != float(i * W + prv)).sum()
            buf.barrier(mode=mode)
        torch.cuda.synchronize()
        comm.barrier()
    finally:
        buf.free()
    return int(bad.item())


@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("mode", ["kernel", "memop"])
def test_barrier_modes_order_reads_and_remote_writes(nranks, mode):
    need_gpus(nranks)
    got = run_ranks(nranks, sym_barrier_stress, 24, True, mode, backend="nccl")
    assert got == [0] * nranks, f"{mode}: stale reads despite barriers: {got}"
    got = run_ranks(nranks, sym_push_stress, 24, mode, backend="nccl")
    assert got == [0] * nranks, f"{mode}: pushed data not visible after the barrier: {got}"
