"""Pipelined all-gather + matmul and matmul + reduce-scatter: fp4ccl against torch's symmetric-memory fused
ops, the sequential NCCL path and the matmul alone, in one run, with pipelined variants side by side.

    fp4ccl-run -n 4 bench/bench_overlap.py [--m 256,1024,...] [--variants "inl=FP4CCL_OVERLAP_DECODE=inline,s2=FP4CCL_OVERLAP_STREAMS=2"]
    mpirun -n 4 python bench/bench_overlap.py

Shapes follow DESIGN.md's table: ag+mm A shard [M/W, K] @ B [K, N/W]; mm+rs A [M, K/W] @ B [K/W, N]. bf16,
plus ag+mm with NVFP4 shards. Times are ms: each rank times batches of back-to-back calls with CUDA
events (after warm-up); a batch's time is the slowest rank's; the table shows the median batch.
Columns: seq = NCCL collective then torch.mm called directly; seqpath = the same through fp4ccl's API
(FP4CCL_OVERLAP=sequential, what the automatic path runs below the threshold); one column per variant
(FP4CCL_* settings, forced pipelined; "pipe" = the defaults); for ag+mm, "replay" = the default pipelined
call into out= with return_a=False, which replays a CUDA graph of itself once it repeats (host time per
call one launch); the same for mm+rs into out=. A summary picks the fastest per row.
eff = (comm + mm - fused) / min(comm, mm), where comm is the NCCL collective alone (for FP4 rows, the
sequential FP4 gather: quantize, NCCL all_gather of packed bytes, dequantize).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402,F401  (NVLink multicast off, this checkout's fp4ccl first)


VARIANT_HELP = ("comma-separated NAME=ENV=V[;ENV=V] pipelined variants (FP4CCL_* settings, e.g. "
                "FP4CCL_OVERLAP_DECODE=inline;FP4CCL_OVERLAP_STREAMS=2); each is timed forced-pipelined")


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="256,1024,2048,4096,8192,16384", help="comma-separated M values")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--iters", type=int, default=10, help="calls per timed batch")
    p.add_argument("--batches", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ops", default="ag,rs,ag_nvfp4")
    p.add_argument("--variants", default="", help=VARIANT_HELP + "; empty: the defaults only")
    p.add_argument("--no-torch", action="store_true", help="skip torch's fused ops")
    p.add_argument("--json", default="", help="write every number here (rank 0)")
    p.add_argument("--plot", default="", help="also plot the table into this PNG (rank 0; bench/plot_overlap.py)")
    return p.parse_args()


def _variants(spec: str):
    from _profile import parse_variants
    return [(name, env) for name, _, env in parse_variants(spec)] or [("pipe", {})]


def with_env(env, fn):
    """fn run with the FP4CCL_* variables of `env` set (and restored after)."""
    def run():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run


def main() -> int:
    args = parse()
    import torch
    import fp4ccl
    from fp4ccl.overlap import all_gather_matmul, matmul_reduce_scatter

    comm = fp4ccl.init("nccl")
    torch.cuda.set_device(comm.device)
    W, r = comm.size, comm.rank
    dev = torch.device("cuda", comm.device)
    group_name = None if args.no_torch else _torch_group(comm, torch)
    variants = _variants(args.variants)

    def bench(fn):
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.batches):
            comm._exchange.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                fn()
            end.record()
            end.synchronize()
            mine = start.elapsed_time(end) / args.iters
            every = [struct.unpack("<d", b)[0] for b in comm._exchange.all_gather_bytes(struct.pack("<d", mine))]
            times.append(max(every))
        return statistics.median(times)

    seq_path = {"FP4CCL_OVERLAP": "sequential"}
    rows = []
    N, K = args.n, args.k
    ops = args.ops.split(",")
    if r == 0:
        _header(W, N, K, torch.cuda.get_device_name(dev), variants)
    for M in (int(m) for m in args.m.split(",")):
        g = torch.Generator(device=dev).manual_seed(1234 + r)
        if "ag" in ops or "ag_nvfp4" in ops:
            # two input sets, alternated, so repeated calls do not just hit L2
            sets = [(torch.randn(M // W, K, device=dev, generator=g).bfloat16(),
                     torch.randn(K, N // W, device=dev, generator=g).bfloat16()) for _ in range(2)]
            full = [torch.randn(M, K, device=dev, generator=g).bfloat16() for _ in range(2)]
            it = _cycler()
            t_mm = bench(lambda: torch.mm(full[next(it)], sets[0][1]))
            t_comm = bench(lambda: comm.all_gather(sets[next(it)][0]))
            t_seq = bench(lambda: torch.mm(comm.all_gather(sets[next(it)][0]), sets[0][1]))
            for fmt in ([None] if "ag" in ops else []) + (["nvfp4"] if "ag_nvfp4" in ops else []):
                row = {"op": "ag+mm" + (f" {fmt}" if fmt else ""), "M": M, "mm": t_mm, "seq": t_seq}
                if fmt:
                    from fp4ccl.overlap import _fp4_shards
                    row["comm"] = bench(lambda: _fp4_shards(comm, sets[next(it)][0], fmt))
                else:
                    row["comm"] = t_comm

                def call():
                    return all_gather_matmul(comm, sets[next(it)][0], [sets[0][1]], 0, compress=fmt)
                row["fp4ccl_seqpath"] = bench(with_env(seq_path, call))
                for name, env in variants:
                    row[name] = bench(with_env({**env, "FP4CCL_OVERLAP": "pipelined"}, call))
                outs = [torch.empty(M, N // W, device=dev, dtype=torch.bfloat16) for _ in range(2)]

                def into_out():
                    i = next(it)
                    return all_gather_matmul(comm, sets[i][0], [sets[0][1]], 0, compress=fmt, return_a=False,
                                             out=[outs[i]])
                row["replay"] = bench(with_env({"FP4CCL_OVERLAP": "pipelined"}, into_out))
                if group_name and not fmt:
                    row["torch"] = bench(lambda: torch.ops.symm_mem.fused_all_gather_matmul(
                        sets[next(it)][0], [sets[0][1]], 0, group_name))
                rows.append(row)
                if r == 0:
                    _row(row, variants)
            del sets, full
        if "rs" in ops:
            sets = [(torch.randn(M, K // W, device=dev, generator=g).bfloat16(),
                     torch.randn(K // W, N, device=dev, generator=g).bfloat16()) for _ in range(2)]
            part = [torch.randn(M, N, device=dev, generator=g).bfloat16() for _ in range(2)]
            it = _cycler()
            row = {"op": "mm+rs", "M": M}
            row["mm"] = bench(lambda: torch.mm(*sets[next(it)]))
            row["comm"] = bench(lambda: comm.reduce_scatter(part[next(it)]))
            row["seq"] = bench(lambda: comm.reduce_scatter(torch.mm(*sets[next(it)])))

            def call():
                return matmul_reduce_scatter(comm, *sets[next(it)])
            row["fp4ccl_seqpath"] = bench(with_env(seq_path, call))
            for name, env in variants:
                row[name] = bench(with_env({**env, "FP4CCL_OVERLAP": "pipelined"}, call))
            outs = [torch.empty(M // W, N, device=dev, dtype=torch.bfloat16) for _ in range(2)]

            def into_out():
                i = next(it)
                return matmul_reduce_scatter(comm, *sets[i], out=outs[i])
            row["replay"] = bench(with_env({"FP4CCL_OVERLAP": "pipelined"}, into_out))
            if group_name:
                row["torch"] = bench(lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(
                    *sets[next(it)], "sum", 0, group_name))
            rows.append(row)
            if r == 0:
                _row(row, variants)
            del sets, part
        torch.cuda.empty_cache()

    if r == 0:
        _summary(rows, variants)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world": W, "N": N, "K": K, "variants": dict(variants), "rows": rows}, f, indent=1)
        if args.plot:
            from plot_overlap import plot
            plot(rows, args.plot, f"bench_overlap: {W} x {torch.cuda.get_device_name(dev)}, N={N} K={K}, bf16")
    comm.destroy()
    if group_name:
        torch.distributed.destroy_process_group()
    return 0


def _cycler():
    i = 0
    while True:
        yield i & 1
        i += 1


def _torch_group(comm, torch):
    """torch.distributed over NCCL with symmetric memory on, rendezvous through fp4ccl's exchange."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        data = str(port).encode()
    else:
        data = None
    port = int(comm._exchange.broadcast_bytes(data, 0))
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank, world_size=comm.size,
                            device_id=torch.device("cuda", comm.device))
    group = dist.group.WORLD
    symm_mem.enable_symm_mem_for_group(group.group_name)
    return group.group_name


