"""Megatron-style tensor parallelism, applied on top of the plain GPT (torchtitan style).

The plain model (gpt.py) knows nothing about ranks. `parallelize_tp(module, group)`
walks it and swaps layers for sharded versions built from the full weights:

    attention wq/wk/wv, MLP w1/w3/fc  -> ColumnParallelLinear (output features split), fed by the
                                         sub-block's one CopyToTP (`tp_input`)
    attention wo, MLP w2/proj         -> RowParallelLinear    (input features split, all-reduce)
    token embedding wte               -> VocabParallelEmbedding (vocab rows split)
    lm_head                           -> ColumnParallelLinear over the (padded) vocab
    loss                              -> VocabParallelCrossEntropy (no full-vocab gather)

Each collective is a pair of autograd functions (identity forward / all-reduce
backward and the reverse), as in Megatron-LM. Parameter names are unchanged, and
every sharded parameter carries `tp_shard` (which slice of the full tensor it is):
`take_shard` cuts a full tensor to it, `TPShard.place` says where a shard lies in
the full tensor. Layers may be swapped on the meta device (nothing allocated) and
filled later. The vocabulary is padded to a multiple of 64*tp; padded logits are
masked out of the loss and stripped on consolidation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.model.loss import ChunkedCrossEntropy, mask_padding_, softmax_grad_

PAD_MULTIPLE = 64


# --------------------------------------------------------------------------- collectives


class _CopyToTP(torch.autograd.Function):
    """Forward identity, backward all-reduce: the input of a column-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward all-reduce, backward identity: the output of a row-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


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


class CopyToTP(nn.Module):
    """The shared input of a sub-block's column-parallel layers (q/k/v, gate/up): autograd sums their
    input gradients first, so one all-reduce serves them all (Megatron's count)."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(x, self.group)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local; W split along its output features. `copy_input`: this layer
    all-reduces its own input gradient (False where a CopyToTP in front of the sub-block does it)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, copy_input: bool = True):
        super().__init__()
        self.group, self.weight, self.bias, self.copy_input = group, weight, bias, copy_input

    @classmethod
    def from_full(cls, full: nn.Linear, group, rank: int, size: int, pad_to: int | None = None,
                  copy_input: bool = True) -> ColumnParallelLinear:
        bias = _split(full.bias, 0, rank, size) if full.bias is not None else None
        return cls(_split(full.weight, 0, rank, size, pad_to), bias, group, copy_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group) if self.copy_input else x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b; W split along its input features, bias replicated."""

    def __init__(self, full: nn.Linear, group, rank: int, size: int):
        super().__init__()
        self.group = group
        self.weight = _split(full.weight, 1, rank, size)
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


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

    def chunked(self, chunk: int) -> ChunkedCrossEntropy:
        """The same loss taken from the hidden states, `chunk` tokens at a time (no full logits)."""
        return ChunkedCrossEntropy(chunk, self.vocab, self.start, self.group)


# --------------------------------------------------------------------------- applying it


def padded_vocab(vocab: int, tp: int) -> int:
    step = PAD_MULTIPLE * tp
    return math.ceil(vocab / step) * step


COLUMN = ("wq", "wk", "wv", "w1", "w3", "fc")
ROW = ("wo", "w2", "proj")


def parallelize_tp(module: nn.Module, group, vocab_size: int, tied: bool) -> nn.Module:
    """Swap every plain layer under `module` for its tensor-parallel version, in place.

    `module` may be the whole GPT or one pipeline stage's layer (Embedding, Block, Head), on the meta
    device or not; the loss to pair it with is `VocabParallelCrossEntropy`. Replicated parameters
    (norms, row biases) are marked `model_parallel` on TP rank 0 only, so the gradient norm counts
    each of them once.
    """
    from pipeline.model.gpt import GPT, Attention, Embedding, GeluMLP, Head, SwiGLU

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    padded = padded_vocab(vocab_size, size)
    for parent in list(module.modules()):
        if isinstance(parent, (Attention, SwiGLU, GeluMLP)):
            parent.tp_input = CopyToTP(group)
            for name, child in list(parent.named_children()):
                if name in COLUMN:
                    setattr(parent, name, ColumnParallelLinear.from_full(child, group, rank, size, copy_input=False))
                elif name in ROW:
                    setattr(parent, name, RowParallelLinear(child, group, rank, size))
        elif isinstance(parent, Embedding):
            parent.wte = VocabParallelEmbedding(parent.wte, group, rank, size, padded)
        elif isinstance(parent, Head) and not (tied and isinstance(module, GPT)):
            parent.lm_head = ColumnParallelLinear.from_full(parent.lm_head, group, rank, size, padded)
    if isinstance(module, GPT) and tied:
        module.head.lm_head = ColumnParallelLinear(module.embed.wte.weight, None, group)
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = rank == 0
    return module

