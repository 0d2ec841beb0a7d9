"""LoRA for `kiln sft` (`lora.rank` > 0), through PEFT: low-rank adapters on the transformer blocks' linear layers.

    y = W x + (alpha / rank) · B A x        A: rank x in (random), B: out x rank (zeros): the start is the base

Only the adapters train — and, by default (`lora.train_embeddings`), the embedding and the output head: the
chat markers a base gets from `kiln sft` start as the mean of the other rows (pipeline/sft/vocab.py), all
four alike, and a frozen head could never tell the end of a turn from a user turn. Checkpoints hold the
adapted model as the loop trains it (resumed into the same adapters); the MODEL dir written at the end is
the plain model with the adapters merged into its weights (`merged`): `kiln export`, `kiln generate` and
transformers read it like any other, with no PEFT needed.
"""

from __future__ import annotations

import torch

from pipeline.config import KilnError, SftLoraConfig


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """The names of the linear layers inside the transformer blocks (PEFT's target_modules: wq, wk, ... w2)."""
    from pipeline.model.gpt import Block

    return sorted({name.rsplit(".", 1)[-1] for block in model.modules() if isinstance(block, Block)
                   for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)})


def with_lora(model: torch.nn.Module, cfg: SftLoraConfig) -> torch.nn.Module:
    """`model` wrapped with LoRA adapters (PEFT); everything else frozen but the embedding and head when
    `cfg.train_embeddings`."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise KilnError("lora.rank > 0 needs PEFT: pip install 'kiln-pretrain[sft]' (or peft)") from None

    targets = cfg.targets or block_linear_names(model)
    wrapped = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                               target_modules=targets, bias="none"))
    if cfg.train_embeddings:
        model.embed.wte.weight.requires_grad_(True)
        model.head.lm_head.weight.requires_grad_(True)  # (the same tensor when tied)
    return wrapped


def merged(wrapped: torch.nn.Module) -> torch.nn.Module:
    """The plain model with every adapter merged into the weight it adapts."""
    return wrapped.merge_and_unload()


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
