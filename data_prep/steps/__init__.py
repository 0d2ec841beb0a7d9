"""Document steps, datatrove style: each a small class with one method over an iterator.

`build_steps(cfg)` composes them in pipeline order from a `PrepConfig`:
normalize -> length policy -> langid -> Gopher repetition -> Gopher quality -> C4 -> FineWeb.
(Exact and near dedup run after, across partitions: see data_prep/stages.py.)
"""

from __future__ import annotations

from data_prep.steps.base import Filter, Step
from data_prep.steps.c4 import C4
from data_prep.steps.exact_dedup import ExactDedup
from data_prep.steps.fineweb import FineWeb
from data_prep.steps.gopher_quality import GopherQuality
from data_prep.steps.gopher_repetition import GopherRepetition
from data_prep.steps.langid import LangId
from data_prep.steps.length import LengthPolicy
from data_prep.steps.minhash_dedup import MinHashDedup
from data_prep.steps.normalize import Normalize

FILTERS = {f.name: f for f in (GopherRepetition, GopherQuality, C4, FineWeb)}


def build_steps(cfg) -> list[Step]:
    """Steps for `cfg` (a PrepConfig); ValueError names the offending `filters.*` key."""
    f = cfg.filters
    unknown = set(f.params) - set(FILTERS) - {"langid"}
    if unknown:
        raise ValueError(f"filters.params: unknown step(s) {sorted(unknown)}; known: {sorted(FILTERS)} and langid")
    disabled: dict[str, list[str]] = {}
    for item in f.disable:
        step, sep, rule = item.partition(":")
        if not sep or step not in FILTERS:
            raise ValueError(f"filters.disable: {item!r} is not <step>:<rule> with step one of {sorted(FILTERS)}")
        disabled.setdefault(step, []).append(rule)
    steps: list[Step] = [Normalize(), LengthPolicy(f.max_doc_chars, f.long_doc_policy)]
    if f.langid:
        try:
            steps.append(_make(LangId, "langid", f.params, langs=cfg.langs, threshold=cfg.lang_threshold))
        except ValueError as err:
            raise ValueError(f"langs: {str(err).split(': ', 1)[-1]}") from None
    elif cfg.langs:
        raise ValueError("langs: needs filters.langid true")
    extra = {"gopher_quality": {"min_words": f.min_words, "max_words": f.max_words}}
    for name, cls in FILTERS.items():
        if getattr(f, name):
            steps.append(_make(cls, name, f.params, disabled=disabled.get(name, ()), **extra.get(name, {})))
    return steps


def _make(cls, name: str, params: dict, **kwargs):
    kwargs.update(params.get(name, {}))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"filters.params.{name}: {err}") from None


__all__ = ["Step", "Filter", "Normalize", "LengthPolicy", "LangId", "GopherQuality", "GopherRepetition",
           "C4", "FineWeb", "ExactDedup", "MinHashDedup", "build_steps"]
