"""`kiln export`: HF transformers models built from Kiln weights give the same logits (fp32, 1e-4)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.cli import main
from pipeline.config import KilnError, ModelConfig
from pipeline.export import export
from pipeline.hf.mapping import to_hf
from pipeline.model.io import load_model_dir, save_model_dir
from pipeline.parallel.materialize import build_gpt

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cfg(style: str, tie: bool, kv_heads: int | None = None) -> ModelConfig:
    return ModelConfig(style=style, n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=120, tie_embeddings=tie,
                       n_kv_heads=kv_heads)


@pytest.mark.parametrize("style,tie,kv_heads", [("llama", True, None), ("llama", False, None), ("llama", False, 2),
                                                ("gpt2", True, None), ("gpt2", False, None)])
def test_hf_logits_match(style, tie, kv_heads):
    """Grouped-query attention (4 query heads on 2 key/value heads) exports as num_key_value_heads."""
    cfg = _cfg(style, tie, kv_heads)
    model = build_gpt(cfg, seed=3).eval()
    with torch.no_grad():  # perturb norms and biases so a swapped/transposed mapping cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    state = {k: v for k, v in model.state_dict().items() if not (tie and k == "head.lm_head.weight")}
    hf = to_hf(state, cfg)
    idx = torch.randint(0, 120, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert getattr(hf.config, "num_key_value_heads", 4) == (kv_heads or 4)


def test_every_model_field_has_a_place_in_each_hf_format():
    """A new ModelConfig field cannot slip past export: each family's HFSpecs (all its forms) place every field."""
    from pipeline.families import FAMILIES

    for name, fam in FAMILIES.items():
        for spec in fam.hf_forms():
            assert set(spec.keys) == set(ModelConfig.model_fields), name


def test_gpt2_export_refuses_grouped_query_attention():
    cfg = _cfg("gpt2", False, kv_heads=2)
    state = build_gpt(cfg, seed=0).state_dict()
    with pytest.raises(KilnError, match="n_kv_heads 2: the gpt2 format has no grouped-query attention"):
        to_hf(state, cfg)


def test_kiln_export_cli_hf_and_safetensors(tmp_path, capsys):
    cfg = _cfg("llama", True)
    model = build_gpt(cfg, seed=1).eval()
    src = save_model_dir(model, cfg, tmp_path / "model", meta={"kiln": {"stage": "pretrain", "data_digest": "abc"}})
    assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["format"] == "hf" and summary["style"] == "llama"
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    idx = torch.randint(0, 120, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)
    out = export(src, tmp_path / "copy", "safetensors")
    again, config = load_model_dir(out["out"])
    assert config["kiln"]["data_digest"] == "abc" and config["kiln"]["stage"] == "pretrain"
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1


class LiveWeights:
    """A Weights stand-in that counts the bytes of its tensors still alive (weakref), to bound an export's peak."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.live, self.peak = state, 0, 0

    def names(self):
        return list(self.state)

    def shape(self, name):
        return tuple(self.state[name].shape)

    def dtype(self, name):
        return self.state[name].dtype

    def get(self, name):
        import weakref

        t = self.state[name].clone()
        self.live += t.nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, lambda n=t.nbytes: setattr(self, "live", self.live - n))
        return t


@pytest.mark.parametrize("style,tie,kv_heads", [("llama", True, 2), ("gpt2", False, None)])
def test_hf_export_streams_tensor_by_tensor_into_shards_transformers_loads(style, tie, kv_heads, tmp_path, monkeypatch):
    """Sharded safetensors + index, as transformers writes them, with no transformers model built to write them,
    at most a few tensors alive at once; transformers loads the dir and gives Kiln's logits."""
    import transformers

    from pipeline.hf.model import save_hf
    from pipeline.model.weights import Weights

    cfg = _cfg(style, tie, kv_heads)
    model = build_gpt(cfg, seed=5).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not (tie and k == "head.lm_head.weight")}
    source = LiveWeights(state)
    Weights.register(LiveWeights)
    largest = max(t.nbytes for t in state.values())

    def refuse(*a, **k):
        raise AssertionError("a transformers model was built to write the export")

    with monkeypatch.context() as m:
        m.setattr(transformers.PreTrainedModel, "__init__", refuse)
        info = save_hf(source, cfg, tmp_path / "hf", None, {}, max_shard_bytes=4 * largest)
    assert source.peak <= 3 * largest < sum(t.nbytes for t in state.values()) / 2  # not the whole model
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert info["shards"] == len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((tmp_path / "hf" / f).is_file() for f in files)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 120, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)
