#!/usr/bin/env bash
# One device call comparing compile-time variants of csrc/fp4.cu in the kernel bench, side by side on
# one GPU: each variant is a copy of this tree whose fp4.cu starts with extra #defines (the tunables
# there are #ifndef-guarded), benched in turn; logs and JSON go to $OUT/kv.tgz.
# Usage: bash bench/kernel_variants.sh "NAME[=MACRO=V[,MACRO=V...]] ..." [bench_fp4_kernels.py args]
#   e.g. bash bench/kernel_variants.sh "new old=FP4_AMAX_REVERSE=0,FP4_DQ_PREFETCH=0" -b 64M -e 256M
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT/kv"
specs=$1; shift
root=$PWD
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; } > "$OUT/kv/info.txt" 2>&1
for spec in $specs; do
  name=${spec%%=*}; defs=""; [ "$spec" != "$name" ] && defs=${spec#*=}
  dir=/tmp/kv/$name; rm -rf "$dir"; mkdir -p "$dir"
  tar -C "$root" --exclude=.git --exclude=out -cf - . | tar -C "$dir" -xf -
  if [ -n "$defs" ]; then
    { for d in ${defs//,/ }; do echo "#define ${d%%=*} ${d#*=}"; done; cat "$root/csrc/fp4.cu"; } > "$dir/csrc/fp4.cu"
  fi
  (cd "$dir" && FP4CCL_CACHE_DIR=/tmp/kv/cache PYTHONPATH=$dir timeout "${VARIANT_LIMIT:-150}" \
     python3 bench/bench_fp4_kernels.py -j "$OUT/kv/$name.json" "$@" > "$OUT/kv/$name.log" 2>&1)
  echo "variant $name ($defs) rc=$? $(grep -c . "$OUT/kv/$name.log") lines" | tee -a "$OUT/kv/info.txt"
done
names=(); for spec in $specs; do names+=("${spec%%=*}"); done
python3 "$root/bench/compare_variants.py" "$OUT/kv" "${names[@]}" > "$OUT/kv/compare.txt" 2>&1
tar -C "$OUT" -czf "$OUT/kv.tgz" kv
