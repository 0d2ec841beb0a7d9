# Kiln launch environment defaults, sourced by every launch script on every node.
# Each variable is set only if you have not set it, so `export NAME=value` before
# launching overrides it. `kiln launch ... --env NAME=value` does the same.
#
# GPUs (NCCL):
#   NCCL_DEBUG=WARN                  errors and warnings only; INFO when debugging hangs
#   NCCL_IB_DISABLE=0                use InfiniBand/RoCE when present
#   NCCL_SOCKET_IFNAME=^lo,docker    bootstrap over any NIC but loopback/docker; set your
#                                    fabric NIC (e.g. ib0, eth0, bond0) on multi-homed nodes
#   CUDA_DEVICE_MAX_CONNECTIONS=1    one hardware queue, so TP communication kernels are
#                                    scheduled in issue order and overlap with compute (Megatron)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a failed or timed-out collective ends the job instead of hanging
# CPU (no NVIDIA driver): DS_ACCELERATOR=cpu, and training picks gloo automatically.

KILN_ENV_VARS="NCCL_DEBUG NCCL_IB_DISABLE NCCL_SOCKET_IFNAME CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING DS_ACCELERATOR OMP_NUM_THREADS PYTHONUNBUFFERED"

if [[ -z "${KILN_FORCE_CPU:-}" ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  KILN_GPUS_HERE="$(nvidia-smi -L | wc -l)"
else
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  KILN_GPUS_HERE=0
fi
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
