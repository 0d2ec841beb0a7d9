"""`kiln distill` with Accelerate (one CPU process): beats the same student trained from scratch on the
same tokens, resumes exactly from its checkpoints, refuses students it cannot distil into."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_post_common import shared_teacher

from pipeline.checkpoint import TorchState
from pipeline.cli import main
from pipeline.config import ConfigError, DistillConfig, ModelConfig, TrainConfig
from pipeline.evaluate import evaluate_windows
from pipeline.model.gpt import GPT
from pipeline.model.io import load_model_dir
from pipeline.post.common import train_steps
from pipeline.post.distill import distill, distill_loss, init_from_teacher
from pipeline.schedule import lr_of, schedule_of


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data, teacher = shared_teacher(tmp_path_factory)
    student = root / "student.yaml"
    student.write_text("model: {style: llama, n_layer: 1, n_head: 4, n_embd: 128}\n")
    return root, data, teacher, student


def cfg(steps: int, **kw) -> DistillConfig:
    train = TrainConfig(micro_batch_size=8, steps=steps, lr=2e-3, min_lr=2e-4, warmup_steps=5, precision="fp32",
                        weight_decay=0.0, seed=7, log_every=5)
    return DistillConfig(train=train, **{"eval_windows": 64, **kw})


def test_distilled_student_beats_scratch_on_same_tokens(setup):
    root, data, teacher, student = setup
    steps = 60
    summary = distill(teacher, student, data, root / "kd", cfg(steps))
    assert summary["init_layers"] == [0]
    kd = evaluate_windows(load_model_dir(root / "kd" / "model")[0], data, 64)["loss"]
    torch.manual_seed(7)
    scratch = GPT(ModelConfig(style="llama", n_layer=1, n_head=4, n_embd=128, block_size=64, vocab_size=128))
    train_steps(scratch, data, steps, lr=2e-3, batch_size=8, seed=7, min_lr=2e-4, warmup=5)  # same windows, same count
    base = evaluate_windows(scratch, data, 64)["loss"]
    print(f"val loss: teacher {summary['teacher_val_loss']:.4f} distilled {kd:.4f} scratch {base:.4f}")
    assert kd == pytest.approx(summary["val_loss"])
    assert kd < base - 0.05
    config = json.loads((root / "kd" / "model" / "config.json").read_text())
    assert config["kiln"]["stage"] == "distilled" and config["kiln"]["parent_model"] == str(teacher)
    assert config["model"]["n_layer"] == 1 and config["model"]["vocab_size"] == 128
    lines = [json.loads(x) for x in (root / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == steps and {"kl", "ce", "lr", "tokens"} <= set(lines[-1])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model" / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_or_corrupt_checkpoints_resume_to_the_same_result(setup, monkeypatch, caplog):
    """Training's checkpoint protocol: a save interrupted before its rename leaves only a temp dir, the run
    resumes from the previous checkpoint; a corrupt newest checkpoint is skipped for the one before. Both
    land on the weights and metrics of the uninterrupted run, on train's LR schedule."""
    root, data, teacher, student = setup
    c = cfg(10, checkpoint={"every": 5, "keep": 2}, hidden_weight=0.5, eval_windows=0)
    distill(teacher, student, data, root / "full", c)
    ref = weights(root / "full")
    sched = schedule_of(c.train.model_dump())
    assert [m["lr"] for m in metrics(root / "full")] == [lr_of(4, sched), lr_of(9, sched)]

    real_save = TorchState.save

    def save_then_die(self, directory):  # killed while writing step 10, after its files, before the rename
        written = real_save(self, directory)
        if directory.name == ".tmp-step_0000010":
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(TorchState, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student, data, root / "cut", c)
    monkeypatch.undo()
    ckpts = root / "cut" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step_0000010", "latest", "step_0000005"]
    assert distill(teacher, student, data, root / "cut", c)["resumed_from"] == 5
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000005", "step_0000010"]
    got = weights(root / "cut")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert metrics(root / "cut") == metrics(root / "full")  # the step-10 line is not doubled

    newest = ckpts / "step_0000010" / "model.safetensors"  # flip one byte of the newest weights
    data_bytes = bytearray(newest.read_bytes())
    data_bytes[-1] ^= 0xFF
    newest.write_bytes(bytes(data_bytes))
    shutil.rmtree(root / "cut" / "model")
    with caplog.at_level("WARNING"):
        assert distill(teacher, student, data, root / "cut", c)["resumed_from"] == 5
    assert "step_0000010 is unusable" in caplog.text and "checksum mismatch" in caplog.text
    got = weights(root / "cut")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_student_config_rules(setup, tmp_path, caplog):
    root, data, teacher, _ = setup
    bad_vocab = tmp_path / "v.yaml"
    bad_vocab.write_text("model: {n_layer: 1, n_head: 2, n_embd: 32, vocab_size: 100}\n")
    with pytest.raises(ConfigError, match="vocab_size"):
        distill(teacher, bad_vocab, data, tmp_path / "o", cfg(1))
    no_model = tmp_path / "n.yaml"
    no_model.write_text("train: {steps: 1}\n")
    with pytest.raises(ConfigError, match="model:"):
        distill(teacher, no_model, data, tmp_path / "o", cfg(1))
    narrow = tmp_path / "w.yaml"
    narrow.write_text("model: {n_layer: 1, n_head: 2, n_embd: 32}\n")
    with pytest.raises(ConfigError, match="hidden_weight"):
        distill(teacher, narrow, data, tmp_path / "o", cfg(1, hidden_weight=1.0))
    t = load_model_dir(teacher)[0]
    s = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=128))
    assert init_from_teacher(s, t, 2) is None and "random init" in caplog.text


