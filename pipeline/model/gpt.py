"""A plain GPT decoder, readable top to bottom (after nanoGPT).

One structure for every model family: embedding, pre-norm blocks (attention, MLP), final norm and head;
the family's spec (pipeline/families/, via `model.style`) picks the norm, the MLP, how positions enter and
whether linears carry biases, and the layers themselves are in pipeline/model/layers.py. The model knows
nothing about ranks or devices: tensor and pipeline parallelism are applied on top of it by
`pipeline/model/tensor_parallel.py` and `pipeline/parallel/`.

The model can be built on the meta device (no memory, no init) and materialized
later, shard by shard: `init_plan` says how each parameter starts, and buffers
are recomputed by `reset_buffers()`.

Attention is grouped-query when model.n_kv_heads < n_head (each key/value head
serves n_head / n_kv_heads query heads). Decoding passes a `KVCache` (layers.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.families import family
from pipeline.model.init import initial_value
from pipeline.model.layers import Attention, KVCache, LayerKV, Packing, make_mlp, make_norm, sub_blocks
from pipeline.model.loss import softcap


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None, packing: Packing | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache, packing))
        return x + self.drop(self.mlp(self.norm2(x)))


class Embedding(nn.Module):
    """Token embedding (+ a learned position table where the family's positions are learned)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if family(cfg).positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.tp_output = nn.Identity()  # sequence parallelism: this rank's 1/tp of the sequence

    def forward(self, idx: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """idx (B, T) at positions start.. (an int), or at the positions (B, T) given."""
        x = self.wte(idx)
        if self.wpe is not None:
            pos = start if isinstance(start, torch.Tensor) else torch.arange(start, start + idx.size(1), device=idx.device)
            x = x + self.wpe(pos)
        return self.tp_output(self.drop(x))


class Head(nn.Module):
    """Final norm and the output projection to vocabulary logits (soft-capped with model.logit_softcap)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cap = cfg.logit_softcap
        self.norm = make_norm(cfg)
        self.tp_input = nn.Identity()  # tensor parallelism: the input of the vocabulary-split lm_head
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The final hidden states, what lm_head projects (training takes the loss from them)."""
        return self.tp_input(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(self.hidden(x)), self.cap)


def init_plan(module: nn.Module, cfg: ModelConfig, skip: tuple[str, ...] = ()) -> list[tuple[str, str, float]]:
    """How every parameter under `module` starts, in a fixed order: (name, "normal" | "zeros" | "ones", std).

    GPT-3 style: linear weights and embeddings N(0, init_std), residual output projections
    N(0, init_std / sqrt(2 n_layer)) (zeros with model.zero_init_proj, as modded-nanogpt: each block starts as
    the identity and its output projection's gradient is the first to move), biases 0, norm weights 1. The order is the order in which a
    seeded generator draws them, so a part initialized alone equals the same part of the whole model.
    `skip` names submodules left out (a tied head: the embedding carries its weight).
    """
    plan = []
    out_proj = {f"{sub}.{n}".lstrip(".") for sub, m in sub_blocks(module) for n in m.OUT_PROJ}
    for name, m in module.named_modules():
        if name in skip:
            continue
        pre = f"{name}." if name else ""
        if isinstance(m, nn.Linear | nn.Embedding):
            residual = isinstance(m, nn.Linear) and name in out_proj
            if residual and cfg.zero_init_proj:
                plan.append((pre + "weight", "zeros", 0.0))
            else:
                plan.append((pre + "weight", "normal", cfg.init_std / math.sqrt(2 * cfg.n_layer) if residual else cfg.init_std))
            if getattr(m, "bias", None) is not None:
                plan.append((pre + "bias", "zeros", 0.0))
        elif isinstance(m, nn.LayerNorm | nn.RMSNorm):
            plan.append((pre + "weight", "ones", 0.0))
            if getattr(m, "bias", None) is not None:
                plan.append((pre + "bias", "zeros", 0.0))
    return plan


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token loss in fp32; target -100 is ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set before building the model")
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = Head(cfg)
        if cfg.tie_embeddings:
            self.head.lm_head.weight = self.embed.wte.weight
        self.loss_fn = cross_entropy  # tensor parallelism swaps in a vocab-parallel version
        # training (parallelize.py) sets a ChunkedCrossEntropy: the loss comes from the final hidden states
        # a chunk of tokens at a time, and the full logits are never built
        self.hidden_loss = None
        if not self.embed.wte.weight.is_meta:  # built for use right away (not to be materialized by parts)
            params = dict(self.named_parameters())
            with torch.no_grad():
                for name, kind, std in init_plan(self, cfg, skip=("head.lm_head",) if cfg.tie_embeddings else ()):
                    params[name].copy_(initial_value(kind, std, params[name].shape))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                segments: torch.Tensor | None = None):
        """Return logits (B, T, V), and the mean loss when targets are given (then logits are None if the
        loss is chunked: `hidden_loss`). With a cache, `idx` are the tokens after the cached ones, and
        their keys/values join the cache. `segments` (B, T): the document of each position of packed rows
        (layers.py `Packing`: positions restart and attention stays within each document)."""
        start = cache.pos if cache is not None else 0
        if start + idx.size(1) > self.cfg.block_size:
            raise ValueError(f"sequence length {start + idx.size(1)} exceeds model.block_size {self.cfg.block_size}")
        if segments is not None and cache is not None:
            raise ValueError("packed rows (segments) are for training and scoring, not for decoding with a cache")
        packing = Packing(segments) if segments is not None else None
        x = self.embed(idx, packing.positions if packing is not None else start)
        for i, block in enumerate(self.blocks):
            # (plain `block(x)` otherwise: activation checkpointing and compilation wrap that call)
            x = block(x, cache.layers[i]) if cache is not None else block(x, packing=packing) if packing is not None else block(x)
        if cache is not None:
            cache.pos += idx.size(1)
        if targets is not None and self.hidden_loss is not None:
            return None, self.balanced(self.hidden_loss(self.head.hidden(x), self.head.lm_head.weight, targets))
        logits = self.head(x)
        if targets is None:
            return logits, None
        return logits, self.balanced(self.loss_fn(logits, targets))

    def balanced(self, loss: torch.Tensor) -> torch.Tensor:
        """While training, the token loss plus model.moe_aux_loss_coef x the routed MLPs' load-balancing losses
        of this forward (each layer leaves its own in `aux_loss`); evaluation reports the token loss alone."""
        if not (self.cfg.n_experts and self.training):
            return loss
        aux = [m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None]
        for m in self.modules():
            if getattr(m, "aux_loss", None) is not None:
                m.aux_loss = None
        return loss + self.cfg.moe_aux_loss_coef * sum(aux) if aux else loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once); non_embedding drops wte/wpe."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if non_embedding:
            n -= self.embed.wte.weight.numel()
            if self.embed.wpe is not None:
                n -= self.embed.wpe.weight.numel()
        return n
