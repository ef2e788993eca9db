#!/usr/bin/env bash
# Run a script with fp4ccl's own launcher: no MPI needed.
#   single node:  launch/fp4ccl-run.sh my_job.py [args...]
#   two nodes:    NNODES=2 NODE_RANK=0 MASTER_ADDR=node-a launch/fp4ccl-run.sh my_job.py   (on node-a)
#                 NNODES=2 NODE_RANK=1 MASTER_ADDR=node-a launch/fp4ccl-run.sh my_job.py   (on node-b)
# fp4ccl-run hands this node's environment to its ranks (docs/LAUNCHER.md) and carries nothing between
# nodes: on several nodes export the same FP4CCL_* and NCCL_* on each (several, e.g. FP4CCL_TIMEOUT,
# FP4CCL_ALGO, NCCL_PROTO, must be identical on every rank).
set -euo pipefail

SCRIPT=${1:?usage: $0 script.py [args...]}; shift
NNODES=${NNODES:-1}
NPROC=${NPROC:-}          # empty: one rank per visible GPU (4 on a machine without GPUs)

args=()
[[ -n "$NPROC" ]] && args+=(-n "$NPROC")
if (( NNODES > 1 )); then
  # Every node must present the same token to node 0's store; generate it once and share it
  # (here: the caller exports it, e.g. from a secrets manager or the batch script).
  : "${FP4CCL_TOKEN:?export the same FP4CCL_TOKEN on every node for a multi-node job}"
  export FP4CCL_TOKEN
  args+=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}"
         --master-addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master-port "${MASTER_PORT:-29500}")
fi

# Per-rank logs next to the prefixed console output; a hung job is stopped after an hour.
exec fp4ccl-run "${args[@]}" --log-dir "logs/fp4ccl-$(date +%Y%m%d-%H%M%S)" --timeout 3600 "$SCRIPT" "$@"
