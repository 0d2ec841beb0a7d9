"""The two things a reader yields: a usable `Document`, or a `BadRecord` to quarantine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Document:
    """One document flowing through the steps.

    A step that rejects a document does not drop it: it sets `removed`
    ("<step>:<rule>") and `detail`, and passes it on, so the runner can report
    every removal (steps skip documents that are already removed).
    """

    id: str
    text: str
    source: str = ""  # "relative/path:line"
    meta: dict = field(default_factory=dict)
    removed: str | None = None
    detail: str = ""

    def remove(self, reason: str, detail: str = "") -> Document:
        self.removed, self.detail = reason, detail
        return self


@dataclass(slots=True)
class BadRecord:
    """A record that could not be read as a document (goes to report/quarantine.jsonl)."""

    source: str
    reason: str
    raw: str

    def to_json(self) -> dict:
        return {"source": self.source, "reason": self.reason, "raw": self.raw[:200]}
