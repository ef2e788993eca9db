"""all_gather_matmul / matmul_reduce_scatter on the host backend at 1..4 ranks: the math the GPU path must match.

Every rank builds the whole problem from the seed, so it can check the full result, not only its part.
Products are compared with a float64 reference by ||out - ref|| / ||ref||: fp32 under 1e-5; bf16
(operands exact in bf16, one rounding of the result to bf16, 2^-9 relative) under 8e-3.
"""
from __future__ import annotations

import numpy as np
import pytest

from fp4ccl._arrays import numpy_dtype
from fp4ccl.overlap import all_gather_matmul, matmul_reduce_scatter
from harness import run_ranks

TOL = {"float32": 1e-5, "bfloat16": 8e-3, "float16": 2e-3}


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(np.float32).astype(numpy_dtype(dtype))


def _relerr(out, ref) -> float:
    out = np.asarray(out).astype(np.float64)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _to(framework, a):
    if framework == "numpy":
        return a
    import torch
    if a.dtype == numpy_dtype("bfloat16"):
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _np(x):
    if isinstance(x, np.ndarray):
        return x
    import torch
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return x.numpy()


# -- per-rank bodies (module level: the harness pickles them by reference) ---------------------------------

def check_ag(comm, seed, dtype, shard_shape, gather_dim, rhs, framework="numpy"):
    W, r = comm.size, comm.rank
    rng = np.random.default_rng(seed)
    shards = [_rand(rng, shard_shape, dtype) for _ in range(W)]
    a_full = np.concatenate(shards, axis=gather_dim)
    if rhs:
        bs = [_rand(rng, (5, a_full.shape[1]), dtype), _rand(rng, (3, a_full.shape[1]), dtype)]
    else:
        bs = [_rand(rng, (a_full.shape[-1], 6), dtype), _rand(rng, (a_full.shape[-1], 1), dtype)]
    got_a, outs = all_gather_matmul(comm, _to(framework, shards[r]), [_to(framework, b) for b in bs],
                                    gather_dim, gathered_rhs=rhs)
    assert np.array_equal(_np(got_a).view(np.uint8), a_full.view(np.uint8)), "a_full differs from the concatenation"
    assert len(outs) == len(bs)
    wide = a_full.astype(np.float64)
    for b, o in zip(bs, outs):
        ref = b.astype(np.float64) @ wide.T if rhs else np.matmul(wide, b.astype(np.float64))
        o = _np(o)
        assert o.shape == ref.shape and o.dtype == a_full.dtype, (o.shape, o.dtype, ref.shape)
        err = _relerr(o, ref)
        assert err < TOL[dtype], f"rel err {err:.2e} >= {TOL[dtype]} (W={W} dim={gather_dim} rhs={rhs})"
    # return_a=False and out= together: results land in the given arrays
    outs_buf = [np.full(_np(o).shape, np.nan, dtype=a_full.dtype) for o in outs]
    none_a, outs2 = all_gather_matmul(comm, shards[r], bs, gather_dim, return_a=False, out=outs_buf,
                                      gathered_rhs=rhs) if framework == "numpy" else (None, outs_buf)
    if framework == "numpy":
        assert none_a is None
        for o2, o, buf in zip(outs2, outs, outs_buf):
            assert o2 is buf
            assert np.array_equal(_np(o2).view(np.uint8), _np(o).view(np.uint8))
    return len(bs)


