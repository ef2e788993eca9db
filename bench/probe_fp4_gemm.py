"""Can a GEMM that reads NVFP4 A directly replace decode + cuBLAS in the FP4 all_gather_matmul? (one GPU)

Run:  python3 bench/probe_fp4_gemm.py [--m 2048 --n 2048 --k 8192 --iters 50]

The shape is one shard's matmul of all_gather_matmul at M = N = K = 8192 on 4 ranks: A [M/4, K] @
B [K, N/4]. Rows, all median µs of CUDA-event-timed launches on fresh random inputs:
  decode          fp4ccl.dequantize of the NVFP4 shard to bf16 (what the overlap path runs per shard)
  cublas          torch.matmul of the decoded shard (bf16, fp32 accumulate)
  triton-bf16     a Triton GEMM of the same bf16 operands, to separate Triton's own distance from cuBLAS
  triton-fp4a     the fused kernel: A's nibbles and E4M3 block scales loaded per tile, decoded in
                  registers exactly as dequantize does (fp32 products, one rounding to bf16), then the MMA
The fused kernel's result is checked against cublas on the decoded shard (the same bf16 operands, so
only the accumulation order differs). Issue 6 needs the fused kernel at >= ~97% of cuBLAS to help.
"""
from __future__ import annotations

import argparse
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    import torch
    import triton
    import triton.language as tl
    import fp4ccl

    @triton.jit
    def gemm_kernel(a_ptr, s_ptr, sdec_ptr, b_ptr, c_ptr, M, N, K,
                    stride_am, stride_sm, stride_bk, stride_cm,
                    FP4A: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        npm = tl.cdiv(M, BM)
        npn = tl.cdiv(N, BN)
        group = pid // (GROUP_M * npn)
        first_m = group * GROUP_M
        gm = min(npm - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * npn)) % gm
        pid_n = (pid % (GROUP_M * npn)) // gm
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if FP4A:
            sdec = tl.load(sdec_ptr)
        for k0 in range(0, K, BK):
            if FP4A:
                packed = tl.load(a_ptr + rm[:, None] * stride_am + (k0 // 2 + tl.arange(0, BK // 2))[None, :])
                sb = tl.load(s_ptr + rm[:, None] * stride_sm + (k0 // 16 + tl.arange(0, BK // 16))[None, :])
                nib = tl.join(packed & 0xF, packed >> 4).reshape(BM, BK)   # the even element in the low nibble
                n32 = nib.to(tl.uint32)
                e = (n32 >> 1) & 3
                m = n32 & 1
                mag = tl.where(e > 0, ((e + 126) << 23) | (m << 22), m * 0x3F000000)
                val = (mag | ((n32 & 8) << 28)).to(tl.float32, bitcast=True)
                sc = sb.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sdec
                scb = tl.broadcast_to(sc[:, :, None], (BM, BK // 16, 16)).reshape(BM, BK)
                a = (val * scb).to(tl.bfloat16)
            else:
                a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + tl.arange(0, BK))[None, :])
            b = tl.load(b_ptr + (k0 + tl.arange(0, BK))[:, None] * stride_bk + rn[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(tl.bfloat16))

    torch.manual_seed(args.seed)
    print(f"# probe_fp4_gemm: seed {args.seed}, M {args.m} N {args.n} K {args.k}, {torch.cuda.get_device_name()}")
    dev = "cuda"
    M, N, K = args.m, args.n, args.k
    flops = 2.0 * M * N * K

    def timed(fn, make_inputs):
        start = [torch.cuda.Event(enable_timing=True) for _ in range(args.iters)]
        stop = [torch.cuda.Event(enable_timing=True) for _ in range(args.iters)]
        for _ in range(5):
            fn(*make_inputs())
        times = []
        for i in range(args.iters):
            inp = make_inputs()
            start[i].record()
            fn(*inp)
            stop[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) * 1e3 for s, e in zip(start, stop)]
        return statistics.median(times)

    def fresh():
        a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        b = torch.randn(K, N, device=dev, dtype=torch.bfloat16) / K ** 0.5
        return fp4ccl.quantize(a, "nvfp4"), b

    q0, b0 = fresh()
    a0 = fp4ccl.dequantize(q0, torch.bfloat16)
    ref = torch.matmul(a0, b0)
    out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)

    def triton_run(fp4a, BM, BN, BK, warps, stages):
        def run(q, a, b):
            out.fill_(float("nan"))
            grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
            if fp4a:
                gemm_kernel[grid](q.data, q.scales, q.global_scale, b, out, M, N, K, q.data.stride(0),
                                  q.scales.stride(0), b.stride(0), out.stride(0), FP4A=True, BM=BM, BN=BN,
                                  BK=BK, GROUP_M=8, num_warps=warps, num_stages=stages)
            else:
                gemm_kernel[grid](a, a, a, b, out, M, N, K, a.stride(0), 0, b.stride(0), out.stride(0),
                                  FP4A=False, BM=BM, BN=BN, BK=BK, GROUP_M=8, num_warps=warps, num_stages=stages)
        return run

    rows = []
    pool = [fresh() for _ in range(4)]
    decoded = [(q, fp4ccl.dequantize(q, torch.bfloat16), b) for q, b in pool]
    pick = iter(range(1 << 30))

    def inputs():
        return decoded[next(pick) % len(decoded)]

    rows.append(("decode", timed(lambda q, a, b: fp4ccl.dequantize(q, torch.bfloat16), inputs)))
    rows.append(("cublas", timed(lambda q, a, b: torch.matmul(a, b, out=out), inputs)))
    cublas_us = rows[-1][1]
    configs = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 128, 8, 3),
               (128, 128, 128, 8, 3)]
    for fp4a in (False, True):
        name = "triton-fp4a" if fp4a else "triton-bf16"
        for cfg in configs:
            label = f"{name} {cfg[0]}x{cfg[1]}x{cfg[2]} w{cfg[3]} s{cfg[4]}"
            run = triton_run(fp4a, *cfg)
            try:
                run(q0, a0, b0)
                torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                scale = ref.float().abs().max().item()
                if not err <= 2e-2 * scale:
                    rows.append((label + f" WRONG (max err {err:.3g} of {scale:.3g})", float("nan")))
                    continue
                rows.append((label, timed(run, inputs)))
            except Exception as e:   # a config that does not compile on this GPU is reported, not fatal
                rows.append((label + f" failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", float("nan")))
    print(f"{'kernel':58s} {'us':>9s} {'TFLOP/s':>9s} {'vs cublas':>10s}")
    for label, us in rows:
        tf = flops / (us * 1e-6) / 1e12 if label != "decode" else float("nan")
        print(f"{label:58s} {us:9.1f} {tf:9.1f} {cublas_us / us:9.2f}x")


if __name__ == "__main__":
    main()
