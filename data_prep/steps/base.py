"""What every step is: a small class with one method over an iterator of documents.

A `Filter` only decides; its `check(doc)` returns None to keep a document or
`(rule, detail)` to remove it as "<name>:<rule>". Removed documents keep flowing
(marked) so the runner reports each one. Thresholds are constructor arguments
with the published values as defaults; `disabled` turns single rules off.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np

from data_prep.document import Document

# CJK ideographs, kana and hangul are words on their own; elsewhere a word is a run of non-space.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
WORD_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
CJK_LANGS = {"zh", "ja", "ko"}


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


class Step:
    name = "step"

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        raise NotImplementedError


class Filter(Step):
    rules: tuple[str, ...] = ()

    def __init__(self, disabled: Iterable[str] = ()):
        # accept "rule" or "<name>:rule"
        self.disabled = {r.split(":", 1)[-1] for r in disabled if r.split(":", 1)[0] in (self.name, r)}
        unknown = self.disabled - set(self.rules)
        if unknown:
            raise ValueError(f"{self.name}: unknown rule(s) {sorted(unknown)}; known: {list(self.rules)}")

    def on(self, rule: str) -> bool:
        return rule not in self.disabled

    def check(self, doc: Document) -> tuple[str, str] | None:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            if doc.removed is None:
                hit = self.check(doc)
                if hit is not None:
                    doc.remove(f"{self.name}:{hit[0]}", hit[1])
            yield doc


# --------------------------------------------------------------------------- vectorized hashing

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_TOKEN_CHARS = 24
_POWERS = (np.uint64(0x100000001B3) ** np.arange(_TOKEN_CHARS, dtype=np.uint64)).astype(np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, elementwise (wrapping uint64 arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def token_hashes(tokens: list[str]) -> np.ndarray:
    """64-bit hash of each token (first 24 characters), without a Python loop per token."""
    if not tokens:
        return np.zeros(0, np.uint64)
    codes = np.array(tokens, dtype=f"<U{_TOKEN_CHARS}").view(np.uint32).reshape(len(tokens), _TOKEN_CHARS)
    with np.errstate(over="ignore"):
        return mix64(codes.astype(np.uint64) @ _POWERS)


_NGRAM_MULT = mix64(np.arange(1, 33, dtype=np.uint64))


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of n consecutive token hashes (len(h) - n + 1 values)."""
    m = len(h) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    out = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # n is small (<= 10): a loop over offsets, not over n-grams
            out += h[j : j + m] * _NGRAM_MULT[j]
    return mix64(out)
