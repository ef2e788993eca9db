#!/usr/bin/env bash
# One device call: tests/gpu/test_overlap.py on this tree (unless SKIP_TESTS is set), then
# bench/bench_overlap.py at M = 4096, 8192, 16384 alternating this tree and ./oldtree (a folder with an
# older fp4ccl/ and csrc/, e.g. from `git archive OLD fp4ccl csrc`) for each round in $ROUNDS (default
# "1 2"), then bench/probe_overlap_host.py. Logs and summary.txt under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
root=$PWD
S=$(date +%s)
mkdir -p "$OUT"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 200 python3 -m pytest -q -rfEs --timeout 90 -p no:cacheprovider tests/gpu/test_overlap.py > $OUT/test_overlap.log 2>&1
  echo "tests rc=$? $(tail -1 $OUT/test_overlap.log) t=$(( $(date +%s)-S ))" >> $OUT/summary.txt
fi
[ -d oldtree ] || { echo "ab_overlap.sh: no ./oldtree (git archive OLD fp4ccl csrc | tar -x -C oldtree)" >&2; exit 2; }
rm -rf oldtree/bench; cp -r bench oldtree/bench
for i in ${ROUNDS:-1 2}; do
  for t in new old; do
    if [ $t = new ]; then cd $root; export PYTHONPATH=$root; else cd $root/oldtree; export PYTHONPATH=$root/oldtree; fi
    timeout 110 python3 -m fp4ccl.launcher -n 4 bench/bench_overlap.py --m 4096,8192,16384 --ops ag,ag_nvfp4 --batches 7 > $OUT/bench_${t}_$i.log 2>&1
    echo "bench $t $i rc=$? t=$(( $(date +%s)-S ))" >> $OUT/summary.txt
    grep -v "^\[rank[1-9]" $OUT/bench_${t}_$i.log | grep -E "ag\+mm" >> $OUT/summary.txt
  done
done
cd $root; export PYTHONPATH=$root
timeout 60 python3 -m fp4ccl.launcher -n 4 bench/probe_overlap_host.py > $OUT/hostt.log 2>&1; grep "host per call" $OUT/hostt.log >> $OUT/summary.txt
