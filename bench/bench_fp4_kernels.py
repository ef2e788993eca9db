"""Bandwidth of the FP4 kernels against the device's own copy bandwidth, measured in the same run.

    python bench/bench_fp4_kernels.py [-b 64M] [-e 1G] [-f 4] [-n 20] [-w 5] [-t bfloat16,float32] [-j out.json]

For each input size (bytes of the bf16/fp32 input) it times, with CUDA events around each launch, the
median of n runs after w warm-ups, rotating over 3 fresh random inputs so no run reads what the last
left in L2:
  copy          torch copy_ of the input bytes (a memcpy node)     bytes = 2 * in
  copy-s        the same copy_ calls on the stream, no graph       bytes = 2 * in
  copy-k        a plain 16-byte-vector copy kernel (graph)         bytes = 2 * in
  write-k       the same kernel writing a constant (writes only)   bytes = in
  q-nv amax=    NVFP4 quantize, amax given                        bytes = in + data + scales
  amax          the amax kernel alone (max |x| into a device fp32)  bytes = in
  q-nv auto     NVFP4 quantize, amax computed on the device       bytes = 2 * in + data + scales
                (fp4ccl.quantize: the amax kernel writing per-block partial
                maxima, then quantize taking their max)
  q-nv auto0    the same with the amax in one zeroed word (memset,    bytes = 2 * in + data + scales
                atomicMax, quantize): the form "auto" replaced
  q-nv amax*    NVFP4 quantize, amax given as a device scalar     bytes = in + data + scales
                (the second launch of "auto" alone)
  q-mx          MXFP4 quantize                                    bytes = in + data + scales
  dq-nv / dq-mx dequantize back to the input dtype                bytes = data + scales + out
  dqsumN-nv/mx  fused dequantize-and-sum of N FP4 tensors (bf16 rows) bytes = N * (data + scales) + out
time(us) is the GPU time of one call from CUDA-graph replays of 12 back-to-back calls (kernels alone);
call(us) has events around each Python call with the GPU otherwise idle (dispatch overhead included).
GB/s = bytes / time(us), and %copy that against the fastest of the three copies ("roofline": the
fewest bytes each kernel must move, read once and written once, against what a plain copy achieves).
Under graph replay a 1 GiB copy_ (a memcpy node) ran at ~2.77 TB/s while the same copy on the stream
and a copy kernel did not: see docs/FP4.md.
#wrong counts bytes of the first 64 rows that differ from the numpy reference (0 expected).
First, a short table of the host cost of one call of each launcher (kernels.* and fp4ccl.*), for the
ctypes cuLaunchKernel path and the CuPy path.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fp4ccl  # noqa: E402
from fp4ccl.formats import FP4Tensor, kernels, reference as ref  # noqa: E402


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("B")
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def time_graph(fn, n: int, warm: int, calls: int = 12) -> float:
    """Median milliseconds of one fn(i) from CUDA-graph replays of `calls` back-to-back calls: the GPU
    time of the kernels alone, without the Python dispatch in between (METHOD.md)."""
    import torch
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    for _ in range(max(1, warm)):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    return statistics.median(times)


def time_stream(fn, n: int, warm: int, calls: int = 12) -> float:
    """Median milliseconds of one fn(i) from `calls` back-to-back calls on the stream, no graph (events
    around the batch; the host enqueues faster than these sizes run, so the GPU does not wait)."""
    return time_it(fn, n, max(1, warm), calls)


_COPY_SRC = r"""
extern "C" __global__ void __launch_bounds__(256) copy16(const uint4* __restrict__ s, uint4* __restrict__ d,
                                                         unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * 256u;
    unsigned long long i = (unsigned long long)blockIdx.x * 256u + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 a = s[i], b = s[i + stride], c = s[i + 2 * stride], e = s[i + 3 * stride];
        d[i] = a; d[i + stride] = b; d[i + 2 * stride] = c; d[i + 3 * stride] = e;
    }
    for (; i < n; i += stride) d[i] = s[i];
}
extern "C" __global__ void __launch_bounds__(256) fill16(uint4* __restrict__ d, unsigned long long n) {
    const uint4 v = make_uint4(1u, 2u, 3u, 4u);
    for (unsigned long long i = (unsigned long long)blockIdx.x * 256u + threadIdx.x; i < n; i += gridDim.x * 256ull) d[i] = v;
}
"""


def copy_kernel():
    """fn(dst, src, nbytes) launching a plain vector copy kernel on torch's current stream."""
    import cupy
    import torch
    mod = cupy.RawModule(code=_COPY_SRC)
    k, kf = mod.get_function("copy16"), mod.get_function("fill16")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = sms * 8                                        # 2048 resident threads per SM at 256 per block

    def run(dst, src, nbytes):
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            if src is None:
                kf((grid,), (256,), (dst.data_ptr(), cupy.uint64(nbytes // 16)))
            else:
                k((grid,), (256,), (src.data_ptr(), dst.data_ptr(), cupy.uint64(nbytes // 16)))
    return run


def time_it(fn, n: int, warm: int, calls: int = 1) -> float:
    """Median milliseconds of one fn(i) (i = call index, for rotating inputs) over n timed batches of
    `calls` calls, events around each batch; with calls = 1 what a caller whose GPU is idle sees,
    Python dispatch included."""
    import torch
    for i in range(warm):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for k in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(calls):
            fn(k * calls + i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def wrong_bytes(q: FP4Tensor, x, fmt: str, amax) -> int:
    import torch
    rows = min(64, x.shape[0])
    xs = x[:rows].float().cpu().numpy()
    if x.dtype == torch.bfloat16:
        import ml_dtypes
        xs = xs.astype(ml_dtypes.bfloat16)
    d, s, _ = ref.quantize_2d(xs, fmt, amax)
    return int((q.data[:rows].cpu().numpy() != d).sum() + (q.scales[:rows].cpu().numpy() != s).sum())


def launch_costs(dev: str, commit: str, calls: int = 200, reps: int = 7):
    """Host (Python) microseconds per call of each low-level launcher and of fp4ccl.quantize/dequantize,
    on a 1 x 64 tensor (the GPU work is tiny; the calls are timed without a sync between them, median of
    `reps` batches of `calls`), for both launch paths (cuLaunchKernel through ctypes, and CuPy)."""
    import time

    import torch
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    q = fp4ccl.quantize(x, amax=4.0)
    y = torch.empty_like(x)
    amax_buf = torch.empty(1, device="cuda")
    dev_i = x.device.index
    s = torch.cuda.current_stream().cuda_stream
    seg = [(4, 0, q.data.data_ptr(), q.scales.data_ptr(), q.global_scale.data_ptr())]
    contrib = [(q.data.data_ptr(), q.scales.data_ptr(), q.global_scale.data_ptr())] * 4
    cases = {
        "kernels.amax": lambda: kernels.amax(dev_i, x.data_ptr(), "bfloat16", 64, amax_buf.data_ptr(), s),
        "kernels.quantize": lambda: kernels.quantize(dev_i, x.data_ptr(), "bfloat16", 64, "nvfp4", "linear", "nearest",
                                                     0, 0, 4.0, seg, 0, s),
        "kernels.dequantize": lambda: kernels.dequantize(dev_i, y.data_ptr(), "bfloat16", 64, "nvfp4", "linear", seg, 0, s),
        "kernels.dequantize_sum(4)": lambda: kernels.dequantize_sum(dev_i, y.data_ptr(), "bfloat16", 64, "nvfp4", 4,
                                                                    contrib, s),
        "fp4ccl.quantize(amax=)": lambda: fp4ccl.quantize(x, amax=4.0, out=q),
        "fp4ccl.quantize(auto)": lambda: fp4ccl.quantize(x, out=q),
        "fp4ccl.dequantize": lambda: fp4ccl.dequantize(q, out=y),
    }
    out = []
    print(f"# per-call host cost, us (median of {reps} x {calls} calls, 1x64 bf16) | {dev} | commit {commit}")
    print(f"{'call':>28} {'ctypes(us)':>11} {'cupy(us)':>9}")
    modes = ["ctypes", "cupy"] if kernels.launch_mode() == "ctypes" else ["cupy"]
    for name, fn in cases.items():
        res = {}
        for mode in modes:
            kernels.set_launch_mode(mode)
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                ts.append((time.perf_counter() - t0) / calls * 1e6)
                torch.cuda.synchronize()
            res[mode] = statistics.median(ts)
        kernels.set_launch_mode(modes[0])
        out.append(dict(kernel="launch:" + name, call_us=res.get("ctypes"), cupy_us=res["cupy"], device=dev, commit=commit))
        c = f"{res['ctypes']:>11.1f}" if "ctypes" in res else f"{'-':>11}"
        print(f"{name:>28} {c} {res['cupy']:>9.1f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-b", "--minbytes", default="64M")
    p.add_argument("-e", "--maxbytes", default="1G")
    p.add_argument("-f", "--stepfactor", type=int, default=4)
    p.add_argument("-n", "--iters", type=int, default=20)
    p.add_argument("-w", "--warmup_iters", type=int, default=5)
    p.add_argument("-t", "--dtypes", default="bfloat16,float32")
    p.add_argument("-K", type=int, default=8192, help="last dimension (row length)")
    p.add_argument("-j", "--json", default=None)
    p.add_argument("--contributions", type=int, default=4, help="contributions per dqsum row (ranks)")
    p.add_argument("--launch-only", action="store_true", help="only the per-launch host cost table")
    a = p.parse_args(argv)
    import torch
    dev = torch.cuda.get_device_name()
    commit = os.environ.get("FP4CCL_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:
        commit = "?"
    print(f"# fp4ccl {fp4ccl.__version__} commit {commit} | {dev} | torch {torch.__version__} | "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | median of {a.iters} after {a.warmup_iters} warm-up")
    print(f"# command: {' '.join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}")
    launch_rows = launch_costs(dev, commit)
    if a.launch_only:
        return 0
    rows_out = []
    hdr = (f"{'size(B)':>12} {'dtype':>9} {'kernel':>12} {'call(us)':>9} {'time(us)':>10} {'bytes':>12} {'GB/s':>8} "
           f"{'%copy':>6} {'#wrong':>6}")
    print(hdr)
    kcopy = copy_kernel()
    g = torch.Generator(device="cuda")
    g.manual_seed(1234)
    size = parse_size(a.minbytes)
    while size <= parse_size(a.maxbytes):
        for dt_name in a.dtypes.split(","):
            dt = getattr(torch, dt_name)
            isz = torch.tensor([], dtype=dt).element_size()
            K = a.K
            rows = size // isz // K
            n_el = rows * K
            inb = n_el * isz
            xs = [torch.randn(rows, K, device="cuda", dtype=dt, generator=g) * (1 + i) for i in range(3)]
            dst = torch.empty_like(xs[0])
            cp = lambda i: dst.copy_(xs[i % 3])  # noqa: E731
            ck = lambda i: kcopy(dst, xs[i % 3], inb)  # noqa: E731
            t_cp = time_it(cp, a.iters, a.warmup_iters)
            copies = [("copy", t_cp, time_graph(cp, a.iters, a.warmup_iters)),
                      ("copy-s", t_cp, time_stream(cp, a.iters, a.warmup_iters)),
                      ("copy-k", time_it(ck, a.iters, a.warmup_iters), time_graph(ck, a.iters, a.warmup_iters))]
            ok = torch.equal(dst, xs[11 % 3])                  # the last of the 12 calls
            copy_gbs = max(2 * inb / t / 1e6 for _, _, t in copies)
            results = [(name, tc, t, 2 * inb, 0 if ok else 1) for name, tc, t in copies]
            fk = lambda i: kcopy(dst, None, inb)  # noqa: E731
            results.append(("write-k", time_it(fk, a.iters, a.warmup_iters), time_graph(fk, a.iters, a.warmup_iters), inb, 0))
            del dst
            amax = float(max(x.abs().max().item() for x in xs))
            am = torch.empty(3, device="cuda", dtype=torch.float32)
            fm = lambda i: kernels.amax(am.device.index, xs[i % 3].data_ptr(), dt_name, n_el,  # noqa: E731
                                        am[i % 3].data_ptr(), torch.cuda.current_stream().cuda_stream)
            t_call, t = time_it(fm, a.iters, a.warmup_iters), time_graph(fm, a.iters, a.warmup_iters)
            ok = torch.equal(am.cpu(), torch.stack([x.abs().max().float() for x in xs]).cpu())
            results.append(("amax", t_call, t, inb, 0 if ok else 1))
            for fmt in ("nvfp4", "mxfp4"):
                bs = 16 if fmt == "nvfp4" else 32
                outs = [fp4ccl.quantize(x, fmt, amax=amax) for x in xs]
                qbytes = n_el // 2 + n_el // bs
                fq = lambda i: fp4ccl.quantize(xs[i % 3], fmt, amax=amax, out=outs[i % 3])  # noqa: E731
                results.append((f"q-{fmt[:2]} amax=" if fmt == "nvfp4" else "q-mx", time_it(fq, a.iters, a.warmup_iters),
                                time_graph(fq, a.iters, a.warmup_iters), inb + qbytes,
                                wrong_bytes(outs[0], xs[0], fmt, amax)))
                if fmt == "nvfp4":
                    fa = lambda i: fp4ccl.quantize(xs[i % 3], fmt, out=outs[i % 3])  # noqa: E731
                    results.append(("q-nv auto", time_it(fa, a.iters, a.warmup_iters), time_graph(fa, a.iters, a.warmup_iters),
                                    2 * inb + qbytes, wrong_bytes(outs[0], xs[0], fmt, float(xs[0].abs().max()))))
                    # the form "auto" replaced: a zeroed word (memset node), the amax kernel's atomicMax into
                    # it, then quantize reading it; kept as the same-run baseline of the per-block partials
                    def f0(i):
                        fm(i)
                        fp4ccl.quantize(xs[i % 3], fmt, amax=am[i % 3], out=outs[i % 3])
                    results.append(("q-nv auto0", time_it(f0, a.iters, a.warmup_iters), time_graph(f0, a.iters, a.warmup_iters),
                                    2 * inb + qbytes, wrong_bytes(outs[0], xs[0], fmt, float(xs[0].abs().max()))))
                    # the quantize launch of "auto" alone: amax already on the device (read through a pointer)
                    fp = lambda i: fp4ccl.quantize(xs[i % 3], fmt, amax=am[i % 3], out=outs[i % 3])  # noqa: E731
                    results.append(("q-nv amax*", time_it(fp, a.iters, a.warmup_iters), time_graph(fp, a.iters, a.warmup_iters),
                                    inb + qbytes, wrong_bytes(outs[0], xs[0], fmt, float(xs[0].abs().max()))))
                ys = [torch.empty_like(x) for x in xs]
                fd = lambda i: fp4ccl.dequantize(outs[i % 3], out=ys[i % 3])  # noqa: E731
                ys[0].fill_(float("nan"))
                t_call, t = time_it(fd, a.iters, a.warmup_iters), time_graph(fd, a.iters, a.warmup_iters)
                ok = torch.equal(ys[0][:64].float().cpu(), torch.from_numpy(
                    ref.dequantize_2d(outs[0].data[:64].cpu().numpy(), outs[0].scales[:64].cpu().numpy(),
                                      float(outs[0].global_scale.item()) if fmt == "nvfp4" else None,
                                      fmt, K, np.float32)).to(dt).float())
                results.append((f"dq-{fmt[:2]}", t_call, t, qbytes + inb, 0 if ok else 1))
                if dt_name != "float32":
                    # the FP4 reduce-scatter's receive side: NC contributions of this size summed into one
                    # output of the input dtype (bytes: every contribution read once, the output written once)
                    nc = a.contributions
                    parts = [outs[i % 3] for i in range(nc)]
                    contrib = [(q.data.data_ptr(), q.scales.data_ptr(),
                                q.global_scale.data_ptr() if fmt == "nvfp4" else 0) for q in parts]
                    units = n_el // bs

                    def fs(i, y=ys[0]):
                        kernels.dequantize_sum(y.device.index, y.data_ptr(), dt_name, K, fmt, units, contrib,
                                               torch.cuda.current_stream().cuda_stream)
                    hs = [(p.data[:8].cpu().numpy(), p.scales[:8].cpu().numpy(),
                           np.float32(p.global_scale.item()) if fmt == "nvfp4" else None) for p in parts]
                    want = ref.dequantize_sum(*zip(*hs), fmt, K, np.float32)
                    ys[0].fill_(float("nan"))
                    fs(0)
                    torch.cuda.synchronize()
                    ok = torch.equal(ys[0][:8].float().cpu(), torch.from_numpy(want).to(dt).float())
                    results.append((f"dqsum{nc}-{fmt[:2]}", time_it(fs, a.iters, a.warmup_iters),
                                    time_graph(fs, a.iters, a.warmup_iters), nc * qbytes + inb, 0 if ok else 1))
                del outs, ys
            for name, t_call, t, nbytes, wrong in results:
                gbs = nbytes / t / 1e6
                row = dict(size=inb, dtype=dt_name, kernel=name, call_us=t_call * 1e3, time_us=t * 1e3, bytes=nbytes,
                           gbs=gbs, pct_copy=100 * gbs / copy_gbs, wrong=wrong, device=dev, commit=commit)
                rows_out.append(row)
                print(f"{inb:>12} {dt_name:>9} {name:>12} {t_call * 1e3:>9.1f} {t * 1e3:>10.1f} {nbytes:>12} {gbs:>8.0f} "
                      f"{100 * gbs / copy_gbs:>6.1f} {wrong:>6}")
            del xs
            torch.cuda.empty_cache()
        size *= a.stepfactor
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows_out + launch_rows, fh, indent=1)
    return 0 if all(r["wrong"] == 0 for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
