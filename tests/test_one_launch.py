"""fp4ccl.one_launch without a GPU: when the one-launch FP4 gather and reduce-scatter serve a call, eagerly and inside a
caller's CUDA-graph capture, and what its launch is given (over the fakes of test_symm_collectives).
The kernel itself runs in tests/gpu/test_fp4_collectives.py."""
from __future__ import annotations

import pytest

from fp4ccl import one_launch, symm_collectives as sc, symmetric
from fp4ccl.formats import kernels
from test_symm_collectives import FakeBuffer, FakeCodec, FakeComm, In, Out, fakes  # noqa: F401


@pytest.mark.parametrize("env, fmt, shared, size, rows, arch_ok, form", [
    ("", "nvfp4", False, 4, [3, 0, 5, 1], True, "ll"),
    ("", "nvfp4", False, 4, [2048, 0, 0, 0], True, "ll"),             # 2048 x 64 = MAX_ELEMENTS
    ("", "nvfp4", False, 4, [2049, 0, 0, 0], True, "steps"),          # one row past what a segment holds
    ("ll", "nvfp4", False, 4, [2049, 0, 0, 0], True, "steps"),        # forced, but it cannot: said at INFO
    ("", "nvfp4", True, 4, [3, 0, 5, 1], True, "steps"),              # one shared global scale
    ("", "mxfp4", False, 4, [3, 0, 5, 1], True, "ll"),
    ("", "mxfp4", True, 4, [3, 0, 5, 1], True, "ll"),                 # MXFP4 has no global scale to share
    ("", "mxfp4", False, 4, [2048, 0, 0, 0], True, "ll"),
    ("", "mxfp4", False, 4, [2049, 0, 0, 0], True, "steps"),
    ("", "mxfp4", False, 4, [3, 0, 5, 1], False, "steps"),
    ("", "nvfp4", False, 9, [1] * 9, True, "steps"),                  # more ranks than the kernel's table
    ("", "nvfp4", False, 4, [3, 0, 5, 1], False, "steps"),            # before sm_90: no clusters
    ("ll", "mxfp4", False, 4, [3, 0, 5, 1], True, "ll"),
    ("", "fp8", False, 4, [3, 0, 5, 1], True, "steps"),               # not a format of the kernels
    (" LL ", "nvfp4", False, 4, [3, 0, 5, 1], True, "ll"),
    (" Steps ", "nvfp4", False, 4, [3, 0, 5, 1], True, "steps"),
])
def test_form_by_format_scales_ranks_size_and_environment(monkeypatch, caplog, env, fmt, shared, size, rows,
                                                          arch_ok, form):
    monkeypatch.setattr(symmetric, "min_arch", lambda comm: 90 if arch_ok else 80)
    monkeypatch.setenv("FP4CCL_FP4_GATHER_FORM", env)
    with caplog.at_level("INFO", logger="fp4ccl.one_launch"):
        assert one_launch.form(FakeComm(rank=0, size=size), rows, 64, fmt, shared) == form
    assert ("runs as steps" in caplog.text) == (env == "ll" and form == "steps")
    monkeypatch.setenv("FP4CCL_FP4_GATHER_FORM", "ring")
    with pytest.raises(ValueError, match="FP4CCL_FP4_GATHER_FORM='ring' is not one of ll, steps"):
        one_launch.form(FakeComm(rank=0, size=size), rows, 64, fmt, shared)


def test_constants_match_the_kernel():
    assert (one_launch._MAXCTAS, one_launch._MAXRANKS) == (kernels.LL_MAXCTAS, kernels.LL_MAXRANKS)
    assert one_launch.SCALE_OFF % 16 == 0 and one_launch.SEG_BYTES % 256 == 0
    assert one_launch.SEG_BYTES - one_launch.SCALE_OFF == one_launch.MAX_ELEMENTS // 16   # one scale byte a block
    assert (one_launch._COUNTER_BYTES + one_launch._FLAG_BYTES) % 256 == 0   # the segments stay aligned


def _launches(monkeypatch):
    launches = []
    monkeypatch.setattr(symmetric, "min_arch", lambda comm: 90)
    monkeypatch.setattr(kernels, "gather_ll", lambda *a: launches.append(a))
    monkeypatch.delenv("FP4CCL_FP4_GATHER_FORM", raising=False)
    monkeypatch.delenv("FP4CCL_FP4_ALGO", raising=False)
    return launches


