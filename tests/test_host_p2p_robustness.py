"""The host backend's point-to-point messages are never silently shifted, dropped or waited for in vain.

- A group whose block raises after a send went out closes the communicator: the send may reach a peer
  whose matching recv was abandoned too, and a later recv there would take it for its own.
- A recv refused for a buffer that does not match the message leaves the message for the next recv
  from that peer, so a retry with the right buffer gets it (not the one after it).
- destroy() and interpreter exit wait, at most FP4CCL_TIMEOUT, until the peers have taken this rank's
  sends before removing their shared-memory files.
- abort() from another thread ends a wait for a peer at once, with CommClosedError.

Each multi-rank case runs on a fresh communicator of its own with a short FP4CCL_TIMEOUT (so a
regression fails within seconds instead of hanging), under the harness's own time limit per call;
subprocess jobs run under a timeout too. The MPI cases run this file under mpiexec.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from harness import env, run_ranks  # noqa: E402
from test_host_mpi import mpi_main, run_mpi  # noqa: E402


def _fresh(timeout: str = "10"):
    """A communicator of its own (the pool's must stay usable) whose waits end after `timeout` seconds."""
    import fp4ccl
    with env({"FP4CCL_TIMEOUT": timeout}):
        return fp4ccl.init("host")


def _files(own) -> list:
    return glob.glob(glob.escape(own._backend.transport.blobs.prefix) + "*")


# -- a group abandoned after a send ----------------------------------------------------------------

def _group_abandoned_after_send(comm):
    from fp4ccl.errors import CommClosedError
    own = _fresh()
    nxt, prv = (own.rank + 1) % own.size, (own.rank - 1) % own.size
    try:
        with pytest.raises(TypeError):
            with own.group():
                own.send(np.full(2, 7.0, np.float32), nxt)
                own.recv(np.zeros(2, np.complex64), prv)   # refused by the argument checks: the send is out
        got = np.zeros(2, np.float32)
        with pytest.raises(CommClosedError, match="block raised after sending"):
            with own.group():
                own.send(np.full(2, 100.0 + own.rank, np.float32), nxt)
                own.recv(got, prv)
        assert not got.any(), f"rank {own.rank} received {got} on a communicator that should be closed"
        with pytest.raises(CommClosedError, match="block raised after sending"):
            own.all_reduce(np.ones(2, np.float32))
    finally:
        own.abort()
        comm.barrier()   # every rank has removed its files
    assert _files(own) == [], _files(own)
    return True


@pytest.mark.parametrize("nranks", [2, 3])
def test_a_group_abandoned_after_a_send_closes_the_communicator(nranks):
    assert run_ranks(nranks, _group_abandoned_after_send) == [True] * nranks


# -- a refused recv keeps its message --------------------------------------------------------------

def _refused_recv_keeps_the_message(comm, grouped):
    """Around a ring: each rank sends two messages to the next; the previous rank's first is refused
    twice (dtype, then size), alone or in a group beside a recv that fits the second message, then
    retried with the right buffer: the retry gets the first message and the recv after it the second."""
    own = _fresh()
    nxt, prv = (own.rank + 1) % own.size, (own.rank - 1) % own.size
    try:
        own.send(np.arange(4, dtype=np.float32) + 10 * own.rank, nxt)
        own.send(np.full(3, 99 + own.rank, np.int32), nxt)
        with pytest.raises(ValueError, match=rf"recv from rank {prv}.*16 bytes of float32.*32 bytes of float64"):
            own.recv(np.zeros(4, np.float64), prv)
        second = np.zeros(3, np.int32)
        if grouped:
            with pytest.raises(ValueError, match=rf"recv from rank {prv}.*16 bytes.*8 bytes"):
                with own.group():
                    own.recv(np.zeros(2, np.float32), prv)
                    own.recv(second, prv)   # fits the second message, but must not take it before the first
            assert not second.any(), f"rank {own.rank}: a recv after a refused one took a message: {second}"
        else:
            with pytest.raises(ValueError, match=rf"recv from rank {prv}.*16 bytes.*8 bytes"):
                own.recv(np.zeros(2, np.float32), prv)
        first = own.recv(np.zeros(4, np.float32), prv)
        assert np.array_equal(first, np.arange(4) + 10 * prv), f"rank {own.rank}: the retry got {first}"
        own.recv(second, prv)
        assert np.array_equal(second, np.full(3, 99 + prv)), f"rank {own.rank}: then got {second}"
        own.destroy()   # every message was taken: no wait
    finally:
        own.abort()
    return True


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "in_group"])
@pytest.mark.parametrize("nranks", [2, 3])
def test_a_refused_recv_leaves_its_message_for_a_retry(nranks, grouped):
    assert run_ranks(nranks, _refused_recv_keeps_the_message, grouped) == [True] * nranks


# -- destroy() and exit wait for the peers to take the sends ---------------------------------------

