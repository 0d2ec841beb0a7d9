"""The collectives of tensor and sequence parallelism, each a collective and its adjoint in backward (Megatron-LM's):

    copy_to_tp           forward identity,                 backward all-reduce     (a column-parallel input)
    sum_grad_over_tp     the same, the sum in fp32                                 (norm weights under SP)
    reduce_from_tp       forward all-reduce,               backward identity       (a row-parallel output)
    gather_from_sp       forward all-gather of the seq.,   backward reduce-scatter (sequence parallel input)
    reduce_scatter_to_sp forward reduce-scatter,           backward all-gather     (sequence parallel output)
    scatter_to_sp        forward this rank's slice,        backward all-gather     (after the embedding)

Sequence-parallel activations are (B, T, d) split along T. Their all-gather and reduce-scatter are torch's
functional collectives (they return new tensors, which selective checkpointing can keep, and are what
torch.compile traces). `Collective` makes any of them a layer (a sub-block's `tp_input`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_reduce_fp32(x: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(x.float(), group).to(x.dtype)  # rounded once, not at every step of the ring


_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the newer name
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:  # (B, T/tp, d) -> (B, T, d)
    return funcol.wait_tensor(_all_gather(x.contiguous(), 1, group))


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:  # (B, T, d) summed over ranks -> (B, T/tp, d)
    return funcol.wait_tensor(_reduce_scatter(x.contiguous(), "sum", 1, group))


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:  # (B, T, d) -> this rank's (B, T/tp, d)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.size(1) % size:
        raise ValueError(f"sequence parallelism: sequence length {x.size(1)} is not a multiple of tp {size}")
    step = x.size(1) // size
    return x[:, rank * step:(rank + 1) * step].clone()  # its own storage: a view would keep all of x alive


class _Pair(torch.autograd.Function):
    """y = forward(x, group); the gradient of x = backward(dy, group)."""

    @staticmethod
    def forward(ctx, x, group, forward, backward):
        ctx.group, ctx.backward = group, backward
        return forward(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward(grad, ctx.group), None, None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _Pair.apply(x, group, _identity, _all_reduce)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _Pair.apply(x, group, _all_reduce, _identity)


def sum_grad_over_tp(p: torch.Tensor, group) -> torch.Tensor:
    """A replicated parameter used on 1/tp of the tokens: its gradient summed over the group, in fp32."""
    return _Pair.apply(p, group, _identity, _all_reduce_fp32)


def gather_from_sp(x: torch.Tensor, group) -> torch.Tensor:
    return _Pair.apply(x, group, _gather_seq, _reduce_scatter_seq)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return _Pair.apply(x, group, _reduce_scatter_seq, _gather_seq)


def scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return _Pair.apply(x, group, _split_seq, _gather_seq)


class Collective(nn.Module):
    """One of the above as a layer: `Collective(copy_to_tp, group)` is the shared input of a sub-block's
    column-parallel layers, whose input gradients autograd sums first, so one all-reduce serves them all."""

    def __init__(self, fn, group):
        super().__init__()
        self.fn, self.group = fn, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.group)

    def extra_repr(self) -> str:
        return self.fn.__name__
