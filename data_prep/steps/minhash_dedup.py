"""Near duplicates: MinHash LSH finds candidate pairs, a shingle sketch verifies each one.

1. Shingles: word 5-grams (CJK: characters) of the text *as read* (normalized, before any
   filter edits lines), hashed to 64 bits with numpy. Filters that drop lines make twins
   diverge; hashing what was read keeps them twins.
2. Candidates: a MinHash signature of `bands*rows` values (multiply-shift permutations of the
   shingle hashes), cut into bands; two documents are candidates when all rows of a band agree.
   The default 20x4 is permissive: a pair at Jaccard 0.8 becomes a candidate with probability
   1 - (1 - 0.8^4)^20 > 0.9999, at 0.7 with 0.998, at 0.5 with 0.72 (the verifier sorts them out).
3. Verification: each document keeps a sketch, the `sketch` smallest of its shingle hashes (top
   32 bits). When both documents have fewer shingles than that, the sketches are the whole sets
   and the Jaccard is exact; otherwise it is computed on the shingles below the smaller cut-off,
   which estimates it with error about sqrt(J(1-J)/sketch). A pair is a near duplicate when
   that Jaccard is >= `threshold` (default 0.8).
4. Removal: in input order (uid), a document is removed when it has a verified pair with an
   earlier document that is kept; the record names that document and the Jaccard. No chains:
   every removed document is itself similar to the document it names.
"""

from __future__ import annotations

import numpy as np

from data_prep.steps.text import mix64, ngram_hashes, sorted_groups, text_hash, token_hashes, words

_BLOCK = 4096
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class MinHasher:
    def __init__(self, ngram: int = 5, bands: int = 20, rows: int = 4, seed: int = 1, sketch: int = 1024):
        self.ngram, self.bands, self.rows, self.sketch_size = ngram, bands, rows, sketch
        rng = np.random.default_rng(seed)
        n = bands * rows
        self.a = rng.integers(1, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, n, dtype=np.uint64)
        self.row_mult = mix64(np.arange(1, rows + 1, dtype=np.uint64) * _GOLDEN)
        self.band_salt = mix64(np.arange(1, bands + 1, dtype=np.uint64))

    def shingles(self, text: str) -> np.ndarray:
        """Sorted unique 64-bit hashes of the word n-grams (a text shorter than n: one n-gram of all of it)."""
        h = token_hashes(words(text.lower()))
        if len(h) == 0:
            return np.array([text_hash(text)], np.uint64)
        return np.unique(ngram_hashes(h, min(self.ngram, len(h))))

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """uint32[bands*rows]: the minimum of each hash permutation over the shingles."""
        sig = np.full(len(self.a), np.iinfo(np.uint32).max, np.uint32)
        with np.errstate(over="ignore"):
            for i in range(0, len(shingles), _BLOCK):
                block = shingles[i : i + _BLOCK, None]
                vals = ((block * self.a + self.b) >> np.uint64(32)).astype(np.uint32)
                np.minimum(sig, vals.min(axis=0), out=sig)
        return sig

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """uint64[bands]: one key per band; equal keys = all rows of that band equal."""
        with np.errstate(over="ignore"):
            rows = sig.reshape(self.bands, self.rows).astype(np.uint64) * self.row_mult
            return mix64(rows.sum(axis=1, dtype=np.uint64) ^ self.band_salt)

    def sketch(self, shingles: np.ndarray) -> np.ndarray:
        """uint32, sorted: the `sketch_size` smallest distinct top-32-bit shingle hashes."""
        return np.unique((shingles >> np.uint64(32)).astype(np.uint32))[: self.sketch_size]


def sketch_jaccard(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """Jaccard of two documents from their sketches (sorted uint32, at most `size` values each).

    A sketch shorter than `size` holds the whole set; a full one all values up to its last. Both
    sets are known exactly below the smaller last value of the full ones: the Jaccard there is
    exact when neither is full, an estimate from a uniform sample of the union otherwise.
    """
    cut = min([s[-1] for s in (a, b) if len(s) >= size], default=None)
    if cut is not None:
        a, b = a[: np.searchsorted(a, cut, "right")], b[: np.searchsorted(b, cut, "right")]
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


def candidate_pairs(keys: np.ndarray, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (later uid, earlier uid) of documents sharing a band key: each member of a group is
    paired with the group's first member and with the member just before it (2 pairs per member,
    however large the group), without repeats."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    u, first, starts = sorted_groups(keys, uids)
    later = ~starts
    prev = np.r_[u[:1], u[:-1]]
    a = np.concatenate([u[later], u[later]])
    b = np.concatenate([first[later], prev[later]])
    keep = a != b
    return unique_pairs(a[keep], b[keep])


def unique_pairs(a: np.ndarray, b: np.ndarray, *more: np.ndarray):
    """Pairs (a[i], b[i]) without repeats, sorted; `more` arrays follow their pair's first occurrence."""
    if len(a) == 0:
        return (a, b, *more)
    pairs = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    idx = pairs[1]
    return (pairs[0][:, 0].copy(), pairs[0][:, 1].copy(), *(m[idx] for m in more))


def keep_first(later: np.ndarray, earlier: np.ndarray, jaccard: np.ndarray,
               gone: set[int] | frozenset = frozenset()) -> dict[int, tuple[int, float]]:
    """Verified pairs -> {removed uid: (kept uid it duplicates, Jaccard)}.

    In uid order, a document is removed when one of its pairs is an earlier document still kept
    (the most similar such document, the earliest among equals); documents in `gone` (removed
    for another reason) are never kept twins. Depends only on the pairs, not on their order.
    """
    order = np.lexsort((earlier, -jaccard, later))
    removed: dict[int, tuple[int, float]] = {}
    decided = None
    for u, v, j in zip(later[order].tolist(), earlier[order].tolist(), jaccard[order].tolist(), strict=True):
        if u == decided or u in gone or v in gone or v in removed:
            continue
        removed[u] = (v, j)
        decided = u
    return removed

