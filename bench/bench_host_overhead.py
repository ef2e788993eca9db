"""fp4ccl's own host cost per call: validation, output allocation, stream lookup and dispatch.

    python bench/bench_host_overhead.py [-n 20000] [-r 7] [-j out.json] [--compare before.json]

The backend is a stand-in whose methods return at once, so what is timed is fp4ccl's Python alone,
on CPU torch tensors and numpy arrays (no GPU needed): what a real backend call (ncclAllReduce
through ctypes, ~9 µs on the 4 x H200 machine) comes on top of. Each row is the median over -r
repeats of the mean time of -n back-to-back calls. The `vcoll` rows drive NcclVariable's grouped
algorithms ("bcast" / "reduce") over no-op NCCL primitives: the per-call Python of the v-collectives
that needs no GPU. The `nccl backend` rows time NcclBackend's own Python around an NCCL function
that returns at once (a real call adds ctypes' argument conversion and NCCL's enqueue). `--compare` prints a before/after column against a JSON written by -j (e.g.
from an older checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp4ccl.bootstrap.exchange import Exchange  # noqa: E402
from fp4ccl.communicator import Communicator  # noqa: E402


class FakeExchange(Exchange):
    """Rank 0 of `size` ranks; never talks to anyone (the timed calls always pass sizes)."""

    def __init__(self, size: int):
        self.rank, self.size = 0, size

    def all_gather_bytes(self, data):
        return [bytes(data)] * self.size

    def broadcast_bytes(self, data, root):
        return bytes(data or b"")

    def barrier(self):
        pass


class NullBackend:
    """The backend interface with every method a no-op: the host backend's name, so CPU arrays pass."""

    name = "host"
    device = None

    def __init__(self):
        self._depth = 0

    def all_reduce(self, send, recv, op, stream): pass
    def broadcast(self, send, recv, root, stream): pass
    def reduce(self, send, recv, op, root, stream): pass
    def all_gather(self, send, recv, stream): pass
    def reduce_scatter(self, send, recv, op, stream): pass
    def all_to_all(self, send, recv, stream): pass
    def all_gatherv(self, send, recv, counts, stream): pass
    def reduce_scatterv(self, send, recv, counts, op, stream): pass
    def send(self, buf, peer, stream): pass
    def recv(self, buf, peer, stream): pass

    def group_start(self):
        self._depth += 1

    def group_end(self):
        self._depth -= 1

    def barrier(self, stream): pass
    def destroy(self): pass
    def abort(self): pass


def per_call_us(fn, n: int, repeats: int) -> float:
    for _ in range(min(n, 1000)):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def cases(size: int):
    comm = Communicator(NullBackend(), FakeExchange(size))
    sizes = [5 + (r % 2) for r in range(size)]
    x_np = np.ones(4, np.float32)
    o_np = np.empty(4, np.float32)
    g_np = np.empty(4 * size, np.float32)
    v_np = np.ones((sizes[0], 8), np.float32)
    yield "numpy  all_reduce", lambda: comm.all_reduce(x_np)
    yield "numpy  all_reduce out=", lambda: comm.all_reduce(x_np, out=o_np)
    yield "numpy  all_gather out=", lambda: comm.all_gather(x_np, out=g_np)
    yield "numpy  all_gatherv sizes=", lambda: comm.all_gatherv(v_np, sizes)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        x_t = torch.ones(4)
        o_t = torch.empty(4)
        g_t = torch.empty(4 * size)
        b_t = torch.ones(4, dtype=torch.bfloat16)
        yield "torch  all_reduce", lambda: comm.all_reduce(x_t)
        yield "torch  all_reduce out=", lambda: comm.all_reduce(x_t, out=o_t)
        yield "torch  all_reduce bf16 out=x", lambda: comm.all_reduce(b_t, out=b_t)
        yield "torch  all_gather", lambda: comm.all_gather(x_t)
        yield "torch  all_gather out=", lambda: comm.all_gather(x_t, out=g_t)
        yield "torch  broadcast out=x", lambda: comm.broadcast(x_t, 0, out=x_t)

    # The v-collectives' own dispatch over no-op NCCL primitives (grouped forms: no GPU copies).
    from fp4ccl import _arrays
    from fp4ccl.vcollectives import NcclVariable
    v = NcclVariable.__new__(NcclVariable)
    v.backend, v.rank, v.size, v.workspace, v.comm = NullBackend(), 0, size, None, None  # comm: NCCL algorithms only
    # Uneven enough that every version of choose() picks the grouped form at this size.
    counts = [1 << 10] + [1] * (size - 1)
    send = _arrays.describe(np.ones(counts[0], np.float32))
    recv = _arrays.describe(np.empty(sum(counts), np.float32))
    full = _arrays.describe(np.ones(sum(counts), np.float32))
    mine = _arrays.describe(np.empty(counts[0], np.float32))
    yield "vcoll  all_gatherv (bcast)", lambda: v.all_gatherv(send, recv, counts, 0)
    yield "vcoll  reduce_scatterv (reduce)", lambda: v.reduce_scatterv(full, mine, counts, "sum", 0)

    # The NCCL backend's own per-call Python (dtype map, lock, sequence number) over NCCL functions
    # that return success at once; the real call through ctypes comes on top.
    be = nccl_backend_over_noop_lib()
    info = _arrays.describe(np.ones(4, np.float32))
    gathered = _arrays.describe(np.empty(4 * size, np.float32))
    yield "nccl backend all_reduce (no-op NCCL)", lambda: be.all_reduce(info, info, "sum", 0)
    yield "nccl backend all_gather (no-op NCCL)", lambda: be.all_gather(info, gathered, 0)


class _NoopLib:
    """Just what NcclBackend._attach reads from an NcclLibrary, every function a successful no-op."""

    version = (2, 28, 9)
    fp8 = True

    def __getattr__(self, name):
        if name.startswith("nccl"):
            return _noop
        raise AttributeError(name)

    def has(self, name):
        return True


def _noop(*args):
    return 0


class _NoRuntime:
    CUDARuntimeError = RuntimeError


def nccl_backend_over_noop_lib():
    from fp4ccl.backends.nccl import NcclBackend
    return NcclBackend._from_handle(_NoopLib(), 1, 0, size=4, device=0, runtime=_NoRuntime(), barrier_ptr=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--calls", type=int, default=20000)
    p.add_argument("-r", "--repeats", type=int, default=7)
    p.add_argument("-s", "--size", type=int, default=4, help="world size the stand-in pretends (default 4)")
    p.add_argument("-j", "--json", help="write the results here")
    p.add_argument("--compare", help="a JSON from an earlier run: print it as the 'before' column")
    a = p.parse_args(argv)
    before = {}
    if a.compare:
        with open(a.compare) as fh:
            before = json.load(fh)["us_per_call"]
    os.environ.pop("FP4CCL_ALGO", None)
    results = {}
    print(f"# fp4ccl host overhead per call, stand-in backend (no-op), world size {a.size}, "
          f"median of {a.repeats} x {a.calls} calls")
    head = f"# {'case':<38} {'us/call':>9}"
    print(head + (f" {'before':>9} {'saved':>8}" if before else ""))
    for name, fn in cases(a.size):
        us = per_call_us(fn, a.calls, a.repeats)
        results[name] = us
        line = f"  {name:<38} {us:9.2f}"
        if name in before:
            line += f" {before[name]:9.2f} {before[name] - us:8.2f}"
        print(line, flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"us_per_call": results, "calls": a.calls, "repeats": a.repeats, "size": a.size}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
