"""Host time of one all_gather_matmul call against its GPU time: is the pipelined path host-bound?

    python3 -m fp4ccl.launcher -n 4 bench/probe_overlap_host.py [--m 8192] [--nk 8192]
        [--compress none,nvfp4] [--forms plain,replay] [--calls 20] [--cprofile]

Every rank prints, per format: the host time of one call alone (the GPU idle, synchronized after each;
median and min of 11), the host time per call inside a back-to-back loop of --calls, and the GPU time
per call of that loop (CUDA events). When the host time approaches the GPU time, the GPU waits for
launches and the op's speed is the host's. --cprofile: rank 0 also prints cProfile's top entries.
Forms: plain = all_gather_matmul(a, [b]) (a_full returned, every call enqueued step by step); replay =
into out= with return_a=False, which replays a CUDA graph of the call once it repeats.
Shapes as bench/bench_overlap.py: A shard [M/W, K] @ B [K, N/W], pipelined path forced.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["FP4CCL_OVERLAP"] = "pipelined"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402,F401  (NVLink multicast off, this checkout's fp4ccl first)


def main() -> None:
    from _profile import host_profile, start_nccl_comm
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--nk", type=int, default=8192, help="N = K")
    ap.add_argument("--compress", default="none,nvfp4", help="comma-separated: none, nvfp4, mxfp4")
    ap.add_argument("--forms", default="plain,replay", help="comma-separated: plain, replay")
    ap.add_argument("--calls", type=int, default=20, help="calls in the back-to-back loop")
    ap.add_argument("--cprofile", action="store_true", help="rank 0 prints cProfile's top 25 by own time")
    args = ap.parse_args()

    import torch
    from fp4ccl.overlap import all_gather_matmul
    comm, dev = start_nccl_comm()
    W = comm.size
    g = torch.Generator(device=dev).manual_seed(5 + comm.rank)
    a = torch.randn(args.m // W, args.nk, device=dev, generator=g).bfloat16()
    b = torch.randn(args.nk, args.nk // W, device=dev, generator=g).bfloat16()
    out = [torch.empty(args.m, args.nk // W, device=dev, dtype=torch.bfloat16)]
    for name, form in ((n, f) for n in args.compress.split(",") for f in args.forms.split(",")):
        fmt = None if name == "none" else name
        if form not in ("plain", "replay"):
            raise SystemExit(f"--forms: {form!r} is not plain or replay")

        def call():
            if form == "replay":
                return all_gather_matmul(comm, a, [b], 0, compress=fmt, return_a=False, out=out)
            return all_gather_matmul(comm, a, [b], 0, compress=fmt)
        name = f"{name} {form}"
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        alone = []
        for _ in range(11):
            t0 = time.perf_counter()
            call()
            alone.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        alone.sort()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        comm._exchange.barrier()
        start.record()
        h0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        h1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        print(f"rank {comm.rank} {name}: host per call alone median {alone[5] * 1e6:.0f} us (min {alone[0] * 1e6:.0f}), "
              f"in the loop {(h1 - h0) / args.calls * 1e6:.0f} us; GPU {start.elapsed_time(end) / args.calls * 1e3:.0f} us "
              "per call", flush=True)
        if args.cprofile:
            host_profile(comm, call, args.calls, f"{args.calls} calls, {name}")
        comm._exchange.barrier()
    comm.destroy()


if __name__ == "__main__":
    main()
