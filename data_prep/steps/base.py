"""What every step is: a small class with one method over an iterator of documents.

A `Filter` only decides; its `check(doc)` returns None to keep a document or
`(rule, detail)` to remove it as "<name>:<rule>". Removed documents keep flowing
(marked) so the runner reports each one. Thresholds are constructor arguments
with the published values as defaults; `disabled` turns single rules off. A step
that edits text (PII, boilerplate) counts what it changed in `counts`, which the
manifest reports as `counts.edits["<name>:<key>"]`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from data_prep.document import Document


class Step:
    name = "step"
    rules: tuple[str, ...] = ()

    def __init__(self, disabled: Iterable[str] = ()):
        # accept "rule" or "<name>:rule"
        self.disabled = {r.split(":", 1)[-1] for r in disabled if r.split(":", 1)[0] in (self.name, r)}
        unknown = self.disabled - set(self.rules)
        if unknown:
            raise ValueError(f"{self.name}: unknown rule(s) {sorted(unknown)}; known: {list(self.rules)}")
        self.counts: Counter = Counter()

    def on(self, rule: str) -> bool:
        return rule not in self.disabled

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        raise NotImplementedError


class Filter(Step):
    def check(self, doc: Document) -> tuple[str, str] | None:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            if doc.removed is None:
                hit = self.check(doc)
                if hit is not None:
                    doc.remove(f"{self.name}:{hit[0]}", hit[1])
            yield doc
