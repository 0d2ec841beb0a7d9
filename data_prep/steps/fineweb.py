"""FineWeb quality rules (Penedo et al. 2024, "The FineWeb Datasets").

Removes a document when fewer than 12% of its lines end in terminal punctuation,
more than 67% of its lines are at most 30 characters, more than 1% of its
characters sit in lines that repeat an earlier line, or it has more than 0.3
newlines per word (a list, not prose). Lines are logical lines: a hard-wrapped
paragraph counts as one (text.logical_lines), as it would in web text.
"""

from __future__ import annotations

from data_prep.document import Document
from data_prep.steps.base import Filter
from data_prep.steps.text import TERMINAL, duplicates, logical_lines, unwrap, words


class FineWeb(Filter):
    name = "fineweb"
    rules = ("line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio")

    def __init__(self, line_punct_ratio: float = 0.12, short_line_ratio: float = 0.67, short_line_length: int = 30,
                 char_dup_ratio: float = 0.01, list_ratio: float = 0.3, disabled=()):
        super().__init__(disabled)
        self.punct, self.short, self.short_len = line_punct_ratio, short_line_ratio, short_line_length
        self.char_dup, self.list_ratio = char_dup_ratio, list_ratio

    def check(self, doc: Document):
        text = doc.text
        groups = logical_lines(text.split("\n"))
        ls = [ln for ln in map(unwrap, groups) if ln]
        if not ls:
            return "line_punct_ratio", "no lines"
        if self.on("line_punct_ratio"):
            ratio = sum(ln.endswith(TERMINAL) for ln in ls) / len(ls)
            if ratio < self.punct:
                return "line_punct_ratio", f"{ratio:.2f} < {self.punct}"
        if self.on("short_line_ratio"):
            ratio = sum(len(ln) <= self.short_len for ln in ls) / len(ls)
            if ratio > self.short:
                return "short_line_ratio", f"{ratio:.2f} > {self.short}"
        if self.on("char_dup_ratio"):
            ratio = duplicates(ls)[1] / max(1, len(text) - text.count("\n"))
            if ratio > self.char_dup:
                return "char_dup_ratio", f"{ratio:.3f} > {self.char_dup}"
        if self.on("list_ratio"):
            newlines = len(groups) - 1  # the newlines left once wrapped paragraphs are joined
            ratio = newlines / max(1, len(words(text)))
            if ratio > self.list_ratio:
                return "list_ratio", f"{ratio:.2f} > {self.list_ratio}"
        return None
