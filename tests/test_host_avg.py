"""op='avg' on floating dtypes does not overflow where the average itself fits (NCCL pre-multiplies by 1/n).

The host backend accumulates each contribution divided by n in float64 and rounds once to the output
dtype; sum/prod/max/min keep reducing in the input dtype, in rank order.
"""
from __future__ import annotations

import numpy as np
import pytest

from fp4ccl._arrays import numpy_dtype
from harness import run_ranks

# (dtype, a value near the dtype's largest): the sum over ranks overflows, the average does not.
NEAR_MAX = [("float16", 40000.0), ("bfloat16", 3e38), ("float32", 3e38), ("float64", 1.5 * 2.0**1023),
            ("float8_e4m3fn", 448.0), ("float8_e5m2", 57344.0)]


def _avg_near_max(comm, dtype, value):
    dt = numpy_dtype(dtype)
    x = np.full(6 * comm.size, value, np.float64).astype(dt)
    want = x.astype(np.float64)
    results = {
        "all_reduce": comm.all_reduce(x, "avg"),
        "reduce": comm.reduce(x, 0, "avg"),
        "reduce_scatter": comm.reduce_scatter(x, "avg"),
        "reduce_scatterv": comm.reduce_scatterv(x, [6] * comm.size, "avg"),
    }
    for name, got in results.items():
        if got is None:
            continue
        got64 = np.asarray(got).astype(np.float64)
        assert np.all(np.isfinite(got64)), f"rank {comm.rank} {name} {dtype}: {got64[:3]}"
        assert np.array_equal(got64, want[:got64.size]), f"rank {comm.rank} {name} {dtype}: {got64[:3]}"
    return True


@pytest.mark.parametrize("nranks", [1, 3])
@pytest.mark.parametrize("dtype, value", NEAR_MAX)
def test_avg_near_the_largest_value(nranks, dtype, value):
    assert run_ranks(nranks, _avg_near_max, dtype, value) == [True] * nranks


def _avg_large_path(comm):
    """Past the split threshold each rank averages one slice: still no overflow, and bit-identical."""
    n = (1 << 20) // 2 + 3
    x = np.full(n, 40000.0, np.float16)
    x[::7] = -1.5 * (comm.rank + 1)
    got = comm.all_reduce(x, "avg")
    assert np.all(got[1:7] == np.float16(40000.0)), got[:8]
    want = np.float16(np.mean([-1.5 * (r + 1) for r in range(comm.size)]))
    assert np.all(got[::7] == want), (got[::7][:3], want)
    return got.tobytes()


@pytest.mark.parametrize("nranks", [2, 3])
def test_avg_large_all_reduce(nranks):
    results = run_ranks(nranks, _avg_large_path)
    assert all(r == results[0] for r in results)  # every rank computed the same bits


def _avg_is_correctly_rounded(comm):
    """Averages of values that do not add up exactly in the input dtype round once, from float64."""
    rng = np.random.default_rng(comm.size)
    inputs = rng.standard_normal((comm.size, 257)).astype(np.float32)
    got = comm.all_reduce(inputs[comm.rank].astype(np.float16), "avg")
    want = np.zeros(257, np.float64)
    for part in inputs.astype(np.float16).astype(np.float64):  # rank order, each divided by n first
        want += part / comm.size
    want = want.astype(np.float16)
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:5]
    return True


@pytest.mark.parametrize("nranks", [2, 3, 4])
def test_avg_rounds_once(nranks):
    assert run_ranks(nranks, _avg_is_correctly_rounded) == [True] * nranks
