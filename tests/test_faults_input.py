"""Bad input fuzzing: garbage bytes, cut streams, huge lines, deep nesting, wrong types, duplicate ids,
undecodable file names. Every record ends up read, removed or quarantined with a reason; nothing crashes,
nothing is lost, and reading memory does not grow with the number of huge lines."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from data_prep import partitions, readers
from data_prep.document import BadRecord, Document

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.fault
WORDS = ("river stone bridge market harbour lantern garden window winter summer baker kettle candle "
         "orchard meadow valley ladder basket thread needle pocket mirror silver copper").split()
HUGE_MB = 20  # the huge document inside the kiln prep run below
HUGE_LINE_MB = 100  # the size, for the memory-bound reading test


def records(path: Path, docs_per_part: int = 1000):
    _, parts = partitions.plan([path], docs_per_part)
    return [r for p in parts for r in readers.read_partition(p)]


def good_text(seed: int, words: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def good_lines(n: int, prefix: str = "g") -> bytes:
    return b"".join(json.dumps({"id": f"{prefix}{i}", "text": good_text(sum(map(ord, prefix)) * 1000 + i)}).encode() + b"\n"
                    for i in range(n))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --------------------------------------------------------------------------- readers, no Ray


def test_random_bytes_give_one_record_per_nonblank_line(tmp_path):
    rng = random.Random(0)
    for trial in range(20):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4000)))
        if trial % 2:  # mutate valid JSON lines instead: flips, cuts, inserted quotes and braces
            blob = bytearray(good_lines(30))
            for _ in range(rng.randint(1, 40)):
                blob[rng.randrange(len(blob))] = rng.choice(b'{}[]":,\\\x00\xff\xc3\n')
            blob = bytes(blob)
        path = tmp_path / f"r{trial}.jsonl"
        path.write_bytes(blob)
        recs = records(path, docs_per_part=7)
        nonblank = [ln for ln in blob.split(b"\n") if ln.decode("utf-8", "replace").strip()]
        assert len(recs) == len(nonblank), trial
        for r in recs:
            assert isinstance(r, Document | BadRecord)
            if isinstance(r, BadRecord):
                assert r.reason in {"undecodable", "malformed_json", "not_an_object", "missing_text_field",
                                    "non_string_text", "null_text", "empty_text", "lone_surrogate"}
                json.dumps(r.to_json(), ensure_ascii=False).encode("utf-8")  # reportable as UTF-8


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_every_cut_of_a_compressed_file_keeps_the_prefix(tmp_path, kind):
    data = good_lines(40)
    blob = gzip.compress(data) if kind == "gz" else zst_blocks(data.splitlines(keepends=True))
    want = [json.loads(ln)["id"] for ln in data.splitlines()]
    path = tmp_path / f"x.jsonl.{kind}"
    recovered = []
    for cut in range(1, len(blob), max(1, len(blob) // 60)):
        path.write_bytes(blob[:cut])
        recs = records(path)
        docs = [r for r in recs if isinstance(r, Document)]
        bad = [r for r in recs if isinstance(r, BadRecord)]
        # every complete line the decompressor itself can produce from the cut bytes, no fewer, in order
        assert [d.id for d in docs] == want[: complete_lines(blob[:cut], kind)], cut
        assert [b.reason for b in bad] in (["truncated_stream"], ["corrupt_stream"]), cut
        assert bad[0].source.startswith(f"x.jsonl.{kind}:")
        recovered.append(len(docs))
    assert recovered == sorted(recovered) and recovered[-1] >= 35, recovered  # the prefix grows to nearly all


def zst_blocks(lines: list[bytes]) -> bytes:
    """One zstd frame with a block per line (as a big file has many blocks): a cut one decodes up to the cut."""
    c = zstandard.ZstdCompressor().compressobj()
    return b"".join(c.compress(ln) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for ln in lines) + c.flush()


def complete_lines(cut: bytes, kind: str) -> int:
    """How many whole lines zlib / zstandard decode from a cut stream (the oracle, without Kiln's reader)."""
    d = zlib.decompressobj(31) if kind == "gz" else zstandard.ZstdDecompressor().decompressobj()
    try:
        return d.decompress(cut).count(b"\n")
    except (zlib.error, zstandard.ZstdError):
        return 0


def test_deeply_nested_json_is_quarantined_not_a_crash(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join([nested(100_000), '{"text": ' + nested(100_000) + "}",
                               '{"id": ' + nested(50) + ', "text": "fine"}', '{"text": 1' + "0" * 5000 + "}"]) + "\n")
    recs = records(path)
    assert [getattr(r, "reason", "doc") for r in recs] == ["nested_too_deep", "nested_too_deep", "doc",
                                                           "malformed_json"]  # > 4300 digits: int refuses
    assert recs[0].to_json()["raw"] == "[" * 200
    assert recs[2].id == json.dumps(json.loads(nested(50)))


def test_wrong_types_for_text_and_id(tmp_path):
    path = tmp_path / "types.jsonl"
    texts = [5, 1.5, ["a", "b"], {"t": "x"}, True, False]
    ids = [7, [1, 2], {"k": 1}, True, None, ""]
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts))
                    + "".join(json.dumps({"id": v, "text": f"doc {i}"}) + "\n" for i, v in enumerate(ids)))
    recs = records(path)
    assert [r.reason for r in recs[:6]] == ["non_string_text"] * 6
    # a non-string id is kept as its JSON text; null or "" falls back to file:line
    assert [r.id for r in recs[6:]] == ["7", "[1, 2]", '{"k": 1}', "true", "types.jsonl:11", "types.jsonl:12"]


