"""The `kiln prep` configuration schema (pydantic): what every prep step and stage reads.

It lives in data_prep, the bottom layer, so preparation imports nothing from pipeline;
pipeline.config adds the tracking section and the YAML / `--set` loading shared by all stages.
Mistakes surface before any work starts, as one line naming the key.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_prep.steps import DEFAULT_FILTERS, STEPS

StepName = Literal[tuple(STEPS)]


class Strict(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MinHashConfig(Strict):
    ngram: int = Field(5, ge=1, le=64, description="words per shingle (CJK: characters)")
    bands: int = Field(20, ge=1)
    rows: int = Field(4, ge=1)
    seed: int = 1
    threshold: float = Field(0.8, gt=0, le=1, description="a candidate pair is a near duplicate at this shingle Jaccard or more")
    sketch: int = Field(1024, ge=16, description="shingle hashes kept per document to verify pairs; exact Jaccard below this many")


class BoilerplateConfig(Strict):
    enabled: bool = True
    unit: Literal["line", "paragraph"] = "line"
    max_docs: int = Field(100, ge=1, description="a line (normalized) in more documents than this is boilerplate")


class DecontaminateConfig(Strict):
    paths: list[str] = Field(default_factory=list, description="evaluation files/dirs (--decontaminate): jsonl, json, txt, lm-eval task yaml")
    ngram: int = Field(13, ge=1, le=64, description="shared words that make a document contaminated (CJK: characters)")
    min_words: int = Field(8, ge=1, description="shorter evaluation texts are matched whole from this length on")
    max_bytes: int = Field(1 << 30, ge=1, description="largest evaluation file read")
    max_ngrams: int = Field(100_000_000, ge=1, description="cap on evaluation n-grams (8 B each in every task)")


class PrepConfig(Strict):
    """What `kiln prep` reads (CLI flags map onto these keys)."""

    text_field: str = "text"
    id_field: str = "id"
    workers: int = Field(2, ge=1)
    ray_address: str | None = None
    vocab_size: int = Field(8192, ge=64)
    tokenizer: str | None = Field(None, description="an existing sentencepiece .model; skips training")
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    tokenizer_sample_docs: int = Field(200_000, ge=100)
    chat_tokens: bool = Field(False, description="reserve the chat role markers (docs/sft.md) as control pieces of a "
                              "trained tokenizer; off by default: it changes every other id")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    dedup: bool = True
    near_dedup: bool = True
    langs: list[str] | None = None
    lang_threshold: float = Field(0.5, ge=0.0, le=1.0)
    filters: list[StepName] = Field(default_factory=lambda: list(DEFAULT_FILTERS),
                                    description="per-document steps to run (always in the order of this default)")
    filter_params: dict[StepName, dict[str, Any]] = Field(
        default_factory=dict, description='step constructor overrides, e.g. {c4: {min_sentences: 2}}')
    filter_disable: list[str] = Field(default_factory=list, description='single rules off, e.g. ["c4:curly_bracket"]')
    filter_enable: list[str] = Field(default_factory=list, description='rules that are off by default on, e.g. '
                                     '["c4:terminal_punct"] (web text only: it drops headings, code and wrapped lines)')
    max_doc_chars: int = Field(1_000_000, ge=1)
    long_doc_policy: Literal["split", "drop"] = "split"
    boilerplate: BoilerplateConfig = Field(default_factory=BoilerplateConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    shard_docs: int = Field(50_000, ge=1, description="documents per input partition / output shard")
    partition_bytes: int | None = Field(None, ge=1, description="input bytes per partition (jsonl: at a line boundary; "
                                        "parquet: row groups, a large one cut into row ranges); default the inputs' "
                                        "size / 64, at least 1 MiB, so a small corpus still spreads over --workers")
    seed: int = 1234
    tokenizer_threads: int = Field(2, ge=1, description="sentencepiece training threads (fixed: part of the result)")
    tokenizer_sample_chars: int = Field(500_000_000, ge=1000, description="cap on characters fed to training")
    character_coverage: float = Field(0.9995, gt=0, le=1)
    dedup_buckets: int = Field(16, ge=1, description="hash buckets for exact/near-dup and boilerplate tasks")
    task_retries: int = Field(2, ge=0, description="reruns of a Ray task whose worker process died (killed, OOM, node lost)")
    warn_removed_share: float = Field(0.1, gt=0, le=1, description="warn at the end of a run, naming the rule and the key "
                                      "that turns it off, when one rule removed more than this share of the characters read")

    @field_validator("filters", mode="before")
    @classmethod
    def _filters_are_a_list(cls, value):
        if isinstance(value, dict):
            raise ValueError(f"a list of step names now, e.g. {DEFAULT_FILTERS}; thresholds go under filter_params, "
                             "single rules under filter_disable, max_doc_chars/long_doc_policy at the top level")
        if isinstance(value, list) and len(set(map(str, value))) != len(value):
            raise ValueError(f"{value}: a step is listed twice")
        return value

    @model_validator(mode="after")
    def _steps_exist(self) -> PrepConfig:
        for key in ("filter_disable", "filter_enable"):
            for item in getattr(self, key):
                step, sep, rule = item.partition(":")
                rules = getattr(STEPS.get(step), "rules", ())
                if not sep or rule not in rules:
                    known = [f"{n}:{r}" for n, c in STEPS.items() for r in c.rules if n == step] or \
                            [f"{n}:<rule>" for n, c in STEPS.items() if c.rules]
                    raise ValueError(f"{key}: {item!r} is not a rule; known: {', '.join(known)}")
        both = sorted(set(self.filter_disable) & set(self.filter_enable))
        if both:
            raise ValueError(f"filter_enable: {both[0]!r} is also in filter_disable")
        for step, params in self.filter_params.items():
            known = set(inspect.signature(STEPS[step]).parameters) - {"disabled"}
            unknown = sorted(set(params) - known)
            if unknown:
                raise ValueError(f"filter_params: {step}: unknown parameter(s) {unknown}; known: {sorted(known)}")
        if self.langs and "langid" not in self.filters:
            raise ValueError("langs: needs langid in filters")
        return self
