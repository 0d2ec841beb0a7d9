"""What every step is: a small class with one method over an iterator of documents.

A `Filter` only decides; its `check(doc)` returns None to keep a document or
`(rule, detail)` to remove it as "<name>:<rule>". Removed documents keep flowing
(marked) so the runner reports each one. Thresholds are constructor arguments
with the published values as defaults; `disabled` turns single rules off, and the few
rules in `default_off` (unsafe on text people commonly bring) are off until `enable`d. A step
that edits text (PII, boilerplate) counts what it changed in `counts`, which the
manifest reports as `counts.edits["<name>:<key>"]`; a rule that drops lines from a
document it keeps counts them with `cut`, reported next to the documents removed
(`counts.removed_lines` / `counts.removed_chars["<name>:<rule>"]`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from data_prep.document import Document


class Step:
    name = "step"
    rules: tuple[str, ...] = ()
    default_off: tuple[str, ...] = ()

    def __init__(self, disabled: Iterable[str] = ()):
        self.disabled = set(self.default_off) | self._own(disabled)
        self.counts: Counter = Counter()
        self.cut_lines: Counter = Counter()
        self.cut_chars: Counter = Counter()

    def cut(self, rule: str, lines: int, chars: int) -> None:
        """Rule `rule` dropped `lines` lines (`chars` characters, newlines included) of a kept document."""
        self.cut_lines[f"{self.name}:{rule}"] += lines
        self.cut_chars[f"{self.name}:{rule}"] += chars

    def _own(self, rules: Iterable[str]) -> set[str]:
        """This step's rules among `rules` ("rule" or "<name>:rule"); ValueError on one it does not have."""
        own = {r.split(":", 1)[-1] for r in rules if r.split(":", 1)[0] in (self.name, r)}
        unknown = own - set(self.rules)
        if unknown:
            raise ValueError(f"{self.name}: unknown rule(s) {sorted(unknown)}; known: {list(self.rules)}")
        return own

    def enable(self, rules: Iterable[str]) -> Step:
        """Turn rules on (those in `default_off`); returns the step."""
        self.disabled -= self._own(rules)
        return self

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
