#!/usr/bin/env bash
# One device call comparing this tree with other ones (folders holding a tree's fp4ccl/ and csrc/,
# e.g. from `git archive OLD fp4ccl csrc`) on the FP4 collectives: GPU tests of this tree
# ($GPU_TESTS), the FP4 kernel variants ($KV_SPECS, $KV_ARGS), then per tree the GPU timelines of the
# collectives ($PROFILE_ARGS for bench/profile_collectives.py) and a sweep ($SWEEP_ARGS).
# Logs: $OUT/summary.txt and $OUT/all.tgz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
root=$PWD
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
summary="$OUT/summary.txt"
: > "$summary"
if [ -n "${GPU_TESTS:-}" ]; then
  OUT="$OUT/tests" bash bench/gpu_session.sh info tests > /dev/null 2>&1
  cat "$OUT/tests/summary.txt" >> "$summary"
fi
if [ -n "${KV_SPECS:-}" ]; then
  OUT="$OUT" VARIANT_LIMIT=120 bash bench/kernel_variants.sh "$KV_SPECS" ${KV_ARGS:-} > /dev/null 2>&1
  cat "$OUT/kv/compare.txt" >> "$summary"; rm -rf "$OUT/kv"
fi
# TREES: runs in order, each "new" (this tree) or a folder under it, optionally with settings:
# "oldtree new new:FP4CCL_FP4_RS_FORM=push new:FP4CCL_ALGO=ce,FP4CCL_CE_PIECES=1" (settings separated by commas).
for spec in ${TREES:-new}; do
  tree=${spec%%:*}; settings=""; [ "$spec" != "$tree" ] && settings=${spec#*:}
  src=$root; [ "$tree" = new ] || src=$root/$tree
  tag=${tree//\//_}${settings:+_${settings//[^A-Za-z0-9]/_}}
  # run from the tree's own folder, with this tree's bench scripts: `-m` and the scripts put their
  # folder first on sys.path, which must find that tree's fp4ccl
  [ "$src" = "$root" ] || { rm -rf "$src/bench"; cp -r "$root/bench" "$src/bench"; }
  cd "$src"; export PYTHONPATH=$src
  [ -n "${PROFILE_ARGS:-}" ] && env ${settings//,/ } timeout "${PROFILE_LIMIT:-90}" python3 -m fp4ccl.launcher -n "$ngpu" bench/profile_collectives.py ${PROFILE_ARGS:-} \
    > "$OUT/profile_$tag.log" 2>&1 && echo "profile $tag done" >> "$summary"
  env ${settings//,/ } timeout "${SWEEP_LIMIT:-120}" python3 -m fp4ccl.launcher -n "$ngpu" -m fp4ccl.sweep ${SWEEP_ARGS:--b 32M -e 1G -f 2 -n 10 -w 3 -d bfloat16 --ops reduce_scatter,reduce_scatterv_nvfp4} \
    > "$OUT/sweep_$tag.log" 2>&1
  echo "sweep $tag rc=$?" >> "$summary"
  grep -v "^\[rank[1-9]" "$OUT/sweep_$tag.log" | tail -n 25 >> "$summary"
  cd "$root"
done
(cd "$OUT" && tar czf /tmp/all.tgz --exclude=./all.tgz --exclude=./summary.txt . && mv /tmp/all.tgz all.tgz)
cat "$summary"
