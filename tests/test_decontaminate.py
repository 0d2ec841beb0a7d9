"""Decontamination on hand-built evaluation files and documents: reading, n-gram matching, per-source reasons."""

from __future__ import annotations

import json

import pytest

from data_prep.document import Document
from data_prep.errors import ConfigError
from data_prep.eval_texts import read_sources
from data_prep.steps import Decontaminate, EvalIndex

PASSAGE = "Which gas do plants absorb from the air in order to build sugars during photosynthesis in sunlight"
SHORT_Q = "What is the capital city of the country France"  # 9 words: matched whole
ZH = "光合作用是植物利用阳光把二氧化碳和水转化为糖的过程"


def evals(tmp_path):
    d = tmp_path / "evals"
    (d / "sub").mkdir(parents=True)
    (d / "qa.jsonl").write_text(json.dumps({"question": PASSAGE, "choices": ["carbon dioxide", "oxygen"],
                                            "meta": {"nested": [SHORT_Q]}}) + "\n\n")
    (d / "sub" / "zh.txt").write_text(ZH)
    (d / "task.yaml").write_text("task: mytask\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/t.json\n"
                                 "doc_to_text: !function utils.doc_to_text\n")
    (d / "data").mkdir()
    (d / "data" / "t.json").write_text(json.dumps([{"text": "a sentence only this task has, long enough to be a "
                                                            "thirteen word n-gram for sure"}]))
    (d / "notes.md").write_text("ignored: not an evaluation file type")
    return d


def run(index, *texts):
    step = Decontaminate(index)
    return list(step(Document(f"d{i}", t) for i, t in enumerate(texts)))


def test_sources_and_labels(tmp_path):
    got = read_sources([str(evals(tmp_path))], 1 << 20)
    # data/t.json is read as a file of its own and through the task
    assert [s["source"] for s in got] == ["evals/data/t.json", "evals/qa.jsonl", "evals/sub/zh.txt", "task:mytask"]
    qa = got[1]["texts"]
    assert PASSAGE in qa and SHORT_Q in qa and "oxygen" in qa
    assert all(len(s["sha256"]) == 64 for s in got)
    assert read_sources([str(tmp_path / "evals" / "qa.jsonl")], 1 << 20)[0]["source"] == "qa.jsonl"


def test_thirteen_shared_words_remove_a_document_whatever_the_case_and_punctuation(tmp_path):
    index, stats = EvalIndex.build(read_sources([str(evals(tmp_path))], 1 << 20))
    assert {s["source"]: s["too_short"] for s in stats}["evals/qa.jsonl"] == 2  # the two one-word choices
    words = PASSAGE.split()
    quoting = "Homework: " + ", ".join(words[:7]).upper() + " " + " ".join(words[7:13]) + "! Answer tomorrow."
    twelve = "Homework: " + " ".join(words[:12]) + " and more words that differ from it entirely."
    short = f"Quiz night. {SHORT_Q}? Paris, of course, everybody knew that one."
    out = run(index, quoting, twelve, short, "植物" + ZH[:13] + "。", "植物" + ZH[:12] + "。")
    assert [d.removed for d in out] == ["decontaminate:evals/qa.jsonl", None, "decontaminate:evals/qa.jsonl",
                                        "decontaminate:evals/sub/zh.txt", None]
    assert "'which gas do plants absorb from the air in order to build sugars'" in out[0].detail
    index.save(tmp_path / "idx")
    again = EvalIndex.load(tmp_path / "idx")
    assert [d.removed for d in run(again, quoting, twelve)] == [out[0].removed, None]


@pytest.mark.fault
def test_bad_evaluation_files_are_one_line_errors(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    cases = {
        "broken.jsonl": ('{"q": "fine"}\n{"q": oops}\n', "broken.jsonl:2: not valid JSON"),
        "hub.yaml": ("task: hs\ndataset_path: Rowan/hellaswag\n", "is not local data"),
        "escape.yaml": ("dataset_path: json\ndataset_kwargs: {data_files: ../secret.jsonl}\n", "outside the task's directory"),
        "bomb.yaml": ("a: &x [1, 2]\nb: *x\n", "aliases are not allowed"),
        "latin1.txt": (b"caf\xe9", "not UTF-8"),
    }
    for name, (content, message) in cases.items():
        path = d / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ConfigError, match=message) as err:
            read_sources([str(path)], 1 << 20)
        assert "\n" not in str(err.value) and name in str(err.value)
    with pytest.raises(ConfigError, match="over decontaminate.max_bytes"):
        read_sources([str(d / "broken.jsonl")], 10)
    with pytest.raises(ConfigError, match="no such file"):
        read_sources([str(d / "missing.jsonl")], 10)
    with pytest.raises(ConfigError, match="max_ngrams"):
        EvalIndex.build([{"source": "x", "sha256": "0", "texts": [PASSAGE * 3]}], max_ngrams=10)
