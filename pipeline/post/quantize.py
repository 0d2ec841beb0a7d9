"""`kiln quantize`: int8 through torchao, 4-bit (3/8) round-to-nearest or GPTQ through gptq.py.

torchao's int8 weights are tensor subclasses that safetensors cannot write, so the
MODEL dir stores their plain parts (`<layer>.qdata` int8, `.scale`, `.zero_point`);
the loader quantizes a freshly built model with the same torchao config and then
puts the stored codes and scales back, bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, KilnError, ModelConfig, QuantizeConfig
from pipeline.console import log
from pipeline.evaluate import evaluate_windows
from pipeline.model.gpt import GPT
from pipeline.model.io import WEIGHTS, load_checked, load_safetensors, save_model_dir
from pipeline.post import formats, gptq
from pipeline.post.common import calib_tokens, lineage, load_parent, parent_tokenizer, size_on_disk

INT8_LOADER = "pipeline.post.quantize:load_int8"


def torchao_config(method: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if method == "int8-weight":
        return Int8WeightOnlyConfig()
    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    raise ConfigError(f"method: {method!r} is not a torchao int8 method")


def target_layers(model: GPT, quantize_head: bool) -> list[str]:
    """Every block Linear, plus the output head when asked (embeddings stay in full precision)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    return names + (["head.lm_head"] if quantize_head else [])


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


def load_int8(path: str | Path, config: dict, device: str = "cpu") -> nn.Module:
    """Loader named in config.json: rebuild, requantize with torchao, restore the stored codes exactly."""
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


def quantize(model_ref: str | Path, cfg: QuantizeConfig, out: str | Path) -> dict:
    """Quantize a MODEL dir into `out`; returns the summary (sizes, layers, perplexities when calib is given)."""
    device = cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA device")
    if cfg.method == "gptq4" and not cfg.calib:
        raise ConfigError("calib: gptq4 needs calibration data: pass --calib DIR (a `kiln prep` output)")
    model, parent_cfg, parent = load_parent(model_ref, device)
    if parent_cfg.get("quantization"):
        raise KilnError(f"{parent}: already quantized ({parent_cfg['quantization'].get('method')}); quantize the original")
    seq_len = cfg.calib_seq_len or model.cfg.block_size
    if seq_len > model.cfg.block_size:
        raise ConfigError(f"calib_seq_len: {seq_len} exceeds the model's block_size {model.cfg.block_size}")
    before = evaluate_windows(model, cfg.calib, cfg.eval_windows) if cfg.calib and cfg.eval_windows else None
    t0 = time.perf_counter()
    layers = target_layers(model, cfg.quantize_head)
    extra = {"bits": 8 if cfg.method.startswith("int8") else cfg.bits, "quantize_head": cfg.quantize_head}
    if cfg.method.startswith("int8"):
        model = quantize_int8(model, cfg.method, layers)
        meta = lineage(parent, "quantized", cfg.method, **extra)
        quant = {"loader": INT8_LOADER, "method": cfg.method, "layers": layers, "bits": 8}
        save_model_dir(int8_state(model, layers), model.cfg, out, parent_tokenizer(parent), {**meta, "quantization": quant})
    else:
        method = "gptq" if cfg.method == "gptq4" else "rtn"
        calib = calib_tokens(cfg.calib, cfg.calib_samples, seq_len, cfg.seed) if method == "gptq" else None
        extra.update(group_size=cfg.group_size, act_order=cfg.act_order and method == "gptq", damp=cfg.damp,
                     calib=str(cfg.calib) if calib is not None else None, calib_samples=cfg.calib_samples if calib is not None else 0)
        qweights = gptq.quantize_model(model, calib, method, cfg.bits, cfg.group_size, cfg.act_order, cfg.damp,
                                       cfg.quantize_head, device=device)
        meta = lineage(parent, "quantized", cfg.method, **extra)
        quant = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
                 "act_order": extra["act_order"], "packing": "uint8, 2 codes per byte" if cfg.bits <= 4 else "uint8"}
        formats.save_packed(model, qweights, out, quant, parent_tokenizer(parent), meta)
    elapsed = time.perf_counter() - t0
    summary = {"out": str(out), "method": cfg.method, "parent": str(parent), "layers": len(layers),
               "size_bytes": size_on_disk(out), "parent_size_bytes": size_on_disk(parent), "seconds": round(elapsed, 2)}
    if before is not None:
        from pipeline.model.io import load_model_dir

        after = evaluate_windows(load_model_dir(out, device=device)[0], cfg.calib, cfg.eval_windows)
        summary.update(parent_perplexity=before["perplexity"], perplexity=after["perplexity"])
    log.info("wrote %s (%s): %.2f MB, parent %.2f MB", out, cfg.method, summary["size_bytes"] / 1e6,
             summary["parent_size_bytes"] / 1e6)
    return summary
