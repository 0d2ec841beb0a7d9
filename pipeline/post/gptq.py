"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), written for Kiln's plain GPT; it stores its codes in the packed format (packed.py, which
also holds the round-to-nearest baseline with the same grouping).

Per Linear layer, GPTQ minimises ||WX - QX||² using the Hessian H = 2XXᵀ of the
layer's calibration inputs: columns are quantized one at a time and the error of
each is spread over the not-yet-quantized columns through the upper Cholesky
factor of H⁻¹ (the paper's Algorithm 1). Updates are applied lazily in blocks of
128 columns, act-order visits columns by decreasing diag(H), and groups of
`group_size` input columns share an asymmetric min-max scale/zero point.
Blocks are processed in order, each one seeing inputs produced by the
already-quantized blocks before it ("sequential" in the paper's code).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import QuantizeConfig
from pipeline.console import log, progress
from pipeline.model.layers import linear_stages
from pipeline.post import packed
from pipeline.post.packed import QuantizedWeight, group_width, minmax_params


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128, act_order: bool = True,
         damp: float = 0.01, block: int = 128) -> QuantizedWeight:
    """Quantize one weight (out, in) given H (in, in) = 2/N Σ xxᵀ of its inputs (Algorithm 1 of the paper)."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone().to(W.device)
    rows, cols = W.shape
    maxq = 2**bits - 1
    gs = group_width(group_size, cols)

    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    # upper Cholesky factor of H^-1: row i holds what quantizing column i does to columns > i
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    scales = torch.zeros(rows, (cols + gs - 1) // gs, device=W.device)
    zeros = torch.zeros_like(scales)
    scale = zero = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # a new group starts: its parameters come from the current (updated) weights
                end = col + gs
                group = torch.cat([W1[:, i:min(end - i1, i2 - i1)], W[:, i2:max(i2, end)]], dim=1)
                scale, zero = minmax_params(group, maxq)
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            Q[:, col] = q
            err = (w - (q - zero) * scale) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update of all later columns

    inv = torch.argsort(perm)
    g_idx = (torch.arange(cols, device=W.device) // gs)[inv].int()
    return QuantizedWeight(Q[:, inv].to(torch.uint8).cpu(), scales.half().cpu(), zeros.to(torch.uint8).cpu(),
                           g_idx.cpu(), bits)


class HessianHook:
    """Accumulates H = 2/N Σ xxᵀ over every row x fed to a Linear layer (a running mean, as in the paper's code)."""

    def __init__(self, layer: nn.Linear):
        self.H = torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device)
        self.n = 0
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        k = x.shape[0]
        if not k:  # an expert called with none of this batch's tokens
            return
        self.H *= self.n / (self.n + k)
        self.n += k
        x = x * (2 / self.n) ** 0.5
        self.H += x.T @ x

    def remove(self) -> None:
        self.handle.remove()


def block_stages(block: nn.Module) -> list[list[str]]:
    """Linear layers of a block in the order their inputs become final: q/k/v, then o, then the MLP."""
    names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    ordered = [[n for n in s if n in names] for s in linear_stages(block)]
    ordered = [s for s in ordered if s]
    rest = [n for n in names if not any(n in s for s in ordered)]
    return ordered + ([rest] if rest else [])


@torch.no_grad()
def _run(block: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [block(x) for x in xs]


@torch.no_grad()
def quantize_model(model: nn.Module, calib: torch.Tensor, bits: int = 4, group_size: int = 128, act_order: bool = True,
                   damp: float = 0.01, quantize_head: bool = False, batch_size: int = 8,
                   device: str = "cpu") -> dict[str, QuantizedWeight]:
    """Quantize every block Linear (and the head if asked) in place with GPTQ; return their codes.

    GPTQ runs block by block: a block's layers see inputs that went through the already-quantized
    blocks before it, and inside a block each stage (q/k/v, o, MLP in, MLP out) is quantized before
    the next stage's Hessian is collected.
    """
    model.eval().to(device)
    out: dict[str, QuantizedWeight] = {}

    def put(name: str, layer: nn.Linear, qw: QuantizedWeight) -> None:
        out[name] = qw
        packed.replace_weight(layer, qw)

    xs = [model.embed(b.to(device)) for b in calib.split(batch_size)]
    with progress("gptq blocks", total=len(model.blocks), unit="block") as advance:
        for i, block in enumerate(model.blocks):
            modules = dict(block.named_modules())
            for stage in block_stages(block):
                hooks = {n: HessianHook(modules[n]) for n in stage}
                _run(block, xs)
                for n, hook in hooks.items():
                    hook.remove()
                    layer = modules[n]
                    # an expert no calibration token was routed to: no statistics to weigh its error by, so
                    # every input counts alike (round to nearest, GPTQ's groups), rather than all inputs "dead"
                    h = hook.H if hook.n else torch.eye(layer.in_features, device=hook.H.device)
                    put(f"blocks.{i}.{n}", layer, gptq(layer.weight, h, bits, group_size, act_order, damp))
            xs = _run(block, xs)  # the next block sees this block's quantized outputs
            advance(1)
    if quantize_head:
        hook = HessianHook(model.head.lm_head)
        for x in xs:
            model.head(x)
        hook.remove()
        put("head.lm_head", model.head.lm_head, gptq(model.head.lm_head.weight, hook.H, bits, group_size, act_order, damp))
    log.info("quantized %d layers to %d bits (gptq, group size %d)", len(out), bits, group_size)
    return out


def quantize(model: nn.Module, cfg: QuantizeConfig, layers: list[str], calib: torch.Tensor) -> tuple[dict, dict]:
    """Method "gptq": the block Linears (and the head when `layers` has it); returns (tensors, quantization fields)."""
    qweights = quantize_model(model, calib, cfg.bits, cfg.group_size, cfg.act_order, cfg.damp,
                              "head.lm_head" in layers, device=cfg.device)
    if set(qweights) != set(layers):
        raise ValueError(f"gptq quantized {sorted(set(qweights) ^ set(layers))[:3]} against the layers asked for")
    return packed.state(model, qweights), {"group_size": cfg.group_size, "act_order": cfg.act_order, "damp": cfg.damp}
