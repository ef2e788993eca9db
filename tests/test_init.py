"""init()'s bootstrap under each launcher's environment.

Most cases start fresh interpreters with a launcher's variables; each finishes in seconds, and a bug
makes it fail within its own timeout instead of hanging the suite.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from harness import env, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every variable that makes discover() see a launcher, or changes the bootstrap: none leaks in from outside.
_LAUNCHER_PREFIXES = ("FP4CCL_", "OMPI_", "PMI_", "PMIX_", "SLURM_", "TORCHELASTIC_", "MPI_LOCAL")
_LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK")


def _environ(**values) -> dict:
    """os.environ without any launcher's variables, plus `values`, importing fp4ccl from this checkout."""
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(_LAUNCHER_PREFIXES) and k not in _LAUNCHER_NAMES}
    out.update(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), **values)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python(code: str, timeout: float, **values) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_environ(**values), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# -- connecting to the store ------------------------------------------------------------------------

def test_connecting_to_the_store_gives_up_after_fp4ccl_timeout():
    address = f"127.0.0.1:{_free_port()}"   # nothing listens there
    proc = _python("import fp4ccl; fp4ccl.init('host')", timeout=60, FP4CCL_RANK="0", FP4CCL_WORLD_SIZE="2",
                   FP4CCL_STORE=address, FP4CCL_TIMEOUT="1")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"TimeoutError: could not connect to the fp4ccl store at {address} within 1 s"), last
    assert "FP4CCL_STORE" in last and "FP4CCL_TIMEOUT" in last, last


# -- MPI against the launcher's variables ---------------------------------------------------------

BUILD = "import numpy as np, fp4ccl; c = fp4ccl.init('host'); print('built', c, c.all_reduce(np.ones(1, np.float32)))"


@pytest.mark.parametrize("launcher", [
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"},   # srun, no PMI
    {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},   # Open MPI's mpirun, mpi4py for MPICH
])
def test_mpi_started_alone_under_a_launcher_of_two_ranks(launcher):
    """Each process started MPI alone (a singleton): without the check each is a 1-rank communicator whose
    all_reduce returns its own input."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    proc = _python(BUILD, timeout=60, **launcher)
    assert proc.returncode != 0 and "built" not in proc.stdout, proc.stdout + proc.stderr
    size_var = "SLURM_NTASKS" if "SLURM_NTASKS" in launcher else "OMPI_COMM_WORLD_SIZE"
    assert (f"RuntimeError: the launcher reports 2 ranks ({size_var}) but MPI.COMM_WORLD has 1: each process "
            f"started MPI on its own: ") in proc.stderr, proc.stderr


def test_mpi_world_of_another_size_than_the_launchers():
    """Slurm's variables under an mpiexec of 2 ranks that say 3 (an MPI launcher inside a Slurm step): every
    rank refuses before fp4ccl's first collective, so none waits for the others."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", BUILD], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=_environ(SLURM_PROCID="0", SLURM_NTASKS="3"))
    assert proc.returncode != 0 and "built" not in proc.stdout, proc.stdout + proc.stderr
    assert "the launcher reports 3 ranks (SLURM_NTASKS) but MPI.COMM_WORLD has 2: the launcher's variables " \
           "describe another job than MPI's" in proc.stderr, proc.stderr


# -- several communicators from init() --------------------------------------------------------------

def _two_more_worlds(comm, calls):
    """Two more communicators from init() on every rank, used at once from two threads."""
    import fp4ccl
    with env({"FP4CCL_TIMEOUT": "10"}):
        comms = [fp4ccl.init("host"), fp4ccl.init("host")]
    sums, errors = [], []

    def work(c, value):
        try:
            for _ in range(calls):
                sums.append((value, float(c.all_reduce(np.full(1, value, np.float32))[0])))
        except BaseException as err:  # noqa: BLE001 - re-raised in the rank's main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(c, float(i + 1))) for i, c in enumerate(comms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in comms:
        if errors:
            c.abort()
        else:
            c.destroy()
    if errors:
        raise errors[0]
    return sorted(set(sums))


def test_communicators_from_init_never_share_store_keys():
    """Each communicator's store keys were the job's alone, and its round numbers started at 1: two used at
    once met in the same barrier keys and hung."""
    size = 4
    assert run_ranks(size, _two_more_worlds, 200) == [[(1.0, 1.0 * size), (2.0, 2.0 * size)]] * size