def check_rs(comm, seed, dtype, a_shape_full, n, scatter_dim, op, into_out=False):
    W, r = comm.size, comm.rank
    rng = np.random.default_rng(seed)
    K = a_shape_full[-1]
    A = _rand(rng, a_shape_full, dtype)
    B = _rand(rng, (K, n), dtype)
    k = K // W
    a_r = np.ascontiguousarray(A[..., r * k:(r + 1) * k])
    b_r = np.ascontiguousarray(B[r * k:(r + 1) * k])
    if into_out:
        shape = list(a_shape_full[:-1]) + [n]
        shape[scatter_dim] //= W
        buf = np.full(shape, np.nan, dtype=A.dtype)
        got = matmul_reduce_scatter(comm, a_r, b_r, scatter_dim, op, out=buf)
        assert got is buf, "out= must be the result"
    out = _np(got if into_out else matmul_reduce_scatter(comm, a_r, b_r, scatter_dim, op))
    full = np.matmul(A.astype(np.float64), B.astype(np.float64))
    if op == "avg":
        full = full / W
    size = full.shape[scatter_dim] // W
    ref = np.take(full, range(r * size, (r + 1) * size), axis=scatter_dim)
    assert out.shape == ref.shape and out.dtype == A.dtype, (out.shape, out.dtype, ref.shape)
    err = _relerr(out, ref)
    # partial products are rounded to the input dtype once each before the fp32 sum
    tol = TOL[dtype] * (2 if dtype != "float32" else 1)
    assert err < tol, f"rel err {err:.2e} >= {tol} (W={W} dim={scatter_dim} op={op})"
    return 1


def check_fp4_ag(comm, seed, fmt, gather_dim):
    from fp4ccl import formats
    W, r = comm.size, comm.rank
    rng = np.random.default_rng(seed)
    shards = [_rand(rng, (8, 64), "float32") for _ in range(W)]
    b = _rand(rng, (64 * (W if gather_dim == 1 else 1), 4), "float32")
    got_a, (out,) = all_gather_matmul(comm, shards[r], [b], gather_dim, compress=fmt)
    # peers' shards arrive dequantized; this rank's stays exact
    expect = [s if p == r else np.asarray(formats.dequantize(formats.quantize(s, format=fmt), dtype=np.float32))
              for p, s in enumerate(shards)]
    a_ref = np.concatenate(expect, axis=gather_dim)
    assert np.array_equal(np.asarray(got_a), a_ref.astype(np.float32))
    err = _relerr(out, a_ref.astype(np.float64) @ b.astype(np.float64))
    assert err < 1e-5, err
    if W > 1:  # the wire really was FP4: a peer's block is not the exact shard
        p = (r + 1) % W
        block = np.take(np.asarray(got_a), range(p * 8, p * 8 + 8) if gather_dim == 0 else range(p * 64, p * 64 + 64),
                        axis=gather_dim)
        assert not np.array_equal(block, shards[p])
    return 1


def expect_errors(comm, cases):
    """Run each bad call; every rank must raise the expected type. Then a good call must still work."""
    W, r = comm.size, comm.rank
    rng = np.random.default_rng(7)
    seen = []
    for name in cases:
        a = _rand(rng, (4, 8), "float32")
        b = _rand(rng, (8, 3), "float32")
        call, etype = {
            "no_chain": (lambda: all_gather_matmul(comm, a, [_rand(rng, (9, 3), "float32")]), ValueError),
            "dim_range": (lambda: all_gather_matmul(comm, a, [b], gather_dim=2), ValueError),
            "dim_range_one_rank": (lambda: all_gather_matmul(comm, a, [b], gather_dim=5 if r == W - 1 else 0),
                                   ValueError),
            "unequal_shards": (lambda: all_gather_matmul(comm, _rand(rng, (4 + (r == 0), 8), "float32"), [b]),
                               ValueError),
            "dtype_mismatch": (lambda: all_gather_matmul(comm, a, [b.astype(np.float64)]), TypeError),
            "bad_compress": (lambda: all_gather_matmul(comm, a, [b], compress="fp8"), ValueError),
            "return_a_not_bool": (lambda: all_gather_matmul(comm, a, [b], return_a="no"), TypeError),
            "gathered_rhs_not_bool": (lambda: all_gather_matmul(comm, a, [b], gathered_rhs=1), TypeError),
            "rs_no_chain": (lambda: matmul_reduce_scatter(comm, a, _rand(rng, (7, 3), "float32")), ValueError),
            "rs_op": (lambda: matmul_reduce_scatter(comm, _rand(rng, (4 * W, 8), "float32"), b, op="max"),
                      ValueError),
            "rs_dim_range": (lambda: matmul_reduce_scatter(comm, _rand(rng, (4 * W, 8), "float32"), b,
                                                           scatter_dim=-3), ValueError),
            "rs_indivisible": (lambda: matmul_reduce_scatter(comm, _rand(rng, (4 * W + 1, 8), "float32"), b),
                               ValueError),
            "rs_dtype": (lambda: matmul_reduce_scatter(comm, a.astype(numpy_dtype("bfloat16")), b), TypeError),
            "rs_out_shape": (lambda: matmul_reduce_scatter(comm, _rand(rng, (4 * W, 8), "float32"), b,
                                                           out=np.empty((4 * W + 1, 3), np.float32)), ValueError),
            "rs_out_dtype": (lambda: matmul_reduce_scatter(comm, _rand(rng, (4 * W, 8), "float32"), b,
                                                           out=np.empty((4, 3), np.float64)), ValueError),
        }[name]
        if W == 1 and name in ("unequal_shards",):
            continue
        if W == 1 and name == "rs_indivisible":
            continue
        try:
            call()
        except etype as err:
            seen.append((name, str(err)))
        else:
            raise AssertionError(f"{name}: no error on rank {r}")
    # the communicator is still in step after all of that
    a = _rand(np.random.default_rng(1), (2, 8), "float32")
    full, (out,) = all_gather_matmul(comm, a, [np.eye(8, dtype=np.float32)])
    assert np.asarray(out).shape == (2 * W, 8)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(full))
    return seen


