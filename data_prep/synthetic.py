"""A small prepared corpus written without running `kiln prep` (the same files and manifest keys), for tests and
benchmarks: documents made of a few fixed "phrases", so a tiny model learns them fast and its loss falls
clearly below ln(vocab), which tells learning from noise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from data_prep.indexed import IndexedWriter

EOS = 2


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
