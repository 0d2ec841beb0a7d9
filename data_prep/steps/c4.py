"""C4 rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", section 2.2).

Line rules edit the document: drop lines that do not end in terminal punctuation,
have fewer than 5 words, mention javascript, are cookie/privacy-policy notices, or
hold a word over 1000 characters; strip citation markers like "[1]" / "[edit]".
Page rules remove it: "lorem ipsum", a curly bracket (code), a listed bad word,
or fewer than 3 sentences left. C4's bad-word list is not shipped: pass your own.
"""

from __future__ import annotations

import re

from data_prep.document import Document
from data_prep.steps.base import Filter
from data_prep.steps.text import TERMINAL, words

POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]", re.I)
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’»]*(?=\s|$)|[。！？]+")


class C4(Filter):
    name = "c4"
    rules = ("lorem_ipsum", "curly_bracket", "bad_words", "citations", "javascript", "policy",
             "terminal_punct", "min_words_per_line", "max_word_length", "min_sentences")

    def __init__(self, min_words_per_line: int = 5, min_sentences: int = 3, max_word_length: int = 1000,
                 bad_words: list[str] | None = None, disabled=()):
        super().__init__(disabled)
        self.min_words_per_line, self.min_sentences, self.max_word_length = min_words_per_line, min_sentences, max_word_length
        self.bad_words = frozenset(w.lower() for w in (bad_words or []))

    def keep_line(self, line: str) -> bool:
        low = line.lower()
        if self.on("javascript") and "javascript" in low:
            return False
        if self.on("policy") and any(p in low for p in POLICY):
            return False
        if self.on("terminal_punct") and not line.endswith(TERMINAL):
            return False
        long_line = len(line) > self.max_word_length  # only then can a word be too long
        if self.on("min_words_per_line") or (long_line and self.on("max_word_length")):
            ws = words(line)
            if self.on("min_words_per_line") and len(ws) < self.min_words_per_line:
                return False
            if long_line and self.on("max_word_length") and any(len(w) > self.max_word_length for w in ws):
                return False
        return True

    def check(self, doc: Document):
        text = doc.text
        low = text.lower()
        if self.on("lorem_ipsum") and "lorem ipsum" in low:
            return "lorem_ipsum", "contains 'lorem ipsum'"
        if self.on("curly_bracket") and "{" in text:
            return "curly_bracket", "contains '{'"
        if self.on("bad_words") and self.bad_words:
            hit = self.bad_words.intersection(words(low))
            if hit:
                return "bad_words", f"contains {sorted(hit)[0]!r}"
        if self.on("citations"):
            text = _CITATION.sub("", text)
        kept = []
        for line in text.split("\n"):
            stripped = line.strip()
            if not stripped:
                if kept and kept[-1]:
                    kept.append("")
            elif self.keep_line(stripped):
                kept.append(line.rstrip())
        text = "\n".join(kept).strip()
        if self.on("min_sentences"):
            n = len(_SENTENCE_END.findall(text))
            if n < self.min_sentences:
                return "min_sentences", f"{n} sentences left after line rules < {self.min_sentences}"
        if not text:
            return "min_sentences", "no line left after line rules"
        doc.text = text
        return None
