"""The NCCL backend alone on real GPUs: one thread per rank inside this process (NCCL allows one
communicator per thread), so no launcher is needed. The Communicator-level collective tests live
elsewhere; these cover what only the backend does — init through an exchange, barrier, teardown,
and the watchdog aborting a real hang."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import need_gpus

from fp4ccl._arrays import describe
from fp4ccl.errors import CommClosedError, CommTimeoutError

pytestmark = pytest.mark.gpu


class _Shared:
    def __init__(self, size):
        self.barrier = threading.Barrier(size, timeout=120)
        self.value = None


class ThreadExchange:
    """The Exchange interface between threads of one process."""

    def __init__(self, shared, rank, size):
        self.shared, self.rank, self.size = shared, rank, size

    def broadcast_bytes(self, data, root):
        if self.rank == root:
            self.shared.value = data
        self.shared.barrier.wait()
        value = self.shared.value
        self.shared.barrier.wait()
        return value

    def all_gather_bytes(self, data):
        raise NotImplementedError("the backend only broadcasts")

    def barrier(self):
        self.shared.barrier.wait()

    def close(self):
        pass


def run_ranks(size, body, timeout=120):
    """body(rank) in one thread per rank; returns results, re-raises the first failure."""
    shared = _Shared(size)
    results, errors = [None] * size, [None] * size

    def main(rank):
        try:
            results[rank] = body(rank, ThreadExchange(shared, rank, size))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors[rank] = e

    threads = [threading.Thread(target=main, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a rank thread hung"
    for e in errors:
        if e is not None:
            raise e
    return results


def backend(exchange, rank, size, timeout=0.0):
    from fp4ccl.backends.nccl import NcclBackend
    return NcclBackend(exchange, rank, size, device=rank, timeout=timeout)


def test_single_rank_collectives_barrier_and_teardown():
    need_gpus(1)
    import cupy

    def body(rank, ex):
        b = backend(ex, rank, 1)
        with cupy.cuda.Device(0):
            stream = cupy.cuda.Stream(non_blocking=True)
            x = cupy.arange(10, dtype=cupy.float32)
            y = cupy.empty_like(x)
            b.all_reduce(describe(x), describe(y), "sum", stream.ptr)
            b.barrier(stream.ptr)
            assert cupy.array_equal(x, y)
        b.destroy()
        b.destroy()
        b.abort()
        with pytest.raises(CommClosedError):
            b.barrier(stream.ptr)

    run_ranks(1, body)


def test_two_ranks_all_reduce_and_grouped_send_recv():
    need_gpus(2)
    import cupy

    def body(rank, ex):
        b = backend(ex, rank, 2, timeout=60.0)  # watchdog on, and it must stay quiet
        with cupy.cuda.Device(rank):
            stream = cupy.cuda.Stream(non_blocking=True)
            x = cupy.full(1000, rank + 1, dtype=cupy.float32)
            y = cupy.empty_like(x)
            b.all_reduce(describe(x), describe(y), "sum", stream.ptr)
            mine = cupy.full(7, 10 * (rank + 1), dtype=cupy.int16)  # int16 travels as bytes
            theirs = cupy.zeros(7, dtype=cupy.int16)
            b.group_start()
            b.send(describe(mine), 1 - rank, stream.ptr)
            b.recv(describe(theirs), 1 - rank, stream.ptr)
            b.group_end()
            b.barrier(stream.ptr)
            assert cupy.all(y == 3.0)
            assert cupy.all(theirs == 10 * (2 - rank))
        assert b.failure is None
        b.destroy()

    run_ranks(2, body)


def test_watchdog_aborts_a_collective_the_other_rank_never_joins():
    need_gpus(2)
    import cupy
    done = threading.Event()

    def body(rank, ex):
        b = backend(ex, rank, 2, timeout=3.0 if rank == 0 else 0.0)
        if rank == 1:
            done.wait(60)  # never joins rank 0's all_reduce
            b.abort()
            return None
        try:
            with cupy.cuda.Device(0):
                stream = cupy.cuda.Stream(non_blocking=True)
                x = cupy.ones(1 << 20, dtype=cupy.float32)
                start = time.monotonic()
                # Either the enqueue blocks on the host (NCCL connecting to a peer that never comes)
                # or the barrier's stream sync does; the watchdog's abort ends both.
                with pytest.raises(CommTimeoutError) as info:
                    b.all_reduce(describe(x), describe(x), "sum", stream.ptr)
                    b.barrier(stream.ptr)
                elapsed = time.monotonic() - start
            assert 2.5 < elapsed < 30, elapsed
            err = info.value
            assert (err.call, err.seq, err.rank) == ("all_reduce", 1, 0), str(err)
            with pytest.raises(CommTimeoutError, match=r"all_reduce \(call #1\)"):
                b.all_reduce(describe(x), describe(x), "sum", stream.ptr)
            b.destroy()  # a no-op after the abort, not an error
            return str(err)
        finally:
            done.set()

    message, _ = run_ranks(2, body)
    print(message)


_SPIN = r'''
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
'''


def test_watchdog_polls_do_not_invalidate_a_global_mode_capture():
    """The watchdog thread polls the event of an eager call that is still running while rank 0 holds a
    CUDA-graph capture open in global mode (torch.cuda.graph's default) for several poll periods. Before
    the watchdog put itself in relaxed capture mode, such a poll invalidated the capture
    (cudaErrorStreamCaptureInvalidated, bench/RESULTS.md run 98); now the capture and the eager call
    both complete and are right."""
    need_gpus(2)
    import cupy
    from cupy.cuda import runtime
    captured = threading.Event()

    def body(rank, ex):
        b = backend(ex, rank, 2, timeout=5.0)   # polls every 0.25 s
        try:
            with cupy.cuda.Device(rank):
                stream = cupy.cuda.Stream(non_blocking=True)
                cap = cupy.cuda.Stream(non_blocking=True)
                x = cupy.full(1000, rank + 1, dtype=cupy.float32)
                y = cupy.empty_like(x)
                a = cupy.ones(64, dtype=cupy.float32)
                spin = cupy.RawKernel(_SPIN, "spin")
                spin((1,), (1,), (cupy.uint64(1),), stream=stream)   # every module loaded now, not in the capture
                with cap:
                    a *= 2.0
                    a += 1.0
                    a.fill(1.0)
                cupy.cuda.Device(rank).synchronize()
                ex.barrier()
                # the all_reduce's event stays pending behind ~2 s of spinning, well inside the timeout
                spin((1,), (1,), (cupy.uint64(2_000_000_000),), stream=stream)
                b.all_reduce(describe(x), describe(y), "sum", stream.ptr)
                ex.barrier()   # both ranks' enqueues (and NCCL's first-call work) are over
                if rank == 0:
                    with cap:
                        cap.begin_capture(mode=runtime.streamCaptureModeGlobal)
                        a *= 2.0
                        time.sleep(0.8)    # the capture stays open over several watchdog polls
                        a += 1.0
                        graph = cap.end_capture()
                    assert not stream.done, "the eager call finished before the capture ended: nothing was polled"
                    graph.launch(stream=cap)
                    cap.synchronize()
                    assert bool((a == 3.0).all())
                    captured.set()
                else:
                    assert captured.wait(60)   # no CUDA call from this thread while rank 0 captures
                stream.synchronize()
                assert cupy.all(y == 3.0)
            assert b.failure is None
        finally:
            captured.set()
            b.destroy()

    run_ranks(2, body)
