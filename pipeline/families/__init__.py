"""Model families: one spec each (after Megatron-Core's layer specs and torchtitan's model folders).

A family names the layers its blocks are built from, how positions enter, whether linears carry biases,
its default MLP width, and how it maps onto a transformers class. Everything that differs between families
is here; the rest of Kiln asks the spec (`family(cfg)`) and never compares family names. The layers a spec
names live in `pipeline/model/layers.py` (LAYERS there); each sub-block layer declares its own
tensor-parallel roles (IN_PROJ / OUT_PROJ), which tensor parallelism, GPTQ and the init read.

A new family: a module here with its SPEC, added to FAMILIES below; new kinds of layer go into
pipeline/model/layers.py. `model.style` takes the family's name.

This module is data: no torch, no model import (pipeline/config.py reads it for `model.style`).
"""

from __future__ import annotations

from pipeline.families import gpt2, llama, mixtral
from pipeline.families.spec import Family, HFSpec

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.SPEC, gpt2.SPEC, mixtral.SPEC)}


def family(cfg_or_name) -> Family:
    """The spec of a ModelConfig (its `style`) or of a family name."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.style
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "HFSpec", "family"]