@pytest.mark.parametrize("fmt, bs", [("nvfp4", 16), ("mxfp4", 32)])
def test_one_launch_into_every_ranks_region_with_no_barrier(fakes, monkeypatch, fmt, bs):  # noqa: F811
    from fp4ccl.symmetric import barrier_timeout_ns
    launches = _launches(monkeypatch)
    comm = FakeComm(rank=2, size=3)
    codec = FakeCodec(comm)
    FakeBuffer.trace = codec.log
    rows, K = [3, 0, 50], 32
    for _ in range(3):
        sc.fp4_gather_dequantize(codec, In(), K, fmt, False, rows, Out())
    assert codec.log == [("reserve", "gather")] * 3     # no barrier, no separate quantize or decode
    # its own buffer, zeroed, made once; the workspace (the calls' ordering and graphs) holds no data
    ll = comm._extras[one_launch._EXTRAS_KEY]
    assert ll.zeroed and ll.nbytes == one_launch._COUNTER_BYTES + one_launch._FLAG_BYTES + 2 * 3 * one_launch.SEG_BYTES
    assert FakeBuffer.live[0] is ll and FakeBuffer.live[1].nbytes == 2 * 256
    # the third call met a half again: captured into a graph of the workspace's (on its stream 0xCA)
    assert [launch[-2] for launch in launches] == [5, 5, 0xCA]
    for launch in launches:    # the same launch every call: the kernel picks the half from its epoch
        (dev, form, x, dtype, numel, out, units, first, regions, flags, counters, stride, scale_off, rank, timeout,
         stream, check) = launch
        # the flags carry the call's signature; a peer's other one is reported into the workspace's word
        assert check == (sc.call_signature(sc.agreed("fp4_gather_ll", sizes=tuple(rows), K=K, format=fmt)),
                         sc.workspace(comm).report_address())
        assert (dev, form, x, dtype, numel, out) == (0, fmt, In.ptr, "bfloat16", In.size, Out.ptr)
        blocks = K // bs
        assert units == (3 * blocks, 0, 50 * blocks) and first == (0, 3 * blocks, 3 * blocks)
        base = [(r + 1) << 32 for r in range(3)]
        assert flags == [b + one_launch._COUNTER_BYTES for b in base]
        assert regions == [b + one_launch._COUNTER_BYTES + one_launch._FLAG_BYTES for b in base]
        assert counters == base[2]     # this rank's own
        assert (stride, scale_off, rank) == (one_launch.SEG_BYTES, one_launch.SCALE_OFF, 2)
        assert timeout == barrier_timeout_ns()


def test_a_decode_into_another_dtype_is_refused(fakes, monkeypatch):  # noqa: F811
    _launches(monkeypatch)

    class F32Out(Out):
        dtype = "float32"
    with pytest.raises(TypeError, match="x's dtype bfloat16, not float32"):
        one_launch.gather(FakeCodec(FakeComm(rank=0, size=2)), In(), 32, "nvfp4", (1, 1), F32Out())


def _capturing_codec(monkeypatch, comm, reserve: str):
    """A _GpuCodec of comm on stream 99, which the fake runtime reports as being captured (so symmetric
    memory is not usable there), that fails the test if `reserve` (an NCCL workspace sizing) is called."""
    from fp4ccl import fp4_collectives
    monkeypatch.setattr(sc, "usable", lambda c, s: not sc.capturing(s))
    codec = fp4_collectives._GpuCodec.__new__(fp4_collectives._GpuCodec)
    codec.comm, codec.stream, codec.device = comm, 99, 0
    monkeypatch.setattr(codec, reserve, lambda *a: pytest.fail("reserved inside a capture"), raising=False)
    return codec


def test_in_a_capture_it_launches_into_the_callers_graph_once_an_eager_call_made_its_buffer(fakes, monkeypatch):  # noqa: F811
    launches = _launches(monkeypatch)
    comm = FakeComm(rank=0, size=2)
    rows, K = (4, 4), 32
    # before any eager call there is no buffer, and none can be made inside a capture: NCCL serves it
    assert not one_launch.capturable(comm, 99, rows, K, "nvfp4", False)
    sc.fp4_gather_dequantize(FakeCodec(comm), In(), K, "nvfp4", False, rows, Out())
    assert one_launch.capturable(comm, 99, rows, K, "nvfp4", False)
    assert one_launch.capturable(comm, 99, rows, K, "mxfp4", False)
    assert one_launch.capturable(comm, 99, rows, K, "mxfp4", True)
    assert not one_launch.capturable(comm, 99, rows, K, "nvfp4", True)     # one shared global scale: steps
    assert not one_launch.capturable(comm, 99, (5000, 4), K, "nvfp4", False)
    monkeypatch.setenv("FP4CCL_FP4_ALGO", "nccl")
    assert not one_launch.capturable(comm, 99, rows, K, "nvfp4", False)
    monkeypatch.delenv("FP4CCL_FP4_ALGO")
    calls = comm._extras[sc._EXTRAS_KEY].calls
    _capturing_codec(monkeypatch, comm, "reserve_nccl_gather").gather_dequantize(In(), K, "nvfp4", False, rows, Out())
    assert launches[-1][-2] == 99 and len(launches) == 2
    assert comm._extras[sc._EXTRAS_KEY].calls == calls    # the workspace (its events) left alone


