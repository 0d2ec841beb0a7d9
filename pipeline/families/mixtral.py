"""Mixtral: Llama's blocks with a routed mixture of SwiGLU experts in place of the MLP (pipeline/model/layers.py
MoE: top-k of model.n_experts per token, gates renormalized, a load-balancing loss); model.ffn_hidden is each
expert's width.

transformers: MixtralForCausalLM. Its experts are stored fused per layer (transformers >= 5): gate_up_proj
(E, 2 x width, d) holds each expert's gate rows then its up rows, down_proj (E, d, width); the router is
mlp.gate. Mixtral has no shared expert (model.moe_shared_hidden is refused on export), and no per-matrix
quantized layout for fused experts (no int8/GPTQ transformers form; Kiln's own quantized MODEL dirs work).
"""

from __future__ import annotations

from pipeline.families import llama
from pipeline.families.spec import Family, HFSpec


def hf_weights(get, cfg) -> dict:
    """Llama's names for everything but the MLP; per layer the router and the fused experts, each made when
    asked (one layer's experts at a time)."""
    import torch

    out = llama.hf_weights(get, cfg, llama.ATTENTION)
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        experts = [f"{b}mlp.experts.{e}." for e in range(cfg.n_experts)]
        out[h + "mlp.gate.weight"] = lambda n=b + "mlp.router.weight": get(n)
        out[h + "mlp.experts.gate_up_proj"] = lambda xs=experts: torch.stack(
            [torch.cat([get(x + "w1.weight"), get(x + "w3.weight")]) for x in xs])
        out[h + "mlp.experts.down_proj"] = lambda xs=experts: torch.stack([get(x + "w2.weight") for x in xs])
    return out


SPEC = Family(
    name="mixtral", norm="rmsnorm", mlp="moe", positions="rotary", bias=False, ffn_default=llama.SPEC.ffn_default,
    hf=HFSpec(
        model_class="MixtralForCausalLM", config_class="MixtralConfig",
        keys={**llama.SPEC.hf.keys, "n_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok",
              "moe_aux_loss_coef": "router_aux_loss_coef", "moe_shared_hidden": None},
        config_extra={"hidden_act": "silu", "router_jitter_noise": 0.0},
        weights=hf_weights, quantized_forms=False),
)
