"""Does a pull from a peer's symmetric memory overlap a matmul? (the question behind issue 6's gap)

Run under the launcher, every rank pulls from rank+1 while multiplying:
    python3 -m fp4ccl.launcher -n 4 bench/probe_overlap.py [--mib 32] [--m 2048] [--nk 8192]

Rows (ms, median of --iters after warm-up, CUDA events, slowest rank): the matmul alone, each pull
alone, then each pull issued on a second stream at the same time as the matmul (`both`: from the
first event to the last; `mm|` and `pull|`: each stream's own span within it). A pull that overlaps
keeps `both` near max(mm, pull); one that waits for the matmul's SMs gives mm + pull.
Pulls: cudaMemcpyAsync peer-to-local (copy engine) from one peer, the same split in 4 pieces on 4
streams, one copy from each peer on its own stream; the segmented-copy kernel (SM loads over NVLink)
from every peer with a full grid or N blocks per peer (`sm all xN`), and from one peer with a few
blocks; `ce+sm xN`: the copy engine pulls one peer's share while N blocks per peer pull the others'.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402,F401  (NVLink multicast off, this checkout's fp4ccl first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=32, help="bytes pulled per call, MiB")
    ap.add_argument("--m", type=int, default=2048, help="rows of the matmul's A (one shard)")
    ap.add_argument("--nk", type=int, default=8192, help="N = K of the matmul")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-mm", action="store_true", help="time the pulls alone only")
    ap.add_argument("--carveouts", default="", help="comma-separated SM carveouts: time the matmul with that many "
                    "SMs left free (torch._C._set_sm_carveout_experimental), alone and beside an NVFP4 decode")
    ap.add_argument("--mm-n", type=int, default=0, help="columns of the matmul's B (default --nk)")
    ap.add_argument("--torch-symm", action="store_true",
                    help="also pull from a buffer of torch's symmetric memory (torch.distributed), by "
                         "cudaMemcpyAsync and by torch's copy_, to compare the two allocations")
    args = ap.parse_args()

    import torch
    import fp4ccl
    from fp4ccl import vcollectives
    from fp4ccl._cuda import StreamRef, runtime

    comm = fp4ccl.init()
    torch.cuda.set_device(comm.device)
    dev = f"cuda:{comm.device}"
    nbytes = args.mib << 20
    buf = comm.symmetric_empty((nbytes,), "uint8")
    buf.local.copy_(torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev))
    buf.barrier()
    torch.cuda.synchronize()
    peer = (comm.rank + 1) % comm.size
    src = buf.ptr(peer)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    a = torch.randn(args.m, args.nk, device=dev, dtype=torch.bfloat16)
    mm_n = args.mm_n or args.nk
    b = torch.randn(args.nk, mm_n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(args.m, mm_n, device=dev, dtype=torch.bfloat16)
    main_s = torch.cuda.current_stream()
    side = [torch.cuda.Stream(device=dev) for _ in range(4)]

    rt = runtime()
    peers = [(comm.rank + i) % comm.size for i in range(1, comm.size)]

    def ce(streams, peers_, push=False):
        # The bytes split evenly over (stream, peer) pairs: one copy per stream, peer i % len(peers_).
        # push: the other direction, this rank's copy engine writing into the peers' buffers (so each
        # rank receives what its peers push).
        def go():
            piece = nbytes // len(streams)
            for i, s in enumerate(streams):
                remote = buf.ptr(peers_[i % len(peers_)]) + i * piece
                local = dst.data_ptr() + i * piece
                d, src_ = (remote, local) if push else (local, remote)
                rt.memcpyAsync(d, src_, piece, rt.memcpyDefault, s.cuda_stream)
        return go

    def sm_all_peers():
        piece = nbytes // len(peers)
        segs = [(dst.data_ptr() + i * piece, buf.ptr(p) + i * piece, piece) for i, p in enumerate(peers)]

        def go():
            vcollectives.launch_vcopy(comm.device, segs, side[0].cuda_stream)
        return go

    fn, _ = vcollectives._vcopy_kernel(comm.device)
    # the kernel's by-value parameter: three arrays of VCOPY_MAXSEG u64 (src, dst, nbytes)
    VCOPY_TABLE = np.dtype([(f, "<u8", (vcollectives.VCOPY_MAXSEG,)) for f in ("src", "dst", "nbytes")])

    def sm(blocks):
        # `blocks` segments of one block each (grid x = 1): exactly that many blocks read over NVLink.
        piece = nbytes // blocks
        table = np.zeros(1, VCOPY_TABLE)
        flat = table.view(np.uint64)
        m = vcollectives.VCOPY_MAXSEG
        flat[0:blocks] = [src + i * piece for i in range(blocks)]
        flat[m:m + blocks] = [dst.data_ptr() + i * piece for i in range(blocks)]
        flat[2 * m:2 * m + blocks] = piece

        def go():
            fn((1, blocks, 1), (vcollectives.VCOPY_THREADS, 1, 1), (table,), 0, StreamRef(side[0].cuda_stream))
        return go

    def sm_peers(sources, blocks, first):
        """A vcopy launch pulling an equal share of `nbytes` from each source (share i of the buffer
        from source i, i counted from `first`), `blocks` blocks per source."""
        share = nbytes // len(peers)
        table = np.zeros(1, VCOPY_TABLE)
        flat = table.view(np.uint64)
        m = vcollectives.VCOPY_MAXSEG
        n = len(sources)
        flat[0:n] = [buf.ptr(p) + (first + i) * share for i, p in enumerate(sources)]
        flat[m:m + n] = [dst.data_ptr() + (first + i) * share for i in range(n)]
        flat[2 * m:2 * m + n] = share
        return lambda stream: fn((blocks, n, 1), (vcollectives.VCOPY_THREADS, 1, 1), (table,), 0,
                                 StreamRef(stream.cuda_stream))

    def hybrid(blocks):
        # The copy engine pulls the first peer's share while SM blocks pull the other peers' shares.
        share = nbytes // len(peers)
        sm_rest = sm_peers(peers[1:], blocks, 1)

        def go():
            rt.memcpyAsync(dst.data_ptr(), buf.ptr(peers[0]), share, rt.memcpyDefault, side[0].cuda_stream)
            sm_rest(side[1])
        return go

    def sm_each(blocks):
        launch = sm_peers(peers, blocks, 0)
        return lambda: launch(side[0])

    extra = {}
    if args.torch_symm:
        import torch.distributed._symmetric_memory as symm_mem
        from bench_overlap import _torch_group
        group_name = _torch_group(comm, torch)
        tbuf = symm_mem.empty(nbytes, dtype=torch.uint8, device=dev)
        handle = symm_mem.rendezvous(tbuf, group_name)
        tbuf.copy_(buf.local)
        handle.barrier()
        torch.cuda.synchronize()
        tpeer = handle.get_buffer(peer, (nbytes,), torch.uint8)

        def torch_copy():
            with torch.cuda.stream(side[0]):
                dst.copy_(tpeer)

        def ce_from(ptr, kind):
            return lambda: rt.memcpyAsync(dst.data_ptr(), ptr, nbytes, kind, side[0].cuda_stream)
        extra = {"ce 1 peer torchbuf": (ce_from(tpeer.data_ptr(), rt.memcpyDefault), side[:1]),
                 "copy_ 1 peer torchbuf": (torch_copy, side[:1]),
                 "ce 1 peer d2d kind": (ce_from(src, rt.memcpyDeviceToDevice), side[:1])}

    pulls = {**extra, "ce 1 peer": (ce(side[:1], [peer]), side[:1]),
             "ce push 1 peer": (ce(side[:1], [peer], push=True), side[:1]),
             "ce push all": (ce(side[:len(peers)], peers, push=True), side[:len(peers)]), "ce 1 peer x4": (ce(side, [peer]), side),
             "ce all peers": (ce(side[:len(peers)], peers), side[:len(peers)]),
             "sm all peers": (sm_all_peers(), side[:1]),
             "sm all x64": (sm_each(64), side[:1]), "sm all x128": (sm_each(128), side[:1]),
             "ce+sm x128": (hybrid(128), side[:2]), "ce+sm x256": (hybrid(256), side[:2]),
             "sm 16": (sm(16), side[:1]), "sm 64": (sm(64), side[:1]), "sm 128": (sm(128), side[:1])}
    if args.no_mm:
        pulls = {k: v for k, v in pulls.items() if not k.startswith("sm ") or k.startswith("sm all")}

    def timed(fn_main, pull):
        start = torch.cuda.Event(enable_timing=True)
        start.record(main_s)
        ends = []
        if pull is not None:
            go, streams = pull
            for s in streams:
                s.wait_event(start)
            go()
            for s in streams:
                e = torch.cuda.Event(enable_timing=True)
                e.record(s)
                ends.append(("pull", e))
        if fn_main is not None:
            fn_main()
            e = torch.cuda.Event(enable_timing=True)
            e.record(main_s)
            ends.append(("mm", e))
        torch.cuda.synchronize()
        spans = {}
        for k, e in ends:
            spans[k] = max(spans.get(k, 0.0), start.elapsed_time(e))
        spans["both"] = max(spans.values())
        return spans

    def mm():
        torch.mm(a, b, out=c)

    def median(fn_main, pull):
        for _ in range(3):
            timed(fn_main, pull)
        runs = [timed(fn_main, pull) for _ in range(args.iters)]
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    rows = [("mm alone", median(mm, None))]
    if args.carveouts:
        # An NVFP4 decode of one shard ([m x nk] bf16 out) on the side stream beside the matmul: does a
        # cuBLAS carveout leave the decode SMs to run on while the matmul runs?
        from fp4ccl import formats
        lay = formats.packed_layout(args.m, args.nk, "nvfp4")
        packed = torch.empty(lay.total_bytes, dtype=torch.uint8, device=dev)
        formats.quantize_packed(a, packed, [(0, args.m, 0)], "nvfp4")
        decoded = torch.empty_like(a)

        def decode_pull():
            return lambda: formats.dequantize_packed(packed, [(0, args.m, 0)], args.nk, "nvfp4", decoded,
                                                     stream=side[0])
        dq = (decode_pull(), side[:1])
        rows.append(("decode alone", median(None, dq)))
        for n in [int(c) for c in args.carveouts.split(",")]:
            torch._C._set_sm_carveout_experimental(n or None)
            try:
                rows.append((f"mm carve{n}", median(mm, None)))
                rows.append((f"decode+mm carve{n}", median(mm, dq)))
            finally:
                torch._C._set_sm_carveout_experimental(None)
    for name, pull in pulls.items():
        rows.append((f"{name} alone", median(None, pull)))
        if not args.no_mm:
            rows.append((f"{name} + mm", median(mm, pull)))
    # Slowest rank per cell.
    keys = ("both", "mm", "pull")
    flat = np.array([[r.get(k, float("nan")) for k in keys] for _, r in rows], dtype=np.float64)
    gathered = comm.all_gather(torch.from_numpy(flat).to(dev)).cpu().numpy().reshape(comm.size, *flat.shape)
    worst = np.nanmax(gathered, axis=0) if comm.size > 1 else flat
    if comm.rank == 0:
        print(f"# probe_overlap: {comm.size} ranks, pull {args.mib} MiB from rank+1, mm [{args.m} x {args.nk}] @ "
              f"[{args.nk} x {args.nk}] bf16, median of {args.iters}, slowest rank, ms")
        print(f"{'case':>20} {'both':>8} {'mm|':>8} {'pull|':>8} {'GB/s pull':>10}")
        for (name, _), (both, m, p) in zip(rows, worst):
            gbs = nbytes / (p * 1e-3) / 1e9 if p == p else float("nan")
            print(f"{name:>20} {both:8.3f} {m:8.3f} {p:8.3f} {gbs:10.1f}")
    buf.free()
    comm.destroy()
    if args.torch_symm:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
