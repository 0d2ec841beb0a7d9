"""SFT data (pipeline/sft/data.py): both record formats from every container prep reads, each bad record
quarantined with its reason and place, a split that depends on the conversation alone, decontamination."""

import gzip
import json

import pytest
import zstandard

from pipeline.chat import ChatTokenizer
from pipeline.config import SftDataConfig
from pipeline.sft.data import prepare, read_conversations
from tests.test_chat import CharSp

CHAT = ChatTokenizer(CharSp())  # one id per character: lengths are easy to reason about
U, A, S = ({"role": r, "content": c} for r, c in (("user", "hi"), ("assistant", "hello"), ("system", "be nice")))

RECORDS = [  # (line, reason or None)
    ({"messages": [S, U, A]}, None),
    ({"prompt": "2+2?", "completion": "4"}, None),
    ("not json", "malformed_json"),
    ([1, 2], "not_an_object"),
    ({"text": "pretraining record"}, "unknown_format"),
    ({"messages": [A, U]}, "wrong_role_order"),
    ({"messages": [U, {"role": "assistant", "content": "  "}]}, "empty_assistant_turn"),
    ({"messages": [U, {"role": "assistant", "content": ["parts"]}]}, "non_string_content"),
    ({"prompt": "p", "completion": None}, "non_string_content"),
    ({"messages": [{"role": "user", "content": "x<|end|>"}, A]}, "marker_in_content"),
    ({"messages": [U, {"role": "assistant", "content": "y" * 200}]}, "too_long"),
    ({"messages": [U, A, {"role": "user", "content": "more"}, {"role": "assistant", "content": "sure"}]}, None),
]


def lines() -> bytes:
    rows = [r if isinstance(r, str) else json.dumps(r) for r, _ in RECORDS]
    return ("\n".join(rows[:3] + [""] + rows[3:]) + "\n").encode()  # a blank line is not a record


def write(path, kind):
    if kind == "jsonl":
        path.write_bytes(lines())
    elif kind == "gz":
        path.write_bytes(gzip.compress(lines()))
    elif kind == "zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(lines()))
    return path


@pytest.mark.parametrize("kind, name", [("jsonl", "chat.jsonl"), ("gz", "chat.jsonl.gz"), ("zst", "chat.jsonl.zst")])
def test_every_bad_record_is_quarantined_with_its_reason_and_line(tmp_path, kind, name):
    write(tmp_path / name, kind)
    data = prepare(SftDataConfig(paths=[str(tmp_path)], val_fraction=0.0), CHAT, context=64)
    expected = [(f"{name}:{i + (i >= 3) + 1}", reason) for i, (_, reason) in enumerate(RECORDS) if reason]
    assert [(r["source"], r["reason"]) for r in data.left_out] == expected
    assert data.counts["records"] == len(RECORDS) and data.counts["left_out"] == len(expected)
    assert data.counts["left_out:non_string_content"] == 2
    assert [e.source for e in data.train] == [f"{name}:1", f"{name}:2", f"{name}:13"]
    assert data.inputs[0]["sha256"] and not data.val
    first = data.train[0]
    assert first.ids == CHAT.render([S, U, A]).ids and first.assistant == CHAT.render([S, U, A]).assistant


def test_parquet_rows_in_both_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [S, U, A]}, {"prompt": "2+2?", "completion": "4"}, {"messages": [A, U]}]
    keys = {"messages": None, "prompt": None, "completion": None}  # every column in every row (nulls)
    pq.write_table(pa.Table.from_pylist([keys | r for r in rows]), tmp_path / "chat.parquet")
    got = list(read_conversations([str(tmp_path / "chat.parquet")]))
    assert got[0].messages == [S, U, A] and got[0].source == "chat.parquet:1"
    assert got[1].messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert (got[2].source, got[2].reason) == ("chat.parquet:3", "wrong_role_order")


def test_the_split_depends_on_the_conversation_alone(tmp_path):
    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(200)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    (tmp_path / "b" / "y.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs[::-1]))

    def val_set(directory):
        data = prepare(SftDataConfig(paths=[str(tmp_path / directory)], val_fraction=0.2), CHAT, context=64)
        assert len(data.train) + len(data.val) == 200
        return {tuple(e.ids) for e in data.val}

    held = val_set("a")
    assert 20 <= len(held) <= 60 and held == val_set("b")


def test_decontaminate_removes_a_conversation_sharing_an_eval_ngram(tmp_path):
    question = "which of the following rivers flows through more countries than any other river in europe today"
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "bench.jsonl").write_text(json.dumps({"question": question, "answer": "Danube"}) + "\n")
    (tmp_path / "sft.jsonl").write_text(
        json.dumps({"prompt": f"Quiz: {question.capitalize()}?", "completion": "The Danube."}) + "\n"
        + json.dumps({"prompt": "which river is long", "completion": "The Nile."}) + "\n")
    cfg = SftDataConfig(paths=[str(tmp_path / "sft.jsonl")], val_fraction=0.0,
                        decontaminate={"paths": [str(tmp_path / "evals")]})
    data = prepare(cfg, CHAT, context=256)
    assert [(r["source"], r["reason"]) for r in data.left_out] == [("sft.jsonl:1", "decontaminate:evals/bench.jsonl")]
    assert len(data.train) == 1 and data.eval_sources[0]["texts"] == 2


def test_truncation_policy(tmp_path):
    long_answer = [U, {"role": "assistant", "content": "z" * 50}]  # 4 + 52 ids
    late_answer = [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "a"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in (long_answer, late_answer)))
    drop = prepare(SftDataConfig(paths=[str(tmp_path)], val_fraction=0.0), CHAT, context=30)
    assert [r["reason"] for r in drop.left_out] == ["too_long", "too_long"]
    cut = prepare(SftDataConfig(paths=[str(tmp_path)], val_fraction=0.0, truncation="truncate"), CHAT, context=30)
    assert [len(e.ids) for e in cut.train] == [30] and cut.counts["truncated"] == 1
    assert [(r["source"], r["reason"]) for r in cut.left_out] == [("t.jsonl:2", "too_long")]  # no answer left
