"""`kiln export`: a checkpoint (any layout) or MODEL dir -> a MODEL dir or a Hugging Face transformers dir.

Checkpoints carry every rank's slices of the plain weights with their slicing
recorded (checkpoint.py), so export never needs the layout they were trained with:
it reassembles one tensor at a time and streams it out (peak memory: the largest
tensor). Only the Hugging Face format builds the whole model in memory. The HF mapping:

    llama -> LlamaForCausalLM: same rotary layout ("rotate half"), so weights copy 1:1;
             grouped-query attention as num_key_value_heads
    gpt2  -> GPT2LMHeadModel: Conv1D stores (in, out), so every matrix is transposed,
             and q/k/v are fused into c_attn
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.checkpoint import (
    LATEST,
    STATE,
    load_weights,
    newest_complete,
    pretrain_meta,
    read_state,
    verify,
    weights_only,
)
from pipeline.config import KilnError, ModelConfig
from pipeline.data.corpus import PreparedCorpus
from pipeline.model.io import CONFIG, TOKENIZER, read_config, save_model_dir, verify_sums
from pipeline.model.weights import Weights


def resolve_source(src: str | Path) -> Path:
    """A MODEL dir, a checkpoint dir, a `checkpoints/latest` pointer, a checkpoints/ dir or a run dir.
    For a run dir: the newest checkpoint whose weights verify, as a resume would choose."""
    return _resolve(src)[0]


def resolve_verified(src: str | Path, only=weights_only, collective: bool = False) -> Path:
    """`resolve_source`, with the chosen directory's files (`only`) checked against SHA256SUMS exactly once
    (`collective`: every rank calls it and hashes a share)."""
    path, verified = _resolve(src, only, collective)
    if not verified:
        verify(path, only, collective)
    return path


def _resolve(src: str | Path, only=weights_only, collective: bool = False) -> tuple[Path, bool]:
    """(the directory, whether its weights were just verified choosing it)."""
    src = Path(src)
    if src.is_file() and src.name == LATEST:
        return src.parent / src.read_text().strip(), False
    if src.is_dir() and not (src / CONFIG).exists() and not (src / STATE).exists():
        for root in (src, src / "checkpoints"):
            found = newest_complete(root, only, collective)
            if found is not None:
                return found, True
    if not src.exists():
        raise KilnError(f"{src}: no such checkpoint or MODEL directory")
    return src, False


def load_source(src: str | Path, verified: bool = False) -> tuple[Weights, ModelConfig, Path | None, dict]:
    """(plain weights, read lazily; model config; tokenizer path or None; metadata) of a checkpoint or MODEL
    dir. Checks what it will read against SHA256SUMS: a checkpoint's weights and state, a MODEL dir whole."""
    path, just_verified = _resolve(src)
    verified = verified or just_verified
    if (path / STATE).exists():
        state = read_state(path)
        run = state["config"]
        cfg = ModelConfig.model_validate(run["model"])
        tok = None
        for data_dir in run.get("data", {}).get("paths", []):
            if (Path(data_dir) / "manifest.json").exists():  # confined to the corpus and hash-checked there
                cand = PreparedCorpus(data_dir, verify=False).tokenizer_path
                tok = cand if cand.exists() else None
                break
        return load_weights(path, verified), cfg, tok, pretrain_meta(state, tok, exported_from=str(path))
    if not verified:
        verify_sums(path)
    config = read_config(path)
    if config.get("quantization"):
        raise KilnError(f"{path / CONFIG}: a quantized model cannot be exported to this format")
    cfg = ModelConfig.model_validate(config["model"])
    tok = path / TOKENIZER if (path / TOKENIZER).exists() else None
    meta = {k: v for k, v in config.items() if k not in ("model", "format_version")}
    return load_weights(path, verified=True), cfg, tok, meta


# --------------------------------------------------------------------------- Hugging Face


# Every ModelConfig field, per style: the transformers config key its resolved value becomes, or None where
# the format has no such knob. A new ModelConfig field is refused by export
# until it is placed here (tests/test_export.py holds that).
HF_KEYS = {
    "llama": {"style": None, "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
              "n_kv_heads": "num_key_value_heads", "n_embd": "hidden_size", "block_size": "max_position_embeddings",
              "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings", "dropout": None,
              "ffn_hidden": "intermediate_size", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
              "init_std": "initializer_range"},
    "gpt2": {"style": None, "n_layer": "n_layer", "n_head": "n_head", "n_kv_heads": None, "n_embd": "n_embd",
             "block_size": "n_positions", "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings",
             "dropout": None, "ffn_hidden": "n_inner", "rope_theta": None, "norm_eps": "layer_norm_epsilon",
             "init_std": "initializer_range"},
}


