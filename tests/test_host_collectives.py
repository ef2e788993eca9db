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
