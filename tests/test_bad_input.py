"""Bad input raises a clear error before anything reaches the wire, and the communicator stays usable."""
from __future__ import annotations

import numpy as np
import pytest

import fp4ccl
from fp4ccl.errors import CommClosedError
from harness import run_ranks


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
    monkeypatch.setattr(communicator, "gpus_usable", lambda: (0, "no CUDA device is visible"))
    with pytest.raises(RuntimeError, match="backend='nccl' needs CUDA GPUs, CuPy and NCCL; none usable here: "
                                           "no CUDA device is visible"):
        fp4ccl.init("nccl")
    with pytest.raises(ValueError, match="backend='gloo' is not one of"):
        fp4ccl.init("gloo")


def test_a_backend_from_the_environment_is_named_as_such(monkeypatch):
    from fp4ccl import communicator
    _no_launcher(monkeypatch)
    monkeypatch.setattr(communicator, "gpus_usable", lambda: (0, "no CUDA device is visible"))
    monkeypatch.setenv("FP4CCL_BACKEND", "NCCLX")
    with pytest.raises(ValueError, match=r"^FP4CCL_BACKEND='NCCLX' is not one of 'nccl', 'host' \(or unset it"):
        fp4ccl.init()
    with pytest.raises(ValueError, match=r"^backend='gloo' is not one of"):
        fp4ccl.init("gloo")   # the argument wins over the variable, and is the one named
    monkeypatch.setenv("FP4CCL_BACKEND", "nccl")
    with pytest.raises(RuntimeError, match=r"^FP4CCL_BACKEND='nccl' needs CUDA GPUs"):
        fp4ccl.init()


def _fake_cupy(monkeypatch, count):
    """A CuPy whose runtime reports `count` devices, or raises `count` when it is an exception."""
    import sys
    import types

    def device_count():
        if isinstance(count, Exception):
            raise count
        return count
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=device_count))
    monkeypatch.setitem(sys.modules, "cupy", cupy)


