"""The host backend over its MPI transport (jobs started by mpiexec): collectives, groups, mismatches,
timeouts, and an abort() that never waits for unmatched sends.

Each test runs this file under `mpiexec -n N python tests/test_host_mpi.py <case> <dir>`; every rank
writes "ok" or its traceback to <dir>/rank<r> (lines printed by several ranks could interleave).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIG = 8 << 20  # past MPICH's eager limit: the send cannot complete until the peer posts its recv


# -- the cases, run on every rank under mpiexec ----------------------------------------------------

def case_collectives(comm):
    import collective_checks as cc
    import test_host_avg as avg
    import test_host_groups as groups
    import test_host_mismatch as mismatch
    dtypes = ["float32", "bfloat16", "int32", "float8_e4m3fn"]
    for check in cc.COLLECTIVES.values():
        check(comm, 7, "numpy", dtypes=dtypes, counts=[0, 1, 1001])
    cc.check_all_gatherv(comm, 7, "numpy", dtypes=dtypes)
    cc.check_reduce_scatterv(comm, 7, "numpy", dtypes=dtypes)
    for check in (cc.check_send_recv_ring, cc.check_group_batch, cc.check_all_reduce_large):
        check(comm, 7, "numpy")
    groups._ring_recv_first(comm, 70000)
    groups._all_pairs_recv_first(comm)
    groups._interleaved_with_collective(comm)
    mismatch._all_reduce_shapes(comm, 4, 1)
    mismatch._all_reduce_shapes(comm, (1 << 20) // 4 + 5, (1 << 20) // 4 + 1)
    mismatch._all_reduce_dtypes(comm)
    mismatch._all_gatherv_counts(comm)
    mismatch._other_collectives(comm)
    mismatch._send_recv_mismatch(comm)
    avg._avg_near_max(comm, "float16", 40000.0)
    avg._avg_is_correctly_rounded(comm)
    comm.destroy()
    return "ok"


def _receive_leftovers(comm):
    """After the timed part: rank 1 takes the message rank 0 abandoned (a cancel may not stop a send whose
    peer already knows of it), so that no rank reaches MPI_Finalize with an unreceived message there,
    which MPICH's shared-memory path does not survive. This also reads the abandoned send's buffer."""
    from mpi4py import MPI

    from fp4ccl.backends.host import MpiTransport
    world = MPI.COMM_WORLD
    world.Barrier()
    if comm.rank == 1:
        status = MPI.Status()
        own = comm._exchange.comm   # fp4ccl's duplicate of COMM_WORLD, where its messages travel
        if own.Iprobe(source=0, tag=MpiTransport._TAG, status=status):
            buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
            own.Recv(buf, source=0, tag=MpiTransport._TAG)
            assert np.all(buf[-BIG:] == 1), "the abandoned send's buffer was reused"
    world.Barrier()


def case_abort(comm):
    """Rank 0 leaves a large send unmatched; abort() must return at once."""
    if comm.rank == 0:
        comm.send(np.ones(BIG, np.uint8), 1)
    comm.barrier()
    t0 = time.monotonic()
    comm.abort()
    elapsed = time.monotonic() - t0
    _receive_leftovers(comm)
    return f"ok {elapsed:.3f}"


def case_destroy_timeout(comm):
    """Rank 0 leaves a large send unmatched; destroy() waits for it at most FP4CCL_TIMEOUT (1 s) and says so."""
    from fp4ccl.errors import CommTimeoutError
    if comm.rank == 0:
        comm.send(np.ones(BIG, np.uint8), 1)
    comm.barrier()
    if comm.rank == 1:   # takes the leftover once rank 0 has given up, then destroys (freeing fp4ccl's MPI comm)
        _receive_leftovers(comm)
        comm.destroy()
        return "ok"
    t0 = time.monotonic()
    try:
        comm.destroy()
    except CommTimeoutError as err:
        assert comm.rank == 0 and "destroy" in str(err) and "rank 0" in str(err), err
        result = f"ok {time.monotonic() - t0:.3f}"
    else:
        assert comm.rank != 0, "destroy returned although a send was never received"
        result = "ok"
    _receive_leftovers(comm)
    return result


def case_user_messages(comm):
    """The caller's own COMM_WORLD messages, with the tag fp4ccl's transport uses, and fp4ccl's sends never
    match each other's receives: fp4ccl talks on a duplicate of the communicator."""
    from mpi4py import MPI

    from fp4ccl.backends.host import MpiTransport
    world, tag = MPI.COMM_WORLD, MpiTransport._TAG
    mine = np.full(5, 7.0, np.float32)
    if comm.rank == 0:
        world.Send(np.full(3, -1.0, np.float32), dest=1, tag=tag)   # the user's message goes first
        comm.send(mine, 1)
    elif comm.rank == 1:
        got = comm.recv(np.zeros(5, np.float32), 0)
        assert np.array_equal(got, mine), f"fp4ccl's recv got {got}"
        theirs = np.zeros(3, np.float32)
        world.Recv(theirs, source=0, tag=tag)
        assert np.array_equal(theirs, np.full(3, -1.0, np.float32)), f"the user's recv got {theirs}"
    comm.destroy()
    assert comm._exchange.comm is None, "destroy kept fp4ccl's MPI communicator"
    return "ok"


