"""The plain GPT re-expressed as a DeepSpeed `PipelineModule` (GPT-NeoX style).

Layers, in order: Embedding, n_layer Blocks, then either the untied Head or (tied
embeddings) a final norm plus the embedding again via `TiedLayerSpec`, whose
`forward_fn` projects onto the shared table. Each stage builds only its own
layers; `parts.build_part` gives every layer the same initial weights as the
1-process model (or the weights of `train.init_from`) and applies TP.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig, RunConfig
from pipeline.model.gpt import Block, Embedding, Head, cross_entropy, make_norm
from pipeline.model.tensor_parallel import VocabParallelCrossEntropy, copy_to_tp, padded_vocab
from pipeline.parallel.parts import build_part


class EmbeddingPipe(Embedding):
    def __init__(self, cfg: ModelConfig, ctx: dict):
        super().__init__(cfg)
        build_part(self, "embed.", 0, cfg, ctx)


class BlockPipe(Block):
    def __init__(self, cfg: ModelConfig, index: int, ctx: dict):
        super().__init__(cfg)
        build_part(self, f"blocks.{index}.", index + 1, cfg, ctx)


class HeadPipe(Head):
    def __init__(self, cfg: ModelConfig, ctx: dict):
        super().__init__(cfg)
        build_part(self, "head.", cfg.n_layer + 1, cfg, ctx)


class FinalNormPipe(nn.Module):
    """The Head's norm alone, when lm_head is the tied embedding table."""

    def __init__(self, cfg: ModelConfig, ctx: dict):
        super().__init__()
        self.norm = make_norm(cfg)
        build_part(self, "head.", cfg.n_layer + 1, cfg, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def tied_logits(group, embed: Embedding, x: torch.Tensor) -> torch.Tensor:
    if group is not None:
        x = copy_to_tp(x, group)
    return F.linear(x, embed.wte.weight)


def build_pipeline_module(cfg: RunConfig, layout, init_state: dict | None = None):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    m = cfg.model
    tp_group = layout.tp_group if layout.tp > 1 else None
    ctx = {"seed": cfg.train.seed, "tp_group": tp_group, "init_state": init_state}
    layers = [TiedLayerSpec("embed", EmbeddingPipe, m, ctx, tied_weight_attr="wte.weight")
              if m.tie_embeddings else LayerSpec(EmbeddingPipe, m, ctx)]
    layers += [LayerSpec(BlockPipe, m, i, ctx) for i in range(m.n_layer)]
    if m.tie_embeddings:
        layers += [LayerSpec(FinalNormPipe, m, ctx),
                   TiedLayerSpec("embed", EmbeddingPipe, m, ctx, forward_fn=functools.partial(tied_logits, tp_group),
                                 tied_weight_attr="wte.weight")]
    else:
        layers += [LayerSpec(HeadPipe, m, ctx)]
    if tp_group is not None:
        loss_fn = VocabParallelCrossEntropy(tp_group, layout.tp_rank, m.vocab_size,
                                            padded_vocab(m.vocab_size, layout.tp), layout.tp)
    else:
        loss_fn = cross_entropy
    ckpt = functools.partial(checkpoint, use_reentrant=False)
    return PipelineModule(
        layers=layers, topology=layout.topology, loss_fn=loss_fn, partition_method=cfg.parallel.partition,
        activation_checkpoint_interval=1 if cfg.train.activation_checkpointing else 0,
        activation_checkpoint_func=ckpt,
    )
