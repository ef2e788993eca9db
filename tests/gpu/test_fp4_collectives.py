"""FP4-aware collectives on the NCCL backend (CUDA kernels), 2 and 4 ranks, torch and CuPy."""
from __future__ import annotations

import contextlib

import pytest

import fp4_collective_checks as fc
from conftest import need_gpus
from harness import env, run_ranks


# Each check runs on both transports: "symm" (symmetric memory, the default on one node) and "nccl";
# "symm-steps" is symm with the one-launch small-input kernels off (FP4CCL_SMALL_QUANTIZE_BYTES=0,
# FP4CCL_FP4_GATHER_FORM=steps, FP4CCL_FP4_RS_FORM=store), so the separate amax, quantize, barrier and
# decode launches stay tested at these sizes too; plain "symm" gathers and reduce-scatters with the
# one-launch kernels.
PATHS = ["symm", "symm-steps", "nccl"]


# "symm-cepull": symm with the raw gathers' data pulled by the copy engine (FP4CCL_FP4_RAW_PULL=ce; by
# default only segments from 8 MiB are) instead of copied by the SMs.
VARIANTS = {"steps": {"FP4CCL_SMALL_QUANTIZE_BYTES": "0", "FP4CCL_FP4_GATHER_FORM": "steps", "FP4CCL_FP4_RS_FORM": "store"},
            "cepull": {"FP4CCL_FP4_RAW_PULL": "ce"}}


def _on_path(comm, path, check, *args):
    algo, _, variant = path.partition("-")
    with env({"FP4CCL_FP4_ALGO": algo, **VARIANTS.get(variant, {})}):
        return check(comm, *args)


def _rs_form_env(form):
    """FP4CCL_* settings of a reduce-scatter form; "push:3" is the push form over 3 copy streams."""
    name, _, streams = form.partition(":")
    return {"FP4CCL_FP4_RS_FORM": name, **({"FP4CCL_FP4_RS_PUSH_STREAMS": streams} if streams else {})}


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("fmt, global_scale", [("nvfp4", "per_rank"), ("nvfp4", "shared"), ("mxfp4", "per_rank"),
                                               ("mxfp4", "shared")])
