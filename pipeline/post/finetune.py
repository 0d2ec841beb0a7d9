"""A plain single-process training loop over a prepared corpus: pruning's recovery fine-tuning,
and the from-scratch baselines that distillation and quantization are measured against.

`masks` keeps pruned weights at zero: gradients are masked before the step and
the weights after it, so AdamW's decoupled weight decay cannot revive them either.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.console import progress
from pipeline.post.common import batch_at, cosine_lr, windows


def train_steps(model: torch.nn.Module, data_dir: str | Path, steps: int, lr: float = 1e-3, batch_size: int = 8,
                seed: int = 0, min_lr: float | None = None, warmup: int = 0, weight_decay: float = 0.0,
                grad_clip: float = 1.0, masks: dict[str, torch.Tensor] | None = None) -> list[float]:
    """Train `model` in place for `steps` steps; return the loss of every step."""
    torch.manual_seed(seed)
    win = windows(data_dir, "train", model.cfg.block_size)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=weight_decay)
    min_lr = lr / 10 if min_lr is None else min_lr
    losses = []
    model.train()
    with progress("train", total=steps, unit="step") as advance:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, lr, min_lr, warmup)
            x, y = batch_at(win, step, batch_size, seed)
            _, loss = model(x, y)
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
            advance(1)
    model.eval()
    return losses
