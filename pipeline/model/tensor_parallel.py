"""Megatron-style tensor parallelism, applied on top of the plain GPT (torchtitan style).

The plain model (gpt.py) knows nothing about ranks. `parallelize_tp(module, group)`
walks it and swaps layers for sharded versions built from the full weights:

    attention wq/wk/wv, MLP w1/w3/fc  -> ColumnParallelLinear (output features split), fed by the
                                         sub-block's one copy_to_tp (`tp_input`)
    attention wo, MLP w2/proj         -> RowParallelLinear    (input features split, all-reduce)
    token embedding wte               -> VocabParallelEmbedding (vocab rows split)
    lm_head                           -> ColumnParallelLinear over the (padded) vocab, fed by the head's copy_to_tp
    loss                              -> VocabParallelCrossEntropy (no full-vocab gather)

The collectives are pairs of autograd functions (collectives.py), as in Megatron-LM. Parameter
names are unchanged, and every sharded parameter carries `tp_shard` (which slice of the full tensor
it is): `take_shard` cuts a full tensor to it, `TPShard.start`/`stop` say where a shard lies in the full
tensor. Layers may be swapped on the meta device (nothing allocated) and filled later. The
vocabulary is padded to a multiple of 64*tp; padded logits are masked out of the loss and stripped
on consolidation.

Sequence parallelism (`sequence_parallel=True`, Megatron's): between the TP regions (norms, residual
adds) each rank holds 1/tp of the sequence, (B, T/tp, d). A sub-block's input is all-gathered
(gather_from_sp; backward reduce-scatter) and its output reduce-scattered (backward all-gather): the same
bytes as the two all-reduces, with norm activations 1/tp the size. The embedding's output is split,
the head's input gathered. A norm then sees only this rank's tokens, so the gradients of its weights
(and of row-parallel biases) are summed over the group (SequenceParallelNorm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.model.collectives import (
    Collective,
    copy_to_tp,
    gather_from_sp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
    sum_grad_over_tp,
)
from pipeline.model.gpt import GPT, Embedding, Head
from pipeline.model.layers import NORMS
from pipeline.model.loss import ChunkedCrossEntropy, mask_padding_, softmax_grad_

PAD_MULTIPLE = 64


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class TPShard:
    """Slice `rank` of `size` equal slices along `dim` of the full tensor zero-padded to `padded` along dim;
    the full tensor itself is `length` long there (the rest is vocabulary padding)."""

    dim: int
    rank: int
    size: int
    length: int
    padded: int

    @property
    def start(self) -> int:
        return self.rank * (self.padded // self.size)

    @property
    def stop(self) -> int:
        return self.start + self.padded // self.size


def take_shard(full: torch.Tensor, shard: TPShard | None) -> torch.Tensor:
    """This rank's slice of a full tensor (padding rows added as zeros); the tensor itself when unsharded."""
    if shard is None:
        return full
    if full.size(shard.dim) < shard.padded:
        pad = list(full.shape)
        pad[shard.dim] = shard.padded - full.size(shard.dim)
        full = torch.cat([full, full.new_zeros(pad)], dim=shard.dim)
    return full.narrow(shard.dim, shard.start, shard.stop - shard.start).clone().contiguous()


