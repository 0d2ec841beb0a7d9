"""Keys the clean stage writes per partition, and the bucket-wise work done on them (one Ray task per bucket).

Per partition, every `shard_docs` documents (bounded memory, even for one huge compressed file):
- `keys_NNNNN.npz`: per bucket b, exact-text hashes `e{b}`/`eu{b}` (uids), MinHash band keys
  `n{b}`/`nu{b}`, boilerplate line keys `l{b}`/`lp{b}` (positions in the partition), and `sample`
  (the tokenizer-sample hash of each document);
- `sketch_NNNNN.npy` + `sketchoff_NNNNN.npy`: every document's shingle sketch (uint32) and the
  offsets into it, plain .npy so verification reads only the documents it needs (memory-mapped);
- `units_NNNNN.npy` + `unitsoff_NNNNN.npy`: the key of every line (paragraph) of every document, in
  order, so the tokenize stage strips boilerplate without hashing the texts again.
A key goes to bucket `key % buckets`, so each bucket task sees every copy of a key it owns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.steps.boilerplate import frequent, line_keys, unit_keys
from data_prep.steps.exact_dedup import group_min
from data_prep.steps.minhash_dedup import MinHasher, candidate_pairs, keep_first, sketch_jaccard, unique_pairs
from data_prep.steps.text import text_hash

PART_BITS = 32
POS_MASK = (1 << PART_BITS) - 1


def uid_of(part: int, pos: int | np.ndarray):
    return (np.int64(part) << PART_BITS) + pos


class KeyChunks:
    """Collects a partition's keys document by document; writes them every `shard_docs` documents."""

    def __init__(self, directory: Path, part: int, cfg, sample_hash):
        self.dir, self.part, self.cfg, self.sample_hash = directory, part, cfg, sample_hash
        m = cfg.minhash
        self.hasher = MinHasher(m.ngram, m.bands, m.rows, m.seed, m.sketch)
        self.near = cfg.dedup and cfg.near_dedup
        self.exact: list[int] = []
        self.bands: list[np.ndarray] = []
        self.sketches: list[np.ndarray] = []
        self.lines: list[np.ndarray] = []
        self.sample: list[int] = []
        self.done = self.chunks = 0

    def add(self, doc) -> None:
        """`doc.text` is what will be trained on; `doc.meta["as_read"]` the text before filters edited it."""
        if self.cfg.dedup:
            self.exact.append(text_hash(doc.text))
        if self.near:
            shingles = self.hasher.shingles(doc.meta.get("as_read", doc.text))
            self.bands.append(self.hasher.band_keys(self.hasher.signature(shingles)))
            self.sketches.append(self.hasher.sketch(shingles))
        if self.cfg.boilerplate.enabled:
            self.lines.append(unit_keys(doc.text, self.cfg.boilerplate.unit))
        self.sample.append(self.sample_hash(doc.id))
        if len(self.sample) >= self.cfg.shard_docs:
            self.flush()

    def flush(self) -> None:
        n, cfg, buckets = len(self.sample), self.cfg, self.cfg.dedup_buckets
        pos = np.arange(self.done, self.done + n, dtype=np.int64)
        uids = uid_of(self.part, pos)
        arrays = {"sample": np.array(self.sample, np.uint64)}
        if cfg.dedup:
            _split(arrays, "e", "eu", np.array(self.exact, np.uint64), uids, buckets)
        if self.near:
            flat = np.array(self.bands, np.uint64).reshape(-1)
            _split(arrays, "n", "nu", flat, np.repeat(uids, cfg.minhash.bands), buckets)
            _save_ragged(self.dir, "sketch", self.chunks, self.sketches, np.uint32)
        if cfg.boilerplate.enabled:
            _save_ragged(self.dir, "units", self.chunks, self.lines, np.uint64)
            distinct = [line_keys(k) for k in self.lines]
            keys = np.concatenate([np.zeros(0, np.uint64), *distinct])
            owner = np.repeat(pos, np.fromiter(map(len, distinct), np.int64, n)).astype(np.uint32)
            _split(arrays, "l", "lp", keys, owner, buckets)
        np.savez(self.dir / f"keys_{self.chunks:05d}.npz", **arrays)
        self.chunks += 1
        self.done += n
        self.exact, self.bands, self.sketches, self.lines, self.sample = [], [], [], [], []

    def close(self) -> int:
        if self.sample or not self.chunks:
            self.flush()
        return self.done


def _save_ragged(directory: Path, name: str, chunk: int, rows: list[np.ndarray], dtype) -> None:
    """Rows of different lengths as one flat .npy and the offsets of each row (`<name>off_`)."""
    sizes = np.fromiter(map(len, rows), np.int64, len(rows))
    np.save(directory / f"{name}_{chunk:05d}.npy", np.concatenate([np.zeros(0, dtype), *rows]))
    np.save(directory / f"{name}off_{chunk:05d}.npy", np.r_[0, np.cumsum(sizes)])