def _destroy_after_send(comm, never_received):
    """Rank 0 sends to every peer and destroys at once; the peers receive a second later (or, with
    never_received, not at all: destroy then gives up after FP4CCL_TIMEOUT, 2 s, and removes the file)."""
    from fp4ccl.errors import CommTimeoutError
    own = _fresh("2" if never_received else "10")
    data = np.arange(5, dtype=np.float32)
    result = True
    try:
        if own.rank == 0:
            for peer in range(1, own.size):
                own.send(data, peer)
            t0 = time.monotonic()
            if never_received:
                with pytest.raises(CommTimeoutError, match=r"destroy.*rank\(s\) 1(, 2)? did not receive"):
                    own.destroy()
            else:
                own.destroy()
            result = time.monotonic() - t0
            assert _files(own) == [], _files(own)
        elif not never_received:
            time.sleep(1.0)
            got = own.recv(np.zeros(5, np.float32), 0)
            assert np.array_equal(got, data), f"rank {own.rank}: {got}"
    finally:
        comm.barrier()   # rank 0 is done with its communicator either way
        own.abort()
    return result


@pytest.mark.parametrize("nranks", [2, 3])
def test_destroy_waits_until_the_peers_took_the_sends(nranks):
    waited = run_ranks(nranks, _destroy_after_send, False)[0]
    assert 0.5 < waited < 8, f"destroy returned after {waited:.2f} s, before the peers' recvs a second later"


def test_destroy_gives_up_on_a_send_never_received_after_the_timeout():
    waited = run_ranks(3, _destroy_after_send, True)[0]
    assert 1.5 < waited < 8, waited


def _destroy_after_the_reader_closed(comm):
    """Rank 0 sends to every peer; the peers close their communicators without reading (abort(), as after an
    abandoned group). Rank 0's destroy() then has nobody to wait for: it returns at once, and no file is
    left (the closing readers removed what was sent to them)."""
    own = _fresh("20")
    waited = 0.0
    try:
        if own.rank == 0:
            for peer in range(1, own.size):
                own.send(np.ones(3, np.float32), peer)
        comm.barrier()
        if own.rank != 0:
            own.abort()
        comm.barrier()
        if own.rank == 0:
            t0 = time.monotonic()
            own.destroy()
            waited = time.monotonic() - t0
            assert _files(own) == [], _files(own)
    finally:
        own.abort()
    return waited


@pytest.mark.parametrize("nranks", [2, 3])
def test_destroy_does_not_wait_for_peers_that_closed_without_reading(nranks):
    waited = run_ranks(nranks, _destroy_after_the_reader_closed)[0]
    assert waited < 2, f"destroy waited {waited:.1f} s for readers that had closed"


# Run under fp4ccl-run: rank 0 sends and leaves (normally, or on an uncaught exception); rank 1 receives
# two seconds later, or (after an exception) never.
EXIT_JOB = textwrap.dedent("""
    import sys, time
    import numpy as np
    import fp4ccl
    comm = fp4ccl.init("host")
    if comm.rank == 0:
        comm.send(np.arange(4, dtype=np.float32), 1)
        if sys.argv[1] == "raise":
            raise RuntimeError("rank 0 fails after its send")
        if sys.argv[1] == "sysexit":
            print("rank 0 fails after its send", flush=True)
            sys.exit(3)
    elif sys.argv[1] == "exit":
        time.sleep(2)
        print("received", comm.recv(np.zeros(4, np.float32), 0).tolist(), flush=True)
        comm.destroy()
    else:
        time.sleep(60)
""")


def _exit_job(tmp_path, how):
    script = tmp_path / "job.py"
    script.write_text(EXIT_JOB)
    shm = tmp_path / "shm"
    shm.mkdir()
    environ = dict(os.environ, PYTHONPATH=ROOT, FP4CCL_TIMEOUT="20", FP4CCL_SHM_DIR=str(shm))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fp4ccl.launcher", "-n", "2", str(script), how], env=environ,
                          capture_output=True, text=True, timeout=90, cwd=ROOT)
    return proc, time.monotonic() - t0, os.listdir(shm)


