#!/usr/bin/env bash
# One device call: GPU tests, then the overlap probe, the overlap bench and an FP4 v-sweep once with
# symmetric buffers from cudaMalloc + CUDA IPC and once from CUDA VMM (FP4CCL_SYMM_ALLOC), every log
# packed into $OUT/all.tgz beside $OUT/summary.txt.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "${SKIP_TESTS:-0}" = 1 ] || timeout 300 bash bench/gpu_session.sh info tests
for m in ipc vmm; do
  FP4CCL_SYMM_ALLOC=$m timeout 60 python3 -m fp4ccl.launcher -n "$ngpu" bench/probe_overlap.py --mm-n 2048 --iters 10 \
    > "$OUT/probe_$m.log" 2>&1
  echo "probe $m rc=$?" >> "$OUT/summary.txt"
  FP4CCL_SYMM_ALLOC=$m timeout 90 python3 -m fp4ccl.launcher -n "$ngpu" bench/bench_overlap.py --ops ag,rs,ag_nvfp4 \
    --m 4096,8192,16384 --batches 5 > "$OUT/overlap_$m.log" 2>&1
  echo "overlap $m rc=$?" >> "$OUT/summary.txt"
done
for m in ipc vmm; do
  FP4CCL_SYMM_ALLOC=$m timeout 150 python3 -m fp4ccl.launcher -n "$ngpu" -m fp4ccl.sweep -b 8K -e 1G -f 8 -n 10 -w 3 \
    -d bfloat16 --ops all_gather,reduce_scatter,all_gatherv_nvfp4,reduce_scatterv_nvfp4,all_gatherv,reduce_scatterv \
    > "$OUT/vsweep_$m.log" 2>&1
  echo "vsweep $m rc=$?" >> "$OUT/summary.txt"
done
(cd "$OUT" && tar czf /tmp/all.tgz --exclude=all.tgz . && mv /tmp/all.tgz all.tgz)
