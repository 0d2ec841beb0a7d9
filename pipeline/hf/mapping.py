"""Kiln's model as transformers' classes: the config keys and the weight names of each style.

    llama -> LlamaForCausalLM: same rotary layout ("rotate half"), so weights copy 1:1;
             grouped-query attention as num_key_value_heads
    gpt2  -> GPT2LMHeadModel: Conv1D stores (in, out), so every matrix is transposed,
             and q/k/v are fused into c_attn
"""

from __future__ import annotations

import torch

from pipeline.config import KilnError, ModelConfig

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


def transformers_config(cfg: ModelConfig):
    """The transformers config (LlamaConfig or GPT2Config) of a Kiln model config."""
    import inspect

    from transformers import GPT2Config, LlamaConfig

    keys = HF_KEYS[cfg.style]
    unplaced = sorted(set(type(cfg).model_fields) - set(keys))
    if unplaced:
        raise KilnError(f"export to transformers does not know model.{unplaced[0]} yet (pipeline/hf/mapping.py HF_KEYS)")
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

    config = transformers_config(cfg)
    model = (LlamaForCausalLM if cfg.style == "llama" else GPT2LMHeadModel)(config)
    hf = hf_state_dict(state, cfg)
    missing, unexpected = model.load_state_dict(hf, strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and k != "lm_head.weight"]
    if missing or unexpected:
        raise KilnError(f"HF mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()
