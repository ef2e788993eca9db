"""Point-to-point calls inside `with comm.group():` on the host backend may come in any order, as in NCCL.

Inside a group the host backend sends at once (sends never block) and holds every recv back until
the group ends, so a rank that receives before it sends cannot wait for a peer that is itself
waiting to receive.
"""
from __future__ import annotations

import numpy as np
import pytest

from harness import run_ranks


def _payload(src: int, dst: int, k: int) -> np.ndarray:
    """Message k from src to dst: its own length and values, so a mixed-up match shows."""
    return np.arange(3 + src + 2 * dst + k, dtype=np.float32) + 100 * src + 10 * dst + k


def _ring_recv_first(comm, count):
    nxt, prv = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    x = np.full(count, comm.rank + 1, np.float32)
    out = np.zeros(count, np.float32)
    with comm.group():
        comm.recv(out, prv)  # before the send: blocks forever unless the recv waits for group_end
        comm.send(x, nxt)
    assert np.array_equal(out, np.full(count, prv + 1, np.float32)), f"rank {comm.rank}: {out}"
    return True


@pytest.mark.parametrize("nranks", [1, 2, 3])
@pytest.mark.parametrize("count", [0, 5, 70000])
def test_ring_recv_before_send_in_group(nranks, count):
    assert run_ranks(nranks, _ring_recv_first, count) == [True] * nranks


def _all_pairs_recv_first(comm):
    """Every rank receives two messages from every other rank, then sends two to each, in one group."""
    peers = [p for p in range(comm.size) if p != comm.rank]
    outs = {(p, k): np.zeros_like(_payload(p, comm.rank, k)) for p in peers for k in range(2)}
    with comm.group():
        for p in reversed(peers):
            for k in range(2):
                comm.recv(outs[p, k], p)
        for p in peers:
            for k in range(2):
                comm.send(_payload(comm.rank, p, k), p)
    for (p, k), out in outs.items():
        assert np.array_equal(out, _payload(p, comm.rank, k)), f"rank {comm.rank} from {p} message {k}: {out}"
    return True


@pytest.mark.parametrize("nranks", [2, 3, 4])
def test_mixed_sends_and_recvs_to_several_peers_in_one_group(nranks):
    assert run_ranks(nranks, _all_pairs_recv_first) == [True] * nranks


def _interleaved_with_collective(comm):
    """Recvs, a collective and sends in one group: the collective's result and every message arrive."""
    nxt, prv = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    out = np.zeros_like(_payload(prv, comm.rank, 0))
    with comm.group():
        comm.recv(out, prv)
        total = comm.all_reduce(np.full(4, comm.rank, np.int64))
        comm.send(_payload(comm.rank, nxt, 0), nxt)
    assert np.array_equal(out, _payload(prv, comm.rank, 0)), f"rank {comm.rank}: {out}"
    assert np.all(total == sum(range(comm.size))), total
    return True


@pytest.mark.parametrize("nranks", [2, 3])
def test_group_with_recv_collective_send(nranks):
    assert run_ranks(nranks, _interleaved_with_collective) == [True] * nranks


def _nested_groups(comm):
    nxt, prv = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    out = np.zeros(3, np.float32)
    with comm.group():
        with comm.group():
            comm.recv(out, prv)
        assert not out.any(), "a recv in an inner group ran before the outermost group ended"
        comm.send(np.full(3, comm.rank, np.float32), nxt)
    assert np.all(out == prv), out
    return True


@pytest.mark.parametrize("nranks", [2, 3])
def test_nested_groups_run_recvs_at_the_outermost_end(nranks):
    assert run_ranks(nranks, _nested_groups) == [True] * nranks


def _outside_group_unchanged(comm):
    """Outside a group a recv still returns with its data (it blocks until the message is there)."""
    if comm.rank == 0:
        comm.send(np.arange(6, dtype=np.int32), 1)
        comm.recv(out := np.zeros(2, np.int32), 1)
        assert np.array_equal(out, [7, 8]), out
    elif comm.rank == 1:
        got = comm.recv(np.zeros(6, np.int32), 0)
        assert np.array_equal(got, np.arange(6)), got
        comm.send(np.array([7, 8], np.int32), 0)
    return True


def test_recv_outside_a_group_still_blocks_and_returns_the_data():
    assert run_ranks(2, _outside_group_unchanged) == [True] * 2


def _barrier_in_group(comm):
    with pytest.raises(RuntimeError, match=r"barrier\(\) inside a group"):
        with comm.group():
            comm.barrier()
    comm.barrier()  # still usable
    with pytest.raises(RuntimeError, match="without a matching group_start"):
        comm._backend.group_end()
    return True


def test_barrier_inside_a_group_is_refused():
    assert run_ranks(2, _barrier_in_group) == [True] * 2


def _error_inside_group(comm):
    """A block that raises comes back at once (not as a timeout of the recvs it queued). With no recv queued
    the communicator goes on working; with one, it is closed: a peer's send for the dropped recv would
    otherwise be taken by a later recv as its own."""
    import time
    import fp4ccl
    from fp4ccl.errors import CommClosedError
    prv, nxt = (comm.rank - 1) % comm.size, (comm.rank + 1) % comm.size
    with pytest.raises(KeyError, match="before any recv"):
        with comm.group():
            raise KeyError("before any recv")
    out = np.zeros(3, np.float32)
    with comm.group():
        comm.recv(out, prv)
        comm.send(np.full(3, comm.rank, np.float32), nxt)
    assert np.array_equal(out, np.full(3, prv, np.float32)), f"rank {comm.rank}: {out}"

    own = fp4ccl.init("host")   # closed below: the pool's communicator must stay usable
    t0 = time.monotonic()
    with pytest.raises(KeyError, match="the block's own error"):
        with own.group():
            own.recv(np.zeros(2, np.float32), prv)
            with pytest.raises(ValueError):
                with own.group():   # an inner block's error, caught: drops its recv, closes the communicator
                    own.recv(np.zeros(5, np.float32), prv)
                    raise ValueError("inner")
            raise KeyError("the block's own error")
    assert time.monotonic() - t0 < 5, f"rank {comm.rank}: the error took {time.monotonic() - t0:.1f} s"
    with pytest.raises(CommClosedError, match="block raised after queuing receives"):
        own.all_reduce(np.ones(4, np.float32))
    own.destroy()
    total = comm.all_reduce(np.ones(4, np.float32))
    assert np.array_equal(total, np.full(4, comm.size, np.float32)), f"rank {comm.rank}: {total}"
    return True


@pytest.mark.parametrize("nranks", [1, 2, 3])
def test_error_inside_a_group_propagates_at_once(nranks):
    assert run_ranks(nranks, _error_inside_group) == [True] * nranks
