"""`kiln prune`: exact sparsity patterns, masks that survive recovery fine-tuning, lineage, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from test_post_common import markov_corpus, train_teacher

from pipeline.checkpoint import TorchState, step_dirs, verify
from pipeline.cli import main
from pipeline.config import ConfigError, PruneConfig, build
from pipeline.model.io import load_model_dir
from pipeline.post.common import block_linears
from pipeline.post.prune import prune, recovery_checkpoints, two_four_mask, unstructured_mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    data = markov_corpus(root / "data", train_docs=100, val_docs=20)
    teacher = train_teacher(data, root / "teacher", steps=120, n_embd=64)
    return root, data, teacher


def test_masks_keep_the_largest_weights():
    w = torch.tensor([[0.1, -0.9, 0.3, 0.05, 2.0, -0.2, 0.0, 0.7]])
    assert two_four_mask(w).tolist() == [[0, 1, 1, 0, 1, 0, 0, 1]]
    assert unstructured_mask(w, 0.75).tolist() == [[0, 1, 0, 0, 1, 0, 0, 0]]
    big = torch.randn(64, 96)
    m = unstructured_mask(big, 0.3)
    assert m.sum().item() == 64 * 96 - round(0.3 * 64 * 96)
    assert big.abs()[m == 1].min() >= big.abs()[m == 0].max()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_with_recovery_keeps_mask_and_recovers(setup, pattern, monkeypatch, caplog):
    root, data, teacher = setup
    out = root / f"pruned-{pattern}"
    cfg = PruneConfig(sparsity=0.5, pattern=pattern, data=str(data), train={"steps": 30, "lr": 1e-3, "min_lr": 1e-4},
                      eval_windows=32, checkpoint={"every": 20, "keep": 1})
    s = prune(teacher, cfg, out)
    model, config = load_model_dir(out)
    for name, layer in block_linears(model).items():
        w = layer.weight.detach()
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3), name
        if pattern == "2:4":
            assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert s["block_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert s["nonzero"] == s["nonzero_before"] - s["pruned_params"] < s["params"]
    assert s["pruned_perplexity"] > s["parent_perplexity"]
    assert s["perplexity"] < s["pruned_perplexity"]  # recovery fine-tuning helped, with the mask kept
    kiln = config["kiln"]
    assert kiln["stage"] == "pruned" and kiln["pattern"] == pattern and kiln["parent_model"] == str(teacher)
    assert kiln["recovery_steps"] == 30 and len(s["recovery_losses"]) == 30
    ckpts = recovery_checkpoints(out)  # training's protocol: checksummed, keep-N, `latest`
    assert ckpts == root / f"pruned-{pattern}.checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000030"]
    verify(ckpts / "step_0000030")
    if pattern == "unstructured":  # interrupted after step 20: a rerun resumes there and lands on the same model
        again, quick = root / "again", cfg.model_copy(update={"eval_windows": 0})  # evals do not change training
        real_save = TorchState.save

        def save_then_die(self, directory):
            if directory.name == ".tmp-step_0000030":
                raise KeyboardInterrupt
            return real_save(self, directory)

        with monkeypatch.context() as m:
            m.setattr(TorchState, "save", save_then_die)
            with pytest.raises(KeyboardInterrupt):
                prune(teacher, quick, again)
        assert not again.exists() and step_dirs(recovery_checkpoints(again))[0].name == "step_0000020"
        with caplog.at_level("INFO"):
            s2 = prune(teacher, quick, again)
        assert "resuming from" in caplog.text and s2["recovery_losses"] == s["recovery_losses"]
        a, b = load_model_dir(out)[0].state_dict(), load_model_dir(again)[0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_errors_and_cli(setup, capsys):
    root, data, teacher = setup
    with pytest.raises(ConfigError, match=r"^<config>: sparsity: 0.3 with pattern 2:4, which is exactly 0.5"):
        build(PruneConfig, {"sparsity": 0.3, "pattern": "2:4"})
    with pytest.raises(ConfigError, match=r"^<config>: data: train.steps > 0 \(recovery fine-tuning\) needs"):
        build(PruneConfig, {"train": {"steps": 5}})
    assert build(PruneConfig, {"pattern": "2:4", "train": {"steps": 5}, "data": "d"}).train.steps == 5
    rc = main(["prune", str(teacher), "--sparsity", "0.25", "--out", str(root / "cli"), "--set", f"data={data}",
               "--set", "eval_windows=8", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["block_sparsity"] == pytest.approx(0.25, abs=1e-3) and summary["perplexity"] > 1
    assert main(["prune", str(root / "nope"), "--out", str(root / "y")]) == 1
    assert "not a MODEL directory" in capsys.readouterr().err
