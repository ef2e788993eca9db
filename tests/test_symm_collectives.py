"""fp4ccl.symm_collectives without a GPU: the choice between symmetric memory and NCCL, the
double-buffered workspace, and the order of steps each algorithm enqueues (over fakes).
The algorithms themselves run in tests/gpu/test_fp4_collectives.py and test_nccl_collectives.py."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from fp4ccl import symm_collectives as sc
from fp4ccl.formats.tensor import packed_layout


class FakeComm:
    def __init__(self, rank=1, size=4, device=0):
        self.rank, self.size, self.device = rank, size, device
        self._extras = {}
        self.failed = None

    def _failed(self, how, err):
        self.failed = (how, err)


class FakeRuntime:
    """The CUDA runtime calls the workspace makes, recorded."""

    def __init__(self):
        self.calls = []

    def streamWaitEvent(self, stream, event, flags):
        self.calls.append(("wait", stream, event))

    def eventRecord(self, event, stream):
        self.calls.append(("record", event, stream))

    def eventDestroy(self, event):
        self.calls.append(("destroy", event))

    def streamIsCapturing(self, stream):
        return stream == 99

    streamCaptureModeRelaxed = 2

    def streamBeginCapture(self, stream, mode):
        self.calls.append(("begin", stream))
        self.capturing = stream

    def streamEndCapture(self, stream):
        self.calls.append(("end", stream))
        self.capturing = None
        return 0x6000

    def graphInstantiate(self, graph):
        self.execs = getattr(self, "execs", 0) + 1
        return 0x7000 + self.execs

    def graphDestroy(self, graph):
        self.calls.append(("graph destroy", graph))

    def graphExecDestroy(self, exe):
        self.calls.append(("exec destroy", exe))

    def graphLaunch(self, exe, stream):
        self.calls.append(("launch", exe, stream))

    def hostAlloc(self, nbytes, flags):
        assert flags == 3   # portable and mapped: the device writes it, the host reads it
        block = ctypes.create_string_buffer(nbytes)
        self.pinned = getattr(self, "pinned", {})
        self.pinned[ctypes.addressof(block)] = block
        return ctypes.addressof(block)

    def freeHost(self, ptr):
        self.calls.append(("free host", ptr))
        del self.pinned[ptr]

    def eventSynchronize(self, event):
        self.calls.append(("sync", event))


class FakeBuffer:
    """A SymmetricBuffer stand-in: rank r's memory starts at (r + 1) << 32."""

    live = []

    def __init__(self, comm, nbytes):
        self.comm, self.nbytes, self.freed, self.barriers = comm, nbytes, False, []
        FakeBuffer.live.append(self)

    @classmethod
    def allocate(cls, comm, shape, dtype, zeroed=False):
        assert dtype == "uint8" and len(shape) == 1
        buf = cls(comm, shape[0])
        buf.zeroed = zeroed
        return buf

    def ptr(self, rank=None):
        r = self.comm.rank if rank is None else rank
        return (r + 1) << 32

    trace = None  # a list to log ("barrier", stream) into, to check where barriers fall among other steps

    signatures = None  # a list to log each barrier's call signature into

    def barrier(self, stream, mode=None, check=None):
        assert mode == "checked"  # replayable in a graph, the same eagerly; compares the call's signature
        sig, report = check
        assert 0 <= sig < 1 << 24 and report
        self.barriers.append(stream)
        if FakeBuffer.trace is not None:
            FakeBuffer.trace.append(("barrier", stream))
        if FakeBuffer.signatures is not None:
            FakeBuffer.signatures.append(sig)

    def free(self):
        self.freed = True


@pytest.fixture
def fakes(monkeypatch):
    rt = FakeRuntime()
    monkeypatch.setattr(sc, "_rt", lambda: rt)
    monkeypatch.setattr(sc._cuda, "instantiate_graph", rt.graphInstantiate)
    import fp4ccl.symmetric as symmetric
    monkeypatch.setattr(symmetric, "SymmetricBuffer", FakeBuffer)
    monkeypatch.setattr(sc, "_new_event", lambda device: 0xE0)
    monkeypatch.setattr(sc, "_new_stream", lambda device: 0xCA)
    monkeypatch.delenv("FP4CCL_SYMM_GRAPHS", raising=False)
    FakeBuffer.live = []
    FakeBuffer.trace = None
    FakeBuffer.signatures = None
    return rt


def test_fp4_algo_env_and_usability(monkeypatch, caplog):
    comm = FakeComm()
    monkeypatch.setattr(sc, "usable", lambda c, s: True)
    monkeypatch.delenv("FP4CCL_FP4_ALGO", raising=False)
    assert sc.fp4_algo(comm, 7) == "symm"
    monkeypatch.setenv("FP4CCL_FP4_ALGO", " NCCL ")
    assert sc.fp4_algo(comm, 7) == "nccl"
    monkeypatch.setenv("FP4CCL_FP4_ALGO", "ring")
    with pytest.raises(ValueError, match="FP4CCL_FP4_ALGO='ring' is not one of symm, nccl"):
        sc.fp4_algo(comm, 7)
    monkeypatch.setattr(sc, "usable", lambda c, s: False)
    monkeypatch.setenv("FP4CCL_FP4_ALGO", "symm")
    with caplog.at_level("INFO", logger="fp4ccl.symm_collectives"):
        assert sc.fp4_algo(comm, 7) == "nccl"
    assert "cannot serve" in caplog.text


def test_usable_needs_two_ranks_a_device_and_no_capture(monkeypatch):
    rt = FakeRuntime()
    monkeypatch.setattr(sc, "_rt", lambda: rt)
    import fp4ccl.symmetric as symmetric
    monkeypatch.setattr(symmetric, "same_node", lambda comm: comm.size != 3)
    assert sc.usable(FakeComm(size=4), 7)
    assert not sc.usable(FakeComm(rank=0, size=1), 7)
    assert not sc.usable(FakeComm(device=None), 7)
    assert not sc.usable(FakeComm(size=4), 99)      # being captured
    assert not sc.usable(FakeComm(size=3), 7)       # spans hosts


def _halves(ws, slot_bytes, stream, key=None, prepared=None):
    got = []
    prepare = (lambda: prepared.append(1)) if prepared is not None else None
    ws.run(slot_bytes, stream, key, lambda s, local, slots: got.append((s, local, slots)), prepare)
    return got


