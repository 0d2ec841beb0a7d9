"""Llama: RMSNorm, rotary positions ("rotate half"), SwiGLU MLP, no biases; grouped-query attention.

transformers: LlamaForCausalLM. The rotary layout is transformers' own, so weights copy 1:1 under new names.
With model.qk_norm the same blocks are Qwen3's (Qwen3ForCausalLM: q_norm/k_norm over head_dim before rotary);
with model.mlp: relu2 they are Arcee's (ArceeForCausalLM: up_proj, relu2, down_proj). Both at once, or
model.logit_softcap, have no transformers class here: export refuses them.
"""

from __future__ import annotations

import math
from dataclasses import replace

from pipeline.families.spec import PLAIN, Family, HFSpec, output_weight

ATTENTION = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.wq": "self_attn.q_proj",
             "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj"}
_NAMES = {**ATTENTION, "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}
QK_NORM = {"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
RELU2 = {"mlp.fc": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}


def hf_weights(get, cfg, names: dict = _NAMES) -> dict:
    """{transformers name: a function giving that tensor}, from `get` (Kiln name -> tensor): lazy, so an export
    holds one tensor at a time. Embedding, final norm, head, and each block's `names` (under model.layers.i)."""
    out = {"model.embed_tokens.weight": lambda: get("embed.wte.weight"), "model.norm.weight": lambda: get("head.norm.weight"),
           "lm_head.weight": lambda: output_weight(get)}
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            out[f"model.layers.{i}.{theirs}.weight"] = lambda n=f"blocks.{i}.{ours}.weight": get(n)
    return out


HF = HFSpec(
    model_class="LlamaForCausalLM", config_class="LlamaConfig",
    keys={"style": None, "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
          "n_kv_heads": "num_key_value_heads", "n_embd": "hidden_size", "block_size": "max_position_embeddings",
          "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings", "dropout": None,
          "ffn_hidden": "intermediate_size", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
          "init_std": "initializer_range", "n_experts": None, "experts_per_token": None,
          "moe_aux_loss_coef": None, "moe_shared_hidden": None, "qk_norm": None, "mlp": None,
          "logit_softcap": None, "zero_init_proj": None},
    config_extra={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    weights=hf_weights)

QWEN3 = replace(HF, model_class="Qwen3ForCausalLM", config_class="Qwen3Config",
                config_extra={"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False},
                weights=lambda get, cfg: hf_weights(get, cfg, {**_NAMES, **QK_NORM}),
                fixed={**PLAIN, "qk_norm": True}, derived=lambda cfg: {"head_dim": cfg.head_dim})

ARCEE = replace(HF, model_class="ArceeForCausalLM", config_class="ArceeConfig",
                config_extra={"hidden_act": "relu2", "attention_bias": False, "mlp_bias": False,
                              "bos_token_id": 1, "eos_token_id": 2},  # LlamaConfig's (Arcee's are Llama 3's ids)
                weights=lambda get, cfg: hf_weights(get, cfg, {**ATTENTION, **RELU2}),
                fixed={**PLAIN, "mlp": "relu2"})

SPEC = Family(
    name="llama", norm="rmsnorm", mlp="swiglu", positions="rotary", bias=False,
    ffn_default=lambda d: 64 * math.ceil(8 * d / 3 / 64),  # SwiGLU at 8d/3: the FLOPs of a 4d GELU MLP
    hf=HF, hf_variants=(QWEN3, ARCEE))