def _split(full: torch.Tensor, dim: int, rank: int, size: int, padded: int | None = None) -> nn.Parameter:
    """A parameter holding this rank's slice of `full` (works on the meta device), tagged with its TPShard
    for DeepSpeed (grad norm) and for consolidation."""
    length = full.size(dim)
    shard = TPShard(dim, rank, size, length, padded or length)
    p = nn.Parameter(take_shard(full.detach(), shard))
    p.tensor_model_parallel = True
    p.tp_shard = shard
    return p


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local; W split along its output features. Its input comes through the
    sub-block's (or head's) copy_to_tp or gather_from_sp (`tp_input`), which owns the input-gradient collective."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    @classmethod
    def from_full(cls, full: nn.Linear, rank: int, size: int, pad_to: int | None = None) -> ColumnParallelLinear:
        bias = _split(full.bias, 0, rank, size) if full.bias is not None else None
        return cls(_split(full.weight, 0, rank, size, pad_to), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b; W split along its input features, bias replicated.
    Sequence parallel: reduce-scatter instead, and the bias (added to this rank's tokens only) has its
    gradient summed over the group."""

    def __init__(self, full: nn.Linear, group, rank: int, size: int, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _split(full.weight, 1, rank, size)
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.sequence_parallel:
            y = reduce_from_tp(y, self.group)
            return y + self.bias if self.bias is not None else y
        y = reduce_scatter_to_sp(y, self.group)
        return y + sum_grad_over_tp(self.bias, self.group) if self.bias is not None else y


class SequenceParallelNorm(nn.Module):
    """LayerNorm / RMSNorm over this rank's tokens (sequence parallelism). Its weight and bias meet only
    1/tp of the sequence, so their gradients are summed over the group (sum_grad_over_tp on the parameters).
    A per-head norm (model.qk_norm: Attention.PER_HEAD) is wrapped the same way at any TP: it sees every token
    but only this rank's heads, so its gradient too is a part of the whole one."""

    def __init__(self, norm: nn.LayerNorm | nn.RMSNorm, group):
        super().__init__()
        self.group, self.shape, self.eps = group, tuple(norm.normalized_shape), norm.eps
        self.layer_norm = isinstance(norm, nn.LayerNorm)
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = sum_grad_over_tp(self.weight, self.group)
        if not self.layer_norm:
            return F.rms_norm(x, self.shape, w, self.eps)
        b = sum_grad_over_tp(self.bias, self.group) if self.bias is not None else None
        return F.layer_norm(x, self.shape, w, b, self.eps)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [start, end) of the (padded) table; others contribute zeros."""

    def __init__(self, full: nn.Embedding, group, rank: int, size: int, padded: int):
        super().__init__()
        self.group = group
        self.weight = _split(full.weight, 0, rank, size, padded)
        self.start = rank * (padded // size)
        self.end = self.start + padded // size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        outside = (idx < self.start) | (idx >= self.end)
        local = (idx - self.start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(x, self.group)


# --------------------------------------------------------------------------- loss


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy over logits split along the vocabulary. One fp32 copy of the logits is made
    and becomes its own gradient in place (loss.softmax_grad_): no other full-size copy."""

    @staticmethod
    def forward(ctx, logits, targets, start, vocab, group):  # logits (N, V_local), targets (N,)
        work = logits.float() if logits.dtype != torch.float32 else logits.clone()
        losses = softmax_grad_(mask_padding_(work, start, vocab), targets, start, group)
        ctx.save_for_backward(work)
        return losses

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return g.mul_(grad.unsqueeze(-1)), None, None, None, None


class VocabParallelCrossEntropy:
    """Drop-in for `gpt.cross_entropy` on vocab-sharded logits: mean over targets != -100."""

    def __init__(self, group, rank: int, vocab: int, padded: int, size: int):
        self.group, self.vocab = group, vocab
        self.local = padded // size
        self.start = rank * self.local

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.reshape(-1)
        valid = targets != -100
        losses = _VocabParallelCE.apply(logits.reshape(-1, logits.size(-1)), targets.masked_fill(~valid, 0),
                                        self.start, self.vocab, self.group)
        return (losses * valid).sum() / valid.sum().clamp(min=1)

    def chunked(self, chunk: int, cap: float | None = None) -> ChunkedCrossEntropy:
        """The same loss taken from the hidden states, `chunk` tokens at a time (no full logits), soft-capped at
        `cap` (model.logit_softcap)."""
        return ChunkedCrossEntropy(chunk, self.vocab, self.start, self.group, cap)


# --------------------------------------------------------------------------- applying it


def padded_vocab(vocab: int, tp: int) -> int:
    step = PAD_MULTIPLE * tp
    return math.ceil(vocab / step) * step




def tp_input(group, sequence_parallel: bool) -> Collective:
    """The shared input of column-parallel layers (a sub-block's q/k/v or gate/up, the head): the full
    sequence gathered under sequence parallelism, else an identity whose backward all-reduces."""
    return Collective(gather_from_sp if sequence_parallel else copy_to_tp, group)


def parallelize_tp(module: nn.Module, group, vocab_size: int, tied: bool, sequence_parallel: bool = False) -> nn.Module:
    """Swap every plain layer under `module` for its tensor-parallel version, in place.

    `module` may be the whole GPT or one pipeline stage's layer (Embedding, Block, Head), on the meta
    device or not; the loss to pair it with is `VocabParallelCrossEntropy`. Replicated parameters
    (norms, row biases) are marked `model_parallel` on TP rank 0 only, so the gradient norm counts
    each of them once.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    padded = padded_vocab(vocab_size, size)
    for parent in list(module.modules()):
        if hasattr(parent, "IN_PROJ"):  # a sub-block (pipeline/model/layers.py): its roles are its TP plan
            parent.tp_input = tp_input(group, sequence_parallel)
            for name in parent.IN_PROJ:  # split by output features
                setattr(parent, name, ColumnParallelLinear.from_full(getattr(parent, name), rank, size))
            for name in parent.OUT_PROJ:  # split by input features
                setattr(parent, name, RowParallelLinear(getattr(parent, name), group, rank, size, sequence_parallel))
            for name in getattr(parent, "PER_HEAD", ()):  # whole on every rank, gradients summed over the group
                if getattr(parent, name) is not None:
                    setattr(parent, name, SequenceParallelNorm(getattr(parent, name), group))
        elif isinstance(parent, Embedding):
            parent.wte = VocabParallelEmbedding(parent.wte, group, rank, size, padded)
            if sequence_parallel:
                parent.tp_output = Collective(scatter_to_sp, group)
        elif isinstance(parent, Head):
            parent.tp_input = tp_input(group, sequence_parallel)
            if not (tied and isinstance(module, GPT)):
                parent.lm_head = ColumnParallelLinear.from_full(parent.lm_head, rank, size, padded)
        if sequence_parallel:
            for name, child in list(parent.named_children()):
                if isinstance(child, tuple(NORMS.values())):
                    setattr(parent, name, SequenceParallelNorm(child, group))
    if isinstance(module, GPT) and tied:
        module.head.lm_head = ColumnParallelLinear(module.embed.wte.weight, None)
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = rank == 0
    return module
