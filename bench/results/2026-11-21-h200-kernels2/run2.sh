#!/bin/bash
# One device call: the GPU kernel tests under each kernel variant set (FP4CCL_KERNEL_V2, see
# fp4ccl/formats/kernels.py), then the kernel bench run twice with the candidates as extra rows.
# Usage: bash run.sh COMMIT "v1 v2 ..." NBENCH [bench args]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export FP4CCL_CACHE_DIR=/tmp/fp4cache FP4CCL_COMMIT=$1
SETS=$2; NB=$3; shift 3
declare -A VAR=([v1]="" [v2]="qauto=v2,dequant=v2,dqsum=v2" [v3]="dequant=v3")
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv; } > $OUT/info.txt
for v in $SETS; do
  echo "=== tests $v FP4CCL_KERNEL_V2=${VAR[$v]}" >> $OUT/tests.log
  FP4CCL_KERNEL_V2=${VAR[$v]} timeout 110 python3 -m pytest -q --tb=short --timeout 100 -p no:cacheprovider \
    tests/gpu/test_fp4_kernels.py >> $OUT/tests.log 2>&1
  echo "rc=$?" >> $OUT/tests.log
  tail -n 2 $OUT/tests.log
done
for r in $(seq 1 $NB); do
  timeout 120 python3 bench/bench_fp4_kernels.py -j $OUT/bench$r.json "$@" > $OUT/bench$r.log 2>&1
  echo "bench $r rc=$?"
done
{ date -u; nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv; } >> $OUT/info.txt