def test_workspace_alternates_halves_and_grows_collectively(fakes):
    rt = fakes
    comm = FakeComm(rank=1, size=3)
    ws = sc.workspace(comm)
    assert sc.workspace(comm) is ws  # cached per communicator
    [(s, local, slots)] = _halves(ws, 1000, 5)
    assert ws.slot == 1024 and FakeBuffer.live[0].nbytes == 2048
    assert s == 5 and local == slots[1] == 2 << 32 and slots == [1 << 32, 2 << 32, 3 << 32]
    [(_, local2, slots2)] = _halves(ws, 600, 6)  # fits: the other half, no new allocation
    assert local2 == (2 << 32) + 1024 and slots2[0] == (1 << 32) + 1024
    assert len(FakeBuffer.live) == 1
    [(_, local3, _)] = _halves(ws, 10, 5)
    assert local3 == 2 << 32  # back to the first half
    assert ws.calls == 3
    assert [c for c in rt.calls if c[0] == "wait"] == [("wait", 5, 0xE0), ("wait", 6, 0xE0), ("wait", 5, 0xE0)]
    _halves(ws, 10, 5)  # the same stream again: stream order suffices, no wait
    assert len([c for c in rt.calls if c[0] == "wait"]) == 3
    assert rt.calls[-1] == ("record", 0xE0, 5)  # every call ends by recording where it ended
    _halves(ws, 1100, 5)  # grows by at least the growth factor, freeing the old buffer first
    assert FakeBuffer.live[0].freed and ws.slot == 1536 and FakeBuffer.live[1].nbytes == 3072
    _halves(ws, 5000, 5)
    assert ws.slot == 5120
    ws.close()
    assert ("destroy", 0xE0) in rt.calls and ws.buf is None


def test_a_call_that_repeats_is_captured_once_per_half_then_replayed(fakes):
    rt = fakes
    ws = sc.workspace(FakeComm(rank=0, size=2))
    key = ("op", 0x100, 0x200)
    prepared = []
    runs = [_halves(ws, 64, 5, key, prepared) for _ in range(6)]
    assert len(prepared) == 4  # before each eager run and each capture, not before a replay
    # calls 1 and 2 (one per half) run eagerly and are remembered; 3 and 4 are captured on our own
    # stream and launched on the caller's; 5 and 6 replay
    assert [r[0][0] for r in runs[:2]] == [5, 5]
    assert [r[0][0] for r in runs[2:4]] == [0xCA, 0xCA] and runs[4:] == [[], []]
    launches = [c for c in rt.calls if c[0] == "launch"]
    assert launches == [("launch", 0x7001, 5), ("launch", 0x7002, 5), ("launch", 0x7001, 5), ("launch", 0x7002, 5)]
    assert [c for c in rt.calls if c[0] in ("begin", "end")] == [("begin", 0xCA), ("end", 0xCA)] * 2
    assert [r[0][1] for r in runs[2:4]] == [1 << 32, (1 << 32) + 256]  # each graph holds its own half
    # a different stream, or a key of None, is another call
    assert _halves(ws, 64, 6, key)[0][0] == 6
    assert _halves(ws, 64, 5, None)[0][0] == 5
    assert _halves(ws, 64, 5, None)[0][0] == 5


def test_graphs_are_dropped_when_the_workspace_grows_and_bounded(fakes, monkeypatch):
    rt = fakes
    ws = sc.workspace(FakeComm(rank=0, size=2))
    for _ in range(4):
        _halves(ws, 64, 5, ("a",))
    assert len(ws._graphs) == 2
    _halves(ws, 1 << 20, 5, ("b",))  # grows: the graphs point into the old buffer
    assert not ws._graphs and list(ws._seen) == [("b", 0, 5)]  # only the call after growing is remembered
    assert {("exec destroy", 0x7001), ("exec destroy", 0x7002)} <= set(rt.calls)
    monkeypatch.setattr(sc, "_GRAPH_CACHE", 3)
    for i in range(4):
        for _ in range(4):
            _halves(ws, 64, 5, ("k", i))
    assert len(ws._graphs) == 3
    monkeypatch.setenv("FP4CCL_SYMM_GRAPHS", "0")
    launched = len([c for c in rt.calls if c[0] == "launch"])
    for _ in range(4):
        assert _halves(ws, 64, 5, ("k", 3))[0][0] == 5
    assert len([c for c in rt.calls if c[0] == "launch"]) == launched


def test_a_capture_that_fails_ends_the_capture(fakes):
    rt = fakes
    ws = sc.workspace(FakeComm(rank=0, size=2))

    def boom(s, local, slots):
        if s == 0xCA:
            raise RuntimeError("no")
    for _ in range(2):
        ws.run(64, 5, ("x",), boom)
    with pytest.raises(RuntimeError):
        ws.run(64, 5, ("x",), boom)
    assert rt.calls[-1] == ("end", 0xCA) and rt.capturing is None


class FakeCodec:
    """The _GpuCodec steps the FP4 algorithms call, recorded."""

    def __init__(self, comm, stream=5):
        self.comm, self.stream, self.log = comm, stream, []

    def buffers(self, send, recv):
        self.log.append(("buffers", send, recv))

    def reserve_nccl_gather(self, K, fmt, rows, oinfo=None):
        self.log.append(("reserve", "gather"))

    def reserve_nccl_reduce_scatter(self, K, fmt, rows, staging=0):
        self.log.append(("reserve", "reduce_scatter", staging))
        self.staging = 0x5000

    def amax(self, info, fmt, shared):
        # the amax slot may still be read by the previous call: the stream must wait for it first
        assert self.comm._extras[sc._EXTRAS_KEY].calls > 0, "amax before the workspace ordered the stream"
        self.log.append(("amax", shared))
        return 0xA0

    def amax_rows(self, info, K, fmt, start, count, stream=None):
        assert self.comm._extras[sc._EXTRAS_KEY].calls > 0, "amax before the workspace ordered the stream"
        self.log.append(("amax_rows", start, count) if stream is None else ("amax_rows", start, count, stream))
        return 0xA0 + start

    def quantize(self, info, K, fmt, amax, chunks, rounding="nearest", seed=None):
        self.log.append(("quantize", amax, chunks, seed))

    def amax_and_quantize(self, info, K, fmt, shared, chunks):
        self.quantize(info, K, fmt, self.amax(info, fmt, shared), chunks)

    def dequantize(self, segments, K, fmt, oinfo):
        self.log.append(("dequantize", segments))


class Out:
    ptr, dtype, itemsize = 0x7000, "bfloat16", 2


