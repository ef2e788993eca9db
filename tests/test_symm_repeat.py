"""fp4ccl.symm_repeat without a GPU: which calls may skip straight to their graph, what gets recorded,
and when a replay must decline (over the fakes of test_symm_collectives). The whole path, with real
calls, runs in tests/gpu/test_fp4_collectives.py (check_repeated_calls)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from fp4ccl import symm_collectives as sc
from fp4ccl import symm_repeat
from test_symm_collectives import FakeComm, fakes  # noqa: F401 - the fixture

torch = pytest.importorskip("torch")


class FakeBackend:
    _depth = 0


def _comm(with_workspace=True):
    comm = FakeComm(rank=1, size=4)
    comm._backend = FakeBackend()
    if with_workspace:
        sc.workspace(comm)
    return comm


@pytest.fixture
def cuda_tensors(monkeypatch):
    """CPU tensors that report a CUDA device (call_key wants real torch.Tensors on a GPU), and a fixed
    current stream (handle 5)."""
    from fp4ccl import _arrays
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda", 0)))
    monkeypatch.setattr(_arrays, "_torch_stream", lambda device: 5)
    return torch.empty(4, 8), torch.empty(16, 8)


def test_call_key_names_everything_the_checks_read(cuda_tensors, monkeypatch):
    x, out = cuda_tensors
    comm = _comm()
    key = symm_repeat.call_key(comm, ("all_gatherv", "nvfp4", "per_rank", True), x, out, [4, 4, 4, 4], None)
    assert key is not None and key == symm_repeat.call_key(comm, ("all_gatherv", "nvfp4", "per_rank", True),
                                                           x, out, (4, 4, 4, 4), None)
    assert key[symm_repeat.STREAM_AT] == 5   # the current stream
    others = [
        symm_repeat.call_key(comm, ("all_gatherv", "mxfp4", "per_rank", True), x, out, [4] * 4, None),
        symm_repeat.call_key(comm, ("all_gatherv", "nvfp4", "per_rank", True), x[:2], out, [4] * 4, None),
        symm_repeat.call_key(comm, ("all_gatherv", "nvfp4", "per_rank", True), x, out.view(8, 16), [4] * 4, None),
        symm_repeat.call_key(comm, ("all_gatherv", "nvfp4", "per_rank", True), x, out, [4, 4, 8, 0], None),
        symm_repeat.call_key(comm, ("all_gatherv", "nvfp4", "per_rank", True), x, out, [4] * 4, 7),
    ]
    assert None not in others and len({key, *others}) == 6
    monkeypatch.setenv("FP4CCL_FP4_ALGO", "nccl")   # a setting the dispatch reads changes the key
    changed = symm_repeat.call_key(comm, ("all_gatherv", "nvfp4", "per_rank", True), x, out, [4] * 4, None)
    assert changed != key
    monkeypatch.setenv("FP4CCL_FP4_RAW_PULL", "sm")  # (how a raw gather into out= moves its data)
    assert symm_repeat.call_key(comm, ("all_gatherv", "nvfp4", "per_rank", True), x, out, [4] * 4, None) != changed


def test_an_fp4_reduce_scatter_is_keyed_by_its_format_rounding_seed_and_form(cuda_tensors, monkeypatch):
    x, out = cuda_tensors
    comm = _comm()

    def key(compress="nvfp4", rounding="nearest", seed=None):
        return symm_repeat.call_key(comm, ("reduce_scatterv", "sum", compress, rounding, seed), x, out, [4] * 4, None)
    base = key()
    assert base is not None and base == key()
    others = [key("mxfp4"), key(rounding="stochastic", seed=7), key(rounding="stochastic", seed=8), key(seed=7)]
    assert None not in others and len({base, *others}) == 5
    assert key(seed=np.int64(7)) is None              # the full path checks and converts it
    # a seed array: the full path resolves it (its address keys the workspace's graph, its value is read
    # when the graph runs), and an array in the key could not be compared
    assert key(rounding="stochastic", seed=np.array([7], np.int64)) is None
    # a torch seed tensor is keyed by where it is: its value may change between calls that replay
    s1, s2 = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    k1 = key(rounding="stochastic", seed=s1)
    assert k1 is not None and k1 == key(rounding="stochastic", seed=s1) and k1 != key(rounding="stochastic", seed=s2)
    s1.fill_(9)
    assert key(rounding="stochastic", seed=s1) == k1
    # a tensor anywhere else decides the call by its value: never keyed
    assert symm_repeat.call_key(comm, ("all_gatherv", "nvfp4", "per_rank", torch.tensor(True)), x, out, [4] * 4,
                                None) is None
    assert symm_repeat.call_key(comm, ("reduce_scatterv", "sum", "nvfp4", torch.tensor(1), s1), x, out, [4] * 4,
                                None) is None
    for name, value in (("FP4CCL_FP4_RS_FORM", "push"), ("FP4CCL_FP4_RS_PUSH_STREAMS", "2")):
        monkeypatch.setenv(name, value)                # the forms read these: a change is another call
        assert key() != base
        monkeypatch.delenv(name)
    assert key() == base


@pytest.mark.parametrize("compress, rounding, seed, serves", [
    (None, "nearest", None, ("reduce_scatterv", "reduce_scatterv_ce")),
    ("nvfp4", "stochastic", 3, ("fp4_reduce_scatter", "fp4_reduce_scatter_ll")),
    ("mxfp4", "nearest", None, ("fp4_reduce_scatter", "fp4_reduce_scatter_ll")),
])
def test_reduce_scatterv_into_out_goes_through_the_repeat_path(monkeypatch, compress, rounding, seed, serves):
    """Communicator.reduce_scatterv with out= hands its call to symm_repeat.dispatch, keyed by every option
    (the FP4 forms too); without out= it takes the full path."""
    from fp4ccl.communicator import Communicator
    seen = []
    monkeypatch.setattr(symm_repeat, "dispatch", lambda comm, op, sv, x, out, sizes, stream, full, *a:
                        seen.append((op, sv, x, out, sizes, stream)) or "dispatched")
    comm = Communicator.__new__(Communicator)
    comm._extras = {"something": 1}
    monkeypatch.setattr(Communicator, "_reduce_scatterv", lambda self, *a: "full")
    x, out = object(), object()
    assert comm.reduce_scatterv(x, [1, 2], out=out, compress=compress, rounding=rounding, seed=seed) == "dispatched"
    op = ("reduce_scatterv", "sum") if compress is None else ("reduce_scatterv", "sum", compress, rounding, seed)
    assert seen == [(op, serves, x, out, [1, 2], None)]
    assert comm.reduce_scatterv(x, [1, 2], compress=compress, rounding=rounding, seed=seed) == "full"


def test_a_gathered_fp4_tensor_as_out_is_keyed_by_its_arrays_and_fields(cuda_tensors):
    from fp4ccl.formats import GatheredFP4Tensor
    x, _ = cuda_tensors
    comm = _comm()
    op = ("all_gatherv", "nvfp4", "per_rank", False)

    def gathered(**changes):
        fields = dict(data=torch.empty(16, 4, dtype=torch.uint8), scales=torch.empty(16, 1, dtype=torch.uint8),
                      global_scale=torch.empty(4), format="nvfp4", shape=(16, 8), scale_layout="linear",
                      dtype="float32", row_offsets=(0, 4, 8, 12, 16))
        fields.update(changes)
        return GatheredFP4Tensor(**fields)

    q = gathered()
    key = symm_repeat.call_key(comm, op, x, q, [4] * 4, None)
    assert key is not None and key == symm_repeat.call_key(comm, op, x, q, [4] * 4, None)
    others = [gathered(data=q.data, scales=q.scales, global_scale=q.global_scale, **change) for change in
              (dict(dtype="bfloat16"), dict(row_offsets=(0, 2, 8, 12, 16)), dict(shape=[16, 8, 1]))]
    others.append(gathered(data=q.data.view(8, 8), scales=q.scales, global_scale=q.global_scale))
    others.append(gathered(data=q.data, scales=q.scales, global_scale=None, format="mxfp4"))
    keys = [symm_repeat.call_key(comm, op, x, o, [4] * 4, None) for o in others]
    assert None not in keys and len({key, *keys}) == 6
    assert symm_repeat.call_key(comm, op, x, gathered(data=q.data.numpy()), [4] * 4, None) is None
    assert symm_repeat.call_key(comm, op, x, object(), [4] * 4, None) is None


def test_calls_that_must_take_the_full_path_get_no_key(cuda_tensors, caplog):
    x, out = cuda_tensors
    op = ("all_gatherv", None, "per_rank", True)
    comm = _comm()
    assert symm_repeat.call_key(_comm(with_workspace=False), op, x, out, [4] * 4, None) is None
    assert symm_repeat.call_key(comm, op, x, out, None, None) is None              # sizes to exchange
    assert symm_repeat.call_key(comm, op, x, out, [np.int64(4)] * 4, None) is None
    assert symm_repeat.call_key(comm, op, x.numpy(), out, [4] * 4, None) is None   # not a torch tensor
    assert symm_repeat.call_key(comm, ("all_gatherv", ["nvfp4"], "per_rank", True), x, out, [4] * 4, None) is None
    assert symm_repeat.call_key(comm, op, x, out, [4] * 4, object()) is None       # a stream object
    comm._backend._depth = 1                                                      # inside comm.group()
    assert symm_repeat.call_key(comm, op, x, out, [4] * 4, None) is None
    comm._backend._depth = 0
    with caplog.at_level(logging.INFO, logger="fp4ccl.symm_repeat"):            # every choice is logged
        assert symm_repeat.call_key(comm, op, x, out, [4] * 4, None) is None


def test_a_call_is_recorded_only_when_one_graph_served_it(fakes):  # noqa: F811
    comm = _comm()
    ws = sc.workspace(comm)

    def call(n_runs, key="call", kind="op"):
        def full_path():
            for _ in range(n_runs):
                ws.run(1024, 5, (kind,), lambda s, local, slots: None)
            return "result"
        return symm_repeat.run(comm, (key,), ("op", "other op"), full_path)

    # calls 1 and 2 (one per half) are seen, 3 and 4 captured: the first graph run records the call
    assert [call(1) for _ in range(3)] == ["result"] * 3
    assert ws.repeats.known == {("call",): (("op",), 1024)}
    call(2, "twice")   # two runs in one call: the graph of one of them is not the whole call
    call(0, "none")    # served by NCCL, say
    for _ in range(4):
        call(1, "step", kind="a step")   # a run of another kind: a step of some other path
    assert set(ws.repeats.known) == {("call",)}

    def failing():
        ws.run(1024, 5, ("op",), lambda s, local, slots: None)
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        symm_repeat.run(comm, ("failing",), ("op",), failing)
    assert set(ws.repeats.known) == {("call",)}


def test_replay_launches_the_graph_of_the_half_the_call_gets_or_declines(fakes):  # noqa: F811
    comm = _comm()
    ws = sc.workspace(comm)
    for _ in range(4):   # both halves captured
        ws.run(1024, 5, ("op",), lambda s, local, slots: None)
    key = ("call", None, None, None, 5, ())
    assert key[symm_repeat.STREAM_AT] == 5
    assert not symm_repeat.replay(comm, key)      # not known yet
    ws.repeats.known[key] = (("op",), 1024)
    before = ws.calls
    fakes.calls.clear()
    assert symm_repeat.replay(comm, key)
    assert ws.calls == before + 1 and [c[0] for c in fakes.calls] == ["launch", "record"]
    assert not symm_repeat.replay(comm, key[:4] + (99,) + key[5:])   # that stream is being captured
    ws.repeats.known[key] = (("op",), 1 << 30)                         # more than the workspace holds
    assert not symm_repeat.replay(comm, key)
    ws.repeats.known[key] = (("other op",), 1024)                      # no graph for it
    assert not symm_repeat.replay(comm, key) and ws.calls == before + 1
    sc.forget_graphs(comm)
    assert not ws.repeats.known


def test_dispatch_runs_the_full_path_until_one_graph_serves_the_call_then_replays_it(fakes, cuda_tensors):  # noqa: F811
    x, out = cuda_tensors
    comm = _comm()
    ws = sc.workspace(comm)
    ran = []

    def full_path(tag):
        ran.append(tag)
        ws.run(1024, 5, ("op",), lambda s, local, slots: None)
        return "full"

    got = [symm_repeat.dispatch(comm, ("op",), ("op",), x, out, [4] * 4, None, full_path, i) for i in range(6)]
    # calls 0-1 seen, 2-3 captured (recorded), 4 and 5 replayed straight (one graph per half)
    assert got[:4] == ["full"] * 4 and got[4] is out and got[5] is out and ran == [0, 1, 2, 3]
    assert symm_repeat.dispatch(comm, ("op",), ("op",), x.numpy(), out, [4] * 4, None, full_path, "np") == "full"
