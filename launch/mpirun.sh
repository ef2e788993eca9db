#!/usr/bin/env bash
# Run a script under Open MPI or MPICH: fp4ccl.init() reads OMPI_COMM_WORLD_* / PMI_* and bootstraps
# NCCL through mpi4py (pip install 'fp4ccl[mpi]').  Usage: launch/mpirun.sh my_job.py [args...]
# Settings exported here (FP4CCL_*, NCCL_*) reach every rank on every node; see below for how.
set -euo pipefail

SCRIPT=${1:?usage: $0 script.py [args...]}; shift
NP=${NP:-4}            # total ranks; one per GPU
HOSTS=${HOSTS:-}       # e.g. "node-a:4,node-b:4" for two nodes; empty: this machine only

host_args=()
[[ -n "$HOSTS" ]] && host_args+=(--host "$HOSTS")

# Open MPI's "-x NAME" for every exported FP4CCL_* and NCCL_* variable, one word per line. Open MPI
# passes nothing to ranks on other nodes unless told, and several of these must be the same on every
# rank (FP4CCL_TIMEOUT, FP4CCL_ALGO, FP4CCL_CHECK, NCCL_PROTO, ...): ranks that disagree pick different
# algorithms and hang. Names only: mpirun reads the values from this environment.
ompi_forward_args() {
  local name
  for name in $(compgen -e); do
    case "$name" in
      FP4CCL_*|NCCL_*) printf -- '-x\n%s\n' "$name" ;;
    esac
  done
}

# Captured rather than piped into grep -q, which under pipefail can fail the test when mpirun is
# still writing after grep has exited.
version=$(mpirun --version 2>&1 || true)
if [[ "$version" == *"Open MPI"* ]]; then
  mapfile -t forward < <(ompi_forward_args)
  # Rank i uses GPU local_rank, so do not set CUDA_VISIBLE_DEVICES per rank: CUDA IPC needs every GPU visible.
  # (${arr[@]+...} keeps empty arrays legal under set -u in bash < 4.4.)
  exec mpirun -np "$NP" ${host_args[@]+"${host_args[@]}"} --bind-to none -x PATH -x LD_LIBRARY_PATH \
       -x PYTHONUNBUFFERED=1 ${forward[@]+"${forward[@]}"} python "$SCRIPT" "$@"
else
  # MPICH / Hydra passes the whole environment of this shell to every rank on every node by default
  # (mpiexec -h: "-genvall  pass all environment variables not managed by the launcher (default)"),
  # so FP4CCL_* and NCCL_* need no flag here.
  exec mpiexec -n "$NP" ${host_args[@]+"${host_args[@]}"} -genv PYTHONUNBUFFERED 1 python "$SCRIPT" "$@"
fi
