"""GPT-2: LayerNorm, learned positions, GELU MLP (tanh approximation), biases everywhere; full attention.

transformers: GPT2LMHeadModel. Its Conv1D stores (in, out), so every matrix is transposed, and q, k, v are
fused into one c_attn. No per-matrix quantized layout exists for the fused attention (no int8/GPTQ form).
With model.mlp: relu2 it is the same class with activation_function relu2 (same c_fc/c_proj weights);
model.qk_norm and model.logit_softcap have no GPT-2 form: export refuses them.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.families.spec import PLAIN, Family, HFSpec, output_weight


def hf_weights(get, cfg) -> dict:
    """{transformers name: a function giving that tensor}, from `get` (Kiln name -> tensor): lazy, so an export
    holds one tensor (and for c_attn its three parts) at a time."""
    import torch

    def one(name: str, transpose: bool = False):
        return lambda: get(name).t().contiguous() if transpose else get(name)

    def qkv(b: str, kind: str):
        parts = lambda: [get(f"{b}attn.{w}.{kind}") for w in ("wq", "wk", "wv")]  # noqa: E731
        return (lambda: torch.cat(parts(), dim=0).t().contiguous()) if kind == "weight" else (lambda: torch.cat(parts()))

    out = {"transformer.wte.weight": one("embed.wte.weight"), "transformer.wpe.weight": one("embed.wpe.weight"),
           "transformer.ln_f.weight": one("head.norm.weight"), "transformer.ln_f.bias": one("head.norm.bias"),
           "lm_head.weight": lambda: output_weight(get)}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[h + theirs + ".weight"], out[h + theirs + ".bias"] = one(b + ours + ".weight"), one(b + ours + ".bias")
        out[h + "attn.c_attn.weight"], out[h + "attn.c_attn.bias"] = qkv(b, "weight"), qkv(b, "bias")
        for ours, theirs in (("attn.wo", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[h + theirs + ".weight"] = one(b + ours + ".weight", transpose=True)
            out[h + theirs + ".bias"] = one(b + ours + ".bias")
    return out


HF = HFSpec(
    model_class="GPT2LMHeadModel", config_class="GPT2Config",
    keys={"style": None, "n_layer": "n_layer", "n_head": "n_head", "n_kv_heads": None, "n_embd": "n_embd",
          "block_size": "n_positions", "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings",
          "dropout": None, "ffn_hidden": "n_inner", "rope_theta": None, "norm_eps": "layer_norm_epsilon",
          "init_std": "initializer_range", "n_experts": None, "experts_per_token": None,
          "moe_aux_loss_coef": None, "moe_shared_hidden": None, "qk_norm": None, "mlp": None,
          "logit_softcap": None, "zero_init_proj": None},
    config_extra={"activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    weights=hf_weights, quantized_forms=False, ignore_missing=("attn.bias",))

SPEC = Family(
    name="gpt2", norm="layernorm", mlp="gelu", positions="learned", bias=True, ffn_default=lambda d: 4 * d, hf=HF,
    hf_variants=(replace(HF, config_extra={**HF.config_extra, "activation_function": "relu2"},
                         fixed={**PLAIN, "mlp": "relu2"}),))
