"""The plain GPT: shapes, causality, parameter counts vs the analytic ones, MODEL dir round trip."""

import pytest
import torch

from pipeline.config import KilnError, ModelConfig
from pipeline.model.flops import param_counts
from pipeline.model.gpt import GPT
from pipeline.model.io import load_model_dir, save_model_dir
from pipeline.parallel.parallelize import checkpointed


def tiny(style="llama", tie=True):
    return ModelConfig(style=style, n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=97, tie_embeddings=tie)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_param_count_matches_analytic(style, tie, kv_heads):
    """Counts (derived from the meta-built modules) against the formula written out by hand: d=32, 4 heads
    of 8, key/value width 8*kv, MLP 128 (gpt2) or 64*ceil(8*32/3/64)=128 (llama), vocab 97, 16 positions."""
    cfg = tiny(style, tie).model_copy(update={"n_kv_heads": kv_heads})
    d, kv, f, v = 32, 8 * (kv_heads or 4), 128, 97
    if style == "llama":  # q, o: d*d; k, v: d*kv; three MLP matrices; two RMSNorm weights
        layer, final, embedding = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d, d, v * d
    else:  # the same with biases, a GELU MLP, two LayerNorms with bias; learned positions
        layer = 2 * d * d + 2 * d * kv + 2 * d + 2 * kv + 2 * d * f + f + d + 4 * d
        final, embedding = 2 * d, v * d + 16 * d
    non_embedding = 2 * layer + final + (0 if tie else v * d)
    counts = param_counts(cfg)
    assert counts["total"] == embedding + non_embedding == GPT(cfg).num_params()
    assert counts["non_embedding"] == non_embedding
    assert counts["flop_params"] == non_embedding + (v * d if tie else 0)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_forward_shapes_and_loss(style):
    torch.manual_seed(0)
    model = GPT(tiny(style))
    idx, targets = torch.randint(0, 97, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 97)
    # at init the model is near-uniform: loss close to ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.3
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_causal(style):
    torch.manual_seed(0)
    model = GPT(tiny(style)).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx)[1].backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for block in model.blocks:
        checkpointed(block)
    model(idx, idx)[1].backward()
    for r, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(r, p.grad)


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="exceeds model.block_size"):
        GPT(tiny())(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.fault
def test_model_dir_round_trip_and_corruption(tmp_path):
    torch.manual_seed(0)
    cfg = tiny()
    model = GPT(cfg).eval()
    out = save_model_dir(model, cfg, tmp_path / "model", meta={"kiln": {"stage": "pretrain"}})
    loaded, config = load_model_dir(out)
    assert config["kiln"]["stage"] == "pretrain"
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(model(idx)[0], loaded(idx)[0], rtol=0, atol=0)
    assert loaded.head.lm_head.weight is loaded.embed.wte.weight  # tie survives
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(KilnError, match="checksum mismatch"):
        load_model_dir(out)
