"""GPT-2: LayerNorm, learned positions, GELU MLP (tanh approximation), biases everywhere; full attention.

transformers: GPT2LMHeadModel. Its Conv1D stores (in, out), so every matrix is transposed, and q, k, v are
fused into one c_attn. No per-matrix quantized layout exists for the fused attention (no int8/GPTQ form).
"""

from __future__ import annotations

from pipeline.families.spec import Family, HFSpec


def hf_weights(state: dict, cfg) -> dict:
    import torch

    out = {"transformer.wte.weight": state["embed.wte.weight"], "transformer.wpe.weight": state["embed.wpe.weight"],
           "transformer.ln_f.weight": state["head.norm.weight"], "transformer.ln_f.bias": state["head.norm.bias"],
           "lm_head.weight": state.get("head.lm_head.weight", state["embed.wte.weight"])}
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


SPEC = Family(
    name="gpt2", norm="layernorm", mlp="gelu", positions="learned", bias=True, ffn_default=lambda d: 4 * d,
    hf=HFSpec(
        model_class="GPT2LMHeadModel", config_class="GPT2Config",
        keys={"style": None, "n_layer": "n_layer", "n_head": "n_head", "n_kv_heads": None, "n_embd": "n_embd",
              "block_size": "n_positions", "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings",
              "dropout": None, "ffn_hidden": "n_inner", "rope_theta": None, "norm_eps": "layer_norm_epsilon",
              "init_std": "initializer_range", "n_experts": None, "experts_per_token": None,
              "moe_aux_loss_coef": None, "moe_shared_hidden": None},
        config_extra={"activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
        weights=hf_weights, quantized_forms=False, ignore_missing=("attn.bias",)),
)
