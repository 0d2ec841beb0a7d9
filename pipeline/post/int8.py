"""The "torchao-int8" format: methods int8-weight and int8-dynamic through torchao.

torchao's int8 weights are tensor subclasses that safetensors cannot write, so the MODEL dir stores
their plain parts (`<layer>.qdata` int8, `.scale`, `.zero_point`); the loader quantizes a freshly
built model with the same torchao config and then puts the stored codes and scales back, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, KilnError, ModelConfig, QuantizeConfig
from pipeline.model.gpt import GPT
from pipeline.model.io import WEIGHTS, load_checked, load_safetensors


def torchao_config(method: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if method == "int8-weight":
        return Int8WeightOnlyConfig()
    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    raise ConfigError(f"method: {method!r} is not a torchao int8 method")


def quantize_int8(model: GPT, method: str, layers: list[str]) -> GPT:
    from torchao.quantization import quantize_

    wanted = set(layers)
    quantize_(model, torchao_config(method), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in wanted)
    return model


def int8_state(model: GPT, layers: list[str]) -> dict[str, torch.Tensor]:
    """Plain tensors for safetensors: the torchao weights split into codes, scales and zero points."""
    modules = dict(model.named_modules())
    state, seen = {}, set()
    for layer in layers:
        w = modules[layer].weight
        state[f"{layer}.qdata"] = w.qdata.cpu().contiguous()
        state[f"{layer}.scale"] = w.scale.cpu().contiguous()
        if w.zero_point is not None:
            state[f"{layer}.zero_point"] = w.zero_point.cpu().contiguous()
    skip = {f"{layer}.weight" for layer in layers}
    for name, tensor in model.state_dict().items():
        if name in skip or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().cpu().contiguous()
    return state


def quantize(model: GPT, cfg: QuantizeConfig, layers: list[str], calib=None) -> tuple[dict, dict]:
    """Methods int8-weight / int8-dynamic, in place; returns (tensors, quantization fields)."""
    quantize_int8(model, cfg.method, layers)
    return int8_state(model, layers), {}


def load(path: str | Path, config: dict, device: str = "cpu") -> nn.Module:
    """Rebuild, requantize with torchao, restore the stored codes exactly."""
    path = Path(path)
    quant = config["quantization"]
    layers = quant["layers"]
    model = GPT(ModelConfig.model_validate(config["model"]))
    state = load_safetensors(path / WEIGHTS)
    modules = dict(model.named_modules())
    codes = {}
    for layer in layers:
        try:
            q, s = state.pop(f"{layer}.qdata"), state.pop(f"{layer}.scale")
        except KeyError as err:
            raise KilnError(f"{path / WEIGHTS}: int8 layer {layer} lacks {err.args[0]}") from None
        zp = state.pop(f"{layer}.zero_point", None)
        codes[layer] = (q, s, zp)
        modules[layer].weight = nn.Parameter(q.float() * s.float(), requires_grad=False)
    load_checked(model, state, path / WEIGHTS, replaced=layers)
    model = quantize_int8(model.to(device), quant["method"], layers)
    for layer, (q, s, zp) in codes.items():
        w = modules[layer].weight
        w.qdata.copy_(q)
        w.scale.copy_(s)
        if zp is not None and w.zero_point is not None:
            w.zero_point.copy_(zp)
    return model
