#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher (pdsh/ssh to every host in a hostfile).
#
#   launch/deepspeed_hostfile.sh --hostfile hosts.txt --num-nodes 2 --gpus-per-node 8 \
#       -- kiln train --config configs/train/1.3b-2x8.yaml
#   launch/deepspeed_hostfile.sh --hostfile hosts.txt --dry-run -- kiln train ...
#
# hostfile: one `hostname slots=N` line per node (N = GPUs), `#` comments allowed.
# --include/--exclude take DeepSpeed's NODE[:SLOT,...]@NODE syntax. The launch
# environment (launch/env.sh plus --env NAME=value) reaches every node through
# .deepspeed_env, which this writes in the current directory.
# All validation (hostfile syntax, world size vs the config's tp x pp, master
# address) happens in `kiln launch deepspeed` before anything starts.
set -euo pipefail
exec kiln launch deepspeed "$@"
