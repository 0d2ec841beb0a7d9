"""End-to-end `kiln prep` on a real local Ray: a multilingual corpus with planted duplicates,
filtered documents, every kind of bad record, personal data, a footer repeated across documents
and a document quoting an evaluation set; exact counts, determinism, kill -9 + resume."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard
from prep_texts import CONTACT, EVAL_PASSAGE, FINNISH, FOOTER, LANGS, LONG, NEAR, QUOTING, SENTENCES

from data_prep.indexed import IndexedDataset
from pipeline.config import KilnError, PrepConfig

pytestmark = pytest.mark.slow


def evals_dir(corpus: Path) -> Path:
    """Where build_corpus puts the evaluation set (beside the corpus: inside, it would be read as input)."""
    return corpus.with_name(corpus.name + "-evals")


def doc_text(lang: str, k: int) -> str:
    s = SENTENCES[lang][4 * k : 4 * k + 4]
    sep = "" if lang == "zh" else " "
    return sep.join(s[:2]) + "\n\n" + sep.join(s[2:])


def build_corpus(root: Path) -> dict:
    """Write the corpus; return what a correct prep must report."""
    root.mkdir(parents=True, exist_ok=True)
    en = SENTENCES["en"]
    good = [(f"{lang}-{k}", doc_text(lang, k) + (f"\n\n{FOOTER}" if lang == "es" else ""))
            for lang in ("en", "de", "es", "ru", "zh") for k in range(3)]
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in good]
    lines.append(json.dumps({"id": "long", "text": LONG}))
    lines.append(json.dumps({"id": "contact", "text": CONTACT}))
    lines.append(json.dumps({"id": "quoting", "text": QUOTING}))
    filtered = {
        "short": "Too short to keep.",
        "repeated": "This line is repeated many times in this document.\n" * 6,
        "lorem": " ".join(en[0:4]) + " Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "curly": " ".join(en[4:8]) + " The settings file uses {braces} around each section name.",
        "dupline": "\n".join(en) + "\n" + en[9],
        "huge": " ".join(s for lang in LANGS for s in SENTENCES[lang]) * 2,
    }
    lines += [json.dumps({"id": i, "text": t}) for i, t in filtered.items()]
    bad = [
        '{"id": "broken", "text": "no closing brace"',
        json.dumps({"id": "nofield", "body": "text is elsewhere"}),
        json.dumps({"id": "null", "text": None}),
        json.dumps({"id": "number", "text": 42}),
        json.dumps({"id": "blank", "text": " \n\t "}),
        '{"id": "surrogate", "text": "broken \\ud800 pair and more words"}',
        json.dumps(["not", "an", "object"]),
    ]
    data = ("\n".join(lines[:5] + bad[:3] + lines[5:] + bad[3:]) + "\n\n").encode()
    data += b'{"id": "latin1", "text": "caf\xe9 au lait"}\n'
    (root / "a_main.jsonl").write_bytes(data)

    dups = [json.dumps({"id": "copy-of-en-0", "text": doc_text("en", 0)}),
            json.dumps({"id": "spaced-de-0", "text": doc_text("de", 0).replace(" ", "  ", 3).replace("\n\n", "  \r\n\r\n")})]
    member2 = gzip.compress(b'{"id": "lost", "text": "never seen"}\n' * 50)
    (root / "b_dups.jsonl.gz").write_bytes(gzip.compress(("\n".join(dups) + "\n").encode()) + member2[:12])

    zc = zstandard.ZstdCompressor()
    more = [json.dumps({"id": "near-long", "text": NEAR}), json.dumps({"id": "finnish", "text": FINNISH}, ensure_ascii=False)]
    frame2 = zc.compress(b'{"id": "lost", "text": "never seen"}\n' * 50)
    (root / "c_more.jsonl.zst").write_bytes(zc.compress(("\n".join(more) + "\n").encode()) + frame2[:8])

    import pyarrow as pa
    import pyarrow.parquet as pq

    it = [doc_text("it", k) for k in range(3)] + [None]
    pq.write_table(pa.table({"text": it}), root / "d_table.parquet", row_group_size=2)

    from datasets import Dataset

    Dataset.from_dict({"id": [f"pl-{k}" for k in range(3)], "text": [doc_text("pl", k) for k in range(3)]}).save_to_disk(
        str(root / "e_hf"))
    evals = evals_dir(root)
    evals.mkdir(exist_ok=True)
    (evals / "bench.jsonl").write_text(json.dumps({"question": f"Why did {EVAL_PASSAGE}?", "choices": ["a", "b"]}) + "\n")
    return {
        "records_in": len(lines) + len(bad) + 1 + len(dups) + 1 + len(more) + 1 + len(it) + 3,
        "quarantined": {"malformed_json": 1, "missing_text_field": 1, "null_text": 2, "non_string_text": 1,
                        "empty_text": 1, "lone_surrogate": 1, "not_an_object": 1, "undecodable": 1, "truncated_stream": 2},
        "removed": {"exact_dup": 2, "near_dup": 1, "lang": 1, "too_long": 1, "gopher_quality:word_count": 1,
                    "gopher_repetition:dup_line_fraction": 1, "c4:lorem_ipsum": 1, "c4:curly_bracket": 1,
                    "fineweb:char_dup_ratio": 1, f"decontaminate:{evals.name}/bench.jsonl": 1},
        "edits": {"pii:email": 1, "pii:phone": 1, "boilerplate:lines": 3, "boilerplate:documents": 3,
                  "boilerplate:bytes": 3 * len(FOOTER.encode())},
        "languages": {"en": 5, "de": 3, "es": 3, "it": 3, "pl": 3, "ru": 3, "zh": 3},
        "kept": 23,
    }


def config(corpus: Path | None = None, **kw) -> PrepConfig:
    """The test config; with `corpus`, decontaminated against its evaluation set."""
    base = dict(langs=LANGS, vocab_size=600, val_fraction=0.2, shard_docs=8, workers=1,
                filter_params={"gopher_quality": {"min_words": 30}}, max_doc_chars=4000, long_doc_policy="drop",
                boilerplate={"max_docs": 2}, decontaminate={"paths": [str(evals_dir(corpus))] if corpus else []})
    base.update(kw)
    return PrepConfig(**base)


def cli_args(corpus: Path, out: Path, workers: int = 1) -> list[str]:
    """The `kiln prep` arguments that mean `config(corpus, workers=workers)`."""
    return ["prep", str(corpus), "--out", str(out), "--workers", str(workers), "--langs", ",".join(LANGS),
            "--vocab-size", "600", "--val-fraction", "0.2", "--set", "shard_docs=8",
            "--set", "filter_params.gopher_quality.min_words=30", "--set", "max_doc_chars=4000",
            "--set", "long_doc_policy=drop", "--set", "boilerplate.max_docs=2", "--decontaminate", str(evals_dir(corpus))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(ray_local, corpus, tmp_path_factory):
    from data_prep.runner import prep

    out = tmp_path_factory.mktemp("ref")
    summary = prep([str(corpus[0])], out, config(corpus[0], workers=1))
    return out, summary


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """The oracle: Jaccard of the sets of word 5-grams, as plain Python tuples."""
    sa, sb = ({tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)} for ws in (a.lower().split(), b.lower().split()))
    return len(sa & sb) / len(sa | sb)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.fault
def test_counts_reports_and_shards(reference, corpus):
    out, summary = reference
    _, want = corpus
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["records_in"] == want["records_in"]
    assert c["quarantined"] == want["quarantined"]
    assert c["removed"] == want["removed"]
    assert c["languages"] == want["languages"]
    assert c["edits"] == want["edits"]
    assert c["boilerplate_keys"] == 1  # the footer; nothing else is in more than 2 documents
    assert c["documents_kept"] == want["kept"]
    assert c["documents_in"] == c["documents_kept"] + sum(c["removed"].values())
    assert c["records_in"] == c["documents_read"] + sum(c["quarantined"].values())
    assert summary["digest"] == manifest["digest"]

    removed = {r["id"]: r for r in read_jsonl(out / "report" / "removed.jsonl")}
    assert removed["copy-of-en-0"] == {"id": "copy-of-en-0", "reason": "exact_dup", "detail": "en-0"}
    assert removed["spaced-de-0"]["detail"] == "de-0"
    assert {k: removed["near-long"][k] for k in ("reason", "detail")} == {"reason": "near_dup", "detail": "long"}
    assert removed["near-long"]["jaccard"] == round(shingle_jaccard(NEAR, LONG), 4) >= 0.8
    assert removed["quoting"]["reason"] == f"decontaminate:{evals_dir(corpus[0]).name}/bench.jsonl"
    assert repr(" ".join(EVAL_PASSAGE.split()[:13])) in removed["quoting"]["detail"]  # the first shared 13-gram
    [source] = manifest["decontamination"]["sources"]
    assert source["documents_removed"] == 1 and source["texts"] == 3 and source["too_short"] == 2
    assert removed["finnish"]["reason"] == "lang" and removed["huge"]["reason"] == "too_long"
    assert len(removed) == sum(want["removed"].values())
    quarantine = read_jsonl(out / "report" / "quarantine.jsonl")
    assert len(quarantine) == sum(want["quarantined"].values())
    by_reason = {q["reason"]: q for q in quarantine}
    assert by_reason["malformed_json"]["source"] == "a_main.jsonl:6"
    assert by_reason["malformed_json"]["raw"].startswith('{"id": "broken"')
    assert by_reason["undecodable"]["raw"].startswith('{"id": "latin1"')
    assert {q["source"].split(":")[0] for q in quarantine if q["reason"] == "truncated_stream"} == {"b_dups.jsonl.gz", "c_more.jsonl.zst"}
    assert any(q["source"] == "d_table.parquet:4" for q in quarantine)

    # inputs: relative paths, digests, per-file record counts
    inputs = {Path(i["path"]).name: i for i in manifest["inputs"]}
    assert not any(Path(i["path"]).is_absolute() for i in manifest["inputs"])
    assert inputs["d_table.parquet"]["records"] == 4 and inputs["b_dups.jsonl.gz"]["records"] == 3
    assert (out / manifest["inputs"][0]["path"]).resolve() == (corpus[0] / "a_main.jsonl").resolve()

    # shards: Megatron files, uint16, EOS after every document, totals match the manifest
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / manifest["tokenizer"]["path"]))
    assert manifest["tokenizer"]["vocab_size"] == sp.get_piece_size() == 600
    texts, total = [], {"train": 0, "val": 0}
    for sh in manifest["shards"]:
        ds = IndexedDataset(out / sh["path"])
        assert ds.dtype == np.uint16 and len(ds) == sh["documents"] and ds.num_tokens == sh["tokens"]
        total[sh["split"]] += sh["tokens"]
        for i in range(len(ds)):
            assert ds[i][-1] == sp.eos_id()
            texts.append(sp.decode(ds[i][:-1].tolist()))
    assert total == manifest["tokens"] and total["val"] > 0
    assert doc_text("zh", 1) in texts and doc_text("ru", 2) in texts and LONG in texts
    assert doc_text("de", 0) in texts
    assert doc_text("es", 1) in texts and not any(FOOTER in t for t in texts)  # boilerplate stripped
    [contact] = [t for t in texts if "ferry timetable" in t]
    assert "<EMAIL>" in contact and "<PHONE>" in contact and "@" not in contact and "7946" not in contact
    assert not list(out.glob("shards/*.tmp"))


def test_same_digest_with_4_workers_and_on_rerun(reference, corpus, tmp_path):
    from data_prep.runner import prep

    out, summary = reference
    four = prep([str(corpus[0])], tmp_path / "w4", config(corpus[0], workers=4))
    assert four["digest"] == summary["digest"]
    assert four["counts"] == summary["counts"]
    assert (tmp_path / "w4" / "report" / "removed.jsonl").read_bytes() == (out / "report" / "removed.jsonl").read_bytes()
    again = prep([str(corpus[0])], out, config(corpus[0], workers=2))
    assert again["digest"] == summary["digest"]


def test_given_tokenizer_and_errors(reference, corpus, tmp_path):
    from data_prep.runner import prep

    out, summary = reference
    reuse = prep([str(corpus[0])], tmp_path / "tok", config(corpus[0], tokenizer=str(out / "tokenizer.model")))
    assert reuse["digest"] == summary["digest"]
    nodedup = prep([str(corpus[0])], tmp_path / "nodedup", config(corpus[0], tokenizer=str(out / "tokenizer.model"), dedup=False))
    assert nodedup["counts"]["documents_kept"] == corpus[1]["kept"] + 3
    assert not {"exact_dup", "near_dup"} & set(nodedup["counts"]["removed"])
    with pytest.raises(KilnError, match="try --vocab-size"):
        prep([str(corpus[0])], tmp_path / "big", config(vocab_size=50000))
    with pytest.raises(KilnError, match="text field 'body2'"):
        prep([str(corpus[0] / "a_main.jsonl")], tmp_path / "field", config(text_field="body2"))


@pytest.mark.fault
def test_kill_9_then_rerun_gives_the_same_digest(reference, corpus, tmp_path, root):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.cli", *cli_args(corpus[0], out), "--json"]
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "work" / "clean" / "00001" / "stats.json").exists():
        assert proc.poll() is None, "prep exited before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "too late: the run had finished"
    done = {p.name: p.stat().st_mtime_ns for p in (out / "work" / "clean").iterdir() if (p / "stats.json").exists()}
    assert done
    for idx in out.glob("shards/*.idx"):  # anything under a final name is a complete shard
        IndexedDataset(idx.with_suffix(""))

    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["counts"] == reference[1]["counts"]
    for name, mtime in done.items():  # finished partitions were reused, not redone
        assert (out / "work" / "clean" / name).stat().st_mtime_ns == mtime
    assert summary["digest"] == reference[1]["digest"]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_wrapped_text_keeps_its_characters_and_the_report_says_what_went(ray_local, tmp_path, capsys):
    """Man-page-like text (hard-wrapped at 70 columns, `{` in prose and examples) under the default filters:
    at least 90% of its characters reach the shards; each rule's documents, lines and characters are reported
    (dedup's too), and a rule over warn_removed_share is named at the end with the key that turns it off.
    The corpus has far fewer documents than shard_docs, and is cut by bytes: both --workers get a partition."""
    from factories import manpage_texts

    from pipeline.cli import main

    texts = manpage_texts(40)
    lines = [json.dumps({"id": f"man{i}", "text": t}) + "\n" for i, t in enumerate(texts)]
    lines.append(json.dumps({"id": "copy", "text": texts[0]}) + "\n")  # an exact duplicate of man0
    (tmp_path / "man.jsonl").write_text("".join(lines))
    out = tmp_path / "out"
    half = sum(len(line.encode()) for line in lines) // 2
    assert main(["prep", str(tmp_path / "man.jsonl"), "--out", str(out), "--vocab-size", "400", "--workers", "2",
                 "--set", "tracking.enabled=false", "--set", "warn_removed_share=0.03",
                 "--set", f"partition_bytes={half}", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    c = summary["counts"]
    assert c["documents_kept"] == len(texts) and c["removed"] == {"exact_dup": 1}
    # the duplicate's characters as dedup saw them: after the line rules had cut its short lines
    assert 0.9 * len(texts[0]) < c["removed_chars"]["exact_dup"] <= len(texts[0]) and c["removed_lines"]["exact_dup"] > 5
    assert c["characters"]["kept"] >= 0.9 * sum(map(len, texts)), c
    cut = c["removed_chars"]["c4:min_words_per_line"]  # headings and option names: short lines
    assert 0 < cut < 0.1 * c["characters"]["in"] and c["removed_lines"]["c4:min_words_per_line"] >= 3 * len(texts)
    [warning] = summary["warnings"]
    assert warning.startswith("c4:min_words_per_line removed") and "filter_disable: [c4:min_words_per_line]" in warning
    assert warning in " ".join(captured.err.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert {sh["path"] for sh in manifest["shards"] if sh["split"] == "train"} == {"shards/train_00000", "shards/train_00001"}
    assert sorted(p.name for p in (out / "work" / "clean").iterdir()) == ["00000", "00001"]  # both partitions ran


def test_rerun_into_a_finished_output_refuses_and_a_failed_overwrite_keeps_it(reference, corpus, tmp_path, capsys):
    import shutil

    from pipeline.cli import main

    out = tmp_path / "prepped"
    shutil.copytree(reference[0], out)
    before = tree_bytes(out)
    args = [*cli_args(corpus[0], out), "--set", "tracking.enabled=false", "--json"]
    assert main([*args, "--set", "val_fraction=0.3"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finished prep" in err and "--overwrite" in err, err
    assert tree_bytes(out) == before
    assert main([*args, "--vocab-size", "50000", "--overwrite"]) == 1  # fails at the tokenizer, after the work
    assert "try --vocab-size" in capsys.readouterr().err
    assert tree_bytes(out) == before
    assert main([*args, "--set", "val_fraction=0.3", "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["out"] == str(out) and manifest["config"]["val_fraction"] == 0.3
    assert manifest["counts"]["documents_kept"] == reference[1]["counts"]["documents_kept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepped.kiln-lock", "prepped"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["prepped"]
