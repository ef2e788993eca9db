"""Ranks that disagree on a call's shape, dtype, sizes, op or root get a ValueError, never wrong data or a hang.

Each rank checks what it receives against what it expects for the call, after the exchange round
is complete, so every rank that can see a mismatch raises and none is left waiting; the
communicator stays usable afterwards (checked by a correct all_reduce after each mismatch).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from harness import run_ranks


def _still_usable(comm):
    y = comm.all_reduce(np.full(3, comm.rank + 1, np.float32))
    assert np.all(y == comm.size * (comm.size + 1) / 2), f"rank {comm.rank}: {y}"


def _expect_error(comm, fn, *patterns):
    """Run fn(); it must raise ValueError whose message matches every pattern; return the message."""
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"rank {comm.rank}: {p!r} not in {msg!r}"
    _still_usable(comm)
    return msg


def _all_reduce_shapes(comm, count0, count):
    """Rank 0 passes count0 elements, the others count: every rank raises, naming a peer and both byte counts."""
    n = count0 if comm.rank == 0 else count
    x = np.ones(n, np.float32)
    mine, theirs = n * 4, (count if comm.rank == 0 else count0) * 4
    peer = r"rank [1-9]\d*" if comm.rank == 0 else "rank 0"
    return _expect_error(comm, lambda: comm.all_reduce(x), "all_reduce", peer, rf"\b{theirs} bytes",
                         rf"\b{mine} bytes", f"rank {comm.rank}")


@pytest.mark.parametrize("nranks", [2, 3])
def test_all_reduce_shapes_that_differ(nranks):
    run_ranks(nranks, _all_reduce_shapes, 4, 1)


@pytest.mark.parametrize("nranks", [2, 3])
def test_all_reduce_shapes_that_differ_past_the_split_threshold(nranks):
    run_ranks(nranks, _all_reduce_shapes, (1 << 20) // 4 + 5, (1 << 20) // 4 + 1)


def _all_reduce_dtypes(comm):
    """float32 (4,) on rank 0 against float64 (2,): the same 16 bytes, caught by the dtype."""
    x = np.ones(4, np.float32) if comm.rank == 0 else np.ones(2, np.float64)
    return _expect_error(comm, lambda: comm.all_reduce(x), "all_reduce", "float32", "float64")


@pytest.mark.parametrize("nranks", [2, 3])
def test_all_reduce_dtypes_that_differ_with_equal_bytes(nranks):
    run_ranks(nranks, _all_reduce_dtypes)


def _all_gatherv_counts(comm):
    """Rank 0 believes rank 1 sends 2 rows; rank 1 (and everyone else) says 1."""
    sizes = [1] * comm.size
    if comm.rank == 0:
        sizes[1] = 2
    x = np.full((1, 3), comm.rank, np.float32)
    return _expect_error(comm, lambda: comm.all_gatherv(x, sizes), "all_gatherv", "sizes")


@pytest.mark.parametrize("nranks", [2, 3])
def test_all_gatherv_sizes_that_differ(nranks):
    run_ranks(nranks, _all_gatherv_counts)


def _reduce_scatterv_counts(comm):
    sizes = [2] * comm.size
    sizes[0], sizes[1] = (3, 1) if comm.rank == 0 else (2, 2)
    x = np.ones((2 * comm.size, 2), np.float32)
    return _expect_error(comm, lambda: comm.reduce_scatterv(x, sizes), "reduce_scatterv", "sizes")


@pytest.mark.parametrize("nranks", [2, 3])
def test_reduce_scatterv_sizes_that_differ(nranks):
    run_ranks(nranks, _reduce_scatterv_counts)


def _fp4_reduce_scatterv_counts(comm, fmt):
    """The FP4 reduce-scatter moves byte chunks whose sizes follow from `sizes`: ranks that disagree on them
    get the same kind of error, not a wrong result on some ranks and a numpy error on others."""
    sizes = [2] * comm.size
    sizes[0], sizes[1] = (3, 1) if comm.rank == 0 else (2, 2)
    x = np.ones((2 * comm.size, 32), np.float32)
    return _expect_error(comm, lambda: comm.reduce_scatterv(x, sizes, compress=fmt), "reduce_scatterv", "sizes")


@pytest.mark.parametrize("nranks", [2, 3])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_reduce_scatterv_sizes_that_differ(nranks, fmt):
    run_ranks(nranks, _fp4_reduce_scatterv_counts, fmt)


def _other_collectives(comm):
    r = comm.rank
    rows = 2 if r == 0 else 1
    _expect_error(comm, lambda: comm.all_gather(np.ones((rows, 3), np.float32)), "all_gather", r"\b24 bytes", r"\b12 bytes")
    _expect_error(comm, lambda: comm.broadcast(np.ones(rows, np.int32), 0), "broadcast", r"\b8 bytes", r"\b4 bytes")
    _expect_error(comm, lambda: comm.reduce(np.ones(rows * comm.size, np.int64), 1), "reduce", "bytes")
    _expect_error(comm, lambda: comm.reduce_scatter(np.ones(rows * comm.size, np.float32)), "reduce_scatter", "bytes")
    _expect_error(comm, lambda: comm.all_to_all(np.ones(rows * comm.size, np.float32)), "all_to_all", "bytes")
    # Same bytes everywhere, different op or root.
    x = np.ones(4, np.float32)
    _expect_error(comm, lambda: comm.all_reduce(x, "max" if r == 0 else "sum"), "all_reduce", "op='max'", "op='sum'")
    _expect_error(comm, lambda: comm.broadcast(x, 1 if r == 0 else 0), "broadcast", "root=1", "root=0")
    _expect_error(comm, lambda: comm.reduce(x, 0, "min" if r == 0 else "sum"), "reduce", "op='min'")
    # Different collectives at the same point.
    call = (lambda: comm.all_gather(x)) if r == 0 else (lambda: comm.all_reduce(x))
    _expect_error(comm, call, "all_gather", "all_reduce", "same order")
    return True


@pytest.mark.parametrize("nranks", [2, 3])
def test_other_collectives_that_disagree(nranks):
    assert run_ranks(nranks, _other_collectives) == [True] * nranks


def _send_recv_mismatch(comm):
    """A recv whose buffer differs from the matching send in bytes or dtype raises on the receiver and leaves
    the message for the next recv from that peer; the sender is not held up and later messages between the
    pair still match."""
    if comm.rank == 0:
        comm.send(np.ones(4, np.float32), 1)
        comm.send(np.ones(2, np.float64), 1)
        comm.send(np.arange(3, dtype=np.int16), 1)
    elif comm.rank == 1:
        with pytest.raises(ValueError, match=r"recv.*rank 0.*16 bytes.*rank 1.*8 bytes"):
            comm.recv(np.empty(2, np.float32), 0)
        assert np.array_equal(comm.recv(np.empty(4, np.float32), 0), np.ones(4))   # the refused message
        with pytest.raises(ValueError, match=r"recv.*rank 0.*float64.*float32"):
            comm.recv(np.empty(4, np.float32), 0)
        assert np.array_equal(comm.recv(np.empty(2, np.float64), 0), np.ones(2))
        assert np.array_equal(comm.recv(np.empty(3, np.int16), 0), np.arange(3))
    _still_usable(comm)
    return True


@pytest.mark.parametrize("nranks", [2, 3])
def test_send_recv_that_disagree(nranks):
    assert run_ranks(nranks, _send_recv_mismatch) == [True] * nranks


def _group_recv_mismatch_two(comm):
    """2 ranks: rank 0's first recv buffer is one float too long; only rank 0 raises, and its second recv does
    not run (it would take the first's message out of order): both messages wait for its next recvs."""
    peer = 1 - comm.rank
    first = np.empty(5 if comm.rank == 0 else 4, np.float32)
    second = np.zeros(3, np.int32)

    def group():
        with comm.group():
            comm.recv(first, peer)
            comm.recv(second, peer)
            comm.send(np.ones(4, np.float32), peer)
            comm.send(np.full(3, comm.rank, np.int32), peer)
    if comm.rank == 0:
        with pytest.raises(ValueError, match=r"recv.*rank 1.*16 bytes.*rank 0.*20 bytes"):
            group()
        assert np.all(comm.recv(np.empty(4, np.float32), peer) == 1)
        comm.recv(second, peer)
    else:
        group()
        assert np.all(first == 1), first
    assert np.all(second == peer), second
    _still_usable(comm)
    return True


def test_group_recv_mismatch_completes_the_rest_of_the_group():
    assert run_ranks(2, _group_recv_mismatch_two) == [True, True]
