"""GPTQ against a direct (unblocked, explicit-inverse) implementation of the paper's update rule,
against round-to-nearest on a layer's own objective, and the packed int4 format round trip."""

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model.gpt import GPT
from pipeline.model.io import load_model_dir, save_model_dir
from pipeline.post import packed
from pipeline.post.gptq import block_stages, gptq, quantize_model
from pipeline.post.packed import minmax_params, rtn


def correlated_inputs(n=1024, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return torch.randn(n, d, generator=g) @ mix + 0.2 * torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d)


def reference_gptq(W, H, bits, gs, act_order, damp=0.01):
    """Optimal Brain Quantization order-by-order with the explicit inverse Hessian (no Cholesky, no blocks)."""
    W, H = W.double().clone(), H.double().clone()
    cols, maxq = W.shape[1], 2**bits - 1
    gs = gs if 0 < gs < cols else cols
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    Hinv = torch.linalg.inv(H + damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype))
    Q = torch.zeros_like(W)
    for p, i in enumerate(order.tolist()):
        if p % gs == 0:
            scale, zero = minmax_params(W[:, order[p:p + gs]].float(), maxq)
            scale, zero = scale.double(), zero.double()
        q = torch.clamp(torch.round(W[:, i] / scale) + zero, 0, maxq)
        Q[:, i] = (q - zero) * scale
        err = (W[:, i] - Q[:, i]) / Hinv[i, i]
        W -= err.unsqueeze(1) * Hinv[i].unsqueeze(0)
        Hinv -= Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return Q.float()


@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_direct_obq_update(group_size, act_order):
    X = correlated_inputs()
    W = torch.randn(48, X.shape[1], generator=torch.Generator().manual_seed(1)) * 0.05
    H = 2 * X.T @ X / X.shape[0]
    ours = gptq(W, H, 4, group_size, act_order, block=32).dequantize()
    ref = reference_gptq(W, H, 4, group_size, act_order)
    same = torch.isclose(ours, ref, atol=1e-6).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of weights agree with the direct update rule"


@pytest.mark.parametrize("group_size", [0, 32])
def test_gptq_beats_rtn_on_layer_objective(group_size):
    X = correlated_inputs(seed=2)
    W = torch.randn(64, X.shape[1], generator=torch.Generator().manual_seed(3)) * 0.05
    H = 2 * X.T @ X / X.shape[0]

    def err(q):
        return ((X @ (W - q.dequantize()).T) ** 2).sum().item()

    e_rtn = err(rtn(W, 4, group_size))
    for act_order in (False, True):
        assert err(gptq(W, H, 4, group_size, act_order)) < 0.85 * e_rtn


def test_blocked_lazy_updates_equal_unblocked():
    X = correlated_inputs(d=64, seed=4)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    H = 2 * X.T @ X / X.shape[0]
    a = gptq(W, H, 4, 16, True, block=64).q
    b = gptq(W, H, 4, 16, True, block=16).q
    assert (a == b).float().mean() > 0.99


def test_dead_inputs_and_codes_in_range():
    X = correlated_inputs(d=32, seed=6)
    X[:, 5] = 0  # an input that never fires
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(7))
    qw = gptq(W, 2 * X.T @ X / X.shape[0], 3, 0, True)
    assert qw.q.max() <= 7 and qw.q.min() >= 0
    # the dead input's weights are zeroed before quantizing: its code is each row's zero point, exactly 0
    assert torch.equal(qw.dequantize()[:, 5], torch.zeros(8))
    assert (qw.dequantize()[:, [4, 6]] != 0).float().mean() > 0.5  # the live neighbours mostly are not
    assert qw.g_idx.unique().numel() == 1


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("cols", [7, 64])
def test_pack_unpack_round_trip(bits, cols):
    q = torch.randint(0, 2**bits, (5, cols), dtype=torch.uint8)
    codes = packed.pack(q, bits)
    assert codes.shape[1] == ((cols + 1) // 2 if bits <= 4 else cols)
    assert torch.equal(packed.unpack(codes, bits, cols), q)


def test_rtn_groups_and_error_bound():
    W = torch.randn(16, 96)
    qw = rtn(W, 4, 32)
    assert qw.scales.shape == (16, 3) and torch.equal(qw.g_idx, (torch.arange(96) // 32).int())
    step = qw.scales.float()[:, qw.g_idx.long()]
    # half a step, plus what the fp16 rounding of the scale (relative 2^-11) moves the extreme codes (maxq = 15)
    assert ((W - qw.dequantize()).abs() <= step / 2 + 15 * step * 2**-11 + 1e-6).all()


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_packed_model_dir_round_trip_with_act_order(tmp_path, style):
    torch.manual_seed(0)
    cfg = ModelConfig(style=style, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    model = GPT(cfg).eval()
    calib = torch.randint(0, 64, (8, 16))
    assert block_stages(model.blocks[0])[0] == ["attn.wq", "attn.wk", "attn.wv"]
    qweights = quantize_model(model, calib, bits=4, group_size=16, act_order=True, quantize_head=True)
    assert "head.lm_head" in qweights and len(qweights) == 2 * (7 if style == "llama" else 6) + 1
    quant = {"format": "packed", "method": "gptq", "bits": 4, "layers": sorted(qweights)}
    save_model_dir(packed.state(model, qweights), cfg, tmp_path / "m", None, {"quantization": quant})
    loaded, config = load_model_dir(tmp_path / "m")
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    # the quantized head is its own tensor; the embedding stays full precision
    assert loaded.head.lm_head.weight.data_ptr() != loaded.embed.wte.weight.data_ptr()
