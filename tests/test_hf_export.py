"""Registered models load where users load models: `kiln fetch --format hf` -> transformers.

plain and int8 (torchao) load with transformers in this process; GPTQ-4 loads through transformers'
GPTQ integration with GPTQModel's CPU kernel (in a subprocess: it patches transformers), and its
packed tensors are also read back by an unpacker written here from the format's description."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import KilnError, TrackingConfig
from pipeline.model.io import load_model_dir
from pipeline.tracking import Tracker
from tests.factories import ROOT

NAME = "tiny"


@pytest.fixture(scope="module")
def fetched(tmp_path_factory, tiny_family):
    """The family registered (aliases plain/int8/gptq4) and fetched back in both forms."""
    root = tmp_path_factory.mktemp("hf-export")
    family = tiny_family
    tracker = Tracker(TrackingConfig(experiment="hf-export"), uri=f"sqlite:///{root / 'mlflow.db'}")
    out = {"tracker": tracker, "root": root}
    for alias in ("plain", "int8", "gptq4"):
        info = tracker.register(family[alias], NAME, alias=alias)
        assert info["hf"]["name"] == f"{NAME}-hf"  # the transformers form registered alongside
        out[alias] = tracker.fetch(f"models:/{NAME}@{alias}", root / "kiln" / alias)["out"]
        res = tracker.fetch(f"models:/{NAME}@{alias}", root / "hf" / alias, fmt="hf")
        assert res["converted"] is False  # downloaded, not converted here
        out[f"{alias}-hf"] = res["out"]
    return out


def tokens():
    return torch.randint(3, 1000, (2, 48), generator=torch.Generator().manual_seed(5))


def kiln_logits(path):
    with torch.inference_mode():
        return load_model_dir(path)[0](tokens())[0]


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["plain", "int8"])
def test_fetched_hf_form_loads_in_transformers_with_kiln_logits(fetched, alias):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = fetched[f"{alias}-hf"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, device_map="cpu")
    if alias == "int8":  # served as torchao int8 inside transformers, not dequantized floats
        assert json.load(open(f"{hf_dir}/config.json"))["quantization_config"]["quant_method"] == "torchao"
        assert hasattr(model.model.layers[0].mlp.down_proj.weight, "qdata")
    with torch.inference_mode():
        delta = (model(tokens()).logits - kiln_logits(fetched[alias])).abs().max().item()
    print(f"{alias}: transformers vs Kiln logits max|d| = {delta:.3g}")
    assert delta < 1e-5
    tok = AutoTokenizer.from_pretrained(hf_dir)
    sp = spm.SentencePieceProcessor(model_file=f"{hf_dir}/tokenizer.model")
    text = "Return the absolute value of the argument. 東京 2026"
    assert tok(text)["input_ids"] == sp.encode(text)


GPTQ_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.float32)
ids = torch.load(sys.argv[2])
with torch.inference_mode():
    logits = model(ids).logits
print(json.dumps({"kernel": type(model.model.layers[0].self_attn.q_proj).__name__,
                  "delta": (logits - torch.load(sys.argv[3])).abs().max().item()}))
"""


@pytest.mark.slow
def test_gptq_form_loads_with_gptqmodel_on_cpu(fetched, tmp_path):
    """transformers' GPTQ integration (GPTQModel, installed by make setup) reads the packed layout."""
    torch.save(tokens(), tmp_path / "ids.pt")
    ref = kiln_logits(fetched["gptq4"])
    torch.save(ref, tmp_path / "ref.pt")
    res = subprocess.run([sys.executable, "-c", GPTQ_LOAD, fetched["gptq4-hf"], str(tmp_path / "ids.pt"),
                          str(tmp_path / "ref.pt")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"gptq4: GPTQModel ({got['kernel']}) vs Kiln logits max|d| = {got['delta']:.3g} "
          f"(logits up to {ref.abs().max().item():.3g})")
    assert "Linear" in got["kernel"] and got["kernel"] != "Linear"  # a GPTQ kernel, not a float layer
    assert got["delta"] < 1e-3 * max(1.0, ref.abs().max().item())


def unpack_gptq(qweight, qzeros, scales, g_idx, bits):
    """From the format's description: qweight (in/p, out) and qzeros (groups, out/p) hold p = 32/bits
    codes per int32, code k in bits [bits*k, bits*k + bits); stored zeros are zero - 1;
    w[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])."""
    p, mask = 32 // bits, 2**bits - 1
    shifts = torch.arange(p) * bits
    q = ((qweight.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1])
    z = ((qzeros.to(torch.int64)[:, :, None] >> shifts[None, None, :]) & mask).reshape(qzeros.shape[0], -1) + 1
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g]).float()).t()


