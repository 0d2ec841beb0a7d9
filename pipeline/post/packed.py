"""The "packed" format: 2-8 bit weight codes in safetensors (no pickles), written by GPTQ and round-to-nearest,
and dequantized into a plain GPT on load.

Layout per quantized Linear `<name>` (AutoGPTQ-like, but plain tensors):
  <name>.qweight  uint8 (out, ceil(in/2)) two 4-bit codes per byte, low nibble first
                  (bits <= 4; codes of 5-8 bits are stored one per byte, shape (out, in))
  <name>.scales   fp16 (out, groups)     <name>.zeros  uint8 (out, groups)
  <name>.g_idx    int32 (in,)            group of each input column (act-order permutes groups)
w = (q - zeros[:, g_idx]) * scales[:, g_idx]: asymmetric min-max per group of input columns.
Loading dequantizes into ordinary Linear weights, so every later stage (eval, generate, distill)
sees a plain GPT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import KilnError, ModelConfig, QuantizeConfig
from pipeline.model.gpt import GPT
from pipeline.model.io import WEIGHTS, load_checked, load_safetensors


@dataclass
class QuantizedWeight:
    """Integer codes and the parameters that turn them back into weights: w = (q - zero) * scale."""

    q: torch.Tensor  # (out, in) uint8 codes in [0, 2^bits)
    scales: torch.Tensor  # (out, groups) fp16
    zeros: torch.Tensor  # (out, groups) uint8
    g_idx: torch.Tensor  # (in,) int32: group of each input column
    bits: int

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        return ((self.q.float() - self.zeros.float()[:, g]) * self.scales.float()[:, g]).to(dtype)


def minmax_params(w: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scale and integer zero point per row of `w` (out, cols).

    The scale is rounded to fp16 here, because that is how it is stored."""
    xmin, xmax = w.min(dim=1).values, w.max(dim=1).values
    same = xmax <= xmin
    xmin, xmax = torch.where(same, xmin - 1e-3, xmin), torch.where(same, xmax + 1e-3, xmax)
    scale = ((xmax - xmin) / maxq).half().float()
    zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of the columns of `w` (out, cols) given per-row scale and zero (out,)."""
    return torch.clamp(torch.round(w / scale.unsqueeze(1)) + zero.unsqueeze(1), 0, maxq)


def group_width(group_size: int, cols: int) -> int:
    """Input columns per group: `group_size`, or all of them (per output channel) for 0 or a size >= cols."""
    return group_size if 0 < group_size < cols else cols


def rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedWeight:
    """Round-to-nearest with the same grouping and parameters as GPTQ: the baseline it must beat."""
    w = weight.detach().float()
    rows, cols = w.shape
    gs = group_width(group_size, cols)
    maxq = 2**bits - 1
    q = torch.empty_like(w)
    scales, zeros = [], []
    for g0 in range(0, cols, gs):
        scale, zero = minmax_params(w[:, g0:g0 + gs], maxq)
        q[:, g0:g0 + gs] = quantize_codes(w[:, g0:g0 + gs], scale, zero, maxq)
        scales.append(scale)
        zeros.append(zero)
    g_idx = (torch.arange(cols) // gs).int()
    return QuantizedWeight(q.to(torch.uint8), torch.stack(scales, 1).half(), torch.stack(zeros, 1).to(torch.uint8),
                           g_idx, bits)


def replace_weight(layer: nn.Linear, qw: QuantizedWeight) -> None:
    """Put the dequantized weight in place (a new Parameter: a quantized head no longer shares the embedding)."""
    layer.weight = nn.Parameter(qw.dequantize(layer.weight.dtype).to(layer.weight.device), requires_grad=False)


@torch.no_grad()
def quantize_rtn(model: GPT, cfg: QuantizeConfig, layers: list[str], calib=None) -> tuple[dict, dict]:
    """Method "rtn": every layer in `layers` rounded to nearest, in place; returns (tensors, quantization fields)."""
    qweights = {}
    for name in layers:
        layer = model.get_submodule(name)
        qweights[name] = rtn(layer.weight, cfg.bits, cfg.group_size)
        replace_weight(layer, qweights[name])
    return state(model, qweights), {"group_size": cfg.group_size}


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (out, in) -> bytes; two codes per byte when they fit in a nibble."""
    q = q.to(torch.uint8)
    if bits > 4:
        return q.contiguous()
    if q.shape[1] % 2:
        q = torch.cat([q, torch.zeros(q.shape[0], 1, dtype=torch.uint8)], dim=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    if bits > 4:
        return packed[:, :cols]
    out = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1)
    return out[:, :cols]


def state(model: GPT, qweights: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """The tensors of a packed MODEL dir: the non-quantized ones as they are, each quantized layer as codes."""
    out = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        layer = name.removesuffix(".weight")
        if layer in qweights and name.endswith(".weight"):
            continue
        if tensor.data_ptr() in seen:  # the tied head, stored once as the embedding
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().cpu().contiguous()
    for layer, qw in qweights.items():
        out[f"{layer}.qweight"] = pack(qw.q.cpu(), qw.bits)
        out[f"{layer}.scales"] = qw.scales.cpu().contiguous()
        out[f"{layer}.zeros"] = qw.zeros.cpu().contiguous()
        out[f"{layer}.g_idx"] = qw.g_idx.cpu().contiguous()
    return out


def load(path: str | Path, config: dict, device: str = "cpu") -> nn.Module:
    """Rebuild the GPT with dequantized weights from a packed MODEL dir."""
    path = Path(path)
    quant = config["quantization"]
    bits = int(quant["bits"])
    model = GPT(ModelConfig.model_validate(config["model"]))
    tensors = load_safetensors(path / WEIGHTS)
    modules = dict(model.named_modules())
    for layer in quant["layers"]:
        try:
            qweight, scales, zeros, g_idx = (tensors.pop(f"{layer}.{k}") for k in ("qweight", "scales", "zeros", "g_idx"))
        except KeyError as err:
            raise KilnError(f"{path / WEIGHTS}: quantized layer {layer} lacks {err.args[0]}") from None
        target = modules.get(layer)
        if not isinstance(target, nn.Linear):
            raise KilnError(f"{path / 'config.json'}: quantization.layers names {layer}, not a Linear of this model")
        replace_weight(target, QuantizedWeight(unpack(qweight, bits, g_idx.numel()), scales, zeros, g_idx, bits))
    load_checked(model, tensors, path / WEIGHTS, replaced=quant["layers"])
    return model.to(device)
