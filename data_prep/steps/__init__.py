"""Document steps, datatrove style: each a small class with one method over an iterator.

`STEPS` is the registry of the per-document steps a config lists under `filters:`; `build_steps`
composes them in this fixed order, after the two that always run:
normalize -> length policy -> langid -> Gopher repetition -> Gopher quality -> C4 -> FineWeb
-> decontaminate (with --decontaminate) -> PII.
Exact and near dedup and boilerplate run across partitions (data_prep/buckets.py); the
boilerplate step is applied when tokenizing (data_prep/stages.py).
"""

from __future__ import annotations

from data_prep.steps.base import Filter, Step
from data_prep.steps.boilerplate import Boilerplate
from data_prep.steps.c4 import C4
from data_prep.steps.decontaminate import Decontaminate, EvalIndex
from data_prep.steps.fineweb import FineWeb
from data_prep.steps.gopher_quality import GopherQuality
from data_prep.steps.gopher_repetition import GopherRepetition
from data_prep.steps.langid import LangId
from data_prep.steps.length import LengthPolicy
from data_prep.steps.normalize import Normalize
from data_prep.steps.pii import PII

STEPS: dict[str, type[Step]] = {
    "langid": LangId,
    "gopher_repetition": GopherRepetition,
    "gopher_quality": GopherQuality,
    "c4": C4,
    "fineweb": FineWeb,
    "pii": PII,
}
DEFAULT_FILTERS = list(STEPS)


def build_steps(cfg, eval_index: EvalIndex | None = None) -> list[Step]:
    """Steps for `cfg` (a PrepConfig, already schema-checked); ValueError names the `filter_params.*` key.

    `eval_index` adds decontamination (the runner builds it from `decontaminate.paths`).
    """
    disabled: dict[str, list[str]] = {}
    enabled: dict[str, list[str]] = {}
    for chosen, items in ((disabled, cfg.filter_disable), (enabled, cfg.filter_enable)):
        for item in items:
            step, _, rule = item.partition(":")
            chosen.setdefault(step, []).append(rule)
    steps: list[Step] = [Normalize(), LengthPolicy(cfg.max_doc_chars, cfg.long_doc_policy)]
    for name, cls in STEPS.items():
        if name == "pii" and eval_index is not None:
            steps.append(Decontaminate(eval_index))
        if name not in cfg.filters:
            continue
        kwargs = {"langs": cfg.langs, "threshold": cfg.lang_threshold} if name == "langid" else {}
        if cls.rules:
            kwargs["disabled"] = disabled.get(name, ())
        kwargs.update(cfg.filter_params.get(name, {}))
        try:
            steps.append(cls(**kwargs).enable(enabled.get(name, ())))
        except (TypeError, ValueError, AttributeError) as err:  # a parameter of the wrong type
            key = "langs" if name == "langid" and "language" in str(err) else f"filter_params.{name}"
            raise ValueError(f"{key}: {err}") from None
    return steps


__all__ = ["Step", "Filter", "STEPS", "DEFAULT_FILTERS", "Normalize", "LengthPolicy", "LangId", "GopherQuality",
           "GopherRepetition", "C4", "FineWeb", "PII", "Decontaminate", "EvalIndex", "Boilerplate",
           "build_steps"]