@pytest.mark.slow
def test_gptq_layout_read_by_an_independent_unpacker(fetched):
    cfg = json.load(open(f"{fetched['gptq4-hf']}/config.json"))["quantization_config"]
    assert (cfg["quant_method"], cfg["bits"], cfg["checkpoint_format"]) == ("gptq", 4, "gptq")
    hf = load_file(f"{fetched['gptq4-hf']}/model.safetensors")
    kiln = load_model_dir(fetched["gptq4"])[0].state_dict()
    checked = 0
    for i in range(2):
        for ours, theirs in (("attn.wq", "self_attn.q_proj"), ("mlp.w2", "mlp.down_proj")):
            m = f"model.layers.{i}.{theirs}"
            assert hf[f"{m}.qweight"].dtype == torch.int32 and f"{m}.weight" not in hf
            w = unpack_gptq(hf[f"{m}.qweight"], hf[f"{m}.qzeros"], hf[f"{m}.scales"], hf[f"{m}.g_idx"], 4)
            assert torch.equal(w, kiln[f"blocks.{i}.{ours}.weight"])
            checked += 1
    assert checked == 4


def test_zero_point_zero_is_reexpressed_exactly_or_refused():
    from pipeline.hf.quantized import pack_int32, v1_codes

    q = torch.tensor([[0, 3, 14, 7], [15, 1, 2, 3]], dtype=torch.uint8)
    zeros = torch.tensor([[0, 5], [2, 0]], dtype=torch.uint8)  # (out, groups): two columns per group
    g_idx = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    q2, z2 = v1_codes(q, zeros, g_idx, 4, "layer")
    assert int(z2.min()) >= 1
    assert torch.equal(q2 - z2[:, g_idx.long()], q.long() - zeros.long()[:, g_idx.long()])
    with pytest.raises(KilnError, match="zero point 0 uses code 15"):
        v1_codes(q, torch.tensor([[0, 5], [2, 0]]).flip(0).to(torch.uint8), g_idx, 4, "layer")
    packed = pack_int32(torch.arange(16).reshape(16, 1) % 16, 4, dim=0)
    assert packed.tolist() == [[0x76543210], [0xFEDCBA98 - 2**32]]  # the second as int32 bits


@pytest.mark.slow
def test_registry_links_versions_runs_and_forms(fetched):
    c = fetched["tracker"].client
    for alias in ("plain", "int8", "gptq4"):
        mv = c.get_model_version_by_alias(NAME, alias)
        lm = c.get_logged_model(mv.tags["kiln.model_id"])
        assert {"name": NAME, "version": str(mv.version)} in json.loads(lm.tags["mlflow.modelVersions"])
        hf = c.get_model_version_by_alias(f"{NAME}-hf", alias)
        assert lm.tags["kiln.hf_model_id"] == hf.tags["kiln.model_id"] == mv.tags["kiln.hf_model_id"]
        run = c.get_run(lm.source_run_id)
        outputs = {o.model_id for o in run.outputs.model_outputs}
        assert {lm.model_id, hf.tags["kiln.model_id"]} <= outputs  # the producer run lists both forms


@pytest.mark.slow
def test_fetch_hf_converts_a_version_registered_without_its_form(fetched, tmp_path):
    c = fetched["tracker"].client
    mv = c.get_model_version_by_alias(NAME, "int8")
    c.delete_logged_model_tag(mv.tags["kiln.model_id"], "kiln.hf_model_id")
    res = fetched["tracker"].fetch(f"models:/{NAME}@int8", tmp_path / "hf", fmt="hf")
    assert res["converted"] is True
    assert json.load(open(tmp_path / "hf" / "config.json"))["quantization_config"]["quant_method"] == "torchao"
