"""Where does a pipelined all_gather_matmul spend its time? GPU timelines of torch's fused op and fp4ccl's.

    python3 -m fp4ccl.launcher -n 4 bench/profile_overlap.py [--m 8192] [--nk 8192] [--variants ...]

Every rank runs each op; rank 0 records it with torch.profiler (CUPTI) and prints one call's GPU work
(kernels, copies, memsets) stream by stream: start and end in µs from the call's first GPU event,
so a copy that waits for a matmul, or runs slower beside it, shows directly. --trace DIR also writes
the chrome traces there. Variants: NAME=ENV=V[;ENV=V] settings of fp4ccl's pipelined path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _timeline(trace_path: str, gap_us: float):
    """GPU events of the last profiled step (events apart by more than gap_us start a new step):
    [(stream, start, end, name)], times from the step's first event."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    gpu.sort(key=lambda e: e["ts"])
    calls, cur = [], []
    for e in gpu:
        if cur and e["ts"] - max(c["ts"] + c["dur"] for c in cur) > gap_us:
            calls.append(cur)
            cur = []
        cur.append(e)
    if cur:
        calls.append(cur)
    last = calls[-1] if calls else []
    t0 = last[0]["ts"] if last else 0.0
    return [(e.get("args", {}).get("stream", "?"), e["ts"] - t0, e["ts"] + e["dur"] - t0, e["name"]) for e in last]


def _print(title: str, rows) -> None:
    print(f"\n## {title}: {len(rows)} GPU events, span {max((r[2] for r in rows), default=0):.1f} us")
    for stream, start, end, name in sorted(rows, key=lambda r: r[1]):
        print(f"  stream {str(stream):>4} {start:9.1f} {end:9.1f} {end - start:8.1f}  {name[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--nk", type=int, default=8192, help="N = K")
    ap.add_argument("--variants", default="default=", help="NAME=ENV=V[;ENV=V],... fp4ccl settings to profile")
    ap.add_argument("--trace", default="", help="also write the chrome traces into this folder")
    ap.add_argument("--all-ranks", action="store_true", help="print every rank's timeline (default rank 0's)")
    ap.add_argument("--loop", type=int, default=1, help="back-to-back calls per profiled step (steady state)")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist
    import fp4ccl
    from fp4ccl.overlap import all_gather_matmul
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_overlap import _torch_group

    comm = fp4ccl.init("nccl")
    torch.cuda.set_device(comm.device)
    dev = torch.device("cuda", comm.device)
    W = comm.size
    group_name = _torch_group(comm, torch)
    g = torch.Generator(device=dev).manual_seed(99 + comm.rank)
    a = torch.randn(args.m // W, args.nk, device=dev, generator=g).bfloat16()
    b = torch.randn(args.nk, args.nk // W, device=dev, generator=g).bfloat16()

    ops = [("torch fused_all_gather_matmul",
            lambda: torch.ops.symm_mem.fused_all_gather_matmul(a, [b], 0, group_name))]
    for item in filter(None, args.variants.split(",")):
        name, _, rest = item.partition("=")
        env = dict(kv.split("=", 1) for kv in filter(None, rest.split(";")))
        env["FP4CCL_OVERLAP"] = "pipelined"

        def call(env=env):
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return all_gather_matmul(comm, a, [b], 0)
            finally:
                for k, v in old.items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        ops.append((f"fp4ccl {name} {rest}", call))

    out_dir = args.trace or "/tmp"
    for i, (title, fn) in enumerate(ops):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        comm._exchange.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                comm._exchange.barrier()
                for _ in range(args.loop):
                    fn()
                torch.cuda.synchronize()
                time.sleep(0.01)
        path = os.path.join(out_dir, f"profile_overlap_{i}_rank{comm.rank}.json")
        prof.export_chrome_trace(path)
        for r in range(comm.size if args.all_ranks else 1):
            if comm.rank == r:
                _print(f"{title}, M={args.m} N=K={args.nk}, {args.loop} calls, rank {r}", _timeline(path, 5000.0))
                sys.stdout.flush()
            comm._exchange.barrier()
    comm.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
