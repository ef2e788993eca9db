"""init()'s bootstrap under each launcher's environment.

Most cases start fresh interpreters with a launcher's variables; each finishes in seconds, and a bug
makes it fail within its own timeout instead of hanging the suite.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from harness import communicate_all, env, run_ranks
from test_host_mpi import _mpiexec
from test_launcher import free_port

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


def _python(code: str, timeout: float, **values) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_environ(**values), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# -- connecting to the store ------------------------------------------------------------------------

def test_connecting_to_the_store_gives_up_after_fp4ccl_timeout():
    address = f"127.0.0.1:{free_port()}"   # nothing listens there
    proc = _python("import fp4ccl; fp4ccl.init('host')", timeout=60, FP4CCL_RANK="0", FP4CCL_WORLD_SIZE="2",
                   FP4CCL_STORE=address, FP4CCL_TIMEOUT="1")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"TimeoutError: could not connect to the fp4ccl store at {address} within 1 s"), last
    assert "FP4CCL_STORE" in last and "FP4CCL_TIMEOUT" in last, last


def test_fp4ccl_run_variables_without_its_store_say_so():
    proc = _python("import fp4ccl; fp4ccl.init('host')", timeout=60, FP4CCL_RANK="0", FP4CCL_WORLD_SIZE="2")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError:") and "FP4CCL_STORE is not set" in last and "rank 0 of a 2-rank" in last, last


@pytest.mark.parametrize("launcher", ["fp4ccl-run", "torchrun"])
def test_fp4ccl_timeout_0_waits_forever_on_the_bootstrap_store(monkeypatch, request, launcher):
    """0 means forever for the bootstrap store too, as for every other wait (it meant the store's 300 s)."""
    import datetime
    import math

    from fp4ccl.bootstrap.env import RankInfo
    from fp4ccl.bootstrap.store import StoreServer
    from fp4ccl.communicator import default_exchange
    monkeypatch.setenv("FP4CCL_TIMEOUT", "0")
    if launcher == "fp4ccl-run":
        with StoreServer(token="tok") as server:
            ex = default_exchange(RankInfo(0, 2, 0, 2, launcher, store=server.address, token="tok", job_id="j"))
            try:
                assert ex.store.timeout == math.inf
            finally:
                ex.store.close()
        return
    request.getfixturevalue("torch_env_store")
    ex = default_exchange(RankInfo(0, 2, 0, 2, launcher, job_id="j"))
    assert ex.store._store.timeout >= datetime.timedelta(days=36500)


# -- MPI against the launcher's variables ---------------------------------------------------------

BUILD = "import numpy as np, fp4ccl; c = fp4ccl.init('host'); print('built', c, c.all_reduce(np.ones(1, np.float32)))"


@pytest.mark.parametrize("launcher", [
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "7",
     "SLURM_STEP_ID": "0"},                                                                  # srun, no PMI
    {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},   # Open MPI's mpirun, mpi4py for MPICH
])
def test_mpi_started_alone_under_a_launcher_of_two_ranks(launcher):
    """Each process started MPI alone (a singleton): without the check each is a 1-rank communicator whose
    all_reduce returns its own input."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    proc = _python(BUILD, timeout=60, **launcher)
    assert proc.returncode != 0 and "built" not in proc.stdout, proc.stdout + proc.stderr
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_NTASKS" in launcher else "OMPI_COMM_WORLD_SIZE"
    assert (f"RuntimeError: the launcher reports 2 ranks ({size_var}) but MPI.COMM_WORLD has 1: each process "
            f"started MPI on its own: ") in proc.stderr, proc.stderr


def test_mpi_world_of_another_size_than_the_launchers():
    """Open MPI's variables of a job of 3 ranks (left in the environment) under MPICH's mpiexec of 2, whose
    own variables rank below them: every rank refuses before fp4ccl's first collective, so none waits for
    the others."""
    proc = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", BUILD], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=_environ(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="3"))
    assert proc.returncode != 0 and "built" not in proc.stdout, proc.stdout + proc.stderr
    assert "the launcher reports 3 ranks (OMPI_COMM_WORLD_SIZE) but MPI.COMM_WORLD has 2: the launcher's " \
           "variables describe another job than MPI's" in proc.stderr, proc.stderr


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


# -- torch.distributed in the same processes --------------------------------------------------------

TORCH_JOB = r"""
import os, pathlib, sys
import numpy as np, torch, torch.distributed as dist
import fp4ccl

def check(comm):
    assert (comm.rank, comm.size) == (int(os.environ["RANK"]), 2), comm
    y = comm.all_reduce(np.full(3, comm.rank + 1.0, np.float32))
    assert np.all(y == 3.0), y

comms = []
if sys.argv[1] == "torch-first":
    dist.init_process_group("gloo")
comms.append(fp4ccl.init("host"))
if sys.argv[1] == "fp4ccl-first":
    dist.init_process_group("gloo")
    comms.append(fp4ccl.init("host"))   # over torch's store now, beside the first
for c in comms:
    check(c)
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == 2.0, t
for c in comms:
    c.destroy()
dist.destroy_process_group()
# a file per rank: torchrun's ranks share one stdout, where their lines could interleave
pathlib.Path(sys.argv[2], "rank" + os.environ["RANK"]).write_text(f"ok {len(comms)}")
"""


def test_init_beside_torch_distributed_without_an_agent(tmp_path):
    """RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set by hand: rank 0 of torch.distributed and of fp4ccl would
    each host a store on MASTER_PORT. Both orders run at once, as two jobs on two ports."""
    pytest.importorskip("torch.distributed", reason="torch is not installed")
    script = tmp_path / "job.py"
    script.write_text(TORCH_JOB)
    jobs = {}
    for order in ("torch-first", "fp4ccl-first"):
        port = str(free_port())
        (tmp_path / order).mkdir()
        jobs[order] = [subprocess.Popen([sys.executable, str(script), order, str(tmp_path / order)],
                                        stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                        env=_environ(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                     MASTER_PORT=port, FP4CCL_TIMEOUT="20"))
                       for r in range(2)]
    outs = communicate_all(jobs, 60)   # for the four of them: a hung rank fails the test in a minute
    for order, procs in jobs.items():
        want = "ok 1" if order == "torch-first" else "ok 2"
        for r, (p, out) in enumerate(zip(procs, outs[order])):
            result = tmp_path / order / f"rank{r}"
            assert p.returncode == 0 and result.read_text() == want, f"{order}, rank {r}:\n{out}"


def test_init_under_torchrun(tmp_path):
    """torchrun's agent hosts the store on MASTER_PORT: init() joins it as a client, and once the program
    has started torch.distributed, shares its store."""
    pytest.importorskip("torch.distributed", reason="torch is not installed")
    script = tmp_path / "job.py"
    script.write_text(TORCH_JOB)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(script), "fp4ccl-first", str(tmp_path)],
                          env=_environ(FP4CCL_TIMEOUT="20"), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["ok 2"] * 2, proc.stdout + proc.stderr


def test_init_after_torch_distributed_of_another_world_size():
    pytest.importorskip("torch.distributed", reason="torch is not installed")
    code = ("import torch.distributed as dist, fp4ccl\n"
            "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
            "fp4ccl.init('host')\n")
    proc = _python(code, timeout=60, RANK="0", WORLD_SIZE="2")
    assert proc.returncode != 0
    assert ("RuntimeError: the launcher reports 2 ranks (WORLD_SIZE) but torch.distributed's default group has 1"
            in proc.stderr), proc.stderr
