"""Where the time of a small collective goes: host and GPU microseconds per call of each step.

Run under the launcher:  python3 -m fp4ccl.launcher -n 4 bench/probe_latency.py [--calls 200]

Each row enqueues --calls back-to-back calls of one step on one stream: `host` is the enqueue time per
call (perf_counter), `gpu` the CUDA-event time from before the first to after the last, per call; the
slowest rank of each. A step whose gpu time equals its host time is host-bound.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402,F401  (NVLink multicast off, this checkout's fp4ccl first)

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rows", type=int, default=64, help="rows of K = 1024 bf16 per rank for the collectives")
    ap.add_argument("--profile", action="store_true", help="also cProfile the symmetric-memory FP4 gather (rank 0)")
    args = ap.parse_args()

    import torch
    import fp4ccl
    from fp4ccl import formats, vcollectives
    from fp4ccl._cuda import runtime
    from fp4ccl.formats import kernels

    comm = fp4ccl.init()
    torch.cuda.set_device(comm.device)
    dev = f"cuda:{comm.device}"
    rt = runtime()
    stream = torch.cuda.current_stream()
    sh = stream.cuda_stream
    buf = comm.symmetric_empty((1 << 20,), "uint8")
    peer = (comm.rank + 1) % comm.size
    x = torch.randn(args.rows, 1024, device=dev, dtype=torch.bfloat16)
    small = torch.empty(4096, dtype=torch.uint8, device=dev)
    sizes = [args.rows] * comm.size
    out = torch.empty(args.rows * comm.size, 1024, device=dev, dtype=torch.bfloat16)
    q = formats.quantize(x, "nvfp4")
    amax = torch.ones((), device=dev, dtype=torch.float32)

    def fp4_gather(algo):
        def go():
            os.environ["FP4CCL_FP4_ALGO"] = algo
            comm.all_gatherv(x, sizes, out=out, compress="nvfp4")
        return go

    held = {}

    def raw_gather():
        # as the sweep does: the previous result stays alive until the call returns
        os.environ["FP4CCL_FP4_ALGO"] = "symm"
        held["q"] = comm.all_gatherv(x, sizes, compress="nvfp4", dequantize=False)

    def v_gather(algo):
        uneven = [args.rows + (1 if r % 2 else -1) for r in range(comm.size)]
        xs = torch.randn(uneven[comm.rank], 1024, device=dev, dtype=torch.bfloat16)
        o = torch.empty(sum(uneven), 1024, device=dev, dtype=torch.bfloat16)

        def go():
            os.environ["FP4CCL_ALGO"] = algo
            comm.all_gatherv(xs, uneven, out=o)
        return go

    from fp4ccl import _arrays, symm_collectives as symm
    info = _arrays.describe(x)
    # Host-only pieces of a call's Python (nothing enqueued): where a replayed call's host time goes.
    host_steps = {
        "h: describe x": lambda: _arrays.describe(x),
        "h: comm._input": lambda: comm._input(x),
        "h: current stream": lambda: _arrays.current_stream(info, None),
        "h: comm._sizes": lambda: comm._sizes(sizes, args.rows, "all_gatherv"),
        "h: comm._output": lambda: comm._output(info, tuple(out.shape), out),
        "h: fp4_algo": lambda: symm.fp4_algo(comm, sh),
        "h: torch.empty": lambda: torch.empty(args.rows * comm.size, 1024, device=dev, dtype=torch.bfloat16),
    }
    steps = {
        "barrier memop": lambda: buf.barrier(stream, mode="memop"),
        "barrier kernel": lambda: buf.barrier(stream, mode="kernel"),
        "memcpy local 4K": lambda: rt.memcpyAsync(small.data_ptr(), buf.ptr(), 4096, rt.memcpyDefault, sh),
        "memcpy peer 4K": lambda: rt.memcpyAsync(small.data_ptr(), buf.ptr(peer), 4096, rt.memcpyDefault, sh),
        "event record": lambda: stream.record_event(),
        "vcopy 4 segs": lambda: vcollectives.launch_vcopy(
            comm.device, [(small.data_ptr() + 1024 * i, buf.ptr(r), 1024) for i, r in enumerate(range(comm.size))], sh),
        "fp4 amax": lambda: kernels.amax(comm.device, x.data_ptr(), "bfloat16", x.numel(), amax.data_ptr(), sh),
        "fp4 quantize call": lambda: formats.quantize(x, "nvfp4", amax=amax),
        "fp4 dequantize call": lambda: formats.dequantize(q),
        "nccl all_gather": lambda: comm.all_gather(x, out=out),
        "fp4 gather symm": fp4_gather("symm"),
        "fp4 gather nccl": fp4_gather("nccl"),
        "fp4 raw gather symm": raw_gather,
        "v gather bcast": v_gather("bcast"),
        "v gather symm": v_gather("symm"),
    }
    xr = torch.randn(args.rows * comm.size, 1024, device=dev, dtype=torch.bfloat16)
    rs_out = torch.empty(args.rows, 1024, device=dev, dtype=torch.bfloat16)

    def fp4_reduce_scatter(form):
        def go():
            os.environ["FP4CCL_FP4_ALGO"] = "symm"
            os.environ["FP4CCL_FP4_RS_FORM"] = form
            comm.reduce_scatterv(xr, sizes, out=rs_out, compress="nvfp4")
        return go

    steps["fp4 rs symm ll"] = fp4_reduce_scatter("ll")
    steps["fp4 rs symm store"] = fp4_reduce_scatter("store")
    steps["nccl reduce_scatter"] = lambda: comm.reduce_scatter(xr, out=rs_out)
    # The GPU time alone of a replayed call: the symmetric-memory call's cached graphs (one per workspace
    # half, captured by the calls above). (A torch-captured NCCL all_gather row made the job hang at
    # teardown in two runs; NCCL's eager row is GPU-bound at these sizes anyway.)
    # (Looked up when the step starts: a step before it may grow the workspace, which drops the graphs.)
    # Each replay takes the half the workspace would use next and counts as its call, so the eager
    # calls after it keep the double-buffering order.
    from fp4ccl import symm_collectives

    def replay(call, kinds, form=None):
        by_half = {}

        def go():
            ws = symm_collectives.workspace(comm)
            if not by_half:
                for _ in range(4):
                    call()
                by_half.update({k[-2]: g for k, g in ws._graphs.items()
                                if k[0] in kinds and (form is None or form in k)})
                assert len(by_half) == 2, f"expected one cached graph of {kinds} per workspace half"
            rt.graphLaunch(by_half[ws.calls % 2], sh)
            ws.calls += 1
        return go
    steps["fp4 gather graph"] = replay(fp4_gather("symm"), ("fp4_gather", "fp4_gather_ll"))
    steps["fp4 rs graph ll"] = replay(fp4_reduce_scatter("ll"), ("fp4_reduce_scatter_ll",))
    steps["fp4 rs graph store"] = replay(fp4_reduce_scatter("store"), ("fp4_reduce_scatter",), "store")
    steps.update(host_steps)
    rows = []
    for name, step in steps.items():
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        comm.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            step()
        host = (time.perf_counter() - t0) / args.calls * 1e6
        end.record(stream)
        end.synchronize()
        rows.append((host, start.elapsed_time(end) * 1e3 / args.calls))
    if args.profile:
        # where the host time of one symmetric-memory FP4 gather goes (graph replays: the steady state)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _profile import host_profile
        for name, go in (("dequantized", fp4_gather("symm")), ("raw", raw_gather)):
            host_profile(comm, go, args.calls, f"{args.calls} symmetric-memory FP4 gathers, {name}")
        if comm.rank == 0:
            keys = [k[0] for k in symm_collectives.workspace(comm)._graphs]
            print(f"## cached graphs by call: { {k: keys.count(k) for k in set(keys)} }")
    os.environ.pop("FP4CCL_FP4_ALGO", None)
    os.environ.pop("FP4CCL_ALGO", None)
    os.environ.pop("FP4CCL_FP4_RS_FORM", None)
    flat = np.array(rows, dtype=np.float64)
    gathered = comm.all_gather(torch.from_numpy(flat).to(dev)).cpu().numpy().reshape(comm.size, *flat.shape)
    worst = gathered.max(axis=0)
    if comm.rank == 0:
        print(f"# probe_latency: {comm.size} ranks, {args.calls} calls per step, us per call, slowest rank; "
              f"collectives on {args.rows} x 1024 bf16 per rank")
        print(f"{'step':>22} {'host':>8} {'gpu':>8}")
        for name, (h, g) in zip(steps, worst):
            print(f"{name:>22} {h:8.2f} {g:8.2f}")
    torch.cuda.synchronize()
    buf.free()
    comm.destroy()


if __name__ == "__main__":
    main()
