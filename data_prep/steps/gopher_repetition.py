"""Gopher repetition rules (Rae et al. 2021, appendix A.1, table A1), vectorized.

Removes a document when duplicated lines/paragraphs make up too much of it
(fraction of lines 0.30, of paragraphs 0.30, characters in duplicate lines 0.20,
in duplicate paragraphs 0.20), when its most frequent 2/3/4-gram covers more
than 0.20/0.18/0.16 of the characters, or when repeated 5..10-grams cover more
than 0.15, 0.14, 0.13, 0.12, 0.11, 0.10 of them. N-grams are hashed with numpy;
"repeated" counts every occurrence after the first, overlaps counted once.
"""

from __future__ import annotations

import numpy as np

from data_prep.document import Document
from data_prep.steps.base import Filter
from data_prep.steps.text import duplicates, lines, ngram_hashes, paragraphs, token_hashes, words

TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def top_ngram_fraction(h: np.ndarray, lengths: np.ndarray, n: int, total: int) -> float:
    g = ngram_hashes(h, n)
    if len(g) == 0:
        return 0.0
    _, first, counts = np.unique(g, return_index=True, return_counts=True)
    best = int(counts.argmax())
    if counts[best] < 2:
        return 0.0
    start = int(first[best])
    return float(counts[best] * lengths[start : start + n].sum()) / total


def dup_ngram_fraction(h: np.ndarray, lengths: np.ndarray, n: int, total: int) -> float:
    g = ngram_hashes(h, n)
    if len(g) == 0:
        return 0.0
    _, first = np.unique(g, return_index=True)
    dup = np.ones(len(g), bool)
    dup[first] = False
    if not dup.any():
        return 0.0
    starts = np.flatnonzero(dup)
    cover = np.bincount(starts, minlength=len(h) + 1) - np.bincount(starts + n, minlength=len(h) + 1)
    covered = np.cumsum(cover[:-1]) > 0
    return float(lengths[covered].sum()) / total


class GopherRepetition(Filter):
    name = "gopher_repetition"
    rules = ("dup_line_fraction", "dup_para_fraction", "dup_line_chars", "dup_para_chars", "top_ngram", "dup_ngram")

    def __init__(self, dup_line_fraction: float = 0.30, dup_para_fraction: float = 0.30,
                 dup_line_chars: float = 0.20, dup_para_chars: float = 0.20,
                 top_ngram: dict | None = None, dup_ngram: dict | None = None, disabled=()):
        super().__init__(disabled)
        self.line_frac, self.para_frac = dup_line_fraction, dup_para_fraction
        self.line_chars, self.para_chars = dup_line_chars, dup_para_chars
        self.top_ngram = {int(k): v for k, v in (top_ngram or TOP_NGRAM).items()}
        self.dup_ngram = {int(k): v for k, v in (dup_ngram or DUP_NGRAM).items()}

    def check(self, doc: Document):
        text = doc.text
        paras = paragraphs(text)
        n_dup, chars = duplicates(paras)
        if self.on("dup_para_fraction") and paras and n_dup / len(paras) > self.para_frac:
            return "dup_para_fraction", f"{n_dup / len(paras):.2f} > {self.para_frac}"
        if self.on("dup_para_chars") and chars / len(text) > self.para_chars:
            return "dup_para_chars", f"{chars / len(text):.2f} > {self.para_chars}"
        ls = lines(text)
        n_dup, chars = duplicates(ls)
        if self.on("dup_line_fraction") and ls and n_dup / len(ls) > self.line_frac:
            return "dup_line_fraction", f"{n_dup / len(ls):.2f} > {self.line_frac}"
        if self.on("dup_line_chars") and chars / len(text) > self.line_chars:
            return "dup_line_chars", f"{chars / len(text):.2f} > {self.line_chars}"
        if not (self.on("top_ngram") or self.on("dup_ngram")):
            return None
        ws = words(text.lower())
        h = token_hashes(ws)
        lengths = np.fromiter(map(len, ws), np.int64, len(ws))
        total = int(lengths.sum()) or 1
        if self.on("top_ngram"):
            for n, limit in self.top_ngram.items():
                frac = top_ngram_fraction(h, lengths, n, total)
                if frac > limit:
                    return "top_ngram", f"{n}-gram {frac:.2f} > {limit}"
        if self.on("dup_ngram"):
            for n, limit in self.dup_ngram.items():
                frac = dup_ngram_fraction(h, lengths, n, total)
                if frac > limit:
                    return "dup_ngram", f"{n}-gram {frac:.2f} > {limit}"
        return None
