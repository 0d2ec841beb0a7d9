"""The work of one Ray task, as plain functions (testable without Ray).

Each stage writes its outputs for one unit of work (a partition, a bucket) under
`DIR/work/` and publishes them atomically: files go to a temp name and are
renamed, a partition's directory appears only when complete. A rerun after a
crash reuses whatever was published and redoes the rest.

Documents get a `uid` = partition << 32 | position: the global input order.
Dedup keeps the lowest uid of each group, so results never depend on workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.document import BadRecord
from data_prep.readers import read_partition
from data_prep.steps import build_steps
from data_prep.steps.exact_dedup import group_min, text_hash
from data_prep.steps.length import LengthPolicy
from data_prep.steps.minhash_dedup import MinHasher, lsh_edges
from pipeline.config import PrepConfig

PART_BITS = 32


def uid_of(part: int, pos: int | np.ndarray):
    return (np.int64(part) << PART_BITS) + pos


def id_hash(doc_id: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(salt + doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


def _publish_dir(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:  # another attempt published it first: same content, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _records(part: dict, cfg: PrepConfig, counts: Counter, quarantine):
    for rec in read_partition(part, cfg.text_field, cfg.id_field):
        counts["records"] += 1
        if isinstance(rec, BadRecord):
            counts["q:" + rec.reason] += 1
            quarantine.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
        else:
            counts["read"] += 1
            yield rec


def _count_in(docs, counts: Counter):
    for doc in docs:
        counts["documents_in"] += 1
        yield doc


def clean_partition(part: dict, cfg: PrepConfig, work: str) -> dict:
    """Read, normalize, filter, langid; hash for exact dedup, MinHash for near dedup."""
    final = Path(work) / "clean" / f"{part['index']:05d}"
    if (final / "stats.json").is_file():
        return json.loads((final / "stats.json").read_text())
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    steps = build_steps(cfg)
    hasher = MinHasher(cfg.minhash.ngram, cfg.minhash.bands, cfg.minhash.rows, cfg.minhash.seed)
    counts: Counter = Counter()
    keys = _KeyChunks(tmp, part["index"], cfg)
    langs: Counter = Counter()
    with open(tmp / "quarantine.jsonl", "w") as quarantine, open(tmp / "removed.jsonl", "w") as removed, \
            open(tmp / "docs.jsonl", "w") as out:
        docs = _records(part, cfg, counts, quarantine)
        for step in steps:
            docs = step(docs)
            if isinstance(step, LengthPolicy):  # documents as they enter filtering (after splits)
                docs = _count_in(docs, counts)
        for doc in docs:
            if doc.removed is not None:
                counts["r:" + doc.removed] += 1
                removed.write(json.dumps({"id": doc.id, "reason": doc.removed, "detail": doc.detail}, ensure_ascii=False) + "\n")
                continue
            lang = doc.meta.get("lang")
            langs[lang] += 1
            out.write(json.dumps({"id": doc.id, "text": doc.text, "lang": lang}, ensure_ascii=False) + "\n")
            keys.add(doc, hasher)
    n = keys.close()
    stats = {
        "index": part["index"], "rel": part["rel"], "records": counts["records"], "read": counts["read"],
        "documents_in": counts["documents_in"], "kept": n,
        "quarantined": {k[2:]: v for k, v in sorted(counts.items()) if k.startswith("q:")},
        "removed": {k[2:]: v for k, v in sorted(counts.items()) if k.startswith("r:")},
        "langs": {str(k): v for k, v in sorted(langs.items(), key=lambda kv: str(kv[0]))},
    }
    write_json(tmp / "stats.json", stats)
    _publish_dir(tmp, final)
    return stats


class _KeyChunks:
    """Dedup keys of a partition, flushed every `shard_docs` documents to keys_NNNNN.npz.

    Each file holds, per bucket b, exact hashes `e{b}` / near-dup band keys `n{b}`
    with their uids (`eu{b}`, `nu{b}`), plus `sample` (tokenizer-sample hash per doc).
    Flushing keeps a worker's memory bounded even for one huge compressed file.
    """

    def __init__(self, directory: Path, part: int, cfg: PrepConfig):
        self.dir, self.part, self.cfg = directory, part, cfg
        self.exact: list[int] = []
        self.bands: list[np.ndarray] = []
        self.sample: list[int] = []
        self.done = self.chunks = 0

    def add(self, doc, hasher: MinHasher) -> None:
        if self.cfg.dedup:
            self.exact.append(text_hash(doc.text))
            if self.cfg.near_dedup:
                self.bands.append(hasher.band_keys(hasher.signature(doc.text)))
        self.sample.append(id_hash(doc.id, b"sample"))
        if len(self.sample) >= self.cfg.shard_docs:
            self.flush()

    def flush(self) -> None:
        n, cfg, buckets = len(self.sample), self.cfg, self.cfg.dedup_buckets
        uids = uid_of(self.part, np.arange(self.done, self.done + n, dtype=np.int64))
        arrays = {"sample": np.array(self.sample, np.uint64)}
        if cfg.dedup:
            e = np.array(self.exact, np.uint64)
            for b in range(buckets):
                m = e % np.uint64(buckets) == b
                arrays[f"e{b}"], arrays[f"eu{b}"] = e[m], uids[m]
        if cfg.dedup and cfg.near_dedup:
            flat = np.array(self.bands, np.uint64).reshape(-1)
            flat_uids = np.repeat(uids, cfg.minhash.bands)
            for b in range(buckets):
                m = flat % np.uint64(buckets) == b
                arrays[f"n{b}"], arrays[f"nu{b}"] = flat[m], flat_uids[m]
        np.savez(self.dir / f"keys_{self.chunks:05d}.npz", **arrays)
        self.chunks += 1
        self.done += n
        self.exact, self.bands, self.sample = [], [], []

    def close(self) -> int:
        if self.sample or not self.chunks:
            self.flush()
        return self.done


def key_files(work: str | Path, part: int) -> list[Path]:
    return sorted((Path(work) / "clean" / f"{part:05d}").glob("keys_*.npz"))


def dedup_bucket(bucket: int, parts: list[int], work: str, near: bool) -> dict:
    """Exact groups and LSH candidate edges among the keys that hash into `bucket`."""
    ek, eu, nk, nu = [], [], [], []
    for p in parts:
        for path in key_files(work, p):
            with np.load(path) as z:
                ek.append(z[f"e{bucket}"])
                eu.append(z[f"eu{bucket}"])
                if near:
                    nk.append(z[f"n{bucket}"])
                    nu.append(z[f"nu{bucket}"])
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    dup, kept = group_min(cat(ek, np.uint64), cat(eu, np.int64))
    a, b = lsh_edges(cat(nk, np.uint64), cat(nu, np.int64)) if near else (np.zeros(0, np.int64),) * 2
    return {"exact": (dup, kept), "edges": (a, b)}


def tokenize_partition(part: int, drop: np.ndarray, tokenizer: str, cfg: PrepConfig, work: str, out: str) -> dict:
    """Encode a partition's surviving documents into train/val shards (EOS after each)."""
    import sentencepiece as spm

    from data_prep.indexed import IndexedWriter

    marker = Path(work) / "tok" / f"{part:05d}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    eos = sp.eos_id()
    dtype = np.uint16 if sp.get_piece_size() < 65500 else np.int32
    val_cut = int(cfg.val_fraction * 2**64)
    drop_set = set(drop.tolist())
    writers = {s: IndexedWriter(Path(out) / "shards" / f"{s}_{part:05d}", dtype) for s in ("train", "val")}
    langs = {"train": Counter(), "val": Counter()}
    chars = Counter()
    try:
        with open(Path(work) / "clean" / f"{part:05d}" / "docs.jsonl", encoding="utf-8") as f:
            batch: list[tuple[str, str, str]] = []
            for pos, line in enumerate(f):
                if pos in drop_set:
                    continue
                d = json.loads(line)
                batch.append((d["id"], d["text"], d["lang"]))
                if len(batch) >= 512:
                    _encode(batch, sp, eos, val_cut, writers, langs, chars)
                    batch = []
            _encode(batch, sp, eos, val_cut, writers, langs, chars)
        result = {"part": part, "shards": {}}
        for split, w in writers.items():
            if w.sizes:
                info = w.close()
                info.update(path=f"shards/{split}_{part:05d}", split=split, chars=chars[split],
                            langs={str(k): v for k, v in sorted(langs[split].items(), key=lambda kv: str(kv[0]))})
                result["shards"][split] = info
            else:
                w.abort()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json(marker, result)
    return result


def _encode(batch, sp, eos, val_cut, writers, langs, chars) -> None:
    if not batch:
        return
    encoded = sp.encode([t for _, t, _ in batch], num_threads=1)
    out: dict[str, list] = {"train": [], "val": []}
    for (doc_id, text, lang), ids in zip(batch, encoded, strict=True):
        split = "val" if id_hash(doc_id, b"val") < val_cut else "train"
        ids.append(eos)
        out[split].append(ids)
        langs[split][lang] += 1
        chars[split] += len(text)
    for split, docs in out.items():
        if docs:
            writers[split].add_many(docs)


