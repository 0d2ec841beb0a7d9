"""Near duplicates: MinHash over word 5-gram shingles, LSH with bands x rows, clusters by union.

Everything per shingle is numpy: token hashes, shingle hashes, and the
`bands*rows` hash permutations (multiply-shift on 64-bit shingle hashes) are
array operations; Python loops only over bands, n-gram offsets and 4096-row
blocks. Two documents become candidates when all `rows` values of some band
agree; candidate pairs are joined into clusters and each cluster keeps its
lowest uid (the earliest document), so the result does not depend on how the
work was split. With 14x8 a pair is caught with 50% probability at Jaccard ~0.69, 90% at 0.79.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from data_prep.document import Document
from data_prep.steps.base import Step, mix64, ngram_hashes, token_hashes, words
from data_prep.steps.exact_dedup import group_min, text_hash

_BLOCK = 4096
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class MinHasher:
    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1):
        self.ngram, self.bands, self.rows = ngram, bands, rows
        rng = np.random.default_rng(seed)
        n = bands * rows
        self.a = rng.integers(1, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, n, dtype=np.uint64)
        self.row_mult = mix64(np.arange(1, rows + 1, dtype=np.uint64) * _GOLDEN)
        self.band_salt = mix64(np.arange(1, bands + 1, dtype=np.uint64))

    def shingles(self, text: str) -> np.ndarray:
        h = token_hashes(words(text.lower()))
        if len(h) == 0:
            return np.array([text_hash(text)], np.uint64)
        return np.unique(ngram_hashes(h, min(self.ngram, len(h))))

    def signature(self, text: str) -> np.ndarray:
        """uint32[bands*rows]: the minimum of each hash permutation over the shingles."""
        sh = self.shingles(text)
        sig = np.full(len(self.a), np.iinfo(np.uint32).max, np.uint32)
        with np.errstate(over="ignore"):
            for i in range(0, len(sh), _BLOCK):
                block = sh[i : i + _BLOCK, None]
                vals = ((block * self.a + self.b) >> np.uint64(32)).astype(np.uint32)
                np.minimum(sig, vals.min(axis=0), out=sig)
        return sig

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """uint64[bands]: one key per band; equal keys = all rows of that band equal."""
        with np.errstate(over="ignore"):
            rows = sig.reshape(self.bands, self.rows).astype(np.uint64) * self.row_mult
            return mix64(rows.sum(axis=1, dtype=np.uint64) ^ self.band_salt)


def lsh_edges(keys: np.ndarray, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate edges (uid, lowest uid sharing the same band key). `keys` already carry the band salt."""
    return group_min(keys, uids)


def cluster_roots(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """Connected components of the edges a-b: {uid: lowest uid of its component} (min-label propagation)."""
    if len(a) == 0:
        return {}
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ea, eb = inv[: len(a)], inv[len(a) :]
    label = np.arange(len(nodes))
    while True:
        old = label.copy()
        m = np.minimum(label[ea], label[eb])
        np.minimum.at(label, ea, m)
        np.minimum.at(label, eb, m)
        label = label[label]  # pointer jumping
        if np.array_equal(label, old):
            break
    return dict(zip(nodes.tolist(), nodes[label].tolist(), strict=True))


class MinHashDedup(Step):
    """Near-dup removal within one stream (the runner does the same across partitions)."""

    name = "near_dup"

    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1):
        self.hasher = MinHasher(ngram, bands, rows, seed)

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        docs = list(docs)
        live = [i for i, d in enumerate(docs) if d.removed is None]
        keys = np.array([self.hasher.band_keys(self.hasher.signature(docs[i].text)) for i in live], np.uint64)
        if len(live):
            uids = np.repeat(np.arange(len(live), dtype=np.int64), self.hasher.bands)
            roots = cluster_roots(*lsh_edges(keys.reshape(-1), uids))
            for u, r in roots.items():
                if u != r:
                    docs[live[u]].remove("near_dup", docs[live[r]].id)
        yield from docs
