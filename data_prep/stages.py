"""The work of one Ray task on one partition, as plain functions (testable without Ray).

Each stage writes its outputs for one partition under `DIR/work/` and publishes them atomically:
files go to a temp name and are renamed, a partition's directory appears only when complete. A
rerun after a crash reuses whatever was published and redoes the rest. The bucket-wise work
(dedup, boilerplate counts) lives in data_prep/buckets.py.

Documents get a `uid` = partition << 32 | position: the global input order.
Dedup keeps the earliest document, so results never depend on workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from data_prep.buckets import KeyChunks, ragged_rows
from data_prep.document import BadRecord, Document
from data_prep.readers import read_partition
from data_prep.steps import Boilerplate, EvalIndex, build_steps
from data_prep.steps.length import LengthPolicy


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


def _records(part: dict, cfg, counts: Counter, quarantine):
    for rec in read_partition(part, cfg.text_field, cfg.id_field):
        counts["records"] += 1
        if isinstance(rec, BadRecord):
            counts["q:" + rec.reason] += 1
            quarantine.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
        else:
            counts["read"] += 1
            yield rec


def _as_read(docs, counts: Counter):
    """Documents as they enter filtering (after length splits): counted, and their text remembered
    for near-dup shingles, which must not see the lines filters drop."""
    for doc in docs:
        counts["documents_in"] += 1
        counts["chars_in"] += len(doc.text)
        doc.meta["as_read"] = doc.text
        yield doc


def edits(steps) -> dict[str, int]:
    """What editing steps changed, as {"<step>:<what>": n}."""
    return {f"{s.name}:{k}": v for s in steps for k, v in sorted(s.counts.items())}


def eval_index(cfg, work: str | Path) -> EvalIndex | None:
    return EvalIndex.load(Path(work) / "decontam") if cfg.decontaminate.paths else None


def clean_partition(part: dict, cfg, work: str) -> dict:
    """Read, normalize, filter, langid, decontaminate, redact; keys for dedup and boilerplate."""
    final = Path(work) / "clean" / f"{part['index']:05d}"
    if (final / "stats.json").is_file():
        return json.loads((final / "stats.json").read_text())
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    steps = build_steps(cfg, eval_index(cfg, work))
    counts: Counter = Counter()
    keys = KeyChunks(tmp, part["index"], cfg, lambda doc_id: id_hash(doc_id, b"sample"))
    langs: Counter = Counter()
    with open(tmp / "quarantine.jsonl", "w") as quarantine, open(tmp / "removed.jsonl", "w") as removed, \
            open(tmp / "docs.jsonl", "w") as out, open(tmp / "ids.jsonl", "w") as ids:
        docs = _records(part, cfg, counts, quarantine)
        for step in steps:
            docs = step(docs)
            if isinstance(step, LengthPolicy):
                docs = _as_read(docs, counts)
        for doc in docs:
            if doc.removed is not None:
                counts["r:" + doc.removed] += 1
                counts["rc:" + doc.removed] += len(doc.text)
                counts["rl:" + doc.removed] += doc.text.count("\n") + 1
                removed.write(json.dumps({"id": doc.id, "reason": doc.removed, "detail": doc.detail}, ensure_ascii=False) + "\n")
                continue
            lang = doc.meta.get("lang")
            langs[lang] += 1
            out.write(json.dumps({"id": doc.id, "text": doc.text, "lang": lang}, ensure_ascii=False) + "\n")
            ids.write(json.dumps(doc.id, ensure_ascii=False) + "\n")  # reports name dups without reading texts
            keys.add(doc)
    n = keys.close()
    for step in steps:  # lines dropped from documents that were kept
        counts.update({"rc:" + k: v for k, v in step.cut_chars.items()})
        counts.update({"rl:" + k: v for k, v in step.cut_lines.items()})
    stats = {
        "index": part["index"], "rel": part["rel"], "records": counts["records"], "read": counts["read"],
        "documents_in": counts["documents_in"], "kept": n,
        "quarantined": {k[2:]: v for k, v in sorted(counts.items()) if k.startswith("q:")},
        "removed": {k[2:]: v for k, v in sorted(counts.items()) if k.startswith("r:")},
        "chars_in": counts["chars_in"],
        "removed_chars": {k[3:]: v for k, v in sorted(counts.items()) if k.startswith("rc:")},
        "removed_lines": {k[3:]: v for k, v in sorted(counts.items()) if k.startswith("rl:")},
        "langs": {str(k): v for k, v in sorted(langs.items(), key=lambda kv: str(kv[0]))},
        "edits": edits(steps),
    }
    write_json(tmp / "stats.json", stats)
    _publish_dir(tmp, final)
    return stats


def boilerplate_step(cfg, work: str | Path) -> Boilerplate | None:
    path = Path(work) / "boilerplate.npy"
    return Boilerplate(np.load(path), cfg.boilerplate.unit) if cfg.boilerplate.enabled and path.is_file() else None


def surviving(work: str | Path, part: int, skip: Callable[[int], bool],
              boilerplate: Boilerplate | None, skipped: list | None = None) -> Iterator[tuple[int, Document]]:
    """(position, document) for a partition's documents not skipped (by dedup, by sampling), boilerplate
    lines stripped; a document with nothing but boilerplate comes marked as removed. `skipped`, if given,
    collects [position, characters, lines] of each skipped document (what dedup removed, for the report)."""

    def read():
        keys = ragged_rows(work, part, "units") if boilerplate else None
        with open(Path(work) / "clean" / f"{part:05d}" / "docs.jsonl", encoding="utf-8") as f:
            for pos, line in enumerate(f):
                hits = boilerplate.hits(next(keys)) if keys is not None else None
                if not skip(pos):
                    d = json.loads(line)
                    meta = {"lang": d["lang"], "pos": pos}
                    if hits is not None:
                        meta["boilerplate"] = hits if hits.any() else None
                    yield Document(d["id"], d["text"], meta=meta)
                elif skipped is not None:
                    text = json.loads(line)["text"]
                    skipped.append([pos, len(text), text.count("\n") + 1])

    docs = boilerplate(read()) if boilerplate else read()
    for doc in docs:
        yield doc.meta["pos"], doc


def tokenize_partition(part: int, drop: np.ndarray, tokenizer: str, cfg, work: str, out: str) -> dict:
    """Encode a partition's surviving documents into train/val shards (EOS after each)."""
    import sentencepiece as spm

    from data_prep.indexed import IndexedWriter, dtype_for_vocab

    marker = Path(work) / "tok" / f"{part:05d}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    eos = sp.eos_id()
    dtype = dtype_for_vocab(sp.get_piece_size())
    val_cut = int(cfg.val_fraction * 2**64)
    boilerplate = boilerplate_step(cfg, work)
    writers = {s: IndexedWriter(Path(out) / "shards" / f"{s}_{part:05d}", dtype) for s in ("train", "val")}
    langs = {"train": Counter(), "val": Counter()}
    chars, removed, duplicates = Counter(), [], []
    try:
        batch: list[tuple[str, str, str]] = []
        for _, doc in surviving(work, part, set(drop.tolist()).__contains__, boilerplate, duplicates):
            if doc.removed is not None:
                removed.append({"id": doc.id, "reason": doc.removed, "detail": doc.detail})
                continue
            batch.append((doc.id, doc.text, doc.meta["lang"]))
            if len(batch) >= 512:
                _encode(batch, sp, eos, val_cut, writers, langs, chars)
                batch = []
        _encode(batch, sp, eos, val_cut, writers, langs, chars)
        result = {"part": part, "shards": {}, "removed": removed, "edits": edits([boilerplate] if boilerplate else []),
                  "duplicates": duplicates}  # [position, characters, lines] of each document dedup removed
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
