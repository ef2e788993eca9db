"""Every collective on the NCCL backend, torch and CuPy arrays, 2 and 4 ranks, against the numpy reference."""
from __future__ import annotations

import re

import pytest

import collective_checks as cc
from conftest import need_gpus
from harness import run_ranks

CHECKS = {
    **cc.COLLECTIVES,
    "all_gatherv": cc.check_all_gatherv,
    "reduce_scatterv": cc.check_reduce_scatterv,
}
EXACT_ONLY = ("broadcast", "all_gather", "all_to_all", "all_gatherv")


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("name", list(CHECKS))
def test_nccl_collective(name, framework, nranks, seed):
    need_gpus(nranks)
    pytest.importorskip(framework)
    if name in EXACT_ONLY:
        counts = run_ranks(nranks, CHECKS[name], seed, framework, backend="nccl")
    else:
        counts = run_ranks(nranks, _inexact, name, seed, framework, backend="nccl")
    assert all(c > 0 for c in counts)


def _inexact(comm, name, seed, framework):
    return CHECKS[name](comm, seed, framework, exact=False)


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("name", ["send_recv_ring", "group_batch", "v_bad_input", "in_place_and_overlap",
                                  "autograd_sees_writes"])
def test_nccl_p2p_groups_and_errors(name, nranks, seed):
    need_gpus(nranks)
    fn = {"send_recv_ring": cc.check_send_recv_ring, "group_batch": cc.check_group_batch,
          "v_bad_input": cc.check_v_bad_input, "in_place_and_overlap": cc.check_in_place_and_overlap,
          "autograd_sees_writes": cc.check_autograd_sees_writes}[name]
    assert all(run_ranks(nranks, fn, seed, "torch", backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["padded", "bcast", "p2p", "symm", "ce", "ce3"])
def test_all_gatherv_each_algorithm(algo, seed):
    need_gpus(4)
    assert all(run_ranks(4, _with_algo, algo, "all_gatherv", seed, backend="nccl"))


@pytest.mark.gpu
def test_symm_v_collectives_at_two_ranks(seed):
    need_gpus(2)
    assert all(run_ranks(2, _with_algo, "symm", "all_gatherv", seed, backend="nccl"))
    assert all(run_ranks(2, _with_algo, "symm", "reduce_scatterv", seed, backend="nccl"))
    assert all(run_ranks(2, _with_algo, "ce3", "all_gatherv", seed, backend="nccl"))
    assert all(run_ranks(2, _with_algo, "ce3", "reduce_scatterv", seed, backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["padded", "reduce", "symm", "ce", "ce3"])
def test_reduce_scatterv_each_algorithm(algo, seed):
    need_gpus(4)
    assert all(run_ranks(4, _with_algo, algo, "reduce_scatterv", seed, backend="nccl"))


def _with_algo(comm, algo, name, seed):
    """A check under FP4CCL_ALGO=algo; "ce3" is "ce" in 3 pieces (FP4CCL_CE_PIECES), so that pieces of
    uneven length, and empty ones, are exercised at the checks' small sizes."""
    import os
    os.environ["FP4CCL_ALGO"] = "ce" if algo == "ce3" else algo
    if algo == "ce3":
        os.environ["FP4CCL_CE_PIECES"] = "3"
    try:
        if name == "all_gatherv":
            cc.check_all_gatherv(comm, seed, "torch", ["bfloat16", "float32", "int8"])
        else:
            cc.check_reduce_scatterv(comm, seed, "torch", ["bfloat16", "float32"], exact=False)
        cc.check_v_in_place(comm, seed, "torch", (name,))   # its in-place form, under this algorithm
        return _repeated_v_calls(comm, name, seed)
    finally:
        os.environ.pop("FP4CCL_ALGO", None)
        os.environ.pop("FP4CCL_CE_PIECES", None)


def _repeated_v_calls(comm, name, seed):
    """The same call on the same buffers four times with fresh inputs: the symmetric-memory algorithms
    capture the second and replay their graph from the third (both workspace halves), which must
    give the same results as running the steps."""
    import numpy as np
    import torch
    dev = f"cuda:{comm.device}"
    sizes = [(1000 + 37 * r) if r != 1 else 0 for r in range(comm.size)]
    inner = 24
    gather = name == "all_gatherv"
    x = torch.empty((sizes[comm.rank] if gather else sum(sizes), inner), dtype=torch.bfloat16, device=dev)
    out = torch.empty((sum(sizes) if gather else sizes[comm.rank], inner), dtype=torch.bfloat16, device=dev)
    for step in range(4):
        rows = sizes if gather else [sum(sizes)] * comm.size
        xs = [torch.from_numpy(np.random.default_rng([seed, r, step]).integers(-8, 9, (rows[r], inner))
                               .astype(np.float32)).to(torch.bfloat16) for r in range(comm.size)]
        x.copy_(xs[comm.rank])
        out.fill_(-77.0)
        if gather:
            comm.all_gatherv(x, sizes, out=out)
            want = torch.cat(xs)
        else:
            comm.reduce_scatterv(x, sizes, out=out)
            lo = sum(sizes[:comm.rank])
            want = sum(xs[r].float() for r in range(comm.size))[lo:lo + sizes[comm.rank]].to(torch.bfloat16)
        torch.cuda.synchronize(comm.device)
        assert torch.equal(out.cpu(), want), f"rank {comm.rank}: {name} call {step} differs (seed {seed})"
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
def test_work_lands_on_the_callers_stream(nranks):
    need_gpus(nranks)
    assert all(run_ranks(nranks, check_stream_rule, backend="nccl"))


def check_stream_rule(comm):
    """A collective issued under `torch.cuda.stream(s)` runs on s, after what s already holds."""
    import torch
    x = torch.full((1 << 16,), float(comm.rank + 1), device=f"cuda:{comm.device}")
    out = torch.full_like(x, -7.0)
    side = torch.cuda.Stream(device=comm.device)
    torch.cuda.synchronize(comm.device)
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on the side stream
        comm.all_reduce(x, out=out)
    snapshot = out.clone()  # on the default stream, which is not ordered after `side`
    torch.cuda.current_stream(comm.device).synchronize()
    assert bool((snapshot == -7.0).all()), f"rank {comm.rank}: the all_reduce did not wait for the side stream"
    side.synchronize()
    want = comm.size * (comm.size + 1) / 2
    assert bool((out == want).all()), f"rank {comm.rank}: all_reduce result {out[:4]} != {want}"
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
def test_cuda_graph_capture_of_v_collectives(nranks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, check_graph_capture, seed, backend="nccl"))


def check_graph_capture(comm, seed):
    """all_gatherv / reduce_scatterv with sizes given are captured once and replayed on fresh inputs."""
    import numpy as np
    import torch
    dev = f"cuda:{comm.device}"
    sizes = [0 if r == 1 else 3 + r for r in range(comm.size)]
    x = torch.empty((sizes[comm.rank], 8), device=dev)
    y = torch.empty((sum(sizes), 8), device=dev)
    gathered = torch.empty((sum(sizes), 8), device=dev)
    scattered = torch.empty((sizes[comm.rank], 8), device=dev)
    import os
    # A forced "symm" or "ce" cannot run under capture: it must fall back to an NCCL algorithm, not hang.
    for gather_algo, scatter_algo in (("padded", "padded"), ("bcast", "reduce"), ("symm", "symm"), ("ce", "ce")):
        def ops():
            os.environ["FP4CCL_ALGO"] = gather_algo
            comm.all_gatherv(x, sizes, out=gathered)
            os.environ["FP4CCL_ALGO"] = scatter_algo
            comm.reduce_scatterv(y, sizes, out=scattered)
            del os.environ["FP4CCL_ALGO"]
        stream = torch.cuda.Stream(device=comm.device)
        with torch.cuda.stream(stream):  # warm up outside capture so workspaces exist
            ops()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            ops()
        algo = f"{gather_algo}/{scatter_algo}"
        for step in range(3):
            xs = [np.random.default_rng([seed, r, step]).standard_normal((sizes[r], 8)).astype(np.float32)
                  for r in range(comm.size)]
            ys = [np.random.default_rng([seed, r, step, 1]).integers(-8, 8, (sum(sizes), 8)).astype(np.float32)
                  for r in range(comm.size)]
            x.copy_(torch.from_numpy(xs[comm.rank]))
            y.copy_(torch.from_numpy(ys[comm.rank]))
            graph.replay()
            torch.cuda.synchronize(comm.device)
            assert np.array_equal(gathered.cpu().numpy(), np.concatenate(xs)), f"rank {comm.rank} {algo} step {step}"
            off = sum(sizes[:comm.rank])
            want = np.sum(ys, axis=0)[off:off + sizes[comm.rank]]
            assert np.array_equal(scattered.cpu().numpy(), want), f"rank {comm.rank} rs {algo} step {step}"
    return True


# -- the segmented copy behind the padded v-collectives (csrc/vcopy.cu) -------------------------------

def _vcopy_cases(maxseg):
    """Segment lists (dst_off, src_off, nbytes), offsets into two 24 MiB buffers, none overlapping."""
    MiB = 1 << 20
    odd = [(0, 0, 1), (64, 64, 3), (128, 128, 17), (4096, 4096, 4095), (9000, 9000, 16)]
    unaligned = [(1, 4, 100), (1000, 1005, 257),       # not co-aligned at all: bytes
                 (2003, 5011, 1000),                   # co-aligned mod 16: a byte head, then 16-byte words
                 (3008, 6024, 999),                    # co-aligned mod 8 only
                 (4100, 7104, 998), (5200, 8210, 997)]  # mod 4 only, mod 2 only
    zeros = [(0, 0, 0), (16, 32, 40), (100, 200, 0), (300, 400, 0), (500, 600, 9), (700, 800, 0)]
    many = [(i * 1000 + (i % 7), i * 1000 + (i % 5), (i * 37) % 900) for i in range(maxseg + 37)]
    big = [(16, 48, 8 * MiB + 5), (9 * MiB + 1, 10 * MiB + 1, 3 * MiB), (13 * MiB, 13 * MiB + 8, 2 * MiB + 3),
           (20 * MiB, 20 * MiB, 0)]
    return {"odd": odd, "unaligned": unaligned, "zeros": zeros, "many": many, "big": big}


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["odd", "unaligned", "zeros", "many", "big"])
def test_vcopy_kernel_copies_exactly_the_segments(case):
    need_gpus(1)
    import cupy
    import numpy as np
    from fp4ccl import vcollectives as vc
    segs = _vcopy_cases(vc.VCOPY_MAXSEG)[case]
    n = 24 << 20
    rng = np.random.default_rng(sum(map(ord, case)))
    host_src = rng.integers(0, 256, n, dtype=np.uint8)
    with cupy.cuda.Device(0):
        src = cupy.asarray(host_src)
        dst = cupy.full(n, 0xA5, dtype=cupy.uint8)
        # The upload and the fill ran on CuPy's default stream, which a non-blocking stream does not
        # wait for: finish them first, or the copy races them.
        cupy.cuda.Device(0).synchronize()
        stream = cupy.cuda.Stream(non_blocking=True)
        table = [(int(dst.data.ptr) + d, int(src.data.ptr) + s, k) for d, s, k in segs]
        assert vc.launch_vcopy(0, table, stream.ptr), "the kernel did not load (see FP4CCL_DEBUG=INFO)"
        stream.synchronize()
        got = cupy.asnumpy(dst)
    want = np.full(n, 0xA5, np.uint8)
    for d, s, k in segs:
        want[d:d + k] = host_src[s:s + k]
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{case}: {bad.size} wrong bytes, first at {bad[:8].tolist()}"


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
def test_padded_v_collectives_use_the_kernel(nranks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, _padded_with_kernel, seed, backend="nccl"))


