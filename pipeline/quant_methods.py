"""The quantization registry: every method `kiln quantize` knows and every format a quantized MODEL dir is in.

A method is (quantize function, storage format, bits it takes, default bits, whether it needs calibration
data). A format is (loader, writer of its transformers form). The config schema (QuantizeConfig), the CLI
choices, `kiln quantize`, `load_model_dir` and `kiln export --format hf` all read these two tables, so a
new method is one row here plus its quantize function (and a format, if it stores weights another way).

config.json names its format by the stable string below (`quantization.format`), never by a Python path:
modules can move without breaking saved models. Directories written before formats had names carry
`quantization.loader` instead; LEGACY_LOADERS maps those strings (and only those) to their format.

This module imports no torch and nothing of pipeline at import time (the config schema reads it); each
function is imported from its module when first called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import KilnError


def _lazy(module: str, name: str) -> Callable:
    """`module.name`, imported on the first call."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{module}.{name}"
    return call


@dataclass(frozen=True)
class Format:
    load: Callable  # (path, config dict, device) -> nn.Module
    to_hf: Callable  # (model_dir, config dict, out) -> info dict: the transformers layout of the same weights
    about: str


@dataclass(frozen=True)
class Method:
    quantize: Callable  # (model, QuantizeConfig, layers, calib tokens | None) -> (tensors to save, quantization fields)
    format: str  # a key of FORMATS
    bits: tuple[int, int]  # the widths it takes, inclusive
    default_bits: int
    calibrated: bool  # needs `calib` (a `kiln prep` output)
    about: str


FORMATS: dict[str, Format] = {
    "torchao-int8": Format(_lazy("pipeline.post.int8", "load"), _lazy("pipeline.hf.quantized", "save_int8"),
                           "torchao int8 codes, scales and zero points per Linear"),
    "packed": Format(_lazy("pipeline.post.packed", "load"), _lazy("pipeline.hf.quantized", "save_gptq"),
                     "2-8 bit codes packed in uint8 with fp16 group scales, dequantized on load"),
}

METHODS: dict[str, Method] = {
    "int8-weight": Method(_lazy("pipeline.post.int8", "quantize"), "torchao-int8", (8, 8), 8, False,
                          "torchao int8 weights, float activations"),
    "int8-dynamic": Method(_lazy("pipeline.post.int8", "quantize"), "torchao-int8", (8, 8), 8, False,
                           "torchao int8 weights and dynamically quantized int8 activations"),
    "rtn": Method(_lazy("pipeline.post.packed", "quantize_rtn"), "packed", (2, 8), 4, False,
                  "round-to-nearest per group: the baseline"),
    "gptq": Method(_lazy("pipeline.post.gptq", "quantize"), "packed", (2, 8), 4, True,
                   "GPTQ (Frantar et al. 2022) on calibration data"),
}

# Names Kiln accepted before bits were their own key: each stands for (method, bits).
ALIASES: dict[str, tuple[str, int]] = {"rtn4": ("rtn", 4), "gptq4": ("gptq", 4)}

# config.json "quantization.loader" of directories written before formats had names.
LEGACY_LOADERS = {"pipeline.post.formats:load_packed": "packed", "pipeline.post.quantize:load_int8": "torchao-int8"}


def bits_note() -> str:
    """What the config schema says about `bits`."""
    defaults = ", ".join(f"{name} {m.default_bits}" for name, m in METHODS.items())
    old = ", ".join(f"{alias} = {name} with bits {bits}" for alias, (name, bits) in ALIASES.items())
    return f"default: the method's ({defaults}); old names {old}"


def format_of(config: dict, where: str | Path) -> Format:
    """The format a quantized MODEL dir's config.json names (config.json is data: only names in FORMATS count)."""
    quant = config.get("quantization") or {}
    name = quant.get("format")
    if name is None and "loader" in quant:
        name = LEGACY_LOADERS.get(quant["loader"])
        if name is None:
            raise KilnError(f"{where}: quantization.loader {str(quant['loader'])[:100]!r} is not one Kiln wrote "
                             f"({', '.join(LEGACY_LOADERS)})")
    if name not in FORMATS:
        raise KilnError(f"{where}: quantization.format {str(name)[:100]!r} is not a Kiln format "
                         f"({', '.join(FORMATS)})")
    return FORMATS[name]


def load_quantized(path: str | Path, config: dict, device: str = "cpu"):
    """What `load_model_dir` calls for a config.json with a "quantization" entry."""
    return format_of(config, Path(path) / "config.json").load(path, config, device)
