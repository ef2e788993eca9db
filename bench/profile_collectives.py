"""Where does an FP4 collective spend its time? GPU timelines of fp4ccl's NVFP4 reduce_scatterv and
all_gatherv beside NCCL's bf16 reduce_scatter and all_gather of the same logical tensor.

    python3 -m fp4ccl.launcher -n 4 bench/profile_collectives.py [--bytes 256M] [--ops rs,ag]
        [--variants NAME=ENV=V[;ENV=V],...] [--loop N] [--all-ranks]

--bytes is each rank's bf16 input of the reduce-scatter (its output of the gather), as in the
sweep's logical column. Every rank runs each op; rank 0 (or every rank) prints one step's GPU work
stream by stream (bench/_profile.py).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402,F401  (NVLink multicast off, this checkout's fp4ccl first)

K = 8192


def main() -> None:
    from _profile import add_arguments, parse_variants, profile_ops, start_nccl_comm
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", default="256M", help="each rank's logical bf16 tensor (suffix K/M/G)")
    ap.add_argument("--ops", default="rs,ag", help="rs: reduce-scatter, ag: all-gather, raw: all-gather to FP4 "
                    "(dequantize=False, into out=)")
    add_arguments(ap)
    args = ap.parse_args()

    import torch
    from fp4ccl.sweep import parse_size
    from bench_overlap import with_env

    comm, dev = start_nccl_comm()
    W = comm.size
    rows = max(W, parse_size(args.bytes) // (2 * K) // W * W)
    g = torch.Generator(device=dev).manual_seed(7 + comm.rank)
    x = torch.randn(rows, K, device=dev, generator=g).bfloat16()         # the reduce-scatter's input
    part = x[: rows // W].clone()                                        # the gather's input
    rs_out = torch.empty(rows // W, K, device=dev, dtype=torch.bfloat16)
    ag_out = torch.empty(rows, K, device=dev, dtype=torch.bfloat16)
    sizes = [rows // W] * W

    ops = []
    for op in filter(None, args.ops.split(",")):
        if op == "rs":
            ops.append(("NCCL bf16 reduce_scatter", lambda: comm.reduce_scatter(x, out=rs_out)))
            for name, rest, env in parse_variants(args.variants):
                ops.append((f"fp4ccl NVFP4 reduce_scatterv {name} {rest}",
                            with_env(env, lambda: comm.reduce_scatterv(x, sizes, out=rs_out, compress="nvfp4"))))
        elif op == "ag":
            ops.append(("NCCL bf16 all_gather", lambda: comm.all_gather(part, out=ag_out)))
            for name, rest, env in parse_variants(args.variants):
                ops.append((f"fp4ccl NVFP4 all_gatherv {name} {rest}",
                            with_env(env, lambda: comm.all_gatherv(part, sizes, out=ag_out, compress="nvfp4"))))
        elif op == "raw":
            ops.append(("NCCL bf16 all_gather", lambda: comm.all_gather(part, out=ag_out)))
            raw_out = comm.all_gatherv(part, sizes, compress="nvfp4", dequantize=False)
            for name, rest, env in parse_variants(args.variants):
                ops.append((f"fp4ccl NVFP4 raw all_gatherv {name} {rest}",
                            with_env(env, lambda: comm.all_gatherv(part, sizes, out=raw_out, compress="nvfp4",
                                                                   dequantize=False))))
        else:
            raise SystemExit(f"--ops: unknown op {op!r} (rs, ag, raw)")
    profile_ops(comm, ops, f"{rows} x {K} bf16 per rank", args.trace or "/tmp", args.loop, args.all_ranks,
                prefix="profile_collectives", lead_us=args.lead_us)
    comm.destroy()


if __name__ == "__main__":
    main()
