"""Boilerplate across documents: lines (or paragraphs) found in too many documents of the corpus.

Navigation bars, cookie banners and licence footers repeat across thousands of pages; no single
page shows it. Two passes, as CCNet and dolma do it: the clean stage records the keys of every
document's lines (`line_keys`: a 64-bit hash of the line lowercased, digits as 0, punctuation and
spacing dropped, so "© 2019 Acme Inc." and "2021 ACME inc" agree), a bucket stage counts in how
many documents each key occurs (`frequent`), and this step then drops the lines whose key occurs
in more than `max_docs` documents. A document with nothing else left is removed
(`boilerplate:nothing_left`); `counts` holds the lines and UTF-8 bytes removed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np

from data_prep.document import Document
from data_prep.steps.base import Step
from data_prep.steps.text import text_hash

_DIGITS = re.compile(r"\d")
_NOT_WORD = re.compile(r"[\W_]+")
_BLANK_RUNS = re.compile(r"\n{3,}")
_BREAK = {"line": re.compile(r"\n"), "paragraph": re.compile(r"\n\s*\n")}


def units(text: str, unit: str) -> list[str]:
    """The text cut into lines or paragraphs, separators dropped (joined back by `join`)."""
    return _BREAK[unit].split(text)


def join(parts: list[str], unit: str) -> str:
    return ("\n" if unit == "line" else "\n\n").join(parts)


def unit_key(part: str) -> int | None:
    """The key of one line/paragraph, or None when nothing but punctuation and spaces is in it."""
    norm = _NOT_WORD.sub(" ", _DIGITS.sub("0", part.lower())).strip()
    return text_hash(norm) if norm else None


def unit_keys(text: str, unit: str = "line") -> np.ndarray:
    """The key of each line/paragraph of a document, in order (0: none)."""
    return np.array([unit_key(p) or 0 for p in units(text, unit)], np.uint64)


def line_keys(keys: np.ndarray) -> np.ndarray:
    """Distinct keys of one document's `unit_keys` (each document counts once per key)."""
    return np.unique(keys[keys != 0])


def frequent(keys: np.ndarray, max_docs: int) -> np.ndarray:
    """Sorted keys that occur more than `max_docs` times (one occurrence per document)."""
    if len(keys) == 0:
        return np.zeros(0, np.uint64)
    values, counts = np.unique(keys, return_counts=True)
    return values[counts > max_docs]


class Boilerplate(Step):
    name = "boilerplate"

    def __init__(self, keys: np.ndarray, unit: str = "line"):
        super().__init__()
        self.keys, self.unit = np.asarray(keys, np.uint64), unit

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        """A document may carry `meta["boilerplate"]`: which of its units to drop, worked out beforehand
        from keys the clean stage stored (None: none), so its text need not be hashed again here."""
        for doc in docs:
            if doc.removed is None and len(self.keys):
                drop = doc.meta["boilerplate"] if "boilerplate" in doc.meta else self.hits(unit_keys(doc.text, self.unit))
                if drop is not None and drop.any():
                    self.strip(doc, drop)
            yield doc

    def hits(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` are boilerplate."""
        if not len(self.keys):
            return np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return (self.keys[pos] == keys) & (keys != 0)

    def strip(self, doc: Document, drop: np.ndarray) -> None:
        parts = units(doc.text, self.unit)
        gone = [p for p, d in zip(parts, drop.tolist(), strict=True) if d]
        self.counts[f"{self.unit}s"] += len(gone)
        self.counts["bytes"] += sum(len(p.encode("utf-8")) for p in gone)
        self.counts["documents"] += 1
        text = _BLANK_RUNS.sub("\n\n", join([p for p, d in zip(parts, drop.tolist(), strict=True) if not d], self.unit))
        if unit_key(text) is None:
            doc.remove("boilerplate:nothing_left", f"{len(gone)} boilerplate {self.unit}(s) and nothing else")
        else:
            doc.text = text.strip()
