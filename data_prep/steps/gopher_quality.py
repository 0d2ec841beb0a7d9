"""Gopher quality rules (Rae et al. 2021, "Scaling Language Models", appendix A.1).

Published thresholds: 50..100,000 words; mean word length 3..10 characters;
symbol-to-word ratio (# and ellipsis) at most 0.1; at most 90% of lines start
with a bullet; at most 30% of lines end with an ellipsis; at least 80% of words
contain an alphabetic character; at least 2 of the English stop words.
The stop-word rule applies to English (or unidentified) text only, and the
mean-word-length rule is skipped for CJK text, whose "words" are characters.
"""

from __future__ import annotations

import re

from data_prep.document import Document
from data_prep.steps.base import Filter
from data_prep.steps.text import CJK_LANGS, lines, words

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "▪", "◦", "‣", "⁃", "-", "*", "·")
ELLIPSES = ("...", "…")
_LETTER = re.compile(r"[^\W\d_]")
_LATIN_WORD = re.compile(r"[a-z]+")


class GopherQuality(Filter):
    name = "gopher_quality"
    rules = ("word_count", "mean_word_length", "symbol_ratio", "bullet_lines", "ellipsis_lines", "alpha_words", "stop_words")

    def __init__(self, min_words: int = 50, max_words: int = 100_000, min_mean_word_length: float = 3,
                 max_mean_word_length: float = 10, max_symbol_word_ratio: float = 0.1,
                 max_bullet_lines_ratio: float = 0.9, max_ellipsis_lines_ratio: float = 0.3,
                 min_alpha_words_ratio: float = 0.8, min_stop_words: int = 2, disabled=()):
        super().__init__(disabled)
        self.min_words, self.max_words = min_words, max_words
        self.min_mean, self.max_mean = min_mean_word_length, max_mean_word_length
        self.max_symbol, self.max_bullet, self.max_ellipsis = max_symbol_word_ratio, max_bullet_lines_ratio, max_ellipsis_lines_ratio
        self.min_alpha, self.min_stop = min_alpha_words_ratio, min_stop_words

    def check(self, doc: Document):
        text, lang = doc.text, doc.meta.get("lang")
        ws = words(text)
        n = len(ws)
        if self.on("word_count") and not self.min_words <= n <= self.max_words:
            return "word_count", f"{n} words, allowed {self.min_words}..{self.max_words}"
        if n == 0:
            return "word_count", "no words"
        if self.on("mean_word_length") and lang not in CJK_LANGS:
            mean = sum(map(len, ws)) / n
            if not self.min_mean <= mean <= self.max_mean:
                return "mean_word_length", f"{mean:.2f}, allowed {self.min_mean}..{self.max_mean}"
        if self.on("symbol_ratio"):
            ratio = (text.count("#") + text.count("...") + text.count("…")) / n
            if ratio > self.max_symbol:
                return "symbol_ratio", f"{ratio:.3f} > {self.max_symbol}"
        ls = lines(text)
        if self.on("bullet_lines") and ls:
            ratio = sum(ln.startswith(BULLETS) for ln in ls) / len(ls)
            if ratio > self.max_bullet:
                return "bullet_lines", f"{ratio:.2f} > {self.max_bullet}"
        if self.on("ellipsis_lines") and ls:
            ratio = sum(ln.endswith(ELLIPSES) for ln in ls) / len(ls)
            if ratio > self.max_ellipsis:
                return "ellipsis_lines", f"{ratio:.2f} > {self.max_ellipsis}"
        if self.on("alpha_words"):
            ratio = sum(1 for w in ws if w.isalpha() or _LETTER.search(w)) / n
            if ratio < self.min_alpha:
                return "alpha_words", f"{ratio:.2f} < {self.min_alpha}"
        if self.on("stop_words") and lang in (None, "en"):
            found = len(STOP_WORDS.intersection(_LATIN_WORD.findall(text.lower())))
            if found < self.min_stop:
                return "stop_words", f"{found} of {sorted(STOP_WORDS)} < {self.min_stop}"
        return None
