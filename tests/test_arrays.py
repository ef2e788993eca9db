"""fp4ccl._arrays: every framework and dtype described correctly, and the fast paths (per-type
handlers, dtype dicts, `new` without re-describing, the raw stream getter) agree with the slow,
public-API way of finding the same facts."""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from fp4ccl import _arrays
from fp4ccl._arrays import ITEMSIZE, ArrayInfo, describe, dtype_name, numpy_dtype

torch = pytest.importorskip("torch")

TORCH_NAMES = [n for n in ITEMSIZE if isinstance(getattr(torch, n, None), torch.dtype)]


def reference(x) -> ArrayInfo:
    """The same facts through the slow public APIs (what describe() did before its fast paths)."""
    if isinstance(x, torch.Tensor):
        dev = x.device.index if x.device.type == "cuda" else None
        return ArrayInfo(x, "torch", x.data_ptr(), tuple(x.shape), dtype_name(str(x.dtype)), dev, x.is_contiguous())
    return ArrayInfo(x, "numpy", int(x.ctypes.data), tuple(x.shape), dtype_name(x.dtype), None,
                     bool(x.flags.c_contiguous), bool(x.flags.writeable))


@pytest.mark.parametrize("name", list(ITEMSIZE))
def test_numpy_every_dtype(name):
    a = np.zeros((3, 5), numpy_dtype(name))
    info = describe(a)
    assert info == reference(a)
    assert (info.framework, info.dtype, info.shape, info.device, info.contiguous) == ("numpy", name, (3, 5), None, True)
    assert info.ptr == a.ctypes.data and info.nbytes == a.nbytes and info.itemsize == a.itemsize
    col = a[:, 1:4]
    assert describe(col) == reference(col) and not describe(col).contiguous
    assert describe(col).ptr == a.ctypes.data + a.itemsize


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_torch_every_dtype(name):
    t = torch.zeros((4, 6), dtype=getattr(torch, name))
    info = describe(t)
    assert info == reference(t)
    assert (info.framework, info.dtype, info.shape, info.device, info.contiguous) == ("torch", name, (4, 6), None, True)
    assert info.ptr == t.data_ptr() and info.nbytes == t.numel() * t.element_size()
    tt = t.t()
    assert describe(tt) == reference(tt) and not describe(tt).contiguous


def test_torch_dtype_dict_agrees_with_the_string_route():
    describe(torch.zeros(1))  # fills the per-dtype dict
    assert set(_arrays._TORCH_NAMES.values()) == set(TORCH_NAMES)
    for dt, name in _arrays._TORCH_NAMES.items():
        assert dtype_name(str(dt)) == name == dtype_name(dt)


def test_edge_shapes_and_subclasses():
    for x in (np.ones((), np.float32), np.empty((0, 3), np.float16), torch.empty(0), torch.tensor(2.5),
              torch.nn.Parameter(torch.ones(3)), np.ones((2, 2), np.int64).view(np.ndarray)):
        assert describe(x) == reference(x), type(x)
    assert describe(torch.nn.Parameter(torch.ones(3))).framework == "torch"


def test_unsupported_things_name_the_argument():
    with pytest.raises(TypeError, match="unsupported dtype 'torch.complex64'"):
        describe(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="unsupported dtype"):
        describe(np.zeros(2, np.complex128))
    with pytest.raises(TypeError, match="out: sparse tensors are not supported"):
        describe(torch.zeros(3, 3).to_sparse(), "out")
    with pytest.raises(TypeError, match=r"x: tensors on meta are not supported \(cpu or cuda\)"):
        describe(torch.empty(3, device="meta"))
    with pytest.raises(TypeError, match="y: expected an array or tensor, got Size"):
        describe(torch.Size([3]), "y")
    with pytest.raises(TypeError, match="z: expected a torch tensor, CuPy array or numpy array, got list"):
        describe([1.0], "z")
    with pytest.raises(TypeError, match="got tuple"):  # not cached as if it were an array type
        describe((1.0,), "z")
    # a byte-swapped dtype is not float32, whatever the dict keyed by dtype holds
    with pytest.raises(TypeError, match="unsupported dtype"):
        describe(np.zeros(2, np.dtype(">f4")))


def test_read_only_numpy_arrays_are_marked():
    a = np.zeros(4, np.float32)
    assert describe(a).writeable
    a.flags.writeable = False
    assert describe(a) == reference(a) and not describe(a).writeable
    assert not describe(np.broadcast_to(np.float32(1), (3,))).writeable
    assert describe(torch.zeros(2)).writeable  # torch has no read-only flag


