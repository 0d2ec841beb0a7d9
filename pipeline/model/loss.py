"""Token cross-entropy without full-size copies of the B x T x V logits.

One step owns the arithmetic: `softmax_grad_` turns a block of fp32 logits, in place, into the
gradient of each token's loss (softmax minus one-hot) and returns the losses. With the vocabulary
split over a tensor-parallel group it is Megatron's algorithm (a max and one stacked sum all-reduced
across the group; targets outside a rank's slice count as zero there).

Training (parallelize.py) takes the loss straight from the final hidden states: `ChunkedCrossEntropy`
projects `chunk` tokens at a time onto the vocabulary, and computes the loss and both input
gradients right there (Liger-kernel style), so only one chunk's logits ever exist and backward has
nothing to recompute: it scales the stored gradients by the incoming one. The logits-based path
(pipeline parallelism, evaluation) keeps one fp32 copy instead of five.

Logit soft-capping (model.logit_softcap, Gemma 2's final_logit_softcapping) is `softcap`; the head applies it to
the logits it makes, and the chunked loss, which makes its own, applies it to each chunk with its derivative.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap): every logit inside (-cap, cap), near the identity for small ones; None: as is."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, start: int = 0, group=None) -> torch.Tensor:
    """In place: fp32 `logits` (N, V_local) become d loss_i / d logits; returns the N token losses.

    `start` is the first vocabulary id of this slice (tensor parallelism: `group` holds the others)."""
    top = logits.max(dim=-1).values
    if group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(top.unsqueeze(-1))
    local = targets - start
    inside = (local >= 0) & (local < logits.size(-1))
    local = local.masked_fill(~inside, 0).unsqueeze(-1)
    picked = logits.gather(-1, local).squeeze(-1).masked_fill(~inside, 0.0)
    logits.exp_()
    sums = torch.stack([picked, logits.sum(dim=-1)])
    if group is not None:
        dist.all_reduce(sums, group=group)
    picked, total = sums
    logits.div_(total.unsqueeze(-1))
    logits.scatter_add_(-1, local, -inside.to(logits.dtype).unsqueeze(-1))
    return total.log() - picked


def mask_padding_(logits: torch.Tensor, start: int, vocab: int | None) -> torch.Tensor:
    """Vocabulary padding (ids >= vocab) never wins: -inf in place."""
    if vocab is not None and start + logits.size(-1) > vocab:
        logits[:, max(vocab - start, 0):] = float("-inf")
    return logits


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean loss of h @ W^T against targets, chunk by chunk; the gradients are made in forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, start, vocab, group, needs_grad, cap):
        valid = targets != -100
        scale = valid.float() / valid.sum().clamp(min=1)
        targets = targets.masked_fill(~valid, 0)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for s in range(0, h.size(0), chunk):
            hc = h[s:s + chunk]
            logits = (hc @ weight.t()).float()
            if cap is not None:  # d cap*tanh(z/cap) / dz = 1 - tanh(z/cap)^2: the tanh is kept for it
                tanh = logits.div_(cap).tanh_()
                logits = tanh * cap
            logits = mask_padding_(logits, start, vocab)
            loss += (softmax_grad_(logits, targets[s:s + chunk], start, group) * scale[s:s + chunk]).sum()
            if needs_grad:
                if cap is not None:
                    logits.mul_(tanh.square_().neg_().add_(1.0))
                g = logits.mul_(scale[s:s + chunk].unsqueeze(-1)).to(h.dtype)
                grad_h[s:s + chunk] = g @ weight
                if g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), hc)  # no weight-sized temporary
                else:
                    grad_w += g.t() @ hc
            logits = g = tanh = None  # freed before the next chunk's are made: one chunk's logits at a time
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors  # made for this one backward: scaled in place
        # under TP grad_h is this vocabulary slice's share of d loss / d h: the head's tp_input sums the shares
        return (grad_h.mul_(grad.to(grad_h.dtype)), grad_w.mul_(grad.to(grad_w.dtype)),
                None, None, None, None, None, None, None)


class ChunkedCrossEntropy:
    """Mean token loss (targets -100 ignored) from final hidden states (..., d) and the output weight
    (V_local, d), `chunk` tokens at a time. Under tensor parallelism the weight is this rank's vocabulary
    slice starting at `start`, `vocab` real ids (the rest is padding). `cap`: model.logit_softcap."""

    def __init__(self, chunk: int, vocab: int | None = None, start: int = 0, group=None, cap: float | None = None):
        self.chunk, self.vocab, self.start, self.group, self.cap = chunk, vocab, start, group, cap

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        return _LinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), self.chunk,
                                         self.start, self.vocab, self.group, needs_grad, self.cap)
