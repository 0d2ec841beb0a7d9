"""A plain single-process training loop over a prepared corpus: pruning's recovery fine-tuning,
and the from-scratch baselines that distillation and quantization are measured against.

`masks` keeps pruned weights at zero: gradients are masked before the step and
the weights after it, so AdamW's decoupled weight decay cannot revive them either.
With `checkpoints` (a directory) the loop saves there with training's kill-safe, checksummed
protocol (pipeline/checkpoint.py) and resumes from the newest checkpoint that verifies.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.checkpoint import TorchState, find_checkpoint, read_state, restore_rng, save_checkpoint
from pipeline.config import KilnError
from pipeline.console import log, progress
from pipeline.device import autocast
from pipeline.post.common import batch_at, windows
from pipeline.schedule import warmup_cosine


def train_steps(model: torch.nn.Module, data_dir: str | Path, steps: int, lr: float = 1e-3, batch_size: int = 8,
                seed: int = 0, min_lr: float | None = None, warmup: int = 0, weight_decay: float = 0.0,
                grad_clip: float = 1.0, masks: dict[str, torch.Tensor] | None = None, betas=(0.9, 0.95),
                checkpoints: str | Path | None = None, every: int = 100, keep: int = 3,
                identity: dict | None = None) -> list[float]:
    """Train `model` in place for `steps` steps; return the loss of every step (those before a resume too).
    `identity`: what a checkpoint must match to be resumed (the run's inputs and settings)."""
    torch.manual_seed(seed)
    win = windows(data_dir, "train", model.cfg.block_size)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=lr, betas=betas,
                            weight_decay=weight_decay)
    min_lr = lr / 10 if min_lr is None else min_lr
    state, start, losses = TorchState(model, opt), 0, []
    if checkpoints is not None and (resume := find_checkpoint(checkpoints)) is not None:
        saved = read_state(resume)
        if saved.get("identity") != identity:
            raise KilnError(f"{resume}: checkpoint is from another run (different model, data or settings); "
                            f"remove {checkpoints} or write elsewhere")
        state.load(resume)
        restore_rng(resume)
        start, losses = saved["step"], list(saved["losses"])
        log.info("resuming from %s (step %d)", resume, start)
    model.train()
    device = next(model.parameters()).device  # bf16 autocast there if it is a GPU
    with progress("train", total=steps - start, unit="step") as advance:
        for step in range(start, steps):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, steps, lr, min_lr, warmup)
            x, y = batch_at(win, step, batch_size, seed)
            with autocast(device):
                _, loss = model(x.to(device), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if masks:
                for name, mask in masks.items():
                    params[name].grad.mul_(mask)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            if masks:
                with torch.no_grad():
                    for name, mask in masks.items():
                        params[name].mul_(mask)
            losses.append(loss.item())
            done = step + 1
            if checkpoints is not None and (done % every == 0 or done == steps):
                save_checkpoint(state, Path(checkpoints), done, {"identity": identity, "losses": losses}, keep)
            advance(1)
    model.eval()
    return losses
