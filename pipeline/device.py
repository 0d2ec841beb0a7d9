"""Where inference and post-training run, in what precision, on how many CPU threads, at what peak.

On a GPU: bf16 autocast, and TF32 for the matmuls autocast leaves in fp32 — the weights stay fp32,
so nothing is lost when they are saved. On the CPU: plain fp32, exactly as before (runs compare bit
for bit). Pretraining has its own precision setting (train.precision, DeepSpeed).

CPU threads: torch's default intra-op pool is sized to the machine, not to the cores this process may
run on; on a box shared with other jobs (a cgroup or taskset) that oversubscribes and ran 6-7x slower
than one thread. `use_cpu_threads` sizes it from the affinity mask, or OMP_NUM_THREADS when the user
set it; every speed figure is recorded with the thread count it was measured with.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

PEAK_CACHE = Path.home() / ".cache" / "kiln" / "peak_flops.json"


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


def cpu_threads(processes: int = 1) -> int:
    """Intra-op threads for each of `processes` CPU processes on this machine: OMP_NUM_THREADS if the user set it,
    else the cores this process may run on (its affinity mask, not the machine's count) shared out evenly."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, processes))


def use_cpu_threads(processes: int = 1) -> int:
    """Set torch's intra-op thread count to `cpu_threads(processes)`; returns it (recorded with the speeds)."""
    n = cpu_threads(processes)
    torch.set_num_threads(n)
    return n


def describe(device: str | torch.device) -> str:
    """The device a speed was measured on, as compared: "cpu", or the GPU's name."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def time_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, device: str = "cpu", repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul, after a warm-up (no caching)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def measured_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, device: str = "cpu") -> float:
    """Matmul FLOP/s of this machine at torch's current thread count, measured once and cached per
    device/dtype/threads (training's MFU on a CPU, and `kiln plan --gpu cpu`)."""
    key = f"{device}:{dtype}:{torch.get_num_threads()}"
    try:
        cache = json.loads(PEAK_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    best = time_matmul_peak(dtype, n, device)
    cache[key] = best
    try:
        PEAK_CACHE.parent.mkdir(parents=True, exist_ok=True)
        PEAK_CACHE.write_text(json.dumps(cache))
    except OSError:
        pass
    return best
