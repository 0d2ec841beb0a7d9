"""Megatron-style tensor parallelism, applied on top of the plain GPT (torchtitan style).

The plain model (gpt.py) knows nothing about ranks. `parallelize_tp(module, group)`
walks it and swaps layers for sharded versions built from the full weights:

    attention wq/wk/wv, MLP w1/w3/fc  -> ColumnParallelLinear (output features split)
    attention wo, MLP w2/proj         -> RowParallelLinear    (input features split, all-reduce)
    token embedding wte               -> VocabParallelEmbedding (vocab rows split)
    lm_head                           -> ColumnParallelLinear over the (padded) vocab
    loss                              -> vocab_parallel_cross_entropy (no full-vocab gather)

Each collective is a pair of autograd functions (identity forward / all-reduce
backward and the reverse), as in Megatron-LM. Parameter names are unchanged, so a
sharded state dict consolidates by concatenating along `param.tp_dim`.
The vocabulary is padded to a multiple of 64*tp; padded logits are masked out of
the loss and stripped on consolidation.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return t.chunk(size, dim=dim)[rank].clone().contiguous()


def _mark(p: nn.Parameter, dim: int, vocab: int | None = None) -> nn.Parameter:
    """Tell DeepSpeed (grad norm) and consolidation how this parameter is split."""
    p.tensor_model_parallel = True
    p.tp_dim = dim
    if vocab is not None:
        p.tp_vocab = vocab  # true vocab size: rows past it are padding
    return p


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local; W split along its output features."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group):
        super().__init__()
        self.group, self.weight, self.bias = group, weight, bias

    @classmethod
    def from_full(cls, full: nn.Linear, group, rank: int, size: int, pad_to: int | None = None,
                  vocab: int | None = None) -> ColumnParallelLinear:
        weight = full.weight.detach()
        if pad_to is not None and pad_to > weight.size(0):
            weight = torch.cat([weight, weight.new_zeros(pad_to - weight.size(0), weight.size(1))])
        bias = None
        if full.bias is not None:
            bias = _mark(nn.Parameter(_shard(full.bias.detach(), 0, rank, size)), 0)
        return cls(_mark(nn.Parameter(_shard(weight, 0, rank, size)), 0, vocab), bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b; W split along its input features, bias replicated."""

    def __init__(self, full: nn.Linear, group, rank: int, size: int):
        super().__init__()
        self.group = group
        self.weight = _mark(nn.Parameter(_shard(full.weight.detach(), 1, rank, size)), 1)
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [start, end) of the (padded) table; others contribute zeros."""

    def __init__(self, full: nn.Embedding, group, rank: int, size: int, padded: int):
        super().__init__()
        self.group = group
        vocab = full.weight.size(0)
        weight = full.weight.detach()
        weight = torch.cat([weight, weight.new_zeros(padded - vocab, weight.size(1))])
        self.weight = _mark(nn.Parameter(_shard(weight, 0, rank, size)), 0, vocab)
        self.start = rank * (padded // size)
        self.end = self.start + padded // size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        outside = (idx < self.start) | (idx >= self.end)
        local = (idx - self.start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(x, self.group)


# --------------------------------------------------------------------------- loss


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy over logits split along the vocabulary (Megatron's algorithm)."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):  # logits (N, V_local) fp32, targets (N,)
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local_t = targets - start
        inside = (local_t >= 0) & (local_t < logits.size(-1))
        local_t = local_t.masked_fill(~inside, 0)
        picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
        dist.all_reduce(picked, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, inside)
        return sum_exp.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, inside = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.size(0), device=g.device)
        g[rows, local_t] -= inside.to(g.dtype)
        return g * grad.unsqueeze(-1), None, None, None


class VocabParallelCrossEntropy:
    """Drop-in for `gpt.cross_entropy` on vocab-sharded logits: mean over targets != -100."""

    def __init__(self, group, rank: int, vocab: int, padded: int, size: int):
        self.group, self.vocab = group, vocab
        self.local = padded // size
        self.start = rank * self.local

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float().reshape(-1, logits.size(-1))
        ids = torch.arange(self.start, self.start + self.local, device=logits.device)
        logits = logits.masked_fill(ids >= self.vocab, float("-inf"))  # padding never wins
        targets = targets.reshape(-1)
        valid = targets != -100
        losses = _VocabParallelCE.apply(logits, targets.masked_fill(~valid, 0), self.start, self.group)
        return (losses * valid).sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------- applying it


def padded_vocab(vocab: int, tp: int) -> int:
    step = PAD_MULTIPLE * tp
    return math.ceil(vocab / step) * step


COLUMN = ("wq", "wk", "wv", "w1", "w3", "fc")
ROW = ("wo", "w2", "proj")


def parallelize_tp(module: nn.Module, group, vocab_size: int, tied: bool) -> nn.Module:
    """Swap every plain layer under `module` for its tensor-parallel version, in place.

    `module` may be the whole GPT or one pipeline stage's layer (Embedding, Block, Head).
    Replicated parameters (norms, row biases) are marked `model_parallel` on TP rank 0
    only, so DeepSpeed's gradient norm counts each of them once.
    """
    from pipeline.model.gpt import GPT, Attention, Embedding, GeluMLP, Head, SwiGLU

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    padded = padded_vocab(vocab_size, size)
    for parent in list(module.modules()):
        if isinstance(parent, (Attention, SwiGLU, GeluMLP)):
            for name, child in list(parent.named_children()):
                if name in COLUMN:
                    setattr(parent, name, ColumnParallelLinear.from_full(child, group, rank, size))
                elif name in ROW:
                    setattr(parent, name, RowParallelLinear(child, group, rank, size))
        elif isinstance(parent, Embedding):
            parent.wte = VocabParallelEmbedding(parent.wte, group, rank, size, padded)
        elif isinstance(parent, Head) and not (tied and isinstance(module, GPT)):
            parent.lm_head = ColumnParallelLinear.from_full(parent.lm_head, group, rank, size, padded, vocab_size)
    if isinstance(module, GPT):
        if tied:
            module.head.lm_head = ColumnParallelLinear(module.embed.wte.weight, None, group)
        module.loss_fn = VocabParallelCrossEntropy(group, rank, vocab_size, padded, size)
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = rank == 0
    return module


def gather_tp(t: torch.Tensor, p: nn.Parameter | None, group) -> torch.Tensor:
    """The full tensor of a possibly sharded parameter (padding stripped); call on every TP rank."""
    dim = getattr(p, "tp_dim", None) if p is not None else None
    if dim is None or group is None or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    full = torch.cat(parts, dim=dim)
    vocab = getattr(p, "tp_vocab", None)
    return full[:vocab] if vocab is not None else full
