"""Shared helpers for the post-training tests (a corpus that makes quantization error visible, a trained
teacher) and the tests of pipeline/post/common.py."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import EOS, fake_corpus

from data_prep.indexed import IndexedWriter
from pipeline.config import KilnError, ModelConfig, RunConfig
from pipeline.evaluate import evaluate_windows
from pipeline.model.gpt import GPT
from pipeline.model.io import save_model_dir
from pipeline.post.common import (
    batch_at,
    calib_tokens,
    lineage,
    model_path,
    nonzero_params,
    train_steps,
    windows,
)
from pipeline.schedule import lr_of, schedule_of, warmup_cosine

TEACHER = dict(style="llama", n_layer=2, n_head=4, n_embd=128, block_size=64)
TEACHER_STEPS = 800
CORPUS = dict(vocab_size=128, successors=8, concentration=0.3, train_docs=1000)


def markov_corpus(directory: str | Path, vocab_size: int = 256, successors: int = 8, train_docs: int = 400,
                  val_docs: int = 40, doc_len: int = 200, concentration: float = 0.7, seed: int = 0) -> Path:
    """A prepared corpus (same files as `kiln prep`) from a first-order Markov chain whose rows are
    random distributions over a few successors. Unlike phrase data, the best model must be *calibrated*
    (loss floor = the chain's entropy), so weight noise costs measurable loss: what quantization needs."""
    directory = Path(directory)
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1000)
    succ = np.stack([rng.choice(np.arange(3, vocab_size), successors, replace=False) for _ in range(vocab_size)])
    probs = rng.dirichlet(np.full(successors, concentration), size=vocab_size)
    entries = []
    for split, n, s in (("train", train_docs, seed), ("val", val_docs, seed + 1)):
        r = np.random.default_rng(s)
        rel = f"shards/{split}_00000"
        with IndexedWriter(directory / rel, np.uint16) as w:
            for _ in range(n):
                tok, doc = int(r.integers(3, vocab_size)), []
                for _ in range(doc_len):
                    doc.append(tok)
                    tok = int(succ[tok, r.choice(successors, p=probs[tok])])
                w.add(np.array(doc + [EOS]))
        entries.append({"path": rel + ".bin", "sha256": w.result["sha256"], "documents": n,
                        "tokens": w.result["tokens"], "split": split})
    entropy = float(-(probs * np.log(probs)).sum(1).mean())
    manifest = {"version": 1, "inputs": [], "config": {"markov": True, "entropy": entropy},
                "counts": {"records_in": train_docs + val_docs, "documents_kept": train_docs + val_docs,
                           "removed": {}, "quarantined": {}},
                "tokens": {e["split"]: e["tokens"] for e in entries},
                "tokenizer": {"path": "tokenizer.model", "sha256": None, "vocab_size": vocab_size},
                "shards": entries, "digest": hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def train_teacher(data: Path, out: Path, steps: int = TEACHER_STEPS, seed: int = 0, **model) -> Path:
    """A tiny GPT trained with the plain loop close to convergence, saved as a MODEL dir."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TEACHER, **model, "vocab_size": json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]})
    net = GPT(cfg)
    train_steps(net, data, steps, lr=3e-3, batch_size=16, warmup=20, seed=seed)
    return save_model_dir(net, cfg, out)


def shared_teacher(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, teacher) trained once per test session and shared by the post-training test modules."""
    root = tmp_path_factory.getbasetemp() / "post-shared"
    data, teacher = root / "data", root / "teacher"
    if not (teacher / "SHA256SUMS").exists():
        markov_corpus(data, **CORPUS)
        train_teacher(data, teacher)
    return data, teacher


# --------------------------------------------------------------------------- tests of common.py


@pytest.fixture(scope="module")
def phrases(tmp_path_factory) -> Path:
    return fake_corpus(tmp_path_factory.mktemp("phrases"), vocab_size=64, train_docs=60, val_docs=20)


def test_batches_depend_only_on_seed_and_step_and_ranks_split_them(phrases):
    win = windows(phrases, "train", 16)
    x, y = batch_at(win, 7, 8, seed=3)
    assert torch.equal(x, batch_at(win, 7, 8, seed=3)[0]) and not torch.equal(x, batch_at(win, 8, 8, seed=3)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    halves = [batch_at(win, 7, 4, seed=3, rank=r, world=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x)


def test_calib_tokens_come_from_train_windows(phrases):
    calib = calib_tokens(phrases, 5, 16, seed=1)
    assert calib.shape == (5, 16) and calib.dtype == torch.int64
    assert len({tuple(r.tolist()) for r in calib}) == 5  # drawn without replacement
    assert torch.equal(calib, calib_tokens(phrases, 5, 16, seed=1))


def test_one_schedule_for_train_distill_and_recovery():
    """Train's schedule and the post-training loops call the same warmup+cosine function."""
    assert warmup_cosine(0, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert warmup_cosine(55, 100, 1.0, 0.1, 10) == pytest.approx(0.55)
    cfg = RunConfig.model_validate({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "steps": 100}})
    assert [lr_of(s, schedule_of(cfg.train.model_dump())) for s in range(120)] == [warmup_cosine(s, 100, 1.0, 0.1, 10) for s in range(120)]


def test_model_refs_and_lineage(tmp_path):
    with pytest.raises(KilnError, match="kiln fetch"):
        model_path("models:/kiln@champion")
    with pytest.raises(KilnError, match="not a MODEL directory"):
        model_path(tmp_path)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    parent = save_model_dir(GPT(cfg), cfg, tmp_path / "m")
    meta = lineage(parent, "pruned", "magnitude", sparsity=0.5)["kiln"]
    assert meta["stage"] == "pruned" and meta["parent_model"] == str(parent) and meta["sparsity"] == 0.5
    assert len(meta["parent_sha256"]) == 64


def test_uniform_model_scores_ln_vocab_and_counts_nonzero(phrases):
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)
    model = GPT(cfg)
    with torch.no_grad():
        model.embed.wte.weight.zero_()  # tied head: every logit 0, a uniform prediction
    result = evaluate_windows(model, phrases, 4)
    assert result["loss"] == pytest.approx(math.log(64), abs=1e-5)
    assert result["perplexity"] == pytest.approx(64, rel=1e-4)
    assert result["tokens"] == 4 * 16 and result["bits_per_byte"] is None and result["tokens_per_s"] > 0
    assert nonzero_params(model) == model.num_params() - 64 * 16 - 16 * 0


def test_shipped_post_configs_validate(root):
    from pipeline.config import load_config

    paths = sorted((root / "configs" / "post").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"int8", "gptq4", "rtn4", "distill", "prune", "sft"}
    for path in paths:
        kind = {"distill": "distill", "prune": "prune", "sft": "sft"}.get(path.stem, "quantize")
        calib = ["calib=data/prepped"] if path.stem.startswith("gptq") else []  # gptq needs calibration data
        cfg = load_config(kind, path, calib)
        if kind == "quantize":  # each file configures the method and bits it is named for
            method, bits = {"int8": ("int8-weight", 8), "gptq4": ("gptq", 4), "rtn4": ("rtn", 4)}[path.stem]
            assert (cfg.method, cfg.bits if method != "int8-weight" else 8) == (method, bits), path.name
