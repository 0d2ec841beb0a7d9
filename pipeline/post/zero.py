"""The post-training loop's Accelerator: plain (DDP over the processes) or ZeRO through Accelerate's DeepSpeed plugin.

`parallel.zero_stage` 1 partitions AdamW's state over the data-parallel processes, 2 the gradients too (what
lets a model whose optimizer state does not fit one device be fine-tuned on several). DeepSpeed then owns the
step: it sums a step's micro-batches, reduce-scatters the gradients, clips them and steps AdamW inside the
backward of the step's last micro-batch (Accelerate's `accumulate`). Stage 3 (the weights partitioned too) is
not offered: the loop's stages read and write their model whole on every rank.

On a CPU (tests) DeepSpeed runs with `DS_ACCELERATOR=cpu` over gloo; on GPUs over NCCL. DeepSpeed keeps the
weights fp32 (its bf16 mode would round the model itself to bf16 in place: LoRA's frozen base and the MODEL dir
written with it) and `train.precision: bf16` is autocast around the forward (`autocast`), as without ZeRO.
Run by one process without a launcher, there is nothing to partition: the plain Accelerator is used.

`DeepSpeedState` is the `engine` pipeline/checkpoint.py's save_checkpoint takes: every rank writes DeepSpeed's
files for its partition under `ds/`, each hashed while written; loading admits only DeepSpeed's plain state
types (a planted pickle is refused).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.parallel.engine import BUCKET_ELEMENTS, QUIET_TIMERS, load_deepspeed, save_deepspeed

MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def ds_config(train: TrainConfig, zero_stage: int, gpu: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum or 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": BUCKET_ELEMENTS,
                              "allgather_bucket_size": BUCKET_ELEMENTS, "contiguous_gradients": zero_stage >= 2,
                              "overlap_comm": gpu},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "timers": QUIET_TIMERS,
    }


def accelerator_for(train: TrainConfig, zero_stage: int = 0):
    """The Accelerator a post-training stage runs on: bf16 autocast where asked and a GPU is there (under
    DeepSpeed: `autocast` below), fp32 on a CPU; `train.grad_accum` micro-batches a step."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    gpu = torch.cuda.is_available()
    mixed = MIXED[train.precision] if gpu else "no"
    accum = train.grad_accum or 1
    if not zero_stage or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Accelerator(mixed_precision=mixed, cpu=not gpu, gradient_accumulation_steps=accum)
    # (Accelerate runs DeepSpeed only with cpu=False; without a GPU it then picks no process group
    # backend at all and counts one process: name gloo)
    handlers = [] if gpu else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(mixed_precision="no", gradient_accumulation_steps=accum, kwargs_handlers=handlers,
                       deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(train, zero_stage, gpu)))


def autocast(accelerator, train: TrainConfig):
    """The forward's autocast: Accelerate's, or under DeepSpeed (whose weights stay fp32) torch's own."""
    if not uses_deepspeed(accelerator):
        return accelerator.autocast()
    on = train.precision == "bf16" and accelerator.device.type == "cuda"  # (fp16 would need a loss scaler)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


class DeepSpeedState:
    """Checkpoint state of a DeepSpeed engine Accelerate prepared: its module, and this rank's partition of the
    optimizer (collective)."""

    def __init__(self, engine):
        self.engine = engine

    def save(self, directory: Path) -> dict[str, str]:
        return save_deepspeed(self.engine, Path(directory))

    def load(self, directory: Path) -> None:
        load_deepspeed(self.engine, directory)
