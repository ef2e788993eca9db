"""Which GPU a rank binds when given no device=: its local rank in the whole job, also for a communicator
over a sub-group (from_torch / from_mpi), never its rank within the group. No GPU needed: the NCCL
backend, the GPU count and the switch of the current device are replaced by recorders."""
from __future__ import annotations

import types

import pytest

from fp4ccl import communicator
from fp4ccl.bootstrap.env import RankInfo, discover
from fp4ccl.communicator import Communicator, default_device

# Global ranks [0, 2] of a 4-rank job on one node: this process is global rank 2, rank 1 in the group.
TORCHRUN = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "x",
            "MASTER_PORT": "1"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
LAUNCHER_VARS = ("FP4CCL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "RANK")


def _never():
    raise AssertionError("the current CUDA device was asked for under a launcher")


def test_under_a_launcher_the_job_local_rank():
    world = discover(TORCHRUN)
    assert default_device(world, _never) == 2
    assert default_device(discover(OPENMPI), _never) == 2
    assert default_device(RankInfo(5, 8, 1, 4, "slurm"), _never) == 1


def test_without_a_launcher_the_current_device():
    assert default_device(discover({}), lambda: 3) == 3


class _GroupExchange:
    """What a sub-group's exchange looks like to _build: rank 1 of 2."""

    rank, size = 1, 2

    def all_gather_bytes(self, data):
        return [data] * self.size


@pytest.fixture
def fake_gpus(monkeypatch):
    """Four GPUs, an NCCL backend that records its device, and no real switch of the current device."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    made = []

    class Backend:
        name = "nccl"

        def __init__(self, exchange, rank, size, device):
            made.append(device)

    import fp4ccl.backends.nccl as nccl_backend
    monkeypatch.setattr(nccl_backend, "NcclBackend", Backend)
    monkeypatch.setattr(communicator, "gpus_usable", lambda: (4, ""))
    monkeypatch.setattr(communicator, "_make_current", lambda device: None)
    monkeypatch.setattr(communicator, "TorchGroupExchange", lambda group: _GroupExchange())
    monkeypatch.setattr(communicator, "MPIExchange", lambda comm: _GroupExchange())
    monkeypatch.setattr(communicator, "_mpi_shared_type", lambda: "shared")
    return made


def test_from_torch_sub_group_binds_the_job_local_rank(fake_gpus, monkeypatch):
    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    comm = Communicator.from_torch(object(), backend="nccl")
    assert (comm.device, fake_gpus) == (2, [2])
    assert Communicator.from_torch(object(), backend="nccl", device=0).device == 0  # device= still wins


def test_from_mpi_sub_communicator_binds_the_job_local_rank(fake_gpus, monkeypatch):
    for k, v in OPENMPI.items():
        monkeypatch.setenv(k, v)
    # The sub-communicator's node-local split: rank 1 of 2 on this node.
    local = types.SimpleNamespace(Get_rank=lambda: 1, Get_size=lambda: 2, Free=lambda: None)
    sub = types.SimpleNamespace(Split_type=lambda kind, key: local)
    comm = Communicator.from_mpi(sub, backend="nccl")
    assert (comm.device, comm.local_rank, fake_gpus) == (2, 1, [2])


def test_without_a_launcher_init_takes_the_current_device(fake_gpus, monkeypatch):
    monkeypatch.setattr(communicator, "_current_device", lambda: 3)
    comm = communicator.init("nccl")
    assert (comm.device, fake_gpus) == (3, [3])
