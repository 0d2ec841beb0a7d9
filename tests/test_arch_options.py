"""The architecture options of ModelConfig (issue 27): q/k norms, the ReLU² MLP, logit soft-capping, zero-initialized
output projections. Each default leaves today's models bit-identical; each option is checked through the model,
and its transformers form gives Kiln's logits or export refuses it in one line. (TP = 2 with the options on:
tests/test_tp.py's options case.)"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import KilnError, ModelConfig
from pipeline.model.flops import param_counts
from pipeline.model.gpt import GPT
from pipeline.model.layers import sub_blocks
from pipeline.model.loss import ChunkedCrossEntropy, softcap
from pipeline.parallel.materialize import build_gpt

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cfg(style: str = "llama", **kw) -> ModelConfig:
    base = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "vocab_size": 97, "tie_embeddings": False}
    return ModelConfig(style=style, **{**base, **({"n_experts": 4} if style == "mixtral" else {}), **kw})


def _batch(vocab: int = 97):
    idx = torch.arange(32).view(2, 16) % vocab
    return idx, (idx * 7 + 3) % vocab


# Weights (sha256 of names and bytes, first 16 hex digits) and loss of seed-5 models, taken from the code before
# the options existed (commit 26bbc4c): the defaults must reproduce them exactly.
# (re-pinned when seeded init became per-slice, pipeline/model/init.py)
BEFORE = {"llama": ("204c82559ca01b28", 4.563212871551514), "gpt2": ("c8a81886abf6ba4d", 4.581432342529297),
          "mixtral": ("0c1d642d4fdc67ff", 4.603570461273193)}


@pytest.mark.parametrize("style", sorted(BEFORE))
def test_defaults_keep_todays_models_bit_identical(style):
    model = build_gpt(_cfg(style), seed=5)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    idx, targets = _batch()
    assert digest.hexdigest()[:16] == BEFORE[style][0]
    assert model(idx, targets)[1].item() == pytest.approx(BEFORE[style][1], rel=0, abs=2e-6)


def test_option_param_counts():
    """q/k norms add two head_dim weights per layer; the ReLU² MLP is two 4d matrices (not three 8d/3 ones)."""
    d, head_dim, layers = 32, 8, 2
    plain = param_counts(_cfg())["total"]
    assert param_counts(_cfg(qk_norm=True))["total"] == plain + layers * 2 * head_dim
    swiglu = 3 * d * (64 * -(-8 * d // (3 * 64)))
    assert param_counts(_cfg(mlp="relu2"))["total"] == plain + layers * (2 * d * 4 * d - swiglu)
    with pytest.raises(ValueError, match="model.mlp: relu2: the mixtral family's MLP is a mixture"):
        _cfg("mixtral", mlp="relu2")


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    """RMS-normalized per head, queries and keys lose their scale: scaling wq or wk changes nothing, scaling wv
    does; without the option scaling either changes the output."""
    idx, _ = _batch()
    for qk_norm in (True, False):
        model = build_gpt(_cfg(qk_norm=qk_norm, norm_eps=1e-12), seed=1).eval()  # eps far below q's mean square
        ref = model(idx)[0]
        attn = model.blocks[0].attn
        for name in ("wq", "wk", "wv"):
            w = getattr(attn, name).weight
            with torch.no_grad():
                w.mul_(7.0)
                out = model(idx)[0]
                w.div_(7.0)
            same = torch.allclose(out, ref, rtol=0, atol=1e-5)
            assert same == (qk_norm and name != "wv"), (qk_norm, name)
    assert model.blocks[0].attn.q_norm is None


def test_relu2_mlp_is_down_of_relu_squared_up():
    model = build_gpt(_cfg(mlp="relu2"), seed=2)
    mlp = model.blocks[0].mlp
    assert mlp.fc.weight.shape == (128, 32) and mlp.fc.bias is None  # 4d wide; llama: no biases
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    want = F.linear(torch.clamp(F.linear(x, mlp.fc.weight), min=0) ** 2, mlp.proj.weight)
    torch.testing.assert_close(mlp(x), want, rtol=0, atol=1e-6)
    assert build_gpt(_cfg("gpt2", mlp="relu2"), seed=2).blocks[0].mlp.fc.bias is not None  # gpt2 keeps its biases


@pytest.mark.parametrize("tie", [False, True])
def test_logit_softcap_everywhere_logits_are_made(tie):
    """The head's logits are cap * tanh(plain / cap); the chunked loss (training) equals the loss of those logits
    with the same gradients, and differs from the uncapped loss; the tied pipeline head caps too."""
    from pipeline.parallel.pipeline_module import tied_logits

    cap = 0.2
    capped, plain = (build_gpt(_cfg(logit_softcap=c, tie_embeddings=tie), seed=3) for c in (cap, None))
    idx, targets = _batch()
    targets[0, :3] = -100
    logits, loss = capped(idx, targets)
    torch.testing.assert_close(logits, cap * torch.tanh(plain(idx)[0] / cap), rtol=0, atol=1e-6)
    assert logits.abs().max() < cap
    loss.backward()
    grads = {n: p.grad.clone() for n, p in capped.named_parameters()}
    capped.zero_grad()
    capped.hidden_loss = ChunkedCrossEntropy(7, cap=cap)
    assert capped(idx, targets)[0] is None
    chunked = capped(idx, targets)[1]
    chunked.backward()
    torch.testing.assert_close(chunked, loss, rtol=0, atol=1e-6)
    assert abs(chunked.item() - plain(idx, targets)[1].item()) > 1e-3
    for name, p in capped.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-7, msg=name)
    hidden = capped.head.hidden(torch.randn(2, 4, 32))
    torch.testing.assert_close(tied_logits(torch.nn.Identity(), capped.embed, hidden, cap=cap),
                               softcap(F.linear(hidden, capped.embed.wte.weight), cap))


def test_decoding_with_the_kv_cache_keeps_the_options():
    """Cached keys are the normalized ones and every decoded position's logits are capped: prefill, a chunk and
    single tokens give the logits of recomputing the whole sequence."""
    from pipeline.model.layers import KVCache

    model = build_gpt(_cfg(qk_norm=True, mlp="relu2", logit_softcap=0.2), seed=8).eval()
    ids = _batch()[0][:1, :12]
    cache = KVCache(len(model.blocks))
    with torch.no_grad():
        pieces = [model(ids[:, :5], cache=cache)[0], model(ids[:, 5:8], cache=cache)[0]]
        pieces += [model(ids[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), model(ids)[0], rtol=1e-5, atol=1e-6)


def test_zero_init_proj_starts_residual_outputs_at_zero_and_trains_them():
    """Every sub-block's output projection starts at zero (seeded and direct builds alike), nothing else does, and
    the first backward reaches them."""
    cfg = _cfg(zero_init_proj=True, n_layer=3)
    for model in (build_gpt(cfg, seed=4), GPT(cfg)):
        outs = {f"{sub}.{n}.weight" for sub, m in sub_blocks(model) for n in m.OUT_PROJ}
        assert len(outs) == 6
        for name, p in model.named_parameters():
            assert (p.count_nonzero() == 0) == (name in outs), name
    idx, targets = _batch()
    model(idx, targets)[1].backward()
    assert all(dict(model.named_parameters())[n].grad.abs().sum() > 0 for n in outs)
    assert not cfg.shape().get("zero_init_proj")  # init only: a resume may change it


# --------------------------------------------------------------------------- transformers forms


@pytest.mark.parametrize("kw,cls", [({"qk_norm": True}, "Qwen3ForCausalLM"),
                                    ({"qk_norm": True, "tie_embeddings": True, "n_kv_heads": 2}, "Qwen3ForCausalLM"),
                                    ({"mlp": "relu2"}, "ArceeForCausalLM"),
                                    ({"style": "gpt2", "mlp": "relu2", "tie_embeddings": True}, "GPT2LMHeadModel"),
                                    ({"zero_init_proj": True}, "LlamaForCausalLM")])
def test_options_export_to_a_transformers_class_with_kilns_logits(kw, cls):
    from pipeline.hf.mapping import to_hf

    cfg = _cfg(**{"n_embd": 64, "vocab_size": 120, **kw})
    model = build_gpt(cfg, seed=3).eval()
    with torch.no_grad():  # every weight perturbed (norms too): a dropped or swapped q/k norm cannot hide
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "head.lm_head.weight")}
    hf = to_hf(state, cfg)
    assert type(hf).__name__ == cls
    idx = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-5)


def test_qk_norm_export_dir_loads_as_qwen3(tmp_path):
    """The streamed export writes Qwen3's config (head_dim stated: Qwen3Config's default is 128)."""
    from transformers import AutoModelForCausalLM

    from pipeline.hf.model import save_hf

    cfg = _cfg(qk_norm=True, n_head=2)
    model = build_gpt(cfg, seed=6).eval()
    save_hf(model.state_dict(), cfg, tmp_path, None, {})
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.head_dim == 16
    idx, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw,key", [({"logit_softcap": 30.0}, "logit_softcap"),
                                    ({"qk_norm": True, "mlp": "relu2"}, "qk_norm"),
                                    ({"style": "gpt2", "qk_norm": True}, "qk_norm"),
                                    ({"style": "gpt2", "logit_softcap": 30.0}, "logit_softcap"),
                                    ({"style": "mixtral", "qk_norm": True}, "qk_norm")])
def test_export_refuses_options_no_transformers_class_has(kw, key):
    from pipeline.hf.mapping import transformers_config

    with pytest.raises(KilnError, match=rf"^model\.{key} .*: no transformers class represents this") as err:
        transformers_config(_cfg(**kw))
    assert "\n" not in str(err.value)