def _hf_config(cfg: ModelConfig):
    import inspect

    from transformers import GPT2Config, LlamaConfig

    keys = HF_KEYS[cfg.style]
    unplaced = sorted(set(type(cfg).model_fields) - set(keys))
    if unplaced:
        raise KilnError(f"export to transformers does not know model.{unplaced[0]} yet (pipeline/export.py HF_KEYS)")
    if cfg.kv_heads != cfg.n_head and keys["n_kv_heads"] is None:
        raise KilnError(f"model.n_kv_heads {cfg.kv_heads}: the {cfg.style} format has no grouped-query attention")
    kw = {keys[k]: v for k, v in cfg.resolved().items() if keys[k] is not None}
    if cfg.style == "llama":
        kw.update(hidden_act="silu", attention_bias=False, mlp_bias=False)
        if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
            kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
        return LlamaConfig(**kw)
    return GPT2Config(**kw, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2 transpose/fuse) Kiln's plain weights into the HF model's names."""
    out: dict[str, torch.Tensor] = {}
    lm_head = state.get("head.lm_head.weight", state["embed.wte.weight"])
    if cfg.style == "llama":
        out["model.embed_tokens.weight"] = state["embed.wte.weight"]
        out["model.norm.weight"] = state["head.norm.weight"]
        out["lm_head.weight"] = lm_head
        names = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.wq": "self_attn.q_proj",
                 "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
                 "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}
        for i in range(cfg.n_layer):
            for ours, theirs in names.items():
                out[f"model.layers.{i}.{theirs}.weight"] = state[f"blocks.{i}.{ours}.weight"]
        return out
    out["transformer.wte.weight"] = state["embed.wte.weight"]
    out["transformer.wpe.weight"] = state["embed.wpe.weight"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = state["head.norm.weight"], state["head.norm.bias"]
    out["lm_head.weight"] = lm_head
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[h + theirs + ".weight"], out[h + theirs + ".bias"] = state[b + ours + ".weight"], state[b + ours + ".bias"]
        qkv = [state[f"{b}attn.{w}.weight"] for w in ("wq", "wk", "wv")]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat([state[f"{b}attn.{w}.bias"] for w in ("wq", "wk", "wv")])
        for ours, theirs in (("attn.wo", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[h + theirs + ".weight"] = state[b + ours + ".weight"].t().contiguous()
            out[h + theirs + ".bias"] = state[b + ours + ".bias"]
    return out


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig):
    """An in-memory transformers model holding these weights."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    config = _hf_config(cfg)
    model = (LlamaForCausalLM if cfg.style == "llama" else GPT2LMHeadModel)(config)
    hf = hf_state_dict(state, cfg)
    missing, unexpected = model.load_state_dict(hf, strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and k != "lm_head.weight"]
    if missing or unexpected:
        raise KilnError(f"HF mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()


def export(src: str | Path, out: str | Path, fmt: str = "safetensors") -> dict:
    source, verified = _resolve(src)  # for a run dir this already checksums the chosen checkpoint's weights
    if fmt == "hf" and (source / CONFIG).is_file() and read_config(source).get("quantization"):
        from pipeline.hf.model import export_model_dir  # int8 (torchao) / GPTQ layouts transformers reads

        return {"source": str(source), **export_model_dir(source, out)}
    state, cfg, tok, meta = load_source(source, verified)
    out = Path(out)
    if fmt == "safetensors":
        save_model_dir(state, cfg, out, tokenizer=tok, meta=meta, as_float32=True)
    elif fmt == "hf":
        from pipeline.hf.model import save_hf  # weights + tokenizer.json checked against sentencepiece

        save_hf(state.to_dict(), cfg, out, tok, meta)  # an explicit export: the one place the whole model is in memory
    else:
        raise KilnError(f"--format {fmt}: expected safetensors or hf")
    return {"source": str(source), "out": str(out), "format": fmt, "style": cfg.style,
            "params": sum(math.prod(state.shape(n)) for n in state.names())}