def test_undecodable_file_name_is_readable_and_reportable(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9 \xff.jsonl"
    with open(name, "wb") as f:
        f.write(good_lines(2) + b'{"text": "no id"}\n{oops\n')
    (path,) = readers.resolve_inputs([str(tmp_path)])
    recs = records(path)
    assert [type(r) for r in recs] == [Document, Document, Document, BadRecord]
    assert recs[2].id == "caf\\xe9 \\xff.jsonl:3" and recs[3].source == "caf\\xe9 \\xff.jsonl:4"
    for r in recs:
        line = json.dumps(r.to_json() if isinstance(r, BadRecord) else {"id": r.id, "source": r.source},
                          ensure_ascii=False)
        line.encode("utf-8")  # the reports are UTF-8 files: this must not raise


def _huge_file(path: Path, copies: int) -> None:
    word = "lorem ipsum dolor sit amet "
    text = word * (HUGE_LINE_MB * 2**20 // len(word))
    with open(path, "w") as f:
        f.write(json.dumps({"id": "small", "text": "a small one"}) + "\n")
        for i in range(copies):
            f.write(json.dumps({"id": f"huge{i}", "text": text}) + "\n")
        f.write("x" * (HUGE_LINE_MB * 2**20) + "\n")  # a huge line that is not JSON
        f.write(json.dumps({"id": "last", "text": "the end"}) + "\n")


READ_PEAK = """
import json, resource, sys
from data_prep import partitions, readers
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_, parts = partitions.plan([readers.Path(sys.argv[1])], 1000)
seen = []
for p in parts:
    for r in readers.read_partition(p):
        seen.append(getattr(r, "reason", None) or (r.id, len(r.text)))
        del r
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"seen": seen, "peak_mb": peak}))
"""


def test_huge_lines_are_read_with_memory_bounded_by_one_line(tmp_path):
    """Peak RSS while reading grows with the longest line, not with the file: 1 and 2 huge lines cost the same."""
    peaks = {}
    for copies in (1, 2):
        path = tmp_path / f"huge{copies}.jsonl"
        _huge_file(path, copies)
        res = subprocess.run([sys.executable, "-c", READ_PEAK, str(path)], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert res.returncode == 0, res.stderr[-2000:]
        out = json.loads(res.stdout)
        n = len("lorem ipsum dolor sit amet ") * (HUGE_LINE_MB * 2**20 // len("lorem ipsum dolor sit amet "))
        assert out["seen"] == [["small", 11], *[[f"huge{i}", n] for i in range(copies)], "malformed_json",
                               ["last", 7]]
        peaks[copies] = out["peak_mb"]
    assert peaks[1] < 6 * HUGE_LINE_MB, peaks  # a few copies of one line (bytes, str, parsed), no more
    assert peaks[2] < peaks[1] + HUGE_LINE_MB, peaks  # lines are not accumulated


# --------------------------------------------------------------------------- kiln prep on real Ray


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, dict]:
    """A directory of every kind of bad input next to good documents, and the counts Kiln must report."""
    root = tmp_path_factory.mktemp("badin")
    (root / "a_good.jsonl").write_bytes(good_lines(40))
    rng = random.Random(1)  # 12 lines of random bytes, each with an invalid UTF-8 byte: 12 `undecodable`
    junk = b"".join(bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(200)) + b"\xff\n"
                    for _ in range(12))
    (root / "b_random.jsonl").write_bytes(junk)
    (root / "c_nested.jsonl").write_text(nested(100_000) + "\n" + '{"text": ' + nested(100_000) + "}\n")
    types = [5, ["a"], {"t": 1}, True]
    (root / "d_types.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(types))
                                        + "".join(json.dumps({"id": v, "text": good_text(900 + i)}) + "\n"
                                                  for i, v in enumerate([7, [1, 2], {"k": 1}, True])))
    dup_a, dup_b = good_text(500), good_text(501)
    (root / "e_dups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "same", "text": dup_a}, {"id": "same", "text": dup_b},  # same id, different text: both kept
        {"id": "same", "text": dup_a},  # same id and text: an exact duplicate of the first
    ]))
    # 29 whole lines, then the 30th in a second gzip member / zstd frame cut in half: 29 documents and
    # one `truncated_stream` each, by construction
    for name, prefix, compress in (("f_cut.jsonl.gz", "y", gzip.compress),
                                   ("g_cut.jsonl.zst", "z", zstandard.ZstdCompressor().compress)):
        lines = good_lines(30, prefix=prefix).splitlines(keepends=True)
        last = compress(lines[29])
        (root / name).write_bytes(compress(b"".join(lines[:29])) + last[: len(last) // 2])
    word = "lorem ipsum dolor sit amet "
    (root / "h_huge.jsonl").write_text(json.dumps({"id": "huge", "text": word * (HUGE_MB * 2**20 // len(word))}) + "\n"
                                       + json.dumps({"id": "h-ok", "text": good_text(700)}) + "\n")
    with open(os.fsencode(root) + b"/i_caf\xe9.jsonl", "wb") as f:
        f.write(json.dumps({"text": good_text(800)}).encode() + b"\n{oops\n")

    want_q = {"nested_too_deep": 2, "non_string_text": 4, "malformed_json": 1, "undecodable": 12,
              "truncated_stream": 2}
    cut_docs = 29 + 29
    want = {"quarantined": want_q, "removed": {"exact_dup": 1, "too_long": 1},
            "kept": 40 + 4 + 2 + cut_docs + 1 + 1}
    return root, want


@pytest.fixture(scope="module")
def prepped(bad_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepped") / "out"
    cmd = [sys.executable, "-m", "pipeline.cli", "prep", str(bad_corpus[0]), "--out", str(out), "--workers", "2",
           "--vocab-size", "400", "--val-fraction", "0.1", "--set", "shard_docs=16", "--set", "filters=[]",
           "--set", "max_doc_chars=100000", "--set", "long_doc_policy=drop", "--set", "near_dedup=false", "--set", "tracking.enabled=false",
           "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_prep_counts_every_bad_record_and_the_books_balance(bad_corpus, prepped):
    _, want = bad_corpus
    out, summary = prepped
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["quarantined"] == want["quarantined"]
    assert c["removed"] == want["removed"]
    assert c["documents_kept"] == want["kept"]
    # the books balance: every record read is kept, removed (with a reason) or quarantined (with a reason)
    assert c["documents_read"] == c["documents_in"]  # long_doc_policy=drop: no splits
    assert c["records_in"] == c["documents_kept"] + sum(c["removed"].values()) + sum(c["quarantined"].values())
    assert sum(i["records"] for i in manifest["inputs"]) == c["records_in"]
    assert sum(s["documents"] for s in manifest["shards"]) == c["documents_kept"]
    quarantine = [json.loads(x) for x in (out / "report" / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert Counter(q["reason"] for q in quarantine) == Counter(want["quarantined"])
    assert all(len(q["raw"]) <= 200 and ":" in q["source"] for q in quarantine)
    assert {"source": "i_caf\\xe9.jsonl:2", "reason": "malformed_json", "raw": "{oops"} in quarantine
    removed = [json.loads(x) for x in (out / "report" / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(removed) == sum(want["removed"].values())
    # duplicate ids are kept as given; the exact duplicate names the id it duplicates (here: its own)
    assert {"id": "same", "reason": "exact_dup", "detail": "same"} in removed
    assert [r["reason"] for r in removed if r["id"] == "huge"] == ["too_long"]
    assert summary["digest"] == manifest["digest"]
    assert not list(out.glob("shards/*.tmp"))
