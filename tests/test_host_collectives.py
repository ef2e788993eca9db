"""Every collective on the host backend against a numpy reference, at 1..4 ranks, numpy and CPU torch."""
from __future__ import annotations

import pytest

import collective_checks as cc
from harness import run_ranks

RANKS = [1, 2, 3, 4]
CHECKS = {
    **cc.COLLECTIVES,
    "send_recv_ring": cc.check_send_recv_ring,
    "group_batch": cc.check_group_batch,
    "all_reduce_large": cc.check_all_reduce_large,
    "in_place_and_overlap": cc.check_in_place_and_overlap,
    "v_in_place": cc.check_v_in_place,
}


@pytest.mark.parametrize("nranks", RANKS)
@pytest.mark.parametrize("name", list(CHECKS))
def test_host_collective_numpy(name, nranks, seed):
    counts = run_ranks(nranks, CHECKS[name], seed, "numpy")
    assert all(c > 0 for c in counts)


@pytest.mark.parametrize("nranks", [1, 3])
@pytest.mark.parametrize("name", ["all_reduce", "all_gather", "reduce_scatter", "send_recv_ring"])
def test_host_collective_torch_cpu(name, nranks, seed):
    pytest.importorskip("torch", reason="torch is not installed")
    counts = run_ranks(nranks, CHECKS[name], seed, "torch_cpu")
    assert all(c > 0 for c in counts)


@pytest.mark.parametrize("nranks", [1, 2, 3])
def test_host_writes_are_seen_by_autograd(nranks, seed):
    pytest.importorskip("torch", reason="torch is not installed")
    assert all(run_ranks(nranks, cc.check_autograd_sees_writes, seed, "torch_cpu"))


@pytest.mark.parametrize("framework", ["numpy", "torch_cpu"])
@pytest.mark.parametrize("dtype", ["uint8", "bfloat16", "float32", "float64"])
def test_sentinel_catches_writes_on_either_side(framework, dtype):
    if framework == "torch_cpu":
        pytest.importorskip("torch", reason="torch is not installed")

    class Comm:
        device = None

    shape = (3, 5)
    item = cc.numpy_dtype(dtype).itemsize
    for offset, message in ((-1, "before the start"), (15, "past the end"), (None, None)):
        fbuf, out = cc.sentinel_out(Comm, framework, shape, dtype)
        assert out.shape == shape and cc.to_numpy(fbuf, "uint8").size == cc.SENTINEL_LEAD + (15 + cc.SENTINEL_PAD) * item
        address = out.ctypes.data if framework == "numpy" else out.data_ptr()
        base = fbuf.ctypes.data if framework == "numpy" else fbuf.data_ptr()
        assert address - base == cc.SENTINEL_LEAD          # out keeps the buffer's alignment
        out[...] = 1
        if offset is not None:
            start = cc.SENTINEL_LEAD // item + offset
            cc._typed(fbuf, framework, dtype)[start:start + 1] = 2
            with pytest.raises(AssertionError, match=message):
                cc.check_no_overrun(fbuf, shape, dtype, "probe")
        else:
            cc.check_no_overrun(fbuf, shape, dtype, "probe")
