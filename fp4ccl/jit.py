"""Run-time compilation of `csrc/*.cu` through NVRTC (via CuPy), with a disk cache.

A compiled module is cached under `FP4CCL_CACHE_DIR` (default `$XDG_CACHE_HOME/fp4ccl`, else
`~/.cache/fp4ccl`) keyed by the fp4ccl version, the target architecture, the NVRTC version, the compile
options and a hash of every source in csrc/ (a change to an included .cuh must invalidate too). Writers
take an fcntl lock and publish with write-to-temp + os.replace, so concurrent ranks on one node compile
once and never read a torn file; entries carry a checksum, so a damaged one is compiled again, and are
readable by other users as the umask allows (a shared cache directory). A cache that cannot be used
(read-only home, a bad FP4CCL_CACHE_DIR) logs one warning and the kernels are compiled in memory
instead. Nothing here runs at import time: CuPy is imported on first use.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import secrets
import struct
import threading
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

from ._log import get_logger

_log = get_logger("fp4ccl.jit")

# No fast-math: the kernels must round exactly like the numpy reference (IEEE division, no FTZ).
OPTIONS = ("-std=c++17", "--fmad=false", "-default-device")
SOURCE_SUFFIXES = (".cu", ".cuh")

ENV_CACHE_DIR = "FP4CCL_CACHE_DIR"

# A cache entry is a header (magic, payload length, SHA-256 of the payload) and the payload, checked on
# every read: a truncated, emptied or overwritten file is recompiled instead of reaching
# cuModuleLoadData, which would fail with no hint at the cache. The format is also in the key, so entries
# of older fp4ccl versions (no header) are never looked up.
_MAGIC = b"FP4CCLK1"
_HEADER = struct.Struct("<8sQ32s")
_CACHE_FORMAT = "entry-format-1"

_lock = threading.Lock()
_modules: Dict[Tuple[str, int], object] = {}
# Binaries compiled while the disk cache was unusable, so each is compiled once per process, not per load;
# and the directories already warned about (one warning per process, not one per kernel).
_uncached: Dict[str, bytes] = {}
_warned_dirs: Set[str] = set()


def csrc_dir() -> Path:
    """Where the CUDA sources are: the installed package `fp4ccl._csrc`, else `<repo>/csrc`."""
    try:
        spec = importlib.util.find_spec("fp4ccl._csrc")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or ():
            if (Path(loc) / "fp4.cu").is_file():
                return Path(loc)
    repo = Path(__file__).resolve().parent.parent / "csrc"
    if (repo / "fp4.cu").is_file():
        return repo
    raise FileNotFoundError(
        "fp4ccl's CUDA sources were not found: neither the installed package fp4ccl._csrc nor "
        f"{repo} holds fp4.cu (a broken install? reinstall fp4ccl)")


def source_files() -> Dict[str, str]:
    """Every .cu/.cuh in csrc/, name -> text."""
    d = csrc_dir()
    return {p.name: p.read_text() for p in sorted(d.iterdir()) if p.suffix in SOURCE_SUFFIXES}


def cache_dir() -> Path:
    """$FP4CCL_CACHE_DIR (with ~ expanded), else $XDG_CACHE_HOME/fp4ccl, else ~/.cache/fp4ccl."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # the XDG spec says a relative value is invalid and must be ignored
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "fp4ccl"
    return Path.home() / ".cache" / "fp4ccl"


def _nvrtc():
    from cupy_backends.cuda.libs import nvrtc
    return nvrtc


def choose_target(arch: int, supported: Tuple[int, ...]) -> Tuple[str, int]:
    """("cubin", arch) when NVRTC knows the device's arch, else ("ptx", best older arch) for the
    driver to JIT (a GPU newer than the NVRTC in use)."""
    if arch in supported:
        return "cubin", arch
    older = [a for a in supported if a <= arch]
    if not older:
        raise RuntimeError(f"NVRTC supports {supported}, nothing at or below the device's sm_{arch}")
    return "ptx", max(older)


def cache_key(name: str, arch: int, kind: str, nvrtc_version: Tuple[int, int], sources: Dict[str, str]) -> str:
    from . import __version__
    h = hashlib.sha256()
    for part in (_CACHE_FORMAT, __version__, name, str(arch), kind, ".".join(map(str, nvrtc_version)),
                 " ".join(OPTIONS)):
        h.update(part.encode())
        h.update(b"\0")
    for fname, text in sorted(sources.items()):
        h.update(fname.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:40]


