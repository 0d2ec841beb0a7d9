"""The Mixture-of-Experts family (pipeline/families/mixtral.py, layers.MoE): top-k routing with renormalized gates
and no dropped token, the Switch/Mixtral load-balancing loss in the training loss (not in evaluation), the
transformers form (MixtralForCausalLM) with Kiln's logits, and active parameters in plan / MFU counts.
(Training at TP=2 / DP=2 with parity to one process: tests/test_train_layouts.py.)"""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.config import KilnError, ModelConfig
from pipeline.model.layers import MoE, balance_loss, route
from pipeline.parallel.materialize import build_gpt

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def moe_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"style": "mixtral", "n_layer": 2, "n_head": 4, "n_kv_heads": 2, "n_embd": 32,
                          "block_size": 16, "vocab_size": 96, "n_experts": 4, "ffn_hidden": 32,
                          "tie_embeddings": False, **kw})


@pytest.fixture(scope="module")
def layer() -> MoE:
    torch.manual_seed(0)
    return MoE(moe_cfg(moe_shared_hidden=16)).eval()


def test_each_token_gets_its_top_k_experts_by_renormalized_gates(layer):
    """Every token's output is sum over its k best experts of p_e / (sum of the k p's) x expert_e(x), plus
    the shared expert, token by token; also when the router sends every token to one expert (nothing dropped)."""
    x = torch.randn(3, 8, 32)
    for skew in (0.0, 50.0):
        with torch.no_grad():
            layer.router.weight[0] += skew  # skew > 0: expert 0 wins every token with positive sum
            y = layer(x)
            flat = x.reshape(-1, 32)
            probs = torch.softmax(flat @ layer.router.weight.t(), dim=-1)
            for t, tok in enumerate(flat):
                top = probs[t].topk(2)
                want = sum(g / top.values.sum() * layer.experts[int(e)](tok) for g, e in zip(*top, strict=True))
                torch.testing.assert_close(y.reshape(-1, 32)[t], want + layer.shared(tok), rtol=1e-5, atol=1e-6)
            layer.router.weight[0] -= skew
    _, gates, experts = route(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), 2)
    assert experts.tolist() == [[1, 3]] and gates.sum().item() == pytest.approx(1.0)


def test_balance_loss_is_transformers_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(40, 4, generator=torch.Generator().manual_seed(1)) * 2
    probs, _, experts = route(logits, 2)
    want = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    torch.testing.assert_close(balance_loss(probs, experts), want)
    uniform, _, idx = route(torch.zeros(8, 4), 2)
    assert balance_loss(uniform, idx).item() == pytest.approx(2.0)  # k at a uniform router


def test_training_loss_adds_the_balancing_loss_evaluation_does_not():
    from pipeline.model.loss import ChunkedCrossEntropy

    cfg = moe_cfg(moe_aux_loss_coef=0.5)
    model = build_gpt(cfg, seed=1)
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    for chunked in (None, ChunkedCrossEntropy(7)):  # the logits path (evaluation, PP) and the hidden-state one
        model.hidden_loss = chunked
        model.train()
        trained = model(idx, idx)[1]
        aux = [b.mlp.aux_loss for b in model.blocks]
        assert aux == [None, None]  # taken once
        model.eval()
        evaluated = model(idx, idx)[1]
        routes = [route(b.mlp.router(h), 2) for b, h in zip(model.blocks, _mlp_inputs(model, idx), strict=True)]
        want = 0.5 * sum(balance_loss(probs, experts) for probs, _, experts in routes)
        torch.testing.assert_close(trained - evaluated, want, rtol=1e-5, atol=1e-6)
        trained.backward()
        assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def _mlp_inputs(model, idx) -> list[torch.Tensor]:
    seen = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].size(-1))))
             for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return seen


def test_mixtral_export_has_kiln_logits(tmp_path):
    """In memory and as saved (transformers writes and reads back its fused expert layout)."""
    from transformers import AutoModelForCausalLM

    from pipeline.hf.mapping import to_hf

    cfg = moe_cfg()
    model = build_gpt(cfg, seed=3).eval()
    hf = to_hf(model.state_dict(), cfg)
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 4
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(loaded(idx).logits, model(idx)[0], rtol=0, atol=1e-4)
    with pytest.raises(KilnError, match="moe_shared_hidden"):
        to_hf(build_gpt(moe_cfg(moe_shared_hidden=16), seed=3).state_dict(), moe_cfg(moe_shared_hidden=16))


