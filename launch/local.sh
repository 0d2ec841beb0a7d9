#!/usr/bin/env bash
# Single-node training on this machine: N processes (default: all GPUs, or 2 on CPU).
#
#   launch/local.sh 4 kiln train --config configs/train/tiny-cpu.yaml --set parallel.tp=2
#   DRY_RUN=1 launch/local.sh 8 kiln train --config configs/train/125m-1node.yaml
#
# On a machine without NVIDIA GPUs this runs DeepSpeed on its CPU accelerator with gloo.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then nproc="$1"; shift; else nproc=""; fi
source "$here/env.sh"
if [[ -z "$nproc" ]]; then nproc=$(( KILN_GPUS_HERE > 0 ? KILN_GPUS_HERE : 2 )); fi
NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 GPUS_PER_NODE="$nproc" exec "$here/torchrun_multinode.sh" "$@"