@contextlib.contextmanager
def _file_lock(path: Path):
    # Directories and the lock file get the usual modes (umask applied) so a shared cache works for
    # other users; one who may not write the lock file can still flock it through a read-only descriptor
    # (not over NFS, where that fails and the caller falls back to compiling in memory).
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    # Not mkstemp: its files are 0600, which other users of a shared FP4CCL_CACHE_DIR cannot read.
    # 0644 filtered by the umask is what a plain open() would have made.
    # (the pid and 64 random bits make a clash with another writer's name out of reach: one attempt)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def compile_source(name: str, arch: int, kind: str = "cubin") -> bytes:
    """Compile csrc/<name> with NVRTC for sm_<arch>; returns a cubin or PTX. No caching."""
    nvrtc = _nvrtc()
    sources = source_files()
    if name not in sources:
        raise FileNotFoundError(f"no CUDA source {name!r} in {csrc_dir()}")
    # CuPy's binding hands these to nvrtcCreateProgram as C strings: bytes, not str
    headers = tuple(t.encode() for n, t in sources.items() if n.endswith(".cuh"))
    include_names = tuple(n.encode() for n in sources if n.endswith(".cuh"))
    prog = nvrtc.createProgram(sources[name], name, headers, include_names)
    try:
        arch_opt = f"--gpu-architecture={'sm' if kind == 'cubin' else 'compute'}_{arch}"
        try:
            nvrtc.compileProgram(prog, OPTIONS + (arch_opt,))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC failed to compile {name} for sm_{arch}:\n{log}") from exc
        return nvrtc.getCUBIN(prog) if kind == "cubin" else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _cache_unusable(d, exc: BaseException) -> None:
    where = str(d)
    if where not in _warned_dirs:
        _warned_dirs.add(where)
        _log.warning("the CUDA kernel cache %s is unusable (%s: %s); compiling kernels in memory, once per "
                     "process, without caching them. Set %s to a writable directory to cache them", where,
                     type(exc).__name__, exc, ENV_CACHE_DIR)


def _pack(binary: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, len(binary), hashlib.sha256(binary).digest()) + binary


def _unpack(blob: bytes) -> Tuple[Optional[bytes], str]:
    """(payload, "") for an intact entry, else (None, what is wrong with it)."""
    if len(blob) < _HEADER.size:
        return None, f"{len(blob)} bytes, shorter than its header"
    magic, length, digest = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        return None, "no fp4ccl cache header"
    payload = blob[_HEADER.size:]
    if len(payload) != length:
        return None, f"{len(payload)} bytes of payload where the header says {length}"
    if hashlib.sha256(payload).digest() != digest:
        return None, "checksum mismatch"
    return payload, ""


def _read_cached(path: Path, report: bool = False) -> Optional[bytes]:
    """The cached binary, or None when there is none or it is damaged (logged when `report`).
    OSErrors other than 'not there' propagate."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    binary, problem = _unpack(blob)
    if binary is None and report:
        _log.warning("cached kernel %s is damaged (%s); recompiling it", path, problem)
    return binary


def compiled_binary(name: str, arch: int) -> bytes:
    """The cubin (or PTX) for csrc/<name> on sm_<arch>, from the disk cache or compiled into it.

    A cache directory that cannot be created, locked, read or written (a read-only $HOME, a bad
    FP4CCL_CACHE_DIR) costs one warning and a compile per process, never the kernel."""
    nvrtc = _nvrtc()
    kind, target = choose_target(arch, tuple(nvrtc.getSupportedArchs()))
    sources = source_files()
    key = cache_key(name, target, kind, tuple(nvrtc.getVersion()), sources)
    fname = f"{Path(name).stem}-sm{target}-{key}.{kind}"
    binary = _uncached.get(fname)
    if binary is not None:
        return binary
    try:
        d = cache_dir()
    except RuntimeError as exc:  # Path.home() with no home directory
        d = None
        _cache_unusable("~/.cache/fp4ccl", exc)
    with contextlib.ExitStack() as held:
        if d is not None:
            try:
                binary = _read_cached(d / fname)
                if binary is None:
                    held.enter_context(_file_lock(d / ".lock"))
                    binary = _read_cached(d / fname, report=True)  # another process may have compiled it meanwhile
            except OSError as exc:
                _cache_unusable(d, exc)
                d = None
        if binary is not None:
            return binary
        _log.info("compiling %s for sm_%d (%s)%s", name, target, kind, f" into {d / fname}" if d else "")
        binary = compile_source(name, target, kind)
        if d is not None:
            try:
                _atomic_write(d / fname, _pack(binary))
                return binary
            except OSError as exc:
                _cache_unusable(d, exc)
        _uncached[fname] = binary
        return binary


def load_module(name: str, device: int):
    """The loaded CUDA module (cupy.cuda.function.Module) for csrc/<name> on CUDA device `device`."""
    key = (name, device)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            import cupy
            from cupy.cuda import function
            with cupy.cuda.Device(device):
                binary = compiled_binary(name, _arch_of(device))
                mod = function.Module()
                mod.load(binary)
            _modules[key] = mod
    return mod


def clear_memory_cache() -> None:
    """Forget loaded modules (tests); the disk cache stays."""
    with _lock:
        _modules.clear()


def _arch_of(device: int) -> int:
    import cupy
    cc = cupy.cuda.Device(device).compute_capability  # e.g. "90", "100"
    return int(cc)


__all__ = ["csrc_dir", "source_files", "cache_dir", "cache_key", "choose_target", "compile_source",
           "compiled_binary", "load_module", "clear_memory_cache", "OPTIONS"]
