"""GPU timelines from torch.profiler, shared by the profile_* scripts: each profiled op's last call,
stream by stream, in µs from that call's first GPU event."""
from __future__ import annotations

import json
import os
import sys
import time


def timeline(trace_path: str, gap_us: float):
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


def print_timeline(title: str, rows) -> None:
    print(f"\n## {title}: {len(rows)} GPU events, span {max((r[2] for r in rows), default=0):.1f} us")
    for stream, start, end, name in sorted(rows, key=lambda r: r[1]):
        print(f"  stream {str(stream):>4} {start:9.1f} {end:9.1f} {end - start:8.1f}  {name[:90]}")


def start_nccl_comm():
    """This rank's fp4ccl communicator on NCCL with its GPU made current: (comm, torch device)."""
    import torch
    import fp4ccl
    comm = fp4ccl.init("nccl")
    torch.cuda.set_device(comm.device)
    return comm, torch.device("cuda", comm.device)


def host_profile(comm, fn, calls: int, title: str) -> None:
    """cProfile of `calls` back-to-back calls of fn on every rank (collective when fn is); rank 0
    prints the top 25 entries by own time under `## cProfile: title`."""
    import cProfile
    import io
    import pstats
    import torch
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    if comm.rank == 0:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(f"## cProfile: {title}\n{text.getvalue()}", flush=True)


def add_arguments(ap) -> None:
    """The options every profile script takes."""
    ap.add_argument("--variants", default="default=", help="NAME=ENV=V[;ENV=V],... fp4ccl settings to profile")
    ap.add_argument("--trace", default="", help="also write the chrome traces into this folder")
    ap.add_argument("--all-ranks", action="store_true", help="print every rank's timeline (default rank 0's)")
    ap.add_argument("--loop", type=int, default=1, help="back-to-back calls per profiled step (steady state)")
    ap.add_argument("--lead-us", type=float, default=0.0,
                    help="hold the GPU this long (a sleep kernel) before each step's calls, so the host has "
                         "enqueued them before the GPU starts: the timeline then shows GPU time, not host time")


def parse_variants(spec: str):
    """'NAME=ENV=V[;ENV=V],...' -> [(name, settings text, {ENV: V})]."""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, rest = item.partition("=")
        out.append((name, rest, dict(kv.split("=", 1) for kv in filter(None, rest.split(";")))))
    return out


def profile_ops(comm, ops, label: str, out_dir: str, loop: int = 1, all_ranks: bool = False,
                prefix: str = "profile", lead_us: float = 0.0) -> None:
    """Warm each (title, fn) up, profile 3 steps of `loop` back-to-back calls on every rank, and print
    rank 0's (or every rank's) last step. lead_us: a sleep kernel of about that long ahead of each
    step's calls (~2 GHz SM clock assumed); it shows in the timeline as its first event."""
    import torch
    for i, (title, fn) in enumerate(ops):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        comm._exchange.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                comm._exchange.barrier()
                if lead_us > 0:
                    torch.cuda._sleep(int(lead_us * 2000))
                for _ in range(loop):
                    fn()
                torch.cuda.synchronize()
                time.sleep(0.01)
        path = os.path.join(out_dir, f"{prefix}_{i}_rank{comm.rank}.json")
        prof.export_chrome_trace(path)
        for r in range(comm.size if all_ranks else 1):
            if comm.rank == r:
                print_timeline(f"{title}, {label}, {loop} calls, rank {r}", timeline(path, 5000.0))
                sys.stdout.flush()
            comm._exchange.barrier()
