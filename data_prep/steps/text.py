"""Text helpers every step shares: what a word, a line, a paragraph and terminal punctuation are,
the vectorized 64-bit hashes of tokens and n-grams, and grouping documents by such a hash (one definition,
used by the filters, exact and MinHash dedup, boilerplate and decontamination alike).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

# CJK ideographs, kana and hangul are words on their own; elsewhere a word is a run of non-space.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
WORD_RE = re.compile(f"[{CJK}]|[^\\s{CJK}]+")
# The same, without punctuation: letters/digits runs (what n-gram matching compares, lowercased).
PLAIN_WORD_RE = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")
CJK_LANGS = {"zh", "ja", "ko"}
TERMINAL = (".", "!", "?", '"', "”", "’", "'", "»", "…", "。", "！", "？", "」", "』")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def plain_words(text: str) -> list[str]:
    """Lowercased words without punctuation; CJK characters one word each."""
    return PLAIN_WORD_RE.findall(text.lower())


def lines(text: str) -> list[str]:
    """Non-blank lines, stripped."""
    return [ln for ln in (ln.strip() for ln in text.split("\n")) if ln]


# Hard-wrapped text (man pages, mail, plain-text docs) breaks lines where a column limit falls, not where a
# sentence ends. Widths outside this range are not taken for wrapping (web text puts a paragraph on one line).
WRAP_WIDTHS = (40, 200)


def wrap_width(raw_lines: list[str]) -> int | None:
    """The column a document looks hard-wrapped at, or None: among its lines no longer than WRAP_WIDTHS[1], the
    length reached by the 3rd-longest (the 10th percentile from the top when over 30), if at least WRAP_WIDTHS[0]."""
    lengths = sorted((n for n in (len(ln.rstrip()) for ln in raw_lines if ln.strip()) if n <= WRAP_WIDTHS[1]), reverse=True)
    k = max(3, len(lengths) // 10)
    if len(lengths) < k:
        return None
    width = lengths[k - 1]
    return width if WRAP_WIDTHS[0] <= width <= WRAP_WIDTHS[1] else None


def logical_lines(raw_lines: list[str]) -> list[list[str]]:
    """Consecutive lines grouped into the logical lines they were wrapped from. In a document with a wrap width,
    a line joins the next when it does not end a sentence, is at most WRAP_WIDTHS[1] long, and the next line's
    first word would not have fitted on it within the width (the rule a wrapping editor follows). Blank lines
    stay groups of their own; in unwrapped text every line is a group."""
    width = wrap_width(raw_lines)
    groups: list[list[str]] = []
    joined = False
    for i, ln in enumerate(raw_lines):
        if joined:
            groups[-1].append(ln)
        else:
            groups.append([ln])
        nxt = raw_lines[i + 1].split() if width and i + 1 < len(raw_lines) else []
        end = ln.rstrip()
        joined = bool(nxt and end.strip() and not end.endswith(TERMINAL) and
                      width - len(nxt[0]) - 1 < len(end) <= WRAP_WIDTHS[1])
    return groups


def unwrap(group: list[str]) -> str:
    """A logical line's text: its lines stripped and joined by spaces ("" for a blank line)."""
    return " ".join(ln.strip() for ln in group).strip()


def paragraphs(text: str) -> list[str]:
    """Non-blank paragraphs (separated by blank lines), stripped."""
    return [p for p in (p.strip() for p in _PARAGRAPH_BREAK.split(text)) if p]


def duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, their total characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def text_hash(text: str) -> int:
    """A stable 64-bit hash of a string (the same in every process and run)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


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


_NGRAM_MULT = mix64(np.arange(1, 65, dtype=np.uint64))


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of n consecutive token hashes (len(h) - n + 1 values); n <= 64."""
    m = len(h) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    out = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # n is small: a loop over offsets, not over n-grams
            out += h[j : j + m] * _NGRAM_MULT[j]
    return mix64(out)


def sorted_groups(keys: np.ndarray, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uids sorted by (key, uid); for each, the lowest uid with its key; and whether it is that lowest."""
    order = np.lexsort((uids, keys))
    k, u = keys[order], uids[order]
    starts = np.r_[True, k[1:] != k[:-1]]
    return u, u[np.maximum.accumulate(np.where(starts, np.arange(len(u)), 0))], starts
