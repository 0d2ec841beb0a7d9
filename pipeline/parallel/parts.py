"""Initial weights that do not depend on the layout, and the way back to one state dict.

Every part of the model (embedding = 0, block i = i+1, head = n_layer+1) is
initialized from its own generator seeded by (train.seed, part index). So a
pipeline stage that builds only blocks 3..5 gets exactly the weights the
1-process model has, and a TP rank shards exactly those. Parameter names are the
plain GPT's (`kiln_prefix` + local name), which is what consolidation gathers to.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.gpt import GPT
from pipeline.model.tensor_parallel import gather_tp, parallelize_tp

RESIDUAL = ("attn.wo", "mlp.w2", "mlp.proj")


def init_part(module: nn.Module, cfg: ModelConfig, seed: int, index: int, skip: tuple[str, ...] = ()) -> None:
    """GPT-3 style init (as GPT._init_weights) from a generator private to this part."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    for name, m in module.named_modules():
        if name in skip:
            continue
        if isinstance(m, nn.Linear):
            std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if name.endswith(RESIDUAL) else cfg.init_std
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * cfg.init_std)


def load_part(module: nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> None:
    """Copy this part's tensors out of a full (plain-named) state dict."""
    from pipeline.config import KilnError

    for name, p in module.named_parameters(remove_duplicate=False):
        key = prefix + name
        if key not in state:
            if key == "head.lm_head.weight":  # tied head: the embedding carries it
                continue
            raise KilnError(f"train.init_from: the weights have no {key}; the model config differs")
        if state[key].shape != p.shape:
            raise KilnError(f"train.init_from: {key} has shape {tuple(state[key].shape)}, "
                            f"the model config needs {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(state[key].to(p.dtype))


def build_part(module: nn.Module, prefix: str, index: int, cfg: ModelConfig, ctx: dict) -> nn.Module:
    """Initialize (or load) one plain part, then shard it for TP; tags it for consolidation."""
    skip = ("lm_head",) if cfg.tie_embeddings and prefix == "head." else ()
    if ctx.get("init_state") is not None:
        load_part(module, prefix, ctx["init_state"])
    else:
        init_part(module, cfg, ctx["seed"], index, skip)
    if ctx.get("tp_group") is not None:
        parallelize_tp(module, ctx["tp_group"], cfg.vocab_size, cfg.tie_embeddings)
    module.kiln_prefix = prefix
    return module


def build_gpt(cfg: ModelConfig, seed: int, tp_group=None, init_state: dict | None = None) -> GPT:
    """The whole model for PP = 1, with layout-independent weights, TP applied when tp_group is given."""
    model = GPT(cfg)
    ctx = {"seed": seed, "init_state": init_state}
    build_part(model.embed, "embed.", 0, cfg, ctx)
    for i, block in enumerate(model.blocks):
        build_part(block, f"blocks.{i}.", i + 1, cfg, ctx)
    build_part(model.head, "head.", cfg.n_layer + 1, cfg, ctx)
    if tp_group is not None:
        parallelize_tp(model, tp_group, cfg.vocab_size, cfg.tie_embeddings)
    return model


def _named_parts(module: nn.Module):
    """(plain name, parameter) once per parameter: a tied head yields nothing of its own."""
    seen: set[int] = set()
    for m in module.modules():
        prefix = getattr(m, "kiln_prefix", None)
        if prefix is not None:
            for name, p in m.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + name, p


def consolidated_state(module: nn.Module, layout, zero3: bool = False) -> dict[str, torch.Tensor] | None:
    """Gather TP shards, ZeRO-3 partitions and pipeline stages into one plain state dict on rank 0.

    Collective: every rank must call it. Returns None on other ranks.
    """
    out: dict[str, torch.Tensor] = {}
    for key, p in _named_parts(module):
        if key in out:
            continue
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                t = p.detach().clone()
        else:
            t = p.detach()
        t = gather_tp(t, p, layout.tp_group if layout.tp > 1 else None)
        out[key] = t.float().cpu().contiguous() if t.dtype != torch.float32 else t.cpu().contiguous()
    if layout.pp == 1:
        return out if layout.rank == 0 else None
    # one copy per stage travels to rank 0 (data rank 0, tp rank 0 of each stage)
    mine = out if (layout.dp_rank == 0 and layout.tp_rank == 0) else {}
    gathered = [None] * layout.world if layout.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if layout.rank != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in part.items():
            full.setdefault(k, v)
    return full