def _header(W, N, K, name, variants):
    print(f"\n# overlap bench: {W} x {name}, N={N} K={K}, bf16, ms (median batch, slowest rank)")
    print("# seqpath = fp4ccl's sequential path through its API (what auto runs below the threshold); "
          + ", ".join(f"{n} = pipelined, " + (";".join(f"{k}={v}" for k, v in e.items()) or "defaults")
                      for n, e in variants)
          + "; replay = pipelined into out= (ag+mm: return_a=False), a CUDA graph once it repeats")
    head = f"{'op':<12}{'M':>6}{'mm':>8}{'comm':>8}{'seq':>8}{'torch':>8}{'seqpath':>8}"
    head += "".join(f"{n:>8}" for n, _ in variants) + f"{'replay':>8}"
    print(head, flush=True)


def _row(row, variants):
    line = f"{row['op']:<12}{row['M']:>6}"
    for key in ("mm", "comm", "seq", "torch", "fp4ccl_seqpath"):
        line += f"{row.get(key, float('nan')):>8.3f}"
    line += "".join(f"{row[n]:>8.3f}" for n, _ in variants)
    line += f"{row.get('replay', float('nan')):>8.3f}"
    print(line, flush=True)


def _eff(comm, mm, fused):
    return (comm + mm - fused) / min(comm, mm) if min(comm, mm) > 0 else float("nan")


def _summary(rows, variants):
    """Per row: the best of fp4ccl's sequential path and its pipelined variants, against torch and seq."""
    print("\n# best fp4ccl per row; eff = (comm + mm - t) / min(comm, mm)")
    head = (f"{'op':<12}{'M':>6}{'best':>9}{'ms':>8}{'torch':>8}{'seq':>8}{'eff':>7}{'eff torch':>10}"
            f"{'vs torch':>9}{'vs seq':>8}")
    print(head)
    for row in rows:
        cands = [("seqpath", row["fp4ccl_seqpath"])] + [(n, row[n]) for n, _ in variants]
        cands += [("replay", row["replay"])] if "replay" in row else []
        name, t = min(cands, key=lambda c: c[1])
        tt = row.get("torch", float("nan"))
        print(f"{row['op']:<12}{row['M']:>6}{name:>9}{t:>8.3f}{tt:>8.3f}{row['seq']:>8.3f}"
              f"{_eff(row['comm'], row['mm'], t):>7.2f}{_eff(row['comm'], row['mm'], tt):>10.2f}"
              f"{tt / t:>8.2f}x{row['seq'] / t:>7.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
