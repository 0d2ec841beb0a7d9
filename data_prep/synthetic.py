"""A small prepared corpus written without running `kiln prep` (the same files and manifest keys), for tests and
benchmarks: documents made of a few fixed "phrases", so a tiny model learns them fast and its loss falls
clearly below ln(vocab), which tells learning from noise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from data_prep.indexed import IndexedWriter, shard_fingerprint

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
    _write_manifest(directory, entries, vocab_size, tokenizer, {"fake": True, "seed": seed},
                    {"records_in": train_docs + val_docs, "documents_kept": train_docs + val_docs, "removed": {},
                     "quarantined": {}})
    return directory


def many_shards(directory: str | Path, shards: int, tokens: int = 4, vocab_size: int = 128, val_shards: int = 1) -> Path:
    """A corpus of `shards` train shards (plus `val_shards` val shards) of one `tokens`-long document each,
    token t of the whole train stream being 3 + t % (vocab_size - 3): the files and manifest keys of `kiln prep`,
    written in seconds for tens of thousands of shards (every .idx is the same bytes, built once)."""
    directory = Path(directory)
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    with IndexedWriter(directory / "shards" / "template", np.uint16) as w:
        w.add(np.zeros(tokens, np.uint16))
    template = directory / "shards" / "template"
    idx = template.with_suffix(".idx").read_bytes()
    for suffix in (".bin", ".idx"):
        template.with_suffix(suffix).unlink()
    idx_hash = hashlib.sha256(idx).digest()
    stream = (3 + np.arange(shards * tokens) % (vocab_size - 3)).astype(np.uint16).tobytes()
    width = tokens * 2
    entries = []
    for split, n in (("train", shards), ("val", val_shards)):
        for k in range(n):
            rel = f"shards/{split}_{k:05d}"
            data = stream[k * width : (k + 1) * width]
            for suffix, content in ((".bin", data), (".idx", idx)):
                with open(f"{directory}/{rel}{suffix}", "wb") as f:
                    f.write(content)
            digest = hashlib.sha256(hashlib.sha256(data).digest() + idx_hash).hexdigest()
            entries.append({"path": rel + ".bin", "split": split, "documents": 1, "tokens": tokens, "sha256": digest,
                            **shard_fingerprint(directory / rel)})
    _write_manifest(directory, entries, vocab_size, None, {"fake": True, "many_shards": shards},
                    {"records_in": shards + val_shards, "documents_kept": shards + val_shards, "removed": {},
                     "quarantined": {}})
    return directory


def _write_manifest(directory: Path, entries: list[dict], vocab_size: int, tokenizer, config: dict, counts: dict) -> None:
    """manifest.json as `kiln prep` writes it (data_prep/report.py), for `entries` (one per shard)."""
    tok = {"path": "tokenizer.model", "sha256": None, "vocab_size": vocab_size}
    if tokenizer:
        data = Path(tokenizer).read_bytes()
        (directory / "tokenizer.model").write_bytes(data)
        tok["sha256"] = hashlib.sha256(data).hexdigest()
    manifest = {
        "version": 1,
        "inputs": [],
        "config": config,
        "counts": counts,
        "tokens": {s: sum(e["tokens"] for e in entries if e["split"] == s) for s in ("train", "val")},
        "tokenizer": tok,
        "shards": entries,
        "digest": hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest(),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
