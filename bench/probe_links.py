"""What one rank's NVLink carries to one peer: the copy engine, the SMs, or both at once.

Run under the launcher:  python3 -m fp4ccl.launcher -n 4 bench/probe_links.py [--sizes 4.5,18,72] [--shares 0,0.2,...]

Every rank moves the same bytes at the same time, to (push) or from (pull) its ring neighbour's
symmetric buffer, the way the FP4 reduce-scatter's pushes and the raw gather's pulls do. A share s
sends the last s of the bytes with one SM launch (the segmented-copy kernel) beside a copy-engine copy
of the rest, cut on a 256-byte boundary; share 1 is the SM launch alone. (Run 92 of bench/RESULTS.md:
the copy engine alone already carries what the link gives, ~360 GB/s, so no share helped.) With --busy, a
device-to-device copy of 512 MiB starts on another stream at the same time, as the quantize kernels'
memory traffic does in the collectives. Median of --reps timed rounds (CUDA events, every rank
aligned by a barrier first), the slowest rank, GB/s = bytes / time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402,F401  (NVLink multicast off, this checkout's fp4ccl first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4.5,18,72", help="MiB per transfer, comma-separated")
    ap.add_argument("--shares", default="0,0.1,0.2,0.3,0.4,0.5,1", help="the SMs' share of each transfer")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--busy", action="store_true", help="a 512 MiB local copy on another stream beside each transfer")
    args = ap.parse_args()

    import torch
    import fp4ccl
    from fp4ccl.vcollectives import copy, launch_vcopy

    comm = fp4ccl.init()
    torch.cuda.set_device(comm.device)
    dev = f"cuda:{comm.device}"
    sizes = [int(float(s) * (1 << 20)) // 256 * 256 for s in args.sizes.split(",")]
    shares = [float(s) for s in args.shares.split(",")]
    most = max(sizes)
    buf = comm.symmetric_empty((most,), "uint8")
    local = torch.randint(0, 256, (most,), dtype=torch.uint8, device=dev)
    busy = (torch.randn(128 << 20, device=dev), torch.empty(128 << 20, device=dev)) if args.busy else None
    main_s = torch.cuda.Stream(device=dev)
    ce_s, sm_s, busy_s = (torch.cuda.Stream(device=dev) for _ in range(3))
    nxt, prv = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size

    def one(direction: str, nbytes: int, share: float) -> float:
        dst, src = (buf.ptr(nxt), local.data_ptr()) if direction == "push" else (local.data_ptr(), buf.ptr(prv))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        busy_s.synchronize()
        comm.barrier(stream=main_s)
        main_s.synchronize()
        comm.barrier(stream=main_s)  # the second one leaves every rank's stream starting together
        start.record(main_s)
        for s in (ce_s, sm_s, busy_s):
            s.wait_event(start)
        if busy is not None:
            with torch.cuda.stream(busy_s):
                busy[1].copy_(busy[0])
        ce = min(nbytes, -(-(nbytes - int(nbytes * share)) // 256) * 256)
        copy(dst, src, ce, ce_s.cuda_stream)
        if ce < nbytes:
            launch_vcopy(comm.device, [(dst + ce, src + ce, nbytes - ce)], sm_s.cuda_stream)
        for s in (ce_s, sm_s):
            main_s.wait_stream(s)
        end.record(main_s)
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    if comm.rank == 0:
        print(f"# probe_links: {comm.size} ranks, {torch.cuda.get_device_name(comm.device)}, busy={args.busy}; "
              "us and GB/s per transfer, median of the slowest rank", flush=True)
        print(f"{'dir':>5} {'MiB':>6} " + " ".join(f"{'sm' + format(s, 'g'):>14}" for s in shares), flush=True)
    for direction in ("push", "pull"):
        for nbytes in sizes:
            cells = []
            for share in shares:
                for _ in range(3):
                    one(direction, nbytes, share)
                times = [one(direction, nbytes, share) for _ in range(args.reps)]
                med = float(comm.all_reduce(torch.tensor([statistics.median(times)], device=dev), op="max")[0])
                cells.append(f"{med:7.1f} {nbytes / med / 1e3:6.0f}")
            if comm.rank == 0:
                print(f"{direction:>5} {nbytes / (1 << 20):6.1f} " + " ".join(f"{c:>14}" for c in cells), flush=True)
    buf.free()
    comm.destroy()


if __name__ == "__main__":
    main()