# -- tests -------------------------------------------------------------------------------------------------------

RANKS = [1, 2, 3, 4]


@pytest.mark.parametrize("nranks", RANKS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gather_dim", [0, 1])
def test_all_gather_matmul_2d(nranks, dtype, gather_dim, seed):
    assert all(run_ranks(nranks, check_ag, seed, dtype, (6, 16), gather_dim, False))


@pytest.mark.parametrize("nranks", [2, 3])
@pytest.mark.parametrize("gather_dim", [0, 1, 2, -1])
def test_all_gather_matmul_leading_dims(nranks, gather_dim, seed):
    assert all(run_ranks(nranks, check_ag, seed, "float32", (3, 4, 8), gather_dim, False))


@pytest.mark.parametrize("nranks", [1, 2, 4])
@pytest.mark.parametrize("gather_dim", [0, 1])
def test_all_gather_matmul_gathered_rhs(nranks, gather_dim, seed):
    assert all(run_ranks(nranks, check_ag, seed, "bfloat16", (6, 16), gather_dim, True))


@pytest.mark.parametrize("nranks", [2])
def test_all_gather_matmul_torch_cpu(nranks, seed):
    pytest.importorskip("torch")
    assert all(run_ranks(nranks, check_ag, seed, "bfloat16", (6, 16), 0, False, "torch"))


@pytest.mark.parametrize("nranks", RANKS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scatter_dim", [0, 1])
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_matmul_reduce_scatter_2d(nranks, dtype, scatter_dim, op, seed):
    assert all(run_ranks(nranks, check_rs, seed, dtype, (12, 24), 12, scatter_dim, op))


@pytest.mark.parametrize("nranks", [2, 3])
@pytest.mark.parametrize("scatter_dim", [0, 1, 2])
def test_matmul_reduce_scatter_leading_dims(nranks, scatter_dim, seed):
    assert all(run_ranks(nranks, check_rs, seed, "float32", (6, 6, 12), 6, scatter_dim, "sum"))


@pytest.mark.parametrize("nranks", [1, 2, 3])
@pytest.mark.parametrize("scatter_dim", [0, 1, 2])
def test_matmul_reduce_scatter_into_out(nranks, scatter_dim, seed):
    assert all(run_ranks(nranks, check_rs, seed, "bfloat16", (6, 6, 12), 6, scatter_dim, "avg", True))


@pytest.mark.parametrize("nranks", [1, 2, 4])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("gather_dim", [0, 1])
def test_all_gather_matmul_fp4(nranks, fmt, gather_dim, seed):
    formats = pytest.importorskip("fp4ccl.formats")
    if not hasattr(formats, "quantize"):
        pytest.skip("fp4ccl.formats has no quantize yet")
    assert all(run_ranks(nranks, check_fp4_ag, seed, fmt, gather_dim))


BAD = ["no_chain", "dim_range", "dim_range_one_rank", "unequal_shards", "dtype_mismatch", "bad_compress",
       "return_a_not_bool", "gathered_rhs_not_bool", "rs_no_chain", "rs_op", "rs_dim_range", "rs_indivisible", "rs_dtype", "rs_out_shape", "rs_out_dtype"]


@pytest.mark.parametrize("nranks", [1, 3])
def test_bad_input_fails_on_every_rank(nranks):
    per_rank = run_ranks(nranks, expect_errors, BAD)
    for rank, seen in enumerate(per_rank):
        names = [n for n, _ in seen]
        expected = [n for n in BAD if not (nranks == 1 and n in ("unequal_shards", "rs_indivisible"))]
        assert names == expected, (rank, names)
        msgs = dict(seen)
        assert "gather_dim=2" in msgs["dim_range"]
        assert "do not chain" in msgs["no_chain"]
        assert "must match" in msgs["dtype_mismatch"]
        if nranks > 1:
            assert "rank" in msgs["unequal_shards"] and "different" in msgs["unequal_shards"]
            # the rank with the bad gather_dim says why; the others say which rank was bad
            assert "gather_dim=5" in msgs["dim_range_one_rank"] or f"rank {nranks - 1}" in msgs["dim_range_one_rank"]


def test_fast_key_only_for_checked_torch_calls(monkeypatch):
    """The per-call cache that skips the checks keys on everything they read, and stays off elsewhere."""
    torch = pytest.importorskip("torch")
    from fp4ccl import overlap

    class Comm:
        backend = "nccl"

    a, b = torch.zeros(4, 8), torch.zeros(8, 2)
    args = ("ag", 0, True, None, False)
    key = overlap._fast_key(Comm(), args, a, [b], None)
    assert key is not None and key == overlap._fast_key(Comm(), args, torch.ones(4, 8), [b], None)
    assert overlap._fast_key(Comm(), args, torch.zeros(8, 4).t(), [b], None) != key   # strides are part of it
    assert overlap._fast_key(Comm(), args, a, [b.double()], None) != key
    assert overlap._fast_key(Comm(), ("ag", True, True, None, False), a, [b], None) is None  # bool dim
    assert overlap._fast_key(Comm(), args, a.numpy(), [b], None) is None
    assert overlap._fast_key(Comm(), args, a, b, None) is None
    monkeypatch.setenv("FP4CCL_OVERLAP_STREAMS", "2")
    assert overlap._fast_key(Comm(), args, a, [b], None) != key
    streams2 = overlap._fast_key(Comm(), args, a, [b], None)
    monkeypatch.setenv("FP4CCL_OVERLAP_CHUNKS", "4")
    assert overlap._fast_key(Comm(), args, a, [b], None) != streams2  # every rank must pipeline alike
    monkeypatch.setenv("FP4CCL_OVERLAP_CHUNKS", "17")
    with pytest.raises(ValueError, match="FP4CCL_OVERLAP_CHUNKS='17' must be between 1 and 16"):
        overlap._variant()
    monkeypatch.delenv("FP4CCL_OVERLAP_CHUNKS")
    plain = overlap._fast_key(Comm(), args, a, [b], None)
    monkeypatch.setenv("FP4CCL_OVERLAP_DECODE", "Inline")
    assert overlap._variant()["decode"] == "inline" and overlap._fast_key(Comm(), args, a, [b], None) != plain
    monkeypatch.setenv("FP4CCL_OVERLAP_DECODE", "late")
    with pytest.raises(ValueError, match="FP4CCL_OVERLAP_DECODE='late' is not one of side, inline"):
        overlap._variant()
    monkeypatch.delenv("FP4CCL_OVERLAP_DECODE")
    assert overlap._variant()["decode"] == "side"
    monkeypatch.setenv("FP4CCL_OVERLAP_GRAPHS", "0")
    assert overlap._fast_key(Comm(), args, a, [b], None) != plain   # replaying or not is part of a call's key
    monkeypatch.delenv("FP4CCL_OVERLAP_GRAPHS")
    monkeypatch.setenv("FP4CCL_CHECK", "1")
    assert overlap._fast_key(Comm(), args, a, [b], None) is None
    Comm.backend = "host"
    monkeypatch.delenv("FP4CCL_CHECK")
    assert overlap._fast_key(Comm(), args, a, [b], None) is None


def test_split_covers_aligned():
    from fp4ccl.overlap import _split
    for total in (0, 1, 255, 256, 1000, 256000, 9437184 + 48):
        for parts in (1, 2, 3, 4):
            pieces = _split(total, parts, 256)
            assert len(pieces) <= parts
            assert sum(n for _, n in pieces) == total
            assert all(o % 256 == 0 for o, _ in pieces)
            assert [o for o, _ in pieces] == sorted(o for o, _ in pieces)
    assert _split(250, 3, 1) == [(0, 84), (84, 84), (168, 82)]


def test_pieces_per_shard_by_size_unless_forced():
    from fp4ccl.overlap import chunks_for
    assert chunks_for(1 << 20, None) == 1
    assert chunks_for(16 << 20, None) == 1
    assert chunks_for(32 << 20, None) == 2
    assert chunks_for(64 << 20, None) == 2
    assert chunks_for(64 << 20, 1) == 1 and chunks_for(1 << 10, 8) == 8


def test_replays_capture_only_what_repeats(monkeypatch):
    """A key seen once runs eagerly; the second time it is captured, then replayed; the cache is bounded
    and clear() forgets both the graphs and the keys seen."""
    from fp4ccl import overlap_replay

    class FakeGraph:
        def __init__(self):
            self.replays = 0

        def replay(self):
            self.replays += 1

    captured = []

    def capture(self, key, device, stream, enqueue):
        enqueue()
        graph = self._graphs[key] = FakeGraph()
        while len(self._graphs) > overlap_replay.GRAPHS_KEPT:
            self._graphs.popitem(last=False)
        captured.append(key)
        return graph

    monkeypatch.setattr(overlap_replay.Replays, "_capture", capture)
    rep = overlap_replay.Replays()
    calls = []
    assert rep.run(("k",), 0, None, lambda: calls.append(1)) is False and not calls and len(rep) == 0
    assert rep.run(("k",), 0, None, lambda: calls.append(1)) is True and calls == [1] and captured == [("k",)]
    assert rep.run(("k",), 0, None, lambda: calls.append(1)) is True and calls == [1]
    assert rep._graphs[("k",)].replays == 2
    for i in range(overlap_replay.GRAPHS_KEPT + 3):
        rep.run(("n", i), 0, None, lambda: None)
        rep.run(("n", i), 0, None, lambda: None)
    assert len(rep) == overlap_replay.GRAPHS_KEPT
    rep.clear()
    assert len(rep) == 0 and rep.run(("k",), 0, None, lambda: calls.append(1)) is False


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("0", False), ("off", False), ("False", False)])
def test_replays_switch(monkeypatch, value, on):
    from fp4ccl import overlap_replay
    monkeypatch.setenv("FP4CCL_OVERLAP_GRAPHS", value)
    assert overlap_replay.enabled() is on


