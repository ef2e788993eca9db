#!/usr/bin/env bash
# Run a script under Open MPI or MPICH: fp4ccl.init() reads OMPI_COMM_WORLD_* / PMI_* and bootstraps
# NCCL through mpi4py (pip install 'fp4ccl[mpi]').  Usage: launch/mpirun.sh my_job.py [args...]
set -euo pipefail

SCRIPT=${1:?usage: $0 script.py [args...]}; shift
NP=${NP:-4}            # total ranks; one per GPU
HOSTS=${HOSTS:-}       # e.g. "node-a:4,node-b:4" for two nodes; empty: this machine only

host_args=()
[[ -n "$HOSTS" ]] && host_args+=(--host "$HOSTS")

if mpirun --version 2>&1 | grep -q "Open MPI"; then
  # -x forwards variables to remote nodes (Open MPI does not by default); rank i uses GPU local_rank,
  # so do not set CUDA_VISIBLE_DEVICES per rank: CUDA IPC needs every GPU visible.
  exec mpirun -np "$NP" "${host_args[@]}" --bind-to none -x PATH -x LD_LIBRARY_PATH -x PYTHONUNBUFFERED=1 \
       -x FP4CCL_DEBUG python "$SCRIPT" "$@"
else
  # MPICH / Hydra forwards the whole environment itself.
  exec mpiexec -n "$NP" "${host_args[@]}" -genv PYTHONUNBUFFERED 1 python "$SCRIPT" "$@"
fi
