"""Where inference and post-training run, and in what precision (`kiln eval`, `generate`, `distill`, `prune`).

On a GPU: bf16 autocast, and TF32 for the matmuls autocast leaves in fp32 — the weights stay fp32,
so nothing is lost when they are saved. On the CPU: plain fp32, exactly as before (runs compare bit
for bit). Pretraining has its own precision setting (train.precision, DeepSpeed).
"""

from __future__ import annotations

import contextlib

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU that has it, else fp32 (CPU; V100-class GPUs, whose fp16 would need loss scaling)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: str | torch.device):
    """The context the forward passes run in: bf16 autocast + TF32 on a GPU, nothing on the CPU."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dtype = compute_dtype(device)
    return torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
