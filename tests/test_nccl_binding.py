"""The NCCL ctypes binding on a CPU-only machine, and the NCCL backend's logic over a fake library.

Loading NCCL, its version, error strings and unique ids need no GPU; CI installs the cuda13 extra,
which brings the nvidia-nccl-cu13 wheel, so these run there.
"""
from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fp4ccl import nccl
from fp4ccl._arrays import ITEMSIZE, ArrayInfo
from fp4ccl.errors import CommClosedError, CommTimeoutError, NcclError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh(monkeypatch):
    """Forget the cached library for one test (and restore it after), so discovery runs again."""
    saved = nccl._lib
    monkeypatch.setattr(nccl, "_lib", None)
    monkeypatch.delenv(nccl.ENV_LIBRARY, raising=False)
    yield
    nccl._lib = saved


def wheel_path() -> str:
    path = nccl._wheel_library("nvidia-nccl-cu13")
    if path is None:
        pytest.skip("the nvidia-nccl-cu13 wheel (cuda13 extra) is not installed")
    return path


# -- discovery and version -------------------------------------------------------------------------

def test_loads_from_the_pip_wheel_and_reports_its_version(fresh):
    path = wheel_path()
    lib = nccl.load()
    assert lib.path == path
    assert lib.how == "pip package nvidia-nccl-cu13"
    major, minor, patch = nccl.version()
    print(f"NCCL {major}.{minor}.{patch} from {path}")
    assert (major, minor) >= (2, 27)
    assert nccl.version_code() == major * 10000 + minor * 100 + patch
    assert nccl.load() is lib  # cached


def test_version_codes_decode_in_both_schemes():
    assert nccl._decode_version(2708) == (2, 7, 8)
    assert nccl._decode_version(21805) == (2, 18, 5)
    assert nccl._decode_version(23203) == (2, 32, 3)


def test_env_variable_is_honoured(fresh, monkeypatch, tmp_path):
    link = tmp_path / "libnccl-custom.so.2"
    link.symlink_to(wheel_path())
    monkeypatch.setenv(nccl.ENV_LIBRARY, str(link))
    lib = nccl.load()
    assert lib.path == str(link)
    assert lib.how == nccl.ENV_LIBRARY


@pytest.mark.parametrize("kind", ["missing", "not-a-library"])
def test_bad_env_path_names_the_variable(fresh, monkeypatch, tmp_path, kind):
    bad = tmp_path / "libnccl.so.2"
    if kind == "not-a-library":
        bad.write_bytes(b"this is not an ELF file")
    monkeypatch.setenv(nccl.ENV_LIBRARY, str(bad))
    with pytest.raises(nccl.NcclLoadError) as info:
        nccl.load()
    assert "FP4CCL_NCCL_LIBRARY" in str(info.value) and str(bad) in str(info.value)
    assert nccl.available() is False


def test_nothing_found_names_the_variable(fresh, monkeypatch):
    monkeypatch.setattr(nccl, "_wheel_library", lambda dist: None)
    monkeypatch.setattr(nccl, "_process_library", lambda: None)

    def refuse(path):
        raise OSError(f"{path}: cannot open shared object file")

    monkeypatch.setattr(nccl, "_open", refuse)
    with pytest.raises(nccl.NcclLoadError) as info:
        nccl.load()
    text = str(info.value)
    assert "FP4CCL_NCCL_LIBRARY" in text
    for step in ("nvidia-nccl-cu13", "nvidia-nccl-cu12", "already loaded", "libnccl.so.2"):
        assert step in text


