"""The spec types of a model family (pipeline/families/__init__.py says what a family is)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The architecture options (ModelConfig) at the values that give the family's plain blocks. A transformers form
# represents exactly the values in its `fixed`; this is every form's unless it says otherwise.
PLAIN = {"qk_norm": False, "mlp": "family", "logit_softcap": None}


@dataclass(frozen=True)
class HFSpec:
    """The family as a transformers model: its classes, which config key each ModelConfig field becomes (None:
    the format has no such knob; every field must be placed, tests/test_export.py holds that), fixed config
    values, and the weight renaming: `weights(get, cfg)` -> {transformers name: a function giving the tensor},
    with `get` reading one of Kiln's plain weights by name (lazy: an export streams them one at a time).
    `fixed`: the values of ModelConfig fields this form represents where it has no key for them (export refuses
    other values); `derived`: config values computed from the ModelConfig (a head_dim the class wants stated)."""

    model_class: str
    config_class: str
    keys: dict[str, str | None]
    config_extra: dict[str, Any]
    weights: Callable[[dict, Any], dict]
    quantized_forms: bool = True  # int8 (torchao) and GPTQ have a per-matrix transformers layout
    ignore_missing: tuple[str, ...] = ()  # transformers buffers that are no weights (GPT-2's causal `attn.bias`)
    fixed: dict[str, Any] = field(default_factory=lambda: dict(PLAIN))
    derived: Callable[[Any], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Family:
    name: str
    norm: str  # a key of pipeline.model.layers.NORMS
    mlp: str  # a key of pipeline.model.layers.MLPS
    positions: str  # "rotary" (applied to q and k in attention) or "learned" (an embedding table added to tokens)
    bias: bool  # linear layers (and LayerNorms) carry biases
    ffn_default: Callable[[int], int]  # MLP width from n_embd when model.ffn_hidden is unset
    hf: HFSpec
    notes: tuple[str, ...] = field(default=())
    hf_variants: tuple[HFSpec, ...] = ()  # other transformers forms, for architecture options `hf` does not fix

    def hf_forms(self) -> tuple[HFSpec, ...]:
        return (self.hf, *self.hf_variants)


def output_weight(get):
    """The output projection for a transformers mapping: the head's own weight where the state has one (an
    untied head, or a tied one stored anyway, as older MODEL dirs do), else the embedding it is tied to."""
    try:
        return get("head.lm_head.weight")
    except KeyError:
        return get("embed.wte.weight")
