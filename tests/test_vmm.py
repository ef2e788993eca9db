"""CPU checks of the VMM sharing path: the descriptor exchange between ranks, the mode switch, and
that a machine without a CUDA driver reports VMM unsupported (the GPU path is in tests/gpu)."""
import os
import threading

import pytest

from fp4ccl import symmetric, vmm


def _exchange_in_threads(world: int, prefix: str):
    """Every 'rank' (a thread) sends the read end of its own pipe; returns what each received."""
    pipes = [os.pipe() for _ in range(world)]
    exchanges = [vmm.FdExchange(prefix, r, world, timeout=10.0) for r in range(world)]
    for x in exchanges:
        x.bind()                       # every rank bound before any sends (the host exchange orders it)
    results, errors = [None] * world, []

    def run(r):
        try:
            results[r] = exchanges[r].exchange(pipes[r][0])
        except Exception as err:  # noqa: BLE001 - reported to the test below
            errors.append((r, err))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for x in exchanges:
        x.close()
    return pipes, results, errors


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_rank_receives_every_descriptor(world):
    prefix = f"fp4ccl-test-{os.getpid()}-{world}"
    pipes, results, errors = _exchange_in_threads(world, prefix)
    assert not errors, errors
    try:
        for r, fds in enumerate(results):
            assert len(fds) == world and fds[r] == pipes[r][0]
            for p, fd in enumerate(fds):
                if p == r:
                    continue
                # a received descriptor is a new number for the same pipe: what p writes, r reads
                assert fd != pipes[p][0]
                os.write(pipes[p][1], b"%d->%d" % (p, r))
                assert os.read(fd, 64) == b"%d->%d" % (p, r)
    finally:
        for r, fds in enumerate(results):
            for p, fd in enumerate(fds or []):
                if p != r:
                    os.close(fd)
        for a, b in pipes:
            os.close(a)
            os.close(b)


def test_a_missing_peer_times_out():
    x = vmm.FdExchange(f"fp4ccl-test-{os.getpid()}-lonely", 0, 2, timeout=0.2)
    y = vmm.FdExchange(f"fp4ccl-test-{os.getpid()}-lonely", 1, 2, timeout=0.2)
    x.bind()
    y.bind()       # bound but never sends
    r, w = os.pipe()
    try:
        with pytest.raises(OSError):   # socket.timeout is an OSError
            x.exchange(r)
    finally:
        x.close()
        y.close()
        os.close(r)
        os.close(w)


def test_alloc_mode_is_validated(monkeypatch):
    monkeypatch.delenv("FP4CCL_SYMM_ALLOC", raising=False)
    assert symmetric.alloc_mode() == "auto"
    for mode in ("vmm", "IPC", "auto"):
        monkeypatch.setenv("FP4CCL_SYMM_ALLOC", mode)
        assert symmetric.alloc_mode() == mode.lower()
    monkeypatch.setenv("FP4CCL_SYMM_ALLOC", "malloc")
    with pytest.raises(ValueError, match="FP4CCL_SYMM_ALLOC='malloc' is not one of auto, vmm, ipc"):
        symmetric.alloc_mode()


def test_no_driver_means_unsupported():
    try:
        import ctypes
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        assert vmm.supported(0) is False
    else:
        pytest.skip("this machine has a CUDA driver; tests/gpu/test_symmetric.py covers VMM there")


class _Votes:
    """An exchange whose peers answer with fixed votes (rank 0 is us)."""

    def __init__(self, peers):
        self.peers, self.calls = peers, 0

    def all_gather_bytes(self, data):
        self.calls += 1
        return [bytes(data)] + list(self.peers)


def _buffer(world, peers):
    buf = symmetric.SymmetricBuffer.__new__(symmetric.SymmetricBuffer)
    buf.world, buf.device, buf.rank = world, 0, 0

    class Comm:
        _exchange = _Votes(peers)
    buf.comm = Comm
    return buf


def test_every_rank_must_support_vmm_for_it_to_be_used(monkeypatch):
    monkeypatch.setattr(vmm, "supported", lambda device: True)
    monkeypatch.delenv("FP4CCL_SYMM_ALLOC", raising=False)
    buf = _buffer(3, [b"1:bbbb", b"1:cccc"])
    assert buf._agree_on_vmm() is True and buf.kind == "vmm"
    assert buf._fd_prefix.startswith("fp4ccl-symm-") and len(buf._fd_prefix) > len("fp4ccl-symm-")
    # one rank without support: everyone falls back to IPC under auto ...
    buf = _buffer(3, [b"1:bbbb", b"0:cccc"])
    assert buf._agree_on_vmm() is False and buf.kind == "ipc"
    # ... and raises everywhere, naming it, when VMM was asked for
    monkeypatch.setenv("FP4CCL_SYMM_ALLOC", "vmm")
    buf = _buffer(3, [b"1:bbbb", b"0:cccc"])
    with pytest.raises(symmetric.SymmetricMemoryUnavailable, match=r"ranks \[2\] cannot export"):
        buf._agree_on_vmm()


def test_ipc_mode_and_one_rank_skip_the_vote(monkeypatch):
    monkeypatch.setattr(vmm, "supported", lambda device: True)
    monkeypatch.setenv("FP4CCL_SYMM_ALLOC", "ipc")
    buf = _buffer(2, [b"1:bbbb"])
    assert buf._agree_on_vmm() is False and buf.comm._exchange.calls == 0
    monkeypatch.setenv("FP4CCL_SYMM_ALLOC", "auto")
    buf = _buffer(1, [])
    assert buf._agree_on_vmm() is False and buf.comm._exchange.calls == 0
