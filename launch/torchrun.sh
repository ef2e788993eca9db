#!/usr/bin/env bash
# Run a script under torchrun: fp4ccl.init() reads RANK / WORLD_SIZE / LOCAL_RANK and bootstraps
# through torchrun's own store at MASTER_ADDR:MASTER_PORT.  Usage: launch/torchrun.sh my_job.py [args...]
#   two nodes: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=node-a launch/torchrun.sh my_job.py
# torchrun hands this node's environment to its ranks and carries nothing between nodes: run this on
# every node with the same FP4CCL_* and NCCL_* exported (several, e.g. FP4CCL_TIMEOUT, FP4CCL_ALGO,
# NCCL_PROTO, must be identical on every rank).
set -euo pipefail

SCRIPT=${1:?usage: $0 script.py [args...]}; shift
NPROC=${NPROC:-4}

exec torchrun --nproc-per-node "$NPROC" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
     --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
     "$SCRIPT" "$@"
