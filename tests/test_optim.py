"""Optimizers and schedules as config (train.optimizer, train.schedule): Muon's pieces and the
warmup-stable-decay schedule. Muon under TP/DP/PP against one process: tests/test_train_layouts.py."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.model.gpt import GPT
from pipeline.parallel.optimizer import Muon, hidden_matrices, newton_schulz, param_groups
from pipeline.schedule import lr_of, on_resume, schedule_of, warmup_stable_decay

TINY = "configs/train/tiny-cpu.yaml"


def test_wsd_warms_up_holds_then_decays_over_its_last_fraction():
    lrs = [warmup_stable_decay(s, 100, 1.0, 0.1, 10, 0.2) for s in range(105)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10:80] == [1.0] * 70  # stable until the last 20 steps
    assert lrs[80] < 1.0 and all(a > b for a, b in zip(lrs[80:99], lrs[81:100], strict=True))  # strictly decaying
    assert lrs[99] == pytest.approx(0.1) and lrs[104] == pytest.approx(0.1)  # min lr at the last step, held after
    assert lrs[89] == pytest.approx(1.0 + (0.1 - 1.0) * 10 / 20)  # linear


def test_wsd_run_extended_in_its_stable_phase_follows_the_longer_schedule():
    t = RunConfig.model_validate({"train": {"schedule": "wsd", "decay_frac": 0.25, "steps": 200, "warmup_steps": 10,
                                            "lr": 1e-3, "min_lr": 1e-5}}).train.model_dump()
    rec, longer = schedule_of(t), schedule_of({**t, "steps": 400})
    assert rec["decay_frac"] == 0.25 and "last 25%" in on_resume(rec, longer, 100)[1]
    chosen, line = on_resume(rec, longer, 100)  # step 100 < 150: the past rates are the same, extend cleanly
    assert chosen == longer and "on the configured schedule" in line
    assert [lr_of(s, chosen) for s in (150, 250, 299)] == [1e-3] * 3 and lr_of(399, chosen) == pytest.approx(1e-5)
    chosen, _ = on_resume(rec, longer, 180)  # already decaying: continued as logged
    assert chosen == rec
    cosine = schedule_of({**t, "schedule": "cosine"})
    assert "decay_frac" not in cosine  # cosine records stay as older checkpoints wrote them


def plain_newton_schulz(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The textbook quintic iteration, for comparison."""
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.mT
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x


def test_newton_schulz_orthogonalizes_tall_and_wide():
    g = torch.Generator().manual_seed(0)
    for shape in ((48, 16), (16, 48), (32, 32), (16, 96), (96, 16)):  # the last two: the Gram-matrix form
        m = torch.randn(*shape, generator=g, dtype=torch.float64).float()
        o = newton_schulz(m, dtype=torch.float32)
        s = torch.linalg.svdvals(o)
        assert o.shape == shape and s.min() > 0.5 and s.max() < 1.3, (shape, s)  # ~U V^T: singular values near 1
        wide = m if shape[0] <= shape[1] else m.mT
        expect = plain_newton_schulz(wide.double()).float()
        torch.testing.assert_close(o if shape[0] <= shape[1] else o.mT, expect, rtol=0, atol=2e-5)
        # bf16 (the default where the device multiplies it natively): the same matrix to bf16's precision
        half = newton_schulz(m, dtype=torch.bfloat16)
        assert half.dtype == torch.float32 and (half - o).norm() < 0.06 * o.norm(), (shape, (half - o).norm())  # ~3%


def test_muon_steps_block_matrices_and_adamw_the_rest():
    cfg = load_config("train", TINY, ["model.vocab_size=64", "model.tie_embeddings=false", "train.optimizer=muon"])
    model = GPT(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = {names[i] for i in hidden_matrices(model)}
    assert hidden == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    groups = param_groups(model, 0.1, hidden_matrices(model), 0.0)
    opt = Muon(groups, lr=1e-3, momentum=0.9)
    params = dict(model.named_parameters())
    wq = params["blocks.0.attn.wq.weight"]
    g1, g2 = torch.randn(wq.shape, generator=torch.Generator().manual_seed(1)), torch.randn(wq.shape)
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()  # every parameter has a gradient; wq's is set by hand
    before = {n: p.detach().clone() for n, p in params.items()}
    for g in (g1, g2):
        wq.grad = g.clone()
        last = wq.detach().clone()
        opt.step()
    momentum = 0.9 * (0.1 * g1) + 0.1 * g2  # Nesterov: the update is g2 blended toward the momentum
    expect = newton_schulz(g2.lerp(momentum, 0.9))
    torch.testing.assert_close((last - wq.detach()) / 1e-3, expect, rtol=1e-3, atol=1e-4)
    assert all(p.grad is not None for p in model.parameters())  # gradients handed back after AdamW's step
    head = params["head.lm_head.weight"]
    assert not torch.equal(head, before["head.lm_head.weight"]) and "momentum_buffer" not in opt.state[head]
    saved = opt.state_dict()  # DeepSpeed checkpoints it as a torch optimizer: restores its momentum
    again = Muon(param_groups(model, 0.1, hidden_matrices(model), 0.0), lr=1e-3, momentum=0.9)
    again.load_state_dict(saved)
    torch.testing.assert_close(again.state[wq]["momentum_buffer"], opt.state[wq]["momentum_buffer"])


def test_muon_refuses_layouts_it_would_get_wrong():
    base = ["model.vocab_size=64", "train.optimizer=muon"]
    for extra, says in ((["parallel.zero_stage=3"], "train.optimizer: muon runs at zero_stage 0-2"),
                        (["parallel.tp=2", "parallel.zero_stage=1", "train.grad_clip=0"], "tp/pp > 1"),
                        (["parallel.zero_stage=1", "train.precision=bf16", "train.grad_clip=0"], "needs zero_stage 2"),
                        (["parallel.zero_stage=2"], "train.grad_clip: 1.0 with muon")):
        with pytest.raises(ConfigError, match=says):
            load_config("train", TINY, base + extra)
    load_config("train", TINY, base + ["parallel.tp=2", "parallel.pp=2"])  # stage 0 gathers TP slices
    load_config("train", TINY, base + ["parallel.zero_stage=2", "train.grad_clip=0", "train.precision=bf16"])
    for stage in ("distill", "prune"):
        with pytest.raises(ConfigError, match="kiln train's"):
            load_config(stage, None, ["train.optimizer=muon"])