def test_search_order_prefers_cu13_then_cu12_then_the_process(fresh, monkeypatch):
    real = wheel_path()
    opened = []
    monkeypatch.setattr(nccl, "_open", lambda path: opened.append(path) or ctypes.CDLL(real))

    monkeypatch.setattr(nccl, "_wheel_library", lambda dist: f"/wheels/{dist}/libnccl.so.2")
    assert nccl._locate()[2] == "pip package nvidia-nccl-cu13"
    monkeypatch.setattr(nccl, "_wheel_library", lambda dist: None if dist.endswith("cu13") else "/cu12/libnccl.so.2")
    assert nccl._locate()[1:] == ("/cu12/libnccl.so.2", "pip package nvidia-nccl-cu12")
    monkeypatch.setattr(nccl, "_wheel_library", lambda dist: None)
    _, path, how = nccl._locate()
    assert how == "already loaded by this process"
    assert os.path.basename(path).startswith("libnccl.so")  # read from /proc/self/maps
    monkeypatch.setattr(nccl, "_process_library", lambda: None)
    assert nccl._locate()[1:] == ("libnccl.so.2", "dynamic loader")
    assert opened == ["/wheels/nvidia-nccl-cu13/libnccl.so.2", "/cu12/libnccl.so.2", path, "libnccl.so.2"]