def test_fp4_gather_dequantize_quantizes_locally_then_decodes_every_slot(fakes, monkeypatch):
    monkeypatch.setenv("FP4CCL_SMALL_QUANTIZE_BYTES", "0")   # amax and quantize as two steps
    monkeypatch.setenv("FP4CCL_FP4_GATHER_FORM", "steps")
    comm = FakeComm(rank=2, size=3)
    codec = FakeCodec(comm)
    FakeBuffer.trace = codec.log
    rows, K = [3, 0, 5], 64
    sc.fp4_gather_dequantize(codec, In(), K, "nvfp4", False, rows, Out())
    lays = [packed_layout(r, K, "nvfp4") for r in rows]
    assert codec.log == [
        ("reserve", "gather"), ("amax", False),
        ("quantize", 0xA0, [(0, 5, 3 << 32, lays[2])], None),
        ("barrier", 5),
        ("dequantize", [(0, 3, 1 << 32, lays[0]), (3, 0, 2 << 32, lays[1]), (3, 5, 3 << 32, lays[2])])]
    assert FakeBuffer.live[0].nbytes >= 2 * max(lay.total_bytes for lay in lays)


class In:
    nbytes, ptr, dtype, itemsize, size = 1 << 10, 0x3000, "bfloat16", 2, 512


class FakeSide:
    """A _SideStream that logs its marks and waits."""

    def __init__(self, ptr=0x51DE, high=False, log=None):
        self.ptr, self.high, self.log = ptr, high, log if log is not None else []

    def order(self, waiter, signaller):
        self.log.append(("wait", waiter, "bar" if signaller != 5 and signaller != self.ptr else signaller))

    def mark(self, signaller):
        self.log.append(("mark", signaller))
        return sum(e[0] == "mark" for e in self.log)

    def wait(self, waiter, event):
        self.log.append(("wait", waiter, event))


def fake_sides(codec, log):
    """codec._side() replaced by FakeSides logging into `log`; returns them by name as made."""
    sides = {}

    def side(name="side", high_priority=False):
        if name not in sides:
            sides[name] = FakeSide(0x51DE + len(sides), high_priority, log)
        return sides[name]
    codec._side = side
    return sides


def rs_form_setup(monkeypatch, form):
    """A rank-1-of-3 FakeCodec for fp4_reduce_scatter forced to `form`, logging the sums, its side
    streams and the barriers into one list: (codec, sides, log)."""
    from fp4ccl.formats import kernels
    log = []
    monkeypatch.setattr(kernels, "dequantize_sum", lambda *a: log.append(("sum",) + a))
    monkeypatch.setenv("FP4CCL_FP4_RS_FORM", form)
    codec = FakeCodec(FakeComm(rank=1, size=3))
    codec.log = log
    FakeBuffer.trace = log
    return codec, fake_sides(codec, log), log