def _padded_with_kernel(comm, seed):
    import os
    from fp4ccl import vcollectives as vc
    os.environ["FP4CCL_ALGO"] = "padded"
    try:
        cc.check_all_gatherv(comm, seed, "torch", ["bfloat16", "int8"])
        cc.check_all_gatherv(comm, seed, "cupy", ["uint8", "float64"])
        cc.check_reduce_scatterv(comm, seed, "torch", ["float32", "int32"], exact=False, ops=("sum",))
    finally:
        del os.environ["FP4CCL_ALGO"]
    assert vc._vcopy.get(comm.device) is not None, f"rank {comm.rank}: fell back to memcpy (kernel unavailable)"
    return True


@pytest.mark.gpu
def test_automatic_choice_in_every_size_band(seed):
    need_gpus(4)
    assert all(run_ranks(4, _every_band, seed, backend="nccl"))


def _every_band(comm, seed):
    """bf16 rows of 64 elements, ranks at 1.25x / 0.75x of the mean, totals in each band of choose()."""
    import torch
    from fp4ccl import vcollectives as vc
    dev = f"cuda:{comm.device}"
    row = 64 * 2
    seen, symm = [], []  # the choice without and with symmetric memory (what these calls take here)
    for total in (48 << 10, 8 << 20, 32 << 20, 64 << 20):
        mean = total // row // comm.size
        sizes = [mean + (mean // 4 if r % 2 == 0 else -(mean // 4)) for r in range(comm.size)]
        counts = [s * 64 for s in sizes]
        seen.append((vc.choose("all_gatherv", counts, 2), vc.choose("reduce_scatterv", counts, 2)))
        symm.append((vc.choose("all_gatherv", counts, 2, symm_ok=True),
                     vc.choose("reduce_scatterv", counts, 2, symm_ok=True)))
        g = torch.Generator().manual_seed(seed + comm.rank)
        x = torch.randint(-4, 5, (sizes[comm.rank], 64), generator=g).to(torch.bfloat16).to(dev)
        full = comm.all_gatherv(x, sizes)
        parts = [torch.randint(-4, 5, (sizes[r], 64), generator=torch.Generator().manual_seed(seed + r))
                 for r in range(comm.size)]
        assert torch.equal(full.cpu(), torch.cat(parts).to(torch.bfloat16)), f"rank {comm.rank} total {total}"
        y = torch.full((sum(sizes), 64), float(comm.rank + 1), dtype=torch.bfloat16, device=dev)
        mine = comm.reduce_scatterv(y, sizes)
        torch.cuda.synchronize(comm.device)
        want = comm.size * (comm.size + 1) / 2
        assert mine.shape == (sizes[comm.rank], 64) and bool((mine == want).all()), f"rank {comm.rank} total {total}"
    assert seen == [("bcast", "reduce"), ("p2p", "reduce"), ("p2p", "padded"), ("bcast", "reduce")], seen
    assert symm == [("symm", "symm"), ("ce", "symm"), ("ce", "ce"), ("ce", "ce")], symm
    return True


# Calls of every symmetric-memory form: those with a checked barrier (plain, FP4 steps, raw, push) and the
# one-launch FP4 forms, which compare signatures in their flags; each as (settings, call(comm, x, sizes)).
_MISMATCH_CALLS = {
    "all_gatherv": ({"FP4CCL_ALGO": "symm"}, lambda c, x, sizes: c.all_gatherv(x, sizes)),
    "all_gatherv_ce": ({"FP4CCL_ALGO": "ce"}, lambda c, x, sizes: c.all_gatherv(x, sizes)),
    "reduce_scatterv": ({"FP4CCL_ALGO": "symm"}, lambda c, x, sizes: c.reduce_scatterv(x, sizes)),
    "nvfp4_gather": ({"FP4CCL_FP4_GATHER_FORM": "steps"},
                     lambda c, x, sizes: c.all_gatherv(x, sizes, compress="nvfp4")),
    "nvfp4_gather_raw": ({}, lambda c, x, sizes: c.all_gatherv(x, sizes, compress="nvfp4", dequantize=False)),
    "mxfp4_reduce_scatterv": ({"FP4CCL_FP4_RS_FORM": "push"},
                              lambda c, x, sizes: c.reduce_scatterv(x, sizes, compress="mxfp4")),
    # the one-launch forms compare the signatures in their flags instead
    "nvfp4_gather_ll": ({"FP4CCL_FP4_GATHER_FORM": "ll"},
                        lambda c, x, sizes: c.all_gatherv(x, sizes, compress="nvfp4")),
    "nvfp4_reduce_scatterv_ll": ({"FP4CCL_FP4_RS_FORM": "ll"},
                                 lambda c, x, sizes: c.reduce_scatterv(x, sizes, compress="nvfp4")),
}


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("call", list(_MISMATCH_CALLS))
def test_ranks_in_different_calls_are_found_on_the_device(call, nranks, seed):
    """Rank 0 passes sizes that say rank 1 has one row fewer than it has. No host round trip can see
    that (FP4CCL_CHECK is off); the device must: no hang, and every rank raises
    CallMismatchError within two calls (the ranks that compared the signatures at the very next one),
    after which the communicator is closed."""
    need_gpus(nranks)
    results = run_ranks(nranks, _ranks_in_different_calls, call, seed, backend="nccl")
    print(results)
    assert min(at for at, _ in results) == 0, f"no rank found the mismatch at the next call: {results}"
    for rank, (at, msg) in enumerate(results):
        assert at <= 1, f"rank {rank} raised only {at + 1} calls after the mismatch: {msg}"
        assert "different collective calls" in msg and "void" in msg, f"rank {rank}: {msg}"
    # a rank that found it names its own call: its sizes in rows (FP4 forms) or elements (64 a row)
    for msg in (msg for at, msg in results if at == 0):
        assert re.search(r"was in \w+\((sizes=\(4, [34]|elements=\(256, (192|256))", msg), msg


def _ranks_in_different_calls(comm, call, seed):
    import numpy as np
    import torch
    import fp4ccl
    from fp4ccl.errors import CallMismatchError, CommClosedError
    from harness import env
    settings, fn = _MISMATCH_CALLS[call]
    gather = "gather" in call
    me, n = comm.rank, comm.size
    good = [4] * n
    bad = list(good)
    if me == 0:
        bad[1] = 3
    rng = np.random.default_rng([seed, me])

    def x_for(sizes):
        rows = sizes[me] if gather else sum(sizes)
        return torch.from_numpy(rng.standard_normal((rows, 64), dtype=np.float32)).to(f"cuda:{comm.device}",
                                                                                       torch.bfloat16)

    c = fp4ccl.init("nccl")   # a communicator of its own: this test breaks it on purpose
    try:
        with env({"FP4CCL_FP4_ALGO": "symm", "FP4CCL_TIMEOUT": "60", **settings}):
            fn(c, x_for(good), good)                  # agreed: sizes the workspace, must not raise
            torch.cuda.synchronize(c.device)
            fn(c, x_for(bad), bad)                    # rank 0 disagrees about rank 1's rows
            torch.cuda.synchronize(c.device)          # no hang: the barrier ends
            for at in range(3):
                try:
                    fn(c, x_for(good), good)
                    torch.cuda.synchronize(c.device)
                except CallMismatchError as err:
                    with pytest.raises(CommClosedError, match="found in different calls"):
                        fn(c, x_for(good), good)
                    return at, str(err)
        raise AssertionError(f"rank {me}: no CallMismatchError within 3 calls after the mismatch (seed {seed})")
    finally:
        c.destroy()   # after the error: a local abort