def _no_launcher(monkeypatch):
    for var in ("FP4CCL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("case", ["no cupy", "no driver", "no device", "no nccl"])
def test_nccl_backend_says_why_no_gpu_is_usable(monkeypatch, caplog, case):
    """init('nccl') names the actual reason (exception type and message) in its error and logs it at
    INFO; FP4CCL_NCCL_LIBRARY comes up only where the NCCL library is what is missing."""
    import sys

    from fp4ccl import nccl
    _no_launcher(monkeypatch)
    if case == "no cupy":
        monkeypatch.setitem(sys.modules, "cupy", None)  # what an absent package looks like to import
        want = r"CuPy cannot be imported \((ModuleNotFound|Import)Error: "
    elif case == "no driver":
        _fake_cupy(monkeypatch, RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient"))
        want = r"CUDA is not usable \(RuntimeError: cudaErrorInsufficientDriver: CUDA driver version"
    elif case == "no device":
        _fake_cupy(monkeypatch, 0)
        want = "no CUDA device is visible"
    else:
        _fake_cupy(monkeypatch, 2)
        monkeypatch.setattr(nccl, "_lib", None)
        monkeypatch.setenv(nccl.ENV_LIBRARY, "/nonexistent/libnccl.so.2")
        want = r"2 CUDA device\(s\), but NCCL cannot be loaded \(NcclLoadError: FP4CCL_NCCL_LIBRARY='/nonexistent/"
    with caplog.at_level("INFO", logger="fp4ccl.communicator"):
        with pytest.raises(RuntimeError, match="backend='nccl' needs CUDA GPUs, CuPy and NCCL; none usable here: "
                                               + want) as info:
            fp4ccl.init("nccl")
    assert ("FP4CCL_NCCL_LIBRARY" in str(info.value)) == (case == "no nccl"), str(info.value)
    assert "no usable GPU: " in caplog.text and str(info.value).split("here: ")[1] in caplog.text
    # Without backend='nccl' the same probe picks the host backend.
    c = fp4ccl.init()
    assert c.backend == "host"
    c.destroy()


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


class _FakeCupyArray:
    """What describe() reads from a cupy.ndarray, for a GPU array on a machine without one."""

    __module__ = "cupy._core.core"

    def __init__(self, device, shape=(4,), dtype=np.float32):
        import types
        self.data = types.SimpleNamespace(ptr=0x7F0000000000)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.device = types.SimpleNamespace(id=device)
        self.flags = types.SimpleNamespace(c_contiguous=True)


class _IdleGpuBackend:
    """Named like the NCCL backend; every check must fire before any of these would run."""

    name = "nccl"

    def __getattr__(self, op):
        raise AssertionError(f"backend.{op} reached with bad input")


def _gpu_comm(device=0):
    from fp4ccl.bootstrap.exchange import SingleExchange
    from fp4ccl.communicator import Communicator
    return Communicator(_IdleGpuBackend(), SingleExchange(), device=device)


def test_device_checks_name_both_places():
    c = _gpu_comm(device=0)
    with pytest.raises(TypeError, match="x is on cpu, but this communicator's backend is 'nccl' on cuda:0"):
        c.all_reduce(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="x is on cuda:1, but this communicator uses cuda:0"):
        c.all_gather(_FakeCupyArray(1))
    with pytest.raises(ValueError, match="out is on cuda:2, but this communicator uses cuda:0"):
        c.all_reduce(_FakeCupyArray(0), out=_FakeCupyArray(2))
    with pytest.raises(TypeError, match="out is on cpu, but this communicator's backend is 'nccl' on cuda:0"):
        c.broadcast(_FakeCupyArray(0), 0, out=np.empty(4, np.float32))
    with pytest.raises(ValueError, match="root=3 is out of range for a communicator of size 1"):
        c.broadcast(_FakeCupyArray(0), 3)
    with pytest.raises(TypeError, match="bool arrays cannot be reduced"):
        c.all_reduce(_FakeCupyArray(0, dtype=bool))
    with pytest.raises(TypeError, match=r"out has dtype float16, expected float32 \(the input's\)"):
        c.all_reduce(_FakeCupyArray(0), out=_FakeCupyArray(0, dtype=np.float16))
    with pytest.raises(ValueError, match=r"out has shape \(5,\), expected \(4,\)"):
        c.all_reduce(_FakeCupyArray(0), out=_FakeCupyArray(0, shape=(5,)))


def test_gpu_backend_without_a_device_refuses_every_array():
    c = _gpu_comm(device=None)
    with pytest.raises(TypeError, match="x is on cpu, but this communicator's backend is 'nccl' on cuda:None"):
        c.all_reduce(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="x is on cuda:0, but this communicator uses cuda:None"):
        c.all_reduce(_FakeCupyArray(0))


def test_gpu_array_on_host_comm(comm):
    with pytest.raises(TypeError, match="x is on cuda:0, but this communicator's backend is 'host' "
                                        r"\(CPU arrays only\)"):
        comm.all_reduce(_FakeCupyArray(0))
    with pytest.raises(TypeError, match="out is on cuda:1, but this communicator's backend is 'host'"):
        comm.all_reduce(np.ones(4, np.float32), out=_FakeCupyArray(1))


def test_out_from_another_framework(comm):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="out is a torch array but the input is a numpy array"):
        comm.all_reduce(np.ones(4, np.float32), out=torch.empty(4))
    with pytest.raises(ValueError, match="out must be contiguous"):
        comm.all_reduce(torch.ones(4, 4), out=torch.empty(4, 4).t())


def test_torch_tensors_that_cannot_be_used(comm):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="x: sparse tensors are not supported"):
        comm.all_reduce(torch.ones(3, 3).to_sparse())
    with pytest.raises(TypeError, match=r"x: tensors on meta are not supported \(cpu or cuda\)"):
        comm.all_reduce(torch.empty(3, device="meta"))
    with pytest.raises(TypeError, match="unsupported dtype 'torch.complex64'"):
        comm.all_gather(torch.ones(3, dtype=torch.complex64))
    # and after all that the communicator still works
    assert torch.equal(comm.all_reduce(torch.arange(3.0)), torch.arange(3.0))


def test_read_only_outputs_are_refused_before_the_call(comm):
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    x = np.ones(4, np.float32)
    for call in (lambda: comm.all_reduce(x, out=ro), lambda: comm.broadcast(ro, 0, out=ro),
                 lambda: comm.all_gatherv(x, [4], out=ro), lambda: comm.reduce(x, 0, out=ro)):
        with pytest.raises(ValueError, match="out is a read-only numpy array"):
            call()
    with pytest.raises(ValueError, match="x is a read-only numpy array .* writes into it"):
        comm.recv(ro, 0)
    # Inputs are only read: a read-only x is fine, and nothing above reached the wire.
    assert np.array_equal(comm.all_reduce(ro), ro)
    comm.send(x, 0)
    assert np.array_equal(comm.recv(np.empty(4, np.float32), 0), x)


def test_tensors_that_require_grad_are_moved_like_any_other(comm):
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.arange(4.0, dtype=dtype).requires_grad_()
        assert torch.equal(comm.all_reduce(x), x.detach())
        out = torch.empty(4, dtype=dtype, requires_grad=True)
        comm.all_gather(x, out=out)
        assert torch.equal(out.detach(), x.detach())
    x = torch.ones(2, 16, requires_grad=True)
    assert torch.equal(comm.all_gatherv(x, [2], compress="nvfp4"), x.detach())


