"""A host-backend wait that runs out raises CommTimeoutError naming the call, its number and the rank,
and the backend refuses every later call (its calls no longer line up with its peers')."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fp4ccl.errors import CommClosedError, CommTimeoutError, Fp4cclError
from harness import communicate_all, env, run_ranks
from test_host_shm import LonelyExchange


@pytest.fixture
def lonely(monkeypatch, tmp_path):
    """A host backend (rank 0 of 2, shared-memory files under tmp_path) with FP4CCL_TIMEOUT=0.3."""
    from fp4ccl.backends.host import HostBackend
    monkeypatch.setenv("FP4CCL_SHM_DIR", str(tmp_path))
    monkeypatch.setenv("FP4CCL_TIMEOUT", "0.3")
    backend = HostBackend(LonelyExchange())
    yield backend
    backend.destroy()


def _info(a):
    from fp4ccl._arrays import describe
    return describe(a)


def test_comm_timeout_error_is_a_timeout_error():
    assert issubclass(CommTimeoutError, TimeoutError)  # `except TimeoutError` keeps catching it
    assert issubclass(CommTimeoutError, Fp4cclError)


def test_timeout_raises_comm_timeout_error(lonely):
    x, out = np.ones(4, np.float32), np.empty(4, np.float32)
    with pytest.raises(CommTimeoutError, match=r"all_reduce \(call #1\) on rank 0 of 2") as info:
        lonely.all_reduce(_info(x), _info(out), "sum")
    assert (info.value.rank, info.value.call, info.value.seq) == (0, "all_reduce", 1)
    with pytest.raises(CommClosedError, match="aborted after a timeout in all_reduce \\(call #1\\)"):
        lonely.all_reduce(_info(x), _info(out), "sum")
    with pytest.raises(CommClosedError, match="aborted after a timeout"):
        lonely.send(_info(x), 1)
    with pytest.raises(CommClosedError, match="aborted after a timeout"):
        lonely.group_start()


def test_recv_timeout_counts_calls(lonely):
    x = np.ones(4, np.float32)
    lonely.send(_info(x), 1)  # call #1: sends never wait
    with pytest.raises(CommTimeoutError, match=r"recv from rank 1 \(call #2\) on rank 0"):
        lonely.recv(_info(np.empty(4, np.float32)), 1)
    with pytest.raises(CommClosedError):
        lonely.barrier()


def test_deferred_recv_timeout_at_group_end(lonely):
    x = np.ones(4, np.float32)
    lonely.group_start()
    lonely.recv(_info(np.empty(4, np.float32)), 1)  # call #1, run at group_end
    lonely.send(_info(x), 1)                          # call #2
    with pytest.raises(CommTimeoutError, match=r"recv from rank 1 \(call #1, run at group_end\) on rank 0"):
        lonely.group_end()
    with pytest.raises(CommClosedError, match="aborted after a timeout"):
        lonely.send(_info(x), 1)


def _alone_in_a_collective(comm, tag):
    """A fresh communicator with FP4CCL_TIMEOUT=1; only rank 0 calls all_reduce on it."""
    from fp4ccl.backends.host import HostBackend
    from fp4ccl.bootstrap.exchange import StoreExchange
    from fp4ccl.communicator import Communicator
    ex = StoreExchange(comm._exchange.store, comm.rank, comm.size, prefix=f"{comm._exchange.prefix}/{tag}")
    with env({"FP4CCL_TIMEOUT": "1"}):
        fresh = Communicator(HostBackend(ex), ex)
    if comm.rank == 0:
        fresh.all_reduce(np.ones(2, np.float32))  # call #1 on the fresh communicator: everyone
        try:
            fresh.all_reduce(np.ones(2, np.float32), "max")
        except CommTimeoutError as err:
            assert "all_reduce (call #2) on rank 0" in str(err), err
        else:
            raise AssertionError("all_reduce without peers returned")
        with pytest.raises(CommClosedError, match="aborted after a timeout"):
            fresh.all_gather(np.ones(2, np.float32))
        fresh.abort()
    else:
        fresh.all_reduce(np.ones(2, np.float32))
        fresh.destroy()
    return True


@pytest.mark.parametrize("nranks", [2, 3])
def test_timeout_through_the_communicator(nranks):
    assert run_ranks(nranks, _alone_in_a_collective, f"alone{nranks}") == [True] * nranks


def _peer_misses_the_barrier(comm, tag, transport, call):
    """A fresh 2-rank communicator with FP4CCL_TIMEOUT=1 whose store client's own timeout is 30 s. For
    all_gather, rank 1 publishes its part and reads rank 0's, then holds back from the barrier that
    ends the call until rank 0 is done with it; for barrier(), rank 1 never calls it. Rank 0 must
    give up after FP4CCL_TIMEOUT, with the CommTimeoutError naming the call, and the communicator closed.
    transport: "shm" (files) or "store" (as across hosts: every rank reports a host name of its own)."""
    import os
    import socket
    import time
    from unittest import mock
    from fp4ccl.backends.host import HostBackend, ShmBlobs, StoreBlobs
    from fp4ccl.bootstrap.exchange import StoreExchange
    from fp4ccl.bootstrap.store import StoreClient
    from fp4ccl.communicator import Communicator
    client = StoreClient(os.environ["FP4CCL_STORE"], os.environ["FP4CCL_TOKEN"], timeout=30.0)
    prefix = f"{comm._exchange.prefix}/{tag}"
    ex = StoreExchange(client, comm.rank, comm.size, prefix=prefix)
    host = socket.gethostname() if transport == "shm" else f"host-of-rank-{comm.rank}"
    with env({"FP4CCL_TIMEOUT": "1"}), mock.patch.object(socket, "gethostname", return_value=host):
        backend = HostBackend(ex)
    fresh = Communicator(backend, ex)
    assert type(backend.transport.blobs) is {"shm": ShmBlobs, "store": StoreBlobs}[transport]
    x = np.ones(2, np.float32)
    try:
        if comm.rank == 0:
            start = time.monotonic()
            why = rf"{call} \(call #1\) on rank 0 of 2 timed out: not every rank reached the barrier within 1 s "
            try:
                with pytest.raises(CommTimeoutError, match=why):
                    getattr(fresh, call)(*([x] if call == "all_gather" else []))
            finally:
                client.set(f"{prefix}/rank0-done", b"1")
            waited = time.monotonic() - start
            assert waited < 10, f"{call}: gave up after {waited:.1f} s, not FP4CCL_TIMEOUT's 1 s"
            with pytest.raises(CommClosedError, match=rf"aborted after a timeout \(host backend: {call}"):
                fresh.all_reduce(x)
        elif call == "all_gather":
            backend.transport.barrier = lambda: client.get(f"{prefix}/rank0-done", timeout=30.0)
            assert np.array_equal(fresh.all_gather(x), np.ones(4, np.float32))
    finally:
        fresh.abort()
        client.close()
    return True


@pytest.mark.parametrize("call", ["all_gather", "barrier"])
@pytest.mark.parametrize("transport", ["shm", "store"])
def test_the_end_of_call_barrier_uses_the_host_timeout(transport, call):
    """Not the store client's own timeout: FP4CCL_TIMEOUT bounds the barrier that ends a collective
    over files or the store, and comm.barrier(), like every other wait of the host backend."""
    tag = f"barrier-{transport}-{call}"
    assert run_ranks(2, _peer_misses_the_barrier, tag, transport, call) == [True, True]


# Rank argv[1] of a 2-rank gloo group whose own timeout is 15 s, under FP4CCL_TIMEOUT=1: rank 1 holds
# back from the barrier (for all_gather, the one that ends the call) until rank 0 has given up.
TORCH_GROUP_JOB = r"""
import datetime, pathlib, sys, time
import numpy as np, torch.distributed as dist
from fp4ccl import Communicator
from fp4ccl.backends.host import BlobTransport
from fp4ccl.errors import CommClosedError, CommTimeoutError

