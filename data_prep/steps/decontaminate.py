"""Decontamination: remove training documents that share an n-gram with an evaluation text.

As in the GPT-3 paper: a document goes when any run of `ngram` (default 13) consecutive words of it
also occurs in an evaluation text. Words are compared lowercased and without punctuation; CJK
characters count as words, so for Chinese/Japanese/Korean the n-gram is 13 characters. An
evaluation text shorter than `ngram` words but of at least `min_words` is matched whole (a short
question still counts); shorter ones cannot be told from common phrases and are only counted.

`EvalIndex` holds the sorted 64-bit hashes of every evaluation n-gram with the source it came from
(built once by the driver, memory-mapped by every task); the removal reason is
`decontaminate:<source>`, so the manifest counts removals per benchmark file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from data_prep.document import Document
from data_prep.errors import ConfigError
from data_prep.steps.base import Step
from data_prep.steps.text import ngram_hashes, plain_words, token_hashes


class EvalIndex:
    def __init__(self, hashes: np.ndarray, source: np.ndarray, sources: list[str], lengths: list[int]):
        self.hashes, self.source, self.sources, self.lengths = hashes, source, sources, lengths

    @classmethod
    def build(cls, sources: list[dict], ngram: int = 13, min_words: int = 8,
              max_ngrams: int = 100_000_000) -> tuple[EvalIndex, list[dict]]:
        """From `eval_texts.read_sources` output; returns the index and per-source stats."""
        hashes, owner, stats, total, lengths = [], [], [], 0, {ngram}
        for i, src in enumerate(sources):
            st = Counter(texts=len(src["texts"]))
            for text in src["texts"]:
                ws = plain_words(text)
                n = ngram if len(ws) >= ngram else len(ws) if len(ws) >= min_words else 0
                if not n:
                    st["too_short"] += 1
                    continue
                lengths.add(n)
                g = ngram_hashes(token_hashes(ws), n)
                total += len(g)
                if total > max_ngrams:
                    raise ConfigError(f"--decontaminate: {src['source']}: more than decontaminate.max_ngrams "
                                      f"({max_ngrams:,}) evaluation n-grams")
                hashes.append(g)
                owner.append(np.full(len(g), i, np.int32))
            stats.append({"source": src["source"], "sha256": src["sha256"], "texts": st["texts"],
                          "too_short": st["too_short"]})
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        o = np.concatenate(owner) if owner else np.zeros(0, np.int32)
        order = np.lexsort((o, h))  # by hash, then the first source that has it
        h, o = h[order], o[order]
        first = np.r_[True, h[1:] != h[:-1]] if len(h) else np.zeros(0, bool)
        h, o = h[first], o[first]
        for i, st in enumerate(stats):
            st["ngrams"] = int((o == i).sum())
        return cls(h, o, [s["source"] for s in sources], sorted(lengths)), stats

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "hashes.npy", self.hashes)
        np.save(directory / "source.npy", self.source)
        (directory / "index.json").write_text(json.dumps({"sources": self.sources, "lengths": self.lengths}))

    @classmethod
    def load(cls, directory: Path) -> EvalIndex:
        meta = json.loads((directory / "index.json").read_text())
        return cls(np.load(directory / "hashes.npy", mmap_mode="r"), np.load(directory / "source.npy", mmap_mode="r"),
                   meta["sources"], meta["lengths"])

    def first_hit(self, text: str) -> tuple[str, str] | None:
        """(source, the shared words) for the first evaluation n-gram found in `text`, else None."""
        if not len(self.hashes):
            return None
        ws = plain_words(text)
        h = token_hashes(ws)
        best = None
        for n in self.lengths:
            g = ngram_hashes(h, n)
            if not len(g):
                continue
            pos = np.minimum(np.searchsorted(self.hashes, g), len(self.hashes) - 1)
            hits = np.flatnonzero(self.hashes[pos] == g)
            if len(hits) and (best is None or hits[0] < best[0]):
                best = (int(hits[0]), n, int(pos[hits[0]]))
        if best is None:
            return None
        at, n, p = best
        return self.sources[int(self.source[p])], " ".join(ws[at : at + n])


class Decontaminate(Step):
    name = "decontaminate"

    def __init__(self, index: EvalIndex):
        super().__init__()
        self.index = index

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            if doc.removed is None:
                hit = self.index.first_hit(doc.text)
                if hit is not None:
                    doc.remove(f"decontaminate:{hit[0]}", f"shares {hit[1]!r} with {hit[0]}")
            yield doc