def test_communicator_methods_spell_out_the_overlap_keywords():
    """help(comm.all_gather_matmul) lists every option, keyword-only and with overlap's defaults; out is
    keyword-only in matmul_reduce_scatter too, as in every other collective."""
    import inspect

    from fp4ccl import overlap
    from fp4ccl.communicator import Communicator
    for name in ("all_gather_matmul", "matmul_reduce_scatter"):
        method = inspect.signature(getattr(Communicator, name)).parameters
        function = inspect.signature(getattr(overlap, name)).parameters
        assert list(method)[1:] == list(function)[1:], name  # (self, ...) and (comm, ...)
        for p, q in zip(list(method.values())[1:], list(function.values())[1:]):
            assert (p.kind, p.default) == (q.kind, q.default), (name, p, q)
        assert not any(p.kind is p.VAR_KEYWORD for p in method.values()), name
        for kw in ("out", "stream"):
            assert method[kw].kind is inspect.Parameter.KEYWORD_ONLY and method[kw].default is None, (name, kw)
    kw = [n for n, p in inspect.signature(Communicator.all_gather_matmul).parameters.items()
          if p.kind is p.KEYWORD_ONLY]
    assert kw == ["return_a", "compress", "out", "gathered_rhs", "stream"]


def _through_the_communicator(comm):
    rng = np.random.default_rng(3)
    W = comm.size
    a = _rand(rng, (4, 8), "float32")
    b = _rand(rng, (8, 3), "float32")
    outs = [np.empty((4 * W, 3), np.float32)]
    none_a, got = comm.all_gather_matmul(a, [b], 0, return_a=False, out=outs, gathered_rhs=False)
    assert none_a is None and got[0] is outs[0]
    y = np.empty((4 // W, 3), np.float32) if 4 % W == 0 else None
    with pytest.raises(TypeError):
        comm.matmul_reduce_scatter(a, b, 0, "sum", y)  # out is keyword-only
    assert comm.matmul_reduce_scatter(a, b, 0, "sum", out=y) is y
    return True


def test_overlap_options_through_the_communicator():
    assert run_ranks(2, _through_the_communicator) == [True, True]


def _stream_ignored(comm):
    """stream= is taken and ignored on the host backend, as by its other collectives."""
    rng = np.random.default_rng(5)
    W = comm.size
    a = _rand(rng, (4, 8), "float32")
    b = _rand(rng, (8, 3), "float32")
    a_rs = _rand(rng, (4 * W, 8), "float32")
    full, (prod,) = comm.all_gather_matmul(a, [b])
    red = comm.matmul_reduce_scatter(a_rs, b)
    for stream in (0, 7):   # raw handles: the host collectives take them and ignore them
        assert np.array_equal(comm.all_gather(a, stream=stream), comm.all_gather(a))
        got_full, (got,) = comm.all_gather_matmul(a, [b], stream=stream)
        assert np.array_equal(got_full, full) and np.array_equal(got, prod)
        _, (got,) = all_gather_matmul(comm, a, [b], return_a=False, out=[np.empty_like(prod)], stream=stream)
        assert np.array_equal(got, prod)
        assert np.array_equal(comm.matmul_reduce_scatter(a_rs, b, stream=stream), red)
        assert np.array_equal(matmul_reduce_scatter(comm, a_rs, b, out=np.empty_like(red), stream=stream), red)
    return True


@pytest.mark.parametrize("nranks", [1, 2])
def test_stream_is_ignored_on_the_host_backend(nranks):
    assert run_ranks(nranks, _stream_ignored) == [True] * nranks


def _read_only_out(comm, only_last: bool):
    """A read-only numpy out= is refused with a ValueError on every rank before any rows move (the
    collectives the host path sends them with are never called), and the ranks stay in step."""
    W, r = comm.size, comm.rank
    rng = np.random.default_rng(11)
    a = _rand(rng, (4, 8), "float32")
    b = _rand(rng, (8, 3), "float32")
    a_rs = _rand(rng, (4 * W, 8), "float32")

    frozen = r == W - 1 or not only_last

    def out(shape):
        o = np.zeros(shape, np.float32)
        o.flags.writeable = not frozen
        return o

    sent = []

    def spy(name):
        real = getattr(comm, name)

        def call(*args, **kwargs):
            sent.append(name)
            return real(*args, **kwargs)
        return call

    for name in ("all_gather", "reduce_scatter"):
        setattr(comm, name, spy(name))   # the host path moves the rows through these two
    msgs = []
    try:
        for call in (lambda: comm.all_gather_matmul(a, [b], out=[out((4 * W, 3))]),
                     lambda: comm.all_gather_matmul(a, [b, b], return_a=False,
                                                    out=[np.empty((4 * W, 3), np.float32), out((4 * W, 3))]),
                     lambda: comm.matmul_reduce_scatter(a_rs, b, out=out((4, 3)))):
            with pytest.raises(ValueError) as err:
                call()
            msgs.append(str(err.value))
        assert not sent, f"rank {r}: {sent} ran before the read-only out= was refused"
    finally:
        for name in ("all_gather", "reduce_scatter"):
            delattr(comm, name)
    _, (prod,) = comm.all_gather_matmul(a, [b], out=[np.empty((4 * W, 3), np.float32)])
    assert np.asarray(prod).shape == (4 * W, 3)
    return msgs


@pytest.mark.parametrize("nranks", [1, 3])
@pytest.mark.parametrize("only_last", [False, True])
def test_read_only_out_refused_on_every_rank_before_sending(nranks, only_last):
    for rank, msgs in enumerate(run_ranks(nranks, _read_only_out, only_last)):
        assert len(msgs) == 3, (rank, msgs)
        for msg in msgs:
            assert "read-only" in msg, (rank, msg)
            if only_last and nranks > 1 and rank != nranks - 1:
                assert f"rank {nranks - 1}" in msg and "nothing was sent" in msg, (rank, msg)
        assert msgs[0].startswith("all_gather_matmul: ") and "out[0]" in msgs[0], (rank, msgs[0])
        assert "out[1]" in msgs[1], (rank, msgs[1])
        assert msgs[2].startswith("matmul_reduce_scatter: "), (rank, msgs[2])


def test_stream_given_becomes_torch_current_stream_on_the_device(monkeypatch):
    """On a GPU backend, stream= (a raw handle, or anything with .ptr such as a CuPy stream) is wrapped as
    a torch stream of the communicator's device, once per handle, and made current for the call; a torch
    stream is used as it is, and refused on another device; the stream that is current already, or
    None, switches nothing; anything else is a TypeError."""
    torch = pytest.importorskip("torch")
    import contextlib
    import types

    from fp4ccl import _arrays, overlap

    entered = []

    class FakeStream:
        def __init__(self, handle, device=None):
            self.cuda_stream, self.device = handle, types.SimpleNamespace(index=device)

    class External(FakeStream):
        pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "ExternalStream", External)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: entered.append(s) or contextlib.nullcontext())
    monkeypatch.setattr(_arrays, "torch_current_stream", lambda device: 0x11)
    monkeypatch.setattr(overlap, "_EXTERNAL_STREAMS", {})
    comm = types.SimpleNamespace(backend="nccl", device=3)
    for given in (0xAB, types.SimpleNamespace(ptr=0xCD), 0xAB):
        with overlap._on_stream(comm, given):
            pass
    mine = FakeStream(0xEF, device=3)
    with overlap._on_stream(comm, mine):
        pass
    assert [(s.cuda_stream, s.device.index) for s in entered[:3]] == [(0xAB, 3), (0xCD, 3), (0xAB, 3)]
    assert all(type(s) is External for s in entered[:3]) and entered[0] is entered[2] and entered[3] is mine
    with pytest.raises(TypeError, match="stream"):
        overlap._on_stream(comm, "7")
    with pytest.raises(ValueError, match="cuda:2, the communicator's device is cuda:3"):
        overlap._on_stream(comm, FakeStream(0xEF, device=2))
    entered.clear()
    for given in (None, 0x11, FakeStream(0x11, device=3)):   # nothing to switch
        with overlap._on_stream(comm, given):
            pass
    with overlap._on_stream(types.SimpleNamespace(backend="host", device=None), 0xAB):
        pass
    assert not entered


def _argument_check_times_out(comm, op):
    """A peer that never makes the call: the argument check's exchange times out as a collective does (a
    CommTimeoutError naming the call, the communicator closed), not as a bare store TimeoutError."""
    import fp4ccl
    from fp4ccl.errors import CommClosedError, CommTimeoutError
    own = fp4ccl.init("host")   # a communicator of its own: the pool's must stay usable

    def never(data):
        raise TimeoutError("get('fp4ccl/j/comm2/ag/1/0') timed out after 0.3 s")
    own._exchange.all_gather_bytes = never
    a, b = np.ones((2, 4), np.float32), np.ones((4, 3), np.float32)
    call = (lambda: own.all_gather_matmul(a, [b])) if op == "all_gather_matmul" else \
        (lambda: own.matmul_reduce_scatter(np.ones((2 * comm.size, 4), np.float32), b))
    with pytest.raises(CommTimeoutError, match=rf"{op}: the argument check on rank {comm.rank} of {comm.size} timed out"):
        call()
    with pytest.raises(CommClosedError):
        own.all_reduce(a)
    own.destroy()
    return True


@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter"])
def test_argument_check_that_times_out_closes_the_communicator(op):
    assert run_ranks(2, _argument_check_times_out, op) == [True, True]