rank, port, call, where = int(sys.argv[1]), sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=15))
comm = Communicator.from_torch(backend="host")
done = where / "rank0-done"
x = np.ones(2, np.float32)


def hold_back(transport=None):
    while not done.exists():
        time.sleep(0.05)


if rank == 0:
    start = time.monotonic()
    try:
        getattr(comm, call)(*([x] if call == "all_gather" else []))
        print("returned")
    except CommTimeoutError as err:
        print(f"gave up after {time.monotonic() - start:.1f} s: {err}")
    finally:
        done.write_text("1")
    try:
        comm.all_reduce(x)
    except CommClosedError as err:
        print(f"then: {err}")
    comm.abort()
elif call == "all_gather":
    BlobTransport.barrier = hold_back
    assert np.array_equal(comm.all_gather(x), np.ones(4, np.float32))
    comm.destroy()
else:
    hold_back()
    comm.destroy()
dist.destroy_process_group()
"""


def test_the_end_of_call_barrier_of_a_torch_group_uses_the_host_timeout(tmp_path):
    """from_torch(gloo group, backend="host"): FP4CCL_TIMEOUT, not the group's own timeout, bounds the
    barrier that ends a collective and comm.barrier(); rank 0 raises CommTimeoutError and its
    communicator is closed. Both calls run at once, as two jobs on two ports."""
    pytest.importorskip("torch.distributed", reason="torch is not installed")
    from test_init import ROOT, _environ
    from test_launcher import free_port
    script = tmp_path / "job.py"
    script.write_text(TORCH_GROUP_JOB)
    jobs = {}
    for call in ("all_gather", "barrier"):
        (tmp_path / call).mkdir()
        port = str(free_port())
        jobs[call] = [subprocess.Popen([sys.executable, str(script), str(r), port, call, str(tmp_path / call)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                       env=_environ(FP4CCL_TIMEOUT="1", FP4CCL_SHM_DIR=str(tmp_path / call)))
                      for r in range(2)]
    outs = communicate_all(jobs, 90)
    for call, procs in jobs.items():
        for r, p in enumerate(procs):
            assert p.returncode == 0, f"{call}, rank {r}:\n{outs[call][r]}"
        lines = outs[call][0].strip().splitlines()
        gave_up = re.fullmatch(rf"gave up after ([0-9.]+) s: host backend: {call} \(call #1\) on rank 0 of 2 "
                               rf"timed out: not every rank reached the barrier within 1 s .*", lines[0])
        assert gave_up, outs[call][0]
        assert float(gave_up[1]) < 10, f"{call}: gave up after {gave_up[1]} s, not FP4CCL_TIMEOUT's 1 s"
        assert lines[1].startswith("then: ") and f"aborted after a timeout (host backend: {call}" in lines[1], lines
        assert os.listdir(tmp_path / call) == ["rank0-done"], "files left in shared memory"