def test_fp4_all_gatherv_bit_exact(fmt, global_scale, framework, nranks, path, seed):
    need_gpus(nranks)
    pytest.importorskip(framework)
    assert all(run_ranks(nranks, _on_path, path, fc.check_fp4_all_gatherv, seed, framework, fmt, global_scale,
                         backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("fmt, global_scale", [("nvfp4", "per_rank"), ("nvfp4", "shared"), ("mxfp4", "per_rank")])
def test_fp4_raw_gather_ce_pull(fmt, global_scale, nranks, seed):
    """The raw gathers with the peers' data pulled by the copy engine (FP4CCL_FP4_RAW_PULL=ce), their
    scales and the own rows copied by the SMs beside it."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, _on_path, "symm-cepull", fc.check_fp4_all_gatherv, seed, "torch", fmt, global_scale,
                         backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_fp4_gather_into_a_bad_out(framework, path, seed):
    need_gpus(2)
    pytest.importorskip(framework)
    assert all(run_ranks(2, _on_path, path, fc.check_fp4_gather_out_errors, seed, framework, backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS + ["symm-cepull"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_gather_of_an_fp4tensor(fmt, path, seed):
    need_gpus(4)
    assert all(run_ranks(4, _on_path, path, fc.check_fp4_gather_tensor_as_is, seed, "torch", fmt, backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_results_come_in_the_input_framework(fmt, framework, path, seed):
    """Gathered FP4 tensors, and fp4ccl.dequantize of them (each rank's rows with its own scale), in the
    input's framework; a 'shared' gather's global scale 0-d."""
    need_gpus(2)
    pytest.importorskip(framework)
    assert all(run_ranks(2, _on_path, path, fc.check_fp4_results_in_input_framework, seed, framework, fmt,
                         backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_gather_of_an_fp4tensor_options(fmt, framework, nranks, path, seed):
    """dequantize=True decodes an FP4Tensor's gather (a step after the gather, on every path);
    global_scale= and another format's compress= are refused before anything moves."""
    need_gpus(nranks)
    pytest.importorskip(framework)
    assert all(run_ranks(nranks, _on_path, path, fc.check_fp4_gather_tensor_options, seed, framework, fmt,
                         backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_reduce_scatterv(fmt, framework, nranks, path, seed):
    need_gpus(nranks)
    pytest.importorskip(framework)
    assert all(run_ranks(nranks, _on_path, path, fc.check_fp4_reduce_scatterv, seed, framework, fmt, backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_fp4_stochastic_rounding(path, seed):
    need_gpus(2)
    assert all(run_ranks(2, _on_path, path, fc.check_fp4_stochastic_rounding, seed, "torch", "nvfp4", backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["pull", "store", "push", "push:3"])
@pytest.mark.parametrize("nranks", [2, 4])
def test_fp4_reduce_scatterv_pipelined(nranks, form, seed):
    """The symmetric-memory reduce-scatter's large-input forms on small inputs, forced by
    FP4CCL_FP4_RS_FORM: pull (a barrier and a copy-engine pull per stage on a side stream while the
    next stage quantizes), store (quantize stores into the peers' slots, amax passes ahead on a side
    stream) and push (copy-engine pushes of each quantized chunk into its peer's slot)."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, _pipelined_reduce_scatter, seed, form, backend="nccl"))


def _pipelined_reduce_scatter(comm, seed, form):
    with env(_rs_form_env(form)):
        for fmt, framework in (("nvfp4", "torch"), ("mxfp4", "cupy")):
            _on_path(comm, "symm", fc.check_fp4_reduce_scatterv, seed, framework, fmt)
        return _on_path(comm, "symm", fc.check_fp4_stochastic_rounding, seed, "torch", "nvfp4")


# Every transport and form of the FP4 reduce-scatter: (FP4CCL_FP4_ALGO, FP4CCL_FP4_RS_FORM or None)
SEED_FORMS = {"nccl": ("nccl", None), "ll": ("symm", "ll"), "steps": ("symm", "steps"), "pull": ("symm", "pull"),
              "store": ("symm", "store"), "push": ("symm", "push")}


@pytest.mark.gpu
@pytest.mark.parametrize("form", list(SEED_FORMS))
@pytest.mark.parametrize("nranks", [2, 4])
def test_fp4_reduce_scatterv_with_a_device_seed(nranks, form, seed):
    """seed=<one-element int64 tensor on the GPU>, on every transport and form: eagerly the bytes of the
    same int seed with the value the tensor holds when the call runs (repeated calls with one tensor
    replay the workspace's own graph of their steps, which must read the new value), bad seed arrays
    refused on every rank; calls into out= with one tensor take symm_repeat's fast path and still read its
    value; captured in the caller's CUDA graph together with seed.add_(1) (the forms other
    than ll then run over NCCL, as any capture does), replay k rounds with the captured value + k."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, _device_seed_reduce_scatter, seed, form, backend="nccl"))


def _device_seed_reduce_scatter(comm, seed, form):
    import numpy as np
    import torch
    from collective_checks import to_framework, to_numpy
    from fp4_collective_checks import shard
    algo, rs_form = SEED_FORMS[form]
    settings = {"FP4CCL_FP4_ALGO": algo, **({"FP4CCL_FP4_RS_FORM": rs_form} if rs_form else {})}
    n, me = comm.size, comm.rank
    with env(settings):
        for fmt, framework in (("nvfp4", "torch"), ("mxfp4", "cupy")):
            fc.check_fp4_seed_arrays(comm, seed, framework, fmt)
        dev = f"cuda:{comm.device}"
        sizes, K = [(5, 0, 3, 8)[r % 4] for r in range(n)], 64
        x = to_framework(shard(seed, me, 1600, sum(sizes), K, "bfloat16"), "torch", comm.device)
        out = torch.empty((sizes[me], K), dtype=torch.bfloat16, device=dev)
        seed_t = torch.tensor(seed, dtype=torch.int64, device=dev)
        kw = dict(compress="nvfp4", rounding="stochastic")
        for k in range(3):   # into out=: from the third call on, straight to the workspace's graph
            seed_t.fill_(seed + 100 + k)
            comm.reduce_scatterv(x, sizes, out=out, seed=seed_t, **kw)
            torch.cuda.synchronize(comm.device)
            want = to_numpy(comm.reduce_scatterv(x, sizes, seed=seed + 100 + k, **kw), "bfloat16").view(np.uint16)
            assert np.array_equal(to_numpy(out, "bfloat16").view(np.uint16), want), f"rank {me} {form}: eager call {k}"
        if algo == "symm":
            from fp4ccl import symm_collectives
            known = symm_collectives.existing_workspace(comm).repeats.known
            assert any(isinstance(v, tuple) and v[:1] == ("tensor",) for key in known for v in key[0]), \
                f"rank {me} {form}: the calls with a seed tensor were not recorded for the fast path"
        seed_t.fill_(seed)
        torch.cuda.synchronize(comm.device)
        graph = _captured(comm, lambda: (comm.reduce_scatterv(x, sizes, out=out, seed=seed_t, **kw), seed_t.add_(1)))
        for k in range(4):
            out.view(torch.int16).fill_(0x5A5A)
            graph.replay()
            torch.cuda.synchronize(comm.device)
            got = to_numpy(out, "bfloat16").view(np.uint16)
            want = to_numpy(comm.reduce_scatterv(x, sizes, seed=seed + k, **kw), "bfloat16").view(np.uint16)
            torch.cuda.synchronize(comm.device)
            assert np.array_equal(got, want), f"rank {me} {form}: replay {k} is not the int seed {seed + k}'s result"
        assert int(seed_t) == seed + 4, f"rank {me}: the captured seed.add_(1) ran {int(seed_t) - seed} times"
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["ll", "store", "push", "push:3"])
@pytest.mark.parametrize("nranks", [2, 4])
def test_fp4_reduce_scatter_forms_interleaved_with_other_collectives(nranks, form, seed):
    """The forms that write into their peers' memory (the one launch with its flags; the others with
    one barrier per call): many calls back to back (eager and replayed from graphs), mixed with plain
    symmetric-memory gathers on the same workspace halves and with reduce-scatters of other sizes,
    stay right on every rank."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, _rs_interleaved, seed, form, backend="nccl"))


def _rs_interleaved(comm, seed, form):
    import numpy as np
    import torch
    from fp4_collective_checks import roundtrip, shard
    dev = f"cuda:{comm.device}"
    K = 64
    shapes = [[(7, 0, 3, 5)[r % 4] for r in range(comm.size)], [16 * (r + 1) for r in range(comm.size)]]
    outs = [torch.empty((s[comm.rank], K), device=dev) for s in shapes]
    with env({**_rs_form_env(form), "FP4CCL_FP4_ALGO": "symm", "FP4CCL_ALGO": "symm"}):
        for step in range(40):
            which = step % 3 % 2      # small, big, small, small, big, small, ...
            sizes = shapes[which]
            total, mine = sum(sizes), sizes[comm.rank]
            off = sum(sizes[:comm.rank])
            ys = [shard(seed, r, 900 + step, total, K, "float32") for r in range(comm.size)]
            outs[which].fill_(float("nan"))
            comm.reduce_scatterv(torch.from_numpy(ys[comm.rank]).to(dev), sizes, out=outs[which], compress="nvfp4")
            if step % 4 == 1:
                g = torch.full((3, K), float(comm.rank), device=dev)
                got = comm.all_gatherv(g, [3] * comm.size)
                want_g = np.repeat(np.arange(comm.size, dtype=np.float32), 3)[:, None] * np.ones((1, K), np.float32)
                assert np.array_equal(got.cpu().numpy(), want_g), f"rank {comm.rank} step {step}: gather"
            torch.cuda.synchronize(comm.device)
            want = np.sum([roundtrip(a[off:off + mine], "nvfp4") for a in ys], axis=0) if mine else np.zeros((0, K))
            assert np.allclose(outs[which].cpu().numpy(), want, rtol=1e-6, atol=1e-6), f"rank {comm.rank} step {step}"
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["pull", "store", "push", "push:3"])
@pytest.mark.parametrize("nranks", [2, 4])
def test_fp4_pipelined_reduce_scatter_graphs_and_workspace_growth(nranks, form, seed):
    """The pipelined reduce-scatter called again and again replays a captured graph (three streams
    forked and joined inside it) with right results; a larger call that grows the FP4 workspace drops
    every cached graph, so the small call after it neither reads nor writes the freed buffer."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, check_pipelined_graphs_and_growth, seed, form, backend="nccl"))


def check_pipelined_graphs_and_growth(comm, seed, form="pull"):
    import cupy
    import numpy as np
    import torch
    from fp4_collective_checks import roundtrip, shard
    from fp4ccl import symm_collectives
    dev = f"cuda:{comm.device}"
    K = 128

    def call(sizes, step, out):
        total, mine = sum(sizes), sizes[comm.rank]
        off = sum(sizes[:comm.rank])
        ys = [shard(seed, r, 500 + step, total, K, "float32") for r in range(comm.size)]
        y = torch.from_numpy(ys[comm.rank]).to(dev)
        comm.reduce_scatterv(y, sizes, out=out, compress="nvfp4")
        torch.cuda.synchronize(comm.device)
        want = np.sum([roundtrip(a[off:off + mine], "nvfp4") for a in ys], axis=0) if mine else np.zeros((0, K))
        assert np.allclose(out.cpu().numpy(), want, rtol=1e-6, atol=1e-6), f"rank {comm.rank} step {step}"

    small = [(5, 0, 3, 2)[r % 4] for r in range(comm.size)]
    big = [1024 * (r + 1) for r in range(comm.size)]   # past the amax slots at the FP4 workspace's start
    out_small = torch.empty((small[comm.rank], K), device=dev)
    out_big = torch.empty((big[comm.rank], K), device=dev)
    with env({"FP4CCL_FP4_ALGO": "symm", "FP4CCL_ALGO": "symm", **_rs_form_env(form)}):
        # The communicators outlive a test: start from no FP4 workspace, so that `big` below must grow it
        # whatever the tests before this one left.
        torch.cuda.synchronize(comm.device)
        symm_collectives.forget_graphs(comm)
        comm._extras.pop("fp4_workspace", None)
        try:
            # The symmetric workspace made larger than any call below needs, so only the FP4 workspace grows.
            wide = torch.ones((4096, K), device=dev)
            comm.all_gatherv(wide, [4096] * comm.size)
            for step in range(5):
                call(small, step, out_small)
            ws = symm_collectives.workspace(comm)
            assert ws._graphs, f"rank {comm.rank}: the repeated pipelined call was never captured"
            outgrown = comm._extras["fp4_workspace"].nbytes
            call(big, 10, out_big)
            assert comm._extras["fp4_workspace"].nbytes > outgrown, "the larger call should grow the FP4 workspace"
            assert not ws._graphs, f"rank {comm.rank}: graphs into the outgrown FP4 workspace were kept"
            # CuPy's pool hands the freed block to the next allocation of its size: it must stay untouched.
            with cupy.cuda.Device(comm.device):
                sentinel = cupy.full(outgrown // 4, 7.0, dtype=cupy.float32)
            for step in range(20, 24):
                call(small, step, out_small)
            assert bool((sentinel == 7.0).all()), f"rank {comm.rank}: a call wrote into memory it no longer owns"
        finally:
            symm_collectives.forget_graphs(comm)
    return True


def _ll_cases(n, fmt):
    """(sizes, K, dtype) of the one-launch tests: a rank's share from none to several blocks per thread;
    the third case is as large as a segment holds (2048 x 64 = one_launch.MAX_ELEMENTS)."""
    k = 1 if fmt == "nvfp4" else 2    # K in blocks of 16: MXFP4 needs multiples of 32
    return [([(1, 0, 7, 2)[r % 4] for r in range(n)], 16 * k, "bfloat16"),
            ([64 * (r + 1) for r in range(n)], 48 * k, "float32"),
            ([2048 if r == n - 1 else 3 * r for r in range(n)], 64, "float16"),
            ([(300, 0, 251, 97)[r % 4] for r in range(n)], 80 * k, "bfloat16")]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("nranks", [2, 3, 4])
def test_fp4_one_launch_gather_back_to_back_with_other_collectives(nranks, fmt, seed):
    """The one-launch FP4 gather (FP4CCL_FP4_GATHER_FORM=ll), whose flags carry a per-CTA epoch kept
    on the device: many calls back to back on the two workspace halves, eager and replayed from
    graphs, with 1-4 clusters, a rank with no rows, every dtype, K of one to five blocks, between plain
    gathers, FP4 reduce-scatters and a workspace growth; every result bit-exact, nothing past its end."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, _ll_interleaved, seed, fmt, backend="nccl"))


def _ll_interleaved(comm, seed, fmt):
    import numpy as np
    import torch
    from collective_checks import check_no_overrun, sentinel_out, to_framework, to_numpy
    from fp4_collective_checks import roundtrip, shard
    from fp4ccl import symm_collectives
    n, me = comm.size, comm.rank
    dev = f"cuda:{comm.device}"
    cases = _ll_cases(n, fmt)
    outs = [sentinel_out(comm, "torch", (sum(sz), K), dt) for sz, K, dt in cases]
    with env({"FP4CCL_FP4_GATHER_FORM": "ll", "FP4CCL_FP4_ALGO": "symm", "FP4CCL_ALGO": "symm"}):
        for step in range(48):
            which = (step * 3 + step // 8) % len(cases)   # every case meets both halves, in varying order
            sizes, K, dtype = cases[which]
            xs = [shard(seed, r, 700 + step, sizes[r], K, dtype) for r in range(n)]
            fbuf, out = outs[which]
            out.view(torch.uint8).fill_(0x5A)
            comm.all_gatherv(to_framework(xs[me], "torch", comm.device), sizes, out=out, compress=fmt)
            if step % 3 == 1:
                g = torch.full((3, 16), float(me), device=dev)
                got = comm.all_gatherv(g, [3] * n)
                assert torch.equal(got[3 * me:3 * me + 3], g), f"rank {me} step {step}: plain gather"
            if step % 5 == 2:
                y = torch.ones((2 * n, 32), device=dev) * (me + 1)
                got = comm.reduce_scatterv(y, [2] * n, compress=fmt)
                assert torch.equal(got, torch.full_like(got, n * (n + 1) / 2)), f"rank {me} step {step}: FP4 RS"
            if step == 20:   # grows the workspace (the counters and flags start again from zero)
                big = torch.full((1 << 18, 8), 1.0, device=dev)
                comm.all_gatherv(big, [1 << 18] * n)
            torch.cuda.synchronize(comm.device)
            what = f"rank {me} step {step} {fmt} sizes={sizes} K={K} {dtype}"
            check_no_overrun(fbuf, (sum(sizes), K), dtype, what)
            want = np.concatenate([roundtrip(a, fmt) if len(a) else a for a in xs])
            assert np.array_equal(to_numpy(out, dtype).view(np.uint8), want.view(np.uint8)), what
    keys = [k[0] for k in symm_collectives.workspace(comm)._graphs]
    assert "fp4_gather_ll" in keys, f"rank {me}: no one-launch gather was replayed from a graph ({keys})"
    return True


@contextlib.contextmanager
def _launches_of(name):
    """The streams of the launches of fp4ccl.formats.kernels.<name> made inside the block (a list)."""
    from fp4ccl.formats import kernels
    real = getattr(kernels, name)
    streams = []
    setattr(kernels, name, lambda *a: (streams.append(a[-1]), real(*a)))
    try:
        yield streams
    finally:
        setattr(kernels, name, real)


def _captured(comm, calls):
    """A torch CUDA graph of calls(), captured on a side stream of comm's device."""
    import torch
    dev = f"cuda:{comm.device}"
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        calls()
    torch.cuda.current_stream(dev).wait_stream(side)
    return graph


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("nranks", [2, 4])
def test_fp4_one_launch_gather_in_the_callers_cuda_graph(nranks, fmt, seed):
    """Captured into the caller's CUDA graph (after an eager call made its buffer), the one-launch
    gather is a kernel node of that graph, not the NCCL path; two calls in one graph and eager calls
    between the replays alternate its halves on the device, and every replay is bit-exact."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, _ll_in_a_captured_graph, seed, fmt, backend="nccl"))


def _ll_in_a_captured_graph(comm, seed, fmt):
    import numpy as np
    import torch
    from collective_checks import to_framework, to_numpy
    from fp4_collective_checks import roundtrip, shard
    n, me = comm.size, comm.rank
    dev = f"cuda:{comm.device}"
    sizes, K = [(5, 0, 3, 8)[r % 4] for r in range(n)], 64
    x = torch.empty((sizes[me], K), dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    outs = [torch.empty((sum(sizes), K), dtype=torch.bfloat16, device=dev) for _ in range(3)]
    fresh = lambda case: [shard(seed, r, case, sizes[r], K, "bfloat16") for r in range(n)]  # noqa: E731

    def want(xs):
        return np.concatenate([roundtrip(a, fmt) if len(a) else a for a in xs])
    comm.all_gatherv(x, sizes, out=outs[2], compress=fmt)   # eager: makes the gather's buffer
    with _launches_of("gather_ll") as launched:
        graph = _captured(comm, lambda: (comm.all_gatherv(x, sizes, out=outs[0], compress=fmt),
                                         comm.all_gatherv(y, sizes, out=outs[1], compress=fmt)))
    assert len(launched) == 2, f"rank {me}: {len(launched)} one-launch gathers captured, expected 2"
    for step in range(6):
        xs, ys, zs = fresh(800 + step), fresh(900 + step), fresh(1000 + step)
        x.copy_(to_framework(xs[me], "torch", comm.device))
        y.copy_(to_framework(ys[me], "torch", comm.device))
        for out in outs:
            out.view(torch.int16).fill_(0x5A5A)
        graph.replay()
        if step % 2:   # an eager call between replays moves the epochs by one
            comm.all_gatherv(to_framework(zs[me], "torch", comm.device), sizes, out=outs[2], compress=fmt)
        torch.cuda.synchronize(comm.device)
        for out, src, name in ((outs[0], xs, "first"), (outs[1], ys, "second")) + (((outs[2], zs, "eager"),)
                                                                                   if step % 2 else ()):
            got = to_numpy(out, "bfloat16").view(np.uint8)
            assert np.array_equal(got, want(src).view(np.uint8)), f"rank {me} replay {step}: {name} {fmt} gather"
    del graph
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("nranks", [2, 3, 4])
def test_fp4_one_launch_reduce_scatter_equals_the_store_form_bit_for_bit(nranks, fmt, seed):
    """The one-launch FP4 reduce-scatter (FP4CCL_FP4_RS_FORM=ll) and the store form sum the same
    decoded chunks in the same order, so their results agree bit for bit: every dtype, nearest and
    stochastic rounding, uneven chunks with a zero, K of one to five blocks, a chunk as large as a
    segment holds, each call between one-launch gathers on the same buffer; nothing written past the
    output."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, _ll_rs_against_store, seed, fmt, backend="nccl"))


def _ll_rs_against_store(comm, seed, fmt):
    import numpy as np
    import torch
    from collective_checks import check_no_overrun, sentinel_out, to_framework, to_numpy
    from fp4_collective_checks import roundtrip, shard
    n, me = comm.size, comm.rank
    cases = _ll_cases(n, fmt)
    with _launches_of("reduce_scatter_ll") as launched, env({"FP4CCL_FP4_ALGO": "symm", "FP4CCL_ALGO": "symm"}):
        for case, (sizes, K, dtype) in enumerate(cases):
            for rounding in ("nearest", "stochastic"):
                x = to_framework(shard(seed, me, 1100 + case, sum(sizes), K, dtype), "torch", comm.device)
                g = to_framework(shard(seed, me, 1200 + case, 5, 32, dtype), "torch", comm.device)
                gathered = comm.all_gatherv(g, [5] * n, compress=fmt)   # one launch, the same buffer
                got = {}
                for form in ("ll", "store"):
                    with env({"FP4CCL_FP4_RS_FORM": form}):
                        fbuf, out = sentinel_out(comm, "torch", (sizes[me], K), dtype)
                        comm.reduce_scatterv(x, sizes, out=out, compress=fmt, rounding=rounding,
                                             seed=seed + case)
                        torch.cuda.synchronize(comm.device)
                        what = f"rank {me} {form} {fmt} {rounding} sizes={sizes} K={K} {dtype}"
                        check_no_overrun(fbuf, (sizes[me], K), dtype, what)
                        got[form] = to_numpy(out, dtype).view(np.uint8)
                assert np.array_equal(got["ll"], got["store"]), \
                    f"rank {me} {fmt} {rounding} sizes={sizes} K={K} {dtype}"
                want_g = np.concatenate([roundtrip(shard(seed, r, 1200 + case, 5, 32, dtype), fmt)
                                         for r in range(n)])
                assert np.array_equal(to_numpy(gathered, dtype).view(np.uint8), want_g.view(np.uint8)), \
                    f"rank {me} case {case}: the gather between"
    assert len(launched) == 2 * len(cases), f"rank {me}: {len(launched)} one-launch reduce-scatters launched"
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("nranks", [2, 4])
def test_fp4_one_launch_reduce_scatter_in_the_callers_cuda_graph(nranks, fmt, seed):
    """Captured into the caller's CUDA graph (after an eager call made the one-launch buffer), the FP4
    reduce-scatter is a kernel node of that graph beside a one-launch gather of the other format; eager
    calls between the replays move the shared epochs, and every replay equals the store form's result
    bit for bit."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, _ll_rs_in_a_captured_graph, seed, fmt, backend="nccl"))


def _ll_rs_in_a_captured_graph(comm, seed, fmt):
    import numpy as np
    import torch
    from collective_checks import to_framework, to_numpy
    from fp4_collective_checks import roundtrip, shard
    n, me = comm.size, comm.rank
    dev = f"cuda:{comm.device}"
    other = "mxfp4" if fmt == "nvfp4" else "nvfp4"   # the gather beside it: both formats share the epochs
    sizes, K = [(5, 0, 3, 8)[r % 4] for r in range(n)], 64
    x = torch.empty((sum(sizes), K), dtype=torch.bfloat16, device=dev)
    g = torch.empty((4, 32), dtype=torch.bfloat16, device=dev)
    out = torch.empty((sizes[me], K), dtype=torch.bfloat16, device=dev)
    gout = torch.empty((4 * n, 32), dtype=torch.bfloat16, device=dev)

    def fill(t, case, rows, k):
        t.copy_(to_framework(shard(seed, me, case, rows, k, "bfloat16"), "torch", comm.device))
    fill(x, 1300, sum(sizes), K)
    comm.reduce_scatterv(x, sizes, compress=fmt)      # eager: makes the one-launch buffer
    with _launches_of("reduce_scatter_ll") as launched:
        graph = _captured(comm, lambda: (comm.reduce_scatterv(x, sizes, out=out, compress=fmt),
                                         comm.all_gatherv(g, [4] * n, out=gout, compress=other)))
    assert len(launched) == 1, f"rank {me}: {len(launched)} one-launch reduce-scatters captured, expected 1"
    for step in range(6):
        fill(x, 1400 + step, sum(sizes), K)
        fill(g, 1500 + step, 4, 32)
        out.view(torch.int16).fill_(0x5A5A)
        graph.replay()
        if step % 2:   # an eager one-launch call between replays moves the epochs by one
            comm.reduce_scatterv(x, sizes, compress=fmt)
        torch.cuda.synchronize(comm.device)
        with env({"FP4CCL_FP4_RS_FORM": "store"}):
            want = comm.reduce_scatterv(x, sizes, compress=fmt)
        torch.cuda.synchronize(comm.device)
        assert torch.equal(out.view(torch.int16), want.view(torch.int16)), f"rank {me} replay {step}: {fmt} reduce-scatter"
        want_g = np.concatenate([roundtrip(shard(seed, r, 1500 + step, 4, 32, "bfloat16"), other) for r in range(n)])
        assert np.array_equal(to_numpy(gout, "bfloat16").view(np.uint8), want_g.view(np.uint8)), \
            f"rank {me} replay {step}: {other} gather"
    del graph
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
def test_symm_repeated_calls_replay_cuda_graphs(nranks, seed):
    """The same call with the same buffers again and again (fresh data each time): from the third call
    on, symm_collectives replays a captured CUDA graph; every result must still be right. The raw FP4
    gathers (dequantize=False, and of an FP4Tensor) return new arrays, which the caching allocator
    places at the same addresses once the previous result is dropped: they replay too."""
    need_gpus(nranks)
    assert all(run_ranks(nranks, check_repeated_calls, seed, backend="nccl"))


def check_repeated_calls(comm, seed):
    import os
    import numpy as np
    import torch
    import fp4ccl
    from fp4_collective_checks import roundtrip, shard
    from fp4ccl import symm_collectives
    from fp4ccl.formats import reference
    dev = f"cuda:{comm.device}"
    K = 64
    sizes = [(3, 0, 5, 2)[r % 4] for r in range(comm.size)]
    total, mine, off = sum(sizes), sizes[comm.rank], sum(sizes[:comm.rank])
    x = torch.empty((mine, K), device=dev)
    y = torch.empty((total, K), device=dev)
    g_fp4 = torch.empty((total, K), device=dev)
    g_plain = torch.empty((total, K), device=dev)
    rs_fp4 = torch.empty((mine, K), device=dev)
    rs_plain = torch.empty((mine, K), device=dev)
    neg = torch.empty_like(x)
    q_in = fp4ccl.quantize(x, "nvfp4")   # gathered as is; refilled in place every step
    symm_collectives.forget_graphs(comm)   # the ranks' communicators outlive each test
    os.environ["FP4CCL_ALGO"] = "symm"
    try:
        # FP4 results to gather into (out=): two calls, so each call of the loop keeps meeting one half
        raw_out = comm.all_gatherv(x, sizes, compress="nvfp4", dequantize=False)
        as_is_out = comm.all_gatherv(q_in, sizes)
        for step in range(6):
            xs = [shard(seed, r, 300 + step, sizes[r], K, "float32") for r in range(comm.size)]
            ys = [shard(seed, r, 400 + step, total, K, "float32") for r in range(comm.size)]
            x.copy_(torch.from_numpy(xs[comm.rank]))
            y.copy_(torch.from_numpy(ys[comm.rank]))
            comm.all_gatherv(x, sizes, out=g_fp4, compress="nvfp4")
            comm.all_gatherv(x, sizes, out=g_plain)
            comm.reduce_scatterv(y, sizes, out=rs_fp4, compress="nvfp4")
            comm.reduce_scatterv(y, sizes, out=rs_plain)
            torch.mul(x, -2.0, out=neg)
            fp4ccl.quantize(neg, "nvfp4", out=q_in)
            raw = comm.all_gatherv(x, sizes, compress="nvfp4", dequantize=False)
            as_is = comm.all_gatherv(q_in, sizes)
            assert comm.all_gatherv(x, sizes, compress="nvfp4", dequantize=False, out=raw_out) is raw_out
            assert comm.all_gatherv(q_in, sizes, out=as_is_out) is as_is_out
            torch.cuda.synchronize(comm.device)
            what = f"rank {comm.rank} step {step}"
            for got, scale, name in ((raw, 1.0, "raw gather"), (as_is, -2.0, "gather of an FP4Tensor"),
                                     (raw_out, 1.0, "raw gather into out"),
                                     (as_is_out, -2.0, "gather of an FP4Tensor into out")):
                want = [reference.quantize_2d(a * np.float32(scale), "nvfp4") for a in xs]
                assert np.array_equal(got.data.cpu().numpy(), np.concatenate([w[0] for w in want])), f"{what} {name} data"
                assert np.array_equal(got.scales.cpu().numpy(), np.concatenate([w[1] for w in want])), f"{what} {name} scales"
                assert np.array_equal(got.global_scale.cpu().numpy(), np.float32([w[2] for w in want])), f"{what} {name} global scales"
            del raw, as_is   # the next step's results can take the same addresses
            assert np.array_equal(g_fp4.cpu().numpy(), np.concatenate([roundtrip(a, "nvfp4") for a in xs])), what
            assert np.array_equal(g_plain.cpu().numpy(), np.concatenate(xs)), what
            want = np.sum([roundtrip(a[off:off + mine], "nvfp4") for a in ys], axis=0) if mine else np.zeros((0, K))
            assert np.allclose(rs_fp4.cpu().numpy(), want, rtol=1e-6, atol=1e-6), what
            want = np.sum([a[off:off + mine] for a in ys], axis=0, dtype=np.float32) if mine else np.zeros((0, K))
            assert np.allclose(rs_plain.cpu().numpy(), want, rtol=1e-6, atol=1e-6), what
    finally:
        del os.environ["FP4CCL_ALGO"]
    # Eight calls per step alternate the two halves, so each call always meets the same half: one graph
    # each, and at least one for each raw gather (if the allocator moves its results they get more).
    ws = symm_collectives.workspace(comm)
    keys = [k[0] for k in ws._graphs]
    raw = keys.count("fp4_gather_raw")
    assert raw >= 4 and len(keys) - raw == 4, f"rank {comm.rank}: one graph per call expected, got {keys}"
    # The gathers of a tensor and both reduce-scatters (out= and sizes given) were recorded for
    # symm_repeat's fast path, which served them from then on; a changed setting must send a call down
    # the full path.
    assert len(ws.repeats.known) == 5, f"rank {comm.rank}: {list(ws.repeats.known)}"
    assert ("reduce_scatterv", "sum", "nvfp4", "nearest", None) in [k[0] for k in ws.repeats.known], \
        f"rank {comm.rank}: the FP4 reduce-scatter into out= was not recorded"
    assert ("all_gatherv", "nvfp4", "per_rank", False) in [k[0] for k in ws.repeats.known], \
        f"rank {comm.rank}: the raw gather into out= was not recorded"
    before = ws.calls
    # (its byte gather takes an NCCL algorithm too: by size it would be the symmetric-memory one)
    with env({"FP4CCL_FP4_ALGO": "nccl", "FP4CCL_ALGO": "bcast"}):
        comm.all_gatherv(x, sizes, out=g_fp4, compress="nvfp4")
    torch.cuda.synchronize(comm.device)
    assert ws.calls == before, f"rank {comm.rank}: FP4CCL_FP4_ALGO=nccl still replayed the symmetric-memory graph"
    assert np.array_equal(g_fp4.cpu().numpy(), np.concatenate([roundtrip(a, "nvfp4") for a in xs]))
    # Over NCCL the FP4 gather's byte gather is a (replayed) symmetric-memory run of the plain gather,
    # between quantize and decode kernels of its own: never a call to replay as a whole.
    with env({"FP4CCL_FP4_ALGO": "nccl"}):
        for step in range(5):
            xs = [shard(seed, r, 500 + step, sizes[r], K, "float32") for r in range(comm.size)]
            x.copy_(torch.from_numpy(xs[comm.rank]))
            comm.all_gatherv(x, sizes, out=g_fp4, compress="nvfp4")
            torch.cuda.synchronize(comm.device)
            assert np.array_equal(g_fp4.cpu().numpy(), np.concatenate([roundtrip(a, "nvfp4") for a in xs])), \
                f"rank {comm.rank}: FP4 gather over NCCL, step {step}"
    return True


@pytest.mark.gpu
def test_fp4_symm_calls_on_alternating_streams(seed):
    """Back-to-back symmetric-memory calls on three streams, no host sync between them, so a call's
    stream differs from the one that last used the same workspace half: a half must not be
    overwritten while a peer still decodes it (the end-of-call event orders that)."""
    need_gpus(4)
    assert all(run_ranks(4, _on_path, "symm", check_alternating_streams, seed, backend="nccl"))


def check_alternating_streams(comm, seed):
    import numpy as np
    import torch
    from fp4_collective_checks import roundtrip, shard
    dev = f"cuda:{comm.device}"
    K, calls = 512, 8
    sizes = [1024 * (r + 1) for r in range(comm.size)]   # large enough that a decode takes a while
    streams = [torch.cuda.Stream(device=comm.device) for _ in range(3)]
    xs = [[shard(seed, r, c, sizes[r], K, "float32") for r in range(comm.size)] for c in range(calls)]
    ins = [torch.from_numpy(xs[c][comm.rank]).to(dev) for c in range(calls)]
    torch.cuda.synchronize(comm.device)
    outs = []
    for c in range(calls):
        with torch.cuda.stream(streams[c % 3]):
            outs.append(comm.all_gatherv(ins[c], sizes, compress="nvfp4"))
    torch.cuda.synchronize(comm.device)
    for c in range(calls):
        want = np.concatenate([roundtrip(x, "nvfp4") for x in xs[c]])
        assert np.array_equal(outs[c].cpu().numpy(), want), f"rank {comm.rank}: call {c} differs"
    return True


@pytest.mark.gpu
def test_fp4_bad_input(seed):
    need_gpus(2)
    assert all(run_ranks(2, fc.check_fp4_bad_input, seed, "torch", backend="nccl"))


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
def test_fp4_collectives_in_a_cuda_graph(nranks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, check_fp4_graph, seed, backend="nccl"))


def check_fp4_graph(comm, seed):
    """Capture FP4 all_gatherv (shared scale) and reduce_scatterv once; replay on fresh inputs."""
    import numpy as np
    import torch
    from fp4_collective_checks import roundtrip, shard
    from fp4ccl.formats import reference
    dev = f"cuda:{comm.device}"
    K = 64
    sizes = [0 if r == comm.size - 1 else 2 + r for r in range(comm.size)]
    x = torch.empty((sizes[comm.rank], K), device=dev, dtype=torch.bfloat16)
    y = torch.empty((sum(sizes), K), device=dev, dtype=torch.float32)
    gathered = torch.empty((sum(sizes), K), device=dev, dtype=torch.bfloat16)
    scattered = torch.empty((sizes[comm.rank], K), device=dev, dtype=torch.float32)
    stream = torch.cuda.Stream(device=comm.device)

    def ops():
        comm.all_gatherv(x, sizes, out=gathered, compress="nvfp4", global_scale="shared")
        comm.reduce_scatterv(y, sizes, out=scattered, compress="nvfp4")

    with torch.cuda.stream(stream):
        ops()  # warm-up: compiles kernels, sizes workspaces
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        ops()
    import ml_dtypes
    for step in range(3):
        xs = [shard(seed, r, 100 + step, sizes[r], K, "bfloat16") for r in range(comm.size)]
        ys = [shard(seed, r, 200 + step, sum(sizes), K, "float32") for r in range(comm.size)]
        x.copy_(torch.from_numpy(xs[comm.rank].view(np.int16)).view(torch.bfloat16))
        y.copy_(torch.from_numpy(ys[comm.rank]))
        graph.replay()
        torch.cuda.synchronize(comm.device)
        amax = max(reference.amax(s) for s in xs)
        want = np.concatenate([roundtrip(s, "nvfp4", amax) for s in xs])
        got = gathered.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), f"rank {comm.rank} step {step} gather"
        off, n = sum(sizes[:comm.rank]), sizes[comm.rank]
        want_rs = np.sum([roundtrip(a[off:off + n], "nvfp4") for a in ys], axis=0) if n else np.zeros((0, K))
        assert np.allclose(scattered.cpu().numpy(), want_rs, rtol=1e-6, atol=1e-6), f"rank {comm.rank} step {step} rs"
    return True


def _forced_pipeline(comm, seed, fmt, graph):
    """Run the checks with the overlap and two-chunk thresholds at 0, so small tensors take those paths."""
    import os
    import fp4ccl.fp4_collectives as f
    saved = f.OVERLAP_FROM_BYTES, f.PIPELINE_FROM_BYTES
    f.OVERLAP_FROM_BYTES = f.PIPELINE_FROM_BYTES = 0
    os.environ["FP4CCL_FP4_ALGO"] = "nccl"  # these thresholds belong to the NCCL transport
    try:
        if graph:
            return check_fp4_graph(comm, seed)
        fc.check_fp4_all_gatherv(comm, seed, "torch", fmt, "per_rank")
        fc.check_fp4_all_gatherv(comm, seed, "torch", fmt, "shared")
        fc.check_fp4_reduce_scatterv(comm, seed, "torch", fmt)
        return True
    finally:
        del os.environ["FP4CCL_FP4_ALGO"]
        f.OVERLAP_FROM_BYTES, f.PIPELINE_FROM_BYTES = saved


@pytest.mark.gpu
@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_side_stream_and_chunked_paths(fmt, nranks, seed):
    need_gpus(nranks)
    assert all(run_ranks(nranks, _forced_pipeline, seed, fmt, False, backend="nccl"))


@pytest.mark.gpu
def test_fp4_side_stream_paths_in_a_cuda_graph(seed):
    need_gpus(4)
    assert all(run_ranks(4, _forced_pipeline, seed, "nvfp4", True, backend="nccl"))
