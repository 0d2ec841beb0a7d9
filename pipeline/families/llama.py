"""Llama: RMSNorm, rotary positions ("rotate half"), SwiGLU MLP, no biases; grouped-query attention.

transformers: LlamaForCausalLM. The rotary layout is transformers' own, so weights copy 1:1 under new names.
"""

from __future__ import annotations

import math

from pipeline.families.spec import Family, HFSpec, output_weight

ATTENTION = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.wq": "self_attn.q_proj",
             "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj"}
_NAMES = {**ATTENTION, "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}


def hf_weights(get, cfg, names: dict = _NAMES) -> dict:
    """{transformers name: a function giving that tensor}, from `get` (Kiln name -> tensor): lazy, so an export
    holds one tensor at a time. Embedding, final norm, head, and each block's `names` (under model.layers.i)."""
    out = {"model.embed_tokens.weight": lambda: get("embed.wte.weight"), "model.norm.weight": lambda: get("head.norm.weight"),
           "lm_head.weight": lambda: output_weight(get)}
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            out[f"model.layers.{i}.{theirs}.weight"] = lambda n=f"blocks.{i}.{ours}.weight": get(n)
    return out


SPEC = Family(
    name="llama", norm="rmsnorm", mlp="swiglu", positions="rotary", bias=False,
    ffn_default=lambda d: 64 * math.ceil(8 * d / 3 / 64),  # SwiGLU at 8d/3: the FLOPs of a 4d GELU MLP
    hf=HFSpec(
        model_class="LlamaForCausalLM", config_class="LlamaConfig",
        keys={"style": None, "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
              "n_kv_heads": "num_key_value_heads", "n_embd": "hidden_size", "block_size": "max_position_embeddings",
              "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings", "dropout": None,
              "ffn_hidden": "intermediate_size", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
              "init_std": "initializer_range", "n_experts": None, "experts_per_token": None,
              "moe_aux_loss_coef": None, "moe_shared_hidden": None},
        config_extra={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
        weights=hf_weights),
)
