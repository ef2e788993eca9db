"""Shared test fixtures: a printed, replayable seed and GPU gating."""
from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import harness`


def pytest_configure(config):
    """FP4CCL_TEST_REQUIRE=torch,mpi4py names modules the run must have (the README's test command, and
    so CI, sets it): the tests that skip without one would otherwise pass the run unnoticed."""
    import importlib
    for name in filter(None, (n.strip() for n in os.environ.get("FP4CCL_TEST_REQUIRE", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise pytest.UsageError(f"FP4CCL_TEST_REQUIRE names {name!r}, which does not import here: {exc}") from None


def gpu_count() -> int:
    """Visible CUDA devices, without initialising CUDA in this process when no driver is there."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        pass
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def need_gpus(n: int = 1):
    """Skip (with the reason) unless at least n CUDA GPUs are visible."""
    have = gpu_count()
    if have < n:
        pytest.skip(f"needs {n} CUDA GPU(s), found {have}")


@pytest.fixture
def seed(request) -> int:
    """A seed printed with the test, replayable with FP4CCL_TEST_SEED=<value>."""
    value = int(os.environ.get("FP4CCL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"[{request.node.name}] seed={value} (replay: FP4CCL_TEST_SEED={value})")
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def comm(monkeypatch):
    """A one-rank host communicator, whatever launcher variables this process inherited; destroyed after
    the test (which only releases it locally if the test left it timed out)."""
    import fp4ccl
    for var in ("FP4CCL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(var, raising=False)
    c = fp4ccl.init("host")
    yield c
    c.destroy()


@pytest.fixture
def torch_env_store(monkeypatch):
    """torch.distributed (skipped without torch), not initialized in this process, and MASTER_ADDR /
    MASTER_PORT naming a free local port with no torchrun agent store: where init() under torchrun's
    variables hosts its own TCPStore."""
    dist = pytest.importorskip("torch.distributed", reason="torch is not installed")
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialized in this process: init() would share its store")
    from test_launcher import free_port
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    return dist
