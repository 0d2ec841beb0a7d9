"""Build small prepared corpora in tests without running `kiln prep` (same files, same manifest keys).

Documents are made of a few fixed "phrases", so a tiny model learns them fast:
loss falls clearly below ln(vocab), which lets tests tell learning from noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np

from data_prep.indexed import IndexedWriter

EOS = 2


ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN = ROOT / "configs/train/tiny-cpu.yaml"
TRAIN_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A TCP port the OS says is free on 127.0.0.1 now (tests never hard-code one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(ranks: int = 1) -> list[str]:
    """This Python, under torchrun with `ranks` local processes when ranks > 1 (`--standalone`: a rendezvous
    on a port the OS picks, so concurrent test runs never collide on 29500)."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    return [sys.executable, *torchrun]


def kiln_train_cmd(out: Path, *sets: str, ranks: int = 1, config: Path = TINY_TRAIN) -> list[str]:
    """`kiln train --json` of the tiny CPU config into `out`, with `--set` overrides."""
    return [*launcher(ranks), "-m", "pipeline.cli", "train", "--config", str(config), "--out", str(out), "--json",
            *[a for s in sets for a in ("--set", s)]]


def phrase_docs(n_docs: int, vocab_size: int, seed: int, n_phrases: int = 12, phrase_len: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    phrases = np.random.default_rng(1000).integers(3, vocab_size, size=(n_phrases, phrase_len))
    docs = []
    for _ in range(n_docs):
        picks = rng.integers(0, n_phrases, size=rng.integers(2, 8))
        docs.append(np.concatenate([*phrases[picks], [EOS]]))
    return docs


def fake_corpus(
    directory: str | Path,
    vocab_size: int = 128,
    train_docs: int = 400,
    val_docs: int = 40,
    shards: int = 2,
    seed: int = 0,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write manifest.json + shards/{train,val}_NNNNN.bin/.idx; return the directory."""
    directory = Path(directory)
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    for split, n, split_seed in (("train", train_docs, seed), ("val", val_docs, seed + 1)):
        docs = phrase_docs(n, vocab_size, split_seed)
        parts = np.array_split(np.arange(n), shards if split == "train" else 1)
        for k, part in enumerate(parts):
            rel = f"shards/{split}_{k:05d}"
            with IndexedWriter(directory / rel, np.uint16) as w:
                for i in part:
                    w.add(docs[i])
            entries.append({"path": rel + ".bin", "split": split, **w.result})
    tok = {"path": "tokenizer.model", "sha256": None, "vocab_size": vocab_size}
    if tokenizer:
        data = Path(tokenizer).read_bytes()
        (directory / "tokenizer.model").write_bytes(data)
        tok["sha256"] = hashlib.sha256(data).hexdigest()
    manifest = {
        "version": 1,
        "inputs": [],
        "config": {"fake": True, "seed": seed},
        "counts": {"records_in": train_docs + val_docs, "documents_kept": train_docs + val_docs, "removed": {}, "quarantined": {}},
        "tokens": {s: sum(e["tokens"] for e in entries if e["split"] == s) for s in ("train", "val")},
        "tokenizer": tok,
        "shards": entries,
        "digest": hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest(),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def tiny_model_family(root: Path, vocab_size: int = 1000) -> dict[str, Path]:
    """A random llama-style MODEL dir with a real sentencepiece tokenizer (Kiln's settings, trained on
    Python's docs), its int8 and GPTQ-4 quantizations, and the corpus they were calibrated on."""
    import itertools

    import torch

    from data_prep.demo_corpus import _all_docs
    from data_prep.tokenizer import train_tokenizer
    from pipeline.config import ModelConfig, QuantizeConfig
    from pipeline.model.gpt import GPT
    from pipeline.model.io import save_model_dir
    from pipeline.post.quantize import quantize

    root.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([t for _, t in itertools.islice(_all_docs(), 300)], root / "tokenizer.model",
                          vocab_size=vocab_size)
    data = fake_corpus(root / "data", vocab_size=vocab_size, tokenizer=tok)
    torch.manual_seed(0)
    cfg = ModelConfig(style="llama", n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=vocab_size)
    save_model_dir(GPT(cfg), cfg, root / "plain", tokenizer=tok, meta={"kiln": {"stage": "pretrain"}})
    quantize(root / "plain", QuantizeConfig(method="int8-weight", eval_windows=0), root / "int8")
    quantize(root / "plain", QuantizeConfig(method="gptq", bits=4, calib=str(data), calib_samples=8, group_size=32,
                                            eval_windows=0), root / "gptq4")
    return {"plain": root / "plain", "int8": root / "int8", "gptq4": root / "gptq4", "data": data, "tokenizer": tok}


def dedup_texts(work: Path, texts: list[str], **minhash) -> list[tuple[str, int, float | None] | None]:
    """Exact and near-dup removal of `texts` through the prep path (one partition: KeyChunks ->
    dedup_bucket per bucket -> removals): per text, None or (reason, index of the kept twin, Jaccard)."""
    from data_prep import buckets
    from data_prep.config import PrepConfig
    from data_prep.document import Document

    cfg = PrepConfig(minhash=minhash, boilerplate={"enabled": False})
    keys = buckets.KeyChunks(Path(work) / "clean" / "00000", 0, cfg, lambda doc_id: 0)
    keys.dir.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        keys.add(Document(f"d{i}", text))
    keys.close()
    results = [buckets.dedup_bucket(b, [0], str(work), cfg) for b in range(cfg.dedup_buckets)]
    removed, _ = buckets.removals(results)
    return [removed.get(i) for i in range(len(texts))]
