"""Packed low-bit weights in safetensors (no pickles), and the loader that turns them back into a model.

Layout per quantized Linear `<name>` (AutoGPTQ-like, but plain tensors):
  <name>.qweight  uint8 (out, ceil(in/2)) two 4-bit codes per byte, low nibble first
                  (bits <= 4; codes of 5-8 bits are stored one per byte, shape (out, in))
  <name>.scales   fp16 (out, groups)     <name>.zeros  uint8 (out, groups)
  <name>.g_idx    int32 (in,)            group of each input column (act-order permutes groups)
w = (q - zeros[:, g_idx]) * scales[:, g_idx]. Loading dequantizes into ordinary
Linear weights, so every later stage (eval, generate, distill) sees a plain GPT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import KilnError, ModelConfig
from pipeline.model.gpt import GPT
from pipeline.model.io import WEIGHTS, load_checked, load_safetensors, save_model_dir
from pipeline.post.gptq import QuantizedWeight

LOADER = "pipeline.post.formats:load_packed"


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


def save_packed(model: GPT, qweights: dict[str, QuantizedWeight], out: str | Path, quant: dict,
                tokenizer: str | Path | None, meta: dict) -> Path:
    """Write the non-quantized tensors as they are and each quantized layer as packed codes."""
    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        layer = name.removesuffix(".weight")
        if layer in qweights and name.endswith(".weight"):
            continue
        if tensor.data_ptr() in seen:  # the tied head, stored once as the embedding
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().cpu().contiguous()
    for layer, qw in qweights.items():
        state[f"{layer}.qweight"] = pack(qw.q.cpu(), qw.bits)
        state[f"{layer}.scales"] = qw.scales.cpu().contiguous()
        state[f"{layer}.zeros"] = qw.zeros.cpu().contiguous()
        state[f"{layer}.g_idx"] = qw.g_idx.cpu().contiguous()
    quant = {"loader": LOADER, "layers": sorted(qweights), **quant}
    return save_model_dir(state, model.cfg, out, tokenizer, {**meta, "quantization": quant})


def load_packed(path: str | Path, config: dict, device: str = "cpu") -> nn.Module:
    """Rebuild the GPT with dequantized weights from a directory written by `save_packed`."""
    path = Path(path)
    quant = config["quantization"]
    bits = int(quant["bits"])
    model = GPT(ModelConfig.model_validate(config["model"]))
    state = load_safetensors(path / WEIGHTS)
    modules = dict(model.named_modules())
    for layer in quant["layers"]:
        try:
            qweight, scales, zeros, g_idx = (state.pop(f"{layer}.{k}") for k in ("qweight", "scales", "zeros", "g_idx"))
        except KeyError as err:
            raise KilnError(f"{path / WEIGHTS}: quantized layer {layer} lacks {err.args[0]}") from None
        target = modules.get(layer)
        if not isinstance(target, nn.Linear):
            raise KilnError(f"{path / 'config.json'}: quantization.layers names {layer}, not a Linear of this model")
        q = unpack(qweight, bits, g_idx.numel())
        w = QuantizedWeight(q, scales, zeros, g_idx, bits).dequantize()
        # a new Parameter: a quantized head no longer shares the (unquantized) embedding
        target.weight = nn.Parameter(w, requires_grad=False)
    load_checked(model, state, path / WEIGHTS, replaced=quant["layers"])
    return model.to(device)