def test_exit_without_destroy_leaves_the_sends_for_their_reader(tmp_path):
    """Rank 0 exits right after its send; rank 1 receives two seconds later, and deletes the file it read."""
    proc, _, left = _exit_job(tmp_path, "exit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "received [0.0, 1.0, 2.0, 3.0]" in proc.stdout, proc.stdout + proc.stderr
    assert left == [], left


@pytest.mark.parametrize("how", ["raise", "sysexit"])
def test_a_failing_exit_does_not_wait(tmp_path, how):
    """The launcher must see the failure now, not after FP4CCL_TIMEOUT (20 s) of waiting for a reader."""
    proc, took, left = _exit_job(tmp_path, how)
    assert proc.returncode != 0 and "rank 0 fails after its send" in proc.stdout + proc.stderr, proc.stdout
    assert took < 15, f"the job took {took:.1f} s"
    assert left == [], left   # fp4ccl-run removed the unread send with the job's files


# -- abort() from another thread -------------------------------------------------------------------

def _record_outcome(outcome: dict, call, *args) -> None:
    try:
        call(*args)
        outcome["error"] = None
    except BaseException as err:  # noqa: BLE001 - checked by the caller
        outcome["error"] = err
    outcome["ended"] = time.monotonic()


def _ends_at_close(close, call, *args) -> None:
    """call(*args), in a thread, still waits after 0.6 s, then ends with CommClosedError within a second
    of close() in this thread."""
    from fp4ccl.errors import CommClosedError
    outcome = {}
    thread = threading.Thread(target=_record_outcome, args=(outcome, call) + args, daemon=True)
    thread.start()
    time.sleep(0.6)
    assert thread.is_alive(), f"{call.__name__} returned without its peers: {outcome}"
    closed = time.monotonic()
    close()
    thread.join(5)
    assert not thread.is_alive(), f"{call.__name__} still waits 5 s after close()"
    assert isinstance(outcome["error"], CommClosedError), repr(outcome["error"])
    assert outcome["ended"] - closed < 1.0, f"{call.__name__} ended {outcome['ended'] - closed:.2f} s after close()"


def _blocking_call(own, call: str):
    """Rank 0's `call` on `own`, as a function of no arguments named after it (no peer joins it)."""
    def run():
        if call == "all_reduce":
            own.all_reduce(np.ones(1 << 10, np.float32))
        elif call == "large_all_reduce":   # the reduce-scatter + all-gather path
            own.all_reduce(np.ones(1 << 19, np.float32))
        elif call == "recv":
            own.recv(np.zeros(4, np.float32), 1)
        elif call == "barrier":
            own.barrier()
        elif call == "group_recv":
            with own.group():
                own.recv(np.zeros(4, np.float32), 1)
    run.__name__ = call
    return run


def _abort_from_another_thread(comm, call):
    """Rank 0's `call` waits for peers that never join it (FP4CCL_TIMEOUT=0: for ever); abort() from this
    thread must end it within a second, with CommClosedError, and leave no file behind."""
    own = _fresh("0")
    try:
        if own.rank == 0:
            _ends_at_close(own.abort, _blocking_call(own, call))
            assert _files(own) == [], _files(own)
    finally:
        comm.barrier()
        own.abort()
    return True


@pytest.mark.parametrize("call", ["all_reduce", "large_all_reduce", "recv", "barrier", "group_recv"])
@pytest.mark.parametrize("nranks", [2, 3])
def test_abort_from_another_thread_ends_a_blocked_call(nranks, call):
    assert run_ranks(nranks, _abort_from_another_thread, call) == [True] * nranks


def test_abort_ends_a_wait_for_a_value_in_the_store():
    """The store transport (ranks on several hosts): a get waiting for a peer's value, and the end-of-call
    barrier waiting for a peer, for ever, end with CommClosedError within a second of close() (what
    abort() calls) in another thread."""
    from fp4ccl.backends.host import StoreBlobs
    from fp4ccl.bootstrap.store import StoreClient, StoreServer
    server = StoreServer(token="t" * 32)
    client = StoreClient(server.address, "t" * 32, timeout=10.0)
    try:
        blobs = StoreBlobs(client, "abort-test", float("inf"))
        blobs.put("here", b"", np.arange(3, dtype=np.uint8))
        assert np.array_equal(blobs.get("here"), np.arange(3))
        _ends_at_close(blobs.close, blobs.get, "never")
        # rank 0 of 2 in barrier 1, waiting for a rank 1 that never comes
        barred = StoreBlobs(client, "abort-barrier-test", float("inf"))
        _ends_at_close(barred.close, barred.barrier, 1, 0, 2)
        timed = StoreBlobs(client, "timeout-test", 0.3)
        with pytest.raises(TimeoutError, match="no data at fp4ccl-host/timeout-test/never after 0.3 s"):
            timed.get("never")
    finally:
        client.close()
        server.close()


# -- the same under MPI (this file run by mpiexec) -------------------------------------------------

def case_mpi_refused_recv(comm):
    _refused_recv_keeps_the_message(comm, False)
    _refused_recv_keeps_the_message(comm, True)
    return "ok"


def case_mpi_abort(comm):
    if comm.rank == 0:
        _ends_at_close(comm.abort, _blocking_call(comm, "recv"))
    else:
        comm.abort()
    return "ok"


def _mpi_run(tmp_path, case: str, n: int) -> None:
    run_mpi(tmp_path, case, n, script=__file__, FP4CCL_TIMEOUT="10")


@pytest.mark.parametrize("nranks", [2, 3])
def test_a_refused_recv_leaves_its_message_under_mpi(tmp_path, nranks):
    _mpi_run(tmp_path, "mpi_refused_recv", nranks)


def test_abort_from_another_thread_ends_a_recv_under_mpi(tmp_path):
    _mpi_run(tmp_path, "mpi_abort", 2)


if __name__ == "__main__":
    mpi_main(sys.argv[1], sys.argv[2], globals())
