#!/usr/bin/env bash
# One device-machine session: GPU tests, the mpirun variant, and the benches, each logged under $OUT.
# Usage: bash bench/gpu_session.sh [stage ...]   stages: info tests mpi (tests/gpu/mpi_main.py under mpirun and
# launch/mpirun.sh, tests/test_host_mpi.py) sweep vsweep algos fp4bench overlap probe
# probeov latency links (default: all but probe, probeov, latency and links). OVERLAP_ARGS / PROBE_ARGS / LATENCY_ARGS: extra
# arguments for bench_overlap.py / probe_overlap.py / probe_latency.py; GPU_TESTS: the test files; GPU_K: a
# pytest -k expression selecting among their tests.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Lent machines may run us as root, where Open MPI's mpirun refuses to start without these (run 129).
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
PY=python3
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(info tests mpi sweep vsweep algos fp4bench overlap)
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
summary="$OUT/summary.txt"; : > "$summary"
note() { echo "$*" | tee -a "$summary"; }

for stage in "${stages[@]}"; do
  start=$(date +%s)
  case "$stage" in
    info)
      { nvidia-smi -L; nvidia-smi topo -m; $PY -c "import torch, cupy, fp4ccl.nccl as n; print('torch', torch.__version__, 'cupy', cupy.__version__, 'nccl', n.version(), n.library_path())"; git rev-parse HEAD 2>/dev/null; date -u; } > "$OUT/info.txt" 2>&1
      note "info: $(head -c 300 "$OUT/info.txt" | tr '\n' ' ')" ;;
    tests)
      # One pytest per file, each with its own limit, all into one log (few files come back).
      : > "$OUT/gpu_tests.log"
      for f in ${GPU_TESTS:-tests/gpu/test_*.py}; do
        echo "===== $f" >> "$OUT/gpu_tests.log"
        timeout "${FILE_LIMIT:-150}" $PY -m pytest -v -rfEs --tb=short --timeout 90 -p no:cacheprovider ${GPU_K:+-k "$GPU_K"} "$f" >> "$OUT/gpu_tests.log" 2>&1
        note "tests $f rc=$?: $(grep -E '^(=+ )?[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$OUT/gpu_tests.log" | tail -n 1)"
      done ;;
    mpi)
      timeout 180 mpirun --allow-run-as-root --oversubscribe -n "$ngpu" -x NCCL_NVLS_ENABLE -x PYTHONPATH -x PYTHONUNBUFFERED \
        $PY tests/gpu/mpi_main.py 4321 > "$OUT/mpi.log" 2>&1
      note "mpi rc=$?: $(grep -c PASS "$OUT/mpi.log") PASS, $(grep -c FAIL "$OUT/mpi.log") FAIL"
      # the launch template (forwards FP4CCL_*/NCCL_* under Open MPI), and the host backend's MPI transport
      # under this machine's MPI (CI runs it under MPICH)
      NP="$ngpu" timeout 90 bash launch/mpirun.sh tests/gpu/mpi_main.py 4321 > "$OUT/mpirun_sh.log" 2>&1
      note "launch/mpirun.sh rc=$?: $(grep -c PASS "$OUT/mpirun_sh.log") PASS, $(grep -c FAIL "$OUT/mpirun_sh.log") FAIL"
      timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_host_mpi.py > "$OUT/host_mpi.log" 2>&1
      note "tests/test_host_mpi.py rc=$?: $(tail -n 1 "$OUT/host_mpi.log")" ;;
    sweep)
      timeout 170 $PY -m fp4ccl.launcher -n "$ngpu" -m fp4ccl.sweep -b 1K -e 1G -f 4 -n 20 -w 5 -d bfloat16 \
        --ops all_gather,reduce_scatter,all_reduce --overhead --json "$OUT/sweep.json" --plot "$OUT/sweep.png" > "$OUT/sweep.log" 2>&1
      note "sweep rc=$?"; grep -v "^\[rank[1-9]" "$OUT/sweep.log" | tail -n 60 >> "$summary" ;;
    vsweep)
      timeout 260 $PY -m fp4ccl.launcher -n "$ngpu" -m fp4ccl.sweep -b 8K -e 1G -f 4 -n 20 -w 5 -d bfloat16 \
        --ops all_gather,reduce_scatter,all_gatherv,reduce_scatterv,all_gatherv_nvfp4,all_gatherv_nvfp4_raw,all_gatherv_mxfp4,reduce_scatterv_nvfp4 --json "$OUT/vsweep.json" --plot "$OUT/vsweep.png" > "$OUT/vsweep.log" 2>&1
      note "vsweep rc=$?"; grep -v "^\[rank[1-9]" "$OUT/vsweep.log" | tail -n 60 >> "$summary" ;;
    algos)
      # The same uneven sweep with each v-collective algorithm forced, to fit vcollectives.choose().
      : > "$OUT/algos.log"
      for algo in padded bcast p2p reduce symm; do
        ops=all_gatherv; [ "$algo" = reduce ] && ops=reduce_scatterv; [ "$algo" = padded ] || [ "$algo" = symm ] && ops=all_gatherv,reduce_scatterv
        echo "===== FP4CCL_ALGO=$algo" >> "$OUT/algos.log"
        FP4CCL_ALGO=$algo timeout 120 $PY -m fp4ccl.launcher -n "$ngpu" -m fp4ccl.sweep -b 8K -e 1G -f 4 -n 10 -w 3 \
          -d bfloat16 --ops "$ops" >> "$OUT/algos.log" 2>&1
        note "algos $algo rc=$?"
      done
      # The FP4 collectives over NCCL (the default on one node is symmetric memory), for comparison.
      echo "===== FP4CCL_FP4_ALGO=nccl" >> "$OUT/algos.log"
      FP4CCL_FP4_ALGO=nccl timeout 120 $PY -m fp4ccl.launcher -n "$ngpu" -m fp4ccl.sweep -b 8K -e 1G -f 4 -n 10 -w 3 \
        -d bfloat16 --ops all_gatherv_nvfp4,all_gatherv_nvfp4_raw,reduce_scatterv_nvfp4 >> "$OUT/algos.log" 2>&1
      note "algos fp4-nccl rc=$?"
      for form in steps pull push; do  # the symmetric-memory FP4 reduce-scatter's forms
        echo "===== FP4CCL_FP4_RS_FORM=$form" >> "$OUT/algos.log"
        FP4CCL_FP4_RS_FORM=$form timeout 90 $PY -m fp4ccl.launcher -n "$ngpu" -m fp4ccl.sweep -b 2M -e 1G -f 2 -n 10 -w 3 \
          -d bfloat16 --ops reduce_scatterv_nvfp4 >> "$OUT/algos.log" 2>&1
        note "algos rs-form=$form rc=$?"
      done
      grep -v "^\[rank[1-9]" "$OUT/algos.log" | grep -E "=====|fp4ccl \|" >> "$summary" ;;
    fp4bench)
      timeout 150 $PY bench/bench_fp4_kernels.py > "$OUT/fp4bench.log" 2>&1
      note "fp4bench rc=$?"; tail -n 30 "$OUT/fp4bench.log" >> "$summary" ;;
    overlap)
      timeout "${OVERLAP_LIMIT:-170}" $PY -m fp4ccl.launcher -n "$ngpu" bench/bench_overlap.py ${OVERLAP_ARGS:-} \
        > "$OUT/overlap.log" 2>&1
      note "overlap rc=$?"; grep -v "^\[rank[1-9]" "$OUT/overlap.log" | tail -n 40 >> "$summary" ;;
    probe)
      timeout 90 $PY -m fp4ccl.launcher -n "$ngpu" bench/probe_overlap.py > "$OUT/probe.log" 2>&1
      note "probe overlap rc=$?"
      timeout 90 $PY -m fp4ccl.launcher -n "$ngpu" bench/probe_latency.py >> "$OUT/probe.log" 2>&1
      note "probe latency rc=$?"; grep -v "^\[rank[1-9]" "$OUT/probe.log" | grep -v "^fp4ccl-run" | tail -n 40 >> "$summary" ;;
    probeov)
      timeout 120 $PY -m fp4ccl.launcher -n "$ngpu" bench/probe_overlap.py ${PROBE_ARGS:-} > "$OUT/probeov.log" 2>&1
      note "probe overlap rc=$?"; grep -v "^\[rank[1-9]" "$OUT/probeov.log" | grep -v "^fp4ccl-run" | tail -n 40 >> "$summary" ;;
    latency)
      timeout 75 $PY -m fp4ccl.launcher -n "$ngpu" bench/probe_latency.py ${LATENCY_ARGS:-} > "$OUT/latency.log" 2>&1
      note "probe latency rc=$?"; grep -v "^\[rank[1-9]" "$OUT/latency.log" | grep -v "^fp4ccl-run" | tail -n 24 >> "$summary" ;;
    links)
      # the copy engine's and the SMs' rates to one peer, idle and beside a local copy (bench/probe_links.py)
      for busy in "" --busy; do
        timeout 90 $PY -m fp4ccl.launcher -n "$ngpu" bench/probe_links.py $busy ${LINKS_ARGS:-} > "$OUT/links$busy.log" 2>&1
        note "probe links $busy rc=$?"; grep -v "^\[rank[1-9]" "$OUT/links$busy.log" | grep -v "^fp4ccl-run" | tail -n 8 >> "$summary"
      done ;;
    *) note "unknown stage $stage" ;;
  esac
  note "-- $stage took $(( $(date +%s) - start )) s"
done
cat "$summary"
# Few files come back from a run: pack every log, table and plot into one archive.
(cd "$OUT" && tar czf all.tgz --exclude=all.tgz --exclude=summary.txt . && find . -type f ! -name all.tgz ! -name summary.txt -delete)
