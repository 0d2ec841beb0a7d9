"""Maximum document length: split an over-long document at paragraph breaks, or drop it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from data_prep.document import Document
from data_prep.steps.base import Step


def split_text(text: str, max_chars: int) -> list[str]:
    """Chunks of at most max_chars, cut at the last paragraph/line/space break when there is one."""
    chunks = []
    while len(text) > max_chars:
        window = text[:max_chars]
        cut = max(window.rfind("\n\n"), window.rfind("\n"), window.rfind(" "))
        cut = cut if cut > max_chars // 2 else max_chars
        chunks.append(window[:cut].strip())
        text = text[cut:].strip()
    chunks.append(text)
    return [c for c in chunks if c]


class LengthPolicy(Step):
    name = "length"

    def __init__(self, max_chars: int = 1_000_000, policy: str = "split"):
        if policy not in ("split", "drop"):
            raise ValueError(f"length policy must be split or drop, got {policy!r}")
        super().__init__()
        self.max_chars, self.policy = max_chars, policy

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            if doc.removed is not None or len(doc.text) <= self.max_chars:
                yield doc
            elif self.policy == "drop":
                yield doc.remove("too_long", f"{len(doc.text)} chars > {self.max_chars}")
            else:
                for i, chunk in enumerate(split_text(doc.text, self.max_chars)):
                    yield Document(f"{doc.id}#{i}", chunk, doc.source, dict(doc.meta, part=i))