def test_fp4_reduce_scatter_quantizes_each_peers_chunk_then_sums_in_rank_order(fakes, monkeypatch):
    from fp4ccl.formats import kernels
    sums = []
    monkeypatch.setattr(kernels, "dequantize_sum", lambda *a: sums.append(a))
    monkeypatch.setenv("FP4CCL_FP4_RS_FORM", "steps")
    comm = FakeComm(rank=1, size=3)
    codec = FakeCodec(comm)
    rows, K = [2, 4, 0], 32
    lays = [packed_layout(r, K, "nvfp4") for r in rows]
    region = [0, lays[0].total_bytes, lays[0].total_bytes + lays[1].total_bytes]
    sc.fp4_reduce_scatter(codec, In(), K, "nvfp4", rows, Out(), "stochastic", 9, lambda s, me, p: (s, me, p))
    quants = [e for e in codec.log if e[0] == "quantize"]
    # peers from the next rank on, this rank's own chunk last, each with its own amax and seed
    assert [e for e in codec.log if e[0] == "amax_rows"] == [("amax_rows", 6, 0), ("amax_rows", 0, 2), ("amax_rows", 2, 4)]
    assert [q[2][0][0] for q in quants] == [6, 0, 2]
    assert [q[1] for q in quants] == [0xA0 + 6, 0xA0 + 0, 0xA0 + 2]
    assert [q[3] for q in quants] == [(9, 1, 2), (9, 1, 0), (9, 1, 1)]
    assert [q[2][0][2] for q in quants] == [(2 << 32) + region[2], 2 << 32, (2 << 32) + region[1]]
    assert FakeBuffer.live[0].barriers == [5]
    (dev, optr, odt, k, fmt, units, contribs, stream), = sums
    assert (optr, units, stream) == (0x7000, 4 * K // 16, 5)
    mine = lays[1]
    assert contribs == [(((r + 1) << 32) + region[1], ((r + 1) << 32) + region[1] + mine.scale_off,
                         ((r + 1) << 32) + region[1] + mine.gs_off) for r in range(3)]


def test_fp4_reduce_scatter_pipelined_pulls_and_sums_each_piece(fakes, monkeypatch):
    from fp4ccl import vcollectives
    from fp4ccl.formats import kernels
    log = []
    monkeypatch.setattr(kernels, "dequantize_sum", lambda *a: log.append(("sum",) + a))
    monkeypatch.setattr(vcollectives, "copy", lambda d, s, n, st: log.append(("copy", d, s, n, st)))
    monkeypatch.setenv("FP4CCL_FP4_RS_FORM", "pull")
    monkeypatch.setattr(sc, "rs_pieces", lambda chunk_bytes: 2)
    comm = FakeComm(rank=0, size=3)
    codec = FakeCodec(comm)
    sides = fake_sides(codec, log)
    FakeBuffer.trace = log
    rows, K = [5, 3, 2], 32
    lay = {r: packed_layout(r, K, "mxfp4") for r in range(4)}
    # each chunk in pieces, each piece a packed segment of its own: rank 0's 3 + 2 rows, rank 1's 2 + 1,
    # rank 2's 1 + 1
    size = [lay[3].total_bytes + lay[2].total_bytes, lay[2].total_bytes + lay[1].total_bytes, 2 * lay[1].total_bytes]
    region = [0, size[0], size[0] + size[1]]
    m = size[0]
    sc.fp4_reduce_scatter(codec, In(), K, "mxfp4", rows, Out(), "nearest", 0, lambda s, me, p: 0)
    bar, pull = sides["rs_barrier"], sides["rs_pull"]
    assert bar.high and not pull.high
    assert ("reserve", "reduce_scatter", 2 * m) in codec.log
    # stage 1: the chunk for rank 1 (rows 5-7), stage 2: rank 2's (rows 8-9), piece by piece into its
    # own segment; the own chunk (rows 0-4) last
    quants = [e[2][0] for e in codec.log if e[0] == "quantize"]
    assert quants == [(5, 2, (1 << 32) + region[1], lay[2]), (7, 1, (1 << 32) + region[1] + lay[2].total_bytes, lay[1]),
                      (8, 1, (1 << 32) + region[2], lay[1]), (9, 1, (1 << 32) + region[2] + lay[1].total_bytes, lay[1]),
                      (0, 3, 1 << 32, lay[3]), (3, 2, (1 << 32) + lay[3].total_bytes, lay[2])]
    assert [e[1:] for e in codec.log if e[0] == "amax_rows"] == [(5, 3), (8, 2), (0, 5)]

    def pulls(src, dst):
        """Our chunk's two pieces from rank src's slot, each one copy after its barrier."""
        base = (src + 1 << 32) + region[0]
        return [("barrier", bar.ptr), ("wait", pull.ptr, "bar"), ("copy", dst, base, lay[3].total_bytes, pull.ptr),
                ("barrier", bar.ptr), ("wait", pull.ptr, "bar"),
                ("copy", dst + lay[3].total_bytes, base + lay[3].total_bytes, lay[2].total_bytes, pull.ptr)]
    steps = [e for e in log if e[0] != "sum" and not (e[0] == "wait" and e[1] != pull.ptr)]
    # stage 1 pulls from rank 2 (= 0 - 1), stage 2 from rank 1; the last stage's pieces are marked
    assert steps[:6] == pulls(2, 0x5000)
    assert steps[6:] == pulls(1, 0x5000 + m)[:3] + [("mark", pull.ptr)] + pulls(1, 0x5000 + m)[3:] + [("mark", pull.ptr)]
    # each piece's sum waits for that piece of the last stage only, in rank order of the sources:
    # our own chunk, then rank 1's (pulled at stage 2), then rank 2's (stage 1)
    tail = log[log.index(("mark", pull.ptr)):]
    sums = [e for e in log if e[0] == "sum"]
    assert [(e[2], e[6]) for e in sums] == [(0x7000, 3), (0x7000 + 3 * K * 2, 2)]
    assert [[c[0] for c in e[7]] for e in sums] == [[1 << 32, 0x5000 + m, 0x5000],
                                                    [(1 << 32) + lay[3].total_bytes, 0x5000 + m + lay[3].total_bytes,
                                                     0x5000 + lay[3].total_bytes]]
    order = [e[0] if e[0] != "wait" else e[1:] for e in tail if e[0] in ("sum", "wait")]
    marks = [e for e in log if e[0] == "mark"]
    assert len(marks) == 2
    assert order[-5:] == [(5, 1), "sum", (5, 2), "sum", (5, pull.ptr)]
    monkeypatch.setenv("FP4CCL_FP4_RS_FORM", "ring")
    with pytest.raises(ValueError, match="FP4CCL_FP4_RS_FORM='ring'"):
        sc.fp4_reduce_scatter(codec, In(), K, "mxfp4", rows, Out(), "nearest", 0, lambda s, me, p: 0)


def test_fp4_reduce_scatter_store_quantizes_each_chunk_into_its_peers_slot(fakes, monkeypatch):
    codec, sides, log = rs_form_setup(monkeypatch, "store")
    rows, K = [2, 4, 0], 32
    lays = [packed_layout(r, K, "nvfp4") for r in rows]
    M = max(lay.total_bytes for lay in lays)
    sc.fp4_reduce_scatter(codec, In(), K, "nvfp4", rows, Out(), "nearest", 9, lambda s, me, p: (s, me, p))
    ahead = sides["rs_amax"]
    assert not ahead.high
    assert FakeBuffer.live[0].nbytes >= 2 * 3 * M          # n regions of the largest chunk, two halves
    # every amax runs ahead on the side stream (after x is ready), in ring order, then each quantize
    # waits for its own amax only
    assert log[:2] == [("reserve", "reduce_scatter", 0), ("wait", ahead.ptr, 5)]
    assert [e for e in log if e[0] == "amax_rows"] == [("amax_rows", 6, 0, ahead.ptr), ("amax_rows", 0, 2, ahead.ptr),
                                                       ("amax_rows", 2, 4, ahead.ptr)]
    quants = [e for e in log if e[0] == "quantize"]
    # rank p's chunk goes to rank p's slot, at the region of the source (this rank, 1): p's memory
    # starts at (p + 1) << 32 and its regions are size[p] = lays[p].total_bytes apart
    assert [q[2][0][:3] for q in quants] == [(6, 0, (3 << 32) + 1 * lays[2].total_bytes), (0, 2, (1 << 32) + lays[0].total_bytes),
                                              (2, 4, (2 << 32) + lays[1].total_bytes)]
    assert [q[1] for q in quants] == [0xA0 + 6, 0xA0, 0xA0 + 2] and [q[3] for q in quants] == [(9, 1, 2), (9, 1, 0), (9, 1, 1)]
    waits = [i for i, e in enumerate(log) if e[0] == "wait" and e[1] == 5]
    assert [log[i + 1][0] for i in waits] == ["quantize"] * 3
    assert [log[i][2] for i in waits] == [1, 2, 3]           # the marks after each amax, in turn
    # one barrier after the last quantize, then one local sum of the 3 sources' regions in rank order
    assert [e[0] for e in log[log.index(quants[-1]):]] == ["quantize", "barrier", "sum"]
    (_, dev, optr, odt, k, fmt, units, contribs, stream), = [e for e in log if e[0] == "sum"]
    mine = lays[1]
    assert (optr, units, stream) == (0x7000, 4 * K // 16, 5)
    assert contribs == [((2 << 32) + c * mine.total_bytes, (2 << 32) + c * mine.total_bytes + mine.scale_off,
                         (2 << 32) + c * mine.total_bytes + mine.gs_off) for c in range(3)]


def test_fp4_reduce_scatter_push_stages_each_chunk_and_copies_it_into_its_peers_slot(fakes, monkeypatch):
    from fp4ccl import vcollectives
    codec, sides, log = rs_form_setup(monkeypatch, "push")
    monkeypatch.setattr(vcollectives, "copy", lambda d, s, n, st: log.append(("copy", d, s, n, st)))
    rows, K = [2, 4, 1], 32
    lays = [packed_layout(r, K, "mxfp4") for r in rows]
    size = [lay.total_bytes for lay in lays]
    sc.fp4_reduce_scatter(codec, In(), K, "mxfp4", rows, Out(), "nearest", 0, lambda s, me, p: 0)
    push = sides["rs_push"]
    # staging for the two peers' chunks (ring order: rank 2, then rank 0)
    assert ("reserve", "reduce_scatter", size[2] + size[0]) in log
    steps = [e for e in log if e[0] in ("quantize", "copy", "barrier", "sum") or (e[0] == "wait" and e[2] in (5, push.ptr))]
    assert steps == [
        ("quantize", 0xA0 + 6, [(6, 1, 0x5000, lays[2])], 0), ("wait", push.ptr, 5),
        ("copy", (3 << 32) + 1 * size[2], 0x5000, size[2], push.ptr),
        ("quantize", 0xA0 + 0, [(0, 2, 0x5000 + size[2], lays[0])], 0), ("wait", push.ptr, 5),
        ("copy", (1 << 32) + 1 * size[0], 0x5000 + size[2], size[0], push.ptr),
        ("quantize", 0xA0 + 2, [(2, 4, (2 << 32) + 1 * size[1], lays[1])], 0),   # the own chunk, own region
        ("wait", 5, push.ptr), ("barrier", 5),
        ("sum",) + [e for e in log if e[0] == "sum"][0][1:]]
    (_, dev, optr, odt, k, fmt, units, contribs, stream), = [e for e in log if e[0] == "sum"]
    assert [c[0] for c in contribs] == [(2 << 32) + c * size[1] for c in range(3)]


def test_fp4_reduce_scatter_push_over_several_copy_streams(fakes, monkeypatch):
    from fp4ccl import vcollectives
    codec, sides, log = rs_form_setup(monkeypatch, "push")
    monkeypatch.setenv("FP4CCL_FP4_RS_PUSH_STREAMS", "2")
    monkeypatch.setattr(vcollectives, "copy", lambda d, s, n, st: log.append(("copy", d, s, n, st)))
    rows, K = [2, 4, 1], 32
    sc.fp4_reduce_scatter(codec, In(), K, "mxfp4", rows, Out(), "nearest", 0, lambda s, me, p: 0)
    a, b = sides["rs_push"], sides["rs_push1"]
    # each push on its own stream, after its own chunk's quantize; the caller's stream waits for both
    # before the barrier
    assert [e[4] for e in log if e[0] == "copy"] == [a.ptr, b.ptr]
    assert [e[:2] for e in log if e[0] == "wait"] == [("wait", a.ptr), ("wait", b.ptr), ("wait", 5), ("wait", 5)]
    tail = [e[0] for e in log[log.index([e for e in log if e[0] == "copy"][-1]):]]
    assert tail == ["copy", "amax_rows", "quantize", "wait", "wait", "barrier", "sum"]
    assert sc.workspace(codec.comm)._seen and list(sc.workspace(codec.comm)._seen)[0][-3] == 2
    # more streams than peers: one per peer, each forked before it is joined
    log.clear()
    sides.clear()
    monkeypatch.setenv("FP4CCL_FP4_RS_PUSH_STREAMS", "5")
    sc.fp4_reduce_scatter(codec, In(), K, "mxfp4", rows, Out(), "nearest", 0, lambda s, me, p: 0)
    assert sorted(sides) == ["rs_push", "rs_push1"]
    for bad in ("0", "x"):
        monkeypatch.setenv("FP4CCL_FP4_RS_PUSH_STREAMS", bad)
        with pytest.raises(ValueError, match="FP4CCL_FP4_RS_PUSH_STREAMS"):
            sc.fp4_reduce_scatter(codec, In(), K, "mxfp4", rows, Out(), "nearest", 0, lambda s, me, p: 0)


def test_plain_all_gatherv_copies_in_then_pulls_every_peer(fakes, monkeypatch):
    from fp4ccl import vcollectives
    log = []
    monkeypatch.setattr(vcollectives, "copy", lambda d, s, n, st: log.append(("copy", d, s, n)))
    monkeypatch.setattr(vcollectives, "copy_segments", lambda dev, segs, st: log.append(("segments", segs)))
    FakeBuffer.trace = log
    comm = FakeComm(rank=0, size=3)
    sc.all_gatherv(comm, 0x100, 0x900, [2, 0, 3], 4, 5)
    assert log == [("copy", 1 << 32, 0x100, 8),           # into our slot, for the peers
                   ("barrier", 5),
                   ("segments", [(0x900, 0x100, 8),        # our own rows straight from x
                                 (0x908, 2 << 32, 0), (0x908, 3 << 32, 12)])]


def test_plain_reduce_scatterv_copies_the_input_in_then_sums_this_ranks_rows(fakes, monkeypatch):
    from fp4ccl import symmetric, vcollectives
    log = []
    monkeypatch.setattr(vcollectives, "copy", lambda d, s, n, st: log.append(("copy", d, s, n)))
    monkeypatch.setattr(symmetric, "launch", lambda dev, name, grid, block, args, st: log.append((name, grid, args, st)))
    monkeypatch.setattr(sc, "_resident_sum_blocks", lambda device: 1056)
    comm = FakeComm(rank=2, size=3)
    sc.reduce_scatterv(comm, 0x100, 0x900, [4, 0, 5000], "bfloat16", 2, 5)
    assert log[0] == ("copy", 3 << 32, 0x100, 2 * 5004)
    assert FakeBuffer.live[0].barriers == [5]
    name, grid, (out, table, nsrc, count, scale), stream = log[1]
    assert (name, out, int(nsrc), int(count), float(scale), stream) == ("fp4ccl_sum_sources_bf16", 0x900, 3, 5000, 1.0, 5)
    assert grid == (3,)  # 5000 bf16 = 625 16-byte vectors = 3 blocks of 256 threads
    assert list(table["src"][0]) == [((r + 1) << 32) + 8 for r in range(3)] + [0] * 5
    log.clear()
    sc.reduce_scatterv(FakeComm(rank=1, size=3), 0x100, 0x900, [4, 0, 5000], "float32", 4, 5)
    assert [e[0] for e in log] == ["copy"]  # nothing to sum for a rank with no rows, but it still barriers


def test_which_reduce_scatters_symmetric_memory_takes():
    assert sc.can_reduce_scatter(FakeComm(size=4), "bfloat16", "sum")
    assert sc.can_reduce_scatter(FakeComm(size=8), "float32", "sum")
    assert not sc.can_reduce_scatter(FakeComm(size=4), "bfloat16", "max")
    assert not sc.can_reduce_scatter(FakeComm(size=4), "int32", "sum")
    assert not sc.can_reduce_scatter(FakeComm(size=9), "float32", "sum")


def test_fp4_gather_raw_fills_its_slot_then_pulls_every_part_in_one_launch(fakes, monkeypatch):
    from fp4ccl import vcollectives
    log = []
    monkeypatch.setattr(vcollectives, "copy_segments", lambda dev, segs, st: log.append(("segments", segs, st)))
    FakeBuffer.trace = log
    comm = FakeComm(rank=1, size=2)
    codec = FakeCodec(comm)
    rows, K = [3, 5], 64
    filled = []
    source = ("x", 0xA000, "bfloat16", False)
    sc.fp4_gather_raw(codec, rows, K, "nvfp4", lambda addr, lay: filled.append((addr, lay, codec.stream)), source,
                      0xD000, 0x5000, 0x6000)
    lays = [packed_layout(r, K, "nvfp4") for r in rows]
    assert filled == [(2 << 32, lays[1], 5)]  # our slot, on the caller's stream, before the barrier
    base = [1 << 32, 2 << 32]
    # (segments this small stay on the SMs: RAW_CE_FROM_BYTES) every rank's data, then its scales
    assert log == [("barrier", 5), ("segments", [
        (0xD000, base[0], 3 * 32), (0xD000 + 3 * 32, base[1], 5 * 32),
        (0x5000, base[0] + lays[0].scale_off, 3 * 4), (0x6000, base[0] + lays[0].gs_off, 4),
        (0x5000 + 3 * 4, base[1] + lays[1].scale_off, 5 * 4), (0x6000 + 4, base[1] + lays[1].gs_off, 4)], 5)]
    # Remembered by its source and result addresses: a call whose results come back at the same
    # addresses (a caching allocator, the previous result dropped) repeats the key and gets a graph.
    seen = list(sc.workspace(comm)._seen)
    assert len(seen) == 1 and seen[0][0] == "fp4_gather_raw" and seen[0][1:5] == source
    assert (0xD000, 0x5000, 0x6000, "sm") == seen[0][-6:-2]


def test_fp4_gather_raw_pulls_the_peers_data_with_the_copy_engine(fakes, sides, monkeypatch):
    from fp4ccl import vcollectives
    log, made = sides
    monkeypatch.setattr(vcollectives, "copy", lambda d, s, n, st: log.append(("copy", d, s, n, st)))
    monkeypatch.setattr(vcollectives, "copy_segments", lambda dev, segs, st: log.append(("segments", segs, st)))
    monkeypatch.setenv("FP4CCL_FP4_RAW_PULL", "ce")
    comm = FakeComm(rank=1, size=3)
    codec = FakeCodec(comm)
    rows, K = [3, 5, 0], 64
    sc.fp4_gather_raw(codec, rows, K, "mxfp4", lambda addr, lay: log.append(("fill", addr)), ("x",), 0xD000, 0x5000, 0)
    lays = [packed_layout(r, K, "mxfp4") for r in rows]
    base = [1 << 32, 2 << 32, 3 << 32]
    pull = made["ce_copy"]
    # after the barrier the copy engine pulls the peers' data in ring order (rank 2's is empty) while
    # one SM launch on the caller's stream copies the own data and every rank's scales (no global
    # scales: MXFP4); then the caller's stream waits for the pulls
    assert log == [("fill", base[1]), ("barrier", 5), ("wait", pull.ptr, 5),
                   ("copy", 0xD000 + 8 * 32, base[2], 0, pull.ptr), ("copy", 0xD000, base[0], 3 * 32, pull.ptr),
                   ("segments", [(0xD000 + 3 * 32, base[1], 5 * 32),
                                 (0x5000, base[0] + lays[0].scale_off, 3 * 2),
                                 (0x5000 + 3 * 2, base[1] + lays[1].scale_off, 5 * 2),
                                 (0x5000 + 8 * 2, base[2] + lays[2].scale_off, 0)], 5),
                   ("wait", 5, pull.ptr)]
    assert list(sc.workspace(comm)._seen)[0][-3] == "ce"


def test_raw_pull_by_segment_size_and_from_the_environment(monkeypatch):
    monkeypatch.delenv("FP4CCL_FP4_RAW_PULL", raising=False)
    assert [sc.raw_pull(b) for b in (0, sc.RAW_CE_FROM_BYTES - 1, sc.RAW_CE_FROM_BYTES)] == ["sm", "sm", "ce"]
    monkeypatch.setenv("FP4CCL_FP4_RAW_PULL", " SM ")
    assert sc.raw_pull(1 << 40) == "sm"
    monkeypatch.setenv("FP4CCL_FP4_RAW_PULL", "tma")
    with pytest.raises(ValueError, match="FP4CCL_FP4_RAW_PULL='tma'"):
        sc.raw_pull(1)


# -- the one-launch small NVFP4 quantize: when the GPU codec picks it --------------------------------------

def _codec_for_choice(monkeypatch, arch_ok=True):
    from fp4ccl import fp4_collectives as fc
    from fp4ccl.formats import kernels
    calls = []
    monkeypatch.setattr(kernels, "has_quantize_small", lambda device: arch_ok)
    monkeypatch.setattr(kernels, "quantize_small_nvfp4", lambda *a: calls.append(("small",) + a))
    codec = object.__new__(fc._GpuCodec)
    codec.device, codec.stream = 0, 9
    codec.amax = lambda info, fmt, shared: calls.append(("amax", fmt, shared)) or 0xA0
    codec.quantize = lambda info, K, fmt, amax, chunks: calls.append(("quantize", fmt, amax, len(chunks)))
    return codec, calls


def _x(rows, K, itemsize=2):
    from fp4ccl._arrays import ArrayInfo
    return ArrayInfo(None, "torch", 0x1000, (rows, K), "bfloat16" if itemsize == 2 else "float32", 0, True)


@pytest.mark.parametrize("case, small", [
    (dict(), True),
    (dict(fmt="mxfp4"), False),                 # MXFP4 has no amax
    (dict(shared=True), False),                 # the amax is MAX-reduced over ranks first
    (dict(rows=1024, K=256), False),            # 512 KiB: above SMALL_QUANTIZE_BYTES
    (dict(rows=0), False),                      # empty: the kernel path writes the global scale of 0 rows
    (dict(two_chunks=True), False),             # the NCCL path's pipelined chunks
    (dict(start=1), False),                     # not the whole of x
    (dict(arch_ok=False), False),               # before sm_90: no thread-block clusters
    (dict(env="0"), False),                     # FP4CCL_SMALL_QUANTIZE_BYTES=0 turns it off
    (dict(env=str(1 << 20), rows=1024, K=256), True),
])
def test_small_nvfp4_quantize_is_one_launch_only_where_it_applies(monkeypatch, case, small):
    from fp4ccl.formats.tensor import packed_layout
    if "env" in case:
        monkeypatch.setenv("FP4CCL_SMALL_QUANTIZE_BYTES", case["env"])
    else:
        monkeypatch.delenv("FP4CCL_SMALL_QUANTIZE_BYTES", raising=False)
    codec, calls = _codec_for_choice(monkeypatch, case.get("arch_ok", True))
    rows, K, fmt = case.get("rows", 64), case.get("K", 256), case.get("fmt", "nvfp4")
    lay = packed_layout(rows, K, fmt)
    start = case.get("start", 0)
    chunks = [(start, rows - start, 0x9000, lay)]
    if case.get("two_chunks"):
        chunks = [(0, rows // 2, 0x9000, lay), (rows // 2, rows - rows // 2, 0xA000, lay)]
    codec.amax_and_quantize(_x(rows, K), K, fmt, case.get("shared", False), chunks)
    if small:
        assert calls == [("small", 0, 0x1000, "bfloat16", rows * K, K,
                          (rows * K // 16, 0, 0x9000, 0x9000 + lay.scale_off, 0x9000 + lay.gs_off), 9)]
    else:
        assert calls[-1][0] == "quantize" and all(c[0] != "small" for c in calls)


def test_small_quantize_bytes_rejects_a_bad_value(monkeypatch):
    from fp4ccl import fp4_collectives as fc
    monkeypatch.setenv("FP4CCL_SMALL_QUANTIZE_BYTES", "lots")
    with pytest.raises(ValueError, match="FP4CCL_SMALL_QUANTIZE_BYTES"):
        fc.small_quantize_bytes()



def test_pipelined_reduce_scatter_splits_larger_chunks_into_more_pieces(monkeypatch):
    assert [sc.rs_pieces(mib << 20) for mib in (0, 4, 8, 36, 63, 64, 72)] == [1, 1, 2, 2, 2, 4, 4]
    monkeypatch.delenv("FP4CCL_FP4_RS_FORM", raising=False)
    assert [sc.rs_form(b) for b in (0, 8192, sc.RS_PUSH_FROM_BYTES - 1, sc.RS_PUSH_FROM_BYTES, 1 << 40)] == \
        ["store", "store", "store", "push", "push"]
    monkeypatch.setenv("FP4CCL_FP4_RS_FORM", " PUSH ")
    assert sc.rs_form(1) == "push"
    monkeypatch.setenv("FP4CCL_FP4_RS_FORM", "store")
    assert sc.rs_form(1) == "store"


@pytest.fixture
def sides(monkeypatch):
    """side_stream() replaced by FakeSides logging into one list, which the barriers log into too."""
    log, made = [], {}

    def side(comm, name, high_priority=False):
        if name not in made:
            made[name] = FakeSide(0x51DE + len(made), high_priority, log)
        return made[name]
    monkeypatch.setattr(sc, "side_stream", side)
    FakeBuffer.trace = log
    return log, made


def test_ce_pieces_streams_and_staging_from_the_environment(monkeypatch):
    monkeypatch.delenv("FP4CCL_CE_PIECES", raising=False)
    monkeypatch.delenv("FP4CCL_CE_STREAMS", raising=False)
    assert sc.ce_pieces() == 1 and sc.ce_streams() == 1
    monkeypatch.setenv("FP4CCL_CE_PIECES", " 3 ")
    monkeypatch.setenv("FP4CCL_CE_STREAMS", "2")
    assert sc.ce_pieces() == 3 and sc.ce_streams() == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("FP4CCL_CE_PIECES", bad)
        with pytest.raises(ValueError, match="FP4CCL_CE_PIECES"):
            sc.ce_pieces()
    monkeypatch.setenv("FP4CCL_CE_STAGE", "tma")
    with pytest.raises(ValueError, match="FP4CCL_CE_STAGE='tma' must be 'sm' or 'ce'"):
        sc._stage(0, 1, 2, 3, 4)


def test_ce_all_gatherv_publishes_each_piece_then_pulls_it_from_every_peer(fakes, sides, monkeypatch):
    from fp4ccl import vcollectives
    log, made = sides
    monkeypatch.setattr(vcollectives, "copy", lambda d, s, n, st: log.append(("copy", d, s, n, st)))
    monkeypatch.setattr(vcollectives, "launch_vcopy", lambda dev, segs, st: log.append(("stage",) + segs[0] + (st,)) or True)
    monkeypatch.setenv("FP4CCL_CE_PIECES", "2")
    monkeypatch.delenv("FP4CCL_CE_STREAMS", raising=False)
    monkeypatch.delenv("FP4CCL_CE_STAGE", raising=False)
    comm = FakeComm(rank=1, size=3)
    counts, isz = [3, 5, 0], 4      # pieces: rank 0 2+1, rank 1 3+2, rank 2 0+0 elements
    sc.all_gatherv_ce(comm, 0x100, 0x900, counts, isz, 5)
    bar, pull = made["ce_barrier"], made["ce_copy"]
    assert bar.high and not pull.high
    mine = 2 << 32                   # rank 1's slot; the peers' in ring order: rank 2, rank 0
    # staged with the SMs (not queued on the copy engines behind the pulls), pulled by the copy engine
    assert log == [
        ("stage", mine, 0x100, 12, 5), ("wait", bar.ptr, 5), ("barrier", bar.ptr), ("wait", pull.ptr, "bar"),
        ("copy", 0x900 + 32, 3 << 32, 0, pull.ptr), ("copy", 0x900, 1 << 32, 8, pull.ptr),
        ("stage", mine + 12, 0x100 + 12, 8, 5), ("wait", bar.ptr, 5), ("barrier", bar.ptr), ("wait", pull.ptr, "bar"),
        ("copy", 0x900 + 32, (3 << 32), 0, pull.ptr), ("copy", 0x900 + 8, (1 << 32) + 8, 4, pull.ptr),
        ("stage", 0x900 + 12, 0x100, 20, 5),           # the own rows from x, beside the pulls
        ("wait", 5, bar.ptr), ("wait", 5, pull.ptr)]    # both side streams joined back
    assert FakeBuffer.live[0].nbytes >= 2 * 5 * isz


def test_ce_reduce_scatterv_pushes_each_piece_then_sums_it(fakes, sides, monkeypatch):
    from fp4ccl import vcollectives
    log, made = sides
    monkeypatch.setattr(vcollectives, "copy", lambda d, s, n, st: log.append(("copy", d, s, n, st)))
    monkeypatch.setattr(sc, "_sum_sources", lambda dev, dt, isz, out, srcs, n, st: log.append(("sum", out, srcs, n, st)))
    monkeypatch.setenv("FP4CCL_CE_PIECES", "2")
    monkeypatch.setenv("FP4CCL_CE_STREAMS", "2")
    comm = FakeComm(rank=0, size=3)
    counts, isz = [3, 4, 1], 2       # x holds rows 0-2 for rank 0, 3-6 for rank 1, 7 for rank 2
    sc.reduce_scatterv_ce(comm, 0x100, 0x900, counts, "bfloat16", isz, 5)
    bar, p0, p1 = made["ce_barrier"], made["ce_copy"], made["ce_copy1"]
    slot = [(r + 1) << 32 for r in range(3)]
    # rank p's slot: one region of counts[p] elements per source; rank 0 writes region 0 of each peer,
    # the two peers' pushes on the two copy streams
    assert log == [
        ("wait", p0.ptr, 5), ("wait", p1.ptr, 5),       # after the previous call's sums
        ("copy", slot[1], 0x100 + 3 * isz, 2 * isz, p0.ptr), ("copy", slot[2], 0x100 + 7 * isz, isz, p1.ptr),
        ("wait", bar.ptr, "bar"), ("wait", bar.ptr, "bar"), ("barrier", bar.ptr), ("wait", 5, bar.ptr),
        ("sum", 0x900, [0x100, slot[0] + 3 * isz, slot[0] + 6 * isz], 2, 5),
        ("copy", slot[1] + 2 * isz, 0x100 + 5 * isz, 2 * isz, p0.ptr), ("copy", slot[2] + isz, 0x100 + 8 * isz, 0, p1.ptr),
        ("wait", bar.ptr, "bar"), ("wait", bar.ptr, "bar"), ("barrier", bar.ptr), ("wait", 5, bar.ptr),
        ("sum", 0x900 + 2 * isz, [0x100 + 2 * isz, slot[0] + 5 * isz, slot[0] + 8 * isz], 1, 5),
        ("wait", 5, p0.ptr), ("wait", 5, p1.ptr)]
    assert FakeBuffer.live[0].nbytes >= 2 * 3 * 4 * isz


# -- the checked barrier: ranks in different calls --------------------------------------------------------

def test_call_signatures_agree_across_integer_types_and_differ_between_calls():
    a = sc.agreed("all_gatherv", sizes=(2, 0, 3), itemsize=4)
    b = sc.agreed("all_gatherv", sizes=[np.int64(2), 0, np.int32(3)], itemsize=np.int64(4))
    assert sc.call_signature(a) == sc.call_signature(b)   # numpy ints and lists sign as ints and tuples
    others = [sc.agreed("all_gatherv", sizes=(2, 0, 4), itemsize=4), sc.agreed("all_gatherv", sizes=(2, 0, 3), itemsize=2),
              sc.agreed("reduce_scatterv", sizes=(2, 0, 3), itemsize=4)]
    assert len({sc.call_signature(c) for c in [a] + others}) == 4
    assert all(0 <= sc.call_signature(c) < 1 << 24 for c in others)
    # a fixed value: the hash must be the same in every process (Python's hash() of a str is salted)
    assert sc.call_signature(("x",)) == __import__("zlib").crc32(b"('x',)") & 0xFFFFFF


def test_every_barrier_carries_its_calls_signature(fakes, monkeypatch):
    from fp4ccl import vcollectives
    monkeypatch.setattr(vcollectives, "copy", lambda *a: None)
    monkeypatch.setattr(vcollectives, "copy_segments", lambda *a: None)
    FakeBuffer.signatures = sigs = []
    comm = FakeComm(rank=0, size=3)
    sc.all_gatherv(comm, 0x100, 0x900, [2, 0, 3], 4, 5)
    sc.all_gatherv(comm, 0x100, 0x900, [2, 1, 3], 4, 5)
    assert sigs == [sc.call_signature(sc.agreed("all_gatherv", elements=(2, 0, 3), itemsize=4)),
                    sc.call_signature(sc.agreed("all_gatherv", elements=(2, 1, 3), itemsize=4))]


def _report(ws, kind, peer, theirs, mine):
    """What fp4ccl_symm_barrier_checked stores into the pinned word (csrc/symm.cu, report_disagreement)."""
    ws._mismatch.value = (kind << 60) | (peer << 48) | (theirs << 24) | mine


def test_a_mismatch_the_device_reported_fails_the_next_call_and_names_both(fakes, monkeypatch):
    from fp4ccl import vcollectives
    from fp4ccl.errors import CallMismatchError
    monkeypatch.setattr(vcollectives, "copy", lambda *a: None)
    monkeypatch.setattr(vcollectives, "copy_segments", lambda *a: None)
    comm = FakeComm(rank=0, size=2)
    sc.all_gatherv(comm, 0x100, 0x900, [4, 3], 2, 5)     # rank 0 thinks rank 1 has 3 rows
    ws = sc.workspace(comm)
    ws.verify()                                          # nothing reported yet: no error
    mine = sc.call_signature(sc.agreed("all_gatherv", elements=(4, 3), itemsize=2))
    theirs = sc.call_signature(sc.agreed("all_gatherv", elements=(4, 4), itemsize=2))
    _report(ws, 1, 1, theirs, mine)
    with pytest.raises(CallMismatchError) as info:
        sc.all_gatherv(comm, 0x100, 0x900, [4, 4], 2, 5)
    msg = str(info.value)
    assert "rank 0 was in all_gatherv(elements=(4, 3), itemsize=2), rank 1 in a call this rank did not make" in msg
    assert f"signature {theirs:06x} against {mine:06x}" in msg and "void" in msg
    assert isinstance(info.value, ValueError)             # as the host-side sizes check raises
    assert comm.failed[0] == "mismatch" and comm.failed[1] is info.value
    assert ws.calls == 1                                  # the failing call enqueued nothing
    # a call this rank made too is named by its sizes; a poison names the peer that found the mismatch
    _report(ws, 1, 1, mine, theirs)
    with pytest.raises(CallMismatchError, match=r"rank 1 in all_gatherv\(elements=\(4, 3\), itemsize=2\)"):
        ws.verify()
    # a one-launch kernel's flags carry 16 bits of the peer's signature (kind 3)
    _report(ws, 3, 1, mine & 0xFFFF, theirs)
    with pytest.raises(CallMismatchError, match=rf"rank 1 in all_gatherv\(elements=\(4, 3\), itemsize=2\) "
                                                rf"\(signature {mine & 0xFFFF:04x} against {theirs:06x}\)"):
        ws.verify()
    _report(ws, 2, 1, 0, mine)
    with pytest.raises(CallMismatchError, match=r"rank 1 found ranks in different calls while rank 0 was in "
                                                r"all_gatherv\(elements=\(4, 3\)"):
        ws.replay(("k",), 10, 5)


def test_verify_waits_for_the_last_call_only_when_asked_and_close_frees_the_word(fakes, monkeypatch):
    from fp4ccl import vcollectives
    monkeypatch.setattr(vcollectives, "copy", lambda *a: None)
    monkeypatch.setattr(vcollectives, "copy_segments", lambda *a: None)
    rt = fakes
    comm = FakeComm(rank=1, size=2)
    sc.all_gatherv(comm, 0x100, 0x900, [1, 1], 2, 5)
    ws = sc.workspace(comm)
    ws.verify()
    assert ("sync", 0xE0) not in rt.calls
    ws.verify(wait=True)
    assert ("sync", 0xE0) in rt.calls
    addr = ctypes.addressof(ws._mismatch)
    ws.close()
    assert ("free host", addr) in rt.calls and ws._mismatch is None
