"""`kiln quantize`: the method named in QuantizeConfig, looked up in the quantization registry
(pipeline/quant_methods.py), applied to the block Linears (and the head when asked), saved in the method's format.

config.json's "quantization" entry records the format by name (what `load_model_dir` dispatches on),
the method, bits, the quantized layers and the method's own fields (group_size, act_order, ...).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, KilnError, QuantizeConfig
from pipeline.console import log
from pipeline.evaluate import evaluate_windows
from pipeline.model.gpt import GPT
from pipeline.model.io import load_model_dir, save_model_dir
from pipeline.post.common import calib_tokens, lineage, load_parent, parent_tokenizer, size_on_disk
from pipeline.quant_methods import METHODS


def target_layers(model: GPT, quantize_head: bool) -> list[str]:
    """Every block Linear, plus the output head when asked (embeddings stay in full precision)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    return names + (["head.lm_head"] if quantize_head else [])


def quantize(model_ref: str | Path, cfg: QuantizeConfig, out: str | Path) -> dict:
    """Quantize a MODEL dir into `out`; returns the summary (sizes, layers, perplexities when calib is given)."""
    device = cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA device")
    method = METHODS[cfg.method]
    model, parent_cfg, parent = load_parent(model_ref, device)
    if parent_cfg.get("quantization"):
        raise KilnError(f"{parent}: already quantized ({parent_cfg['quantization'].get('method')}); quantize the original")
    seq_len = cfg.calib_seq_len or model.cfg.block_size
    if seq_len > model.cfg.block_size:
        raise ConfigError(f"calib_seq_len: {seq_len} exceeds the model's block_size {model.cfg.block_size}")
    before = evaluate_windows(model, cfg.calib, cfg.eval_windows) if cfg.calib and cfg.eval_windows else None
    t0 = time.perf_counter()
    layers = target_layers(model, cfg.quantize_head)
    calib = calib_tokens(cfg.calib, cfg.calib_samples, seq_len, cfg.seed) if method.calibrated else None
    tensors, fields = method.quantize(model, cfg, layers, calib)
    used = {"calib": cfg.calib, "calib_samples": cfg.calib_samples} if method.calibrated else {}
    meta = lineage(parent, "quantized", cfg.method, bits=cfg.bits, quantize_head=cfg.quantize_head, **fields, **used)
    quant = {"format": method.format, "method": cfg.method, "bits": cfg.bits, "layers": layers, **fields}
    save_model_dir(tensors, model.cfg, out, parent_tokenizer(parent), {**meta, "quantization": quant})
    elapsed = time.perf_counter() - t0
    summary = {"out": str(out), "method": cfg.method, "bits": cfg.bits, "parent": str(parent), "layers": len(layers),
               "size_bytes": size_on_disk(out), "parent_size_bytes": size_on_disk(parent), "seconds": round(elapsed, 2)}
    if before is not None:
        after = evaluate_windows(load_model_dir(out, device=device)[0], cfg.calib, cfg.eval_windows)
        summary.update(parent_perplexity=before["perplexity"], perplexity=after["perplexity"])
    log.info("wrote %s (%s, %d bits): %.2f MB, parent %.2f MB", out, cfg.method, cfg.bits,
             summary["size_bytes"] / 1e6, summary["parent_size_bytes"] / 1e6)
    return summary
