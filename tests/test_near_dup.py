"""Near-duplicate detection on hand-built documents: candidates, Jaccard verification, who is kept."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from factories import dedup_texts

from data_prep import buckets, partitions, stages
from data_prep.config import PrepConfig
from data_prep.steps.minhash_dedup import MinHasher, candidate_pairs, keep_first, sketch_jaccard

VOCAB = [f"w{i}" for i in range(20000)]


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """The oracle: Jaccard of the sets of word n-grams, as plain Python tuples."""
    sa, sb = ({tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)} for ws in (a.lower().split(), b.lower().split()))
    return len(sa & sb) / len(sa | sb)


def edited(words: list[str], k: int, rng: random.Random) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), k):
        out[i] = rng.choice(VOCAB)
    return out


@pytest.mark.parametrize("length", [60, 400, 3000])
def test_sketch_jaccard_is_exact_below_the_sketch_size_and_close_above(length):
    rng = random.Random(length)
    h = MinHasher(sketch=1024)
    errors = []
    for k in (1, 5, 20, 60):
        base = [rng.choice(VOCAB) for _ in range(length)]
        a, b = " ".join(base), " ".join(edited(base, min(k, length // 4), rng))
        got = sketch_jaccard(h.sketch(h.shingles(a)), h.sketch(h.shingles(b)), 1024)
        errors.append(abs(got - shingle_jaccard(a, b)))
    if length < 1024:
        assert max(errors) < 1e-9  # the sketches are the whole shingle sets
    else:
        assert max(errors) < 0.05  # ~3 sigma of sqrt(J(1-J)/1024)
    assert sketch_jaccard(np.array([1, 2, 3], np.uint32), np.array([2, 3, 4], np.uint32), 8) == 0.5
    # a full sketch (4 of 4) knows its set only up to 4: the other's 9 is beyond what can be compared
    assert sketch_jaccard(np.array([1, 2, 3, 4], np.uint32), np.array([2, 3, 9], np.uint32), 4) == 0.5


def test_candidates_pair_each_member_with_the_first_and_the_previous():
    keys = np.array([7, 7, 7, 9, 9, 5], np.uint64)
    uids = np.array([30, 10, 20, 40, 41, 50], np.int64)
    a, b = candidate_pairs(keys, uids)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(20, 10), (30, 10), (30, 20), (41, 40)]


def test_keep_first_names_a_kept_document_and_never_chains():
    # 2~1 (0.9), 3~2 (0.85) but 3 !~ 1: 3 stays (its only twin went); 5~4 and 5~1: the more similar kept one wins
    later = np.array([2, 3, 5, 5, 7])
    earlier = np.array([1, 2, 4, 1, 6])
    jac = np.array([0.9, 0.85, 0.82, 0.95, 0.99])
    removed = keep_first(later, earlier, jac, gone=frozenset({6}))
    assert removed == {2: (1, 0.9), 5: (1, 0.95)}
    order = np.random.default_rng(0).permutation(len(later))
    assert keep_first(later[order], earlier[order], jac[order], gone=frozenset({6})) == removed


def test_stream_dedup_removes_pairs_above_the_threshold_only(tmp_path):
    rng = random.Random(3)
    base = [rng.choice(VOCAB) for _ in range(300)]
    close, far = edited(base, 3, rng), edited(base, 25, rng)  # Jaccard ~0.9 and ~0.45
    texts = [" ".join(w) for w in (base, far, close)]
    assert shingle_jaccard(texts[0], texts[2]) > 0.85 and shingle_jaccard(texts[0], texts[1]) < 0.6
    out = dedup_texts(tmp_path, texts)
    assert out[:2] == [None, None] and out[2][:2] == ("near_dup", 0)
    assert out[2][2] == pytest.approx(shingle_jaccard(texts[0], texts[2]), abs=1e-4)
    looser = dedup_texts(tmp_path / "loose", texts, threshold=0.4)
    assert [r and r[0] for r in looser] == [None, "near_dup", "near_dup"]


def test_twins_that_filters_make_diverge_are_still_found(tmp_path):
    """C4's terminal-punctuation rule (on here) drops lines without it: the twin that lost its full stops loses those lines,
    so the texts that reach the shards differ a lot; the shingles of the text as read do not."""
    rng = random.Random(5)
    sentences = [" ".join(rng.choice(VOCAB) for _ in range(12)) for _ in range(24)]
    stops = "the of and to in that have with be".split()
    lines = [f"{s} {stops[i % 9]} {stops[(i + 1) % 9]}." for i, s in enumerate(sentences)]
    twin = [ln[:-1] if i % 4 == 0 else ln for i, ln in enumerate(lines)]  # a quarter of the lines lose their stop
    path = tmp_path / "in.jsonl"
    # one paragraph a line: a line without its stop is a line of its own, not one wrapped into the next
    path.write_text("".join(json.dumps({"id": i, "text": "\n\n".join(t)}) + "\n" for i, t in enumerate([lines, twin])))
    cfg = PrepConfig(filters=["c4"], filter_enable=["c4:terminal_punct"], dedup_buckets=2, boilerplate={"enabled": False})
    _, parts = partitions.plan([path], 100)
    stats = stages.clean_partition(parts[0], cfg, str(tmp_path / "work"))
    assert stats["kept"] == 2
    kept = [json.loads(x)["text"] for x in (tmp_path / "work/clean/00000/docs.jsonl").read_text().splitlines()]
    assert shingle_jaccard(*kept) < 0.8 < shingle_jaccard("\n\n".join(lines), "\n\n".join(twin))
    res = [buckets.dedup_bucket(b, [0], str(tmp_path / "work"), cfg) for b in range(2)]
    a, b, j = buckets.merge_pairs(res)
    assert (a.tolist(), b.tolist()) == ([1], [0])
    assert j[0] == pytest.approx(shingle_jaccard("\n\n".join(lines), "\n\n".join(twin)), abs=1e-9)
