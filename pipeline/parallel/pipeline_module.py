"""The plain GPT re-expressed as a DeepSpeed `PipelineModule` (GPT-NeoX style).

Layers, in order: Embedding, n_layer Blocks, then either the untied Head or (tied
embeddings) a final norm plus the embedding again via `TiedLayerSpec`, whose
`forward_fn` projects onto the shared table. Each layer is built on the meta device,
parallelized like the whole model would be (parallelize.py), and materialized
(materialize.py) only when it belongs to this stage: DeepSpeed also builds every
layer once to count its parameters for `partition: parameters`, and that build stays
on the meta device, so it costs neither memory nor time.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import RunConfig
from pipeline.model.gpt import Block, Embedding, Head
from pipeline.model.layers import make_norm
from pipeline.model.loss import softcap
from pipeline.model.tensor_parallel import tp_input
from pipeline.parallel.materialize import mark_part, materialize
from pipeline.parallel.parallelize import loss_fn, parallelize


def _stage_layer(layer: nn.Module, index: int, prefix: str, ctx: dict) -> None:
    """Mark, parallelize and (unless DeepSpeed is only counting) materialize a layer built on meta."""
    run: RunConfig = ctx["run"]
    mark_part(layer, index, prefix, run.model)
    parallelize(layer, ctx["layout"], run)
    if not ctx.get("counting"):
        materialize(layer, run.train.seed, ctx["device"], ctx["dtype"], ctx.get("source"))


class EmbeddingPipe(Embedding):
    def __init__(self, ctx: dict):
        with torch.device("meta"):
            super().__init__(ctx["run"].model)
        _stage_layer(self, 0, "embed.", ctx)


class BlockPipe(Block):
    def __init__(self, index: int, ctx: dict):
        with torch.device("meta"):
            super().__init__(ctx["run"].model)
        _stage_layer(self, index + 1, f"blocks.{index}.", ctx)


class HeadPipe(Head):
    def __init__(self, ctx: dict):
        with torch.device("meta"):
            super().__init__(ctx["run"].model)
        _stage_layer(self, ctx["run"].model.n_layer + 1, "head.", ctx)


class FinalNormPipe(nn.Module):
    """The Head's norm alone, when lm_head is the tied embedding table (`tied_logits` takes its output)."""

    def __init__(self, ctx: dict):
        super().__init__()
        with torch.device("meta"):
            self.norm = make_norm(ctx["run"].model)
        _stage_layer(self, ctx["run"].model.n_layer + 1, "head.", ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def tied_logits(head_input: nn.Module, embed: Embedding, x: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """The tied head: the final norm's output through the head's TP input (`tensor_parallel.tp_input`), then
    the embedding table. The TP input stays on this side of the stage boundary: what a stage sends (forward)
    and receives back (backward) must be the same on every TP rank, as DeepSpeed sends each rank 1/tp of it
    and gathers the pieces (without sequence parallelism). Soft-capped as the Head's (model.logit_softcap)."""
    return softcap(F.linear(head_input(x), embed.wte.weight), cap)


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class KilnPipelineModule(PipelineModule):
        def _count_layer_params(self):
            """DeepSpeed builds every layer to count it: let it build them on the meta device."""
            self._kiln_ctx["counting"] = True
            try:
                with torch.device("meta"):
                    return super()._count_layer_params()
            finally:
                self._kiln_ctx["counting"] = False

    return KilnPipelineModule


def build_pipeline_module(run: RunConfig, layout, device, dtype, source=None):
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    m = run.model
    ctx = {"run": run, "layout": layout, "device": device, "dtype": dtype, "source": source}
    head_input = tp_input(layout.tp_group, run.parallel.sequence_parallel) if layout.tp > 1 else nn.Identity()
    layers = [TiedLayerSpec("embed", EmbeddingPipe, ctx, tied_weight_attr="wte.weight")
              if m.tie_embeddings else LayerSpec(EmbeddingPipe, ctx)]
    layers += [LayerSpec(BlockPipe, i, ctx) for i in range(m.n_layer)]
    if m.tie_embeddings:
        layers += [LayerSpec(FinalNormPipe, ctx),
                   TiedLayerSpec("embed", EmbeddingPipe, ctx, tied_weight_attr="wte.weight",
                                 forward_fn=functools.partial(tied_logits, head_input, cap=m.logit_softcap))]
    else:
        layers += [LayerSpec(HeadPipe, ctx)]
    cls = _pipeline_module_class()
    cls._kiln_ctx = ctx  # read by _count_layer_params, which DeepSpeed calls from __init__
    return cls(layers=layers, topology=layout.topology, loss_fn=loss_fn(layout, run),
               partition_method=run.parallel.partition, activation_checkpoint_interval=0)
