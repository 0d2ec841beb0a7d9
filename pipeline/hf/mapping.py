"""Kiln's model as transformers' classes, driven by each family's HFSpec (pipeline/families/): the config keys,
the fixed config values and the weight names. Nothing here knows a family by name. A family may have more than
one transformers form (Llama with q/k norms is Qwen3): `hf_form` picks the one that represents the config.
"""

from __future__ import annotations

import torch

from pipeline.config import KilnError, ModelConfig
from pipeline.families import HFSpec, family
from pipeline.model.weights import Weights


def hf_form(cfg: ModelConfig) -> HFSpec:
    """The family's transformers form whose fixed architecture options are this config's; none: refused in one line
    naming the first option the family's main form does not represent."""
    main, *variants = family(cfg).hf_forms()
    for spec in (main, *variants):
        if all(getattr(cfg, k) == v for k, v in spec.fixed.items()):
            return spec
    key = next(k for k, v in main.fixed.items() if getattr(cfg, k) != v)
    known = [main.model_class] + [f"{f.model_class} with " + ", ".join(
        f"{k}: {v}" for k, v in f.fixed.items() if v != main.fixed[k]) for f in variants]
    raise KilnError(f"model.{key} {getattr(cfg, key)!r}: no transformers class represents this {cfg.style} model "
                    f"(export knows {'; '.join(known)})")


def transformers_config(cfg: ModelConfig):
    """The transformers config (the form's config class) of a Kiln model config."""
    import inspect

    import transformers

    spec = hf_form(cfg)
    unplaced = sorted(set(type(cfg).model_fields) - set(spec.keys))
    if unplaced:
        raise KilnError(f"export to transformers does not know model.{unplaced[0]} yet "
                        f"(pipeline/families/{cfg.style}.py HFSpec.keys)")
    if cfg.kv_heads != cfg.n_head and spec.keys["n_kv_heads"] is None:
        raise KilnError(f"model.n_kv_heads {cfg.kv_heads}: the {cfg.style} format has no grouped-query attention")
    if cfg.moe_shared_hidden and spec.keys["moe_shared_hidden"] is None:
        raise KilnError(f"model.moe_shared_hidden {cfg.moe_shared_hidden}: the {cfg.style} format has no shared expert")
    kw = {spec.keys[k]: v for k, v in cfg.resolved().items() if spec.keys[k] is not None}
    kw.update(spec.derived(cfg) if spec.derived else {})
    config_class = getattr(transformers, spec.config_class)
    if "rope_theta" in kw and "rope_parameters" in inspect.signature(config_class.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}  # transformers >= 5
    return config_class(**kw, **spec.config_extra)


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Kiln's plain weights under the transformers model's names (renamed, and where the family says so
    transposed or fused), all in memory: for small models and the quantized forms' name lookup."""
    return {name: make() for name, make in hf_form(cfg).weights(state.__getitem__, cfg).items()}


class HFWeights(Weights):
    """A model's weights under transformers' names, lazily: each tensor made from Kiln's when asked (a tied
    head is left out: transformers ties it on load). Shapes and dtypes come from running the family's mapping
    on meta tensors, so nothing is read to know them."""

    def __init__(self, source: Weights, cfg: ModelConfig):
        self.source = source
        self.make = hf_form(cfg).weights(source.get, cfg)
        if cfg.tie_embeddings:
            self.make.pop("lm_head.weight")
        meta = hf_form(cfg).weights(lambda n: torch.empty(source.shape(n), dtype=source.dtype(n), device="meta"), cfg)
        self.meta = {name: meta[name]() for name in self.make}

    def names(self) -> list[str]:
        return list(self.make)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.meta[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.make[name]()


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig):
    """An in-memory transformers model holding these weights."""
    import transformers

    spec = hf_form(cfg)
    model = getattr(transformers, spec.model_class)(transformers_config(cfg))
    missing, unexpected = model.load_state_dict(hf_state_dict(state, cfg), strict=False)
    missing = [k for k in missing if not k.endswith(spec.ignore_missing) and k != "lm_head.weight"]
    if missing or unexpected:
        raise KilnError(f"HF mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()
