"""Kiln's quantized MODEL dirs in the layouts transformers and the GPTQ loaders read.

int8 (torchao): the dequantized model is loaded back through transformers with a TorchAoConfig of
the same torchao config, so transformers itself quantizes it and writes the `quantization_config`
and the flattened torchao safetensors it reads; Kiln's stored codes and scales are then copied
over the ones transformers computed, so the export holds exactly the served weights.

GPTQ (the AutoGPTQ / GPTQModel "gptq" checkpoint format, v1), per quantized Linear `<m>`:
    <m>.qweight  int32 (in/pack, out)   pack = 32/bits codes along the input dim, code k at bit bits*k
    <m>.qzeros   int32 (groups, out/pack) zero points minus one (the v1 convention), packed along out
    <m>.scales   fp16  (groups, out)
    <m>.g_idx    int32 (in,)            group of each input column (act order permutes it)
    w[o, i] = scales[g_idx[i], o] * (q[i, o] - (stored_zero[g_idx[i], o] + 1))
A zero point of 0 has no v1 encoding (0 - 1 wraps): such a group is re-expressed exactly with
codes + 1 and zero 1 when no code is at the top of the range, else the export is refused.
Both forms are written for the families whose spec says `quantized_forms` (pipeline/families/): GPT-2's
fused Conv1D attention has no per-matrix quantized layout in these formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.config import KilnError, ModelConfig
from pipeline.hf.mapping import hf_form
from pipeline.model.io import WEIGHTS, load_model_dir, load_safetensors


def _has_quantized_form(model_dir: Path, cfg: ModelConfig, what: str) -> None:
    if not hf_form(cfg).quantized_forms:
        raise KilnError(f"{model_dir}: {what} has no transformers form for the {cfg.style} family (its "
                        f"transformers layout has no per-matrix quantized form: pipeline/families/{cfg.style}.py)")


def hf_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, str]:
    """Kiln Linear name -> transformers module name, read off export's weight mapping."""
    from pipeline.hf.mapping import hf_state_dict

    ours = {id(t): name for name, t in state.items()}
    return {ours[id(t)].removesuffix(".weight"): hf.removesuffix(".weight")
            for hf, t in hf_state_dict(state, cfg).items() if id(t) in ours and hf.endswith(".weight")}


def _dequantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain float tensors of a loaded model (torchao weights dequantized), each stored once."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if hasattr(t, "qdata"):  # a torchao tensor (its data_ptr says nothing)
            out[name] = t.dequantize().detach().float().contiguous()
        elif t.data_ptr() not in seen:  # a tied head is the embedding, stored once
            seen.add(t.data_ptr())
            out[name] = t.detach().float().contiguous()
    return out


# --------------------------------------------------------------------------- int8 (torchao)


def save_int8(model_dir: Path, config: dict, out: Path) -> dict:
    import tempfile

    from transformers import AutoModelForCausalLM, TorchAoConfig

    from pipeline.hf.mapping import to_hf
    from pipeline.post.int8 import torchao_config

    cfg = ModelConfig.model_validate(config["model"])
    _has_quantized_form(model_dir, cfg, "int8")
    quant = config["quantization"]
    kiln, _ = load_model_dir(model_dir, verify=False)
    state = _dequantized_state(kiln)
    names = hf_names(state, cfg)
    layers = {names[layer] for layer in quant["layers"]}
    if "lm_head" in layers and cfg.tie_embeddings:
        raise KilnError(f"{model_dir}: an int8 head tied to the embedding has no transformers form")
    hf_float = to_hf(state, cfg)
    if "lm_head" in layers:  # quantized head: untie it (Kiln's loader does the same)
        hf_float.config.tie_word_embeddings = False
    linears = [n for n, m in hf_float.named_modules() if isinstance(m, torch.nn.Linear)]
    skip = [n for n in linears if n not in layers] + (["model.embed_tokens"] if "lm_head" in layers else [])
    ao = TorchAoConfig(torchao_config(quant["method"]), modules_to_not_convert=skip,
                       include_input_output_embeddings="lm_head" in layers)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        hf_float.save_pretrained(tmp, safe_serialization=True)
        hf = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=ao, device_map="cpu", dtype=torch.float32)
    modules, ours = dict(hf.named_modules()), dict(kiln.named_modules())
    for layer in quant["layers"]:
        theirs, mine = modules[names[layer]].weight, ours[layer].weight
        if not hasattr(theirs, "qdata"):
            raise KilnError(f"{model_dir}: transformers did not quantize {names[layer]} with torchao")
        for part in ("qdata", "scale", "zero_point"):
            if getattr(mine, part, None) is not None and getattr(theirs, part, None) is not None:
                getattr(theirs, part).copy_(getattr(mine, part))
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out), safe_serialization=True)
    return {"quantized_layers": len(layers)}


