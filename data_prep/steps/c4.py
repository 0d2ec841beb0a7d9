"""C4 rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", section 2.2).

Line rules edit the document: drop lines that do not end in terminal punctuation,
have fewer than 5 words, mention javascript, are cookie/privacy-policy notices, or
hold a word over 1000 characters; strip citation markers like "[1]" / "[edit]".
Page rules remove it: "lorem ipsum", a curly bracket (code), a listed bad word,
or fewer than 3 sentences left. C4's bad-word list is not shipped: pass your own.

Three departures from the paper, so that the defaults keep docs, man pages and code-bearing
prose: terminal_punct is off by default, as in FineWeb's use of these rules (it drops every
heading, option and code line; `filter_enable: [c4:terminal_punct]` turns it on); line rules
judge logical lines (a hard-wrapped paragraph is one line, see
text.logical_lines; web text, a paragraph a line, is unchanged), and curly_bracket removes
a page when lines holding "{" carry more than `max_curly_share` (0.1) of its characters
(code, not prose that quotes some; 0 is C4's "any {").
"""

from __future__ import annotations

import re

from data_prep.document import Document
from data_prep.steps.base import Filter
from data_prep.steps.text import TERMINAL, logical_lines, unwrap, words

POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]", re.I)
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’»]*(?=\s|$)|[。！？]+")


class C4(Filter):
    name = "c4"
    rules = ("lorem_ipsum", "curly_bracket", "bad_words", "citations", "javascript", "policy",
             "terminal_punct", "min_words_per_line", "max_word_length", "min_sentences")
    default_off = ("terminal_punct",)

    def __init__(self, min_words_per_line: int = 5, min_sentences: int = 3, max_word_length: int = 1000,
                 bad_words: list[str] | None = None, max_curly_share: float = 0.1, disabled=()):
        super().__init__(disabled)
        self.min_words_per_line, self.min_sentences, self.max_word_length = min_words_per_line, min_sentences, max_word_length
        self.bad_words = frozenset(w.lower() for w in (bad_words or []))
        if not 0 <= max_curly_share < 1:
            raise ValueError(f"max_curly_share: {max_curly_share} is not in [0, 1)")
        self.max_curly_share = max_curly_share

    def line_rule(self, line: str) -> str | None:
        """The rule that drops this (stripped, logical) line, or None to keep it."""
        low = line.lower()
        if self.on("javascript") and "javascript" in low:
            return "javascript"
        if self.on("policy") and any(p in low for p in POLICY):
            return "policy"
        if self.on("terminal_punct") and not line.endswith(TERMINAL):
            return "terminal_punct"
        long_line = len(line) > self.max_word_length  # only then can a word be too long
        if self.on("min_words_per_line") or (long_line and self.on("max_word_length")):
            ws = words(line)
            if self.on("min_words_per_line") and len(ws) < self.min_words_per_line:
                return "min_words_per_line"
            if long_line and self.on("max_word_length") and any(len(w) > self.max_word_length for w in ws):
                return "max_word_length"
        return None

    def curly_share(self, text: str) -> float:
        return sum(len(ln) for ln in text.split("\n") if "{" in ln) / max(1, len(text))

    def check(self, doc: Document):
        text = doc.text
        low = text.lower()
        if self.on("lorem_ipsum") and "lorem ipsum" in low:
            return "lorem_ipsum", "contains 'lorem ipsum'"
        if self.on("curly_bracket") and "{" in text:
            share = self.curly_share(text)
            if share > self.max_curly_share:
                return "curly_bracket", f"lines with '{{' hold {share:.0%} of the characters > {self.max_curly_share:.0%}"
        if self.on("bad_words") and self.bad_words:
            hit = self.bad_words.intersection(words(low))
            if hit:
                return "bad_words", f"contains {sorted(hit)[0]!r}"
        cut = []  # (rule, lines, characters) this document loses, counted only if it is kept
        if self.on("citations"):
            before = len(text)
            text = _CITATION.sub("", text)
            if len(text) < before:
                cut.append(("citations", 0, before - len(text)))
        kept = []
        for group in logical_lines(text.split("\n")):
            logical = unwrap(group)
            if not logical:
                if kept and kept[-1]:
                    kept.append("")
                continue
            rule = self.line_rule(logical)
            if rule is None:
                kept += [ln.rstrip() for ln in group]
            else:
                cut.append((rule, len(group), sum(len(ln) + 1 for ln in group)))
        text = "\n".join(kept).strip()
        if self.on("min_sentences"):
            n = len(_SENTENCE_END.findall(text))
            if n < self.min_sentences:
                return "min_sentences", f"{n} sentences left after line rules < {self.min_sentences}"
        if not text:
            return "min_sentences", "no line left after line rules"
        doc.text = text
        for rule, n_lines, n_chars in cut:
            self.cut(rule, n_lines, n_chars)
        return None