def test_loss_is_kl_at_alpha_one_and_ce_at_zero():
    torch.manual_seed(0)
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    kl_only, parts = distill_loss(s, t, y, alpha=1.0, temperature=2.0)
    p_t = torch.softmax(t / 2, -1)
    manual = (p_t * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert kl_only.item() == pytest.approx(manual.item(), rel=1e-5)
    ce_only, _ = distill_loss(s, t, y, alpha=0.0, temperature=2.0)
    assert ce_only.item() == pytest.approx(parts["ce"], rel=1e-6)
    same, _ = distill_loss(t, t, y, alpha=1.0, temperature=3.0)
    assert abs(same.item()) < 1e-6


def test_cli_distill(setup, capsys):
    root, data, teacher, student = setup
    out = root / "cli"
    rc = main(["distill", "--teacher", str(teacher), "--student-config", str(student), "--data", str(data),
               "--out", str(out), "--config", "configs/post/distill.yaml", "--set", "train.steps=4",
               "--set", "train.micro_batch_size=4", "--set", "eval_windows=4", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["model"] == str(out / "model") and summary["val_loss"] > 0
    assert load_model_dir(out / "model")[0].cfg.n_layer == 1


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(setup, tmp_path):
    """torchrun + Accelerate (gloo on CPU): 2 ranks x 4 windows give the weights of 1 process x 8 windows."""
    import os
    import subprocess
    import sys

    root, data, teacher, student = setup
    args = ["distill", "--teacher", str(teacher), "--student-config", str(student), "--data", str(data),
            "--set", "train.steps=3", "--set", "train.precision=fp32", "--set", "eval_windows=0",
            "--json"]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "pipeline.cli", *args[:-1], "--set", "train.micro_batch_size=4", "--out", str(tmp_path / "two")],
                         env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert main([*args, "--set", "train.micro_batch_size=8", "--out", str(tmp_path / "one")]) == 0
    metrics = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1]) for d in ("two", "one")]
    assert metrics[0]["tokens"] == metrics[1]["tokens"] == 3 * 8 * 64  # the same global batch
    a = load_file(str(tmp_path / "two/model/model.safetensors"))
    b = load_file(str(tmp_path / "one/model/model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    t = load_file(str(teacher / "model.safetensors"))
    assert not torch.equal(a["blocks.0.mlp.w2.weight"], t["blocks.0.mlp.w2.weight"])  # it did train
