"""Boilerplate removal on hand-built documents: line keys, counts across documents, stripping."""

from __future__ import annotations

import json

import numpy as np

from data_prep import buckets, partitions, stages
from data_prep.config import PrepConfig
from data_prep.document import Document
from data_prep.steps import Boilerplate
from data_prep.steps.boilerplate import frequent, line_keys, unit_key, unit_keys

FOOTER = "© Copyright 2019 Acme Inc. All rights reserved."  # not ASCII: bytes != characters
BODY = ["The river rose two metres overnight and the old bridge was closed to traffic.",
        "Engineers will inspect the stone piers once the water has gone down again.",
        "Shops near the market square opened late because their cellars were flooded.",
        "The mayor thanked the volunteers who carried sandbags through the night."]


def test_line_keys_ignore_case_digits_punctuation_and_spacing():
    assert unit_key(FOOTER) == unit_key("© COPYRIGHT 2024 acme inc -- all rights   reserved!") is not None
    assert unit_key("* * * ---") is None
    assert unit_key("Copyright Acme") != unit_key(FOOTER)
    every = unit_keys(f"{BODY[0]}\n{FOOTER}\n\n{FOOTER}\n")
    assert len(every) == 5 and every[2] == every[4] == 0 and every[1] == every[3] == unit_key(FOOTER)
    keys = line_keys(every)
    assert len(keys) == 2 and list(keys) == sorted(keys)  # distinct, one per document
    assert len(line_keys(unit_keys(f"{BODY[0]}\n{BODY[1]}\n\n{BODY[2]}", "paragraph"))) == 2


def test_frequent_counts_documents_not_occurrences():
    keys = np.array([5, 5, 5, 7, 7, 9], np.uint64)
    assert frequent(keys, 2).tolist() == [5] and frequent(keys, 1).tolist() == [5, 7]


def test_step_strips_frequent_lines_and_counts_bytes():
    step = Boilerplate(np.array(sorted([unit_key(FOOTER), unit_key("Home | News | Contact")]), np.uint64))
    docs = [Document("a", f"Home | News | Contact\n{BODY[0]}\n{BODY[1]}\n\n{FOOTER}"),
            Document("b", f"{BODY[2]}\n{BODY[3]}"),
            Document("c", f"HOME | news | contact\n\n{FOOTER}")]
    out = list(step(docs))
    assert out[0].text == f"{BODY[0]}\n{BODY[1]}" and out[0].removed is None
    assert out[1].text == f"{BODY[2]}\n{BODY[3]}"
    assert out[2].removed == "boilerplate:nothing_left"
    removed_bytes = 2 * len(b"Home | News | Contact") + 2 * len(FOOTER.encode())
    assert dict(step.counts) == {"lines": 4, "bytes": removed_bytes, "documents": 2}


def test_bucket_counts_only_documents_that_dedup_kept(tmp_path):
    """The footer is in 3 documents, 2 of them copies of one page: with the copies gone it is in 2 (<= max_docs)."""
    texts = [f"{BODY[0]}\n{FOOTER}", f"{BODY[0]}\n{FOOTER}", f"{BODY[0]}\n{FOOTER}", f"{BODY[1]}\n{FOOTER}"]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    cfg = PrepConfig(filters=[], dedup_buckets=3, near_dedup=False, boilerplate={"max_docs": 2})
    _, parts = partitions.plan([path], 100)
    stages.clean_partition(parts[0], cfg, str(tmp_path))
    np.save(tmp_path / "dropped.npy", np.array([], np.int64))
    got = np.concatenate([buckets.boilerplate_bucket(b, [0], str(tmp_path), 2) for b in range(3)])
    assert sorted(got.tolist()) == sorted([unit_key(FOOTER), unit_key(BODY[0])])
    np.save(tmp_path / "dropped.npy", np.array([1, 2], np.int64))  # uids of the two copies
    got = np.concatenate([buckets.boilerplate_bucket(b, [0], str(tmp_path), 2) for b in range(3)])
    assert got.tolist() == []


def test_tokenize_side_strips_with_the_keys_the_clean_stage_stored(tmp_path, monkeypatch):
    texts = [f"{BODY[0]}\n{FOOTER}", f"{BODY[1]}\n{BODY[2]}", FOOTER]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    cfg = PrepConfig(filters=[], near_dedup=False, shard_docs=2)  # two key chunks
    _, parts = partitions.plan([path], 100)
    stages.clean_partition(parts[0], cfg, str(tmp_path))
    np.save(tmp_path / "boilerplate.npy", np.array([unit_key(FOOTER)], np.uint64))
    step = stages.boilerplate_step(cfg, tmp_path)
    monkeypatch.setattr("data_prep.steps.boilerplate.unit_keys", None)  # no text is hashed again
    out = list(stages.surviving(tmp_path, 0, lambda pos: pos == 1, step))
    assert [(pos, d.text, d.removed) for pos, d in out] == [(0, BODY[0], None), (2, FOOTER, "boilerplate:nothing_left")]
    assert step.counts["lines"] == 2 and step.counts["documents"] == 2
    np.save(tmp_path / "boilerplate.npy", np.zeros(0, np.uint64))  # no line is frequent: nothing changes
    out = list(stages.surviving(tmp_path, 0, lambda pos: False, stages.boilerplate_step(cfg, tmp_path)))
    assert [d.text for _, d in out] == texts
