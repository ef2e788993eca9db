"""all_gatherv / reduce_scatterv on the host backend: uneven sizes with zeros at every position, 1..4 ranks."""
from __future__ import annotations

import pytest

import collective_checks as cc
from harness import run_ranks


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_all_gatherv(nranks, seed):
    assert all(run_ranks(nranks, cc.check_all_gatherv, seed, "numpy"))


@pytest.mark.parametrize("nranks", [1, 3])
def test_all_gatherv_exchanging_sizes(nranks, seed):
    assert all(run_ranks(nranks, cc.check_all_gatherv, seed, "numpy", ["float32", "bfloat16"], True))


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_reduce_scatterv(nranks, seed):
    assert all(run_ranks(nranks, cc.check_reduce_scatterv, seed, "numpy"))


@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_v_bad_input(nranks, seed):
    assert all(run_ranks(nranks, cc.check_v_bad_input, seed, "numpy"))


def _mismatched_sizes(comm):
    import os

    import numpy as np
    os.environ["FP4CCL_CHECK"] = "1"
    try:
        sizes = [1] * comm.size
        sizes[0] += comm.rank  # every rank believes something different about rank 0
        x = np.ones((sizes[comm.rank], 2), np.float32)
        try:
            comm.all_gatherv(x, sizes)
        except ValueError as err:
            assert "ranks passed different sizes" in str(err), err
            return True
        raise AssertionError(f"rank {comm.rank}: mismatched sizes were not detected")
    finally:
        del os.environ["FP4CCL_CHECK"]


def test_sizes_that_disagree_between_ranks_are_caught_with_fp4ccl_check():
    assert run_ranks(3, _mismatched_sizes) == [True] * 3
