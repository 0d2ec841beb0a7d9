"""Supervised fine-tuning data: conversation records in, rendered train/validation examples out.

Two record formats, the ones the ecosystem (TRL, OpenAI, nanochat) writes:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}        (one user turn, one assistant turn)
in jsonl (plain, .gz, .zst), parquet or a `save_to_disk` directory, read with prep's bounded readers
(data_prep/readers.py: the same size, decompression and line limits, the same file walk and hashing).

Nothing is dropped silently. A record that is not a conversation Kiln renders is quarantined with its reason
and source (file:line or file:row) and counted: the readers' reasons (malformed_json, record_too_large, ...),
`unknown_format`, the chat format's (pipeline/chat.py `problem`: wrong_role_order, empty_assistant_turn,
non_string_content, marker_in_content, ...), and `too_long` — longer than the context after the
truncation policy (`drop`: any longer; `truncate`: cut to the context, too long only when no assistant token
is left). Conversations sharing an n-gram with an evaluation set are removed as prep removes documents
(`decontaminate:<source>`, data_prep/steps/decontaminate.py's index over any content of the conversation).

The validation split is prep's: a conversation is held out when the hash of its messages (data_prep/stages.py
`id_hash`, salt "val") falls under `val_fraction`, so the split depends on the conversation alone — not on
its file, position or the worker that read it. Everything is held in memory: SFT sets are small next to a
pretraining corpus.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from data_prep.document import BadRecord
from data_prep.partitions import plan
from data_prep.readers import read_records, resolve_inputs
from data_prep.stages import id_hash
from pipeline.chat import ChatTokenizer, problem
from pipeline.config import SftDataConfig

FIELDS = ("messages", "prompt", "completion")
PART_RECORDS = 1 << 62  # one partition per file: SFT files are read in one pass, in order


@dataclass(frozen=True)
class Conversation:
    source: str  # "relative/path:line"
    messages: list[dict]

    def text(self) -> str:
        """Every content, for decontamination: an evaluation question may sit in a prompt or an answer."""
        return "\n".join(m["content"] for m in self.messages)

    def key(self) -> str:
        """The conversation's identity for the split: its roles and contents, canonical JSON."""
        return json.dumps([[m["role"], m["content"]] for m in self.messages], ensure_ascii=False)


@dataclass
class Example:
    source: str
    ids: list[int]
    assistant: list[bool]


@dataclass
class SftData:
    """What `prepare` gives: the examples per split, the inputs read, counts and every record left out."""

    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    left_out: list[dict] = field(default_factory=list)  # {"source", "reason", "raw"}
    eval_sources: list[dict] = field(default_factory=list)  # per evaluation file: sha256, texts, n-grams

    def leave_out(self, source: str, reason: str, raw: str) -> None:
        self.counts["left_out"] += 1
        self.counts[f"left_out:{reason}"] += 1
        self.left_out.append({"source": source, "reason": reason, "raw": raw[:200]})


def conversation(source: str, obj: dict) -> Conversation | BadRecord:
    """One record -> a Conversation, or a BadRecord naming why not (checked as pipeline/chat.py trains)."""
    raw = lambda: json.dumps(obj, ensure_ascii=False, default=str)  # noqa: E731
    if obj.get("messages") is not None:
        messages = obj["messages"]
    elif obj.get("prompt") is not None or obj.get("completion") is not None:
        messages = [{"role": "user", "content": obj.get("prompt")},
                    {"role": "assistant", "content": obj.get("completion")}]
    else:
        return BadRecord(source, "unknown_format", raw())
    if reason := problem(messages, training=True):
        return BadRecord(source, reason, raw())
    # only role and content are rendered; other keys (name, weight, ...) are not carried on
    return Conversation(source, [{"role": m["role"], "content": m["content"]} for m in messages])


def read_conversations(paths: list[str], inputs: list[dict] | None = None) -> Iterator[Conversation | BadRecord]:
    """Every record under `paths` (files, dirs, globs), in file order; `inputs` gets each file's path and sha256."""
    files = resolve_inputs(paths)
    found, parts = plan(files, PART_RECORDS)
    if inputs is not None:
        inputs.extend(found)
    for part in parts:
        for rec in read_records(part, FIELDS):
            yield rec if isinstance(rec, BadRecord) else conversation(*rec)


def _eval_index(cfg: SftDataConfig, out: SftData):
    """prep's evaluation n-gram index over `decontaminate.paths` (None without any); its stats into `out`."""
    if not cfg.decontaminate.paths:
        return None
    from data_prep.eval_texts import read_sources
    from data_prep.steps.decontaminate import EvalIndex

    d = cfg.decontaminate
    index, out.eval_sources = EvalIndex.build(read_sources(d.paths, d.max_bytes), d.ngram, d.min_words, d.max_ngrams)
    return index


def fit(ids: list[int], assistant: list[bool], context: int, truncation: str) -> tuple[list[int], list[bool]] | None:
    """The rendered ids within `context` under the truncation policy, or None (too long)."""
    if len(ids) <= context:
        return ids, assistant
    if truncation == "truncate" and any(assistant[1:context]):  # a target is learned at positions 1..context-1
        return ids[:context], assistant[:context]
    return None


def prepare(cfg: SftDataConfig, chat: ChatTokenizer, context: int) -> SftData:
    """Read, check, decontaminate, render and split the SFT data `cfg.paths` for a model of `context` ids."""
    out = SftData()
    index = _eval_index(cfg, out)
    cut = int(cfg.val_fraction * 2**64)
    for rec in read_conversations(cfg.paths, out.inputs):
        out.counts["records"] += 1
        if isinstance(rec, BadRecord):
            out.leave_out(rec.source, rec.reason, rec.raw)
            continue
        if index is not None and (hit := index.first_hit(rec.text())):
            out.leave_out(rec.source, f"decontaminate:{hit[0]}", f"shares {hit[1]!r} with {hit[0]}")
            continue
        rendered = chat.render(rec.messages)
        fitted = fit(rendered.ids, rendered.assistant, context, cfg.truncation)
        if fitted is None:
            out.leave_out(rec.source, "too_long", f"{len(rendered.ids)} tokens, context {context} "
                          f"(truncation: {cfg.truncation})")
            continue
        out.counts["truncated"] += len(fitted[0]) < len(rendered.ids)
        split = "val" if id_hash(rec.key(), b"val") < cut else "train"
        getattr(out, split).append(Example(rec.source, *fitted))
        out.counts[split] += 1
    return out
