"""A backend call that raises CommTimeoutError closes the Communicator, whichever call it was: every
later call raises CommClosedError saying it was aborted after a timeout (single rank, host backend,
the backend's methods replaced by ones that time out)."""
from __future__ import annotations

import numpy as np
import pytest

from fp4ccl.backends.host import HostBackend
from fp4ccl.errors import CommClosedError, CommTimeoutError

WHY = "host backend: no data from rank 1 after 2 s during all_reduce"


def _time_out(*args, **kwargs):
    raise CommTimeoutError(WHY)


x = np.ones(4, np.float32)


def _grouped(c):
    with c.group():
        c.send(x, 0)


# Each call with the backend method it reaches: the Communicator's own dispatch, the v-collectives
# (the host backend serves them itself), the FP4 codec's byte exchange, and barrier.
CALLS = {
    "all_reduce": ("all_reduce", lambda c: c.all_reduce(x)),
    "all_gatherv": ("all_gatherv", lambda c: c.all_gatherv(x, [4])),
    "reduce_scatterv_nvfp4": ("alltoallv_bytes",
                              lambda c: c.reduce_scatterv(np.ones((2, 16), np.float32), [2], compress="nvfp4")),
    "barrier": ("barrier", lambda c: c.barrier()),
    "group": ("group_end", _grouped),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_timeout_closes_the_communicator(comm, monkeypatch, name):
    method, call = CALLS[name]
    monkeypatch.setattr(HostBackend, method, _time_out)
    with pytest.raises(CommTimeoutError, match=WHY):
        call(comm)
    assert "aborted after a timeout" in repr(comm)
    # Later calls fail at the argument checks, before the backend, and say why.
    for later in (lambda: comm.all_reduce(x), lambda: comm.broadcast(x, 0), lambda: comm.barrier(),
                  lambda: comm.all_gatherv(x, [4]), lambda: comm.symmetric_empty((4,))):
        with pytest.raises(CommClosedError, match=r"aborted after a timeout \(host backend: no data"):
            later()


def test_teardown_after_a_timeout_is_local(comm, monkeypatch):
    aborts = []
    monkeypatch.setattr(HostBackend, "all_reduce", _time_out)
    monkeypatch.setattr(HostBackend, "abort", lambda self: aborts.append(1))
    monkeypatch.setattr(HostBackend, "destroy", lambda self: pytest.fail("destroy() waited for peers after a timeout"))
    with pytest.raises(CommTimeoutError):
        comm.all_reduce(x)
    comm.destroy()  # its peers cannot be waited for: an abort instead
    comm.destroy()
    comm.abort()
    assert aborts == [1]
    with pytest.raises(CommClosedError, match="aborted after a timeout"):
        comm.all_reduce(x)


def test_other_backend_errors_leave_it_open(comm, monkeypatch):
    def fails(*args):
        raise RuntimeError("something else")
    monkeypatch.setattr(HostBackend, "all_reduce", fails)
    with pytest.raises(RuntimeError, match="something else"):
        comm.all_reduce(x)
    assert np.array_equal(comm.broadcast(x, 0), x)


@pytest.mark.parametrize("call", ["all_gatherv", "reduce_scatterv"])
def test_a_sizes_exchange_that_times_out_closes_the_communicator(comm, monkeypatch, call):
    """sizes=None (or FP4CCL_CHECK=1) exchanges sizes through the bootstrap: a peer that never comes is a
    CommTimeoutError naming the call, and the communicator is closed as after a collective's timeout."""
    def never(data):
        raise TimeoutError("get('fp4ccl/j/comm1/ag/1/0') timed out after 0.3 s")
    monkeypatch.setattr(comm._exchange, "all_gather_bytes", never)
    monkeypatch.setenv("FP4CCL_CHECK", "1")   # the reduce-scatter's sizes are given: compared across ranks
    x = np.ones((3, 4), np.float32)
    with pytest.raises(CommTimeoutError, match=rf"{call}: the sizes exchange on rank 0 of 1 timed out") as info:
        comm.all_gatherv(x) if call == "all_gatherv" else comm.reduce_scatterv(x, [3])
    assert isinstance(info.value, TimeoutError) and info.value.call == call
    with pytest.raises(CommClosedError):
        comm.all_reduce(x)


class _Reported:
    """A per-communicator extra whose device-side check found ranks in different calls (what
    symm_collectives.Workspace.verify does once its checked barrier reported a mismatch)."""

    def __init__(self, comm):
        self.comm, self.waited, self.closed = comm, [], False

    def verify(self, wait=False):
        from fp4ccl.errors import CallMismatchError
        self.waited.append(wait)
        err = CallMismatchError("rank 0 was in all_gatherv(sizes=(4, 3)), rank 1 in all_gatherv(sizes=(4, 4))")
        self.comm._failed("mismatch", err)
        raise err

    def close(self):
        self.closed = True


def test_a_mismatch_found_at_destroy_aborts_and_raises(comm, monkeypatch):
    from fp4ccl.errors import CallMismatchError
    aborts = []
    monkeypatch.setattr(HostBackend, "abort", lambda self: aborts.append(1))
    monkeypatch.setattr(HostBackend, "destroy", lambda self: pytest.fail("destroy() waited for peers after a mismatch"))
    extra = comm._extras["test"] = _Reported(comm)
    with pytest.raises(CallMismatchError, match=r"sizes=\(4, 3\)"):
        comm.destroy()      # the last call's check, after it ran: its error must not go unreported
    assert extra.waited == [True] and aborts == [1]
    comm.destroy()
    assert aborts == [1]


def test_a_mismatch_closes_the_communicator_and_later_calls_say_why(comm, monkeypatch):
    from fp4ccl.errors import CallMismatchError
    aborts = []
    monkeypatch.setattr(HostBackend, "abort", lambda self: aborts.append(1))
    comm._failed("mismatch", CallMismatchError("rank 1 in another call"))
    assert "aborted after its ranks were found in different calls (rank 1 in another call)" in repr(comm)
    with pytest.raises(CommClosedError, match=r"found in different calls \(rank 1 in another call\)"):
        comm.all_reduce(x)
    comm._failed("timeout", CommTimeoutError("later"))   # the first failure stays the one reported
    assert "rank 1 in another call" in repr(comm)
    comm.destroy()      # local: its peers may never reach a collective teardown
    assert aborts == [1]