# --------------------------------------------------------------------------- GPTQ


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes along `dim`, 32/bits per int32, the first code in the low bits."""
    per = 32 // bits
    codes = codes.to(torch.int64).movedim(dim, 0)
    if codes.shape[0] % per:
        raise KilnError(f"dimension {codes.shape[0]} is not a multiple of {per}; cannot pack {bits}-bit codes")
    codes = codes.reshape(codes.shape[0] // per, per, *codes.shape[1:])
    packed = sum(codes[:, k] << (bits * k) for k in range(per))
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # as int32 bits
    return packed.to(torch.int32).movedim(0, dim).contiguous()


def v1_codes(q: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int, layer: str):
    """(codes, zeros) with every zero point >= 1, the weights they stand for unchanged."""
    maxq = 2**bits - 1
    q, zeros = q.clone().to(torch.int64), zeros.clone().to(torch.int64)
    g = g_idx.long()
    at_zero = zeros[:, g] == 0  # (out, in): columns whose group has zero point 0
    if (at_zero & (q == maxq)).any():
        raise KilnError(f"{layer}: a group with zero point 0 uses code {maxq}; the GPTQ v1 format cannot hold it")
    q = torch.where(at_zero, q + 1, q)
    zeros = torch.where(zeros == 0, torch.ones_like(zeros), zeros)
    return q, zeros


def save_gptq(model_dir: Path, config: dict, out: Path) -> dict:
    from pipeline.hf.mapping import hf_state_dict, transformers_config
    from pipeline.post.packed import unpack

    cfg = ModelConfig.model_validate(config["model"])
    _has_quantized_form(model_dir, cfg, "GPTQ")
    quant = config["quantization"]
    bits = int(quant["bits"])
    if bits not in (2, 4, 8):
        raise KilnError(f"{model_dir}: {bits}-bit codes have no packed GPTQ layout (2, 4 or 8 bits)")
    kiln, _ = load_model_dir(model_dir, verify=False)
    state = _dequantized_state(kiln)
    names = hf_names(state, cfg)
    stored = load_safetensors(model_dir / WEIGHTS)
    hf = hf_state_dict(state, cfg)
    head_quantized = "head.lm_head" in quant["layers"]
    if cfg.tie_embeddings and not head_quantized:
        hf.pop("lm_head.weight", None)  # transformers ties it to the embedding
    for layer in quant["layers"]:
        m = names[layer]
        g_idx = stored[f"{layer}.g_idx"].to(torch.int32)
        q = unpack(stored[f"{layer}.qweight"], bits, g_idx.numel())
        q, zeros = v1_codes(q, stored[f"{layer}.zeros"], g_idx, bits, layer)
        del hf[f"{m}.weight"]
        hf[f"{m}.qweight"] = pack_int32(q.t(), bits, dim=0)  # (in, out) packed along in
        hf[f"{m}.qzeros"] = pack_int32((zeros - 1).t(), bits, dim=1)  # (groups, out) packed along out
        hf[f"{m}.scales"] = stored[f"{layer}.scales"].t().contiguous().to(torch.float16)
        hf[f"{m}.g_idx"] = g_idx.contiguous()
    hf_config = transformers_config(cfg)
    hf_config.tie_word_embeddings = cfg.tie_embeddings and not head_quantized
    hf_config.architectures = ["LlamaForCausalLM"]
    group = int(quant.get("group_size") or -1)
    hf_config.quantization_config = {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits,
        "group_size": group if group > 0 else -1,
        "desc_act": bool(quant.get("act_order")), "sym": False, "true_sequential": True,
        "damp_percent": float((config.get("kiln") or {}).get("damp") or 0.01), "lm_head": head_quantized,
    }
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "quantize_config.json").write_text(json.dumps(hf_config.quantization_config, indent=2) + "\n")
    return {"quantized_layers": len(quant["layers"])}
