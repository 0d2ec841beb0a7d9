"""Training data order, schedule, checkpoints and the 1-process `kiln train` (kill -9 and resume)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import find_checkpoint, newest_complete, step_dirs
from pipeline.config import ConfigError, DataConfig, RunConfig, load_config
from pipeline.data.sampler import BlendedSamples, TrainData, blend_slots, rank_slice
from pipeline.export import load_source
from pipeline.model.io import write_sums
from pipeline.schedule import lr_of, schedule_of
from tests.factories import TINY_TRAIN, TRAIN_ENV, fake_corpus, kiln_train_cmd

ROOT = Path(__file__).resolve().parent.parent
ENV = TRAIN_ENV


# --------------------------------------------------------------------------- data order


def test_sample_order_is_deterministic_and_layout_free(tmp_path):
    fake_corpus(tmp_path / "a", vocab_size=128)
    d1 = TrainData(DataConfig(paths=[str(tmp_path / "a")]), block_size=16, seed=3)
    d2 = TrainData(DataConfig(paths=[str(tmp_path / "a")]), block_size=16, seed=3)
    d3 = TrainData(DataConfig(paths=[str(tmp_path / "a")]), block_size=16, seed=4)
    a = np.stack([d1.train[i] for i in range(50)])
    assert np.array_equal(a, np.stack([d2.train[i] for i in range(50)]))
    assert not np.array_equal(a, np.stack([d3.train[i] for i in range(50)]))
    # DP ranks' micro-batches tile the global batch exactly, in order, whatever the layout
    for dp, micro in [(1, 8), (2, 4), (2, 2), (4, 1)]:
        spans = [s for r in range(dp) for s in rank_slice(80, 8, dp, r, micro)]
        covered = [i for start, count in spans for i in range(start, start + count)]
        assert covered == list(range(80, 88))


def test_epochs_cover_every_window_once(tmp_path):
    fake_corpus(tmp_path / "a", vocab_size=128)
    data = TrainData(DataConfig(paths=[str(tmp_path / "a")]), block_size=16, seed=0)
    n = len(data.train.windows[0])
    first = [data.train.locate(i)[1] for i in range(n)]
    second = [data.train.locate(i)[1] for i in range(n, 2 * n)]
    assert sorted(first) == list(range(n)) == sorted(second)
    assert first != second  # a fresh permutation each epoch
    x, y = data.train.batch(5, 3)
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.fault
def test_blend_follows_weights_and_vocab_must_match(tmp_path):
    slots = blend_slots([3.0, 1.0], seed=0)
    assert np.bincount(slots).tolist() == [3072, 1024]
    fake_corpus(tmp_path / "a", vocab_size=128, seed=0)
    fake_corpus(tmp_path / "b", vocab_size=128, seed=5)
    data = TrainData(DataConfig(paths=[str(tmp_path / "a"), str(tmp_path / "b")], weights=[3, 1]), 16, seed=0)
    picks = [data.train.locate(i)[0] for i in range(4000)]
    assert abs(picks.count(1) / 4000 - 0.25) < 0.02
    assert isinstance(data.train, BlendedSamples) and len(data.digests) == 2
    fake_corpus(tmp_path / "c", vocab_size=256)
    with pytest.raises(ConfigError, match="different tokenizer vocab"):
        TrainData(DataConfig(paths=[str(tmp_path / "a"), str(tmp_path / "c")]), 16, seed=0)


def lr_at(step: int, cfg: RunConfig) -> float:
    return lr_of(step, schedule_of(cfg.train.model_dump()))


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = RunConfig.model_validate({"train": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "steps": 110}})
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_a_resume_with_another_schedule_never_changes_the_rates_already_trained():
    from pipeline.schedule import lr_of, on_resume

    rec = {"kind": "cosine", "warmup": 20, "steps": 200, "lr": 3e-4, "min_lr": 3e-5}
    longer = dict(rec, steps=300)
    assert on_resume(rec, dict(rec), 200) == (rec, None)
    chosen, line = on_resume(rec, longer, 200)  # extending a finished cosine: continued as logged, at min lr
    assert chosen == rec and "continues the checkpoint's schedule" in line and "stays at 3.00e-05" in line
    assert [lr_of(s, chosen) for s in (200, 250, 299)] == [3e-5] * 3
    chosen, line = on_resume(rec, longer, 100)  # mid-decay: the recorded curve, not a jump up to the longer one
    assert chosen == rec and lr_of(100, chosen) < lr_of(99, rec) < lr_of(100, longer)
    chosen, line = on_resume(rec, longer, 15)  # still warming up: the past is the same, the longer horizon holds
    assert chosen == longer and "on the configured schedule" in line


@pytest.mark.fault
def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (5, 10):
        d = root / f"step_{step:07d}"
        d.mkdir(parents=True)
        (d / "kiln_state.json").write_text(json.dumps({"step": step}))
        (d / "model.safetensors").write_bytes(os.urandom(64))
        write_sums(d)
    (root / "latest").write_text("step_0000010\n")
    (root / ".tmp-step_0000015").mkdir()  # an interrupted save
    assert find_checkpoint(root) == root / "step_0000010"
    with open(root / "step_0000010" / "model.safetensors", "r+b") as f:
        f.truncate(10)
    with caplog.at_level("WARNING", logger="kiln"):
        assert find_checkpoint(root) == root / "step_0000005"
    assert "unusable" in caplog.text
    assert not (root / ".tmp-step_0000015").exists()
    assert (root / "latest").read_text() == "step_0000005\n"  # repaired: it names what training resumed from


def test_newest_checkpoint_is_by_step_number_not_by_the_pointer(tmp_path):
    from pipeline.export import resolve_source

    root = tmp_path / "run" / "checkpoints"
    for name in ("step_9999999", "step_10000000", "step_10000000.bak"):
        d = root / name
        d.mkdir(parents=True)
        (d / "kiln_state.json").write_text(json.dumps({"step": 1}))
        write_sums(d)
    (root / "latest").write_text("step_9999999\n")  # a save killed after its rename, before the pointer moved
    assert step_dirs(root) == [root / "step_10000000", root / "step_9999999"]
    assert resolve_source(tmp_path / "run") == root / "step_10000000"  # export / init_from: read-only
    assert (root / "latest").read_text() == "step_9999999\n"
    assert find_checkpoint(root) == root / "step_10000000"
    assert (root / "latest").read_text() == "step_10000000\n"


# --------------------------------------------------------------------------- kiln train, 1 process


def kiln_train(out: Path, corpus: Path, *sets: str, wait: bool = True):
    cmd = kiln_train_cmd(out, f"data.paths=[{corpus}]", *sets)
    if not wait:
        return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.fault
def test_kill9_and_rerun_equals_uninterrupted_bit_for_bit(tmp_path):
    (tmp_path / "sp.model").write_bytes(b"stand-in sentencepiece model")
    corpus = fake_corpus(tmp_path / "corpus", vocab_size=128, tokenizer=tmp_path / "sp.model")
    sets = ("train.steps=24", "checkpoint.every=6", "train.eval_every=6")
    ref = kiln_train(tmp_path / "ref", corpus, *sets)
    assert ref["steps"] == 24 and ref["loss"] < math.log(128)

    out = tmp_path / "killed"
    proc = kiln_train(out, corpus, *sets, wait=False)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step_0000006").exists():  # published by a rename: complete
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # somewhere after the first checkpoint; where exactly does not matter
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it was killed"
    newest = newest_complete(out / "checkpoints")  # what a resume must take, whatever the kill interrupted
    resumed = kiln_train(out, corpus, *sets)
    assert resumed["resumed_from"] == str(newest) and resumed["steps"] == 24

    a, b = weights(tmp_path / "ref" / "model"), weights(out / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref_lines = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    res_lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in res_lines] == list(range(1, 25))
    assert [m["loss"] for m in ref_lines] == [m["loss"] for m in res_lines]
    assert "val_loss" in ref_lines[5] and ref_lines[5]["val_loss"] < math.log(128)

    # the MODEL dir: loadable, with tokenizer-independent lineage metadata
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["kiln"]["stage"] == "pretrain"
    assert config["kiln"]["data_digest"] == json.loads((corpus / "manifest.json").read_text())["digest"]
    assert config["model"]["vocab_size"] == 128  # taken from the manifest
    assert (out / "model" / "tokenizer.model").read_bytes() == b"stand-in sentencepiece model"
    assert config["kiln"]["tokenizer_sha256"] == json.loads((corpus / "manifest.json").read_text())["tokenizer"]["sha256"]
    final = out / "checkpoints" / "step_0000024"  # export builds the same lineage from the same checkpoint
    assert load_source(final)[3]["kiln"] == {**config["kiln"], "exported_from": str(final)}
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_0000018", "step_0000024"]  # checkpoint.keep = 2

    # rerunning a finished run trains nothing more and rewrites the same model
    again = kiln_train(out, corpus, *sets)
    assert again["resumed_from"].endswith("step_0000024")
    c = weights(out / "model")
    assert all(torch.equal(a[k], c[k]) for k in a)

    # extending the finished run: one line says what the schedule does before step one, and the rate does not jump
    # (run on one core, OMP_NUM_THREADS unset: the thread count comes from the affinity mask, not the machine)
    cmd = kiln_train_cmd(out, f"data.paths=[{corpus}]", "train.steps=30", "checkpoint.every=6", "train.eval_every=6")
    one_core = min(os.sched_getaffinity(0))
    res = subprocess.run(cmd, env={k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))
    assert res.returncode == 0, res.stderr[-3000:]
    err = " ".join(res.stderr.split())
    assert "| 1 CPU thread(s) per process" in err
    assert "resuming at step 24: the learning rate continues the checkpoint's schedule" in err, err[-2000:]
    assert err.index("resuming at step 24") < err.index("step 25/30")
    lrs = {m["step"]: m["lr"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(lrs) == list(range(1, 31)) and all(lrs[s] == pytest.approx(1e-4) for s in range(25, 31))
    assert max(lrs[s] for s in range(25, 31)) <= lrs[24]
    rows = list(map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    assert {m["threads"] for m in rows} == {1}  # every tokens/s with the threads it was measured on


def test_train_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="parallel.zero_stage"):
        load_config("train", ROOT / "configs/train/tiny-cpu.yaml", ["parallel.pp=2", "parallel.zero_stage=2"])


def test_kiln_plot_writes_png(tmp_path, capsys):
    from pipeline.cli import main

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5 - s / 10, "tokens_per_s": 1000 + s, "lr": 1e-3} for s in range(1, 11)]
    rows[4]["val_loss"] = 4.6
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    png = Path(summary["out"])
    assert png == run / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["points"] == 10 and summary["val_points"] == 1
    assert main(["plot", str(tmp_path / "missing")]) == 1


@pytest.mark.fault
def test_fp16_on_cpu_is_a_config_error():
    from pipeline.train import train

    if torch.cuda.is_available():
        pytest.skip("fp16 is fine on a GPU")
    cfg = load_config("train", ROOT / "configs/train/tiny-cpu.yaml", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a GPU"):
        train(cfg)


@pytest.mark.fault
def test_init_from_with_another_shape_is_one_line(tmp_path):
    from pipeline.config import KilnError, ModelConfig
    from pipeline.model.weights import DictWeights
    from pipeline.parallel.materialize import build_gpt

    small = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    state = DictWeights(dict(build_gpt(small, seed=0).state_dict()))
    with pytest.raises(KilnError, match="train.init_from: embed.wte.weight has shape"):
        build_gpt(small.model_copy(update={"vocab_size": 60}), seed=0, source=state)


@pytest.mark.slow
@pytest.mark.fault
def test_init_from_with_another_shape_is_one_line_through_the_cli(tmp_path):
    """`kiln train --set train.init_from=MODEL` whose weights have another shape: one line, nothing trained."""
    from pipeline.model.gpt import GPT
    from pipeline.model.io import save_model_dir

    cfg = load_config("train", TINY_TRAIN, ["model.vocab_size=128", "model.n_embd=32"]).model  # tiny is 64 wide
    other = save_model_dir(GPT(cfg), cfg, tmp_path / "narrower")
    corpus = fake_corpus(tmp_path / "corpus", vocab_size=128)
    res = subprocess.run(kiln_train_cmd(tmp_path / "run", f"data.paths=[{corpus}]", f"train.init_from={other}",
                                        "tracking.enabled=false"),
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    (line,) = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert line.startswith("kiln train: error: train.init_from: ") and "has shape" in line, line
    assert "Traceback" not in res.stderr and not (tmp_path / "run" / "model").exists()
