#!/usr/bin/env bash
# The one-launch FP4 collectives on the device machine (sessions 17-18): GPU tests, then GPU time per
# call against the other forms and NCCL's bf16 collectives. Logs under $OUT.
#   GPU_TESTS   test files (default: the FP4 collectives and kernels); SKIP_TESTS=1 skips them
#   OPS         sweep ops (default: NVFP4 gather and reduce-scatter with their NCCL baselines)
#   PROBE=0     skips bench/probe_latency.py (the NVFP4 reduce-scatter's graphs, two rounds)
#   OTHER_FORMS=1  adds a -G sweep with the multi-launch forms forced (gather steps, reduce-scatter store)
#   EAGER=0     skips the eager per-call sweeps of the reduce-scatter forms (host-bound on that machine)
#   SWEEP_LIMIT seconds each sweep may take (default 150)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 FP4CCL_TIMEOUT=30
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
n=$(nvidia-smi -L | wc -l)
sweep() { timeout "${SWEEP_LIMIT:-150}" python3 -m fp4ccl.launcher -n "$n" -m fp4ccl.sweep "$@" 2>&1 | grep -v "^\[rank[1-9]"; }
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  FILE_LIMIT=${FILE_LIMIT:-300} GPU_TESTS="${GPU_TESTS:-tests/gpu/test_fp4_collectives.py tests/gpu/test_fp4_kernels.py}" \
    bash bench/gpu_session.sh info tests
fi
if [ "${PROBE:-1}" = 1 ]; then
  for round in 1 2; do
    echo "===== probe_latency round $round" >> "$OUT/latency.log"
    timeout 120 python3 -m fp4ccl.launcher -n "$n" bench/probe_latency.py --calls 500 >> "$OUT/latency.log" 2>&1
    echo "rc=$?" >> "$OUT/latency.log"
  done
fi
ops=${OPS:-all_gather,reduce_scatter,all_gatherv_nvfp4,reduce_scatterv_nvfp4}
{ echo "===== -G 10 (GPU time per call), default forms"; sweep -b 32K -e 4M -f 2 -n 20 -w 5 -G 10 -d bfloat16 --ops $ops
  if [ "${OTHER_FORMS:-0}" = 1 ]; then
    echo "===== -G 10, FP4CCL_FP4_GATHER_FORM=steps FP4CCL_FP4_RS_FORM=store"
    FP4CCL_FP4_GATHER_FORM=steps FP4CCL_FP4_RS_FORM=store sweep -b 32K -e 4M -f 2 -n 20 -w 5 -G 10 -d bfloat16 --ops $ops
  fi
  if [ "${EAGER:-1}" = 1 ]; then
    for form in ll store; do
      echo "===== per call (eager), FP4CCL_FP4_RS_FORM=$form"
      FP4CCL_FP4_RS_FORM=$form sweep -b 32K -e 4M -f 2 -n 50 -w 10 -d bfloat16 --ops reduce_scatter,reduce_scatterv_nvfp4
    done
  fi; } > "$OUT/sweeps.log" 2>&1
