"""The collectives of tensor and sequence parallelism, each a pair of autograd functions (Megatron-LM's):

    copy_to_tp           forward identity,                 backward all-reduce     (a column-parallel input)
    reduce_from_tp       forward all-reduce,               backward identity       (a row-parallel output)
    gather_from_sp       forward all-gather of the seq.,   backward reduce-scatter (sequence parallel input)
    reduce_scatter_to_sp forward reduce-scatter,           backward all-gather     (sequence parallel output)
    scatter_to_sp        forward this rank's slice,        backward all-gather     (after the embedding)

Sequence-parallel activations are (B, T, d) split along T. Their all-gather and reduce-scatter are torch's
functional collectives (they return new tensors, which selective checkpointing can keep, and are what
torch.compile traces).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


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


class _GatherFromSP(torch.autograd.Function):
    """Forward all-gather of the sequence, backward reduce-scatter: the input of a column-parallel region."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    """Forward reduce-scatter of the sequence, backward all-gather: the output of a row-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    """Forward keep this rank's slice of the sequence, backward all-gather: after the embedding."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def gather_from_sp(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterToSP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterToSP.apply(x, group)
