"""Where does a pipelined all_gather_matmul spend its time? GPU timelines of torch's fused op and fp4ccl's.

    python3 -m fp4ccl.launcher -n 4 bench/profile_overlap.py [--m 8192] [--nk 8192] [--compress nvfp4]
        [--variants ...]

Every rank runs each op; rank 0 records it with torch.profiler (CUPTI) and prints one call's GPU work
(kernels, copies, memsets) stream by stream: start and end in µs from the call's first GPU event,
so a copy that waits for a matmul, or runs slower beside it, shows directly. --trace DIR also writes
the chrome traces there. Variants: NAME=ENV=V[;ENV=V] settings of fp4ccl's pipelined path.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402,F401  (NVLink multicast off, this checkout's fp4ccl first)


def main() -> None:
    from _profile import add_arguments, parse_variants, profile_ops, start_nccl_comm
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--nk", type=int, default=8192, help="N = K")
    ap.add_argument("--compress", default=None, choices=["nvfp4", "mxfp4"], help="fp4ccl's shards travel as FP4")
    add_arguments(ap)
    args = ap.parse_args()

    import torch
    import torch.distributed as dist
    from fp4ccl.overlap import all_gather_matmul
    from bench_overlap import _torch_group, with_env

    comm, dev = start_nccl_comm()
    W = comm.size
    group_name = _torch_group(comm, torch)
    g = torch.Generator(device=dev).manual_seed(99 + comm.rank)
    a = torch.randn(args.m // W, args.nk, device=dev, generator=g).bfloat16()
    b = torch.randn(args.nk, args.nk // W, device=dev, generator=g).bfloat16()

    ops = [("torch fused_all_gather_matmul",
            lambda: torch.ops.symm_mem.fused_all_gather_matmul(a, [b], 0, group_name))]
    for name, rest, env in parse_variants(args.variants):
        env["FP4CCL_OVERLAP"] = "pipelined"
        ops.append((f"fp4ccl {args.compress or 'bf16'} {name} {rest}",
                    with_env(env, lambda: all_gather_matmul(comm, a, [b], 0, compress=args.compress))))
    profile_ops(comm, ops, f"M={args.m} N=K={args.nk}", args.trace or "/tmp", args.loop, args.all_ranks,
                prefix="profile_overlap", lead_us=args.lead_us)
    comm.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
