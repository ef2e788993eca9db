"""The NVRTC disk cache (fp4ccl/jit.py) with NVRTC mocked: where it lives, what happens when it cannot
be used, and what a damaged entry does. No GPU, no CuPy needed."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from fp4ccl import jit


class FakeNvrtc:
    @staticmethod
    def getSupportedArchs():
        return (75, 80, 90, 100)

    @staticmethod
    def getVersion():
        return (13, 0)


@pytest.fixture
def nvrtc(monkeypatch):
    """NVRTC replaced: compile_source returns a payload per call and records the calls."""
    calls = []

    def compile_source(name, arch, kind="cubin"):
        calls.append((name, arch, kind))
        return f"{kind}:{name}:sm_{arch}:#{len(calls)}".encode() * 100

    monkeypatch.setattr(jit, "_nvrtc", lambda: FakeNvrtc)
    monkeypatch.setattr(jit, "compile_source", compile_source)
    monkeypatch.setattr(jit, "_uncached", {})
    monkeypatch.setattr(jit, "_warned_dirs", set())
    for var in ("FP4CCL_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    return calls


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def warnings_logged():
    """fp4ccl.jit's records at WARNING and above (its logger does not propagate to caplog's root handler)."""
    logger = logging.getLogger("fp4ccl.jit")
    handler = _Records()
    logger.addHandler(handler)
    yield lambda: [r for r in handler.records if r.levelno >= logging.WARNING]
    logger.removeHandler(handler)


def cached_files(d: Path):
    return sorted(p for p in d.iterdir() if p.suffix in (".cubin", ".ptx"))


# -- where the cache is ------------------------------------------------------------------------------

def test_cache_dir_expands_a_tilde_and_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("FP4CCL_CACHE_DIR", "~/c")
    assert jit.cache_dir() == tmp_path / "home" / "c"
    monkeypatch.delenv("FP4CCL_CACHE_DIR")
    assert jit.cache_dir() == tmp_path / "home" / ".cache" / "fp4ccl"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.cache_dir() == tmp_path / "xdg" / "fp4ccl"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")      # invalid per the XDG spec: ignored
    assert jit.cache_dir() == tmp_path / "home" / ".cache" / "fp4ccl"
    monkeypatch.setenv("FP4CCL_CACHE_DIR", str(tmp_path / "explicit"))   # the variable wins over XDG
    assert jit.cache_dir() == tmp_path / "explicit"


def test_a_tilde_cache_dir_is_used_expanded(nvrtc, monkeypatch, tmp_path):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")                   # where a literal "~" directory would appear
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FP4CCL_CACHE_DIR", "~/kc")
    jit.compiled_binary("fp4.cu", 90)
    assert len(cached_files(tmp_path / "kc")) == 1
    assert not (tmp_path / "cwd" / "~").exists()


# -- a cache that cannot be used --------------------------------------------------------------------

@pytest.mark.parametrize("where", ["proc", "a-file", "file-parent"])
def test_unusable_cache_dir_warns_once_and_compiles_in_memory(nvrtc, monkeypatch, tmp_path, warnings_logged, where):
    if where == "proc":
        bad = Path("/proc/fp4")                 # mkdir fails even for root
    elif where == "a-file":
        bad = tmp_path / "plain-file"
        bad.write_text("not a directory")
    else:
        (tmp_path / "f").write_text("")
        bad = tmp_path / "f" / "cache"
    monkeypatch.setenv("FP4CCL_CACHE_DIR", str(bad))
    first = jit.compiled_binary("fp4.cu", 90)
    assert first.startswith(b"cubin:fp4.cu:sm_90")
    assert jit.compiled_binary("fp4.cu", 90) == first        # compiled once per process
    jit.compiled_binary("symm.cu", 90)
    assert [c[0] for c in nvrtc] == ["fp4.cu", "symm.cu"]
    warned = warnings_logged()
    assert len(warned) == 1, [r.getMessage() for r in warned]  # one warning, not one per kernel
    text = warned[0].getMessage()
    assert "FP4CCL_CACHE_DIR" in text and str(bad) in text


def test_read_only_home_does_not_break_the_kernels(nvrtc, monkeypatch, tmp_path, warnings_logged):
    monkeypatch.setenv("HOME", "/proc/self/fdinfo")        # no ~/.cache can be made there
    assert jit.compiled_binary("fp4.cu", 100).startswith(b"cubin:fp4.cu:sm_100")
    (warned,) = warnings_logged()
    assert "/proc/self/fdinfo/.cache/fp4ccl" in warned.getMessage() and "FP4CCL_CACHE_DIR" in warned.getMessage()


def test_a_failed_cache_write_still_returns_the_kernel(nvrtc, monkeypatch, tmp_path, warnings_logged):
    monkeypatch.setenv("FP4CCL_CACHE_DIR", str(tmp_path))

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jit, "_atomic_write", full_disk)
    binary = jit.compiled_binary("fp4.cu", 90)
    assert binary.startswith(b"cubin:fp4.cu:sm_90") and jit.compiled_binary("fp4.cu", 90) == binary
    assert len(nvrtc) == 1
    (warned,) = warnings_logged()
    assert "No space left" in warned.getMessage() and str(tmp_path) in warned.getMessage()


def test_a_missing_source_is_not_mistaken_for_a_cache_problem(monkeypatch, tmp_path, warnings_logged):
    monkeypatch.setattr(jit, "_nvrtc", lambda: FakeNvrtc)
    monkeypatch.setenv("FP4CCL_CACHE_DIR", str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="no CUDA source 'nope.cu'"):
        jit.compiled_binary("nope.cu", 90)
    assert not warnings_logged()


def test_a_usable_cache_is_written_and_read_back(nvrtc, monkeypatch, tmp_path, warnings_logged):
    monkeypatch.setenv("FP4CCL_CACHE_DIR", str(tmp_path / "deep" / "cache"))
    binary = jit.compiled_binary("fp4.cu", 90)
    assert jit.compiled_binary("fp4.cu", 90) == binary and len(nvrtc) == 1
    (entry,) = cached_files(tmp_path / "deep" / "cache")
    assert "sm90" in entry.name
    assert not warnings_logged()


# -- damaged entries ---------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "one-byte-flipped", "headerless", "appended"])
def test_a_damaged_entry_is_recompiled_and_replaced(nvrtc, monkeypatch, tmp_path, warnings_logged, damage):
    monkeypatch.setenv("FP4CCL_CACHE_DIR", str(tmp_path))
    good = jit.compiled_binary("fp4.cu", 90)
    (entry,) = cached_files(tmp_path)
    blob = entry.read_bytes()
    damaged = {
        "garbage": b"\x7fELF not really a cubin" * 7,
        "empty": b"",
        "truncated": blob[:len(blob) // 2],
        "one-byte-flipped": blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:],
        "headerless": good,                                  # what fp4ccl wrote before the header existed
        "appended": blob + b"\0",
    }[damage]
    entry.write_bytes(damaged)
    again = jit.compiled_binary("fp4.cu", 90)
    assert len(nvrtc) == 2 and again.endswith(b"#2")          # recompiled, not handed to the loader
    assert cached_files(tmp_path) == [entry] and entry.read_bytes() != damaged
    assert jit.compiled_binary("fp4.cu", 90) == again and len(nvrtc) == 2   # the rewrite is read back
    (warned,) = warnings_logged()
    assert str(entry) in warned.getMessage() and "damaged" in warned.getMessage()


def test_entries_carry_a_header_that_round_trips():
    payload = bytes(range(256)) * 3
    blob = jit._pack(payload)
    assert blob.endswith(payload) and len(blob) > len(payload)
    assert jit._unpack(blob) == (payload, "")
    assert jit._unpack(b"")[0] is None and jit._unpack(payload)[0] is None


# -- permissions -------------------------------------------------------------------------------------

@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002], ids=oct)
def test_entries_are_readable_by_others_as_the_umask_allows(nvrtc, monkeypatch, tmp_path, umask, mask):
    monkeypatch.setenv("FP4CCL_CACHE_DIR", str(tmp_path / "shared" / "cache"))
    umask(mask)
    jit.compiled_binary("fp4.cu", 90)
    (entry,) = cached_files(tmp_path / "shared" / "cache")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o644 & ~mask          # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "shared" / "cache" / ".lock").stat().st_mode) == 0o666 & ~mask
    for d in (tmp_path / "shared", tmp_path / "shared" / "cache"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    assert not [p for p in entry.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_lock_file_this_user_cannot_write_is_locked_read_only(nvrtc, monkeypatch, tmp_path):
    monkeypatch.setenv("FP4CCL_CACHE_DIR", str(tmp_path))
    (tmp_path / ".lock").touch()
    real_open = os.open

    def as_another_users_file(path, flags, mode=0o777):
        if str(path).endswith(".lock") and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(path))      # root could write it anyway
        return real_open(path, flags, mode)

    monkeypatch.setattr(jit.os, "open", as_another_users_file)
    assert jit.compiled_binary("fp4.cu", 90).startswith(b"cubin:") and len(cached_files(tmp_path)) == 1


def test_no_home_directory_compiles_in_memory(nvrtc, warnings_logged, monkeypatch):
    """No FP4CCL_CACHE_DIR, no XDG_CACHE_HOME and no home directory to default to: one warning, then the
    kernel compiled once per process and kept in memory."""
    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    first = jit.compiled_binary("fp4.cu", 90)
    assert jit.compiled_binary("fp4.cu", 90) == first and len(nvrtc) == 1
    logged = [r.getMessage() for r in warnings_logged()]
    assert len(logged) == 1 and "~/.cache/fp4ccl" in logged[0] and "FP4CCL_CACHE_DIR" in logged[0], logged
