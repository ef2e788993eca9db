"""Bad input raises a clear error before anything reaches the wire, and the communicator stays usable."""
from __future__ import annotations

import numpy as np
import pytest

import fp4ccl
from fp4ccl.errors import CommClosedError
from harness import run_ranks


@pytest.fixture
def comm(monkeypatch):
    for var in ("FP4CCL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(var, raising=False)
    c = fp4ccl.init("host")
    yield c
    c.destroy()


def test_single_process_init(comm):
    assert (comm.rank, comm.size, comm.backend, comm.device) == (0, 1, "host", None)
    assert "rank=0 size=1 backend=host" in repr(comm)


def test_unknown_op_names_it(comm):
    with pytest.raises(ValueError, match="op='mean' is not one of sum"):
        comm.all_reduce(np.ones(4, np.float32), "mean")


def test_avg_on_integers(comm):
    with pytest.raises(TypeError, match="op='avg' needs a floating dtype, got int32"):
        comm.all_reduce(np.ones(4, np.int32), "avg")


def test_bool_reduction(comm):
    with pytest.raises(TypeError, match="bool arrays cannot be reduced"):
        comm.all_reduce(np.ones(4, bool))


def test_non_contiguous(comm):
    with pytest.raises(ValueError, match="x must be contiguous"):
        comm.all_gather(np.ones((4, 4), np.float32)[:, ::2])


def test_out_shape_mismatch(comm):
    with pytest.raises(ValueError, match=r"out has shape \(3,\), expected \(4,\)"):
        comm.all_reduce(np.ones(4, np.float32), out=np.empty(3, np.float32))


def test_out_dtype_mismatch(comm):
    with pytest.raises(TypeError, match="out has dtype float64, expected float32"):
        comm.all_reduce(np.ones(4, np.float32), out=np.empty(4, np.float64))


def test_peer_and_root_out_of_range(comm):
    with pytest.raises(ValueError, match="peer=1 is out of range for a communicator of size 1"):
        comm.send(np.ones(2, np.float32), 1)
    with pytest.raises(ValueError, match="root=-1 is out of range"):
        comm.broadcast(np.ones(2, np.float32), -1)


def test_unsupported_type(comm):
    with pytest.raises(TypeError, match="x: expected a torch tensor, CuPy array or numpy array, got list"):
        comm.all_reduce([1.0, 2.0])
    with pytest.raises(TypeError, match="unsupported dtype"):
        comm.all_reduce(np.ones(2, np.complex64))


def test_zero_dim(comm):
    with pytest.raises(ValueError, match="0-d"):
        comm.reduce_scatter(np.array(1.0, np.float32))
    assert comm.all_gather(np.array(3.0, np.float32)).shape == (1,)


def test_after_destroy():
    c = fp4ccl.init("host")
    c.destroy()
    c.destroy()  # idempotent
    with pytest.raises(CommClosedError, match="closed by destroy"):
        c.all_reduce(np.ones(2, np.float32))
    with pytest.raises(RuntimeError):  # CommClosedError is a RuntimeError
        c.barrier()


def test_nccl_backend_without_gpu(monkeypatch):
    from fp4ccl import communicator
    monkeypatch.setattr(communicator, "gpus_usable", lambda: 0)
    with pytest.raises(RuntimeError, match="backend='nccl' needs CUDA GPUs"):
        fp4ccl.init("nccl")
    with pytest.raises(ValueError, match="backend='gloo' is not one of"):
        fp4ccl.init("gloo")


def test_torch_cuda_tensor_on_host_comm(comm):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU to make a cuda tensor")
    with pytest.raises(TypeError, match="backend is 'host'"):
        comm.all_reduce(torch.ones(2, device="cuda"))


def _uneven_then_valid(comm):
    x = np.arange(comm.size * 2 + 1, dtype=np.float32)
    try:
        comm.reduce_scatter(x)
    except ValueError as err:
        assert f"x.shape[0]={comm.size * 2 + 1} is not divisible by the world size {comm.size}" in str(err)
        assert "reduce_scatterv" in str(err)
    else:
        raise AssertionError(f"rank {comm.rank}: uneven reduce_scatter did not raise")
    # Nothing reached the wire, so the next collective still lines up on every rank.
    y = comm.all_reduce(np.full(3, comm.rank + 1, np.float32))
    assert np.array_equal(y, np.full(3, comm.size * (comm.size + 1) / 2, np.float32)), y
    return True


@pytest.mark.parametrize("nranks", [2, 3])
def test_uneven_shapes_rejected_on_every_rank(nranks):
    assert run_ranks(nranks, _uneven_then_valid) == [True] * nranks
