"""The byte exchanges: over the TCP store (threads as ranks) and over MPI."""
from __future__ import annotations

import datetime
import math
import shutil
import subprocess
import sys
import threading
import time
import types

import pytest

from fp4ccl.bootstrap.exchange import SingleExchange, StoreExchange, TorchStoreAdapter
from fp4ccl.bootstrap.store import StoreClient, StoreServer


def _run_threads(size, fn):
    server = StoreServer(token="tok")
    results, errors = [None] * size, []

    def body(rank):
        try:
            ex = StoreExchange(StoreClient(server.address, "tok"), rank, size, prefix="t")
            results[rank] = fn(ex)
        except BaseException as err:  # noqa: BLE001 - collected and re-raised with the rank
            errors.append((rank, err))

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    keys_left = server.key_count()
    server.close()
    assert not errors, errors
    return results, keys_left


@pytest.mark.parametrize("size", [1, 2, 4])
def test_store_exchange_rounds(size):
    def fn(ex):
        out = []
        for i in range(5):
            out.append(ex.all_gather_bytes(bytes([ex.rank, i]) * (ex.rank + 1)))
            out.append(ex.broadcast_bytes(b"root%d" % i if ex.rank == i % size else None, i % size))
            ex.barrier()
        return out

    results, keys_left = _run_threads(size, fn)
    for r in range(size):
        for i in range(5):
            assert results[r][2 * i] == [bytes([q, i]) * (q + 1) for q in range(size)]
            assert results[r][2 * i + 1] == b"root%d" % i
    assert keys_left == 0, f"the exchange left {keys_left} keys behind in the store"


def test_store_barrier_takes_the_exchanges_timeout():
    """A store exchange's timeout bounds its barrier's wait for the peers instead of the store client's
    own (here 30 s)."""
    with StoreServer(token="tok") as server:
        client = StoreClient(server.address, "tok", timeout=30.0)
        ex = StoreExchange(client, 0, 2, prefix="lonely", timeout=0.3)   # rank 1 never comes
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="timed out after 0.3 s"):
            ex.barrier()
        assert time.monotonic() - start < 5
        client.close()


def test_torch_store_adapter_takes_a_timeout():
    """A torch store's get waits for the key at most `timeout` (TimeoutError), or forever with math.inf."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    store = TorchStoreAdapter(dist.HashStore())
    ex = StoreExchange(store, 0, 2, prefix="lonely", timeout=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not set within 0.3 s in torch.distributed's store"):
        ex.barrier()
    assert time.monotonic() - start < 5
    threading.Timer(0.2, store.set, ("late", b"v")).start()
    assert store.get("late", timeout=math.inf) == b"v"


def test_unique_id_round_trips_through_the_store():
    uid = bytes(range(128))
    results, _ = _run_threads(3, lambda ex: ex.broadcast_bytes(uid if ex.rank == 0 else None, 0))
    assert results == [uid] * 3


def test_torch_store_lookups_give_up_after_the_exchanges_timeout():
    """A torch store shared with the program keeps its own timeout (its process group's): the exchange's,
    FP4CCL_TIMEOUT's, must bound each lookup instead, and end as a TimeoutError like the fp4ccl store's."""
    dist = pytest.importorskip("torch.distributed", reason="torch is not installed")
    store = TorchStoreAdapter(dist.HashStore())
    store.set("k", b"v")
    assert store.get("k", timeout=1.0) == b"v"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"get\('missing'\): not set within 0.2 s"):
        store.get("missing", timeout=0.2)
    assert time.monotonic() - t0 < 5


class _Recorder:
    """A torch store that notes the name of every method called on it."""

    def __init__(self, store):
        self.store, self.calls = store, []

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if callable(attr):
            self.calls.append(name)
        return attr


def test_torch_store_adapter_waits_only_for_a_span_other_than_the_stores_own():
    """A lookup as long as the torch store's own timeout is its get alone (a wait before it was one more
    round trip on every lookup), and still ends as a TimeoutError."""
    dist = pytest.importorskip("torch.distributed", reason="torch is not installed")
    raw = dist.HashStore()
    raw.set_timeout(datetime.timedelta(seconds=0.3))
    store = _Recorder(raw)
    adapter = TorchStoreAdapter(store)
    adapter.set("k", b"v")
    store.calls.clear()
    assert adapter.get("k", timeout=0.3) == b"v"
    assert store.calls == ["get"]
    assert adapter.get("k", timeout=2.0) == b"v"
    assert store.calls == ["get", "wait", "get"]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"get\('missing'\): not set within 0.3 s in torch.distributed's store"):
        adapter.get("missing", timeout=0.3)
    with pytest.raises(TimeoutError, match=r"get\('missing'\): not set within 0.3 s in torch.distributed's store"):
        adapter.get("missing")
    assert time.monotonic() - t0 < 5


def test_torchrun_store_lookups_are_one_round_trip(torch_env_store):
    """The TCPStore init() builds under torchrun carries FP4CCL_TIMEOUT itself: its exchange's lookups
    need no Store.wait on top."""
    from fp4ccl.communicator import _torchrun_exchange
    ex = _torchrun_exchange(types.SimpleNamespace(rank=0, size=1), "t", 30.0)
    ex.store._store = store = _Recorder(ex.store._store)
    assert ex.all_gather_bytes(b"x") == [b"x"]
    assert ex.broadcast_bytes(b"y", 0) == b"y"
    ex.barrier()
    assert "get" in store.calls and "wait" not in store.calls, store.calls


def test_single_exchange():
    ex = SingleExchange()
    assert ex.all_gather_bytes(b"x") == [b"x"]
    assert ex.broadcast_bytes(b"y", 0) == b"y"
    with pytest.raises(ValueError):
        ex.broadcast_bytes(b"y", 1)


MPI_SCRIPT = r"""
import numpy as np, fp4ccl
from fp4ccl.bootstrap.exchange import MPIExchange
comm = fp4ccl.init("host")
assert isinstance(comm._exchange, MPIExchange), type(comm._exchange)
got = comm._exchange.all_gather_bytes(b"r%d" % comm.rank)
assert got == [b"r%d" % r for r in range(comm.size)], got
y = comm.all_reduce(np.full(5, comm.rank + 1.0, np.float32))
assert np.all(y == comm.size * (comm.size + 1) / 2), y
import sys, pathlib
pathlib.Path(sys.argv[1], f"rank{comm.rank}").write_text(f"ok {comm.size} {comm.local_rank}")
"""


def test_host_backend_under_mpiexec(tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    mpiexec = shutil.which("mpiexec", path=str(__import__("pathlib").Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH")
    script = tmp_path / "mpi_job.py"
    script.write_text(MPI_SCRIPT)
    proc = subprocess.run([mpiexec, "-n", "3", sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Each rank reports through its own file: lines printed by several ranks can interleave.
    assert [(tmp_path / f"rank{r}").read_text() for r in range(3)] == ["ok 3 %d" % r for r in range(3)]
