"""Datasets of Kiln's local lm-eval tasks, built from text that ships with Python (no download)."""

from __future__ import annotations

import inspect
import random


def _dataset(rows: list[dict]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(rows)})


def pydoc_topics(**_):
    """One document per Language Reference topic, in name order."""
    from pydoc_data.topics import topics

    return _dataset([{"id": name, "text": topics[name].strip()} for name in sorted(topics)])


def _summaries() -> list[tuple[str, str]]:
    """(signature line, first docstring line) of documented callables, one per summary text."""
    import builtins
    import math
    import os.path

    seen, out = set(), []
    for owner, prefix in ((vars(builtins), ""), (vars(math), "math."), (vars(str), "str."),
                          (vars(os.path), "os.path.")):
        for name in sorted(owner):
            obj = owner[name]
            if name.startswith("_") or not callable(obj) or inspect.isclass(obj):
                continue
            doc = (inspect.getdoc(obj) or "").strip().splitlines()
            summary = doc[0].strip() if doc else ""
            if len(summary) < 12 or summary in seen:
                continue
            try:
                sig = f"{prefix}{name}{inspect.signature(obj)}"
            except (TypeError, ValueError):
                continue
            seen.add(summary)
            out.append((sig, summary))
    return out


def stdlib_summaries(seed: int = 1234, **_):
    pairs = _summaries()
    rng = random.Random(seed)
    rows = []
    for i, (sig, summary) in enumerate(pairs):
        others = [s for j, (_, s) in enumerate(pairs) if j != i]
        choices = rng.sample(others, 3) + [summary]
        rng.shuffle(choices)
        rows.append({"signature": sig, "choices": choices, "label": choices.index(summary)})
    return _dataset(rows)
