#!/bin/bash
# One device call: the GPU kernel tests and the kernel bench for each kernel variant set
# (FP4CCL_KERNEL_V2, see fp4ccl/formats/kernels.py). Usage: bash run.sh COMMIT "V1 V2 ..." [bench args]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export FP4CCL_CACHE_DIR=/tmp/fp4cache FP4CCL_COMMIT=$1
SETS=$2; shift 2
declare -A VAR=([v1]="" [v2]="quant=v2,dequant=v2,dqsum=v2" [v3]="quant=v3,dequant=v3,dqsum=v3")
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv; } > $OUT/info.txt
for v in $SETS; do
  echo "=== tests $v FP4CCL_KERNEL_V2=${VAR[$v]}" >> $OUT/tests.log
  FP4CCL_KERNEL_V2=${VAR[$v]} timeout 110 python3 -m pytest -q --tb=short --timeout 100 -p no:cacheprovider \
    tests/gpu/test_fp4_kernels.py >> $OUT/tests.log 2>&1
  echo "rc=$?" >> $OUT/tests.log
  tail -n 2 $OUT/tests.log
done
for v in $SETS; do
  FP4CCL_KERNEL_V2=${VAR[$v]} timeout 100 python3 bench/bench_fp4_kernels.py "$@" > $OUT/bench_$v.log 2>&1
  echo "bench $v rc=$?"
done
date -u >> $OUT/info.txt
grep -h -v "^\[\|launch\|^ *kernels\.\|^ *fp4ccl\." $OUT/bench_*.log | grep -v "^ *size" | cut -c1-100
