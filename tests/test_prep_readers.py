"""Readers, partition planning, tokenizer training and a clean stage, without Ray."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from data_prep import buckets, partitions, readers, stages
from data_prep.document import BadRecord, Document
from data_prep.tokenizer import check_tokenizer, train_tokenizer
from pipeline.config import ConfigError, KilnError, PrepConfig


def records(path: Path, docs_per_part: int = 1000, **fields):
    _, parts = partitions.plan([path], docs_per_part)
    return [r for p in parts for r in readers.read_partition(p, **fields)], parts


def lines(n: int, field: str = "text") -> bytes:
    return b"".join(json.dumps({"id": f"r{i}", field: f"record number {i}"}).encode() + b"\n" for i in range(n))


@pytest.mark.parametrize("docs_per_part", [1, 3, 7, 1000])
def test_jsonl_partitions_cover_every_line_once(tmp_path, docs_per_part):
    path = tmp_path / "x.jsonl"
    path.write_bytes(lines(10) + b"\n" + b'{"text": "no id here"}')  # a blank line, no final newline
    recs, parts = records(path, docs_per_part)
    assert [r.id for r in recs] == [f"r{i}" for i in range(10)] + ["x.jsonl:12"]
    assert [r.source for r in recs][:2] == ["x.jsonl:1", "x.jsonl:2"]
    assert len(parts) == -(-12 // docs_per_part)


@pytest.mark.fault
def test_compressed_and_truncated_streams(tmp_path):
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(lines(3)) + gzip.compress(lines(2)))  # multi-member
    assert len(records(gz)[0]) == 5
    zst = tmp_path / "b.jsonl.zst"
    zc = zstandard.ZstdCompressor()
    zst.write_bytes(zc.compress(lines(3)) + zc.compress(lines(200))[:40])
    recs, _ = records(zst)
    assert [type(r) for r in recs[:3]] == [Document] * 3
    assert isinstance(recs[-1], BadRecord) and recs[-1].reason == "truncated_stream"
    cut = tmp_path / "c.jsonl.gz"
    cut.write_bytes(gzip.compress(lines(500))[:-30])
    recs, _ = records(cut)
    assert recs[-1].reason == "truncated_stream" and all(isinstance(r, Document) for r in recs[:-1]) and len(recs) > 100
    junk = tmp_path / "d.jsonl.gz"
    junk.write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate at all")
    assert records(junk)[0][-1].reason == "corrupt_stream"


@pytest.mark.fault
def test_bad_records_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([
        b'{"text": "fine", "id": 7}', b"{nope", b'{"body": "x"}', b'{"text": null}', b'{"text": ["a"]}',
        b'{"text": "   "}', b'{"text": "\\udc80 lone"}', b'"just a string"', b'{"text": "caf\xe9"}',
    ]) + b"\n")
    recs, _ = records(path)
    assert recs[0].id == "7" and recs[0].text == "fine"
    assert [r.reason for r in recs[1:]] == ["malformed_json", "missing_text_field", "null_text", "non_string_text",
                                            "empty_text", "lone_surrogate", "not_an_object", "undecodable"]
    assert recs[1].to_json() == {"source": "bad.jsonl:2", "reason": "malformed_json", "raw": "{nope"}


def test_field_mapping_parquet_and_hf_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", None, "c", "d", "e"], "key": ["k1", "k2", None, "k4", "k5"]}),
                   tmp_path / "t.parquet", row_group_size=2)
    recs, parts = records(tmp_path / "t.parquet", docs_per_part=2, text_field="content", id_field="key")
    assert len(parts) == 3
    assert [getattr(r, "id", r.reason if isinstance(r, BadRecord) else None) for r in recs] == ["k1", "null_text", "t.parquet:3", "k4", "k5"]
    recs, _ = records(tmp_path / "t.parquet")  # wrong field: every row quarantined, none lost
    assert [r.reason for r in recs] == ["missing_text_field"] * 5

    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"text": ["one", "two", "three"]})
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "hf"))
    files = readers.resolve_inputs([str(tmp_path / "hf")])
    assert all(f.suffix == ".arrow" for f in files) and len(files) == 2
    _, parts = partitions.plan(files, 10)
    texts = [r.text for p in parts for r in readers.read_partition(p)]
    assert sorted(texts) == ["one", "one", "three", "two"]


def test_resolve_inputs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.jsonl", "d/sub/a.jsonl.zst", "d/notes.txt", "d/z.parquet"):
        (tmp_path / name).write_bytes(b"")
    got = [p.name for p in readers.resolve_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "*.jsonl")])]
    assert got == ["b.jsonl", "a.jsonl.zst", "z.parquet"]
    with pytest.raises(ConfigError, match="no such file"):
        readers.resolve_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ConfigError, match="unsupported"):
        readers.resolve_inputs([str(tmp_path / "d" / "notes.txt")])
    with pytest.raises(ConfigError, match="no input files"):
        readers.resolve_inputs([str(tmp_path / "d" / "*.csv")])


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_is_deterministic_and_errors_are_one_line(tmp_path, model_type):
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    texts = [" ".join(rng.choice(vocab) for _ in range(12)) + f".\nAnother line {i * 7}." for i in range(300)]
    a = train_tokenizer(texts, tmp_path / "a.model", vocab_size=400, model_type=model_type)
    b = train_tokenizer(texts, tmp_path / "b.model", vocab_size=400, model_type=model_type)
    assert check_tokenizer(a) == check_tokenizer(b) and check_tokenizer(a)[0] == 400
    sp = spm.SentencePieceProcessor(model_file=str(a))
    text = "Boats and bread:\n    indented ünïcödé 日本 text"
    assert sp.decode(sp.encode(text)) == text  # byte fallback, whitespace and newlines survive
    with pytest.raises(KilnError, match=r"try --vocab-size \d+ or less"):
        train_tokenizer(texts, tmp_path / "c.model", vocab_size=20000)
    with pytest.raises(KilnError, match=r"try --vocab-size \d+ or more"):
        train_tokenizer(texts + ["日本語のテキスト" * 20], tmp_path / "d.model", vocab_size=270)
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(KilnError, match="junk.model: not a readable sentencepiece model"):
        check_tokenizer(tmp_path / "junk.model")


def test_clean_partition_publishes_once_and_is_reused(tmp_path):
    text = ("The committee met on Tuesday to review the budget and to hear the reports of the groups. "
            "After a long discussion the members agreed that the library should get more money for books. "
            "The chair thanked the volunteers who had prepared the figures for the meeting.")
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "text": text if i != 2 else "tiny"}) for i in range(3)) + "\n{bad\n")
    _, parts = partitions.plan([path], 100)
    cfg = PrepConfig(filter_params={"gopher_quality": {"min_words": 10}})
    stats = stages.clean_partition(parts[0], cfg, str(tmp_path / "work"))
    assert stats["records"] == 4 and stats["kept"] == 2 and stats["quarantined"] == {"malformed_json": 1}
    assert stats["removed"] == {"gopher_quality:word_count": 1}
    done = tmp_path / "work" / "clean" / "00000"
    assert sorted(p.name for p in done.iterdir()) == ["docs.jsonl", "ids.jsonl", "keys_00000.npz", "quarantine.jsonl",
                                                      "removed.jsonl", "sketch_00000.npy", "sketchoff_00000.npy",
                                                      "stats.json", "units_00000.npy", "unitsoff_00000.npy"]
    mtime = (done / "docs.jsonl").stat().st_mtime_ns
    assert stages.clean_partition(parts[0], cfg, str(tmp_path / "work")) == stats
    assert (done / "docs.jsonl").stat().st_mtime_ns == mtime
    res = buckets.dedup_bucket(0, [0], str(tmp_path / "work"), cfg)
    assert set(res) == {"exact", "near", "checked"}


def test_add_many_writes_the_same_bytes_as_add(tmp_path):
    import numpy as np

    from data_prep.indexed import IndexedDataset, IndexedWriter, shard_digest

    docs = [[5, 6, 2], [7, 2], [1, 2, 3, 4, 2]]
    with IndexedWriter(tmp_path / "one", np.uint16) as a:
        for d in docs:
            a.add(d)
    with IndexedWriter(tmp_path / "many", np.uint16) as b:
        b.add_many(docs[:2])
        b.add_many(docs[2:])
    assert a.result == b.result and shard_digest(tmp_path / "one") == shard_digest(tmp_path / "many")
    assert IndexedDataset(tmp_path / "many")[2].tolist() == docs[2]


def test_one_big_compressed_file_flushes_keys_in_chunks(tmp_path):
    """A single .gz is one partition; its dedup keys still go to disk every shard_docs docs."""
    base = ("The committee met on Tuesday to review the budget and to hear the reports of group {i}. "
            "After a long discussion the members agreed that the library should get more money for books. "
            "The chair thanked the volunteers who had prepared the figures for meeting number {i}.")
    texts = [base.format(i=i) for i in range(4)] + [base.format(i=0)]
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)).encode()))
    _, parts = partitions.plan([path], 2)
    assert len(parts) == 1
    cfg = PrepConfig(filter_params={"gopher_quality": {"min_words": 10}}, shard_docs=2, dedup_buckets=3)
    assert stages.clean_partition(parts[0], cfg, str(tmp_path / "w"))["kept"] == 5
    assert len(buckets.key_files(tmp_path / "w", 0)) == 3
    exact = [buckets.dedup_bucket(b, [0], str(tmp_path / "w"), cfg)["exact"] for b in range(3)]
    pairs = [(int(d), int(k)) for dup, kept in exact for d, k in zip(dup, kept, strict=True)]
    assert pairs == [(4, 0)]


def test_output_dir_inside_the_input_dir_is_not_read(tmp_path):
    (tmp_path / "data" / "prepped" / "report").mkdir(parents=True)
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "data" / "prepped" / "report" / "removed.jsonl").write_text('{"id": "x"}\n')
    got = readers.resolve_inputs([str(tmp_path / "data")], exclude=tmp_path / "data" / "prepped")
    assert [p.name for p in got] == ["a.jsonl"]


@pytest.mark.parametrize("docs_per_part,part_bytes", [(1000, 100), (3, 70), (1000, 1), (1000, 10**9)])
def test_jsonl_partitions_by_bytes_cut_at_line_ends(tmp_path, docs_per_part, part_bytes):
    """Cut at the first line end past part_bytes or docs_per_part lines: every line once, line numbers right."""
    path = tmp_path / "x.jsonl"
    data = b"".join(json.dumps({"id": f"r{i}", "text": "w " * (i % 37)}).encode() + b"\n" for i in range(60))
    path.write_bytes(data)
    _, parts = partitions.plan([path], docs_per_part, part_bytes)
    got = [r for p in parts for r in readers.read_partition(p)]
    assert [r.source for r in got] == [f"x.jsonl:{i}" for i in range(1, 61)]
    for p in parts[:-1]:
        assert data[p["start"] - 1:p["start"]] in (b"", b"\n")
        chunk = data[p["start"]:p["end"]].splitlines(keepends=True)
        assert sum(map(len, chunk[:-1])) < part_bytes and len(chunk) <= docs_per_part  # cut no earlier than due
        assert len(chunk) == docs_per_part or sum(map(len, chunk)) >= part_bytes  # nor later
    assert (len(parts) > 1) == (part_bytes < len(data) or docs_per_part < 60)


def test_default_partition_size_spreads_a_corpus_over_64_parts(tmp_path, monkeypatch):
    """No partition_bytes: the inputs' size / PARTS, at least MIN_PART_BYTES; a single parquet row group is cut
    into row ranges that read back every row once, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [f"r{i}" for i in range(500)], "text": [f"row {i} " * 20 for i in range(500)]})
    pq.write_table(table, tmp_path / "one_group.parquet", row_group_size=500)
    got, parts = records(tmp_path / "one_group.parquet", docs_per_part=50_000)
    assert len(parts) == 1  # 1 MiB floor: a small file stays whole
    path = tmp_path / "x.jsonl"
    path.write_bytes(lines(640))
    assert partitions.part_size([path], None) == partitions.MIN_PART_BYTES
    monkeypatch.setattr(partitions, "MIN_PART_BYTES", 1)
    assert partitions.part_size([path], None) == -(-path.stat().st_size // 64)
    assert len(partitions.plan([path], 50_000)[1]) == 64
    _, parts = partitions.plan([tmp_path / "one_group.parquet"], 50_000, 2000)
    assert len(parts) > 2 and all(p["start"] == 0 and p["end"] == 1 for p in parts)
    rows = [r for p in parts for r in readers.read_partition(p)]
    assert [r.text for r in rows] == table.column("text").to_pylist() == [r.text for r in got]
    assert [r.source for r in rows] == [f"one_group.parquet:{i}" for i in range(1, 501)]
