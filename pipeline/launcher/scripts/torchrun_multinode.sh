#!/usr/bin/env bash
# Multi-node training with torchrun, for clusters without SLURM or pdsh.
# Run the same line on every node, changing only NODE_RANK:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 \
#     launch/torchrun_multinode.sh kiln train --config configs/train/1.3b-2x8.yaml
#
# Variables (defaults):
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   GPUS_PER_NODE (number of GPUs here; 1 process on a CPU-only node)
#   RDZV=static|c10d (static): static uses --node-rank/--master-addr; c10d uses an
#        elastic rendezvous at MASTER_ADDR:MASTER_PORT with RUN_ID (any node may start first)
#   RUN_ID (kiln)  DRY_RUN=1 prints the torchrun command instead of running it
# Environment defaults (NCCL, CPU/gloo) come from launch/env.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV="${RDZV:-static}"
RUN_ID="${RUN_ID:-kiln}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(( KILN_GPUS_HERE > 0 ? KILN_GPUS_HERE : 1 ))
fi
if [[ $# -eq 0 ]]; then
  echo "torchrun_multinode.sh: error: no command given (e.g. kiln train --config F)" >&2
  exit 2
fi

cmd=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE")
case "$RDZV" in
  static) cmd+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT") ;;
  c10d)   cmd+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RUN_ID") ;;
  *) echo "torchrun_multinode.sh: error: RDZV=$RDZV is not static or c10d" >&2; exit 2 ;;
esac
cmd+=(--no-python "$@")

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
