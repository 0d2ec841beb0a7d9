"""`kiln prune`: magnitude pruning of the block Linear weights, optionally followed by recovery fine-tuning.

Unstructured: each layer keeps its (1 - sparsity) largest |w|. 2:4: in every run of
4 consecutive input weights of an output row, the 2 largest |w| stay (the pattern
sparse tensor cores accelerate; exactly 50%). Embeddings, norms and the head are
left dense: they are few parameters and prune badly. The output is a dense MODEL
dir whose zeros are real zeros (no sparse storage format: size on disk is unchanged).
Recovery fine-tuning (`train.steps`) checkpoints to OUT.checkpoints with training's protocol.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import KilnError, PruneConfig
from pipeline.console import log
from pipeline.device import default_device
from pipeline.evaluate import evaluate_windows
from pipeline.model.io import save_model_dir, sha256_file
from pipeline.model.weights import weights_file
from pipeline.post.common import (
    block_linears,
    lineage,
    load_parent,
    nonzero_params,
    parent_tokenizer,
    train_steps,
)


def unstructured_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = w.numel() - int(round(sparsity * w.numel()))
    mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
    mask[torch.topk(w.abs().flatten(), keep).indices] = 1
    return mask.view_as(w)


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    if cols % 4:
        raise KilnError(f"2:4 pruning needs input widths divisible by 4, got {cols}")
    groups = w.abs().reshape(rows, cols // 4, 4)
    mask = torch.zeros_like(groups)
    mask.scatter_(2, torch.topk(groups, 2, dim=2).indices, 1)
    return mask.view(rows, cols)


def magnitude_masks(model: torch.nn.Module, sparsity: float, pattern: str) -> dict[str, torch.Tensor]:
    """{parameter name: 0/1 mask} for every block Linear weight."""
    masks = {}
    for name, layer in block_linears(model).items():
        w = layer.weight.detach()
        masks[f"{name}.weight"] = two_four_mask(w) if pattern == "2:4" else unstructured_mask(w, sparsity)
    return masks


@torch.no_grad()
def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def recovery_checkpoints(out: str | Path) -> Path:
    """Where the recovery fine-tuning checkpoints go: beside the MODEL dir OUT, as OUT.checkpoints/step_N
    (OUT itself is written whole at the end). Rerunning the command resumes from there."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def prune(model_ref: str | Path, cfg: PruneConfig, out: str | Path) -> dict:
    """Prune a MODEL dir into `out`; returns parameters (total/nonzero), achieved sparsity and perplexities."""
    t = cfg.train  # the recovery fine-tuning (train.steps: 0 = none)
    model, parent_cfg, parent = load_parent(model_ref, device=default_device())  # bf16 autocast on a GPU
    if parent_cfg.get("quantization"):
        raise KilnError(f"{parent}: quantized models cannot be pruned; prune the original, then quantize")
    summary = {"out": str(out), "parent": str(parent), "pattern": cfg.pattern, "sparsity": cfg.sparsity,
               "params": model.num_params(), "nonzero_before": nonzero_params(model)}
    if cfg.data and cfg.eval_windows:
        summary["parent_perplexity"] = evaluate_windows(model, cfg.data, cfg.eval_windows)["perplexity"]
    masks = magnitude_masks(model, cfg.sparsity, cfg.pattern)
    apply_masks(model, masks)
    if cfg.data and cfg.eval_windows:
        summary["pruned_perplexity"] = evaluate_windows(model, cfg.data, cfg.eval_windows)["perplexity"]
    if t.steps:
        identity = {"parent_sha256": sha256_file(parent / weights_file(parent)), "sparsity": cfg.sparsity, "pattern": cfg.pattern,
                    "train": t.model_dump(mode="json"), "data": str(cfg.data)}
        losses = train_steps(model, cfg.data, t.steps, lr=t.lr, batch_size=t.micro_batch_size * (t.grad_accum or 1),
                             seed=t.seed, min_lr=t.min_lr, warmup=t.warmup_steps, weight_decay=t.weight_decay,
                             grad_clip=t.grad_clip, masks=masks, betas=(t.beta1, t.beta2),
                             checkpoints=recovery_checkpoints(out), every=cfg.checkpoint.every,
                             keep=cfg.checkpoint.keep, identity=identity)
        summary["recovery_final_loss"] = losses[-1]
        summary["recovery_losses"] = [float(v) for v in losses]  # the recovery curve (tracking logs it)
        if cfg.eval_windows:
            summary["perplexity"] = evaluate_windows(model, cfg.data, cfg.eval_windows)["perplexity"]
    elif "pruned_perplexity" in summary:
        summary["perplexity"] = summary["pruned_perplexity"]
    pruned = sum(int(m.numel() - m.sum().item()) for m in masks.values())
    summary.update(nonzero=nonzero_params(model), pruned_params=pruned,
                   block_sparsity=pruned / sum(m.numel() for m in masks.values()))
    meta = lineage(parent, "pruned", f"magnitude-{cfg.pattern}", sparsity=cfg.sparsity, pattern=cfg.pattern,
                   recovery_steps=t.steps, block_sparsity=round(summary["block_sparsity"], 6))
    save_model_dir(model.cpu(), model.cfg, out, parent_tokenizer(parent), meta)
    log.info("pruned %s: %d of %d block weights zero (%.1f%%)", parent, pruned,
             sum(m.numel() for m in masks.values()), 100 * summary["block_sparsity"])
    return summary