def ragged_rows(work: str | Path, part: int, name: str):
    """Every row a partition saved under `name`, in document order."""
    d = Path(work) / "clean" / f"{part:05d}"
    for path in sorted(d.glob(f"{name}_*.npy")):
        values, off = np.load(path), np.load(d / path.name.replace(f"{name}_", f"{name}off_"))
        for i in range(len(off) - 1):
            yield values[off[i] : off[i + 1]]


def _split(arrays: dict, name: str, owner_name: str, keys: np.ndarray, owners: np.ndarray, buckets: int) -> None:
    for b in range(buckets):
        m = keys % np.uint64(buckets) == b
        arrays[f"{name}{b}"], arrays[f"{owner_name}{b}"] = keys[m], owners[m]


def key_files(work: str | Path, part: int) -> list[Path]:
    return sorted((Path(work) / "clean" / f"{part:05d}").glob("keys_*.npz"))


def _gather(work: str, parts: list[int], name: str, owner_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Keys `name` and their documents' uids (`owner_name`: uids, or positions for `lp`) from every key file."""
    keys, uids = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    for p in parts:
        for path in key_files(work, p):
            with np.load(path) as z:
                keys.append(z[name])
                owners = z[owner_name].astype(np.int64)
                uids.append(uid_of(p, owners) if owner_name.startswith("lp") else owners)
    return np.concatenate(keys), np.concatenate(uids)


class Sketches:
    """Random access to any document's sketch, by uid (memory-mapped; chunks of `shard_docs` documents)."""

    def __init__(self, work: str | Path, shard_docs: int):
        self.root, self.shard_docs, self.open = Path(work) / "clean", shard_docs, {}

    def __getitem__(self, uid: int) -> np.ndarray:
        part, pos = uid >> PART_BITS, uid & POS_MASK
        chunk, i = divmod(pos, self.shard_docs)
        if (part, chunk) not in self.open:
            d = self.root / f"{part:05d}"
            self.open[(part, chunk)] = (np.load(d / f"sketch_{chunk:05d}.npy", mmap_mode="r"),
                                        np.load(d / f"sketchoff_{chunk:05d}.npy"))
        values, off = self.open[(part, chunk)]
        return np.asarray(values[off[i] : off[i + 1]])


def dedup_bucket(bucket: int, parts: list[int], work: str, cfg) -> dict:
    """Exact groups, and near-duplicate pairs verified against `minhash.threshold`, among the keys of `bucket`."""
    ek, eu = _gather(work, parts, f"e{bucket}", f"eu{bucket}")
    dup, kept = group_min(ek, eu)
    result = {"exact": (dup, kept), "near": (np.zeros(0, np.int64),) * 2 + (np.zeros(0),), "checked": 0}
    if cfg.near_dedup:
        nk, nu = _gather(work, parts, f"n{bucket}", f"nu{bucket}")
        a, b = candidate_pairs(nk, nu)
        sketches, size = Sketches(work, cfg.shard_docs), cfg.minhash.sketch
        j = np.array([sketch_jaccard(sketches[x], sketches[y], size) for x, y in zip(a.tolist(), b.tolist(), strict=True)])
        ok = j >= cfg.minhash.threshold if len(j) else np.zeros(0, bool)
        result["near"], result["checked"] = (a[ok], b[ok], j[ok]), len(a)
    return result


def boilerplate_bucket(bucket: int, parts: list[int], work: str, max_docs: int) -> np.ndarray:
    """Line keys of `bucket` found in more than `max_docs` documents that survived dedup (sorted)."""
    keys, uids = _gather(work, parts, f"l{bucket}", f"lp{bucket}")
    dropped = np.load(Path(work) / "dropped.npy", mmap_mode="r")  # sorted; read only where looked up
    live = np.ones(len(uids), bool)
    if len(dropped):
        at = np.minimum(np.searchsorted(dropped, uids), len(dropped) - 1)
        live = np.asarray(dropped[at]) != uids
    return frequent(keys[live], max_docs)


def merge_pairs(results: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The verified pairs of all buckets, each pair once."""
    cat = [np.concatenate([r["near"][i] for r in results]) for i in range(3)] if results else [np.zeros(0)] * 3
    return unique_pairs(cat[0].astype(np.int64), cat[1].astype(np.int64), cat[2])


def removals(results: list[dict]) -> tuple[dict[int, tuple[str, int, float | None]], int]:
    """Every bucket's results -> ({removed uid: (reason, uid of the kept twin, Jaccard or None)}, similar pairs).
    Exact duplicates first; a near duplicate is removed only for a twin still kept (`keep_first`)."""
    removed: dict[int, tuple[str, int, float | None]] = {}
    for r in results:
        for u, k in zip(*(x.tolist() for x in r["exact"]), strict=True):
            removed[u] = ("exact_dup", k, None)
    a, b, j = merge_pairs(results)
    for u, (k, jac) in keep_first(a, b, j, gone=frozenset(removed)).items():
        removed[u] = ("near_dup", k, round(jac, 4))
    return removed, len(a)