def test_debug_info_logs_the_library(tmp_path):
    env = dict(os.environ, FP4CCL_DEBUG="INFO")
    env.pop(nccl.ENV_LIBRARY, None)
    wheel_path()
    out = subprocess.run([sys.executable, "-c", "import fp4ccl.nccl as n; n.load()"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "loaded from" in out.stderr and "libnccl.so.2" in out.stderr


def test_import_does_not_load_nccl():
    code = ("import fp4ccl, fp4ccl.nccl, fp4ccl.backends.nccl, sys\n"
            "maps = open('/proc/self/maps').read()\n"
            "assert 'libnccl' not in maps, 'libnccl mapped at import'\n"
            "assert fp4ccl.nccl._lib is None\n"
            "assert 'cupy' not in sys.modules and 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# -- the table and the checker ---------------------------------------------------------------------

def _prototypes(header: str) -> dict:
    found = {}
    for m in re.finditer(r"^(ncclResult_t|const char\*)\s+(nccl\w+)\(([^;]*)\);", header, re.M | re.S):
        args = m.group(3).strip()
        found[m.group(2)] = (m.group(1), 0 if args in ("", "void") else args.count(",") + 1)
    return found


def test_table_matches_the_wheels_header():
    header = Path(wheel_path()).parent.parent / "include" / "nccl.h"
    if not header.exists():
        pytest.skip(f"no header at {header}")
    protos = _prototypes(header.read_text())
    for name, restype, argtypes, _since in nccl._TABLE:
        assert name in protos, f"{name} not declared in {header}"
        ret, nargs = protos[name]
        assert nargs == len(argtypes), f"{name}: {nargs} arguments in nccl.h, {len(argtypes)} in the table"
        assert (restype is ctypes.c_char_p) == (ret == "const char*"), name


def test_every_table_entry_is_loaded_and_has_answers(fresh):
    wheel_path()
    lib = nccl.load()
    for name, _, _, since in nccl._TABLE:
        assert nccl.has(name) == (getattr(lib, name) is not None)
        if since is None or since <= lib.version:
            assert nccl.has(name), name
    assert nccl.has("ncclCommWindowRegister") == (lib.version >= (2, 27, 0))
    assert not nccl.has("ncclNoSuchFunction")


def test_failing_call_becomes_ncclerror_with_names_and_text():
    count = ctypes.c_int()
    with pytest.raises(NcclError) as info:
        nccl.load().ncclCommCount(None, ctypes.byref(count))  # a NULL communicator: no GPU needed
    err = info.value
    assert err.status == 4 and err.name == "ncclInvalidArgument" and err.call == "ncclCommCount"
    assert err.text == nccl.error_string(4) and "invalid argument" in err.text
    assert "NULL" in err.last_error  # ncclGetLastError's own words
    assert "ncclCommCount" in str(err) and "ncclInvalidArgument" in str(err)


@pytest.mark.parametrize("status", range(1, 9))
def test_checker_names_every_status(status):
    with pytest.raises(NcclError) as info:
        nccl.check(status, "ncclSomething")
    assert info.value.name == nccl.RESULT_NAMES[status]
    assert info.value.text == nccl.error_string(status) != ""
    assert info.value.call == "ncclSomething"


def test_checker_passes_success_and_names_unknown_codes():
    assert nccl.check(0, "ncclX") == 0
    with pytest.raises(NcclError, match="ncclResult_42"):
        nccl.check(42, "ncclX")


def test_unique_id_round_trips_through_bytes():
    uid = nccl.get_unique_id()
    data = uid.to_bytes()
    assert isinstance(data, bytes) and len(data) == 128 and any(data)
    assert nccl.UniqueId.from_bytes(data) == uid
    zeros_inside = bytes([0, 0, 7]) + bytes(range(125))  # NULs must survive (no C-string truncation)
    assert nccl.UniqueId.from_bytes(zeros_inside).to_bytes() == zeros_inside
    assert nccl.get_unique_id() != uid
    with pytest.raises(ValueError, match="128"):
        nccl.UniqueId.from_bytes(b"short")


# -- dtype and op maps ---------------------------------------------------------------------------

def test_dtype_map_matches_ncclDataType_t():
    expect = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
              "float32": 7, "float64": 8, "bfloat16": 9, "float8_e4m3fn": 10, "float8_e5m2": 11}
    for name, code in expect.items():
        assert nccl.datatype(name, fp8=True) == code
        assert nccl.datatype(name, reduce=True, fp8=True) == code
    assert nccl.supports_fp8() == (nccl.version() >= (2, 24, 0))
    for name in ("bool", "int16", "complex64"):
        with pytest.raises(TypeError, match=name):
            nccl.datatype(name, reduce=True)


def test_fp8_on_an_old_nccl_moves_as_bytes_and_refuses_reductions():
    assert nccl.datatype("float8_e4m3fn", fp8=False) == 1
    assert nccl.datatype("float8_e5m2", fp8=False) == 1
    with pytest.raises(TypeError, match="2.24"):
        nccl.datatype("float8_e4m3fn", reduce=True, fp8=False)
    assert "float8_e5m2" not in nccl.reduce_dtypes(fp8=False)
    assert nccl.reduce_dtypes(fp8=True)["float8_e5m2"] == 11
    assert nccl.move_dtypes(fp8=False)["float8_e4m3fn"] == (1, 1)


def test_move_map_covers_every_canonical_dtype():
    moves = nccl.move_dtypes(fp8=True)
    assert set(moves) == set(ITEMSIZE)
    assert moves["bfloat16"] == (9, 1)
    assert moves["int16"] == (1, 2) and moves["uint16"] == (1, 2) and moves["bool"] == (1, 1)


def test_op_map():
    assert [nccl.redop(op) for op in ("sum", "prod", "max", "min", "avg")] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="'mean'"):
        nccl.redop("mean")


# -- the backend over a fake NCCL and a fake CUDA runtime ---------------------------------------

class FakeCudaError(Exception):
    def __init__(self, status):
        super().__init__(f"cuda error {status}")
        self.status = status


class FakeRuntime:
    """The few CuPy runtime calls the backend makes. Events complete when `complete` says so."""

    CUDARuntimeError = FakeCudaError
    eventDisableTiming = 2

    def __init__(self, complete=True):
        self.complete = complete
        self.created = 0
        self.recorded = []
        self.capturing = set()
        self.synced = []
        self.device = 0

    def getDevice(self):
        return self.device

    def setDevice(self, device):
        self.device = device

    def eventCreateWithFlags(self, flags):
        self.created += 1
        return 1000 + self.created

    def eventRecord(self, event, stream):
        self.recorded.append((event, stream))

    def eventQuery(self, event):
        if self.complete:
            return 0
        raise FakeCudaError(600)

    def eventDestroy(self, event):
        pass

    def streamIsCapturing(self, stream):
        return stream in self.capturing

    def streamSynchronize(self, stream):
        self.synced.append(stream)


class FakeLib:
    """Records NCCL calls; `hang` makes ncclAllReduce block until ncclCommAbort."""

    version = (2, 32, 3)

    def __init__(self, fp8=True, alltoall=True):
        self.fp8 = fp8
        self.alltoall = alltoall
        self.calls = []
        self.async_error = 0
        self.hang = False
        self.unblock = threading.Event()
        for name in ("ncclBroadcast", "ncclReduce", "ncclAllGather", "ncclReduceScatter", "ncclAlltoAll",
                     "ncclSend", "ncclRecv", "ncclGroupStart", "ncclGroupEnd", "ncclCommFinalize",
                     "ncclCommDestroy"):
            setattr(self, name, self._recorder(name))

    def _recorder(self, name):
        def call(*args):
            self.calls.append((name, args))
            return 0
        return call

    def has(self, name):
        return name != "ncclAlltoAll" or self.alltoall

    def names(self):
        return [name for name, _ in self.calls]

    def ncclAllReduce(self, *args):
        self.calls.append(("ncclAllReduce", args))
        if self.hang:
            self.unblock.wait(10)
        return 0

    def ncclCommAbort(self, comm):
        self.calls.append(("ncclCommAbort", (comm,)))
        self.unblock.set()
        return 0

    def ncclCommGetAsyncError(self, comm, status):
        status._obj.value = self.async_error
        return 0


COMM, STREAM = 0xC0, 0x5EA


def make(lib=None, rt=None, rank=1, size=4, timeout=0.0):
    from fp4ccl.backends.nccl import NcclBackend
    return NcclBackend._from_handle(lib or FakeLib(), COMM, rank, size, 0, rt or FakeRuntime(), 0xBA, timeout)


def arr(dtype, n, ptr=0x1000):
    return ArrayInfo(None, "cupy", ptr, (n,), dtype, 0, True)


def wait_until(pred, seconds=10.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_backend_passes_counts_dtypes_and_ops_through():
    lib = FakeLib()
    b = make(lib)
    b.all_reduce(arr("bfloat16", 6), arr("bfloat16", 6, 0x2000), "avg", STREAM)
    b.reduce_scatter(arr("float32", 8), arr("float32", 2, 0x2000), "max", STREAM)
    b.all_gather(arr("int16", 3), arr("int16", 12, 0x2000), STREAM)        # as bytes: count doubles
    b.broadcast(arr("bool", 5), arr("bool", 5, 0x2000), 2, STREAM)
    b.reduce(arr("float16", 4), None, "prod", 0, STREAM)                   # non-root: no recv buffer
    b.send(arr("float8_e4m3fn", 7), 3, STREAM)
    b.all_to_all(arr("int64", 8), arr("int64", 8, 0x2000), STREAM)
    assert lib.calls == [
        ("ncclAllReduce", (0x1000, 0x2000, 6, 9, 4, COMM, STREAM)),
        ("ncclReduceScatter", (0x1000, 0x2000, 2, 7, 2, COMM, STREAM)),
        ("ncclAllGather", (0x1000, 0x2000, 6, 1, COMM, STREAM)),
        ("ncclBroadcast", (0x1000, 0x2000, 5, 1, 2, COMM, STREAM)),
        ("ncclReduce", (0x1000, 0x1000, 4, 6, 1, 0, COMM, STREAM)),
        ("ncclSend", (0x1000, 7, 10, 3, COMM, STREAM)),
        ("ncclAlltoAll", (0x1000, 0x2000, 2, 4, COMM, STREAM)),
    ]


def test_all_to_all_without_ncclAlltoAll_is_a_group_of_send_recv_pairs():
    lib = FakeLib(alltoall=False)
    b = make(lib, size=4)
    b.all_to_all(arr("float32", 8), arr("float32", 8, 0x2000), STREAM)
    assert lib.names() == ["ncclGroupStart"] + ["ncclSend", "ncclRecv"] * 4 + ["ncclGroupEnd"]
    sends = [args for name, args in lib.calls if name == "ncclSend"]
    recvs = [args for name, args in lib.calls if name == "ncclRecv"]
    assert [s[0] for s in sends] == [0x1000 + 8 * j for j in range(4)]   # 2 floats per peer
    assert [r[0] for r in recvs] == [0x2000 + 8 * j for j in range(4)]
    assert all(s[1:4] == (2, 7, j) for j, s in enumerate(sends))


def test_fp8_reduction_on_an_old_nccl_is_a_type_error_before_anything_is_enqueued():
    lib = FakeLib(fp8=False)
    b = make(lib)
    for call in (lambda: b.all_reduce(arr("float8_e4m3fn", 4), arr("float8_e4m3fn", 4), "sum", STREAM),
                 lambda: b.reduce_scatter(arr("float8_e5m2", 4), arr("float8_e5m2", 1), "sum", STREAM),
                 lambda: b.reduce(arr("float8_e5m2", 4), None, "max", 0, STREAM)):
        with pytest.raises(TypeError, match="fp8"):
            call()
    assert lib.calls == []
    b.all_gather(arr("float8_e4m3fn", 4), arr("float8_e4m3fn", 16), STREAM)
    assert lib.calls[0][1][3] == 1  # moved as uint8


def test_groups_nest_and_barrier_syncs_the_stream():
    lib, rt = FakeLib(), FakeRuntime()
    b = make(lib, rt)
    b.group_start()
    b.group_start()
    with pytest.raises(RuntimeError, match="inside a group"):
        b.barrier(STREAM)
    b.group_end()
    b.group_end()
    with pytest.raises(RuntimeError, match="without a matching"):
        b.group_end()
    b.barrier(STREAM)
    assert lib.names() == ["ncclGroupStart"] * 2 + ["ncclGroupEnd"] * 2 + ["ncclAllReduce"]
    assert lib.calls[-1][1] == (0xBA, 0xBA, 1, 7, 0, COMM, STREAM)
    assert rt.synced == [STREAM]


def test_destroy_and_abort_are_idempotent_and_kept_apart():
    lib = FakeLib()
    b = make(lib)
    b.destroy()
    b.destroy()
    b.abort()
    assert lib.names() == ["ncclCommFinalize", "ncclCommDestroy"]
    assert lib.calls[0][1] == (COMM,)
    with pytest.raises(CommClosedError, match="destroyed"):
        b.all_gather(arr("float32", 1), arr("float32", 4), STREAM)

    lib = FakeLib()
    b = make(lib)
    b.abort()
    b.abort()
    b.destroy()
    assert lib.names() == ["ncclCommAbort"]
    with pytest.raises(CommClosedError, match="aborted"):
        b.group_start()


def test_watchdog_is_quiet_while_collectives_complete():
    lib, rt = FakeLib(), FakeRuntime(complete=True)
    b = make(lib, rt, timeout=0.1)
    for _ in range(50):
        b.all_reduce(arr("float32", 4), arr("float32", 4), "sum", STREAM)
        time.sleep(0.005)
    assert wait_until(lambda: not b._pending, 5)
    time.sleep(0.3)
    assert not b.closed and b.failure is None
    assert rt.created < 50  # events are recycled, not made per call
    b.destroy()
    assert not b._thread.is_alive()
    assert "ncclCommAbort" not in lib.names()


def test_watchdog_aborts_a_collective_that_never_completes_and_names_it():
    lib, rt = FakeLib(), FakeRuntime(complete=False)
    b = make(lib, rt, rank=2, size=4, timeout=0.2)
    b.all_gather(arr("float32", 1), arr("float32", 4), STREAM)
    b.all_reduce(arr("float32", 4), arr("float32", 4), "sum", STREAM)
    assert wait_until(lambda: b.closed)
    assert lib.names().count("ncclCommAbort") == 1
    with pytest.raises(CommTimeoutError) as info:
        b.all_reduce(arr("float32", 4), arr("float32", 4), "sum", STREAM)
    err = info.value
    assert (err.call, err.seq, err.rank) == ("all_gather", 1, 2)  # the oldest outstanding call
    assert "all_gather (call #1)" in str(err) and "rank 2 of 4" in str(err) and "FP4CCL_TIMEOUT" in str(err)
    b.abort()
    b.destroy()
    assert lib.names().count("ncclCommAbort") == 1


def test_watchdog_reports_an_async_error():
    lib, rt = FakeLib(), FakeRuntime(complete=False)
    b = make(lib, rt, rank=0, timeout=30)
    b.broadcast(arr("float32", 4), arr("float32", 4), 0, STREAM)
    lib.async_error = 6
    assert wait_until(lambda: b.closed)
    with pytest.raises(CommTimeoutError, match=r"ncclRemoteError .*broadcast|broadcast.*ncclRemoteError"):
        b.barrier(STREAM)


def test_watchdog_unblocks_a_host_call_stuck_inside_nccl(monkeypatch):
    from fp4ccl.backends import nccl as backend_mod
    monkeypatch.setattr(backend_mod, "_ABORT_LOCK_WAIT", 0.1)
    lib, rt = FakeLib(), FakeRuntime(complete=True)
    lib.hang = True
    b = make(lib, rt, timeout=0.2)
    stuck = threading.Thread(target=b.all_reduce,
                             args=(arr("float32", 4), arr("float32", 4), "sum", STREAM), daemon=True)
    stuck.start()
    stuck.join(10)
    assert not stuck.is_alive(), "ncclCommAbort should have released the blocked call"
    with pytest.raises(CommTimeoutError, match=r"did not return from NCCL.*|all_reduce \(call #1\)"):
        b.send(arr("float32", 4), 0, STREAM)
    assert b.failure.call == "all_reduce" and b.failure.seq == 1


def test_watchdog_tracks_a_group_once_per_stream_and_skips_captures():
    lib, rt = FakeLib(), FakeRuntime(complete=False)
    b = make(lib, rt, timeout=0.3)
    rt.capturing.add(0xCA)
    b.all_gather(arr("float32", 1), arr("float32", 4), 0xCA)       # captured: not tracked
    assert rt.recorded == []
    b.group_start()
    b.broadcast(arr("float32", 4), arr("float32", 4), 0, STREAM)
    b.broadcast(arr("float32", 4), arr("float32", 4), 1, STREAM)
    b.all_gather(arr("float32", 1), arr("float32", 4), 0x777)
    assert rt.recorded == []                                        # nothing runs before group_end
    b.group_end()
    assert sorted(s for _, s in rt.recorded) == sorted([STREAM, 0x777])
    assert wait_until(lambda: b.closed)
    with pytest.raises(CommTimeoutError, match=r"group\(broadcast x2, all_gather; calls #2-#4\)"):
        b.all_reduce(arr("float32", 4), arr("float32", 4), "sum", STREAM)


def test_timeout_env_is_validated(monkeypatch):
    """One parser for FP4CCL_TIMEOUT: each layer's unset default, junk and negatives named."""
    from fp4ccl._timeout import env_timeout
    monkeypatch.setenv("FP4CCL_TIMEOUT", "2.5")
    assert env_timeout(unset=0.0) == 2.5
    monkeypatch.setenv("FP4CCL_TIMEOUT", "0")
    assert env_timeout(unset=600.0) == 0.0
    monkeypatch.setenv("FP4CCL_TIMEOUT", " ")
    assert env_timeout(unset=0.0) == 0.0
    assert env_timeout(unset=600.0) == 600.0
    for junk in ("soon", "30s", "-1", "nan"):
        monkeypatch.setenv("FP4CCL_TIMEOUT", junk)
        with pytest.raises(ValueError, match="FP4CCL_TIMEOUT"):
            env_timeout(unset=0.0)



def test_the_watchdog_thread_polls_in_relaxed_capture_mode(monkeypatch, caplog):
    """The watchdog's event polls must not count against a caller's global-mode CUDA-graph capture: its
    thread swaps itself into relaxed mode (CU_STREAM_CAPTURE_MODE_RELAXED = 2) through the driver."""
    from fp4ccl.backends import nccl as backend
    seen = []

    def exchange(mode_ptr):   # cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode*)
        seen.append(ctypes.cast(mode_ptr, ctypes.POINTER(ctypes.c_int)).contents.value)
        return 0
    monkeypatch.setattr(backend._cuda, "driver_function",
                        lambda name, argtypes: exchange if name == "cuThreadExchangeStreamCaptureMode" else None)
    backend._relax_capture_mode()
    assert seen == [2]

    def missing(name, argtypes):
        raise OSError("libcuda.so.1: cannot open shared object file")
    monkeypatch.setattr(backend._cuda, "driver_function", missing)
    with caplog.at_level("INFO", logger="fp4ccl"):
        backend._relax_capture_mode()     # no driver: says so, and the watchdog goes on without it
    assert "can invalidate a CUDA-graph capture" in caplog.text