# -- the reduce-scatter ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("env, rows, arch_ok, nbytes, form", [
    ("", [3, 0, 5, 1], True, 1 << 10, "ll"),
    ("", [2048, 0, 0, 0], True, 1 << 20, "ll"),              # a chunk of MAX_ELEMENTS (K = 64)
    ("", [2049, 0, 0, 0], True, 1 << 20, "store"),           # one row past a segment: the size's default
    ("ll", [2049, 0, 0, 0], True, 1 << 20, "store"),         # forced, but it cannot: said at INFO
    ("", [3, 0, 5, 1], False, 1 << 10, "store"),             # before sm_90
    ("store", [3, 0, 5, 1], True, 1 << 10, "store"),
    (" Push ", [3, 0, 5, 1], True, 1 << 10, "push"),
    (" LL ", [3, 0, 5, 1], True, 1 << 10, "ll"),
])
def test_reduce_scatter_form(monkeypatch, caplog, env, rows, arch_ok, nbytes, form, fmt):
    monkeypatch.setattr(symmetric, "min_arch", lambda comm: 90 if arch_ok else 80)
    monkeypatch.setenv("FP4CCL_FP4_RS_FORM", env)
    comm = FakeComm(rank=0, size=4)
    with caplog.at_level("INFO", logger="fp4ccl.symm_collectives"):
        assert sc.rs_form(nbytes, lambda: one_launch.serves(comm, rows, 64, fmt)) == form
    assert ("runs as the default form" in caplog.text) == (env == "ll" and form != "ll")
    assert not one_launch.serves(FakeComm(rank=0, size=9), [1] * 9, 64, fmt)
    monkeypatch.setenv("FP4CCL_FP4_RS_FORM", "ring")
    with pytest.raises(ValueError, match="FP4CCL_FP4_RS_FORM='ring' is not one of ll, steps, pull, store, push"):
        sc.rs_form(nbytes, lambda: True)


def _rs_launches(monkeypatch):
    launches = _launches(monkeypatch)
    monkeypatch.setattr(kernels, "reduce_scatter_ll", lambda *a: launches.append(("rs",) + a))
    monkeypatch.delenv("FP4CCL_FP4_RS_FORM", raising=False)
    return launches


