"""Run a test function on every rank of an N-rank job and report which ranks failed.

`run_ranks(n, fn, *args)` runs `fn(comm, *args)` in n worker processes, each holding a
Communicator built by `fp4ccl.init()` from fp4ccl-run-style environment variables and a TCP store
hosted here. Workers stay alive between calls (one pool per (n, backend)), so a test file pays for
process start-up once. `fn` must be a module-level function (it is pickled by reference).
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import secrets
import time
import traceback
from typing import Any, Callable, Dict, List, Tuple

DEFAULT_TIMEOUT = float(os.environ.get("FP4CCL_TEST_TIMEOUT", "120"))


def communicate_all(jobs: Dict[Any, List[Any]], seconds: float) -> Dict[Any, List[str]]:
    """The output of every subprocess (Popen with text stdout) of every job, all within `seconds` in
    total; whatever is still running when that runs out, or when a wait fails, is killed."""
    deadline = time.monotonic() + seconds
    try:
        return {name: [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
                for name, procs in jobs.items()}
    finally:
        for procs in jobs.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()


@contextlib.contextmanager
def env(values: Dict[str, str]):
    """Set environment variables in this process (a rank's, inside a rank function) for a block, then
    restore each to what it was."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RankFailure(AssertionError):
    """One or more ranks raised or hung; the message names each one."""


def _worker(rank: int, size: int, backend: str, env: Dict[str, str], conn) -> None:
    os.environ.update(env)
    try:
        import fp4ccl
        comm = fp4ccl.init(backend)
    except BaseException:  # noqa: BLE001 - report any start-up failure to the parent
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        fn, args = msg
        try:
            conn.send(("ok", fn(comm, *args)))
        except BaseException:  # noqa: BLE001 - the parent reports it with the rank
            conn.send(("error", traceback.format_exc()))
    try:
        comm.destroy()
    except Exception:  # noqa: BLE001 - teardown after the last test; nothing left to report to
        pass


class RankPool:
    """n worker processes forming one job over a TCP store served from this process."""

    def __init__(self, size: int, backend: str = "host", timeout: float = DEFAULT_TIMEOUT):
        from fp4ccl.bootstrap.store import StoreServer
        self.size, self.backend, self.timeout = size, backend, timeout
        token = secrets.token_hex(16)
        self.server = StoreServer(host="127.0.0.1", port=0, token=token)
        job = secrets.token_hex(4)
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(size):
            env = {"FP4CCL_RANK": str(rank), "FP4CCL_WORLD_SIZE": str(size), "FP4CCL_LOCAL_RANK": str(rank),
                   "FP4CCL_LOCAL_SIZE": str(size), "FP4CCL_NODE_RANK": "0", "FP4CCL_STORE": self.server.address,
                   "FP4CCL_TOKEN": token, "FP4CCL_JOB_ID": job}
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, size, backend, env, child), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._collect("start-up")

    def _collect(self, what: str) -> List[Any]:
        results, failures = [None] * self.size, []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(self.timeout):
                failures.append(f"rank {rank}: no answer within {self.timeout:.0f} s during {what} "
                                f"(hung, likely waiting on a failed peer)")
                continue
            try:
                status, value = conn.recv()
            except EOFError:
                failures.append(f"rank {rank}: process died (exit code {self.procs[rank].exitcode}) during {what}")
                continue
            if status == "error":
                failures.append(f"rank {rank} raised during {what}:\n{value}")
            else:
                results[rank] = value
        if failures:
            self.close()
            raise RankFailure(f"{len(failures)} of {self.size} ranks failed ({self.backend} backend):\n" + "\n".join(failures))
        return results

    def run(self, fn: Callable, *args) -> List[Any]:
        for conn in self.conns:
            conn.send((fn, args))
        return self._collect(f"{fn.__name__}{args!r}"[:200])

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.server.close()
        self.procs, self.conns = [], []


_POOLS: Dict[Tuple[int, str], RankPool] = {}


def run_ranks(size: int, fn: Callable, *args, backend: str = "host") -> List[Any]:
    """Run fn(comm, *args) on every rank of a `size`-rank job; returns each rank's result, in rank order."""
    pool = _POOLS.get((size, backend))
    if pool is None or not pool.alive:
        pool = _POOLS[(size, backend)] = RankPool(size, backend)
    try:
        return pool.run(fn, *args)
    except RankFailure:
        _POOLS.pop((size, backend), None)  # a failed pool is closed; the next call starts a fresh one
        raise


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