def case_timeout(comm):
    """Only rank 0 calls all_reduce: it gets CommTimeoutError after FP4CCL_TIMEOUT (1 s), then CommClosedError."""
    import pytest

    from fp4ccl.errors import CommClosedError, CommTimeoutError
    comm.all_reduce(np.ones(3, np.float32))  # call #1, everyone
    if comm.rank == 0:
        with pytest.raises(CommTimeoutError, match=r"all_reduce \(call #2\) on rank 0"):
            comm.all_reduce(np.ones(3, np.float32))
        with pytest.raises(CommClosedError, match="aborted after a timeout"):
            comm.all_reduce(np.ones(3, np.float32))
    comm.abort()
    return "ok"


def mpi_main(case: str, outdir: str, cases: dict) -> None:
    """One rank under mpiexec: run cases[f"case_{case}"](comm), write its result (or traceback) for run_mpi."""
    sys.path.insert(0, HERE)
    import fp4ccl
    comm = fp4ccl.init("host")
    try:
        result = cases[f"case_{case}"](comm)
    except BaseException:  # noqa: BLE001 - reported through the rank's file
        result = traceback.format_exc()
    with open(os.path.join(outdir, f"rank{comm.rank}"), "w") as f:
        f.write(result)


# -- the tests, run by pytest ----------------------------------------------------------------------

def _mpiexec():
    import pytest
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec on PATH")
    return found


def run_mpi(tmp_path, case: str, n: int, timeout: float = 120, script: str = __file__, **environ) -> list:
    """`script case tmp_path` on n ranks under mpiexec (its __main__ calls mpi_main); every rank must answer ok."""
    env = dict(os.environ, PYTHONPATH=ROOT, **environ)
    for var in ("FP4CCL_RANK", "FP4CCL_STORE", "FP4CCL_WORLD_SIZE", "RANK", "WORLD_SIZE"):
        env.pop(var, None)
    proc = subprocess.run([_mpiexec(), "-n", str(n), sys.executable, os.path.abspath(script), case, str(tmp_path)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    results = [(tmp_path / f"rank{r}").read_text() if (tmp_path / f"rank{r}").exists() else "no result"
               for r in range(n)]
    for r, text in enumerate(results):
        assert text.startswith("ok"), f"rank {r}:\n{text}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return results


def test_collectives_groups_and_mismatches_under_mpi(tmp_path):
    run_mpi(tmp_path, "collectives", 3, timeout=300)


def test_abort_does_not_wait_for_an_unmatched_send(tmp_path):
    results = run_mpi(tmp_path, "abort", 2, timeout=60)
    assert float(results[0].split()[1]) < 1.0, results


def test_destroy_waits_for_sends_at_most_the_timeout(tmp_path):
    results = run_mpi(tmp_path, "destroy_timeout", 2, timeout=60, FP4CCL_TIMEOUT="1")
    assert 0.9 < float(results[0].split()[1]) < 10.0, results


def test_user_messages_never_meet_fp4ccls(tmp_path):
    run_mpi(tmp_path, "user_messages", 2, timeout=60)


def test_timeout_under_mpi(tmp_path):
    run_mpi(tmp_path, "timeout", 2, timeout=60, FP4CCL_TIMEOUT="1")


if __name__ == "__main__":
    mpi_main(sys.argv[1], sys.argv[2], globals())