def test_config_refuses_what_the_experts_do_not_support_yet():
    from pipeline.config import RunConfig

    with pytest.raises(ValueError, match="dense MLP"):
        ModelConfig(style="llama", n_experts=4)
    with pytest.raises(ValueError, match="n_experts >= 2"):
        ModelConfig(style="mixtral", n_experts=0)
    model = moe_cfg().model_dump()
    for parallel, train, says in (({"pp": 2}, {}, "pipeline stages"), ({"ep": 2, "tp": 2}, {}, "tp 1"),
                                  ({"ep": 2}, {"activation_checkpointing": "selective"}, "use full"),
                                  ({"ep": 3}, {}, "divisible")):
        with pytest.raises(ValueError, match=says):
            RunConfig(model=model, parallel=parallel, train=train)
    with pytest.raises(ValueError, match="model.n_experts divisible"):
        RunConfig(model=moe_cfg(style="llama", n_experts=0).model_dump(), parallel={"ep": 2})


def test_plan_and_mfu_count_the_parameters_a_token_runs_through(tmp_path):
    """Active: attention, norms, the router, experts_per_token of n_experts experts and the shared expert;
    the total (memory) counts every expert."""
    import yaml

    from pipeline.model.flops import flops_per_token, param_counts
    from pipeline.plan import make_plan

    cfg = moe_cfg(moe_shared_hidden=16)
    d, w, kv, v, layers, e, k = 32, 32, 16, 96, 2, 4, 2
    expert = 3 * d * w
    block = 2 * d + 2 * d * d + 2 * d * kv + d * e + k * expert + 3 * d * 16
    non_embedding = layers * block + d + v * d  # final norm, untied head
    counts = param_counts(cfg)
    assert counts["flop_params"] == non_embedding
    assert counts["total"] - counts["active"] == layers * (e - k) * expert
    assert counts["active"] == non_embedding + v * d
    assert flops_per_token(cfg) == 6 * non_embedding + 12 * layers * d * 16
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump({"model": cfg.model_dump()}))
    plan = make_plan(flops=1e18, model=str(tmp_path / "moe.yaml"))
    assert (plan["model_params"], plan["model_active_params"]) == (counts["total"], counts["active"])
    assert plan["tokens_for_model"] == pytest.approx(1e18 / (6 * counts["active"]))


def test_gptq_and_int8_quantize_every_expert(tmp_path):
    """`kiln quantize` (GPTQ 4-bit, int8) reaches each expert's linears; GPTQ's stages calibrate each expert on
    the tokens routed to it, and an expert no calibration token reaches is rounded to nearest, not zeroed."""
    from pipeline.config import QuantizeConfig
    from pipeline.model.io import load_model_dir, save_model_dir
    from pipeline.post.quantize import quantize
    from tests.factories import fake_corpus

    cfg = moe_cfg(vocab_size=100, ffn_hidden=64, experts_per_token=1)
    model = build_gpt(cfg, seed=5)
    with torch.no_grad():  # block 1 routes each token to expert 0 or 1 (logits a, -a, 0, 0): 3 never gets one
        router = model.blocks[1].mlp.router.weight
        router[1], router[2:] = -router[0], 0.0
    save_model_dir(model, cfg, tmp_path / "plain", meta={"kiln": {"stage": "pretrain"}})
    data = fake_corpus(tmp_path / "data", vocab_size=100)
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(idx)[0]
    for method, extra in (("gptq", {"calib": str(data), "calib_samples": 8, "group_size": 32, "calib_seq_len": 16}),
                          ("int8-weight", {})):
        summary = quantize(tmp_path / "plain", QuantizeConfig(method=method, bits=4 if method == "gptq" else 8,
                                                              eval_windows=0, **extra), tmp_path / method)
        got, config = load_model_dir(tmp_path / method)
        layers = config["quantization"]["layers"]
        assert {f"blocks.{b}.mlp.experts.{e}.{w}" for b in (0, 1) for e in range(4) for w in ("w1", "w2", "w3")} <= set(layers)
        assert summary["layers"] == len(layers)
        with torch.no_grad():
            err = (got(idx)[0] - want).abs().mean() / want.abs().mean()
        assert err < 0.1, (method, err)
    from pipeline.hf.quantized import _has_quantized_form

    with pytest.raises(KilnError, match="no transformers form for the mixtral family"):  # fused experts
        _has_quantized_form(tmp_path / "gptq", cfg, "gptq")
    idle = load_model_dir(tmp_path / "gptq")[0].blocks[1].mlp.experts[3].w1
    torch.testing.assert_close(idle.dequantized() if hasattr(idle, "dequantized") else idle.weight,
                               model.blocks[1].mlp.experts[3].w1.weight, rtol=0, atol=0.02)