@pytest.mark.parametrize("fmt, bs", [("nvfp4", 16), ("mxfp4", 32)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_reduce_scatter_is_one_launch_over_the_gathers_buffer(fakes, monkeypatch, rounding, fmt, bs):  # noqa: F811
    from fp4ccl.symmetric import barrier_timeout_ns
    launches = _rs_launches(monkeypatch)
    comm = FakeComm(rank=1, size=3)
    codec = FakeCodec(comm)
    rows, K = [3, 0, 50], 32
    sc.fp4_gather_dequantize(codec, In(), K, "nvfp4", False, [1, 1, 1], Out())
    for _ in range(2):
        sc.fp4_reduce_scatter(codec, In(), K, fmt, rows, Out(), rounding, 9, lambda s, me, p: 100 * me + p)
    # no barrier, no separate amax, quantize or sum: one kernel, into the buffer the gather made
    assert codec.log == [("reserve", "gather")] + [("reserve", "reduce_scatter", 0)] * 2
    assert [b for b in FakeBuffer.live if b.zeroed] == [comm._extras[one_launch._EXTRAS_KEY]]
    gather, *rs = launches
    assert len(rs) == 2 and all(launch[0] == "rs" for launch in rs)
    for launch in rs:
        (_, dev, form, x, dtype, out, units, first, regions, flags, counters, stride, scale_off, rank, rnd, seeds,
         timeout, stream, check) = launch
        assert check == (sc.call_signature(sc.agreed("fp4_reduce_scatter_ll", sizes=tuple(rows), K=K, format=fmt)),
                         sc.workspace(comm).report_address())
        assert (dev, form, x, dtype, out, rank, rnd, stream) == (0, fmt, In.ptr, "bfloat16", Out.ptr, 1, rounding, 5)
        blocks = K // bs   # chunk q's FP4 blocks of x, and where they start
        assert units == (3 * blocks, 0, 50 * blocks) and first == (0, 3 * blocks, 3 * blocks)
        assert (regions, flags, counters, stride, scale_off) == gather[8:13]
        assert seeds == ((100, 101, 102) if rounding == "stochastic" else (0, 0, 0))
        assert timeout == barrier_timeout_ns()


def test_reduce_scatter_in_a_capture_launches_into_the_callers_graph(fakes, monkeypatch):  # noqa: F811
    launches = _rs_launches(monkeypatch)
    comm = FakeComm(rank=0, size=2)
    rows, K = (4, 4), 32
    assert not one_launch.rs_capturable(comm, 99, rows, K, "nvfp4")    # no buffer yet: NCCL serves it
    sc.fp4_reduce_scatter(FakeCodec(comm), In(), K, "nvfp4", rows, Out(), "nearest", 0, lambda s, me, p: 0)
    assert one_launch.rs_capturable(comm, 99, rows, K, "nvfp4")
    assert one_launch.rs_capturable(comm, 99, rows, K, "mxfp4")
    assert not one_launch.rs_capturable(comm, 99, (5000, 4), K, "nvfp4")
    for name, value in (("FP4CCL_FP4_ALGO", "nccl"), ("FP4CCL_FP4_RS_FORM", "store")):
        monkeypatch.setenv(name, value)
        assert not one_launch.rs_capturable(comm, 99, rows, K, "nvfp4")
        monkeypatch.delenv(name)
    calls = comm._extras[sc._EXTRAS_KEY].calls
    _capturing_codec(monkeypatch, comm, "reserve_nccl_reduce_scatter").reduce_scatter(In(), K, "nvfp4", rows, Out(), "nearest", 0)
    assert launches[-1][0] == "rs" and launches[-1][-2] == 99 and len(launches) == 2
    assert comm._extras[sc._EXTRAS_KEY].calls == calls


def test_reduce_scatter_into_another_dtype_is_refused(fakes, monkeypatch):  # noqa: F811
    _rs_launches(monkeypatch)

    class F32Out(Out):
        dtype = "float32"
    with pytest.raises(TypeError, match="sums into x's dtype bfloat16, not float32"):
        one_launch.reduce_scatter(FakeCodec(FakeComm(rank=0, size=2)), In(), 32, "nvfp4", (1, 1), F32Out(), "nearest",
                                  (0, 0))


# -- GPUs of different generations on one node ---------------------------------------------------------

class _Exchange:
    """all_gather_bytes as seen by one rank: this rank's payload among the others' (given)."""

    def __init__(self, rank, others):
        self.rank, self.others, self.calls = rank, others, 0

    def all_gather_bytes(self, payload):
        self.calls += 1
        return self.others[:self.rank] + [payload] + self.others[self.rank:]


@pytest.mark.parametrize("archs, same, lowest", [
    ((90, 90, 90), True, 90),
    ((90, 80, 100), True, 80),    # one older GPU: no rank may take the one-launch kernels
    ((100, 120, 100), True, 100),
])
def test_the_one_launch_forms_are_chosen_by_the_oldest_gpu_of_the_communicator(monkeypatch, archs, same, lowest):
    from fp4ccl import jit
    for me in range(len(archs)):
        monkeypatch.setattr(jit, "_arch_of", lambda device, me=me: archs[me])
        comm = FakeComm(rank=me, size=len(archs))
        ident = symmetric.node_identity()
        comm._exchange = _Exchange(me, [f"{ident}|{a}".encode() for r, a in enumerate(archs) if r != me])
        assert (symmetric.same_node(comm), symmetric.min_arch(comm)) == (same, lowest)
        for fmt in ("nvfp4", "mxfp4"):
            assert one_launch.serves(comm, [2] * len(archs), 64, fmt) == (lowest >= 90), f"rank {me} {fmt}"
        assert comm._exchange.calls == 1     # exchanged once, then cached


def test_ranks_on_other_hosts_are_not_one_node(monkeypatch):
    from fp4ccl import jit
    monkeypatch.setattr(jit, "_arch_of", lambda device: 90)
    comm = FakeComm(rank=0, size=2)
    comm._exchange = _Exchange(0, [b"otherhost/some-boot-id|90"])
    assert not symmetric.same_node(comm) and symmetric.min_arch(comm) == 90
    comm = FakeComm(rank=0, size=2, device=None)   # no GPU here: arch 0
    comm._exchange = _Exchange(0, [f"{symmetric.node_identity()}|90".encode()])
    assert symmetric.same_node(comm) and symmetric.min_arch(comm) == 0