def test_host_view_of_a_tensor_that_requires_grad():
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.arange(3.0, dtype=dtype).requires_grad_()
        v = _arrays.host_view(describe(t))
        assert v.ctypes.data == t.data_ptr()  # the same memory, not a copy
        v[0] = 7
        assert t.detach()[0].item() == 7


class FakeCupyArray:
    """Duck-types what describe reads from a cupy.ndarray (CuPy needs a GPU to make real ones)."""

    __module__ = "cupy._core.core"

    def __init__(self, ptr, shape, dtype, device, contiguous=True):
        self.data = types.SimpleNamespace(ptr=ptr)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.device = types.SimpleNamespace(id=device)
        self.flags = types.SimpleNamespace(c_contiguous=contiguous)


def test_cupy_arrays_by_module():
    a = FakeCupyArray(0x7F00_0000_1000, (8, 2), ml_bf16(), 3, contiguous=False)
    info = describe(a)
    assert (info.obj, info.framework, info.ptr, info.shape, info.dtype, info.device, info.contiguous) == \
        (a, "cupy", 0x7F00_0000_1000, (8, 2), "bfloat16", 3, False)
    with pytest.raises(TypeError, match="unsupported dtype"):
        describe(FakeCupyArray(0, (1,), np.complex64, 0))


def ml_bf16():
    return numpy_dtype("bfloat16")


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["float32", "bfloat16", "uint8", "int64", "bool"])
def test_new_agrees_with_describing_what_it_made(framework, name):
    if framework == "torch" and name not in TORCH_NAMES:
        pytest.skip(f"this torch has no {name}")
    like = describe(np.zeros(1, np.float32) if framework == "numpy" else torch.zeros(1))
    for shape in ((5,), (2, 3), (0, 4), ()):
        obj, info = _arrays.new(like, shape, name)
        assert info == reference(obj), (shape, name)
        assert info.dtype == name and info.shape == shape
    obj = _arrays.empty(like, [np.int64(2), 3], name)  # any ints, any sequence
    assert describe(obj).shape == (2, 3) and describe(obj).dtype == name


def test_array_info_keeps_its_shape_and_dataclass_behaviour():
    a = np.arange(12, dtype=np.float32)
    info = ArrayInfo(a, "numpy", 4096, (3, 4), "float32", None, True)  # positional, as fp4_collectives builds it
    assert (info.size, info.itemsize, info.nbytes, info.is_cuda, info.where()) == (12, 4, 48, False, "cpu")
    gpu = dataclasses.replace(info, ptr=8192, shape=(2,), device=1)
    assert (gpu.ptr, gpu.shape, gpu.device, gpu.obj, gpu.where(), gpu.is_cuda) == (8192, (2,), 1, a, "cuda:1", True)
    assert info.ptr == 4096  # replace copies
    assert [f.name for f in dataclasses.fields(ArrayInfo)] == \
        ["obj", "framework", "ptr", "shape", "dtype", "device", "contiguous", "writeable"]
    assert info.writeable  # the default, for every positional construction above
    assert not hasattr(info, "__dict__")  # slotted: no per-instance dict to build
    assert "framework='numpy'" in repr(info)


def test_stream_getter_prefers_the_raw_handle_and_falls_back(monkeypatch):
    info = ArrayInfo(None, "torch", 0, (1,), "float32", 3, True)
    asked = []
    monkeypatch.setattr(_arrays, "_torch_stream", None)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: asked.append(dev) or 0xBEEF,
                        raising=False)
    assert _arrays.current_stream(info) == 0xBEEF and asked == [3]
    assert _arrays.current_stream(info, stream=17) == 17 and asked == [3]  # given: nothing asked
    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream")
    monkeypatch.setattr(_arrays, "_torch_stream", None)
    public = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev: public.append(dev) or
                        types.SimpleNamespace(cuda_stream=0xCAFE))
    assert _arrays.current_stream(info) == 0xCAFE and public == [3]
    assert _arrays.current_stream(describe(np.zeros(1))) == 0


def test_stream_handles():
    assert _arrays.stream_handle(5) == 5
    assert _arrays.stream_handle(types.SimpleNamespace(cuda_stream=7)) == 7
    assert _arrays.stream_handle(types.SimpleNamespace(ptr=9)) == 9
    with pytest.raises(TypeError, match="stream: expected an int handle"):
        _arrays.stream_handle("default")
