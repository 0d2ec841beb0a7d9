"""The spec types of a model family (pipeline/families/__init__.py says what a family is)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HFSpec:
    """The family as a transformers model: its classes, which config key each ModelConfig field becomes (None:
    the format has no such knob; every field must be placed, tests/test_export.py holds that), fixed config
    values, and the weight renaming: `weights(get, cfg)` -> {transformers name: a function giving the tensor},
    with `get` reading one of Kiln's plain weights by name (lazy: an export streams them one at a time)."""

    model_class: str
    config_class: str
    keys: dict[str, str | None]
    config_extra: dict[str, Any]
    weights: Callable[[dict, Any], dict]
    quantized_forms: bool = True  # int8 (torchao) and GPTQ have a per-matrix transformers layout
    ignore_missing: tuple[str, ...] = ()  # transformers buffers that are no weights (GPT-2's causal `attn.bias`)


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


def output_weight(get):
    """The output projection for a transformers mapping: the head's own weight where the state has one (an
    untied head, or a tied one stored anyway, as older MODEL dirs do), else the embedding it is tied to."""
    try:
        return get("head.lm_head.weight")
    except KeyError:
        return get("embed.wte.weight")
