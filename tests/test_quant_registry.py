"""The quantization registry (pipeline/quant_methods.py): the schema, the CLI and the saved format names derive
from it; model dirs written before it (tests/data/quant-v1, by Kiln at 4737dc8) still load, to the same logits."""

from __future__ import annotations

import importlib
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from factories import fake_corpus
from safetensors.torch import load_file

from pipeline.cli import build_parser
from pipeline.config import ConfigError, ModelConfig, QuantizeConfig, load_config
from pipeline.model.gpt import GPT
from pipeline.model.io import load_model_dir, read_config, save_model_dir, write_sums
from pipeline.post import packed
from pipeline.post.quantize import quantize
from pipeline.quant_methods import ALIASES, FORMATS, LEGACY_LOADERS, METHODS

OLD = Path(__file__).parent / "data" / "quant-v1"
IDS = torch.arange(32).reshape(2, 16) % 64  # the input of OLD/expected.safetensors (OLD/build.py)


@pytest.mark.parametrize("name", ["int8-weight", "rtn4", "gptq4-bits3"])
def test_model_dirs_written_before_the_registry_load_to_the_same_logits(name):
    config = read_config(OLD / name)
    assert "format" not in config["quantization"] and config["quantization"]["loader"] in LEGACY_LOADERS
    model, _ = load_model_dir(OLD / name)
    with torch.no_grad():
        assert torch.equal(model(IDS)[0], load_file(str(OLD / "expected.safetensors"))[name])


def test_an_old_packed_dir_still_exports_to_transformers(tmp_path):
    from pipeline.hf.model import export_model_dir

    info = export_model_dir(OLD / "rtn4", tmp_path / "hf")
    hf = json.loads((tmp_path / "hf/config.json").read_text())["quantization_config"]
    assert info["quantized_layers"] == 8 and (hf["quant_method"], hf["bits"], hf["group_size"]) == ("gptq", 4, 16)


def test_every_registry_entry_resolves():
    """Each row names a real function and an existing format; the lazy references import."""
    for name, method in METHODS.items():
        assert method.format in FORMATS and method.bits[0] <= method.default_bits <= method.bits[1], name
    for method, bits in ALIASES.values():
        assert method in METHODS and METHODS[method].bits[0] <= bits <= METHODS[method].bits[1]
    assert set(LEGACY_LOADERS.values()) <= set(FORMATS)
    for fn in [m.quantize for m in METHODS.values()] + [f.load for f in FORMATS.values()] + [f.to_hf for f in FORMATS.values()]:
        module, _, attr = fn.__qualname__.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), fn.__qualname__


def test_schema_and_cli_take_their_methods_from_the_registry():
    assert typing.get_args(QuantizeConfig.model_fields["method"].annotation) == tuple(METHODS)
    quantize_cmd = build_parser()._subparsers._group_actions[0].choices["quantize"]
    method = next(a for a in quantize_cmd._actions if a.dest == "method")
    assert list(method.choices) == [*METHODS, *ALIASES]


def test_the_docs_table_of_methods_is_the_registry():
    """The methods table of docs/post-training.md is METHODS."""
    text = (Path(__file__).parent.parent / "docs" / "post-training.md").read_text()
    table = text[text.index("| method | format | bits (default) | calibration |"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        names, fmt, bits, calib = (c.strip() for c in line.strip(" |").split("|"))
        for name in names.replace("`", "").split(", "):
            rows[name] = (fmt.strip("`"), bits, calib != "no")
    assert rows == {name: (m.format, f"{m.bits[0]}–{m.bits[1]} ({m.default_bits})" if m.bits[0] < m.bits[1]
                           else str(m.default_bits), m.calibrated) for name, m in METHODS.items()}


def test_bits_default_from_the_method_and_old_names_mean_their_bits():
    assert QuantizeConfig().bits == METHODS["int8-weight"].default_bits == 8
    assert QuantizeConfig(method="rtn").bits == 4 and QuantizeConfig(method="rtn", bits=3).bits == 3
    old = QuantizeConfig(method="gptq4", calib="data")
    assert (old.method, old.bits) == ("gptq", 4)
    assert QuantizeConfig(method="rtn4", bits=4).method == "rtn"


@pytest.mark.parametrize("sets, error", [
    (["method=gptq4", "bits=3", "calib=d"], "--set bits=3: bits: 3 contradicts method gptq4 (4 bits); write method: gptq, bits: 3"),
    (["method=int8-dynamic", "bits=4"], "--set bits=4: bits: int8-dynamic takes 8 bits, not 4"),
    (["method=rtn", "bits=9"], "--set bits=9: bits: rtn takes 2..8 bits, not 9"),
    (["method=rtn", "bits=1"], "--set bits=1: bits: rtn takes 2..8 bits, not 1"),
    (["method=gptq"], "<defaults>: calib: gptq needs calibration data: pass --calib DIR (a `kiln prep` output)"),
    (["method=awq"], "--set method=awq: method: 'awq' is not one of int8-weight,int8-dynamic,rtn,gptq"),
])
def test_cross_field_rules_are_one_line_schema_errors(sets, error):
    with pytest.raises(ConfigError) as err:
        load_config("quantize", None, sets)
    assert str(err.value) == error


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    save_model_dir(GPT(cfg), cfg, root / "parent")
    return root / "parent", fake_corpus(root / "data", vocab_size=64, train_docs=40, val_docs=8, shards=1)


@pytest.mark.parametrize("method, bits", [("int8-dynamic", 8), ("rtn", 3), ("gptq", 5)])
def test_a_quantized_dir_names_its_format_method_and_bits(parent, tmp_path, method, bits):
    model_dir, data = parent
    cfg = QuantizeConfig(method=method, bits=bits, group_size=16, calib=str(data), calib_samples=8, eval_windows=0)
    summary = quantize(model_dir, cfg, tmp_path / "q")
    quant, kiln = read_config(tmp_path / "q")["quantization"], read_config(tmp_path / "q")["kiln"]
    assert (quant["format"], quant["method"], quant["bits"]) == (METHODS[method].format, method, bits)
    assert "loader" not in quant and (kiln["method"], kiln["bits"], summary["bits"]) == (method, bits, bits)
    model, _ = load_model_dir(tmp_path / "q")
    if quant["format"] == "packed":  # the codes really are `bits` wide
        stored = load_file(str(tmp_path / "q/model.safetensors"))["blocks.0.mlp.w1.qweight"]
        assert stored.shape[1] == (16 if bits <= 4 else 32)  # two codes a byte up to 4 bits (32 inputs)
        assert packed.unpack(stored, bits, 32).max() < 2**bits
        assert len({round(v, 5) for v in model.get_submodule("blocks.0.mlp.w1").weight[0, :16].tolist()}) <= 2**bits


def test_a_format_only_a_newer_kiln_knows_is_one_line(parent, tmp_path):
    out = Path(shutil.copytree(OLD / "rtn4", tmp_path / "m"))
    config = read_config(out)
    config["quantization"] = {k: v for k, v in config["quantization"].items() if k != "loader"} | {"format": "awq"}
    (out / "config.json").write_text(json.dumps(config))
    write_sums(out)
    with pytest.raises(Exception, match=r"quantization.format 'awq' is not a Kiln format \(torchao-int8, packed\)"):
        load_model_dir(out)
