"""`kiln quantize` on a teacher trained in this module: int8 (torchao) reloads bit for bit and stays within
1% perplexity; GPTQ-4 loses at most half of what round-to-nearest 4-bit loses; formats, lineage, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_post_common import shared_teacher

from pipeline.cli import main
from pipeline.config import QuantizeConfig
from pipeline.evaluate import evaluate_windows
from pipeline.model.io import load_model_dir, read_config, sha256_file
from pipeline.post.common import size_on_disk
from pipeline.post.int8 import quantize_int8
from pipeline.post.quantize import quantize, target_layers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    data, shared = shared_teacher(tmp_path_factory)
    teacher = Path(shutil.copytree(shared, root / "teacher"))
    import sentencepiece as spm

    from pipeline.model.io import write_sums

    # a real sentencepiece model of the teacher's vocab size: copied along by lineage, used for bits/byte
    text = ["the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly"] * 40
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(root / "sp"), vocab_size=128,
                                   model_type="bpe", minloglevel=2, hard_vocab_limit=False)
    shutil.copyfile(root / "sp.model", teacher / "tokenizer.model")

    write_sums(teacher)
    base = evaluate_windows(load_model_dir(teacher)[0], data, None)
    return root, data, teacher, base


def ppl(path, data):
    return evaluate_windows(load_model_dir(path)[0], data, None)["perplexity"]


def test_teacher_learned_something(setup):
    _, data, _, base = setup
    entropy = json.loads((data / "manifest.json").read_text())["config"]["entropy"]
    assert base["loss"] < 0.5 * torch.log(torch.tensor(128.0)).item()  # far below uniform
    assert base["loss"] < entropy + 0.6


@pytest.mark.parametrize("method", ["int8-weight", "int8-dynamic"])
def test_int8_reloads_exactly_and_keeps_perplexity(setup, method):
    root, data, teacher, base = setup
    out = root / method
    summary = quantize(teacher, QuantizeConfig(method=method, eval_windows=0), out)
    loaded, config = load_model_dir(out)
    ref = quantize_int8(load_model_dir(teacher)[0], method, target_layers(loaded, False))
    for name in target_layers(loaded, False):
        a, b = loaded.get_submodule(name).weight, ref.get_submodule(name).weight
        assert type(a).__name__ == "Int8Tensor" and torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
    idx = torch.randint(0, loaded.cfg.vocab_size, (2, 64))
    assert torch.equal(loaded(idx)[0], ref(idx)[0])
    got = ppl(out, data)
    assert abs(got / base["perplexity"] - 1) < (0.01 if method == "int8-weight" else 0.02)
    assert summary["size_bytes"] == size_on_disk(out) < 0.5 * size_on_disk(teacher)
    kiln = config["kiln"]
    assert kiln["stage"] == "quantized" and kiln["method"] == method and kiln["parent_model"] == str(teacher)
    assert kiln["parent_sha256"] == sha256_file(teacher / "model.safetensors")
    assert (out / "tokenizer.model").read_bytes() == (teacher / "tokenizer.model").read_bytes()


def test_int8_quantized_head_unties_from_fp_embedding(setup):
    root, data, teacher, base = setup
    out = root / "int8-head"
    quantize(teacher, QuantizeConfig(method="int8-weight", quantize_head=True, eval_windows=0), out)
    loaded, config = load_model_dir(out)
    assert type(loaded.head.lm_head.weight).__name__ == "Int8Tensor"
    assert loaded.embed.wte.weight.dtype == torch.float32 and "head.lm_head" in config["quantization"]["layers"]
    assert abs(ppl(out, data) / base["perplexity"] - 1) < 0.01


def test_gptq4_loses_at_most_half_of_rtn4(setup):
    """The quality bar. Group size 128 = the model width: per-channel for d=128 inputs, 3 groups on the MLP
    output layer (in 384); RTN-4 must hurt visibly for the comparison to mean anything."""
    root, data, teacher, base = setup
    rows = {}
    for method in ("rtn", "gptq"):
        out = root / f"{method}4"
        summary = quantize(teacher, QuantizeConfig(method=method, bits=4, group_size=128, calib=str(data), calib_samples=1024,
                                                   eval_windows=0), out)
        rows[f"{method}4"] = (ppl(out, data), summary["size_bytes"])
    d_rtn, d_gptq = rows["rtn4"][0] - base["perplexity"], rows["gptq4"][0] - base["perplexity"]
    print(f"teacher ppl {base['perplexity']:.4f}  rtn4 +{d_rtn:.4f}  gptq4 +{d_gptq:.4f}")
    # ~0.1% for this converged teacher: small but well above the first-order noise of weight perturbations
    # (GPTQ-4 lands at ~0.0-0.05% over several seeds; bench/post_quality.py reports the figures)
    assert d_rtn > 0.0005 * base["perplexity"], "RTN-4 barely hurts this model: the comparison would be noise"
    assert d_gptq <= 0.5 * d_rtn
    assert rows["gptq4"][1] < 0.3 * size_on_disk(teacher)  # 4-bit codes + fp16 scales vs fp32


@pytest.mark.parametrize("bits", [3, 8])
def test_other_bit_widths_load_and_order_sensibly(setup, bits):
    root, data, teacher, base = setup
    out = root / f"gptq{bits}"
    quantize(teacher, QuantizeConfig(method="gptq", bits=bits, calib=str(data), calib_samples=32, eval_windows=0), out)
    q = read_config(out)["quantization"]
    assert q["bits"] == bits and q["act_order"] is True
    got = ppl(out, data)
    if bits == 8:
        assert abs(got / base["perplexity"] - 1) < 0.005
    else:
        assert base["perplexity"] < got < 1.5 * base["perplexity"]


def test_cli_quantize_json_and_errors(setup, capsys):
    root, data, teacher, _ = setup
    out = root / "cli-rtn"
    assert main(["quantize", str(teacher), "--method", "rtn", "--bits", "3", "--group-size", "64", "--calib", str(data),
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "rtn" and summary["bits"] == 3 and summary["perplexity"] > summary["parent_perplexity"]
    assert read_config(out)["quantization"]["group_size"] == 64
    assert main(["quantize", str(teacher), "--method", "gptq", "--out", str(root / "x")]) == 2
    assert "calib: gptq needs calibration data" in capsys.readouterr().err
    assert main(["quantize", str(teacher), "--method", "gptq4", "--bits", "3", "--out", str(root / "x")]) == 2
    assert "bits: 3 contradicts method gptq4 (4 bits); write method: gptq, bits: 3" in capsys.readouterr().err
    assert not (root / "x").exists()
    assert main(["quantize", str(out), "--method", "rtn4", "--out", str(root / "y")]) == 1  # already quantized (rtn4: the old name, still taken)
    assert "already quantized" in capsys.readouterr().err


def test_report_compares_against_the_teacher(setup):
    from pipeline.post.report import compare

    root, data, teacher, base = setup
    quantize(teacher, QuantizeConfig(method="int8-weight", eval_windows=0), root / "r-int8")
    quantize(teacher, QuantizeConfig(method="rtn", eval_windows=0), root / "r-rtn4")
    rows = compare({"teacher": teacher, "int8": root / "r-int8", "rtn4": root / "r-rtn4"}, data, max_windows=16)
    by = {r["model"]: r for r in rows}
    assert by["teacher"]["stage"] == "trained" and by["int8"]["stage"] == "quantized" and by["rtn4"]["method"] == "rtn"
    assert by["rtn4"]["size_mb"] < by["int8"]["size_mb"] < by["teacher"]["size_mb"]
    assert by["int8"]["nonzero"] > 0.9 * by["teacher"]["nonzero"]
    for r in rows:
        assert r["bits_per_byte"] > 0 and r["tokens_per_s"] > 0
        assert r["bits_per_byte"] == pytest.approx(by["teacher"]["bits_per_byte"] * r["loss"] / by["teacher"]["loss"])