def test_root_peer_and_sizes_take_any_integer_but_not_bool(comm):
    torch = pytest.importorskip("torch")
    x = np.arange(4, dtype=np.float32)
    for root in (np.int64(0), np.int32(0), torch.tensor(0)):
        assert np.array_equal(comm.broadcast(x, root), x)
        assert np.array_equal(comm.reduce(x, root), x)
        comm.send(x, root)
        assert np.array_equal(comm.recv(np.empty(4, np.float32), root), x)
    assert np.array_equal(comm.all_gatherv(x, np.array([4])), x)
    assert np.array_equal(comm.all_gatherv(x, [np.int16(4)]), x)
    for bad in (True, np.bool_(False), torch.tensor(False)):
        with pytest.raises(TypeError, match="root must be an integer, got the bool"):
            comm.broadcast(x, bad)
        with pytest.raises(TypeError, match="peer must be an integer, got the bool"):
            comm.send(x, bad)
        with pytest.raises(TypeError, match=r"all_gatherv: sizes must be a sequence of integers \(not bools\)"):
            comm.all_gatherv(x, [bad])
    with pytest.raises(TypeError, match="root must be an integer, got 0.0"):
        comm.reduce(x, 0.0)
    with pytest.raises(TypeError, match="reduce_scatterv: sizes must be a sequence of integers"):
        comm.reduce_scatterv(x, [4.0])
    with pytest.raises(ValueError, match="root=1 is out of range for a communicator of size 1"):
        comm.broadcast(x, np.int64(1))


def test_fp4_options_without_compress_are_refused(comm):
    x = np.ones((4, 16), np.float32)
    for kwargs, named in (({"dequantize": False}, "dequantize=False"),
                          ({"global_scale": "shared"}, "global_scale='shared'"),
                          ({"dequantize": False, "global_scale": "shared"}, "dequantize=False, global_scale='shared'")):
        with pytest.raises(ValueError, match=f"all_gatherv: {named} needs compress='nvfp4' or 'mxfp4'"):
            comm.all_gatherv(x, [4], **kwargs)
    for kwargs, named in (({"rounding": "stochastic", "seed": 3}, "rounding='stochastic', seed=3"),
                          ({"seed": 3}, "seed=3")):
        with pytest.raises(ValueError, match=f"reduce_scatterv: {named} needs compress='nvfp4' or 'mxfp4'"):
            comm.reduce_scatterv(x, [4], **kwargs)
        with pytest.raises(ValueError, match=f"reduce_scatterv: {named} needs compress"):
            comm.reduce_scatterv(x, [4], out=np.empty_like(x), **kwargs)
    # The defaults spelled out are fine, and so are the options with compress.
    assert comm.all_gatherv(x, [4], dequantize=True, global_scale="per_rank").shape == (4, 16)
    assert comm.reduce_scatterv(x, [4], rounding="nearest", seed=None).shape == (4, 16)
    assert comm.all_gatherv(x, [4], compress="nvfp4", global_scale="shared").shape == (4, 16)
    assert comm.reduce_scatterv(x, [4], compress="nvfp4", rounding="stochastic", seed=3).shape == (4, 16)


def _reduce_with_a_wrong_out_elsewhere(comm):
    x = np.ones(4, np.float32)
    try:
        comm.reduce(x, 0, out=np.empty(3, np.float32))
    except ValueError as err:
        assert "out has shape (3,), expected (4,)" in str(err), str(err)
    else:
        raise AssertionError(f"rank {comm.rank}: reduce took a wrong out")
    # Nothing reached the wire on any rank, so the next collective still lines up.
    y = comm.reduce(x, 0, out=np.empty(4, np.float32) if comm.rank else None)
    assert (y is None) == (comm.rank != 0) and (y is None or np.array_equal(y, np.full(4, comm.size, np.float32)))
    return True


def test_reduce_checks_out_on_every_rank():
    assert run_ranks(2, _reduce_with_a_wrong_out_elsewhere) == [True, True]


def test_argument_errors_name_the_argument(comm):
    with pytest.raises(TypeError, match="backend must be 'nccl', 'host' or None, got 1"):
        fp4ccl.init(1)
    with pytest.raises(TypeError, match="^x: unsupported dtype"):
        comm.all_reduce(np.ones(2, np.complex64))
    with pytest.raises(TypeError, match="^out: unsupported dtype"):
        comm.all_reduce(np.ones(2, np.float32), out=np.ones(2, np.complex64))
    for unordered in ({1: 1}, {1}, "1"):   # iterable, but no count per rank in rank order
        with pytest.raises(TypeError, match="sizes must be a sequence of integers, one per rank"):
            comm.all_gatherv(np.ones((1, 2), np.float32), unordered)
    assert np.asarray(comm.all_gatherv(np.ones((1, 2), np.float32), np.array([1]))).shape == (1, 2)


def test_destroy_inside_a_group_ends_it_quietly():
    comm = fp4ccl.init("host")
    with comm.group():
        comm.destroy()
    with pytest.raises(CommClosedError):
        comm.all_reduce(np.ones(2, np.float32))
