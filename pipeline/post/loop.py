"""The one post-training loop: supervised fine-tuning, distillation and pruning's recovery step through it.

A stage hands it a model and a `Task` — what a step's micro-batches are and what their loss is — and the
loop does the rest the same way for all of them, on Accelerate (one CPU process in tests; `accelerate
launch` or torchrun for data parallelism, bf16 autocast with `train.precision: bf16` on a GPU; ZeRO-1/2
through Accelerate's DeepSpeed plugin with `zero_stage`, pipeline/post/zero.py):

- AdamW over the trainable parameters at the schedule of `train` (pipeline/schedule.py: cosine or wsd);
- `grad_accum` micro-batches per step, each rank its own slice of the step's global batch: a task draws
  the batch of step k from (seed, k) alone, so a resume, or another process count, sees the same data;
- the step's loss is the mean over every token it learns from, on all ranks: each micro-batch's mean is
  weighted by its share of the step's tokens (one all-reduce of a count), so micro-batches and ranks with
  more learned tokens (packed conversations) count for more, and 2 ranks x N rows give 1 rank x 2N's step;
- gradient clipping; `masks` (pruning) keep masked weights at zero through the gradient and the step, so
  AdamW's decoupled weight decay cannot revive them;
- training's kill-safe, checksummed checkpoints (pipeline/checkpoint.py) every `checkpoint.every` steps and
  at the end, resumed from the newest that verifies; a checkpoint is resumed only by the run that wrote it
  (the task's `identity`: its inputs and settings), any other gets one line naming it;
- OUT/metrics.jsonl every `log_every` steps (lines after the resumed checkpoint are dropped first).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from pipeline.checkpoint import (
    TorchState,
    find_checkpoint,
    read_state,
    restore_rng,
    save_checkpoint,
    trim_metrics,
)
from pipeline.config import KilnError, TrainConfig
from pipeline.console import log, progress
from pipeline.post.zero import DeepSpeedState, accelerator_for, autocast, uses_deepspeed
from pipeline.schedule import lr_of, schedule_of

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    identity: dict  # what a checkpoint must have been written with to be resumed (JSON)

    def micro_batches(self, step: int, rank: int, world: int) -> list[Batch]:
        """This rank's micro-batches of `step` (`grad_accum` of them), from (seed, step) alone."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The mean loss of one micro-batch, and figures to log with it (floats)."""

    def tokens(self, batch: Batch) -> int:
        """The tokens one micro-batch learns from (counted into `tokens` in the metrics)."""


@dataclass
class Result:
    start: int  # the step the run resumed at (0: a fresh start)
    losses: list[float] = field(default_factory=list)  # every step's loss, those before a resume too
    last: dict = field(default_factory=dict)  # the last step's metrics line
    tokens: int = 0  # learned from, since step 0
    world: int = 1
    is_main: bool = True


def run(model: torch.nn.Module, task: Task, train: TrainConfig, *, accelerator=None, zero_stage: int = 0,
        checkpoints: Path | None = None, every: int = 100, keep: int = 3, metrics: Path | None = None,
        name: str = "train", masks: dict[str, torch.Tensor] | None = None) -> Result:
    """Train `model` in place for `train.steps` steps of `task`; the unwrapped model is left in eval mode."""
    accelerator = accelerator or accelerator_for(train, zero_stage)
    deepspeed = uses_deepspeed(accelerator)
    if masks and deepspeed:
        raise KilnError("pruning masks need the plain loop: DeepSpeed steps inside the backward, where the "
                        "masks cannot reach the gradients")
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=train.lr,
                                  betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    result = Result(start=0, world=accelerator.num_processes, is_main=accelerator.is_main_process)
    state = DeepSpeedState(wrapped) if deepspeed else TorchState(model, optimizer)
    if checkpoints is not None and (resume := find_checkpoint(checkpoints, collective=result.world > 1)):
        saved = read_state(resume)
        if saved.get("identity") != task.identity:
            raise KilnError(f"{resume}: checkpoint is from another run (different model, data or settings); "
                            f"remove {checkpoints} or write elsewhere")
        zero = saved.get("deepspeed", False)  # its optimizer state is then in `world` partitions
        if zero != deepspeed or (deepspeed and saved.get("world") != result.world):
            was, now = (f"{n} process(es) {'with' if z else 'without'} ZeRO" for z, n in
                        ((zero, saved.get("world")), (deepspeed, result.world)))
            raise KilnError(f"{resume}: written by {was}; resume it as it was written (this run: {now})")
        state.load(resume)
        restore_rng(resume)
        result.start, result.losses, result.tokens = saved["step"], list(saved["losses"]), saved.get("tokens", 0)
        log.info("resuming from %s (step %d)", resume, result.start)
    if metrics is not None and result.is_main:
        trim_metrics(metrics, result.start)
        metrics.parent.mkdir(parents=True, exist_ok=True)
    schedule = schedule_of(train.model_dump())
    rank, world = accelerator.process_index, accelerator.num_processes

    def summed(x: float) -> float:  # over the ranks (float64: token counts stay exact)
        if world == 1:
            return x
        return accelerator.reduce(torch.tensor([float(x)], dtype=torch.float64, device=accelerator.device), "sum").item()

    t0 = time.perf_counter()
    wrapped.train()
    with progress(name, total=train.steps - result.start, unit="step", disable=not result.is_main) as advance:
        for step in range(result.start, train.steps):
            lr = lr_of(step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = task.micro_batches(step, rank, world)
            counts = [task.tokens(batch) for batch in batches]
            learned = summed(sum(counts))  # the step's learned tokens, all ranks
            if not learned:
                raise KilnError(f"{name}: step {step + 1} has no token to learn from on any process")
            optimizer.zero_grad(set_to_none=True)
            total, parts = 0.0, {}
            for batch, count in zip(batches, counts, strict=True):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(wrapped), autocast(accelerator, train):
                    loss, parts = task.loss(wrapped, batch)
                    # the gradient averages over ranks and micro-batches: weigh this one's mean by its tokens
                    accelerator.backward(loss * (count * world * len(batches) / learned))
                total += loss.item() * count
            if masks:
                for key, mask in masks.items():
                    params[key].grad.mul_(mask)
            if train.grad_clip and not deepspeed:  # (DeepSpeed clipped in the last backward, where it stepped)
                accelerator.clip_grad_norm_(wrapped.parameters(), train.grad_clip)
            optimizer.step()
            if masks:
                with torch.no_grad():
                    for key, mask in masks.items():
                        params[key].mul_(mask)
            done, total = step + 1, summed(total) / learned
            result.tokens += int(learned)
            result.losses.append(total)
            result.last = {"step": done, "loss": total, **parts, "lr": lr, "tokens": result.tokens,
                           "elapsed_s": round(time.perf_counter() - t0, 3)}
            if metrics is not None and result.is_main and (done % train.log_every == 0 or done == train.steps):
                with metrics.open("a") as f:
                    f.write(json.dumps(result.last) + "\n")
            if checkpoints is not None and (done % every == 0 or done == train.steps):  # collective
                save_checkpoint(state, Path(checkpoints), done, {"identity": task.identity, "losses": result.losses,
                                                                       "tokens": result.tokens, "world": world, "deepspeed": deepspeed}, keep)
            advance(1)
    accelerator.wait_for_everyone()
    model.eval()
    return result
